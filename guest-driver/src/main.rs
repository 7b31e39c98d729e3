//! `domsock`: the guest-side test program run inside QEMU guests by the end-to-end tests.
//!
//! Each subcommand does one vsock exercise and prints machine-readable lines on stdout:
//! `DS-READY ...` once a listener is ready, `DS-RESULT cmd=<name> key=value ...` per finished
//! exercise, and `DS-ERROR cmd=<name> msg=<text to end of line>` on failure, in which case the
//! exit status is 1. Sizes accept binary suffixes (`64K`, `256M`, `1G`). Byte streams are the
//! [`domsock_guest::pattern`] stream for `--seed`; checksums are XXH3-64 in hex.
//!
//! Client commands name their peer with `--cid N` or `--peer CID|NAME`; a name is resolved
//! through domsockd's control service ([`domsock_guest::control`]) in the guest's namespace,
//! and the result line then carries `peer_name=` and `resolve_ms=` too.
//!
//! `--session` makes the connection a resumable session through domsockd's session port
//! ([`domsock_guest::session`]) instead of a raw vsock connection, so it survives the device
//! being unplugged and plugged back; the result line then also carries `session=1
//! resumes=<n> blackout_ms=<total> retransmitted_bytes=<n> device_wakes=<n>` (and `retransmitted_msgs=<n>`
//! on seqpacket). On the client commands (`send`, `halfclose-client`, `duplex-client`, `rr`,
//! `seq-echo-client`, and `recv` given a PEER) the guest opens the session. On the server
//! commands (`recv`, `echo-server`, `duplex-server`) the listener registers its port with
//! the daemon, so host connections arrive as sessions; one that arrives without the
//! daemon's OFFERED (the registration was lost) is served raw and its result line says
//! `session=0`. `DS-READY` then carries `session=1`. Seqpacket servers take no
//! `--session`: domsockd offers sessions on stream ports only.
//!
//! Every session is announced as soon as it is open, before data moves:
//! `DS-SESSION id=<32 hex digits> peer=<cid:port> side=client|server`; its result line
//! carries `session_id=` too. `send` and `duplex-client` also take `--session-id-file PATH`,
//! which writes the id there before the announcement, so that another program in the same
//! guest can name the running session (`forge-resume --id-file`, src/forge.rs).
//!
//! `bus join|pub|sub NAME` (src/bus_cli.rs) is a member of a bus of domsockd's bus service
//! ([`domsock_guest::bus`]): over vsock from a guest, or with `--unix PATH` from a host
//! process through the service's Unix socket (then it opens no AF_VSOCK socket).
//!
//! `DOMSOCK_LOG=<filter>` (e.g. `info`, `domsock_guest=debug`) writes the library's log on
//! stderr: each session's resume attempts and their outcome. The test guests get
//! `DOMSOCK_LOG=info` from the kernel command line, so every session event is on the serial
//! console. Unset: no log.
//!
//! Never run the vsock subcommands on a host: they open AF_VSOCK sockets. The one host
//! command, `migrate`, opens none: it drives two QEMUs over QMP and two domsockd instances
//! over their admin sockets ([`domsock_migration::orchestrate`]) and prints the timed report
//! (one JSON object with `--json`).
#![forbid(unsafe_code)]

/// The bus commands' usage lines (in [`USAGE`] and in the bus commands' own errors).
macro_rules! bus_usage {
    () => {
        "\
  bus join NAME        [MEMBER] [--topic PREFIX]... [--for-ms T] [--messages M]
  bus pub NAME         [MEMBER] [--topic T | --to ADDR [--addr SRC]]
                       [MESSAGE | --count N [--size 64]]   (no MESSAGE: each stdin line)
  bus sub NAME         [MEMBER] [--topic PREFIX]... [--addr SRC] [--for-ms T] [--messages M]
                       [--count N [--senders 1] [--max-lost 0] [--stall-ms 0]] [--idle-ms T]
  MEMBER: [--unix PATH] [--json] [--rejoin-ms 0] [--want publish|receive|both]
          [--create hub|switch|topic [--max-message 64K] [--queue-bytes 1M]
          [--slow drop|disconnect]]
  (ADDR, SRC: 1-16 bytes in hex, e.g. 0a0b or aa:bb; ff..ff is broadcast)"
    };
}

mod bus_cli;
mod forge;

use std::collections::BTreeMap;
use std::io;
use std::net::Shutdown;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::thread;
use std::time::{Duration, Instant};

use domsock_guest::control::{self, ControlClient, ControlError};
use domsock_guest::pattern::{Checksum, PatternStream};
use domsock_guest::session::{
    Accepted, ListenerOptions, RawStream, SessionListener, SessionOptions, SessionSeqPacket,
    SessionStats, SessionStream,
};
use domsock_guest::vsock::{self, SockType, VsockAddr, VsockSocket};
use domsock_migration::session::SessionId;
use domsock_proto::control::valid_name;

const USAGE: &str = concat!(
    "\
usage: domsock <command> [--option value]...
  cid                  [--wait-ms 0]
  send                 PEER --port P --bytes N [--chunk 64K] [--seed 1] [--expect-reply-bytes M]
                       [--session [--session-id-file PATH] | --connect-retry-ms 0]
  halfclose-client     PEER --port P [--bytes 1M] [--chunk 64K] [--seed 1] [--session]
  recv                 --port P [--reply-bytes 0] [--reply-seed 2] [--conns 1] [--chunk 64K]
                       [--session]  (host connections arrive as sessions)
  recv --session       PEER --port P [...as recv]  (the guest opens the sessions, to PEER)
  seq-echo-client      PEER --port P --sizes 1,2,4K,64K [--seed 1] [--rounds 1] [--session]
  seq-echo-server      --port P [--conns 1]
  echo-server          --port P [--conns 1] [--session]
  duplex-client        PEER --port P --bytes N [--chunk 1M] [--seed <own CID>]
                       [--rate-mb-s R] [--session [--session-id-file PATH]]
  duplex-server        --port P --bytes N [--chunk 1M] [--seed <own CID>] [--conns 1]
                       [--rate-mb-s R] [--session]
  connect-expect-fail  PEER --port P [--max-ms 1000] [--type stream|seqpacket]
                       [--errno ECONNRESET,ECONNREFUSED]
  rr                   PEER --port P [--count 1000] [--size 64] [--session]
  hold-echo            PEER --ports P1,P2 --gate G [--size 64]
  resolve              --name NAME
  whoami
  list
  migrate              --vm NAME --from HOST --to HOST --uri tcp:IP:PORT
                       --from-qmp PATH --to-qmp PATH --from-admin PATH --to-admin PATH
                       [--device-id vsock0] [--chardev vhu0] [--unplug-ms 10000]
                       [--migrate-ms 120000] [--settle-ms 10000] [--confirm-ms 10000]
                       [--keep-source] [--json]
                       (on a host: live-migrates a guest between two QEMUs; exit 0 migrated,
                       2 rolled back, 3 rollback failed, 1 nothing done)
  forge-resume         [--id HEX | --id-file PATH] [--received N] [--port P] [--attempts a,b,..]
                       [--quiet-ms 1000]
                       (hostile RESUMEs to the session port; --port: a host echo for `replay`)
",
    bus_usage!(),
    "
PEER: --cid C, or --peer CID|NAME (a name is resolved through the control service)
--session: a resumable session through domsockd's session port instead of a raw connection
           (servers: the port is registered, host connections are offered as sessions)
--rate-mb-s R: send at most R MB/s (10^6 bytes), e.g. to keep a stream going for as long as
  a test needs it whatever the machine's speed
--connect-retry-ms T: retry a raw connect that fails with ENODEV (no vsock device, e.g. while
  it is unplugged) for up to T ms
common: --timeout-ms 30000 (connect and idle timeout of every blocking call)"
);

/// Options that take no value.
const FLAGS: &[&str] = &["session", "keep-source", "json"];

/// Receive buffer for seqpacket messages: larger than any message we send, so a message that
/// arrives bigger than sent shows up as a length mismatch rather than a silent truncation.
const SEQ_RECV_BUF_BYTES: usize = 256 * 1024;
const DEFAULT_TIMEOUT_MS: u64 = 30_000;
const STREAM_RECV_BUF_BYTES: usize = 256 * 1024;
/// Default write size of the duplex commands.
const DUPLEX_CHUNK_BYTES: u64 = 1 << 20;
/// Pause between connect attempts with `--connect-retry-ms`.
const CONNECT_RETRY_PAUSE_MS: u64 = 5;

/// A failed subcommand; printed as a `DS-ERROR` line.
#[derive(Debug)]
struct Failure(String);

impl Failure {
    fn io(context: &str, e: &io::Error) -> Self {
        match e.raw_os_error() {
            Some(errno) => Failure(format!("{context}: {} ({e})", vsock::errno_name(errno))),
            None => Failure(format!("{context}: {e}")),
        }
    }

    /// A control-service failure with its whole cause chain (errno names for OS errors).
    fn control(context: &str, e: &ControlError) -> Self {
        let mut msg = format!("{context}: {e}");
        let mut cause = std::error::Error::source(e);
        while let Some(c) = cause {
            match c
                .downcast_ref::<io::Error>()
                .and_then(io::Error::raw_os_error)
            {
                Some(errno) => msg.push_str(&format!(": {} ({c})", vsock::errno_name(errno))),
                None => msg.push_str(&format!(": {c}")),
            }
            cause = c.source();
        }
        Failure(msg)
    }
}

/// Who a client command talks to, as given on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
enum PeerArg {
    Cid(u32),
    Name(String),
}

/// A peer whose CID is known.
#[derive(Debug)]
struct Peer {
    addr: VsockAddr,
    /// The name it was resolved from, and how long resolving took.
    resolved: Option<(String, Duration)>,
}

impl PeerArg {
    /// Resolves a name through the control service (on its own connection).
    fn resolve(self, port: u32, timeout: Duration) -> Result<Peer, Failure> {
        match self {
            PeerArg::Cid(cid) => Ok(Peer {
                addr: VsockAddr::new(cid, port),
                resolved: None,
            }),
            PeerArg::Name(name) => {
                let start = Instant::now();
                let cid = control::resolve(&name, timeout)
                    .map_err(|e| Failure::control(&format!("resolve {name:?}"), &e))?;
                Ok(Peer {
                    addr: VsockAddr::new(cid, port),
                    resolved: Some((name, start.elapsed())),
                })
            }
        }
    }
}

impl Peer {
    /// `peer=<cid>:<port>`, plus `peer_name=` and `resolve_ms=` for a resolved name.
    fn fields(&self) -> String {
        match &self.resolved {
            None => format!("peer={}", self.addr),
            Some((name, took)) => format!(
                "peer={} peer_name={name} resolve_ms={:.1}",
                self.addr,
                millis(*took)
            ),
        }
    }
}

type CmdResult = Result<(), Failure>;

/// `--key value` options of one invocation; each subcommand takes what it knows and
/// [`Opts::finish`] rejects the rest.
struct Opts {
    map: BTreeMap<String, String>,
}

impl Opts {
    fn parse(args: &[String]) -> Result<Self, Failure> {
        let mut map = BTreeMap::new();
        let mut it = args.iter();
        while let Some(key) = it.next() {
            let name = key
                .strip_prefix("--")
                .ok_or_else(|| Failure(format!("expected --option, got {key:?}")))?;
            let value = if FLAGS.contains(&name) {
                "1".to_owned()
            } else {
                it.next()
                    .ok_or_else(|| Failure(format!("--{name} needs a value")))?
                    .clone()
            };
            if map.insert(name.to_owned(), value).is_some() {
                return Err(Failure(format!("--{name} given twice")));
            }
        }
        Ok(Self { map })
    }

    fn take_str(&mut self, name: &str) -> Option<String> {
        self.map.remove(name)
    }

    /// A value-less option ([`FLAGS`]).
    fn flag(&mut self, name: &str) -> bool {
        self.map.remove(name).is_some()
    }

    /// Whether `--cid` or `--peer` was given.
    fn has_peer(&self) -> bool {
        self.map.contains_key("cid") || self.map.contains_key("peer")
    }

    /// The peer: `--cid N` or `--peer CID|NAME`.
    fn peer(&mut self) -> Result<PeerArg, Failure> {
        match (self.map.remove("cid"), self.map.remove("peer")) {
            (Some(_), Some(_)) => Err(Failure("give --cid or --peer, not both".into())),
            (None, None) => Err(Failure("--cid or --peer is required".into())),
            (Some(cid), None) => cid
                .parse()
                .map(PeerArg::Cid)
                .map_err(|_| Failure(format!("--cid {cid:?} is not a CID"))),
            (None, Some(peer)) => match peer.parse() {
                Ok(cid) => Ok(PeerArg::Cid(cid)),
                Err(_) if valid_name(&peer) => Ok(PeerArg::Name(peer)),
                Err(_) => Err(Failure(format!(
                    "--peer {peer:?} is neither a CID nor a domain name"
                ))),
            },
        }
    }

    fn size(&mut self, name: &str) -> Result<Option<u64>, Failure> {
        self.map
            .remove(name)
            .map(|v| parse_size(&v).map_err(|e| Failure(format!("--{name}: {e}"))))
            .transpose()
    }

    fn size_or(&mut self, name: &str, default: u64) -> Result<u64, Failure> {
        Ok(self.size(name)?.unwrap_or(default))
    }

    fn required(&mut self, name: &str) -> Result<u64, Failure> {
        self.size(name)?
            .ok_or_else(|| Failure(format!("--{name} is required")))
    }

    fn u32_required(&mut self, name: &str) -> Result<u32, Failure> {
        let v = self.required(name)?;
        u32::try_from(v).map_err(|_| Failure(format!("--{name} {v} does not fit in 32 bits")))
    }

    fn usize_or(&mut self, name: &str, default: usize) -> Result<usize, Failure> {
        let v = self.size_or(name, default as u64)?;
        usize::try_from(v).map_err(|_| Failure(format!("--{name} {v} too large")))
    }

    fn finish(self) -> CmdResult {
        match self.map.keys().next() {
            Some(k) => Err(Failure(format!("unknown option --{k}\n{USAGE}"))),
            None => Ok(()),
        }
    }
}

/// Parses `123`, `4K`, `64KiB`, `256M`, `1G` (binary multiples) or `0x...`.
fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    if let Some(hex) = s.strip_prefix("0x") {
        return u64::from_str_radix(hex, 16).map_err(|e| format!("{s:?}: {e}"));
    }
    let digits_end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, suffix) = s.split_at(digits_end);
    let num: u64 = num.parse().map_err(|e| format!("{s:?}: {e}"))?;
    let mult: u64 = match suffix.to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "K" | "KI" | "KIB" => 1 << 10,
        "M" | "MI" | "MIB" => 1 << 20,
        "G" | "GI" | "GIB" => 1 << 30,
        other => return Err(format!("{s:?}: unknown suffix {other:?}")),
    };
    num.checked_mul(mult)
        .ok_or_else(|| format!("{s:?}: too large"))
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// MB/s with MB = 10^6 bytes.
fn mbps(bytes: u64, d: Duration) -> f64 {
    let secs = d.as_secs_f64();
    if secs > 0.0 {
        bytes as f64 / secs / 1e6
    } else {
        0.0
    }
}

fn sock_type(name: Option<String>) -> Result<SockType, Failure> {
    match name.as_deref() {
        None | Some("stream") => Ok(SockType::Stream),
        Some("seqpacket") => Ok(SockType::SeqPacket),
        Some(other) => Err(Failure(format!(
            "--type {other:?}: expected stream or seqpacket"
        ))),
    }
}

fn set_timeouts(sock: &VsockSocket, timeout: Duration) -> CmdResult {
    sock.set_read_timeout(timeout)
        .map_err(|e| Failure::io("SO_RCVTIMEO", &e))?;
    sock.set_write_timeout(timeout)
        .map_err(|e| Failure::io("SO_SNDTIMEO", &e))
}

fn connect(ty: SockType, addr: VsockAddr, timeout: Duration) -> Result<VsockSocket, Failure> {
    let sock = VsockSocket::connect(ty, addr, timeout)
        .map_err(|e| Failure::io(&format!("connect {addr}"), &e))?;
    set_timeouts(&sock, timeout)?;
    Ok(sock)
}

/// [`connect`], retried for up to `retry` while it fails with ENODEV: the guest has no vsock
/// device (it was unplugged and is not back yet). Returns the socket and the attempts made.
fn connect_retrying(
    ty: SockType,
    addr: VsockAddr,
    timeout: Duration,
    retry: Duration,
) -> Result<(VsockSocket, u32), Failure> {
    let start = Instant::now();
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        match VsockSocket::connect(ty, addr, timeout) {
            Ok(sock) => {
                set_timeouts(&sock, timeout)?;
                return Ok((sock, attempts));
            }
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) && start.elapsed() < retry => {
                thread::sleep(Duration::from_millis(CONNECT_RETRY_PAUSE_MS));
            }
            Err(e) => {
                return Err(Failure::io(
                    &format!("connect {addr} (attempt {attempts})"),
                    &e,
                ))
            }
        }
    }
}

/// What the stream commands need of a connection, raw or a session.
trait ByteStream: Sync {
    fn send_all(&self, buf: &[u8]) -> io::Result<()>;
    fn recv(&self, buf: &mut [u8]) -> io::Result<usize>;
    fn shutdown_write(&self) -> io::Result<()>;
    /// Why the connection failed, beyond its errno (` (session: ...)`), or nothing.
    fn explain(&self) -> String {
        String::new()
    }
}

impl ByteStream for VsockSocket {
    fn send_all(&self, buf: &[u8]) -> io::Result<()> {
        VsockSocket::send_all(self, buf)
    }

    fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        VsockSocket::recv(self, buf)
    }

    fn shutdown_write(&self) -> io::Result<()> {
        self.shutdown(Shutdown::Write)
    }
}

impl ByteStream for SessionStream {
    fn send_all(&self, buf: &[u8]) -> io::Result<()> {
        SessionStream::send_all(self, buf)
    }

    fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        SessionStream::recv(self, buf)
    }

    fn shutdown_write(&self) -> io::Result<()> {
        self.shutdown(Shutdown::Write)
    }

    fn explain(&self) -> String {
        self.failure()
            .map_or_else(String::new, |e| format!(" (session: {e})"))
    }
}

impl ByteStream for RawStream {
    fn send_all(&self, buf: &[u8]) -> io::Result<()> {
        RawStream::send_all(self, buf)
    }

    fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        RawStream::recv(self, buf)
    }

    fn shutdown_write(&self) -> io::Result<()> {
        self.shutdown(Shutdown::Write)
    }
}

/// A stream command's connection: raw, or a session with `--session`.
#[derive(Debug)]
enum Stream {
    Raw(VsockSocket),
    // Boxed: a session is ~500 bytes of state next to a raw socket's fd.
    Session(Box<SessionStream>),
    /// A session listener's connection that came without OFFERED.
    Unoffered(RawStream),
}

/// The options of a command's sessions: every blocking step bounded by `timeout`.
fn session_options(timeout: Duration) -> SessionOptions {
    SessionOptions {
        connect_timeout: timeout,
        handshake_timeout: timeout,
        read_timeout: Some(timeout),
        write_timeout: Some(timeout),
        ..SessionOptions::default()
    }
}

/// ` session=1 session_id=.. resumes=.. blackout_ms=.. retransmitted_bytes=..`.
fn session_fields(id: SessionId, st: &SessionStats) -> String {
    format!(
        " session=1 session_id={} resumes={} blackout_ms={:.1} retransmitted_bytes={} device_wakes={}",
        id.hex(),
        st.resumes,
        millis(st.blackout),
        st.retransmitted_bytes,
        st.device_wakes
    )
}

/// `--session-id-file PATH`, which only a client `--session` takes.
fn session_id_file(o: &mut Opts, session: bool) -> Result<Option<PathBuf>, Failure> {
    match o.take_str("session-id-file") {
        Some(_) if !session => Err(Failure("--session-id-file needs --session".into())),
        path => Ok(path.map(PathBuf::from)),
    }
}

/// Says that a session is open: `DS-SESSION id=<32 hex digits> peer=<cid:port> side=..`,
/// printed before any data moves so that a test can name the session to another program
/// while it runs. With `id_file`, the id (and a newline) is written there first.
fn announce_session(
    id: SessionId,
    peer: VsockAddr,
    side: &str,
    id_file: Option<&Path>,
) -> CmdResult {
    if let Some(path) = id_file {
        std::fs::write(path, format!("{}\n", id.hex()))
            .map_err(|e| Failure::io(&format!("--session-id-file {}", path.display()), &e))?;
    }
    println!("DS-SESSION id={} peer={peer} side={side}", id.hex());
    Ok(())
}

impl Stream {
    /// Connects to `addr`, as a session if `session` (announced, the id also written to
    /// `id_file` if given).
    fn connect(
        session: bool,
        addr: VsockAddr,
        timeout: Duration,
        id_file: Option<&Path>,
    ) -> Result<Stream, Failure> {
        if !session {
            return connect(SockType::Stream, addr, timeout).map(Stream::Raw);
        }
        let s = SessionStream::connect(addr.cid, addr.port, session_options(timeout))
            .map_err(|e| Failure::io(&format!("session connect {addr}"), &e))?;
        announce_session(s.session_id(), addr, "client", id_file)?;
        Ok(Stream::Session(Box::new(s)))
    }

    fn inner(&self) -> &dyn ByteStream {
        match self {
            Stream::Raw(s) => s,
            Stream::Session(s) => &**s,
            Stream::Unoffered(s) => s,
        }
    }

    /// ` session=1 resumes=.. blackout_ms=.. retransmitted_bytes=..` for a session,
    /// ` session=0` for a session listener's raw connection, else nothing: raw result lines
    /// stay as they were.
    fn fields(&self) -> String {
        match self {
            Stream::Raw(_) => String::new(),
            Stream::Session(s) => session_fields(s.session_id(), &s.stats()),
            Stream::Unoffered(_) => " session=0".to_owned(),
        }
    }
}

impl ByteStream for Stream {
    fn send_all(&self, buf: &[u8]) -> io::Result<()> {
        self.inner().send_all(buf)
    }

    fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner().recv(buf)
    }

    fn shutdown_write(&self) -> io::Result<()> {
        self.inner().shutdown_write()
    }

    fn explain(&self) -> String {
        self.inner().explain()
    }
}

fn listen(ty: SockType, port: u32, timeout: Duration) -> Result<VsockSocket, Failure> {
    let sock = VsockSocket::listen(ty, port, 16)
        .map_err(|e| Failure::io(&format!("listen on port {port}"), &e))?;
    // Bounds accept() too.
    sock.set_read_timeout(timeout)
        .map_err(|e| Failure::io("SO_RCVTIMEO", &e))?;
    let kind = match ty {
        SockType::Stream => "stream",
        SockType::SeqPacket => "seqpacket",
    };
    println!("DS-READY port={port} type={kind}");
    Ok(sock)
}

fn accept(listener: &VsockSocket, timeout: Duration) -> Result<(VsockSocket, VsockAddr), Failure> {
    let (sock, peer) = listener.accept().map_err(|e| Failure::io("accept", &e))?;
    set_timeouts(&sock, timeout)?;
    Ok((sock, peer))
}

/// A server command's listening socket: raw, or registered with the daemon so that host
/// connections arrive as sessions (`--session`).
#[derive(Debug)]
enum Listener {
    Raw(VsockSocket),
    Session(Box<SessionListener>),
}

impl Listener {
    /// Listens on `port`, registered for sessions if `session` (stream ports only).
    fn bind(session: bool, ty: SockType, port: u32, timeout: Duration) -> Result<Self, Failure> {
        if !session {
            return listen(ty, port, timeout).map(Listener::Raw);
        }
        if ty != SockType::Stream {
            return Err(Failure(
                "--session: domsockd offers sessions on stream ports only (it refuses a \
                 seqpacket LISTEN)"
                    .into(),
            ));
        }
        let opts = ListenerOptions {
            session: session_options(timeout),
            accept_timeout: Some(timeout),
            ..ListenerOptions::default()
        };
        let listener = SessionListener::bind(port, opts)
            .map_err(|e| Failure::io(&format!("session listener on port {port}"), &e))?;
        println!("DS-READY port={port} type=stream session=1");
        Ok(Listener::Session(Box::new(listener)))
    }

    /// The next connection: raw, a session, or a session listener's unoffered one.
    fn accept(&self, timeout: Duration) -> Result<(Stream, VsockAddr), Failure> {
        match self {
            Listener::Raw(l) => accept(l, timeout).map(|(s, peer)| (Stream::Raw(s), peer)),
            Listener::Session(l) => {
                let (accepted, peer) = l.accept().map_err(|e| Failure::io("accept", &e))?;
                let stream = match accepted {
                    Accepted::Session(s) => {
                        announce_session(s.session_id(), peer, "server", None)?;
                        Stream::Session(s)
                    }
                    Accepted::Raw(r) => Stream::Unoffered(r),
                };
                Ok((stream, peer))
            }
        }
    }
}

/// Writes `len` bytes of the stream for `seed` in `chunk`-byte sends.
fn send_pattern<S: ByteStream + ?Sized>(
    sock: &S,
    seed: u64,
    len: u64,
    chunk: usize,
) -> Result<Checksum, Failure> {
    send_pattern_paced(sock, seed, len, chunk, None)
}

/// A send-rate cap (`--rate-mb-s`): a token bucket that holds at most [`Pace::BURST`] of
/// unused time, so a sender that was stalled (a migration pauses the guest, a blackout stops
/// the device) goes on at the capped rate instead of bursting to catch up.
#[derive(Debug)]
struct Pace {
    bytes_per_sec: f64,
    /// When the bytes sent so far are due, at the capped rate.
    due: Instant,
}

impl Pace {
    const BURST: Duration = Duration::from_millis(100);

    /// `mb_per_sec` in 10^6 bytes per second, as the `*_mbps` result fields.
    fn new(mb_per_sec: f64) -> Self {
        Pace {
            bytes_per_sec: mb_per_sec * 1e6,
            due: Instant::now(),
        }
    }

    /// Accounts for `n` bytes about to be sent and sleeps until the cap allows them.
    fn wait(&mut self, n: usize) {
        let d = self.delay(n, Instant::now());
        if !d.is_zero() {
            thread::sleep(d);
        }
    }

    /// How long `n` bytes about to be sent at `now` must wait.
    fn delay(&mut self, n: usize, now: Instant) -> Duration {
        let earliest = now.checked_sub(Self::BURST).unwrap_or(now);
        self.due = self.due.max(earliest) + Duration::from_secs_f64(n as f64 / self.bytes_per_sec);
        self.due.saturating_duration_since(now)
    }
}

/// `--rate-mb-s R` (R > 0, at most 10^5): caps what a sender sends per second.
fn rate_opt(o: &mut Opts) -> Result<Option<f64>, Failure> {
    let Some(v) = o.take_str("rate-mb-s") else {
        return Ok(None);
    };
    match v.parse::<f64>() {
        Ok(r) if r > 0.0 && r <= 1e5 => Ok(Some(r)),
        _ => Err(Failure(format!(
            "--rate-mb-s {v}: want a rate in MB/s above 0 and at most 100000"
        ))),
    }
}

fn send_pattern_paced<S: ByteStream + ?Sized>(
    sock: &S,
    seed: u64,
    len: u64,
    chunk: usize,
    mut pace: Option<Pace>,
) -> Result<Checksum, Failure> {
    let mut gen = PatternStream::new(seed);
    let mut sum = Checksum::new();
    let mut buf = vec![0u8; chunk.max(1)];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        if let Some(p) = pace.as_mut() {
            p.wait(n);
        }
        gen.fill(&mut buf[..n]);
        sock.send_all(&buf[..n]).map_err(|e| {
            Failure::io(
                &format!("send after {} bytes{}", sum.bytes(), sock.explain()),
                &e,
            )
        })?;
        sum.update(&buf[..n]);
        left -= n as u64;
    }
    Ok(sum)
}

/// How a read-to-EOF ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StreamEnd {
    /// `recv` returned 0.
    Eof,
    /// `recv` failed with ENOTCONN after our own `shutdown(SHUT_WR)`: the peer had closed
    /// before we shut down, and Linux vsock's shutdown() clears the "peer closed" flag
    /// (SOCK_DONE), so the closed socket reports ENOTCONN instead of EOF.
    ClosedBeforeShutdown,
}

impl StreamEnd {
    fn name(self) -> &'static str {
        match self {
            StreamEnd::Eof => "eof",
            StreamEnd::ClosedBeforeShutdown => "closed-before-shutdown",
        }
    }
}

/// Reads until EOF. `after_shutdown`: we already shut down our sending side (see
/// [`StreamEnd::ClosedBeforeShutdown`]).
fn recv_to_eof<S: ByteStream + ?Sized>(
    sock: &S,
    after_shutdown: bool,
) -> Result<(Checksum, StreamEnd), Failure> {
    let mut sum = Checksum::new();
    let mut buf = vec![0u8; STREAM_RECV_BUF_BYTES];
    loop {
        match sock.recv(&mut buf) {
            Ok(0) => return Ok((sum, StreamEnd::Eof)),
            Ok(n) => sum.update(&buf[..n]),
            Err(e) if after_shutdown && e.raw_os_error() == Some(libc::ENOTCONN) => {
                return Ok((sum, StreamEnd::ClosedBeforeShutdown))
            }
            Err(e) => {
                return Err(Failure::io(
                    &format!("recv after {} bytes{}", sum.bytes(), sock.explain()),
                    &e,
                ))
            }
        }
    }
}

fn cmd_cid(mut o: Opts) -> CmdResult {
    let wait = Duration::from_millis(o.size_or("wait-ms", 0)?);
    o.finish()?;
    let start = Instant::now();
    loop {
        match vsock::local_cid() {
            Ok(Some(cid)) => {
                println!(
                    "DS-RESULT cmd=cid cid={cid} ms={:.1}",
                    millis(start.elapsed())
                );
                return Ok(());
            }
            Ok(None) if start.elapsed() < wait => thread::sleep(Duration::from_millis(5)),
            Ok(None) => {
                return Err(Failure(
                    "no vsock transport bound (CID is VMADDR_CID_ANY)".into(),
                ))
            }
            // /dev/vsock appears when the vsock module loads; keep polling until then.
            Err(_) if start.elapsed() < wait => thread::sleep(Duration::from_millis(5)),
            Err(e) => return Err(Failure::io("/dev/vsock", &e)),
        }
    }
}

/// `send` and `halfclose-client`: stream out, half-close, read the reply to EOF.
fn cmd_send(mut o: Opts, name: &str, timeout: Duration) -> CmdResult {
    let halfclose = name == "halfclose-client";
    let peer = o.peer()?;
    let port = o.u32_required("port")?;
    let bytes = if halfclose {
        o.size_or("bytes", 1 << 20)?
    } else {
        o.required("bytes")?
    };
    let chunk = o.usize_or("chunk", 64 << 10)?;
    let seed = o.size_or("seed", 1)?;
    let expect_reply = o.size("expect-reply-bytes")?;
    let session = o.flag("session");
    let retry = Duration::from_millis(o.size_or("connect-retry-ms", 0)?);
    let id_file = session_id_file(&mut o, session)?;
    o.finish()?;
    if session && !retry.is_zero() {
        return Err(Failure(
            "--connect-retry-ms is for raw connections (a session resumes by itself)".into(),
        ));
    }
    let peer = peer.resolve(port, timeout)?;

    let start = Instant::now();
    let (sock, attempts) = if session {
        (
            Stream::connect(true, peer.addr, timeout, id_file.as_deref())?,
            1,
        )
    } else {
        let (s, attempts) = connect_retrying(SockType::Stream, peer.addr, timeout, retry)?;
        (Stream::Raw(s), attempts)
    };
    let connected = Instant::now();
    let sent = send_pattern(&sock, seed, bytes, chunk)?;
    sock.shutdown_write()
        .map_err(|e| Failure::io(&format!("shutdown(SHUT_WR){}", sock.explain()), &e))?;
    let send_time = connected.elapsed();
    let (reply, end) = recv_to_eof(&sock, true)?;
    let total = start.elapsed();
    println!(
        "DS-RESULT cmd={name} {} bytes={} xxh3={} seed={seed} chunk={chunk} connect_ms={:.1} \
         connect_attempts={attempts} ms={:.1} mbps={:.1} reply_bytes={} reply_xxh3={} end={} \
         total_ms={:.1}{}",
        peer.fields(),
        sent.bytes(),
        sent.hex(),
        millis(connected - start),
        millis(send_time),
        mbps(sent.bytes(), send_time),
        reply.bytes(),
        reply.hex(),
        end.name(),
        millis(total),
        sock.fields(),
    );
    if halfclose && reply.bytes() == 0 {
        return Err(Failure("no reply after our shutdown(SHUT_WR)".into()));
    }
    if let Some(want) = expect_reply {
        if reply.bytes() != want {
            return Err(Failure(format!(
                "reply was {} bytes, expected {want}",
                reply.bytes()
            )));
        }
    }
    Ok(())
}

fn cmd_recv(mut o: Opts, timeout: Duration) -> CmdResult {
    let port = o.u32_required("port")?;
    let reply_bytes = o.size_or("reply-bytes", 0)?;
    let reply_seed = o.size_or("reply-seed", 2)?;
    let conns = o.size_or("conns", 1)?;
    let chunk = o.usize_or("chunk", 64 << 10)?;
    let session = o.flag("session");
    if session && o.has_peer() {
        let peer = o.peer()?;
        o.finish()?;
        let peer = peer.resolve(port, timeout)?;
        return recv_sessions(&peer, conns, reply_seed, reply_bytes, chunk, timeout);
    }
    o.finish()?;

    let listener = Listener::bind(session, SockType::Stream, port, timeout)?;
    for conn in 0..conns {
        let (sock, peer) = listener.accept(timeout)?;
        let start = Instant::now();
        let (got, _) = recv_to_eof(&sock, false)?;
        let recv_time = start.elapsed();
        let reply = send_pattern(&sock, reply_seed, reply_bytes, chunk)?;
        if session {
            // Half-closed, so the host reads EOF now; counted before the fields are read.
            sock.shutdown_write()
                .map_err(|e| Failure::io(&format!("shutdown(SHUT_WR){}", sock.explain()), &e))?;
        }
        let session_fields = sock.fields();
        drop(sock);
        println!(
            "DS-RESULT cmd=recv port={port} conn={conn} peer={peer} bytes={} xxh3={} ms={:.1} mbps={:.1} reply_bytes={} reply_xxh3={}{session_fields}",
            got.bytes(),
            got.hex(),
            millis(recv_time),
            mbps(got.bytes(), recv_time),
            reply.bytes(),
            reply.hex(),
        );
    }
    Ok(())
}

/// `recv --session`: the guest opens the sessions (one after the other), reads each to
/// EOF, then replies and half-closes.
fn recv_sessions(
    peer: &Peer,
    conns: u64,
    reply_seed: u64,
    reply_bytes: u64,
    chunk: usize,
    timeout: Duration,
) -> CmdResult {
    let port = peer.addr.port;
    for conn in 0..conns {
        let start = Instant::now();
        let sock = Stream::connect(true, peer.addr, timeout, None)?;
        let connect_time = start.elapsed();
        let started = Instant::now();
        let (got, _) = recv_to_eof(&sock, false)?;
        let recv_time = started.elapsed();
        let reply = send_pattern(&sock, reply_seed, reply_bytes, chunk)?;
        sock.shutdown_write()
            .map_err(|e| Failure::io(&format!("shutdown(SHUT_WR){}", sock.explain()), &e))?;
        println!(
            "DS-RESULT cmd=recv port={port} conn={conn} {} connect_ms={:.1} bytes={} xxh3={} ms={:.1} mbps={:.1} reply_bytes={} reply_xxh3={}{}",
            peer.fields(),
            millis(connect_time),
            got.bytes(),
            got.hex(),
            millis(recv_time),
            mbps(got.bytes(), recv_time),
            reply.bytes(),
            reply.hex(),
            sock.fields(),
        );
    }
    Ok(())
}

fn parse_sizes(list: &str) -> Result<Vec<usize>, Failure> {
    list.split(',')
        .filter(|s| !s.is_empty())
        .map(|s| {
            let v = parse_size(s).map_err(|e| Failure(format!("--sizes: {e}")))?;
            usize::try_from(v)
                .ok()
                .filter(|&v| v < SEQ_RECV_BUF_BYTES)
                .ok_or_else(|| Failure(format!("--sizes: {v} must be below {SEQ_RECV_BUF_BYTES}")))
        })
        .collect()
}

fn cmd_seq_echo_client(mut o: Opts, timeout: Duration) -> CmdResult {
    let peer = o.peer()?;
    let port = o.u32_required("port")?;
    let sizes = parse_sizes(
        &o.take_str("sizes")
            .ok_or_else(|| Failure("--sizes is required".into()))?,
    )?;
    let seed = o.size_or("seed", 1)?;
    let rounds = o.size_or("rounds", 1)?;
    let session = o.flag("session");
    o.finish()?;
    let peer = peer.resolve(port, timeout)?;

    let start = Instant::now();
    let sock = SeqConn::connect(session, peer.addr, timeout)?;
    let mut gen = PatternStream::new(seed);
    let mut buf = vec![0u8; SEQ_RECV_BUF_BYTES];
    let mut sent = Checksum::new();
    let mut count = 0u64;
    for round in 0..rounds {
        for (i, &size) in sizes.iter().enumerate() {
            let msg = gen.take(size);
            let n = sock.send_msg(&msg).map_err(|e| {
                Failure::io(
                    &format!(
                        "send message {i} ({size} bytes) round {round}{}",
                        sock.explain()
                    ),
                    &e,
                )
            })?;
            if n != size {
                return Err(Failure(format!("message {i}: sent {n} of {size} bytes")));
            }
            sent.update(&msg);
            let (got, truncated) = sock.recv_msg(&mut buf).map_err(|e| {
                Failure::io(
                    &format!("recv echo of message {i} ({size} bytes){}", sock.explain()),
                    &e,
                )
            })?;
            if truncated || got != size {
                return Err(Failure(format!(
                    "message {i}: sent {size} bytes, echo was {got} bytes (truncated={truncated})"
                )));
            }
            if buf[..got] != msg[..] {
                let at = buf.iter().zip(&msg).position(|(a, b)| a != b).unwrap_or(0);
                return Err(Failure(format!(
                    "message {i} ({size} bytes): echo differs at byte {at}"
                )));
            }
            count += 1;
        }
    }
    sock.shutdown_write()
        .map_err(|e| Failure::io(&format!("shutdown(SHUT_WR){}", sock.explain()), &e))?;
    let (tail, _) = sock
        .recv_msg(&mut buf)
        .map_err(|e| Failure::io(&format!("recv EOF{}", sock.explain()), &e))?;
    if tail != 0 {
        return Err(Failure(format!(
            "unexpected {tail}-byte message after the last echo"
        )));
    }
    println!(
        "DS-RESULT cmd=seq-echo-client {} count={count} ok={count} bytes={} xxh3={} ms={:.1}{}",
        peer.fields(),
        sent.bytes(),
        sent.hex(),
        millis(start.elapsed()),
        sock.fields(),
    );
    Ok(())
}

/// A seqpacket client's connection: raw, or a seqpacket session with `--session`.
#[derive(Debug)]
enum SeqConn {
    Raw(VsockSocket),
    Session(Box<SessionSeqPacket>),
}

impl SeqConn {
    fn connect(session: bool, addr: VsockAddr, timeout: Duration) -> Result<Self, Failure> {
        if !session {
            return connect(SockType::SeqPacket, addr, timeout).map(SeqConn::Raw);
        }
        let s = SessionSeqPacket::connect(addr.cid, addr.port, session_options(timeout))
            .map_err(|e| Failure::io(&format!("seqpacket session connect {addr}"), &e))?;
        announce_session(s.session_id(), addr, "client", None)?;
        Ok(SeqConn::Session(Box::new(s)))
    }

    fn send_msg(&self, msg: &[u8]) -> io::Result<usize> {
        match self {
            SeqConn::Raw(s) => s.send(msg),
            SeqConn::Session(s) => s.send_msg(msg),
        }
    }

    fn recv_msg(&self, buf: &mut [u8]) -> io::Result<(usize, bool)> {
        match self {
            SeqConn::Raw(s) => s.recv_msg(buf),
            SeqConn::Session(s) => s.recv_msg(buf),
        }
    }

    fn shutdown_write(&self) -> io::Result<()> {
        match self {
            SeqConn::Raw(s) => s.shutdown(Shutdown::Write),
            SeqConn::Session(s) => s.shutdown(Shutdown::Write),
        }
    }

    fn explain(&self) -> String {
        match self {
            SeqConn::Raw(_) => String::new(),
            SeqConn::Session(s) => s
                .failure()
                .map_or_else(String::new, |e| format!(" (session: {e})")),
        }
    }

    /// The session fields of the result line (messages retransmitted too), or nothing.
    fn fields(&self) -> String {
        match self {
            SeqConn::Raw(_) => String::new(),
            SeqConn::Session(s) => {
                let st = s.stats();
                format!(
                    "{} retransmitted_msgs={}",
                    session_fields(s.session_id(), &st),
                    st.retransmitted_messages
                )
            }
        }
    }
}

/// Echo server for `seq-echo-server` (messages) and `echo-server` (byte stream).
fn cmd_echo_server(mut o: Opts, ty: SockType, name: &str, timeout: Duration) -> CmdResult {
    let port = o.u32_required("port")?;
    let conns = o.size_or("conns", 1)?;
    let session = o.flag("session");
    o.finish()?;
    let listener = Listener::bind(session, ty, port, timeout)?;
    let mut buf = vec![0u8; SEQ_RECV_BUF_BYTES];
    for conn in 0..conns {
        let (sock, peer) = listener.accept(timeout)?;
        let mut sum = Checksum::new();
        let mut sizes = Vec::new();
        loop {
            let n = match (ty, &sock) {
                (SockType::SeqPacket, Stream::Raw(raw)) => {
                    let (n, truncated) = raw
                        .recv_msg(&mut buf)
                        .map_err(|e| Failure::io("recv", &e))?;
                    if truncated {
                        return Err(Failure(format!(
                            "message larger than {SEQ_RECV_BUF_BYTES} bytes"
                        )));
                    }
                    n
                }
                (SockType::SeqPacket, _) => unreachable!("seqpacket listeners are raw"),
                (SockType::Stream, _) => sock
                    .recv(&mut buf)
                    .map_err(|e| Failure::io(&format!("recv{}", sock.explain()), &e))?,
            };
            if n == 0 {
                break;
            }
            sock.send_all(&buf[..n])
                .map_err(|e| Failure::io(&format!("send echo{}", sock.explain()), &e))?;
            sum.update(&buf[..n]);
            if sizes.len() < 64 {
                sizes.push(n.to_string());
            }
        }
        let session_fields = sock.fields();
        drop(sock);
        let sizes = if ty == SockType::SeqPacket {
            format!(" sizes={}", sizes.join(","))
        } else {
            String::new()
        };
        println!(
            "DS-RESULT cmd={name} port={port} conn={conn} peer={peer} bytes={} xxh3={}{sizes}{session_fields}",
            sum.bytes(),
            sum.hex()
        );
    }
    Ok(())
}

/// Connects to a peer that must refuse; succeeds if the connect fails within `--max-ms`
/// (and, with `--errno`, with one of the listed errnos). The time excludes name resolution.
fn cmd_connect_expect_fail(mut o: Opts, timeout: Duration) -> CmdResult {
    let peer = o.peer()?;
    let port = o.u32_required("port")?;
    let max = Duration::from_millis(o.size_or("max-ms", 1000)?);
    let ty = sock_type(o.take_str("type"))?;
    let allowed: Option<Vec<String>> = o
        .take_str("errno")
        .map(|list| list.split(',').map(str::to_owned).collect());
    o.finish()?;
    let peer = peer.resolve(port, timeout)?;
    let addr = peer.addr;
    let kind = match ty {
        SockType::Stream => "stream",
        SockType::SeqPacket => "seqpacket",
    };
    // Give the kernel enough time to show how long a failure really takes, but bounded.
    let connect_timeout = max + Duration::from_millis(1000);
    let start = Instant::now();
    let res = VsockSocket::connect(ty, addr, connect_timeout);
    let elapsed = start.elapsed();
    match res {
        Ok(_) => {
            println!(
                "DS-RESULT cmd=connect-expect-fail {} type={kind} errno=none ms={:.1} ok=0",
                peer.fields(),
                millis(elapsed)
            );
            Err(Failure(format!("connect to {addr} succeeded")))
        }
        Err(e) => {
            let errno = e
                .raw_os_error()
                .map_or_else(|| "unknown".to_owned(), vsock::errno_name);
            let fast = elapsed <= max;
            let expected = allowed.as_ref().is_none_or(|l| l.contains(&errno));
            println!(
                "DS-RESULT cmd=connect-expect-fail {} type={kind} errno={errno} ms={:.1} ok={}",
                peer.fields(),
                millis(elapsed),
                u8::from(fast && expected)
            );
            if !fast {
                Err(Failure(format!(
                    "connect failed with {errno} but only after {:.0} ms",
                    millis(elapsed)
                )))
            } else if !expected {
                Err(Failure(format!(
                    "connect failed with {errno}, expected one of {}",
                    allowed.unwrap_or_default().join(",")
                )))
            } else {
                Ok(())
            }
        }
    }
}

/// What one side of a duplex exchange did.
#[derive(Debug)]
struct Duplex {
    sent: Checksum,
    /// From the first send until `shutdown(SHUT_WR)` returned.
    send_time: Duration,
    received: Checksum,
    /// From the start until EOF.
    recv_time: Duration,
    end: StreamEnd,
    total: Duration,
}

/// Sends `bytes` of the stream for `seed` in `chunk`-byte writes (then `SHUT_WR`) while
/// receiving to EOF on another thread; only counts and checksums what arrives.
fn duplex<S: ByteStream + ?Sized>(
    sock: &S,
    seed: u64,
    bytes: u64,
    chunk: usize,
    rate: Option<f64>,
) -> Result<Duplex, Failure> {
    let start = Instant::now();
    let (sent, received) = thread::scope(|scope| {
        let sender = scope.spawn(|| {
            let sum = send_pattern_paced(sock, seed, bytes, chunk, rate.map(Pace::new))?;
            sock.shutdown_write()
                .map_err(|e| Failure::io(&format!("shutdown(SHUT_WR){}", sock.explain()), &e))?;
            Ok::<_, Failure>((sum, start.elapsed()))
        });
        // Our own SHUT_WR may come first (see StreamEnd::ClosedBeforeShutdown); the byte
        // count and checksum show whether anything went missing.
        let received = recv_to_eof(sock, true).map(|r| (r, start.elapsed()));
        let sent = sender
            .join()
            .unwrap_or_else(|_| Err(Failure("sender thread panicked".into())));
        (sent, received)
    });
    let (sent, send_time) = sent?;
    let ((received, end), recv_time) = received?;
    Ok(Duplex {
        sent,
        send_time,
        received,
        recv_time,
        end,
        total: start.elapsed(),
    })
}

impl Duplex {
    fn fields(&self) -> String {
        format!(
            "sent_bytes={} sent_xxh3={} send_ms={:.1} send_mbps={:.1} recv_bytes={} recv_xxh3={} \
             recv_ms={:.1} recv_mbps={:.1} end={} ms={:.1} mbps={:.1}",
            self.sent.bytes(),
            self.sent.hex(),
            millis(self.send_time),
            mbps(self.sent.bytes(), self.send_time),
            self.received.bytes(),
            self.received.hex(),
            millis(self.recv_time),
            mbps(self.received.bytes(), self.recv_time),
            self.end.name(),
            millis(self.total),
            mbps(self.sent.bytes() + self.received.bytes(), self.total),
        )
    }
}

/// `--seed`, defaulting to the guest's own CID so both sides send different streams.
fn seed_or_own_cid(o: &mut Opts) -> Result<u64, Failure> {
    match o.size("seed")? {
        Some(seed) => Ok(seed),
        None => match vsock::local_cid() {
            Ok(Some(cid)) => Ok(u64::from(cid)),
            Ok(None) => Err(Failure("no vsock transport bound".into())),
            Err(e) => Err(Failure::io("/dev/vsock", &e)),
        },
    }
}

fn cmd_duplex_client(mut o: Opts, timeout: Duration) -> CmdResult {
    let peer = o.peer()?;
    let port = o.u32_required("port")?;
    let bytes = o.required("bytes")?;
    let chunk = o.usize_or("chunk", DUPLEX_CHUNK_BYTES as usize)?;
    let seed = seed_or_own_cid(&mut o)?;
    let rate = rate_opt(&mut o)?;
    let session = o.flag("session");
    let id_file = session_id_file(&mut o, session)?;
    o.finish()?;
    let peer = peer.resolve(port, timeout)?;
    let start = Instant::now();
    let sock = Stream::connect(session, peer.addr, timeout, id_file.as_deref())?;
    let connect_time = start.elapsed();
    let d = duplex(&sock, seed, bytes, chunk, rate)?;
    let session_fields = sock.fields();
    drop(sock);
    println!(
        "DS-RESULT cmd=duplex-client {} seed={seed} chunk={chunk} connect_ms={:.1} {}{session_fields}",
        peer.fields(),
        millis(connect_time),
        d.fields()
    );
    Ok(())
}

fn cmd_duplex_server(mut o: Opts, timeout: Duration) -> CmdResult {
    let port = o.u32_required("port")?;
    let bytes = o.required("bytes")?;
    let chunk = o.usize_or("chunk", DUPLEX_CHUNK_BYTES as usize)?;
    let seed = seed_or_own_cid(&mut o)?;
    let rate = rate_opt(&mut o)?;
    let conns = o.size_or("conns", 1)?;
    let session = o.flag("session");
    o.finish()?;
    let listener = Listener::bind(session, SockType::Stream, port, timeout)?;
    for conn in 0..conns {
        let (sock, peer) = listener.accept(timeout)?;
        let d = duplex(&sock, seed, bytes, chunk, rate)?;
        let session_fields = sock.fields();
        drop(sock);
        println!(
            "DS-RESULT cmd=duplex-server port={port} conn={conn} peer={peer} seed={seed} chunk={chunk} {}{session_fields}",
            d.fields()
        );
    }
    Ok(())
}

/// `resolve`: a name that does not resolve is a result (`found=0`), not a failure.
fn cmd_resolve(mut o: Opts, timeout: Duration) -> CmdResult {
    let name = o
        .take_str("name")
        .ok_or_else(|| Failure("--name is required".into()))?;
    o.finish()?;
    let start = Instant::now();
    let mut client =
        ControlClient::connect(timeout).map_err(|e| Failure::control("control service", &e))?;
    let connected = start.elapsed();
    let res = client.resolve(&name);
    let took = start.elapsed();
    let timing = format!("connect_ms={:.1} ms={:.1}", millis(connected), millis(took));
    match res {
        Ok(cid) => {
            let cid = control::guest_cid(cid)
                .map_err(|e| Failure::control(&format!("resolve {name:?}"), &e))?;
            println!("DS-RESULT cmd=resolve name={name} found=1 cid={cid} {timing}");
            Ok(())
        }
        Err(ControlError::NotFound(_)) => {
            println!("DS-RESULT cmd=resolve name={name} found=0 reason=not-found {timing}");
            Ok(())
        }
        Err(e) => Err(Failure::control(&format!("resolve {name:?}"), &e)),
    }
}

fn cmd_whoami(o: Opts, timeout: Duration) -> CmdResult {
    o.finish()?;
    let start = Instant::now();
    let id = ControlClient::connect(timeout)
        .and_then(|mut c| c.whoami())
        .map_err(|e| Failure::control("whoami", &e))?;
    println!(
        "DS-RESULT cmd=whoami name={} namespace={} cid={} ms={:.1}",
        id.name,
        id.namespace,
        id.cid,
        millis(start.elapsed())
    );
    Ok(())
}

fn cmd_list(o: Opts, timeout: Duration) -> CmdResult {
    o.finish()?;
    let start = Instant::now();
    let items = ControlClient::connect(timeout)
        .and_then(|mut c| c.list())
        .map_err(|e| Failure::control("list", &e))?;
    let domains: Vec<String> = items.iter().map(|(n, c)| format!("{n}={c}")).collect();
    println!(
        "DS-RESULT cmd=list count={} domains={} ms={:.1}",
        items.len(),
        domains.join(","),
        millis(start.elapsed())
    );
    Ok(())
}

/// One echo round trip of `msg` on a stream socket.
fn echo_round_trip(sock: &VsockSocket, msg: &[u8]) -> io::Result<()> {
    sock.send_all(msg)?;
    let mut back = vec![0u8; msg.len()];
    let mut got = 0;
    while got < msg.len() {
        match sock.recv(&mut back[got..])? {
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            n => got += n,
        }
    }
    if back != msg {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "echo differs"));
    }
    Ok(())
}

/// `hold-echo`: opens one stream per port to echo servers and proves each with a round trip;
/// then listens on `--gate` until the host connects and closes (the host changes something
/// meanwhile, such as the access policy), and tries one more round trip on every connection.
/// How each one went (`after_<port>=ok`, `eof`, or an errno name) is the result, not a
/// failure: the host decides which connections had to survive.
fn cmd_hold_echo(mut o: Opts, timeout: Duration) -> CmdResult {
    let peer = o.peer()?;
    let ports = o
        .take_str("ports")
        .ok_or_else(|| Failure("--ports is required".into()))?;
    let ports: Vec<u32> = ports
        .split(',')
        .map(|p| {
            p.parse()
                .map_err(|_| Failure(format!("--ports: bad port {p:?}")))
        })
        .collect::<Result<_, _>>()?;
    let gate = o.u32_required("gate")?;
    let size = o.usize_or("size", 64)?;
    o.finish()?;
    let msg = PatternStream::new(5).take(size.max(1));
    let mut held = Vec::new();
    let mut fields = String::new();
    for &port in &ports {
        let peer = peer.clone().resolve(port, timeout)?;
        let sock = connect(SockType::Stream, peer.addr, timeout)?;
        echo_round_trip(&sock, &msg)
            .map_err(|e| Failure::io(&format!("first round trip to {}", peer.addr), &e))?;
        fields.push_str(&format!(" before_{port}=ok"));
        held.push((port, sock));
    }
    let listener = listen(SockType::Stream, gate, timeout)?;
    let (gate_conn, _) = accept(&listener, timeout)?;
    recv_to_eof(&gate_conn, false)?;
    for (port, sock) in &held {
        let outcome = match echo_round_trip(sock, &msg) {
            Ok(()) => "ok".to_owned(),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => "eof".to_owned(),
            Err(e) => e
                .raw_os_error()
                .map_or_else(|| e.to_string().replace(' ', "-"), vsock::errno_name),
        };
        fields.push_str(&format!(" after_{port}={outcome}"));
    }
    println!("DS-RESULT cmd=hold-echo peer={}{fields}", peer_label(&peer));
    Ok(())
}

fn peer_label(peer: &PeerArg) -> String {
    match peer {
        PeerArg::Cid(cid) => cid.to_string(),
        PeerArg::Name(name) => name.clone(),
    }
}

fn cmd_rr(mut o: Opts, timeout: Duration) -> CmdResult {
    let peer = o.peer()?;
    let port = o.u32_required("port")?;
    let count = o.size_or("count", 1000)?;
    let size = o.usize_or("size", 64)?;
    let session = o.flag("session");
    o.finish()?;
    if count == 0 || size == 0 {
        return Err(Failure("--count and --size must be positive".into()));
    }
    let peer = peer.resolve(port, timeout)?;
    let sock = Stream::connect(session, peer.addr, timeout, None)?;
    let msg = PatternStream::new(1).take(size);
    let mut back = vec![0u8; size];
    let mut rtts = Vec::with_capacity(count as usize);
    let start = Instant::now();
    for i in 0..count {
        let t = Instant::now();
        sock.send_all(&msg)
            .map_err(|e| Failure::io(&format!("send {i}{}", sock.explain()), &e))?;
        let mut got = 0;
        while got < size {
            match sock.recv(&mut back[got..]) {
                Ok(0) => return Err(Failure(format!("EOF during round trip {i}"))),
                Ok(n) => got += n,
                Err(e) => return Err(Failure::io(&format!("recv {i}{}", sock.explain()), &e)),
            }
        }
        rtts.push(t.elapsed());
        if back != msg {
            return Err(Failure(format!("round trip {i}: echo differs")));
        }
    }
    let total = start.elapsed();
    sock.shutdown_write()
        .map_err(|e| Failure::io(&format!("shutdown(SHUT_WR){}", sock.explain()), &e))?;
    rtts.sort();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let pct = |p: usize| rtts[(rtts.len() - 1) * p / 100];
    println!(
        "DS-RESULT cmd=rr {} count={count} size={size} ms={:.1} avg_us={:.1} p50_us={:.1} p99_us={:.1} max_us={:.1}{}",
        peer.fields(),
        millis(total),
        us(total) / count as f64,
        us(pct(50)),
        us(pct(99)),
        us(pct(100)),
        sock.fields(),
    );
    Ok(())
}

fn run(args: &[String]) -> CmdResult {
    let Some((cmd, rest)) = args.split_first() else {
        return Err(Failure(USAGE.into()));
    };
    if cmd == "bus" {
        // Positional words and repeated options: parsed by the bus commands themselves.
        return bus_cli::cmd_bus(rest);
    }
    let mut o = Opts::parse(rest)?;
    let timeout = Duration::from_millis(o.size_or("timeout-ms", DEFAULT_TIMEOUT_MS)?);
    match cmd.as_str() {
        "cid" => cmd_cid(o),
        "send" | "halfclose-client" => cmd_send(o, cmd, timeout),
        "recv" => cmd_recv(o, timeout),
        "seq-echo-client" => cmd_seq_echo_client(o, timeout),
        "seq-echo-server" => cmd_echo_server(o, SockType::SeqPacket, cmd, timeout),
        "echo-server" => cmd_echo_server(o, SockType::Stream, cmd, timeout),
        "connect-expect-fail" => cmd_connect_expect_fail(o, timeout),
        "rr" => cmd_rr(o, timeout),
        "hold-echo" => cmd_hold_echo(o, timeout),
        "duplex-client" => cmd_duplex_client(o, timeout),
        "duplex-server" => cmd_duplex_server(o, timeout),
        "resolve" => cmd_resolve(o, timeout),
        "whoami" => cmd_whoami(o, timeout),
        "list" => cmd_list(o, timeout),
        "forge-resume" => forge::cmd_forge_resume(o, timeout),
        "help" | "--help" | "-h" => {
            println!("{USAGE}");
            Ok(())
        }
        other => Err(Failure(format!("unknown command {other:?}\n{USAGE}"))),
    }
}

/// Exit status of `migrate` by outcome.
const EXIT_ROLLED_BACK: u8 = 2;
const EXIT_ROLLBACK_FAILED: u8 = 3;

/// `migrate`: the whole live migration of one guest (see the usage text).
fn cmd_migrate(mut o: Opts) -> Result<ExitCode, Failure> {
    use domsock_migration::admin::AdminSocket;
    use domsock_migration::orchestrate::{self, Outcome, Plan, Side};
    use domsock_migration::qmp::Qmp;
    use std::path::PathBuf;
    let mut need = |k: &str| {
        o.take_str(k)
            .ok_or_else(|| Failure(format!("--{k} is required")))
    };
    let vm = need("vm")?;
    let (from, to) = (need("from")?, need("to")?);
    let uri = need("uri")?;
    let (from_qmp, to_qmp) = (
        PathBuf::from(need("from-qmp")?),
        PathBuf::from(need("to-qmp")?),
    );
    let (from_admin, to_admin) = (
        PathBuf::from(need("from-admin")?),
        PathBuf::from(need("to-admin")?),
    );
    let device_id = o.take_str("device-id").unwrap_or_else(|| "vsock0".into());
    let chardev = o.take_str("chardev").unwrap_or_else(|| "vhu0".into());
    let mut plan = Plan::vsock(&vm, &uri, &device_id, &chardev);
    let ms = Duration::from_millis;
    plan.timeouts.unplug = ms(o.size_or("unplug-ms", 10_000)?);
    plan.timeouts.migrate = ms(o.size_or("migrate-ms", 120_000)?);
    plan.timeouts.settle = ms(o.size_or("settle-ms", 10_000)?);
    plan.timeouts.confirm = ms(o.size_or("confirm-ms", 10_000)?);
    plan.quit_source = !o.flag("keep-source");
    let json = o.flag("json");
    o.finish()?;
    let t = plan.timeouts.qmp;
    let connect = |path: &PathBuf| {
        Qmp::connect(path, t).map_err(|e| Failure(format!("QMP {}: {e}", path.display())))
    };
    let sides = connect(&from_qmp).and_then(|a| Ok((a, connect(&to_qmp)?)));
    let (src_qmp, dst_qmp) = match sides {
        Ok(s) => s,
        Err(Failure(msg)) if json => {
            let v = serde_json::json!({"v": 1, "vm": vm, "from": from, "to": to,
                "outcome": "not_started", "error": msg, "steps": [], "rollback": []});
            println!("{v}");
            return Ok(ExitCode::from(1));
        }
        Err(f) => return Err(f),
    };
    let mut src = Side {
        host: from,
        qmp: src_qmp,
        agent: AdminSocket::new(&from_admin, t),
    };
    let mut dst = Side {
        host: to,
        qmp: dst_qmp,
        agent: AdminSocket::new(&to_admin, t),
    };
    let report = orchestrate::migrate(&plan, &mut src, &mut dst);
    if json {
        println!("{}", report.to_json());
    } else {
        print!("{}", report.to_text());
    }
    Ok(match report.outcome {
        Outcome::Migrated => ExitCode::SUCCESS,
        Outcome::RolledBack => ExitCode::from(EXIT_ROLLED_BACK),
        Outcome::RollbackFailed => ExitCode::from(EXIT_ROLLBACK_FAILED),
    })
}

fn main() -> ExitCode {
    if let Some(filter) = std::env::var_os("DOMSOCK_LOG") {
        let filter = filter.to_string_lossy();
        match tracing_subscriber::EnvFilter::try_new(&*filter) {
            Ok(f) => tracing_subscriber::fmt()
                .with_env_filter(f)
                .with_writer(io::stderr)
                .with_ansi(false)
                .init(),
            Err(e) => eprintln!("domsock: DOMSOCK_LOG={filter:?} ignored: {e}"),
        }
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("migrate") {
        let outcome = Opts::parse(&args[1..]).and_then(cmd_migrate);
        return outcome.unwrap_or_else(|Failure(msg)| {
            println!("DS-ERROR cmd=migrate msg={msg}");
            ExitCode::from(1)
        });
    }
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure(msg)) => {
            let cmd = args.first().map_or("none", String::as_str);
            println!("DS-ERROR cmd={cmd} msg={msg}");
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_suffixes() {
        assert_eq!(parse_size("7").unwrap(), 7);
        assert_eq!(parse_size("64K").unwrap(), 65536);
        assert_eq!(parse_size("256M").unwrap(), 256 << 20);
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_size("0x10").unwrap(), 16);
        assert!(parse_size("1X").is_err());
        assert!(parse_size("").is_err());
        assert_eq!(
            parse_sizes("1,2,4K,65536").unwrap(),
            vec![1, 2, 4096, 65536]
        );
    }

    #[test]
    fn the_rate_cap_spaces_sends_and_does_not_burst_after_a_stall() {
        let t0 = Instant::now();
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let mut p = Pace {
            bytes_per_sec: 1e6,
            due: t0,
        };
        // 1 MB/s: 500 KB due 500 ms after the start, the next 500 KB 500 ms later.
        assert!((ms(p.delay(500_000, t0)) - 500.0).abs() < 0.01);
        assert!((ms(p.delay(500_000, t0)) - 1000.0).abs() < 0.01);
        // Sent on time: each chunk waits for its own share only.
        let t1 = t0 + Duration::from_secs(1);
        assert!((ms(p.delay(100_000, t1)) - 100.0).abs() < 0.01);
        // A 10 s stall: at most BURST (100 ms) of the unused time is sent without waiting,
        // not 10 s worth.
        let t2 = t0 + Duration::from_secs(11);
        assert_eq!(p.delay(50_000, t2), Duration::ZERO);
        assert_eq!(p.delay(50_000, t2), Duration::ZERO);
        assert!((ms(p.delay(50_000, t2)) - 50.0).abs() < 0.01);
        let opts = |v: &[&str]| Opts::parse(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(
            rate_opt(&mut opts(&["--rate-mb-s", "8"]).unwrap()).unwrap(),
            Some(8.0)
        );
        assert_eq!(rate_opt(&mut opts(&[]).unwrap()).unwrap(), None);
        for bad in ["0", "-1", "x", "1e9", "NaN"] {
            assert!(
                rate_opt(&mut opts(&["--rate-mb-s", bad]).unwrap()).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn peer_is_a_cid_or_a_name() {
        let opts = |v: &[&str]| Opts::parse(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(
            opts(&["--cid", "3"]).unwrap().peer().unwrap(),
            PeerArg::Cid(3)
        );
        assert_eq!(
            opts(&["--peer", "4"]).unwrap().peer().unwrap(),
            PeerArg::Cid(4)
        );
        assert_eq!(
            opts(&["--peer", "db-1.x"]).unwrap().peer().unwrap(),
            PeerArg::Name("db-1.x".into())
        );
        assert!(opts(&["--cid", "web"]).unwrap().peer().is_err());
        assert!(opts(&["--peer", "a/b"]).unwrap().peer().is_err());
        assert!(opts(&["--cid", "3", "--peer", "a"])
            .unwrap()
            .peer()
            .is_err());
        assert!(opts(&[]).unwrap().peer().is_err());
    }

    #[test]
    fn migrate_needs_every_endpoint_before_it_touches_anything() {
        let args = |v: &[&str]| Opts::parse(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        let full = [
            "--vm",
            "w",
            "--from",
            "a",
            "--to",
            "b",
            "--uri",
            "tcp:1.2.3.4:1",
            "--from-qmp",
            "/nonexistent/a",
            "--to-qmp",
            "/nonexistent/b",
            "--from-admin",
            "x",
            "--to-admin",
            "y",
        ];
        for drop in (0..full.len()).step_by(2) {
            let mut v = full.to_vec();
            let name = v.remove(drop);
            v.remove(drop);
            let Err(Failure(msg)) = args(&v).and_then(cmd_migrate) else {
                panic!("migrate without {name} must fail");
            };
            assert!(msg.contains(&format!("{name} is required")), "{msg}");
        }
        let mut v = full.to_vec();
        v.extend(["--bogus", "1"]);
        let Err(Failure(msg)) = args(&v).and_then(cmd_migrate) else {
            panic!("an unknown option must fail");
        };
        assert!(msg.contains("--bogus"), "{msg}");
    }

    #[test]
    fn options_reject_unknown_and_duplicates() {
        let args = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(Opts::parse(&args(&["--port", "1", "--port", "2"])).is_err());
        assert!(Opts::parse(&args(&["--port"])).is_err());
        let o = Opts::parse(&args(&["--bogus", "1"])).unwrap();
        assert!(o.finish().is_err());
        // `--session` takes no value; the next word is the next option.
        let mut o = Opts::parse(&args(&["--session", "--port", "7"])).unwrap();
        assert!(o.flag("session"));
        assert_eq!(o.u32_required("port").unwrap(), 7);
        o.finish().unwrap();
        let mut o = Opts::parse(&args(&["--port", "7"])).unwrap();
        assert!(!o.flag("session"));
        assert!(!o.has_peer(), "recv --session without PEER listens");
        assert!(Opts::parse(&args(&["--cid", "2"])).unwrap().has_peer());
    }
}
