//! Shared pieces of the user-space guest integration tests: running a real vhost-user vsock
//! backend process (domsockd, or vhost-device-vsock for comparison), the host ends of hybrid
//! vsock (`<uds>_<port>` listeners, `CONNECT <port>`), and bounded waits.
//!
//! Backends run only as `--vm guest-cid=N,socket=<vhost-user socket>,uds-path=<uds>`: nothing
//! here opens an AF_VSOCK socket. Each backend process is stopped by its PID when dropped.

#![allow(dead_code)] // Each test binary uses a different subset.

use domsock_guest::pattern::{Checksum, PatternStream};
use domsock_guest::uvirtio::{GuestConfig, UserGuest};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

/// Bound on every blocking step of a test.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(20);
/// A test still running after this long aborts the binary instead of hanging.
const WATCHDOG: Duration = Duration::from_secs(120);
const STARTUP_TIMEOUT: Duration = Duration::from_secs(10);

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("crate has a parent")
        .to_path_buf()
}

/// `domsockd`: `$DOMSOCKD`, else `target/release/domsockd`, else `target/debug/domsockd`.
///
/// # Panics
/// If none exists: a missing backend must not look like a pass.
pub fn domsockd() -> PathBuf {
    if let Some(p) = std::env::var_os("DOMSOCKD") {
        return PathBuf::from(p);
    }
    let target = workspace_root().join("target");
    for profile in ["release", "debug"] {
        let p = target.join(profile).join("domsockd");
        if p.exists() {
            return p;
        }
    }
    panic!(
        "no domsockd binary under {}: build it first with `cargo build --release -p domsock-host`",
        target.display()
    );
}

/// vhost-device-vsock 0.3.0 (`$DOMSOCK_PEER_BACKEND`, else
/// `.cache/peer/bin/vhost-device-vsock`) if installed; otherwise the test is skipped through
/// [`require`] (a failure under CI).
pub fn peer_backend() -> Option<PathBuf> {
    let p = std::env::var_os("DOMSOCK_PEER_BACKEND")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            workspace_root()
                .join(".cache")
                .join("peer")
                .join("bin")
                .join("vhost-device-vsock")
        });
    require(p.exists().then_some(p.clone()), || {
        format!(
            "vhost-device-vsock is not installed at {} (scripts/test.sh installs it)",
            p.display()
        )
    })
}

// ---- skips ------------------------------------------------------------------------------
// Same format and file as `domsock_tests::skip` (the VM tests); kept apart because the
// test-support modules are consolidated separately.

/// `part` if present. If it is missing, the calling test must return without doing its
/// work: under CI this panics (a missing part fails the run); elsewhere it writes
/// `SKIPPED: <test>: <why>` to stderr (past libtest's capture) and appends that line to
/// the skip summary (`target/test-skips.txt`, printed by `scripts/test.sh`).
pub fn require<T>(part: Option<T>, why: impl FnOnce() -> String) -> Option<T> {
    if part.is_none() {
        skip(&why());
    }
    part
}

/// Records that the current test is skipped because of `why` (see [`require`]).
///
/// # Panics
/// Under CI.
pub fn skip(why: &str) {
    domsock_host::test_utils::skip(why, &workspace_root().join("target").join("test-skips.txt"));
}

pub use domsock_host::test_utils::{Process, TempDir};

/// One VM of a backend: its CID and sockets.
#[derive(Debug, Clone)]
pub struct Vm {
    pub cid: u64,
    pub socket: PathBuf,
    pub uds: PathBuf,
}

/// Identity and groups of one VM of [`Backend::spawn_with`]; `None` leaves domsockd's
/// default (name `vm<cid>`, namespace `default`).
#[derive(Debug, Clone, Default)]
pub struct VmOpts {
    pub cid: u64,
    pub name: Option<String>,
    pub namespace: Option<String>,
    pub groups: Vec<String>,
}

impl VmOpts {
    pub fn new(cid: u64) -> Self {
        Self {
            cid,
            ..Self::default()
        }
    }

    pub fn name(mut self, name: &str) -> Self {
        self.name = Some(name.to_string());
        self
    }

    pub fn namespace(mut self, namespace: &str) -> Self {
        self.namespace = Some(namespace.to_string());
        self
    }

    pub fn groups(mut self, groups: &[&str]) -> Self {
        self.groups = groups.iter().map(|g| g.to_string()).collect();
        self
    }

    /// The `--vm` value for `vm`.
    fn cli_fields(&self, vm: &Vm) -> String {
        let mut s = format!(
            "guest-cid={},socket={},uds-path={}",
            vm.cid,
            vm.socket.display(),
            vm.uds.display()
        );
        if let Some(n) = &self.name {
            s.push_str(&format!(",name={n}"));
        }
        if let Some(ns) = &self.namespace {
            s.push_str(&format!(",namespace={ns}"));
        }
        if !self.groups.is_empty() {
            s.push_str(&format!(",groups={}", self.groups.join("+")));
        }
        s
    }

    /// The `[[vm]]` table for `vm`.
    fn toml_table(&self, vm: &Vm) -> String {
        let mut s = format!(
            "[[vm]]\nguest-cid = {}\nsocket = {:?}\nuds-path = {:?}\n",
            vm.cid,
            vm.socket.display().to_string(),
            vm.uds.display().to_string()
        );
        if let Some(n) = &self.name {
            s.push_str(&format!("name = {n:?}\n"));
        }
        if let Some(ns) = &self.namespace {
            s.push_str(&format!("namespace = {ns:?}\n"));
        }
        if !self.groups.is_empty() {
            s.push_str(&format!("groups = {:?}\n", self.groups));
        }
        s
    }
}

/// Stands for the backend's temp dir in [`Backend::spawn_with`]'s config text.
pub const DIR_PLACEHOLDER: &str = "@DIR@";

/// A running backend process, stopped (SIGTERM, then SIGKILL) by PID on drop.
#[derive(Debug)]
pub struct Backend {
    process: Process,
    pub vms: Vec<Vm>,
    /// The identities the VMs were started with (`spawn_with`), else empty.
    opts: Vec<VmOpts>,
    /// The `--config` file (`spawn_with` with a config).
    config: Option<PathBuf>,
    _watchdog: Watchdog,
    dir: TempDir,
}

impl Backend {
    /// domsockd serving one VM per CID.
    pub fn domsockd(tag: &str, cids: &[u64]) -> Self {
        Self::spawn(&domsockd(), tag, cids)
    }

    /// `binary` with `--vm guest-cid=N,socket=...,uds-path=...` per CID.
    pub fn spawn(binary: &Path, tag: &str, cids: &[u64]) -> Self {
        let dir = TempDir::new(tag).unwrap();
        let vms: Vec<Vm> = cids.iter().map(|&cid| Vm::in_dir(&dir, cid)).collect();
        let args: Vec<String> = vms
            .iter()
            .flat_map(|vm| ["--vm".to_string(), VmOpts::new(vm.cid).cli_fields(vm)])
            .collect();
        Self::start(binary, tag, dir, vms, Vec::new(), None, &args)
    }

    /// domsockd with named VMs ([`Backend::spawn_with`]).
    pub fn domsockd_with(tag: &str, vms: &[VmOpts], config_toml: Option<&str>) -> Self {
        Self::spawn_with(&domsockd(), tag, vms, &[], config_toml)
    }

    /// `binary` serving `vms`, with `extra_args`. Without `config_toml` the VMs are `--vm`
    /// flags (`name=`, `namespace=`, `groups=a+b`). With it, they are `[[vm]]` tables of a
    /// `--config` file in the backend's temp dir, followed by `config_toml` (tables only:
    /// `[policy]`, `[[policy.allow]]`, `[[listen]]`; [`DIR_PLACEHOLDER`] becomes the temp
    /// dir), which [`Backend::rewrite_config`] can replace later.
    pub fn spawn_with(
        binary: &Path,
        tag: &str,
        vms: &[VmOpts],
        extra_args: &[String],
        config_toml: Option<&str>,
    ) -> Self {
        let dir = TempDir::new(tag).unwrap();
        let list: Vec<Vm> = vms.iter().map(|o| Vm::in_dir(&dir, o.cid)).collect();
        let mut args = extra_args.to_vec();
        let config = match config_toml {
            None => {
                for (o, vm) in vms.iter().zip(&list) {
                    args.push("--vm".to_string());
                    args.push(o.cli_fields(vm));
                }
                None
            }
            Some(text) => {
                let path = dir.path().join("domsockd.toml");
                write_config_file(&path, &config_text(dir.path(), vms, &list, text));
                args.push("--config".to_string());
                args.push(path.display().to_string());
                Some(path)
            }
        };
        Self::start(binary, tag, dir, list, vms.to_vec(), config, &args)
    }

    fn start(
        binary: &Path,
        tag: &str,
        dir: TempDir,
        vms: Vec<Vm>,
        opts: Vec<VmOpts>,
        config: Option<PathBuf>,
        args: &[String],
    ) -> Self {
        let log = dir.path().join("backend.log");
        let mut all = Vec::new();
        // Extra flags to run the whole suite against another configuration, e.g.
        // DOMSOCKD_ARGS="--busy-poll-us 50".
        match std::env::var("DOMSOCKD_ARGS") {
            Ok(extra) if Path::new(&binary).ends_with("domsockd") => {
                all.extend(extra.split_whitespace().map(str::to_string));
            }
            _ => {}
        }
        all.extend_from_slice(args);
        let sockets: Vec<PathBuf> = vms.iter().map(|vm| vm.socket.clone()).collect();
        let process = Process::start(binary, &all, log, STARTUP_TIMEOUT, || {
            sockets.iter().all(|s| s.exists())
        });
        Self {
            process,
            vms,
            opts,
            config,
            _watchdog: Watchdog::start(tag.to_string()),
            dir,
        }
    }

    pub fn vm(&self, i: usize) -> &Vm {
        &self.vms[i]
    }

    /// The VM with `cid`.
    pub fn vm_by_cid(&self, cid: u64) -> &Vm {
        self.vms
            .iter()
            .find(|v| v.cid == cid)
            .unwrap_or_else(|| panic!("no VM with CID {cid}"))
    }

    /// A guest on the VM with `cid`.
    pub fn guest_on(&self, cid: u64, cfg: GuestConfig) -> UserGuest {
        let i = self
            .vms
            .iter()
            .position(|v| v.cid == cid)
            .expect("known CID");
        self.guest(i, cfg)
    }

    /// The `--config` file, if the backend was started with one.
    pub fn config_path(&self) -> &Path {
        self.config
            .as_deref()
            .expect("backend started without a config file")
    }

    /// Replaces the config file's text after the `[[vm]]` tables with `config_toml` (the VMs
    /// stay as they were; [`DIR_PLACEHOLDER`] becomes the temp dir). Atomic: domsockd never
    /// reads half a file.
    pub fn rewrite_config(&self, config_toml: &str) {
        let text = config_text(self.dir(), &self.opts, &self.vms, config_toml);
        write_config_file(self.config_path(), &text);
    }

    /// [`Backend::rewrite_config`] with other `[[vm]]` tables: `vms` must name the same
    /// CIDs in the same order (their sockets stay), e.g. with other groups.
    pub fn rewrite_config_vms(&self, vms: &[VmOpts], config_toml: &str) {
        assert_eq!(
            vms.iter().map(|v| v.cid).collect::<Vec<_>>(),
            self.vms.iter().map(|v| v.cid).collect::<Vec<_>>(),
            "the VMs of a rewritten config must be the running ones"
        );
        let text = config_text(self.dir(), vms, &self.vms, config_toml);
        write_config_file(self.config_path(), &text);
    }

    /// Sends SIGHUP (re-read the config file's policy).
    pub fn reload(&self) {
        let pid = nix::unistd::Pid::from_raw(self.pid() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).unwrap();
    }

    /// The whole backend log so far.
    pub fn log_text(&self) -> String {
        self.process.log_text()
    }

    /// A guest on VM `i` with `cfg`.
    pub fn guest(&self, i: usize, cfg: GuestConfig) -> UserGuest {
        UserGuest::connect(&self.vms[i].socket, cfg)
            .unwrap_or_else(|e| panic!("guest setup: {}\n{}", chain(&e), self.log_tail()))
    }

    pub fn is_running(&mut self) -> bool {
        self.process.is_running()
    }

    pub fn log_tail(&self) -> String {
        self.process.log_tail()
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The backend's process id.
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// File descriptors the backend process holds open now: every guest connection holds a
    /// host socket, so this falls back to its idle value once the connection table is empty.
    pub fn fd_count(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .unwrap_or_else(|e| panic!("/proc/{}/fd: {e}", self.pid()))
            .count()
    }

    /// Waits until the backend's log has at least `count` lines containing `needle`.
    pub fn wait_for_log(&self, needle: &str, count: usize) {
        let deadline = Instant::now() + STEP_TIMEOUT;
        loop {
            let text = self.process.log_text();
            if text.lines().filter(|l| l.contains(needle)).count() >= count {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "fewer than {count} log lines with {needle:?}\n{}",
                self.log_tail()
            );
            thread::sleep(Duration::from_millis(2));
        }
    }

    /// The counters of the VM with `cid`, as domsockd logs them on SIGUSR1 (a `counters`
    /// line with `stats=name=value ...`).
    pub fn counters(&self, cid: u64) -> Counters {
        let cid_field = format!(" cid={cid} ");
        let lines = |text: &str| -> Vec<String> {
            // Only complete lines: the last one may still be being written.
            let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
            complete
                .lines()
                .filter(|l| l.contains(" counters ") && l.contains(&cid_field))
                .map(str::to_string)
                .collect()
        };
        let before = lines(&self.process.log_text()).len();
        let pid = nix::unistd::Pid::from_raw(self.pid() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGUSR1).unwrap();
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            let found = lines(&self.process.log_text());
            if found.len() > before {
                let line = found.last().expect("non-empty");
                let (_, stats) = line
                    .split_once(" stats=")
                    .unwrap_or_else(|| panic!("no stats= in {line:?}"));
                return Counters(
                    stats
                        .split_whitespace()
                        .filter_map(|kv| kv.split_once('='))
                        .map(|(k, v)| (k.to_string(), v.parse().unwrap_or(u64::MAX)))
                        .collect(),
                );
            }
            assert!(
                Instant::now() < deadline,
                "no counters line for CID {cid} after SIGUSR1\n{}",
                self.log_tail()
            );
            thread::sleep(Duration::from_millis(2));
        }
    }
}

impl Vm {
    fn in_dir(dir: &TempDir, cid: u64) -> Self {
        Vm {
            cid,
            socket: dir.path().join(format!("v{cid}.sock")),
            uds: dir.path().join(format!("u{cid}")),
        }
    }
}

/// The `[[vm]]` tables of `vms`, then `extra` with [`DIR_PLACEHOLDER`] replaced.
fn config_text(dir: &Path, opts: &[VmOpts], vms: &[Vm], extra: &str) -> String {
    let mut text: String = opts
        .iter()
        .zip(vms)
        .map(|(o, vm)| o.toml_table(vm) + "\n")
        .collect();
    text.push_str(&extra.replace(DIR_PLACEHOLDER, &dir.display().to_string()));
    text
}

/// Writes `text` to `path` through a temp file and a rename.
fn write_config_file(path: &Path, text: &str) {
    let tmp = path.with_extension("toml.new");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// One VM's counters from domsockd's log.
#[derive(Debug, Clone)]
pub struct Counters(std::collections::BTreeMap<String, u64>);

impl Counters {
    /// The counter `name`.
    ///
    /// # Panics
    /// If domsockd did not log it: a renamed counter must not read as 0.
    pub fn get(&self, name: &str) -> u64 {
        *self
            .0
            .get(name)
            .unwrap_or_else(|| panic!("domsockd logged no counter {name:?}: {self:?}"))
    }

    /// Asserts that every named counter is 0.
    pub fn assert_zero(&self, names: &[&str]) {
        for n in names {
            assert_eq!(self.get(n), 0, "counter {n}: {self:?}");
        }
    }
}

/// Aborts a hung test binary.
#[derive(Debug)]
struct Watchdog(Arc<AtomicBool>);

impl Watchdog {
    fn start(name: String) -> Self {
        let done = Arc::new(AtomicBool::new(false));
        let flag = done.clone();
        thread::spawn(move || {
            let start = Instant::now();
            while start.elapsed() < WATCHDOG {
                if flag.load(Ordering::Relaxed) {
                    return;
                }
                thread::sleep(Duration::from_millis(50));
            }
            eprintln!("test {name} still running after {WATCHDOG:?}; aborting");
            std::process::abort();
        });
        Self(done)
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// An error with its sources, one per line.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(&format!("\n  caused by: {c}"));
        cur = c.source();
    }
    s
}

// ---- host side ------------------------------------------------------------------------

/// `<uds>_<port>`.
pub fn port_path(uds: &Path, port: u32) -> PathBuf {
    let mut p = uds.as_os_str().to_owned();
    p.push(format!("_{port}"));
    PathBuf::from(p)
}

pub fn listen_stream(uds: &Path, port: u32) -> UnixListener {
    UnixListener::bind(port_path(uds, port)).unwrap()
}

/// A `SOCK_SEQPACKET` listener; accepted sockets come back as `UnixStream`s, whose
/// `read`/`write` keep message boundaries.
pub fn listen_seqpacket(uds: &Path, port: u32) -> UnixListener {
    use nix::sys::socket::UnixAddr;
    use nix::sys::socket::{bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType};
    let fd = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .unwrap();
    bind(
        fd.as_raw_fd(),
        &UnixAddr::new(&port_path(uds, port)).unwrap(),
    )
    .unwrap();
    listen(&fd, Backlog::new(16).unwrap()).unwrap();
    UnixListener::from(fd)
}

/// Accepts one connection within [`STEP_TIMEOUT`]; the stream gets read/write timeouts.
pub fn accept(listener: &UnixListener) -> UnixStream {
    listener.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + STEP_TIMEOUT;
    loop {
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false).unwrap();
                s.set_read_timeout(Some(STEP_TIMEOUT)).unwrap();
                s.set_write_timeout(Some(STEP_TIMEOUT)).unwrap();
                return s;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(Instant::now() < deadline, "no host connection to accept");
                thread::sleep(Duration::from_millis(1));
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
}

/// Host-initiated connection: `CONNECT <port>\n` on `<uds>`; returns the stream after the
/// reply line, and the line.
pub fn host_connect(uds: &Path, port: u32) -> (UnixStream, String) {
    let mut s = UnixStream::connect(uds).unwrap();
    s.set_read_timeout(Some(STEP_TIMEOUT)).unwrap();
    s.set_write_timeout(Some(STEP_TIMEOUT)).unwrap();
    // One write: vhost-device-vsock 0.3.0 drops a connection whose line arrives in pieces
    // (it reads it with a single non-blocking read_until), and `writeln!` would write the
    // formatted pieces separately.
    s.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    // Byte by byte: anything after the newline belongs to the stream.
    while line.len() < 64 {
        match s.read(&mut b) {
            Ok(0) => break,
            Ok(_) if b[0] == b'\n' => break,
            Ok(_) => line.push(b[0]),
            Err(e) => panic!("reading the CONNECT reply: {e}"),
        }
    }
    (s, String::from_utf8_lossy(&line).into_owned())
}

/// Reads to EOF; returns the checksum.
pub fn read_to_eof(s: &mut UnixStream) -> Checksum {
    let mut sum = Checksum::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return sum,
            Ok(n) => sum.update(&buf[..n]),
            Err(e) => panic!("host read after {} bytes: {e}", sum.bytes()),
        }
    }
}

/// Writes `len` bytes of the pattern for `seed` in `chunk`-byte writes.
pub fn write_pattern(s: &mut UnixStream, seed: u64, len: usize, chunk: usize) -> Checksum {
    let mut gen = PatternStream::new(seed);
    let mut sum = Checksum::new();
    let mut buf = vec![0u8; chunk];
    let mut left = len;
    while left > 0 {
        let n = left.min(chunk);
        gen.fill(&mut buf[..n]);
        s.write_all(&buf[..n]).unwrap();
        sum.update(&buf[..n]);
        left -= n;
    }
    sum
}

/// Receives one seqpacket message (its full length even if larger than `max`).
pub fn recv_message(s: &UnixStream, max: usize) -> Vec<u8> {
    use nix::sys::socket::{recv, MsgFlags};
    let mut buf = vec![0u8; max];
    let n = recv(s.as_raw_fd(), &mut buf, MsgFlags::MSG_TRUNC).unwrap();
    assert!(n <= max, "message of {n} bytes exceeds {max}");
    buf.truncate(n);
    buf
}

/// What is queued for reading on `s` now, without consuming it.
pub fn peek_queued(s: &UnixStream) -> Vec<u8> {
    use nix::sys::socket::{recv, MsgFlags};
    let mut buf = vec![0u8; 16 << 20];
    let n = match recv(
        s.as_raw_fd(),
        &mut buf,
        MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT,
    ) {
        Ok(n) => n,
        Err(nix::errno::Errno::EAGAIN) => 0,
        Err(e) => panic!("peek: {e}"),
    };
    buf.truncate(n);
    buf
}

/// The test pattern.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    PatternStream::new(seed).take(len)
}

/// MB/s with MB = 10^6 bytes.
pub fn mbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64().max(1e-9) / 1e6
}

// ---- scenarios shared by the backend test files ------------------------------------------

use domsock_guest::uvirtio::{Cid, ConnKey, Port, SocketType, VsockAddr};

/// The host, port `port`.
pub fn host(port: u32) -> VsockAddr {
    VsockAddr::new(Cid::HOST, Port(port))
}

/// Sends `len` pattern bytes for `seed` in `chunk`-byte writes.
pub fn guest_send_pattern(
    g: &mut UserGuest,
    key: ConnKey,
    seed: u64,
    len: usize,
    chunk: usize,
) -> Checksum {
    let mut gen = PatternStream::new(seed);
    let mut sum = Checksum::new();
    let mut buf = vec![0u8; chunk];
    let mut left = len;
    while left > 0 {
        let n = left.min(chunk);
        gen.fill(&mut buf[..n]);
        g.write_all(key, &buf[..n], STEP_TIMEOUT)
            .unwrap_or_else(|e| panic!("write after {} bytes: {}", sum.bytes(), chain(&e)));
        sum.update(&buf[..n]);
        left -= n;
    }
    sum
}

/// Reads until EOF in reads of up to `chunk` bytes; returns the checksum.
pub fn guest_recv_to_eof(g: &mut UserGuest, key: ConnKey, chunk: usize) -> Checksum {
    let mut sum = Checksum::new();
    let mut buf = vec![0u8; chunk];
    loop {
        match g.recv_timeout(key, &mut buf, STEP_TIMEOUT) {
            Ok(0) => return sum,
            Ok(n) => sum.update(&buf[..n]),
            Err(e) => panic!("guest recv after {} bytes: {}", sum.bytes(), chain(&e)),
        }
    }
}

/// Polls the guest until `done` holds, at most `timeout`.
pub fn poll_until(
    g: &mut UserGuest,
    what: &str,
    timeout: Duration,
    mut done: impl FnMut(&mut UserGuest) -> bool,
) {
    let deadline = Instant::now() + timeout;
    while !done(g) {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        g.poll(Some(Duration::from_millis(5)))
            .unwrap_or_else(|e| panic!("poll while waiting for {what}: {}", chain(&e)));
    }
}

/// Polls the guest until `h` finished, then joins it.
pub fn join_polling<T>(g: &mut UserGuest, h: thread::JoinHandle<T>) -> T {
    let deadline = Instant::now() + STEP_TIMEOUT;
    while !h.is_finished() {
        assert!(Instant::now() < deadline, "host side did not finish");
        g.poll(Some(Duration::from_millis(5))).unwrap();
    }
    h.join().expect("host thread panicked")
}

/// Guest -> host stream of `len` bytes in `chunk`-byte writes to `<uds>_<port>`, checked
/// byte-exact by checksum; returns the time from connect to the host seeing EOF.
pub fn stream_to_host(
    g: &mut UserGuest,
    uds: &Path,
    port: u32,
    len: usize,
    chunk: usize,
) -> Duration {
    let listener = listen_stream(uds, port);
    let host_side = thread::spawn(move || read_to_eof(&mut accept(&listener)));
    let start = Instant::now();
    let key = g
        .connect_timeout(host(port), SocketType::Stream, STEP_TIMEOUT)
        .unwrap_or_else(|e| panic!("connect: {}", chain(&e)));
    let sent = guest_send_pattern(g, key, port.into(), len, chunk);
    g.close(key).unwrap();
    let got = join_polling(g, host_side);
    let elapsed = start.elapsed();
    assert_eq!(got.bytes(), len as u64, "host received a different length");
    assert_eq!(got.digest(), sent.digest(), "host received different bytes");
    elapsed
}

/// Host -> guest stream of `len` bytes in `chunk`-byte host writes via `CONNECT <port>`,
/// checked by checksum; the guest then answers with a short reply the host checks (over the
/// still open direction: needs half-close). Returns the time from `CONNECT` to the guest
/// seeing EOF.
pub fn stream_from_host(
    g: &mut UserGuest,
    uds: &Path,
    port: u32,
    len: usize,
    chunk: usize,
) -> Duration {
    stream_from_host_with(g, uds, port, len, chunk, true)
}

/// [`stream_from_host`], optionally without the reply (for backends without half-close).
pub fn stream_from_host_with(
    g: &mut UserGuest,
    uds: &Path,
    port: u32,
    len: usize,
    chunk: usize,
    reply: bool,
) -> Duration {
    g.listen(Port(port), SocketType::Stream).unwrap();
    let uds = uds.to_path_buf();
    let start = Instant::now();
    let host_side = thread::spawn(move || {
        let (mut s, line) = host_connect(&uds, port);
        assert_eq!(line, format!("OK {port}"));
        let sent = write_pattern(&mut s, 7, len, chunk);
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let reply = read_to_eof(&mut s);
        (sent, reply)
    });
    let key = g.accept_timeout(Port(port), STEP_TIMEOUT).unwrap();
    let got = guest_recv_to_eof(g, key, 64 * 1024);
    let elapsed = start.elapsed();
    let reply = if reply {
        guest_send_pattern(g, key, 8, 1000, 1000)
    } else {
        Checksum::new()
    };
    g.close(key).unwrap();
    let (sent, host_reply) = join_polling(g, host_side);
    g.unlisten(Port(port)).unwrap();
    assert_eq!(got.bytes(), len as u64, "guest received a different length");
    assert_eq!(
        got.digest(),
        sent.digest(),
        "guest received different bytes"
    );
    assert_eq!(
        host_reply.digest(),
        reply.digest(),
        "host got a different reply"
    );
    elapsed
}

/// Informal single-stream throughput at 64 B, 4 KiB and 64 KiB writes, both directions.
pub fn report_throughput(
    name: &str,
    g: &mut UserGuest,
    uds: &Path,
    first_port: u32,
    half_close: bool,
) {
    let mut port = first_port;
    for (chunk, len) in [(64, 4 << 20), (4096, 64 << 20), (64 * 1024, 64 << 20)] {
        let up = stream_to_host(g, uds, port, len, chunk);
        let down = stream_from_host_with(g, uds, port + 1, len, chunk, half_close);
        port += 2;
        eprintln!(
            "THROUGHPUT {name}: {chunk:>6} B writes, {:>3} MiB: guest->host {:>7.1} MB/s, host->guest {:>7.1} MB/s",
            len >> 20,
            mbps(len as u64, up),
            mbps(len as u64, down)
        );
    }
    let s = g.stats();
    eprintln!(
        "THROUGHPUT {name}: tx kicks {} (suppressed {}), rx kicks {} (suppressed {}), waits {}, calls {}, rx copied {}",
        s.tx_ring.kicks, s.tx_ring.kicks_suppressed, s.rx_ring.kicks, s.rx_ring.kicks_suppressed, s.waits, s.calls, s.rx_copied
    );
}
