//! Guest-initiated connections to host ports: which host target answers a port.
//!
//! A guest `REQUEST` to host CID 2 port P is resolved by trying [`HOST_TARGETS`] in order:
//!
//! | target | answers when | policy |
//! |---|---|---|
//! | [`HostTarget::Service`] | the service table has an entry for (P, type), e.g. the control service at 1023 | not checked: every guest may ask |
//! | [`HostTarget::OwnSocket`] | the VM's own `<uds>_<P>` accepts | `guest-to-host` rules |
//! | [`HostTarget::SharedListener`] | an all-guests listener serves P for the guest's namespace; it first gets the peer preamble | `guest-to-host` rules |
//!
//! The first target that exists answers; if none does, the guest gets an RST (counted as
//! `refused_connections`), as does a denial (counted as `denied_connections`). It also
//! re-checks guest-initiated connections when the policy is reloaded.
//!
//! What it does not do: carry the connection's data (the TX and RX paths do).

use super::conn::{HostConn, Origin};
use super::poller::Target;
use super::DataPlane;
use crate::host::HostSocket;
use crate::metrics::VmStats;
use crate::policy::Verdict;
use domsock_migration::session::SESSION_PORT;
use domsock_proto::control::PeerPreamble;
use domsock_proto::hybrid::ok_line;
use domsock_proto::{Cid, ConnKey, Header, Port, SocketType};
use std::io::{self, ErrorKind};
use tracing::{debug, warn};

/// Where a guest's connection to a host port may be answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum HostTarget {
    /// An in-process service of the [`crate::services::ServiceTable`].
    Service,
    /// The VM's own `<uds>_<port>`.
    OwnSocket,
    /// The all-guests listener of the port (with the peer preamble).
    SharedListener,
}

/// Host targets, in the order they are tried.
pub(super) const HOST_TARGETS: [HostTarget; 3] = [
    HostTarget::Service,
    HostTarget::OwnSocket,
    HostTarget::SharedListener,
];

impl HostTarget {
    /// Whether the host-port policy must allow the connection before this target is tried.
    fn needs_policy(self) -> bool {
        self != HostTarget::Service
    }
}

/// What one host target made of a connection request.
enum Attempt {
    /// Connected; with the preamble line to send first, if any.
    Answered(HostSocket, Option<String>),
    /// The target exists but failed: refuse, do not try the next one.
    Failed(io::Error),
    /// Not this target (with the reason, reported if no later target answers).
    Absent(Option<io::Error>),
}

/// Why a guest's connection to a host port is refused.
/// What a host target is asked for: a guest's REQUEST, or a session's OPEN.
#[derive(Debug, Clone, Copy)]
pub(super) struct TargetRequest {
    pub(super) port: Port,
    pub(super) socket_type: SocketType,
    /// The guest's port, named in a shared listener's preamble.
    pub(super) src_port: Port,
}

impl TargetRequest {
    fn of(req: &Header) -> Self {
        Self {
            port: req.dst().port,
            socket_type: req.socket_type(),
            src_port: req.src().port,
        }
    }
}

pub(super) enum Refusal {
    Denied(crate::policy::DenyReason),
    Failed(io::Error),
}

impl DataPlane {
    /// The policy changed: reset guest connections to host ports it no longer allows.
    pub(super) fn recheck_policy(&mut self) {
        let generation = self.router.generation();
        if generation == self.policy_generation {
            return;
        }
        self.policy_generation = generation;
        let denied: Vec<ConnKey> = self
            .conns
            .iter()
            .filter(|(key, hc)| {
                let allowed = match (hc.origin, hc.session_target()) {
                    (Origin::Proxy, _) => self
                        .router
                        .check_between(key.local.cid, key.peer.cid, key.peer.port, hc.socket_type)
                        .is_allowed(),
                    (Origin::Host { .. }, _) => true,
                    // Relayed from its home, which answers for its target.
                    (Origin::Guest, Some(t)) if t == super::RELAYED_TARGET => true,
                    // A session this guest accepted from sibling `cid`.
                    (Origin::Guest, Some((cid, port))) if cid != Cid::HOST && hc.accepted() => self
                        .router
                        .check_between(cid, key.peer.cid, port, hc.socket_type)
                        .is_allowed(),
                    (Origin::Guest, Some((cid, port))) if cid != Cid::HOST => self
                        .router
                        .check_between(key.peer.cid, cid, port, hc.socket_type)
                        .is_allowed(),
                    (Origin::Guest, target) => {
                        hc.in_greeting()
                            || self
                                .router
                                .check_host(
                                    key.peer.cid,
                                    target.map_or(key.local.port, |t| t.1),
                                    hc.socket_type,
                                )
                                .is_allowed()
                    }
                };
                !allowed
            })
            .map(|(k, _)| *k)
            .collect();
        for key in denied {
            if let Some(hc) = self.conns.get(&key) {
                hc.span.in_scope(|| {
                    warn!(vm = %self.shared.name, %key, "host connection reset: no longer allowed by the reloaded policy")
                });
            }
            self.endpoint.reset(key);
            self.after_change(key);
        }
    }

    fn try_target(&self, target: HostTarget, req: &TargetRequest) -> Attempt {
        let port = req.port;
        match target {
            HostTarget::Service => match self.services.lookup(port, req.socket_type) {
                None => Attempt::Absent(None),
                Some(service) => match service.open(&self.shared) {
                    Ok(sock) => Attempt::Answered(sock, None),
                    Err(e) => {
                        debug!(service = service.name(), error = %e, "service connection refused");
                        Attempt::Failed(e)
                    }
                },
            },
            HostTarget::OwnSocket => {
                match HostSocket::connect(&self.shared.port_path(port), req.socket_type) {
                    Ok(sock) => Attempt::Answered(sock, None),
                    Err(e) => Attempt::Absent(Some(e)),
                }
            }
            HostTarget::SharedListener => {
                let Some(path) = self.router.listener_for(self.shared.cid, port) else {
                    return Attempt::Absent(None);
                };
                let sock = match HostSocket::connect(path, req.socket_type) {
                    Ok(s) => s,
                    Err(e) => return Attempt::Failed(e),
                };
                let Some(identity) = self.router.identity(self.shared.cid) else {
                    return Attempt::Failed(io::Error::new(ErrorKind::NotFound, "no identity"));
                };
                VmStats::inc(&self.shared.stats.listener_connections);
                let line = PeerPreamble {
                    identity,
                    port: req.src_port,
                }
                .encode();
                Attempt::Answered(sock, Some(line))
            }
        }
    }

    /// The host socket answering `req` (and a preamble to send first), by [`HOST_TARGETS`].
    pub(super) fn open_host_target(
        &self,
        req: &TargetRequest,
    ) -> Result<(HostSocket, Option<String>), Refusal> {
        let mut policy_checked = false;
        let mut absent = None;
        for target in HOST_TARGETS {
            if target.needs_policy() && !policy_checked {
                policy_checked = true;
                if let Verdict::Deny(why) =
                    self.router
                        .check_host(self.shared.cid, req.port, req.socket_type)
                {
                    return Err(Refusal::Denied(why));
                }
            }
            match self.try_target(target, req) {
                Attempt::Answered(sock, preamble) => return Ok((sock, preamble)),
                Attempt::Failed(e) => return Err(Refusal::Failed(e)),
                Attempt::Absent(e) => absent = absent.or(e),
            }
        }
        Err(Refusal::Failed(absent.unwrap_or_else(|| {
            io::Error::new(ErrorKind::NotFound, "no host target")
        })))
    }

    pub(super) fn guest_connect(&mut self, req: &Header) {
        let port = req.dst().port;
        if port == SESSION_PORT {
            self.session_connect(req);
            return;
        }
        let (mut sock, preamble) = match self.open_host_target(&TargetRequest::of(req)) {
            Ok(found) => found,
            Err(Refusal::Denied(why)) => {
                self.shared
                    .note_denied("host", port, req.socket_type(), why);
                self.endpoint.refuse(req);
                return;
            }
            Err(Refusal::Failed(e)) => {
                VmStats::inc(&self.shared.stats.refused_connections);
                debug!(port = port.0, error = %e, "guest connect refused");
                self.endpoint.refuse(req);
                return;
            }
        };
        let key = match self.endpoint.accept(req) {
            Ok(k) => k,
            Err(e) => {
                debug!(error = %e, "cannot accept");
                self.endpoint.refuse(req);
                return;
            }
        };
        if let Some(line) = preamble {
            // A fresh socket's send buffer is empty, so the short line goes out whole, as
            // one message on a seqpacket socket.
            if !matches!(sock.write(line.as_bytes()), Ok(n) if n == line.len()) {
                VmStats::inc(&self.shared.stats.host_errors);
                self.endpoint.reset(key);
                return;
            }
        }
        let token = match self.poller.register(sock.raw_fd(), Target::Conn(key)) {
            Ok(t) => t,
            Err(e) => {
                warn!(vm = %self.shared.name, error = %e, "epoll registration failed");
                self.endpoint.reset(key);
                return;
            }
        };
        VmStats::inc(&self.shared.stats.accepted_connections);
        let hc = HostConn::new(sock, token, key, req.socket_type(), Origin::Guest);
        hc.span.in_scope(|| debug!("guest connect accepted"));
        self.conns.insert(key, hc);
        self.after_change(key);
    }

    pub(super) fn host_connected(&mut self, key: ConnKey) {
        let Some(hc) = self.conns.get_mut(&key) else {
            self.endpoint.reset(key);
            return;
        };
        if hc.origin == Origin::Proxy {
            // Tell the sibling's session its connection stands (see `ProxyDial`).
            if !matches!(hc.sock.write(&[0]), Ok(1)) {
                VmStats::inc(&self.shared.stats.host_errors);
                self.endpoint.reset(key);
            } else {
                // Accepted on a session listener: this end is a session too.
                self.offer_session(key);
            }
            self.after_change(key);
            return;
        }
        if let Origin::Host { reply: Some(port) } = hc.origin {
            hc.origin = Origin::Host { reply: None };
            // A fresh socket's send buffer is empty, so this short line goes out whole.
            let line = ok_line(port);
            if !matches!(hc.sock.write(line.as_bytes()), Ok(n) if n == line.len()) {
                VmStats::inc(&self.shared.stats.host_errors);
                self.endpoint.reset(key);
            } else {
                self.offer_session(key);
            }
        }
        self.after_change(key);
    }
}
