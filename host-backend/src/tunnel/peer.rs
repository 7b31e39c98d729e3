//! The tunnel's threads: the listener (accept, TLS handshake, peer identification) and one
//! driver per peer (dial, read, write, timers, events). The driver is the only owner of its
//! connection's socket; channel ends reach the endpoint through the peer's mutex and wake
//! the driver through its eventfd.

use super::record::{self, RecordAtATime, RecordLayer};
use super::{tls, ChannelEnd, Notifier, PeerShared, ReadyGroup, ServiceShared};
use domsock_migration::tunnel::{Event, Millis, TransmitSink};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use rustls::pki_types::{CertificateDer, ServerName};
use std::io::{self, Read, Write};
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
/// Plaintext frames sealed per round before the records go to the socket: one full DATA
/// frame, so the peer decrypts the first frame while this end encrypts the next (a whole
/// window at once would make the two ends take turns). The frames are copied out under
/// the endpoint's lock and sealed after it is released.
const TRANSMIT_BUDGET_BYTES: usize = 64 << 10;
/// Socket reads per round before the driver tells the channels' owners and turns to
/// writing: one read of up to [`READ_BUFFER_BYTES`]. More reads per round starve the
/// reader (it hears of nothing until the round ends) and delay the CREDITs it owes;
/// four pairs of the one-channel row (tunnel/TLS): one read 0.70-0.87, sixteen 0.63-0.83,
/// rustls' record-sized reads (32 per round) 0.68-0.75.
const READS_PER_ROUND: usize = 1;
/// The receive buffer: socket reads land here and records are opened in place.
const READ_BUFFER_BYTES: usize = 256 << 10;

/// Runs rustls' handshake on the blocking socket and takes the traffic secrets out of
/// it; returns them with the peer's end-entity certificate. Reads stop at record
/// boundaries, so nothing after the handshake is taken from the socket.
fn handshake(
    sock: &mut TcpStream,
    mut tls: rustls::Connection,
) -> io::Result<(Handshaken, Option<CertificateDer<'static>>)> {
    sock.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
    sock.set_write_timeout(Some(HANDSHAKE_TIMEOUT))?;
    {
        let mut io = RecordAtATime::new(&mut *sock);
        while tls.is_handshaking() {
            tls.complete_io(&mut io)?;
        }
        while tls.wants_write() {
            tls.write_tls(&mut io)?;
        }
    }
    if tls.protocol_version() != Some(rustls::ProtocolVersion::TLSv1_3) {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "not TLS 1.3"));
    }
    let cert = tls
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.clone().into_owned());
    let mut early = Vec::new();
    match tls.reader().read_to_end(&mut early) {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
        Err(e) => return Err(e),
    }
    let secrets = tls
        .dangerous_extract_secrets()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    let layer = RecordLayer::new(secrets)?;
    sock.set_read_timeout(None)?;
    sock.set_write_timeout(None)?;
    sock.set_nonblocking(true)?;
    sock.set_nodelay(true)?;
    Ok(((layer, early), cert))
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
        let tls = match rustls::ServerConnection::new(svc.tls.server.clone()) {
            Ok(c) => rustls::Connection::Server(c),
            Err(e) => {
                warn!("tunnel TLS: {e}");
                continue;
            }
        };
        let (tls, cert) = match handshake(&mut sock, tls) {
            Ok(t) => t,
            Err(e) => {
                refused(format!("TLS handshake: {e}"));
                continue;
            }
        };
        let Some(cert) = cert.as_ref() else {
            refused("no certificate".into());
            continue;
        };
        let Some(name) = tls::peer_of(cert, svc.peers.keys().map(|s| s.as_str())) else {
            refused("certificate names no configured peer".into());
            continue;
        };
        let peer = &svc.peers[name];
        info!(%from, peer = name, "tunnel connection accepted");
        peer.lock().incoming = Some(Conn::new(sock, tls));
        peer.wake();
    }
}

/// A connection's record layer and the plaintext rustls decrypted before the secrets
/// were taken (none with the tunnel's own peers, but not lost if there is).
type Handshaken = (RecordLayer, Vec<u8>);

/// One TCP connection to the peer with its record layer and buffers.
pub(super) struct Conn {
    sock: TcpStream,
    rec: RecordLayer,
    /// Socket reads land in `rbuf[rend..]`; `rbuf[rstart..rend]` is not yet opened.
    rbuf: Box<[u8]>,
    rstart: usize,
    rend: usize,
    /// Sealed records; `wbuf[wpos..]` is not yet written.
    wbuf: Vec<u8>,
    wpos: usize,
    /// Plaintext rustls decrypted before the secrets were taken (fed first).
    early: Vec<u8>,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn").field("sock", &self.sock).finish()
    }
}

impl Conn {
    fn new(sock: TcpStream, (rec, early): Handshaken) -> Self {
        Self {
            sock,
            rec,
            rbuf: vec![0u8; READ_BUFFER_BYTES].into_boxed_slice(),
            rstart: 0,
            rend: 0,
            wbuf: Vec::with_capacity(TRANSMIT_BUDGET_BYTES * 2 + 4 * record::MAX_PLAINTEXT),
            wpos: 0,
            early,
        }
    }
}

/// The endpoint's frames are copied once, into records laid out in `buf` (header room,
/// plaintext, room for the content type and tag); they are sealed after the endpoint's
/// lock is released.
struct RecordSink<'a> {
    buf: &'a mut Vec<u8>,
    /// Start of each record in `buf` (the last one may still be filling).
    records: &'a mut Vec<usize>,
    /// Plaintext bytes in the record that is filling (None: no record open).
    filling: Option<usize>,
    taken: usize,
}

impl TransmitSink for RecordSink<'_> {
    fn taken(&self) -> usize {
        self.taken
    }

    fn put(&mut self, parts: &[&[u8]]) {
        for p in parts {
            let mut p: &[u8] = p;
            while !p.is_empty() {
                let used = match self.filling {
                    Some(u) if u < record::MAX_PLAINTEXT => u,
                    _ => {
                        self.close_record();
                        self.records.push(self.buf.len());
                        self.buf.extend_from_slice(&[0; record::HEADER_LEN]);
                        0
                    }
                };
                let n = p.len().min(record::MAX_PLAINTEXT - used);
                self.buf.extend_from_slice(&p[..n]);
                self.filling = Some(used + n);
                self.taken += n;
                p = &p[n..];
            }
        }
    }
}

impl RecordSink<'_> {
    /// Ends the filling record: room for what sealing appends.
    fn close_record(&mut self) {
        if self.filling.take().is_some() {
            self.buf.extend_from_slice(&[0; record::SEAL_OVERHEAD]);
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
    match handshake(&mut sock, rustls::Connection::Client(c)) {
        Ok((h, _)) => Ok(Conn::new(sock, h)),
        Err(e) => {
            if e.kind() == io::ErrorKind::InvalidData {
                svc.refused_peers.fetch_add(1, Ordering::Relaxed);
            }
            Err(e)
        }
    }
}

/// Reads what the socket has, opens the records in place and feeds their plaintext to
/// the endpoint (one lock per read). `Err` drops the connection.
fn read_side(c: &mut Conn, peer: &PeerShared) -> io::Result<()> {
    if !c.early.is_empty() {
        let early = std::mem::take(&mut c.early);
        let now = peer.now();
        peer.lock()
            .ep
            .handle_bytes(now, &early)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    }
    // Plaintext ranges of the records opened from one read.
    let mut plain: Vec<(usize, usize)> = Vec::with_capacity(READ_BUFFER_BYTES / 1024);
    for _ in 0..READS_PER_ROUND {
        if c.rend == c.rbuf.len() {
            // Only a partial record is left at the end: move it to the front.
            c.rbuf.copy_within(c.rstart..c.rend, 0);
            c.rend -= c.rstart;
            c.rstart = 0;
        }
        match c.sock.read(&mut c.rbuf[c.rend..]) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => {
                c.rend += n;
                peer.counters
                    .bytes_received
                    .fetch_add(n as u64, Ordering::Relaxed);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
        // Open every whole record outside the endpoint's lock.
        while c.rend - c.rstart >= record::HEADER_LEN {
            let at = c.rstart;
            let len = record::record_len(&c.rbuf[at..at + record::HEADER_LEN])?;
            let end = at + record::HEADER_LEN + len;
            if end > c.rend {
                break;
            }
            let p = c.rec.rx.open(&mut c.rbuf[at..end])?;
            if !p.is_empty() {
                plain.push((at + record::HEADER_LEN, p.len()));
            }
            c.rstart = end;
        }
        if !plain.is_empty() {
            let now = peer.now();
            let mut g = peer.lock();
            for (at, n) in plain.drain(..) {
                g.ep.handle_bytes(now, &c.rbuf[at..at + n])
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            }
        }
        if c.rstart == c.rend {
            (c.rstart, c.rend) = (0, 0);
        }
    }
    Ok(())
}

/// Moves frames from the endpoint through the record layer to the socket until it would
/// block or nothing is left. Returns whether the socket is backed up (poll for POLLOUT).
fn write_side(c: &mut Conn, peer: &PeerShared) -> io::Result<bool> {
    let mut records = Vec::new();
    loop {
        while c.wpos < c.wbuf.len() {
            match c.sock.write(&c.wbuf[c.wpos..]) {
                Ok(n) => {
                    c.wpos += n;
                    peer.counters
                        .bytes_sent
                        .fetch_add(n as u64, Ordering::Relaxed);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(true),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        c.wbuf.clear();
        c.wpos = 0;
        // Everything is written: copy the next round out of the endpoint, then seal it.
        let mut sink = RecordSink {
            buf: &mut c.wbuf,
            records: &mut records,
            filling: None,
            taken: 0,
        };
        let now = peer.now();
        peer.lock()
            .ep
            .poll_transmit_into(now, &mut sink, TRANSMIT_BUDGET_BYTES);
        sink.close_record();
        if sink.taken == 0 {
            return Ok(false);
        }
        records.push(c.wbuf.len());
        for w in records.windows(2) {
            c.rec.tx.seal(&mut c.wbuf[w[0]..w[1]])?;
        }
        records.clear();
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
        let mut fresh = peer.lock().incoming.take();
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
