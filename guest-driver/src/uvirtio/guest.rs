//! [`UserGuest`]: vsock sockets of one simulated guest, over the [`Driver`] and the sans-IO
//! [`Endpoint`] of `domsock-proto`.
//!
//! Single-threaded and polled: nothing happens between calls. Every call first does what it
//! can with what the device already returned, and ends by publishing control packets,
//! refilling RX buffers and kicking the device where it asked for kicks. [`UserGuest::poll`]
//! processes the used rings and timers and, when nothing happened, sleeps until the device
//! calls. The blocking helpers (`*_timeout`, [`UserGuest::write_all`],
//! [`UserGuest::read_exact`], ...) are loops of a non-blocking call and `poll`, bounded by
//! their deadline. Several guests run in separate threads, one `UserGuest` each.
//!
//! A socket is named by its [`ConnKey`]. Received payload stays in the RX buffer the device
//! wrote it to until the application reads it ([`UserGuest::recv`] copies guest memory into
//! the caller's buffer); sending copies the caller's bytes into a TX slot. Each connection's
//! unread bytes are bounded by the `buf_alloc` its endpoint advertises; reading them reports
//! consumption to the endpoint, which sends credit updates.
//!
//! Connection lifecycle as the application sees it:
//! - a connect ends in [`SockError::Refused`] (RST), [`SockError::ConnectTimedOut`] or
//!   success; a listener's connections are accepted by the protocol at once (as Linux does)
//!   and wait in its backlog for [`UserGuest::accept`];
//! - the peer's `SHUTDOWN(SEND)` makes reads return 0 once the queue is drained; its full
//!   close is acknowledged with RST at once and also reads as EOF; an RST reads as
//!   [`SockError::Reset`] (after the data received before it);
//! - [`UserGuest::close`] forgets the socket at once; the protocol close handshake finishes in
//!   the background during later calls.

use super::config::GuestConfig;
use super::driver::{Driver, GuestStats};
use super::error::{DeviceError, SetupError, SockError};
use super::frontend::{self, Negotiated};
use super::memory::{self, Layout};
use domsock_proto::hash::KeyedState;
use domsock_proto::rules::{self, DropClass};
use domsock_proto::{
    Cid, ConnKey, Endpoint, Header, Incoming, Port, RawHeader, Shutdown, SocketType, State,
    Timeout, VsockAddr, HEADER_LEN,
};
use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::debug;
use vhost::vhost_user::Frontend;

/// `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`.
const EVENT_TRANSPORT_RESET: u32 = 0;

/// One received seqpacket message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Message {
    /// Bytes copied into the caller's buffer.
    pub len: usize,
    /// Length of the whole message; more than `len` if the buffer was too small (the rest
    /// was discarded, as `recv` on a `SOCK_SEQPACKET` socket does).
    pub msg_len: usize,
}

impl Message {
    /// Whether the buffer was too small for the message.
    pub fn truncated(&self) -> bool {
        self.msg_len > self.len
    }
}

/// Why a socket no longer has a connection behind it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// The peer closed both directions (we acknowledged with RST), or our own full close
    /// completed.
    Closed,
    /// RST while established.
    Reset,
    /// RST in answer to our request.
    Refused,
    /// No answer to our request.
    ConnectTimeout,
    /// The peer broke the protocol.
    Violation(&'static str),
    /// The device reset the transport.
    TransportReset,
    /// The device was unplugged.
    DeviceGone,
}

/// Where received payload lives until the application reads it.
#[derive(Debug)]
enum ChunkData {
    /// Still in the RX buffer the device wrote.
    Guest(u32),
    /// Copied out (no spare RX buffer was left to hold it).
    Heap(Vec<u8>),
}

/// One received packet's payload.
#[derive(Debug)]
struct Chunk {
    data: ChunkData,
    /// Bytes already read.
    off: u32,
    len: u32,
    /// Last packet of a seqpacket message.
    eom: bool,
}

/// The socket side of one connection.
#[derive(Debug)]
struct Sock {
    socket_type: SocketType,
    rx: VecDeque<Chunk>,
    /// Unread payload bytes in `rx`.
    rx_bytes: usize,
    /// Complete messages in `rx` (seqpacket).
    rx_messages: usize,
    /// The connection was established at some point.
    connected: bool,
    /// The peer shut its sending side: reads end with EOF, whatever happens next.
    peer_send_shut: bool,
    end: Option<End>,
    /// The credit we had when we last sent CREDIT_REQUEST for a message that did not fit;
    /// asked again only once the credit moved (see `send_msg`).
    credit_requested_at: Option<u32>,
}

impl Sock {
    fn new(socket_type: SocketType, connected: bool) -> Self {
        Self {
            socket_type,
            rx: VecDeque::new(),
            rx_bytes: 0,
            rx_messages: 0,
            connected,
            peer_send_shut: false,
            end: None,
            credit_requested_at: None,
        }
    }
}

/// A listening port.
#[derive(Debug)]
struct Listener {
    socket_type: SocketType,
    backlog: VecDeque<ConnKey>,
}

/// One simulated guest: a vhost-user frontend, a virtio-vsock driver and vsock sockets, in
/// one single-threaded object (see the module doc).
pub struct UserGuest {
    /// The vhost-user session; the device lives as long as it does (or until
    /// [`UserGuest::replug`] replaces it on the same session).
    frontend: Frontend,
    config: GuestConfig,
    negotiated: Negotiated,
    cid: Cid,
    driver: Driver,
    endpoint: Endpoint,
    socks: HashMap<ConnKey, Sock, KeyedState>,
    listeners: HashMap<Port, Listener, KeyedState>,
    listen_backlog: usize,
    broken: Option<Arc<DeviceError>>,
}

/// Builds the guest side of a negotiated device (memory, rings, buffers) and hands it to
/// the backend: memory table, rings, enable, then a sync and a kick of every ring.
fn start_device(
    fe: &mut Frontend,
    config: &GuestConfig,
    negotiated: &Negotiated,
) -> Result<Driver, SetupError> {
    let layout = Layout::new(config);
    let mem = memory::create(layout.bytes)?;
    let queues = if negotiated.has_event_queue() { 3 } else { 2 };
    let mut driver = Driver::new(config, layout, mem, negotiated.event_idx, queues)?;
    frontend::share_memory(fe, driver.mem())?;
    // Buffers go in before the rings start, as a guest driver does at probe time.
    driver.refill_rx().map_err(SetupError::Device)?;
    driver.post_events().map_err(SetupError::Device)?;
    for q in 0..driver.queues() {
        let (addrs, kick, call) = driver.queue(q);
        frontend::start_queue(fe, q, addrs, driver.mem(), kick, call)?;
    }
    for q in 0..driver.queues() {
        frontend::enable_queue(fe, negotiated, q)?;
    }
    frontend::sync(fe)?;
    driver.kick_all().map_err(SetupError::Device)?;
    Ok(driver)
}

impl std::fmt::Debug for UserGuest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserGuest")
            .field("cid", &self.cid)
            .field("negotiated", &self.negotiated)
            .field("connections", &self.socks.len())
            .field("broken", &self.broken)
            .finish_non_exhaustive()
    }
}

impl UserGuest {
    /// Connects to the vhost-user vsock backend at `vhost_socket`, negotiates, shares guest
    /// memory and starts the rings.
    pub fn connect(
        vhost_socket: impl AsRef<Path>,
        config: GuestConfig,
    ) -> Result<Self, SetupError> {
        config.validate()?;
        let (mut fe, negotiated, cid) = frontend::negotiate(vhost_socket.as_ref(), &config)?;
        let driver = start_device(&mut fe, &config, &negotiated)?;
        debug!(%cid, ?negotiated, "user-space guest up");
        Ok(Self {
            frontend: fe,
            negotiated,
            cid,
            driver,
            endpoint: Endpoint::new(config.endpoint.clone()),
            // A test instrument, not a target: a fixed seed keeps runs reproducible, and
            // the keyed fast hasher keeps SipHash out of the per-packet path.
            socks: HashMap::with_hasher(KeyedState::new(config.endpoint.hash_seed)),
            listeners: HashMap::with_hasher(KeyedState::new(config.endpoint.hash_seed ^ 1)),
            listen_backlog: config.listen_backlog,
            broken: None,
            config,
        })
    }

    /// Unplugs the device and plugs a new one on the same vhost-user session, sending what
    /// QEMU sends for QMP `device_del` then `device_add` on the same chardev: the rings stop
    /// (`GET_VRING_BASE`), then the new device is initialised from the feature probe on,
    /// `SET_OWNER` included, with new guest memory and rings ([`frontend`] has the order).
    ///
    /// As in a Linux guest, every connection is gone (its calls fail with
    /// [`SockError::DeviceGone`]) and listeners stay. Device statistics start again from
    /// zero; a device error ([`DeviceError`]) of the old device is forgotten.
    pub fn replug(&mut self) -> Result<(), SetupError> {
        let calls: Vec<&vmm_sys_util::eventfd::EventFd> = (0..self.driver.queues())
            .map(|q| self.driver.queue(q).2)
            .collect();
        frontend::unplug(&mut self.frontend, &self.negotiated, &calls)?;
        // The old device's buffers are gone with it: nothing received stays readable.
        self.endpoint.clear();
        for s in self.socks.values_mut() {
            s.rx.clear();
            s.rx_bytes = 0;
            s.rx_messages = 0;
            s.end.get_or_insert(End::DeviceGone);
        }
        for l in self.listeners.values_mut() {
            l.backlog.clear();
        }
        let (negotiated, cid) = frontend::negotiate_device(
            &mut self.frontend,
            &self.config,
            frontend::OwnerOrder::AfterProbe,
        )?;
        self.driver = start_device(&mut self.frontend, &self.config, &negotiated)?;
        self.negotiated = negotiated;
        self.cid = cid;
        self.broken = None;
        debug!(%cid, "user-space guest: device plugged again");
        Ok(())
    }

    /// The guest's CID.
    pub fn cid(&self) -> Cid {
        self.cid
    }

    /// What was negotiated with the device.
    pub fn negotiated(&self) -> &Negotiated {
        &self.negotiated
    }

    /// Counters.
    pub fn stats(&self) -> GuestStats {
        self.driver.stats()
    }

    /// Sockets the application holds (connected, connecting, ended but not closed).
    pub fn sockets(&self) -> usize {
        self.socks.len()
    }

    // ---- connections --------------------------------------------------------------------

    /// Starts connecting to `peer` from an ephemeral port; see [`UserGuest::is_connected`].
    pub fn start_connect(
        &mut self,
        peer: VsockAddr,
        socket_type: SocketType,
    ) -> Result<ConnKey, SockError> {
        self.check_broken()?;
        self.check_type_supported(socket_type)?;
        let key = self
            .endpoint
            .connect(Instant::now(), self.cid, None, peer, socket_type)?;
        self.socks.insert(key, Sock::new(socket_type, false));
        self.flush()?;
        Ok(key)
    }

    /// Connects to `peer`, waiting at most `timeout` for the answer.
    pub fn connect_timeout(
        &mut self,
        peer: VsockAddr,
        socket_type: SocketType,
        timeout: Duration,
    ) -> Result<ConnKey, SockError> {
        let key = self.start_connect(peer, socket_type)?;
        let r = self.wait_until("connect", timeout, |g| {
            Ok(g.is_connected(key)?.then_some(()))
        });
        match r {
            Ok(()) => Ok(key),
            Err(e) => {
                let _ = self.close(key);
                Err(e)
            }
        }
    }

    /// `Ok(true)` once the connection was established, `Ok(false)` while connecting, and the
    /// reason if the connect failed.
    pub fn is_connected(&mut self, key: ConnKey) -> Result<bool, SockError> {
        self.check_broken()?;
        let sock = self.sock(key)?;
        if sock.connected {
            return Ok(true);
        }
        match sock.end {
            Some(end) => Err(end_error(key, end)),
            None => Ok(false),
        }
    }

    /// Listens on `port` for connections of `socket_type`.
    pub fn listen(&mut self, port: Port, socket_type: SocketType) -> Result<(), SockError> {
        self.check_broken()?;
        self.check_type_supported(socket_type)?;
        if self.listeners.contains_key(&port) {
            return Err(SockError::PortInUse(port));
        }
        self.listeners.insert(
            port,
            Listener {
                socket_type,
                backlog: VecDeque::new(),
            },
        );
        Ok(())
    }

    /// Stops listening; connections not accepted yet are reset.
    pub fn unlisten(&mut self, port: Port) -> Result<(), SockError> {
        let listener = self
            .listeners
            .remove(&port)
            .ok_or(SockError::NotListening(port))?;
        for key in listener.backlog {
            if let Some(sock) = self.socks.remove(&key) {
                self.release_all(sock);
            }
            self.endpoint.reset(key);
        }
        self.flush()
    }

    /// The next connection accepted on `port`, if any.
    pub fn accept(&mut self, port: Port) -> Result<Option<ConnKey>, SockError> {
        self.check_broken()?;
        if !self.listeners.contains_key(&port) {
            return Err(SockError::NotListening(port));
        }
        if self.listeners[&port].backlog.is_empty() {
            self.service()?;
        }
        Ok(self
            .listeners
            .get_mut(&port)
            .and_then(|l| l.backlog.pop_front()))
    }

    /// Waits at most `timeout` for a connection on `port`.
    pub fn accept_timeout(&mut self, port: Port, timeout: Duration) -> Result<ConnKey, SockError> {
        self.wait_until("accept", timeout, |g| g.accept(port))
    }

    /// Shuts one or both directions of `key` (idempotent; a no-op once the connection ended).
    /// Shutting the receive side discards unread data; later reads return 0.
    pub fn shutdown(&mut self, key: ConnKey, how: Shutdown) -> Result<(), SockError> {
        self.check_broken()?;
        self.sock(key)?;
        if how.rcv {
            let sock = self.socks.get_mut(&key).expect("checked");
            let discarded: Vec<Chunk> = sock.rx.drain(..).collect();
            let bytes = std::mem::take(&mut sock.rx_bytes);
            sock.rx_messages = 0;
            for c in discarded {
                self.release_chunk(c);
            }
            self.endpoint.consumed(&key, bytes as u32);
        }
        if self.endpoint.get(&key).is_some() {
            self.endpoint.shutdown(Instant::now(), &key, how);
            if self.endpoint.get(&key).is_none() {
                // Both sides have now shut everything (or we were still connecting).
                let sock = self.socks.get_mut(&key).expect("checked");
                sock.end.get_or_insert(End::Closed);
            }
        }
        self.after_change(key);
        self.flush()
    }

    /// Closes `key`: unread data is dropped, the key is forgotten at once, and the close
    /// handshake with the peer completes during later calls.
    pub fn close(&mut self, key: ConnKey) -> Result<(), SockError> {
        let sock = self
            .socks
            .remove(&key)
            .ok_or(SockError::UnknownConnection(key))?;
        self.release_all(sock);
        for l in self.listeners.values_mut() {
            l.backlog.retain(|k| *k != key);
        }
        if self.endpoint.get(&key).is_some() {
            self.endpoint.shutdown(Instant::now(), &key, Shutdown::BOTH);
        }
        if self.broken.is_some() {
            return Ok(());
        }
        self.flush()
    }

    // ---- data ---------------------------------------------------------------------------

    /// Sends what fits now (credit, ring space) of `data`; returns the bytes taken. On a
    /// seqpacket socket, sends `data` as one message ([`UserGuest::send_msg`]).
    pub fn send(&mut self, key: ConnKey, data: &[u8]) -> Result<usize, SockError> {
        self.check_broken()?;
        if self.sock(key)?.socket_type == SocketType::SeqPacket {
            return self.send_msg(key, data).map(|()| data.len());
        }
        if data.is_empty() {
            return Ok(0);
        }
        let mut sent = 0;
        for attempt in 0..2 {
            self.check_sendable(key)?;
            self.flush_control()?;
            if !self.endpoint.has_transmit() {
                let mut credit = self.endpoint.send_credit(&key) as usize;
                let max = self.driver.max_tx_payload();
                while sent < data.len() && credit > 0 {
                    let n = (data.len() - sent).min(credit).min(max);
                    if !self.driver.tx_room([n]) {
                        break;
                    }
                    let hdr = self.endpoint.send_rw(&key, n as u32, false, false)?;
                    self.driver
                        .send(&hdr, &data[sent..sent + n])
                        .map_err(|e| self.fail(e))?;
                    sent += n;
                    credit -= n;
                }
            }
            if sent > 0 || attempt == 1 {
                break;
            }
            // Nothing fit: take in what the device returned (TX slots, credit) and retry once.
            self.service()?;
        }
        self.driver.kick().map_err(|e| self.fail(e))?;
        if sent == 0 {
            Err(SockError::WouldBlock)
        } else {
            Ok(sent)
        }
    }

    /// Sends `msg` as one seqpacket message, all of it or nothing ([`SockError::WouldBlock`]
    /// until credit and ring space allow). Empty messages are not sent (as Linux does).
    ///
    /// Unlike Linux, which sends a message's packets as credit comes in, this waits until the
    /// peer's credit covers the whole message, and asks for none: a peer that reports freed
    /// space only once our view of it drops below half its buffer (domsockd does) leaves a
    /// message larger than the free space we last heard of waiting for ever.
    pub fn send_msg(&mut self, key: ConnKey, msg: &[u8]) -> Result<(), SockError> {
        self.check_broken()?;
        self.check_type(key, SocketType::SeqPacket)?;
        if msg.is_empty() {
            return Ok(());
        }
        let max = self.driver.max_tx_payload();
        let packets = msg.len().div_ceil(max);
        let payloads = || msg.chunks(max).map(<[u8]>::len);
        // All of a message's packets are published at once; a message that can never fit
        // the ring would otherwise wait forever.
        let (_, descriptors) = self.driver.tx_footprint(payloads());
        if descriptors > self.driver.tx_ring_size() {
            return Err(SockError::MessageExceedsRing {
                len: msg.len(),
                descriptors,
                ring: self.driver.tx_ring_size(),
            });
        }
        for attempt in 0..2 {
            self.check_sendable(key)?;
            let conn = self.endpoint.get(&key).expect("sendable");
            let peer_buf = rules::largest_message(conn.credit());
            if msg.len() > peer_buf as usize {
                return Err(SockError::MessageTooLong {
                    len: msg.len(),
                    max: peer_buf,
                });
            }
            self.flush_control()?;
            let fits = !self.endpoint.has_transmit()
                && self.endpoint.send_credit(&key) as usize >= msg.len()
                && self.driver.tx_room(payloads());
            if fits {
                for (i, part) in msg.chunks(max).enumerate() {
                    let eom = i + 1 == packets;
                    let hdr = self.endpoint.send_rw(&key, part.len() as u32, eom, false)?;
                    self.driver.send(&hdr, part).map_err(|e| self.fail(e))?;
                }
                self.driver.kick().map_err(|e| self.fail(e))?;
                return Ok(());
            }
            if attempt == 0 {
                self.service()?;
            }
        }
        // A whole message waits for credit for all of it (Linux instead sends what the
        // credit allows). A peer that batches its credit updates may never volunteer one
        // while it believes we have plenty, so ask; once per credit value, so waiting
        // cannot flood the peer.
        let credit = self.endpoint.send_credit(&key);
        if (credit as usize) < msg.len() {
            let sock = self.socks.get_mut(&key).expect("checked");
            if sock.credit_requested_at != Some(credit) {
                sock.credit_requested_at = Some(credit);
                self.endpoint.request_credit(&key);
                self.flush()?;
            }
        }
        Err(SockError::WouldBlock)
    }

    /// Publishes `hdr` and `payload` as one packet exactly as given, outside every
    /// connection's protocol state, waiting at most `timeout` for TX ring room: how a test
    /// plays a misbehaving guest (a forged source CID, a packet for no connection). Nothing
    /// is recorded about it; what comes back is handled like any other packet.
    ///
    /// # Panics
    /// If `hdr.len()` is not `payload.len()`, or `payload` does not fit one TX packet.
    pub fn send_raw_timeout(
        &mut self,
        hdr: &Header,
        payload: &[u8],
        timeout: Duration,
    ) -> Result<(), SockError> {
        self.send_raw_batch_timeout(&[(*hdr, payload)], timeout)
    }

    /// Like [`UserGuest::send_raw_timeout`] for several packets, published together and
    /// announced with one kick, so the device takes them as one TX batch (as a kernel
    /// does with what it queued while the device was busy).
    ///
    /// # Panics
    /// As [`UserGuest::send_raw_timeout`], for any of the packets.
    pub fn send_raw_batch_timeout(
        &mut self,
        packets: &[(Header, &[u8])],
        timeout: Duration,
    ) -> Result<(), SockError> {
        for (hdr, payload) in packets {
            assert_eq!(
                hdr.len() as usize,
                payload.len(),
                "header length vs payload"
            );
            assert!(
                payload.len() <= self.driver.max_tx_payload(),
                "payload of {} bytes exceeds one TX packet",
                payload.len()
            );
        }
        let sizes = || packets.iter().map(|(_, p)| p.len());
        self.wait_until("send_raw_batch", timeout, |g| {
            g.check_broken()?;
            g.flush_control()?;
            if !g.driver.tx_room(sizes()) {
                g.driver.reclaim_tx().map_err(|e| g.fail(e))?;
                if !g.driver.tx_room(sizes()) {
                    return Ok(None);
                }
            }
            for (hdr, payload) in packets {
                g.driver.send(hdr, payload).map_err(|e| g.fail(e))?;
            }
            g.driver.kick().map_err(|e| g.fail(e))?;
            Ok(Some(()))
        })
    }

    /// Reads up to `buf.len()` bytes; `Ok(0)` is end of stream. On a seqpacket socket, reads
    /// one message (see [`UserGuest::recv_msg`]) and returns the bytes copied.
    pub fn recv(&mut self, key: ConnKey, buf: &mut [u8]) -> Result<usize, SockError> {
        self.check_broken()?;
        if self.sock(key)?.socket_type == SocketType::SeqPacket {
            return Ok(self.recv_msg(key, buf)?.map_or(0, |m| m.len));
        }
        if self.sock(key)?.rx_bytes == 0 {
            self.service()?;
            if self.sock(key)?.rx_bytes == 0 {
                return self.no_data(key).map(|()| 0);
            }
        }
        let sock = self.socks.get_mut(&key).expect("checked");
        let n = read_stream(&mut self.driver, sock, buf).map_err(|e| self.fail(e))?;
        self.endpoint.consumed(&key, n as u32);
        self.flush()?;
        Ok(n)
    }

    /// Reads one seqpacket message into `buf` (truncating it if `buf` is short); `Ok(None)`
    /// is end of stream.
    pub fn recv_msg(&mut self, key: ConnKey, buf: &mut [u8]) -> Result<Option<Message>, SockError> {
        self.check_broken()?;
        self.check_type(key, SocketType::SeqPacket)?;
        if self.sock(key)?.rx_messages == 0 {
            self.service()?;
            if self.sock(key)?.rx_messages == 0 {
                return self.no_data(key).map(|()| None);
            }
        }
        let sock = self.socks.get_mut(&key).expect("checked");
        let m = read_message(&mut self.driver, sock, buf).map_err(|e| self.fail(e))?;
        self.endpoint.consumed(&key, m.msg_len as u32);
        self.flush()?;
        Ok(Some(m))
    }

    /// What a read finding no data means: end of stream (`Ok`), an error, or "not yet".
    fn no_data(&self, key: ConnKey) -> Result<(), SockError> {
        let sock = self.sock(key)?;
        if sock.peer_send_shut {
            return Ok(());
        }
        if let Some(end) = sock.end {
            return match end {
                End::Closed => Ok(()),
                e => Err(end_error(key, e)),
            };
        }
        match self.endpoint.get(&key) {
            Some(c) if c.local_shutdown().rcv => Ok(()),
            Some(_) => Err(SockError::WouldBlock),
            None => Err(SockError::Reset(key)),
        }
    }

    // ---- blocking helpers ---------------------------------------------------------------

    /// Sends all of `data` within `timeout`.
    pub fn write_all(
        &mut self,
        key: ConnKey,
        data: &[u8],
        timeout: Duration,
    ) -> Result<(), SockError> {
        let mut off = 0;
        self.wait_until("write_all", timeout, |g| {
            while off < data.len() {
                match g.send(key, &data[off..]) {
                    Ok(n) => off += n,
                    Err(SockError::WouldBlock) => return Ok(None),
                    Err(e) => return Err(e),
                }
            }
            Ok(Some(()))
        })
    }

    /// Sends one seqpacket message within `timeout`.
    pub fn send_msg_timeout(
        &mut self,
        key: ConnKey,
        msg: &[u8],
        timeout: Duration,
    ) -> Result<(), SockError> {
        self.wait_until("send_msg", timeout, |g| {
            would_block_to_none(g.send_msg(key, msg))
        })
    }

    /// Reads one stream chunk within `timeout` (`Ok(0)`: end of stream).
    pub fn recv_timeout(
        &mut self,
        key: ConnKey,
        buf: &mut [u8],
        timeout: Duration,
    ) -> Result<usize, SockError> {
        self.wait_until("recv", timeout, |g| would_block_to_none(g.recv(key, buf)))
    }

    /// Reads one seqpacket message within `timeout` (`Ok(None)`: end of stream).
    pub fn recv_msg_timeout(
        &mut self,
        key: ConnKey,
        buf: &mut [u8],
        timeout: Duration,
    ) -> Result<Option<Message>, SockError> {
        self.wait_until("recv_msg", timeout, |g| {
            would_block_to_none(g.recv_msg(key, buf))
        })
    }

    /// Fills `buf` within `timeout`; end of stream before that is
    /// [`SockError::UnexpectedEof`].
    pub fn read_exact(
        &mut self,
        key: ConnKey,
        buf: &mut [u8],
        timeout: Duration,
    ) -> Result<(), SockError> {
        let mut got = 0;
        let wanted = buf.len();
        self.wait_until("read_exact", timeout, |g| {
            while got < wanted {
                match g.recv(key, &mut buf[got..]) {
                    Ok(0) => return Err(SockError::UnexpectedEof { got, wanted }),
                    Ok(n) => got += n,
                    Err(SockError::WouldBlock) => return Ok(None),
                    Err(e) => return Err(e),
                }
            }
            Ok(Some(()))
        })
    }

    /// Reads until end of stream within `timeout`, appending to `out`; returns the bytes
    /// read.
    pub fn read_to_end(
        &mut self,
        key: ConnKey,
        out: &mut Vec<u8>,
        timeout: Duration,
    ) -> Result<usize, SockError> {
        let start = out.len();
        self.wait_until("read_to_end", timeout, |g| loop {
            let want = match g.sock(key)?.rx_bytes {
                0 => 4096,
                n => n,
            };
            let at = out.len();
            out.resize(at + want, 0);
            let r = g.recv(key, &mut out[at..]);
            out.truncate(at + *r.as_ref().unwrap_or(&0));
            match r {
                Ok(0) => return Ok(Some(out.len() - start)),
                Ok(_) => {}
                Err(SockError::WouldBlock) => return Ok(None),
                Err(e) => return Err(e),
            }
        })
    }

    /// Waits within `timeout` until the device has taken every TX chain and no control
    /// packet is left to send (e.g. before checking what a host peer received).
    pub fn flush_timeout(&mut self, timeout: Duration) -> Result<(), SockError> {
        self.wait_until("flush", timeout, |g| {
            g.flush()?;
            Ok((g.driver.tx_outstanding() == 0 && !g.endpoint.has_transmit()).then_some(()))
        })
    }

    /// Calls `step` until it yields a value, polling in between, for at most `timeout`.
    fn wait_until<T>(
        &mut self,
        op: &'static str,
        timeout: Duration,
        mut step: impl FnMut(&mut Self) -> Result<Option<T>, SockError>,
    ) -> Result<T, SockError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(v) = step(self)? {
                return Ok(v);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(SockError::TimedOut { op, after: timeout });
            }
            self.poll(Some(deadline - now))?;
        }
    }

    // ---- driving the device -------------------------------------------------------------

    /// Processes what the device returned and what timers fired; if nothing happened, sleeps
    /// until the device calls, a protocol timer is due, or `timeout` passes (`None`: no
    /// limit), and processes again.
    pub fn poll(&mut self, timeout: Option<Duration>) -> Result<(), SockError> {
        if self.service()? || timeout == Some(Duration::ZERO) {
            return Ok(());
        }
        let now = Instant::now();
        let timer = self
            .endpoint
            .poll_timeout()
            .map(|t| t.saturating_duration_since(now));
        let wait = match (timeout, timer) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.driver.wait(wait).map_err(|e| self.fail(e))?;
        self.service()?;
        Ok(())
    }

    /// Everything that can happen without waiting; whether anything did.
    fn service(&mut self) -> Result<bool, SockError> {
        self.check_broken()?;
        self.service_inner().map_err(|e| self.fail(e))
    }

    fn service_inner(&mut self) -> Result<bool, DeviceError> {
        let now = Instant::now();
        let mut progress = self.driver.reclaim_tx()? > 0;
        // Bounded per call so the RX ring is refilled during a long burst.
        for _ in 0..self.driver.rx_ring_size() {
            let Some((buf, len)) = self.driver.pop_rx()? else {
                break;
            };
            progress = true;
            self.on_rx(buf, len)?;
        }
        while let Some(id) = self.driver.pop_event()? {
            progress = true;
            self.on_event(id);
        }
        for t in self.endpoint.handle_timeout(now) {
            progress = true;
            match t {
                Timeout::Connect(key) => {
                    if let Some(s) = self.socks.get_mut(&key) {
                        s.end.get_or_insert(End::ConnectTimeout);
                    }
                }
                Timeout::Close(key) => {
                    if let Some(s) = self.socks.get_mut(&key) {
                        s.end.get_or_insert(End::Closed);
                    }
                }
            }
        }
        self.flush_inner()?;
        Ok(progress)
    }

    /// Publishes pending control packets, refills RX, kicks.
    fn flush(&mut self) -> Result<(), SockError> {
        self.check_broken()?;
        self.flush_inner().map_err(|e| self.fail(e))
    }

    fn flush_inner(&mut self) -> Result<(), DeviceError> {
        self.flush_control_inner()?;
        self.driver.refill_rx()?;
        self.driver.kick()
    }

    fn flush_control(&mut self) -> Result<(), SockError> {
        self.flush_control_inner().map_err(|e| self.fail(e))
    }

    /// Moves the endpoint's control packets into the TX ring while it has room.
    fn flush_control_inner(&mut self) -> Result<(), DeviceError> {
        while self.endpoint.has_transmit() {
            if !self.driver.tx_room([0]) {
                self.driver.reclaim_tx()?;
                if !self.driver.tx_room([0]) {
                    break;
                }
            }
            let Some(hdr) = self.endpoint.poll_transmit() else {
                break;
            };
            self.driver.send(&hdr, &[])?;
        }
        Ok(())
    }

    // ---- incoming packets ---------------------------------------------------------------

    /// One RX buffer the device filled with `used_len` bytes. Takes ownership of `buf`.
    fn on_rx(&mut self, buf: u32, used_len: u32) -> Result<(), DeviceError> {
        let stats = &mut self.driver.stats;
        if (used_len as usize) < HEADER_LEN {
            stats.rx_short += 1;
            self.driver.release_rx(buf);
            return Ok(());
        }
        let raw = RawHeader::decode(&self.driver.rx_header(buf)?);
        let hdr = match Header::parse(&raw, self.driver.rx_payload_capacity()) {
            Ok(h) => h,
            Err(e) => {
                debug!(error = %e, ?raw, "bad RX header");
                self.driver.stats.rx_bad_header += 1;
                self.driver.release_rx(buf);
                return Ok(());
            }
        };
        let stats = &mut self.driver.stats;
        if hdr.len() as usize > used_len as usize - HEADER_LEN {
            stats.rx_truncated += 1;
            self.driver.release_rx(buf);
            return Ok(());
        }
        if hdr.dst().cid != self.cid {
            stats.rx_misaddressed += 1;
            self.driver.release_rx(buf);
            return Ok(());
        }
        stats.rx_packets += 1;
        stats.rx_bytes += u64::from(hdr.len());
        match self.endpoint.handle(&hdr) {
            Incoming::Data { key, len, eom, .. } => self.enqueue(key, buf, len, eom)?,
            Incoming::Request(req) => {
                self.driver.release_rx(buf);
                self.on_request(&req);
            }
            Incoming::Connected(key) | Incoming::PeerShutdown(key, _) => {
                self.driver.release_rx(buf);
                self.after_change(key);
            }
            Incoming::Credit(_) => self.driver.release_rx(buf),
            Incoming::Reset(key) => {
                self.driver.release_rx(buf);
                if let Some(s) = self.socks.get_mut(&key) {
                    let end = if s.connected {
                        End::Reset
                    } else {
                        End::Refused
                    };
                    s.end.get_or_insert(end);
                }
            }
            Incoming::Closed(key) => {
                self.driver.release_rx(buf);
                if let Some(s) = self.socks.get_mut(&key) {
                    s.end.get_or_insert(End::Closed);
                }
            }
            Incoming::Dropped(reason) => {
                self.driver.release_rx(buf);
                let key = hdr.receiver_key();
                if let DropClass::Violation(why) = reason.class(hdr.op()) {
                    debug!(%key, why, "connection reset: peer violated the protocol");
                    self.driver.stats.protocol_resets += 1;
                    if let Some(s) = self.socks.get_mut(&key) {
                        s.end.get_or_insert(End::Violation(why));
                    }
                }
                self.after_change(key);
            }
        }
        Ok(())
    }

    /// Queues `len` payload bytes of RX buffer `buf` on `key`.
    fn enqueue(&mut self, key: ConnKey, buf: u32, len: u32, eom: bool) -> Result<(), DeviceError> {
        let Some(sock) = self.socks.get_mut(&key) else {
            // The endpoint knows a connection the application does not: cannot happen (a
            // closed connection is Closing, whose data the endpoint drops). Be safe.
            self.driver.release_rx(buf);
            self.endpoint.reset(key);
            return Ok(());
        };
        if len == 0 {
            self.driver.release_rx(buf);
            if eom {
                match sock.rx.back_mut() {
                    Some(last) if !last.eom => last.eom = true,
                    _ => sock.rx.push_back(Chunk {
                        data: ChunkData::Heap(Vec::new()),
                        off: 0,
                        len: 0,
                        eom: true,
                    }),
                }
                sock.rx_messages += 1;
            }
            return Ok(());
        }
        let data = if self.driver.may_hold_rx() {
            ChunkData::Guest(buf)
        } else {
            let mut v = vec![0u8; len as usize];
            self.driver.read_rx(buf, 0, &mut v)?;
            self.driver.release_rx(buf);
            self.driver.stats.rx_copied += 1;
            ChunkData::Heap(v)
        };
        sock.rx.push_back(Chunk {
            data,
            off: 0,
            len,
            eom,
        });
        sock.rx_bytes += len as usize;
        if eom {
            sock.rx_messages += 1;
        }
        Ok(())
    }

    fn on_request(&mut self, req: &Header) {
        let key = req.receiver_key();
        let port = req.dst().port;
        let acceptable = !self.socks.contains_key(&key)
            && (req.socket_type() == SocketType::Stream || self.negotiated.seqpacket)
            && self.listeners.get(&port).is_some_and(|l| {
                l.socket_type == req.socket_type() && l.backlog.len() < self.listen_backlog
            });
        if !acceptable {
            self.driver.stats.refused_requests += 1;
            self.endpoint.refuse(req);
            return;
        }
        match self.endpoint.accept(req) {
            Ok(key) => {
                self.socks.insert(key, Sock::new(req.socket_type(), true));
                if let Some(l) = self.listeners.get_mut(&port) {
                    l.backlog.push_back(key);
                }
            }
            Err(e) => {
                debug!(%key, error = %e, "cannot accept");
                self.driver.stats.refused_requests += 1;
                self.endpoint.refuse(req);
            }
        }
    }

    fn on_event(&mut self, id: u32) {
        if id != EVENT_TRANSPORT_RESET {
            debug!(id, "unknown vsock event");
            return;
        }
        // Every connection is gone on the device side; nobody is told.
        self.driver.stats.transport_resets += 1;
        self.endpoint.clear();
        for s in self.socks.values_mut() {
            s.end.get_or_insert(End::TransportReset);
        }
        for l in self.listeners.values_mut() {
            l.backlog.clear();
        }
    }

    /// The one place that reconciles a socket with its protocol state after either changed.
    fn after_change(&mut self, key: ConnKey) {
        let Some(sock) = self.socks.get_mut(&key) else {
            return;
        };
        let Some(conn) = self.endpoint.get(&key) else {
            sock.end.get_or_insert(End::Reset);
            return;
        };
        if conn.state() == State::Established {
            sock.connected = true;
        }
        if conn.peer_shutdown().send {
            sock.peer_send_shut = true;
        }
        if rules::closes_with_rst(conn.state(), conn.peer_shutdown(), true) {
            // The peer closed: we are the last to know, so we acknowledge with RST at once
            // (as Linux does); what was received stays readable.
            self.endpoint.reset(key);
            sock.end.get_or_insert(End::Closed);
        }
    }

    // ---- small helpers ------------------------------------------------------------------

    fn sock(&self, key: ConnKey) -> Result<&Sock, SockError> {
        self.socks
            .get(&key)
            .ok_or(SockError::UnknownConnection(key))
    }

    fn check_type(&self, key: ConnKey, expected: SocketType) -> Result<(), SockError> {
        let actual = self.sock(key)?.socket_type;
        if actual != expected {
            return Err(SockError::WrongSocketType {
                key,
                expected,
                actual,
            });
        }
        Ok(())
    }

    fn check_type_supported(&self, socket_type: SocketType) -> Result<(), SockError> {
        if socket_type == SocketType::SeqPacket && !self.negotiated.seqpacket {
            return Err(SockError::SeqpacketUnsupported);
        }
        Ok(())
    }

    /// Whether data may be sent on `key` now, or why not (connecting is "not yet").
    fn check_sendable(&self, key: ConnKey) -> Result<(), SockError> {
        let sock = self.sock(key)?;
        if let Some(end) = sock.end {
            return Err(end_error(key, end));
        }
        let conn = self.endpoint.get(&key).ok_or(SockError::Reset(key))?;
        match conn.state() {
            State::Connecting => Err(SockError::WouldBlock),
            State::Closing => Err(SockError::BrokenPipe(key)),
            State::Established if conn.local_shutdown().send || conn.peer_shutdown().rcv => {
                Err(SockError::BrokenPipe(key))
            }
            State::Established => Ok(()),
        }
    }

    fn check_broken(&self) -> Result<(), SockError> {
        match &self.broken {
            Some(e) => Err(SockError::Device(e.clone())),
            None => Ok(()),
        }
    }

    /// Records a device failure; the guest is unusable from now on.
    fn fail(&mut self, e: DeviceError) -> SockError {
        tracing::warn!(error = %e, "virtio device failure; guest stopped");
        let e = Arc::new(e);
        self.broken = Some(e.clone());
        SockError::Device(e)
    }

    fn release_chunk(&mut self, c: Chunk) {
        if let ChunkData::Guest(b) = c.data {
            self.driver.release_rx(b);
        }
    }

    fn release_all(&mut self, sock: Sock) {
        for c in sock.rx {
            self.release_chunk(c);
        }
    }
}

/// Copies up to `buf.len()` unread stream bytes of `sock` into `buf`, releasing RX buffers
/// read to the end; returns the bytes copied.
fn read_stream(driver: &mut Driver, sock: &mut Sock, buf: &mut [u8]) -> Result<usize, DeviceError> {
    let mut n = 0;
    while n < buf.len() {
        let Some(c) = sock.rx.front_mut() else {
            break;
        };
        let take = ((c.len - c.off) as usize).min(buf.len() - n);
        copy_out(driver, c, &mut buf[n..n + take])?;
        n += take;
        if c.off == c.len {
            let c = sock.rx.pop_front().expect("front exists");
            if let ChunkData::Guest(b) = c.data {
                driver.release_rx(b);
            }
        }
    }
    sock.rx_bytes -= n;
    Ok(n)
}

/// Takes the first complete message of `sock` (there must be one), copying what fits into
/// `buf`.
fn read_message(
    driver: &mut Driver,
    sock: &mut Sock,
    buf: &mut [u8],
) -> Result<Message, DeviceError> {
    debug_assert!(sock.rx_messages > 0);
    let (mut copied, mut total) = (0usize, 0usize);
    while let Some(mut c) = sock.rx.pop_front() {
        let len = (c.len - c.off) as usize;
        let take = len.min(buf.len() - copied);
        let r = copy_out(driver, &mut c, &mut buf[copied..copied + take]);
        copied += take;
        total += len;
        let eom = c.eom;
        if let ChunkData::Guest(b) = c.data {
            driver.release_rx(b);
        }
        r?;
        if eom {
            break;
        }
    }
    sock.rx_messages -= 1;
    sock.rx_bytes -= total;
    Ok(Message {
        len: copied,
        msg_len: total,
    })
}

/// Copies the next `dst.len()` unread bytes of `c` and advances it.
fn copy_out(driver: &Driver, c: &mut Chunk, dst: &mut [u8]) -> Result<(), DeviceError> {
    let n = dst.len();
    if n == 0 {
        return Ok(());
    }
    match &c.data {
        ChunkData::Guest(b) => driver.read_rx(*b, c.off, dst)?,
        ChunkData::Heap(v) => dst.copy_from_slice(&v[c.off as usize..c.off as usize + n]),
    }
    c.off += n as u32;
    Ok(())
}

fn end_error(key: ConnKey, end: End) -> SockError {
    match end {
        End::Closed => SockError::BrokenPipe(key),
        End::Reset => SockError::Reset(key),
        End::Refused => SockError::Refused(key),
        End::ConnectTimeout => SockError::ConnectTimedOut(key),
        End::Violation(why) => SockError::ProtocolViolation { key, why },
        End::TransportReset => SockError::TransportReset(key),
        End::DeviceGone => SockError::DeviceGone(key),
    }
}

fn would_block_to_none<T>(r: Result<T, SockError>) -> Result<Option<T>, SockError> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(SockError::WouldBlock) => Ok(None),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One guest per thread: a guest must move into the thread that drives it.
    #[test]
    fn user_guest_is_send() {
        fn is_send<T: Send>() {}
        is_send::<UserGuest>();
    }

    #[test]
    fn message_truncation() {
        let m = Message {
            len: 10,
            msg_len: 12,
        };
        assert!(m.truncated());
        assert!(!Message { len: 3, msg_len: 3 }.truncated());
    }
}
