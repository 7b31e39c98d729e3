//! Host-initiated connections, from `accept` on the VM's `<uds>` until their
//! `CONNECT <port>\n` line (parsed by [`domsock_proto::hybrid`], a pure function).
//!
//! A pending handshake is bounded in number ([`MAX_PENDING_HANDSHAKES`]), in bytes (the
//! parser's line limit) and in time ([`HANDSHAKE_TIMEOUT_MS`], measured from the `now` the
//! driver passes in). A good line becomes a connection request to the guest; the `OK
//! <port>` reply is sent when the guest accepts. A bad one gets `ERROR <reason>\n`; a host
//! connect while the guest driver is not running gets `ERROR guest vsock driver not
//! running\n` at once.
//!
//! What it does not do: carry data (the connection does, once established).

use super::conn::{would_block, HostConn, Origin};
use super::poller::Target;
use super::DataPlane;
use crate::host::HostSocket;
use crate::metrics::VmStats;
use crate::tunables::{HANDSHAKE_TIMEOUT_MS, MAX_PENDING_HANDSHAKES};
use domsock_proto::hybrid::parse_connect_line;
use domsock_proto::{Cid, Port, SocketType, VsockAddr};
use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};
use tracing::{debug, warn};

/// A host connection waiting for its `CONNECT <port>` line.
#[derive(Debug)]
struct Handshake {
    stream: UnixStream,
    buf: Vec<u8>,
    deadline: Instant,
}

/// Pending handshakes by epoll token.
#[derive(Debug, Default)]
pub(super) struct Handshakes {
    map: HashMap<u64, Handshake>,
}

impl Handshakes {
    pub(super) fn len(&self) -> usize {
        self.map.len()
    }

    /// Tokens whose deadline passed at `now`.
    pub(super) fn expired(&self, now: Instant) -> Vec<u64> {
        self.map
            .iter()
            .filter(|(_, h)| h.deadline <= now)
            .map(|(t, _)| *t)
            .collect()
    }

    pub(super) fn next_deadline(&self) -> Option<Instant> {
        self.map.values().map(|h| h.deadline).min()
    }

    /// Forgets every handshake (closing its socket); returns tokens and fds to unregister.
    pub(super) fn drain(&mut self) -> Vec<(u64, i32)> {
        self.map
            .drain()
            .map(|(t, h)| (t, h.stream.as_raw_fd()))
            .collect()
    }
}

/// Sends a one-line refusal on a handshake socket; best effort (the peer may be gone).
fn refuse_line(stream: &UnixStream, line: &str) {
    let mut s = stream;
    let _ = s.write_all(line.as_bytes());
}

impl DataPlane {
    pub(super) fn accept_host_connections(&mut self, now: Instant) {
        loop {
            let stream = match self.shared.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if would_block(&e) => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    warn!(vm = %self.shared.name, error = %e, "accept on host listener failed");
                    return;
                }
            };
            if self.handshakes.len() >= MAX_PENDING_HANDSHAKES {
                VmStats::inc(&self.shared.stats.bad_handshakes);
                warn!(vm = %self.shared.name, "too many pending host handshakes; closing one");
                continue;
            }
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            let Ok(token) = self.poller.register(stream.as_raw_fd(), Target::Handshake) else {
                continue;
            };
            self.handshakes.map.insert(
                token,
                Handshake {
                    stream,
                    buf: Vec::new(),
                    deadline: now + Duration::from_millis(HANDSHAKE_TIMEOUT_MS),
                },
            );
            self.read_handshake(now, token);
        }
    }

    pub(super) fn read_handshake(&mut self, now: Instant, token: u64) {
        let Some(hs) = self.handshakes.map.get_mut(&token) else {
            return;
        };
        let mut chunk = [0u8; domsock_proto::hybrid::MAX_CONNECT_LINE_BYTES];
        loop {
            match hs.stream.read(&mut chunk) {
                Ok(0) => {
                    self.drop_handshake(token, "closed before CONNECT");
                    return;
                }
                Ok(n) => {
                    hs.buf.extend_from_slice(&chunk[..n]);
                    match parse_connect_line(&hs.buf) {
                        Ok(None) => continue,
                        Ok(Some((port, used))) => {
                            let hs = self.handshakes.map.remove(&token).expect("present");
                            self.start_host_connection(now, token, hs, port, used);
                            return;
                        }
                        Err(e) => {
                            refuse_line(&hs.stream, &format!("ERROR {e}\n"));
                            self.drop_handshake(token, "malformed CONNECT line");
                            return;
                        }
                    }
                }
                Err(e) if would_block(&e) => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => {
                    self.drop_handshake(token, "read error");
                    return;
                }
            }
        }
    }

    pub(super) fn drop_handshake(&mut self, token: u64, why: &str) {
        if let Some(hs) = self.handshakes.map.remove(&token) {
            VmStats::inc(&self.shared.stats.bad_handshakes);
            debug!(why, "host handshake dropped");
            self.poller.unregister(hs.stream.as_raw_fd(), token);
        }
    }

    fn start_host_connection(
        &mut self,
        now: Instant,
        token: u64,
        hs: Handshake,
        port: Port,
        used: usize,
    ) {
        let fd = hs.stream.as_raw_fd();
        if !self.guest_running {
            VmStats::inc(&self.shared.stats.bad_handshakes);
            refuse_line(&hs.stream, "ERROR guest vsock driver not running\n");
            self.poller.unregister(fd, token);
            return;
        }
        let peer = VsockAddr::new(self.shared.cid, port);
        let key = match self
            .endpoint
            .connect(now, Cid::HOST, None, peer, SocketType::Stream)
        {
            Ok(k) => k,
            Err(e) => {
                refuse_line(&hs.stream, &format!("ERROR {e}\n"));
                self.poller.unregister(fd, token);
                return;
            }
        };
        VmStats::inc(&self.shared.stats.host_connects);
        let Ok(sock) = HostSocket::from_stream(hs.stream) else {
            self.poller.unregister(fd, token);
            self.endpoint.reset(key);
            return;
        };
        let mut hc = HostConn::new(
            sock,
            token,
            key,
            SocketType::Stream,
            Origin::Host { reply: Some(port) },
        );
        hc.inbox = hs.buf[used..].to_vec();
        self.poller.retarget(token, Target::Conn(key));
        hc.span.in_scope(|| debug!("host connect"));
        self.conns.insert(key, hc);
    }
}
