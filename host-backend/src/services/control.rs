//! The control service guests reach at host port [`CONTROL_PORT`]: who am I, which CID
//! has this name, which domains share my namespace. Wire format in
//! [`domsock_proto::control`].
//!
//! It is one entry of the [service table](super): the engine connects the guest's
//! connection to one end of a Unix socket pair, like any host connection, and hands the
//! other end here: a small thread per connection answers line by line. Connections per VM are bounded
//! ([`MAX_CONTROL_CONNS_PER_VM`]) and idle ones are closed after
//! [`CONTROL_IDLE_TIMEOUT_MS`]. Answers only ever cover the caller's own namespace.
//!
//! What it does not do: change anything. It is read-only by design.

use super::Service;
use crate::host::HostSocket;
use crate::metrics::VmStats;
use crate::router::Router;
use crate::tunables::{CONTROL_IDLE_TIMEOUT_MS, MAX_CONTROL_CONNS_PER_VM};
use crate::vm::VmShared;
use domsock_proto::control::{split_line, Reply, Request, MAX_LINE_BYTES};
use domsock_proto::Cid;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tracing::debug;

pub use domsock_proto::control::CONTROL_PORT;

/// The control service, as an entry of the service table.
#[derive(Debug)]
pub struct ControlService {
    router: Arc<Router>,
}

impl ControlService {
    /// The control service answering from `router`'s policy and identities.
    pub fn new(router: Arc<Router>) -> Self {
        Self { router }
    }
}

impl Service for ControlService {
    fn name(&self) -> &'static str {
        "control"
    }

    fn open(&self, vm: &Arc<VmShared>) -> io::Result<HostSocket> {
        let (ours, theirs) = UnixStream::pair()?;
        spawn(self.router.clone(), vm.clone(), theirs)?;
        HostSocket::from_stream(ours)
    }
}

/// Answers one request of the guest `cid`.
pub fn answer(router: &Router, cid: Cid, req: &Request) -> Reply {
    let policy = router.policy();
    match req {
        Request::WhoAmI => match router.identity(cid) {
            Some(id) => Reply::Identity(id),
            None => Reply::Error("unknown-domain".into()),
        },
        Request::Resolve(name) => match policy.resolve(cid, name) {
            Some(c) => Reply::Resolved(c),
            None => Reply::Error("not-found".into()),
        },
        Request::List => Reply::List(
            policy
                .visible(cid)
                .into_iter()
                .map(|d| (d.name.clone(), d.cid))
                .collect(),
        ),
    }
}

/// Serves the host end of a guest's control connection on its own thread. Fails (and
/// the caller refuses the guest's connection) when the VM has too many open already.
pub fn spawn(router: Arc<Router>, shared: Arc<VmShared>, stream: UnixStream) -> io::Result<()> {
    let prev = shared.control_conns.fetch_add(1, Ordering::AcqRel);
    if prev >= MAX_CONTROL_CONNS_PER_VM {
        shared.control_conns.fetch_sub(1, Ordering::AcqRel);
        return Err(io::Error::new(
            io::ErrorKind::WouldBlock,
            "too many control connections",
        ));
    }
    let s2 = shared.clone();
    let spawned = std::thread::Builder::new()
        .name(format!("control-{}", shared.name))
        .spawn(move || {
            if let Err(e) = serve(&router, &s2, stream) {
                debug!(vm = %s2.name, error = %e, "control connection ended");
            }
            s2.control_conns.fetch_sub(1, Ordering::AcqRel);
        });
    if let Err(e) = spawned {
        shared.control_conns.fetch_sub(1, Ordering::AcqRel);
        return Err(e);
    }
    Ok(())
}

fn serve(router: &Router, shared: &VmShared, mut stream: UnixStream) -> io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_millis(CONTROL_IDLE_TIMEOUT_MS)))?;
    stream.set_write_timeout(Some(Duration::from_millis(CONTROL_IDLE_TIMEOUT_MS)))?;
    let mut buf = Vec::with_capacity(MAX_LINE_BYTES);
    let mut chunk = [0u8; MAX_LINE_BYTES];
    loop {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        loop {
            let (reply, used) = match split_line(&buf, MAX_LINE_BYTES) {
                Ok(None) => break,
                Ok(Some((line, used))) => match Request::parse(line) {
                    Ok(req) => (answer(router, shared.cid, &req), used),
                    Err(_) => (Reply::Error("bad-request".into()), used),
                },
                Err(_) => {
                    VmStats::inc(&shared.stats.control_requests);
                    stream.write_all(Reply::Error("line-too-long".into()).encode().as_bytes())?;
                    // Say no more, but take what the guest still sends until it closes:
                    // closing now would fail its writes as if the host had broken down.
                    stream.shutdown(std::net::Shutdown::Write)?;
                    while stream.read(&mut chunk)? > 0 {}
                    return Ok(());
                }
            };
            VmStats::inc(&shared.stats.control_requests);
            stream.write_all(reply.encode().as_bytes())?;
            buf.drain(..used);
        }
    }
}
