//! The byte relay between a frontend's vhost-user connection and vhost-user-backend's request
//! handler, which lets a frontend plug a fresh device on a connection it keeps open
//! ([`replug`](super::replug) has the protocol and the reasons).
//!
//! Two threads per frontend connection: one forwards requests (message by message, with
//! their fds, after [`FrontendState`] had its say), the other forwards the handler's replies
//! as they come. Only the control plane passes here: rings, kicks and calls go straight
//! between QEMU and the device through shared memory and eventfds, so the relay costs a
//! thread hop per setup message and nothing per packet. A backend request channel
//! (`SET_BACKEND_REQ_FD`) is an fd and bypasses the relay too.
//!
//! The handler's end is a Unix socket connection made through a listener in a fresh 0700
//! directory (vhost-user-backend takes a connection only by accepting it or by connecting to
//! a path); the socket file and the directory are gone before the first message.
//!
//! Ending: the frontend hanging up shuts the handler's end for writing, so the handler sees
//! a clean disconnect; the handler ending the session (a request it refused) closes its end,
//! and the relay then hangs up on the frontend. Either way both threads end.
//!
//! Received fds are closed here once forwarded: the kernel installed them in this process
//! when `recvmsg` returned and nothing else knows their numbers ([`ReceivedFds`]).

use super::replug::{FrontendState, RequestHeader, Verdict, HEADER_LEN, MAX_PAYLOAD_BYTES};
use nix::errno::Errno;
use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags, UnixAddr};
use std::io::{self, IoSlice, IoSliceMut};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use thiserror::Error;
use tracing::{debug, warn};

/// Most fds one vhost-user message carries (vhost's `MAX_ATTACHED_FD_ENTRIES`).
const MAX_FDS: usize = 32;
/// Reply bytes moved per read.
const REPLY_CHUNK_BYTES: usize = 4096;
/// Names tried for the private directory before giving up.
const PRIVATE_DIR_ATTEMPTS: usize = 16;

/// Why the relay ended a frontend session.
#[derive(Debug, Error)]
pub enum RelayError {
    /// Socket I/O failed.
    #[error("vhost-user relay I/O")]
    Io(#[source] io::Error),
    /// The frontend hung up in the middle of a message.
    #[error("frontend closed the connection inside a message")]
    PartialMessage,
    /// A request announced a payload larger than vhost-user allows.
    #[error("request {request} announces {size} payload bytes (at most {MAX_PAYLOAD_BYTES})")]
    TooLong {
        /// Request code.
        request: u32,
        /// Announced size.
        size: u32,
    },
    /// More fds came with a message than fit (the kernel dropped the rest).
    #[error("more than {MAX_FDS} fds on one message")]
    TooManyFds,
}

impl From<Errno> for RelayError {
    fn from(e: Errno) -> Self {
        RelayError::Io(e.into())
    }
}

/// What the relay tells the device about.
pub trait ReplugHook: Send + Sync {
    /// A fresh device is being initialised on the connection (`device`: how many it has
    /// had, counting this one). Called before the handler sees the new device's `SET_OWNER`.
    fn fresh_device(&self, device: u64);
}

/// Fds the kernel installed in this process with one `recvmsg`; closed on drop.
#[derive(Debug, Default)]
struct ReceivedFds(Vec<RawFd>);

impl Drop for ReceivedFds {
    fn drop(&mut self) {
        for fd in self.0.drain(..) {
            let _ = nix::unistd::close(fd);
        }
    }
}

/// Whether a read reached the end of the stream before the first byte.
enum Read {
    Full,
    Eof,
}

/// One `recvmsg` into `buf`, adding the fds that come along to `fds`; 0 is the end of the
/// stream.
fn recv_some(
    sock: &UnixStream,
    buf: &mut [u8],
    fds: &mut ReceivedFds,
) -> Result<usize, RelayError> {
    loop {
        let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS]);
        let mut iov = [IoSliceMut::new(buf)];
        let msg = match recvmsg::<UnixAddr>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(m) => m,
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        };
        for c in msg.cmsgs()? {
            if let ControlMessageOwned::ScmRights(received) = c {
                fds.0.extend(received);
            }
        }
        if msg.flags.contains(MsgFlags::MSG_CTRUNC) {
            return Err(RelayError::TooManyFds);
        }
        return Ok(msg.bytes);
    }
}

/// Fills `buf` from `sock`, adding the fds that come along to `fds`.
fn recv_exact(
    sock: &UnixStream,
    buf: &mut [u8],
    fds: &mut ReceivedFds,
) -> Result<Read, RelayError> {
    let mut off = 0;
    while off < buf.len() {
        match recv_some(sock, &mut buf[off..], fds)? {
            0 if off == 0 => return Ok(Read::Eof),
            0 => return Err(RelayError::PartialMessage),
            n => off += n,
        }
    }
    Ok(Read::Full)
}

/// Sends `parts` in order; the fds go with the first byte.
fn send_all(sock: &UnixStream, parts: &[&[u8]], fds: &[RawFd]) -> Result<(), RelayError> {
    let total: usize = parts.iter().map(|p| p.len()).sum();
    let mut sent = 0;
    while sent < total {
        // The iovecs of what is left.
        let mut skip = sent;
        let mut iov = Vec::with_capacity(parts.len());
        for p in parts {
            if skip >= p.len() {
                skip -= p.len();
                continue;
            }
            iov.push(IoSlice::new(&p[skip..]));
            skip = 0;
        }
        let rights = [ControlMessage::ScmRights(fds)];
        let cmsgs: &[ControlMessage] = if sent == 0 && !fds.is_empty() {
            &rights
        } else {
            &[]
        };
        match sendmsg::<UnixAddr>(sock.as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None) {
            Ok(n) => sent += n,
            Err(Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Forwards requests until the frontend hangs up (`Ok`) or something breaks.
fn forward_requests(
    vm: &str,
    frontend: &UnixStream,
    handler: &UnixStream,
    state: &Mutex<FrontendState>,
    hook: &dyn ReplugHook,
) -> Result<(), RelayError> {
    loop {
        let mut fds = ReceivedFds::default();
        let mut raw = [0u8; HEADER_LEN];
        if let Read::Eof = recv_exact(frontend, &mut raw, &mut fds)? {
            return Ok(());
        }
        let header = RequestHeader::parse(&raw);
        if header.size > MAX_PAYLOAD_BYTES {
            return Err(RelayError::TooLong {
                request: header.request,
                size: header.size,
            });
        }
        let mut body = vec![0u8; header.size as usize];
        if let Read::Eof = recv_exact(frontend, &mut body, &mut fds)? {
            return Err(RelayError::PartialMessage);
        }
        // Small payloads (features, ring index and number) are worth seeing whole.
        let value = <[u8; 8]>::try_from(body.as_slice())
            .map(u64::from_ne_bytes)
            .ok();
        debug!(
            vm,
            request = ?header.code(),
            code = header.request,
            flags = format_args!("{:#x}", header.flags),
            size = header.size,
            value = value.map(|v| format!("{v:#x}")),
            fds = fds.0.len(),
            "vhost-user request"
        );
        let verdict = state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .on_request(&header, &body);
        match verdict {
            Verdict::Forward => {}
            Verdict::FreshDevice { prelude, device } => {
                debug!(
                    vm,
                    device,
                    requests = prelude.len(),
                    "re-plug: resetting the handler's owner"
                );
                hook.fresh_device(device);
                for m in &prelude {
                    send_all(handler, &[m.as_slice()], &[])?;
                }
            }
            Verdict::OwnerWhileRunning { running } => warn!(
                vm,
                running_rings = format_args!("{running:#b}"),
                "SET_OWNER while rings run: not a re-plug, the device handler refuses it"
            ),
        }
        send_all(handler, &[&raw, &body], &fds.0)?;
    }
}

/// Forwards the handler's replies until it closes its end. Replies are forwarded as they
/// arrive, not parsed: a chunk and its fds stay together, which is all the frontend's
/// reader needs.
fn forward_replies(handler: &UnixStream, frontend: &UnixStream) -> Result<(), RelayError> {
    let mut buf = vec![0u8; REPLY_CHUNK_BYTES];
    loop {
        let mut fds = ReceivedFds::default();
        match recv_some(handler, &mut buf, &mut fds)? {
            0 => return Ok(()),
            n => send_all(frontend, &[&buf[..n]], &fds.0)?,
        }
    }
}

/// A running relay for one frontend connection.
#[derive(Debug)]
pub struct Relay {
    frontend: UnixStream,
    handler: UnixStream,
    threads: Vec<JoinHandle<()>>,
}

impl Relay {
    /// Starts relaying between `frontend` (QEMU's connection) and `handler` (the device
    /// handler's end).
    pub fn spawn(
        vm: &str,
        frontend: UnixStream,
        handler: UnixStream,
        hook: Arc<dyn ReplugHook>,
    ) -> io::Result<Self> {
        let state = Arc::new(Mutex::new(FrontendState::default()));
        let (f, h) = (frontend.try_clone()?, handler.try_clone()?);
        let name = vm.to_owned();
        let requests = thread::Builder::new()
            .name(format!("vhu-relay-{vm}"))
            .spawn(move || {
                let res = forward_requests(&name, &f, &h, &state, hook.as_ref());
                if let Err(e) = &res {
                    warn!(vm = %name, error = %e, "vhost-user relay: request side ended");
                    let _ = f.shutdown(Shutdown::Both);
                }
                // The handler sees a clean end of its connection.
                let _ = h.shutdown(Shutdown::Write);
            })?;
        let (f, h) = (frontend.try_clone()?, handler.try_clone()?);
        let name = vm.to_owned();
        let replies = thread::Builder::new()
            .name(format!("vhu-reply-{vm}"))
            .spawn(move || {
                if let Err(e) = forward_replies(&h, &f) {
                    warn!(vm = %name, error = %e, "vhost-user relay: reply side ended");
                }
                // The handler is gone: so is the device, for the frontend.
                let _ = f.shutdown(Shutdown::Both);
            })?;
        Ok(Self {
            frontend,
            handler,
            threads: vec![requests, replies],
        })
    }

    /// Hangs up on both sides and waits for the relay threads.
    pub fn shutdown(mut self) {
        let _ = self.frontend.shutdown(Shutdown::Both);
        let _ = self.handler.shutdown(Shutdown::Both);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// A listening socket in a fresh private directory; both are removed on drop.
#[derive(Debug)]
pub struct PrivateListener {
    dir: PathBuf,
    path: PathBuf,
    listener: UnixListener,
}

impl PrivateListener {
    /// Binds `<tmp>/domsockd-<pid>-<n>/h` in a directory it creates 0700. Creating fails
    /// rather than reuse a directory that exists (someone else's), and the next name is
    /// tried.
    pub fn bind() -> io::Result<Self> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let mut last = None;
        for _ in 0..PRIVATE_DIR_ATTEMPTS {
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let dir = std::env::temp_dir().join(format!("domsockd-{}-{n}", std::process::id()));
            match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    last = Some(e);
                    continue;
                }
                Err(e) => return Err(e),
            }
            let path = dir.join("h");
            return match UnixListener::bind(&path) {
                Ok(listener) => Ok(Self {
                    dir,
                    path,
                    listener,
                }),
                Err(e) => {
                    let _ = std::fs::remove_dir(&dir);
                    Err(e)
                }
            };
        }
        Err(last.unwrap_or_else(|| io::ErrorKind::AlreadyExists.into()))
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Accepts one connection.
    pub fn accept(&self) -> io::Result<UnixStream> {
        self.listener.accept().map(|(s, _)| s)
    }
}

impl Drop for PrivateListener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        let _ = std::fs::remove_dir(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read as _, Write as _};
    use std::time::Duration;
    use vhost::vhost_user::message::FrontendReq;

    #[derive(Default)]
    struct Count(AtomicU64);
    impl ReplugHook for Count {
        fn fresh_device(&self, device: u64) {
            self.0.store(device, Ordering::SeqCst);
        }
    }

    fn msg(code: FrontendReq, body: &[u8]) -> Vec<u8> {
        let mut m = RequestHeader {
            request: code.into(),
            flags: 1,
            size: body.len() as u32,
        }
        .bytes()
        .to_vec();
        m.extend_from_slice(body);
        m
    }

    fn read_msg(s: &mut UnixStream) -> (RequestHeader, Vec<u8>) {
        let mut h = [0u8; HEADER_LEN];
        s.read_exact(&mut h).unwrap();
        let h = RequestHeader::parse(&h);
        let mut b = vec![0u8; h.size as usize];
        s.read_exact(&mut b).unwrap();
        (h, b)
    }

    fn start() -> (UnixStream, UnixStream, Relay, Arc<Count>) {
        let (front_peer, front) = UnixStream::pair().unwrap();
        let (handler, handler_peer) = UnixStream::pair().unwrap();
        for s in [&front_peer, &handler] {
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        }
        let hook = Arc::new(Count::default());
        let r = Relay::spawn("t", front, handler_peer, hook.clone()).unwrap();
        (front_peer, handler, r, hook)
    }

    #[test]
    fn requests_replies_and_fds_pass_through() {
        let (mut qemu, mut lib, relay, _) = start();
        // A request with an fd (a memfd stands for guest memory).
        let memfd = nix::sys::memfd::memfd_create("t", nix::sys::memfd::MFdFlags::empty()).unwrap();
        let m = msg(FrontendReq::SET_MEM_TABLE, &[7u8; 40]);
        send_all(&qemu, &[&m], &[memfd.as_raw_fd()]).unwrap();
        let mut fds = ReceivedFds::default();
        let mut h = [0u8; HEADER_LEN];
        assert!(matches!(
            recv_exact(&lib, &mut h, &mut fds).unwrap(),
            Read::Full
        ));
        let mut body = vec![0u8; 40];
        recv_exact(&lib, &mut body, &mut fds).unwrap();
        assert_eq!(
            RequestHeader::parse(&h).code(),
            Some(FrontendReq::SET_MEM_TABLE)
        );
        assert_eq!(body, [7u8; 40]);
        assert_eq!(fds.0.len(), 1, "the memfd came along");
        // A reply goes back unchanged.
        lib.write_all(b"0123456789abcdef").unwrap();
        let mut back = [0u8; 16];
        qemu.read_exact(&mut back).unwrap();
        assert_eq!(&back, b"0123456789abcdef");
        relay.shutdown();
    }

    #[test]
    fn second_owner_after_rings_stopped_gets_the_prelude_first() {
        let (qemu, mut lib, relay, hook) = start();
        let stream = [
            msg(FrontendReq::SET_PROTOCOL_FEATURES, &0x20bu64.to_ne_bytes()),
            msg(FrontendReq::SET_OWNER, &[]),
            msg(FrontendReq::SET_VRING_KICK, &0x100u64.to_ne_bytes()),
            msg(FrontendReq::GET_VRING_BASE, &[0u8; 8]),
            msg(FrontendReq::SET_OWNER, &[]),
        ];
        for m in &stream {
            send_all(&qemu, &[m], &[]).unwrap();
        }
        let codes: Vec<_> = (0..7)
            .map(|_| read_msg(&mut lib).0.code().unwrap())
            .collect();
        assert_eq!(
            codes,
            [
                FrontendReq::SET_PROTOCOL_FEATURES,
                FrontendReq::SET_OWNER,
                FrontendReq::SET_VRING_KICK,
                FrontendReq::GET_VRING_BASE,
                FrontendReq::RESET_OWNER,
                FrontendReq::SET_PROTOCOL_FEATURES,
                FrontendReq::SET_OWNER,
            ]
        );
        assert_eq!(hook.0.load(Ordering::SeqCst), 2);
        relay.shutdown();
    }

    #[test]
    fn frontend_hangup_reaches_the_handler_and_handler_hangup_reaches_the_frontend() {
        let (qemu, mut lib, relay, _) = start();
        drop(qemu);
        let mut b = [0u8; 1];
        assert_eq!(lib.read(&mut b).unwrap(), 0, "handler sees EOF");
        drop(lib);
        relay.shutdown();

        let (mut qemu, lib, relay, _) = start();
        drop(lib);
        assert_eq!(qemu.read(&mut b).unwrap(), 0, "frontend sees EOF");
        relay.shutdown();
    }

    #[test]
    fn oversized_request_ends_the_session() {
        let (mut qemu, _lib, relay, _) = start();
        let h = RequestHeader {
            request: 1,
            flags: 1,
            size: MAX_PAYLOAD_BYTES + 1,
        };
        qemu.write_all(&h.bytes()).unwrap();
        let mut b = [0u8; 1];
        assert_eq!(qemu.read(&mut b).unwrap(), 0, "frontend is hung up on");
        relay.shutdown();
    }

    #[test]
    fn private_listener_cleans_up() {
        let l = PrivateListener::bind().unwrap();
        let path = l.path().to_path_buf();
        let dir = path.parent().unwrap().to_path_buf();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        let c = UnixStream::connect(&path).unwrap();
        let _s = l.accept().unwrap();
        drop(c);
        drop(l);
        assert!(!dir.exists());
    }
}
