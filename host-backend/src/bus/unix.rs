//! Host processes as bus members: one Unix `SOCK_SEQPACKET` listening socket per namespace,
//! `<dir>/<namespace>.sock`, served by one thread with epoll.
//!
//! Whoever may open a namespace's socket file may join (and create) that namespace's buses,
//! with the grant its JOIN asks for: the file's owner, group and mode are the permission,
//! as for any file. A connection's first frame must be JOIN or REJOIN (anything else, or
//! a malformed frame, is answered REFUSED and closed); after JOINED every frame is a
//! request of that membership. A connection that closes without LEAVE parks its membership
//! (see [`super`]). Connections waiting for their first frame are bounded
//! ([`MAX_PENDING_BUS_CONNS`]); every member's queue is bounded by its bus.
//!
//! Guests' connections come in through the [`GuestDoor`]: the bus service of the engine's
//! service table hands over the far end of a socket pair (the engine carries the near end
//! like any host connection) with the guest's CID; the same thread serves it, and the
//! policy decides what the guest may do ([`BusHub::join_guest`]). A VM has at most
//! [`MAX_BUS_CONNS_PER_VM`] bus connections.
//!
//! What it does not do: the guest side of a guest's connection (the engine carries it).

use super::{BusHub, BusStats, Membership, Refusal, Wants};
use domsock_proto::bus::fanout::Grant;
use domsock_proto::bus::wire::{max_frame_len, MemberFrame, RefuseCode, ServiceFrame, Token};
use domsock_proto::bus::wire::{MAX_MESSAGE_LIMIT_BYTES, VERSION};
use domsock_proto::Cid;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::socket::{
    bind, listen, recv, socket, AddressFamily, Backlog, MsgFlags, SockFlag, SockType, UnixAddr,
};
use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tracing::{debug, warn};

/// Connections that have not sent their JOIN yet, at most.
pub const MAX_PENDING_BUS_CONNS: usize = 64;
/// Bus connections of one VM (waiting for their JOIN, or members), at most.
pub const MAX_BUS_CONNS_PER_VM: usize = 64;
/// How often parked memberships are checked for expiry.
const EXPIRY_CHECK: Duration = Duration::from_millis(250);
/// Frames read from one connection per round of the bus thread.
const ROUND_FRAMES: usize = 64;

/// Who is at the other end of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Who {
    /// A host process that opened the socket of this namespace.
    Host(String),
    /// The guest with this CID (its namespace is its VM's).
    Guest(Cid),
}

enum Conn {
    /// A namespace's listening socket.
    Listener(String, UnixListener),
    /// Guests' connections arrive here.
    Door,
    Pending {
        sock: Arc<OwnedFd>,
        who: Who,
    },
    Member {
        sock: Arc<OwnedFd>,
        m: Membership,
        who: Who,
    },
}

impl Conn {
    fn guest(&self) -> Option<Cid> {
        match self {
            Conn::Pending {
                who: Who::Guest(c), ..
            }
            | Conn::Member {
                who: Who::Guest(c), ..
            } => Some(*c),
            _ => None,
        }
    }
}

/// Where the engine's bus service hands guests' connections to the bus thread.
#[derive(Debug)]
pub struct GuestDoor {
    tx: Mutex<mpsc::Sender<(OwnedFd, Cid)>>,
    /// One byte wakes the bus thread (a full buffer means it is woken already).
    wake: UnixDatagram,
}

impl GuestDoor {
    /// Hands `fd` (the bus thread's end of guest `cid`'s connection) over.
    pub fn admit(&self, fd: OwnedFd, cid: Cid) -> io::Result<()> {
        super::lock(&self.tx)
            .send((fd, cid))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "bus thread gone"))?;
        match self.wake.send(&[1]) {
            Err(e) if e.kind() != io::ErrorKind::WouldBlock => Err(e),
            _ => Ok(()),
        }
    }
}

/// The running server: its thread ends with the process.
#[derive(Debug)]
pub struct UnixBusServer {
    /// The sockets, one per namespace.
    pub sockets: Vec<PathBuf>,
    /// Guests' way in.
    pub door: Arc<GuestDoor>,
}

/// Binds `<dir>/<namespace>.sock` for each namespace and serves them on a thread.
pub fn spawn(hub: Arc<BusHub>, dir: &Path, namespaces: &[String]) -> io::Result<UnixBusServer> {
    start(hub, Some(dir), namespaces)
}

/// Starts the bus thread: guests through the returned [`GuestDoor`], and with `dir`,
/// host processes on `<dir>/<namespace>.sock` for each namespace.
pub fn start(
    hub: Arc<BusHub>,
    dir: Option<&Path>,
    namespaces: &[String],
) -> io::Result<UnixBusServer> {
    let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).map_err(io::Error::from)?;
    let mut conns: HashMap<RawFd, Conn> = HashMap::new();
    let mut sockets = Vec::new();
    let (wake, waker) = UnixDatagram::pair()?;
    wake.set_nonblocking(true)?;
    waker.set_nonblocking(true)?;
    let (tx, rx) = mpsc::channel();
    let door = Arc::new(GuestDoor {
        tx: Mutex::new(tx),
        wake: waker,
    });
    let wake_fd = wake.as_raw_fd();
    epoll.add(&wake, EpollEvent::new(EpollFlags::EPOLLIN, wake_fd as u64))?;
    conns.insert(wake_fd, Conn::Door);
    if let Some(dir) = dir {
        std::fs::create_dir_all(dir)?;
    }
    for ns in dir.map_or(&[][..], |_| namespaces) {
        let dir = dir.expect("checked");
        let path = dir.join(format!("{ns}.sock"));
        let _ = std::fs::remove_file(&path);
        let fd = socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        bind(fd.as_raw_fd(), &UnixAddr::new(&path)?)?;
        listen(&fd, Backlog::new(64).map_err(io::Error::from)?)?;
        let raw = fd.as_raw_fd();
        epoll.add(&fd, EpollEvent::new(EpollFlags::EPOLLIN, raw as u64))?;
        // std accepts a seqpacket connection as a `UnixStream` (boundaries kept): no raw
        // descriptors to take ownership of.
        conns.insert(raw, Conn::Listener(ns.clone(), UnixListener::from(fd)));
        sockets.push(path);
    }
    std::thread::Builder::new()
        .name("bus".into())
        .spawn(move || serve(&hub, &epoll, &mut conns, &wake, &rx))?;
    Ok(UnixBusServer { sockets, door })
}

fn token() -> Token {
    let mut t = [0u8; 16];
    getrandom::fill(&mut t).expect("OS randomness");
    Token(t)
}

fn send_now(fd: &OwnedFd, bytes: &[u8]) {
    let _ = nix::sys::socket::send(
        fd.as_raw_fd(),
        bytes,
        MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
    );
}

fn refuse(fd: &OwnedFd, r: &Refusal) {
    let mut v = Vec::new();
    ServiceFrame::Refused {
        code: r.code,
        text: &r.text,
    }
    .encode(&mut v);
    send_now(fd, &v);
}

fn serve(
    hub: &BusHub,
    epoll: &Epoll,
    conns: &mut HashMap<RawFd, Conn>,
    wake: &UnixDatagram,
    guests: &mpsc::Receiver<(OwnedFd, Cid)>,
) {
    let mut events = vec![EpollEvent::empty(); 64];
    let mut buf = vec![0u8; max_frame_len(MAX_MESSAGE_LIMIT_BYTES) + 1];
    let mut next_expiry = Instant::now() + EXPIRY_CHECK;
    loop {
        let timeout = EpollTimeout::try_from(EXPIRY_CHECK).unwrap_or(EpollTimeout::NONE);
        let n = match epoll.wait(&mut events, timeout) {
            Ok(n) => n,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                warn!("bus epoll: {e}");
                return;
            }
        };
        // MESSAGEs to members that take batches wait for the end of this round and go out
        // as one BATCH per member (`flush_deferred` below).
        let mut wants = Wants {
            defer: true,
            ..Wants::default()
        };
        for ev in &events[..n] {
            let fd = ev.data() as RawFd;
            let flags = ev.events();
            if let Some(Conn::Listener(ns, listener)) = conns.get(&fd) {
                let (ns, accepted) = (ns.clone(), accept_all(listener, ns));
                let accepted = accepted.into_iter().map(|a| (a, Who::Host(ns.clone())));
                admit(hub, accepted.collect(), epoll, conns);
                continue;
            }
            if let Some(Conn::Door) = conns.get(&fd) {
                while wake.recv(&mut [0u8; 64]).is_ok() {}
                let arrived = guests.try_iter().map(|(fd, cid)| (fd, Who::Guest(cid)));
                admit(hub, arrived.collect(), epoll, conns);
                continue;
            }
            if flags.contains(EpollFlags::EPOLLOUT) {
                if let Some(Conn::Member { m, sock, .. }) = conns.get(&fd) {
                    if hub.flush(m, &mut wants) {
                        let mut ev = EpollEvent::new(EpollFlags::EPOLLIN, fd as u64);
                        let _ = epoll.modify(sock.as_fd(), &mut ev);
                    }
                }
            }
            if flags.intersects(EpollFlags::EPOLLIN | EpollFlags::EPOLLHUP | EpollFlags::EPOLLERR) {
                read_all(hub, fd, &mut buf, epoll, conns, &mut wants);
            }
        }
        hub.flush_deferred(&mut wants);
        settle(epoll, conns, wants);
        if Instant::now() >= next_expiry {
            hub.expire(Instant::now());
            next_expiry = Instant::now() + EXPIRY_CHECK;
        }
    }
}

/// Re-arms writability for sockets with a queue; closes members cut off as slow.
fn settle(epoll: &Epoll, conns: &mut HashMap<RawFd, Conn>, wants: Wants) {
    for sock in wants.closed {
        let fd = sock.as_raw_fd();
        let _ = epoll.delete(sock.as_fd());
        conns.remove(&fd);
    }
    for sock in wants.writable {
        let fd = sock.as_raw_fd();
        if conns.contains_key(&fd) {
            let mut ev = EpollEvent::new(EpollFlags::EPOLLIN | EpollFlags::EPOLLOUT, fd as u64);
            if epoll.modify(sock.as_fd(), &mut ev).is_err() {
                debug!(fd, "bus member gone before its flush");
            }
        }
    }
}

/// Every connection waiting on `listener`, nonblocking.
fn accept_all(listener: &UnixListener, ns: &str) -> Vec<OwnedFd> {
    let mut accepted = Vec::new();
    loop {
        match listener.accept() {
            Ok((s, _)) => match s.set_nonblocking(true) {
                Ok(()) => accepted.push(OwnedFd::from(s)),
                Err(e) => warn!(namespace = ns, "bus connection: {e}"),
            },
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return accepted,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                warn!(namespace = ns, "bus accept: {e}");
                return accepted;
            }
        }
    }
}

/// New connections, waiting for their JOIN (at most [`MAX_PENDING_BUS_CONNS`] at once,
/// and [`MAX_BUS_CONNS_PER_VM`] of one guest; the rest are closed).
fn admit(
    hub: &BusHub,
    accepted: Vec<(OwnedFd, Who)>,
    epoll: &Epoll,
    conns: &mut HashMap<RawFd, Conn>,
) {
    for (fd, who) in accepted {
        let raw = fd.as_raw_fd();
        let sock = Arc::new(fd);
        let pending = conns
            .values()
            .filter(|c| matches!(c, Conn::Pending { .. }))
            .count();
        if pending >= MAX_PENDING_BUS_CONNS {
            debug!(?who, "too many bus connections before their JOIN");
            BusStats::inc(&hub.stats.too_many_conns);
            continue;
        }
        if let Who::Guest(cid) = who {
            if conns.values().filter(|c| c.guest() == Some(cid)).count() >= MAX_BUS_CONNS_PER_VM {
                debug!(%cid, "too many bus connections of one guest");
                BusStats::inc(&hub.stats.too_many_conns);
                continue;
            }
        }
        if epoll
            .add(
                sock.as_fd(),
                EpollEvent::new(EpollFlags::EPOLLIN, raw as u64),
            )
            .is_err()
        {
            continue;
        }
        conns.insert(raw, Conn::Pending { sock, who });
    }
}

/// Reads every frame waiting on `fd` and acts on it.
fn read_all(
    hub: &BusHub,
    fd: RawFd,
    buf: &mut [u8],
    epoll: &Epoll,
    conns: &mut HashMap<RawFd, Conn>,
    wants: &mut Wants,
) {
    // At most this many frames per connection and round: a busy publisher cannot hold
    // back the others, nor its receivers' deferred batches (epoll is level-triggered, so
    // the rest is read in the next round).
    for _ in 0..ROUND_FRAMES {
        let n = match recv(fd, buf, MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_TRUNC) {
            Ok(0) => return close(hub, fd, epoll, conns),
            Ok(n) => n,
            Err(nix::errno::Errno::EAGAIN) => return,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return close(hub, fd, epoll, conns),
        };
        let Some(conn) = conns.get_mut(&fd) else {
            return;
        };
        if n > buf.len() {
            // Longer than any frame: MSG_TRUNC returned the real length.
            let refusal = Refusal::new(RefuseCode::Malformed, format!("frame of {n} bytes"));
            match conn {
                Conn::Pending { sock, .. } => {
                    BusStats::inc(&hub.stats.refused_other);
                    refuse(sock, &refusal)
                }
                Conn::Member { m, .. } => {
                    BusStats::inc(&hub.stats.request_errors);
                    hub.answer(m, error_frame(&refusal.text), wants)
                }
                Conn::Listener(..) | Conn::Door => {}
            }
            if matches!(conn, Conn::Pending { .. }) {
                return close(hub, fd, epoll, conns);
            }
            continue;
        }
        let frame = &buf[..n];
        match conn {
            Conn::Listener(..) | Conn::Door => return,
            Conn::Pending { sock, who } => {
                let (sock, who) = (sock.clone(), who.clone());
                let joined = match MemberFrame::decode(frame) {
                    Ok(MemberFrame::Join {
                        name,
                        want,
                        create,
                        batches,
                    }) => {
                        let grant: Grant = want;
                        let sk = sock.clone();
                        match &who {
                            Who::Host(ns) => hub.join(ns, &name, grant, create, token(), sk),
                            Who::Guest(cid) => {
                                hub.join_guest(*cid, &name, grant, create, token(), sk)
                            }
                        }
                        .map(|(m, joined)| {
                            hub.set_batches(&m, batches);
                            send_now(&sock, &joined);
                            m
                        })
                    }
                    Ok(MemberFrame::Rejoin(t)) => match &who {
                        Who::Host(ns) => hub.rejoin(ns, &t, sock.clone(), wants),
                        Who::Guest(cid) => hub.rejoin_guest(*cid, &t, sock.clone(), wants),
                    },
                    Ok(_) => Err(Refusal::new(
                        RefuseCode::Malformed,
                        "the first frame must be JOIN or REJOIN",
                    )),
                    Err(domsock_proto::bus::wire::WireError::Version(v)) => Err(Refusal::new(
                        RefuseCode::Version,
                        format!("version {v}; this service speaks {VERSION}"),
                    )),
                    Err(e) => Err(Refusal::new(RefuseCode::Malformed, e.to_string())),
                };
                match joined {
                    Ok(m) => {
                        conns.insert(fd, Conn::Member { sock, m, who });
                    }
                    Err(r) => {
                        if matches!(r.code, RefuseCode::Malformed | RefuseCode::Version) {
                            BusStats::inc(&hub.stats.refused_other);
                        }
                        refuse(&sock, &r);
                        return close(hub, fd, epoll, conns);
                    }
                }
            }
            Conn::Member { sock, m, .. } => {
                let decoded = MemberFrame::decode(frame);
                let leave = matches!(decoded, Ok(MemberFrame::Leave));
                let answer = match decoded {
                    Ok(f) => hub.request(m, f, wants),
                    Err(e) => {
                        BusStats::inc(&hub.stats.request_errors);
                        Some(error_frame(&e.to_string()))
                    }
                };
                if let Some(a) = answer {
                    hub.answer(m, a, wants);
                }
                if leave {
                    let _ = epoll.delete(sock.as_fd());
                    conns.remove(&fd);
                    return;
                }
            }
        }
    }
}

fn error_frame(text: &str) -> Vec<u8> {
    let mut v = Vec::new();
    ServiceFrame::Error {
        code: domsock_proto::bus::wire::ErrorCode::Malformed,
        text,
    }
    .encode(&mut v);
    v
}

/// The connection ended: a member's membership parks.
fn close(hub: &BusHub, fd: RawFd, epoll: &Epoll, conns: &mut HashMap<RawFd, Conn>) {
    match conns.remove(&fd) {
        Some(Conn::Member { sock, m, .. }) => {
            let _ = epoll.delete(sock.as_fd());
            hub.park(&m, &sock, Instant::now());
        }
        Some(Conn::Pending { sock, .. }) => {
            let _ = epoll.delete(sock.as_fd());
        }
        Some(c @ (Conn::Listener(..) | Conn::Door)) => {
            conns.insert(fd, c);
        }
        None => {}
    }
}
