//! The tunnel's threads: the listener (accept, TLS handshake, peer identification) and one
//! driver per peer (dial, read, write, timers, events). The driver is the only owner of its
//! connection's socket; channel ends reach the endpoint through the peer's mutex and wake
//! the driver through its eventfd.

use super::{tls, ChannelEnd, Notifier, PeerShared, ReadyGroup, ServiceShared};
use domsock_migration::tunnel::{Event, Millis, TransmitSink};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use rustls::pki_types::ServerName;
use std::io::{self, BufRead, IoSlice, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tracing::{debug, info, warn};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
const DIAL_TIMEOUT: Duration = Duration::from_secs(2);
const BACKOFF_MIN_MS: u64 = 50;
const BACKOFF_MAX_MS: u64 = 2_000;
/// Plaintext frames handed to rustls per round, before its records go to the socket:
/// one full DATA frame, so the peer decrypts the first frame while this end encrypts the
/// next (a whole window at once would make the two ends take turns). rustls encrypts
/// under the endpoint's lock, so this also bounds how long channel ends wait for it.
const TRANSMIT_BUDGET_BYTES: usize = 64 << 10;
/// TLS reads per wakeup before the driver turns to writing (fairness between directions).
const READS_PER_ROUND: usize = 32;
/// rustls' buffer of encrypted bytes not yet written to TCP.
const TLS_BUFFER_BYTES: usize = 1 << 20;

fn handshake(sock: &mut TcpStream, tls: &mut rustls::Connection) -> io::Result<()> {
    sock.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
    sock.set_write_timeout(Some(HANDSHAKE_TIMEOUT))?;
    while tls.is_handshaking() {
        tls.complete_io(sock)?;
    }
    while tls.wants_write() {
        tls.write_tls(sock)?;
    }
    sock.set_read_timeout(None)?;
    sock.set_write_timeout(None)?;
    sock.set_nonblocking(true)?;
    sock.set_nodelay(true)?;
    Ok(())
}

/// The listener thread: authenticates each connection and hands it to its peer's driver.
pub(super) fn listen(svc: Arc<ServiceShared>, listener: TcpListener) {
    while !svc.stop.load(Ordering::SeqCst) {
        let mut fds = [PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
        let _ = poll(&mut fds, PollTimeout::from(200u16));
        let (mut sock, from) = match listener.accept() {
            Ok(s) => s,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => {
                warn!("tunnel accept: {e}");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        let refused = |why: String| {
            svc.refused_peers.fetch_add(1, Ordering::Relaxed);
            warn!(%from, "tunnel peer refused: {why}");
        };
        if sock.set_nonblocking(false).is_err() {
            continue;
        }
        let mut tls = match rustls::ServerConnection::new(svc.tls.server.clone()) {
            Ok(c) => rustls::Connection::Server(c),
            Err(e) => {
                warn!("tunnel TLS: {e}");
                continue;
            }
        };
        if let Err(e) = handshake(&mut sock, &mut tls) {
            refused(format!("TLS handshake: {e}"));
            continue;
        }
        let Some(cert) = tls.peer_certificates().and_then(|c| c.first()) else {
            refused("no certificate".into());
            continue;
        };
        let Some(name) = tls::peer_of(cert, svc.peers.keys().map(|s| s.as_str())) else {
            refused("certificate names no configured peer".into());
            continue;
        };
        let peer = &svc.peers[name];
        info!(%from, peer = name, "tunnel connection accepted");
        tls.set_buffer_limit(Some(TLS_BUFFER_BYTES));
        peer.lock().incoming = Some((sock, tls));
        peer.wake();
    }
}

struct Conn {
    sock: TcpStream,
    tls: rustls::Connection,
}

impl Conn {
    fn new(sock: TcpStream, tls: rustls::Connection) -> Self {
        Self { sock, tls }
    }
}

/// The endpoint's frames go straight into rustls, which copies each record's plaintext
/// (DATA payloads from the replay buffer) once, into the buffer it encrypts in place.
struct TlsSink<'a> {
    tls: &'a mut rustls::Connection,
    taken: usize,
    /// rustls took less than it was given (its buffer limit, or a failed connection).
    short: bool,
}

impl TransmitSink for TlsSink<'_> {
    fn taken(&self) -> usize {
        self.taken
    }

    fn put(&mut self, parts: &[&[u8]]) {
        if self.short {
            return;
        }
        let mut slices = [IoSlice::new(&[]); 4];
        let mut k = 0;
        let mut want = 0;
        for p in parts.iter().filter(|p| !p.is_empty()) {
            if k == slices.len() {
                // More parts than the endpoint ever gives: write what is gathered.
                self.put_slices(&slices[..k], want);
                (k, want) = (0, 0);
            }
            slices[k] = IoSlice::new(p);
            k += 1;
            want += p.len();
        }
        self.put_slices(&slices[..k], want);
    }
}

impl TlsSink<'_> {
    fn put_slices(&mut self, slices: &[IoSlice<'_>], want: usize) {
        if slices.is_empty() || self.short {
            return;
        }
        match self.tls.writer().write_vectored(slices) {
            Ok(n) if n == want => self.taken += n,
            _ => self.short = true,
        }
    }
}

fn dial(svc: &ServiceShared, peer: &PeerShared) -> io::Result<Conn> {
    let addr = peer
        .addr
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no address configured"))?;
    let mut sock = TcpStream::connect_timeout(&addr, DIAL_TIMEOUT)?;
    let name = ServerName::try_from(peer.name.clone())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let c = rustls::ClientConnection::new(svc.tls.client.clone(), name)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    let mut tls = rustls::Connection::Client(c);
    if let Err(e) = handshake(&mut sock, &mut tls) {
        if e.kind() == io::ErrorKind::InvalidData {
            svc.refused_peers.fetch_add(1, Ordering::Relaxed);
        }
        return Err(e);
    }
    tls.set_buffer_limit(Some(TLS_BUFFER_BYTES));
    Ok(Conn::new(sock, tls))
}

/// Reads what the socket has and feeds the endpoint. `Err` drops the connection.
fn read_side(c: &mut Conn, peer: &PeerShared) -> io::Result<()> {
    for _ in 0..READS_PER_ROUND {
        match c.tls.read_tls(&mut c.sock) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => {
                peer.counters
                    .bytes_received
                    .fetch_add(n as u64, Ordering::Relaxed);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
        c.tls
            .process_new_packets()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        // Decrypted records go to the endpoint from rustls' own buffer (no copy out).
        let now = peer.now();
        let mut g = peer.lock();
        loop {
            let n = match c.tls.reader().into_first_chunk() {
                Ok([]) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(chunk) => {
                    g.ep.handle_bytes(now, chunk)
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                    chunk.len()
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            };
            c.tls.reader().consume(n);
        }
    }
    Ok(())
}

/// Moves frames from the endpoint through TLS to the socket until it would block or
/// nothing is left. Returns whether the socket is backed up (poll for POLLOUT).
fn write_side(c: &mut Conn, peer: &PeerShared) -> io::Result<bool> {
    loop {
        while c.tls.wants_write() {
            match c.tls.write_tls(&mut c.sock) {
                Ok(n) => {
                    peer.counters
                        .bytes_sent
                        .fetch_add(n as u64, Ordering::Relaxed);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(true),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        // rustls holds nothing now: give it the next round (at most the budget and one
        // frame, well under its buffer limit, so it takes every byte).
        let mut sink = TlsSink {
            tls: &mut c.tls,
            taken: 0,
            short: false,
        };
        let now = peer.now();
        peer.lock()
            .ep
            .poll_transmit_into(now, &mut sink, TRANSMIT_BUDGET_BYTES);
        if sink.short {
            // The endpoint counts those frames as sent: only a new connection (and its
            // HELLO's counts) puts the stream right.
            return Err(io::Error::other(
                "TLS took fewer plaintext bytes than given",
            ));
        }
        if sink.taken == 0 {
            return Ok(false);
        }
    }
}

/// Acts on the endpoint's events: notifies channel ends, asks the acceptor about OPENs.
/// Returns whether the link is dead. Events are taken in batches under one lock (a busy
/// tunnel has one per DATA frame that finds its reader waiting), and the ends' eventfds
/// are written after the lock is released.
fn handle_events(svc: &ServiceShared, peer: &Arc<PeerShared>) -> bool {
    const BATCH: usize = 64;
    let mut dead = false;
    let mut notify: Vec<Notifier> = Vec::new();
    let mut groups: Vec<Arc<ReadyGroup>> = Vec::new();
    let mut others: Vec<Event> = Vec::new();
    loop {
        let (stats, count, more) = {
            let mut g = peer.lock();
            let mut more = false;
            while notify.len() + others.len() < BATCH {
                match g.ep.poll_event() {
                    Some(Event::Changed(id)) => {
                        if let Some(n) = g.ends.get(&id) {
                            notify.push(n.clone());
                        }
                    }
                    Some(ev) => others.push(ev),
                    None => break,
                }
                more = true;
            }
            (g.ep.stats(), g.ep.channel_count(), more)
        };
        for n in notify.drain(..) {
            if let Some(g) = n.notify() {
                if !groups.iter().any(|w| Arc::ptr_eq(w, g)) {
                    groups.push(g.clone());
                }
            }
        }
        for g in groups.drain(..) {
            g.wake();
        }
        let c = &peer.counters;
        c.frames_sent.store(stats.frames_sent, Ordering::Relaxed);
        c.frames_received
            .store(stats.frames_received, Ordering::Relaxed);
        c.channel_violations
            .store(stats.violations, Ordering::Relaxed);
        c.channels_timed_out
            .store(stats.timed_out_channels, Ordering::Relaxed);
        c.channels_open.store(count as u64, Ordering::Relaxed);
        c.window_growths
            .store(stats.window_growths, Ordering::Relaxed);
        c.window_growths_denied
            .store(stats.window_growths_denied, Ordering::Relaxed);
        if !more {
            return dead;
        }
        for ev in others.drain(..) {
            match ev {
                Event::Changed(_) => {}
                Event::LinkDead => dead = true,
                Event::Up { fresh } => info!(peer = %peer.name, fresh, "tunnel up"),
                Event::IncomingOpen {
                    channel,
                    kind,
                    metadata,
                } => match svc.acceptor.on_open(&peer.name, &metadata, kind) {
                    Ok(()) => {
                        let Ok(notify) = EventFd::new(EFD_NONBLOCK) else {
                            peer.lock().ep.refuse(
                                channel,
                                domsock_migration::tunnel::RefusalCode::TooMany,
                                "no eventfd",
                            );
                            continue;
                        };
                        let notify = Arc::new(notify);
                        let ok = {
                            let mut g = peer.lock();
                            let ok = g.ep.accept(channel).is_ok();
                            if ok {
                                g.ends.insert(channel, Notifier::Own(notify.clone()));
                            }
                            ok
                        };
                        if ok {
                            svc.acceptor.accepted(
                                ChannelEnd {
                                    peer: peer.clone(),
                                    id: channel,
                                    kind,
                                    notify,
                                },
                                metadata,
                            );
                        }
                    }
                    Err(r) => peer.lock().ep.refuse(channel, r.code, &r.text),
                },
            }
        }
    }
}

/// The driver of one peer's tunnel.
pub(super) fn run(svc: Arc<ServiceShared>, peer: Arc<PeerShared>) {
    let dials = peer.lock().ep.dials();
    let mut conn: Option<Conn> = None;
    let mut next_dial = Millis(0);
    let mut backoff = BACKOFF_MIN_MS;
    let mut ever_connected = false;
    while !svc.stop.load(Ordering::SeqCst) {
        let now = peer.now();
        let mut fresh = None;
        if let Some((sock, tls)) = peer.lock().incoming.take() {
            fresh = Some(Conn::new(sock, tls));
        }
        if fresh.is_none() && conn.is_none() && dials && now >= next_dial {
            match dial(&svc, &peer) {
                Ok(c) => {
                    fresh = Some(c);
                    backoff = BACKOFF_MIN_MS;
                }
                Err(e) => {
                    debug!(peer = %peer.name, "tunnel dial: {e}");
                    next_dial = peer.now().plus_ms(backoff);
                    backoff = (backoff * 2).min(BACKOFF_MAX_MS);
                }
            }
        }
        if let Some(c) = fresh {
            if let Some(old) = conn.replace(c) {
                let _ = old.sock.shutdown(std::net::Shutdown::Both);
            }
            peer.counters.connections.fetch_add(1, Ordering::Relaxed);
            if ever_connected {
                peer.counters.reconnects.fetch_add(1, Ordering::Relaxed);
            }
            ever_connected = true;
            let now = peer.now();
            peer.lock().ep.connected(now);
        }
        let mut backed_up = false;
        if let Some(c) = &mut conn {
            let r = read_side(c, &peer);
            let now = peer.now();
            peer.lock().ep.handle_timeout(now);
            let dead = handle_events(&svc, &peer);
            let r = r.and_then(|()| {
                if dead {
                    Err(io::Error::new(io::ErrorKind::TimedOut, "keepalive"))
                } else {
                    write_side(c, &peer)
                }
            });
            match r {
                Ok(b) => backed_up = b,
                Err(e) => {
                    info!(peer = %peer.name, "tunnel connection lost: {e}");
                    peer.counters.link_errors.fetch_add(1, Ordering::Relaxed);
                    let _ = c.sock.shutdown(std::net::Shutdown::Both);
                    conn = None;
                    let now = peer.now();
                    peer.lock().ep.disconnected(now);
                    next_dial = now.plus_ms(backoff);
                }
            }
        } else {
            peer.lock().ep.handle_timeout(now);
            handle_events(&svc, &peer);
        }
        // While the socket is backed up, POLLOUT brings the driver back to send; else
        // channel ends wake it from here on, and what they queued before is sent first.
        if !backed_up
            && peer
                .transmit_wake
                .idle(|| conn.is_some() && peer.lock().ep.wants_transmit())
        {
            continue;
        }
        // Wait for the socket, a wakeup, or the next timer.
        let now = peer.now();
        let mut deadline = peer.lock().ep.poll_timeout();
        if conn.is_none() && dials {
            deadline = Some(deadline.map_or(next_dial, |d| d.min(next_dial)));
        }
        let wait_ms = deadline.map_or(1_000, |d| d.0.saturating_sub(now.0).min(1_000));
        let timeout = PollTimeout::from(wait_ms as u16);
        let events = if backed_up {
            PollFlags::POLLIN | PollFlags::POLLOUT
        } else {
            PollFlags::POLLIN
        };
        let _ = match &conn {
            Some(c) => poll(
                &mut [
                    PollFd::new(peer.wake.as_fd_ref(), PollFlags::POLLIN),
                    PollFd::new(c.sock.as_fd(), events),
                ],
                timeout,
            ),
            None => poll(
                &mut [PollFd::new(peer.wake.as_fd_ref(), PollFlags::POLLIN)],
                timeout,
            ),
        };
        peer.transmit_wake.awake();
        let _ = peer.wake.read();
    }
    if let Some(c) = conn {
        let _ = c.sock.shutdown(std::net::Shutdown::Both);
    }
}

trait PlusMs {
    fn plus_ms(self, ms: u64) -> Millis;
}

impl PlusMs for Millis {
    fn plus_ms(self, ms: u64) -> Millis {
        Millis(self.0.saturating_add(ms))
    }
}

trait AsFdRef {
    fn as_fd_ref(&self) -> std::os::fd::BorrowedFd<'_>;
}

impl AsFdRef for EventFd {
    fn as_fd_ref(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsRawFd;
        // SAFETY: the eventfd is owned by `self` and stays open for the borrow.
        #[allow(unsafe_code)]
        unsafe {
            std::os::fd::BorrowedFd::borrow_raw(self.as_raw_fd())
        }
    }
}
