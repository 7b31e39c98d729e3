//! Test support shared by every crate's tests (behind the `test-utils` feature): scratch
//! directories and a backend process runner.
//!
//! - [`TempDir`]: a directory with a short path (Unix socket paths are limited to 108
//!   bytes, so it lives in the system temp dir, not under `target/`), removed on drop.
//! - [`Process`]: a backend binary (domsockd or a peer such as vhost-device-vsock) run with
//!   its output in a log file, waited for until it is ready, and stopped by PID on drop
//!   (SIGTERM, then SIGKILL), so a failing test never leaves one behind.
//!
//! - [`CutProxy`]: a loopback TCP forwarder a test cuts (tunnel faults).
//! - [`skip`] / [`under_ci`]: a test whose part is missing (a peer binary, a guest kernel)
//!   fails under CI and says `SKIPPED` elsewhere, never a silent `ok`.
//!
//! What it does not do: drive a guest (the user-space driver in `domsock-guest` and the
//! ring driver in this crate's tests do), or know domsockd's command line (callers build
//! their arguments).

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::AtomicBool;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// How long a stopped process may take to exit after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(3);

/// A scratch directory, removed with its contents on drop.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Creates `$TMPDIR/ds-<pid>-<n>-<tag>` (empty; a stale one is replaced).
    pub fn new(tag: &str) -> io::Result<Self> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let mut name = format!("ds-{}-{n}", std::process::id());
        if !tag.is_empty() {
            name.push('-');
            name.push_str(tag);
        }
        let path = std::env::temp_dir().join(name);
        match std::fs::remove_dir_all(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        std::fs::create_dir_all(&path)?;
        Ok(Self { path })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A path inside the directory.
    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A running backend process with its output in a log file.
#[derive(Debug)]
pub struct Process {
    child: Child,
    log: PathBuf,
    binary: PathBuf,
}

impl Process {
    /// Runs `binary args` (`RUST_LOG=info` unless set) with stdout and stderr in `log`, and
    /// waits up to `timeout` until `ready()` holds.
    ///
    /// # Panics
    /// If it cannot start, exits, or is not ready in time (the log's end is in the message).
    pub fn start(
        binary: &Path,
        args: &[String],
        log: PathBuf,
        timeout: Duration,
        ready: impl Fn() -> bool,
    ) -> Self {
        let out = File::create(&log)
            .unwrap_or_else(|e| panic!("cannot create log {}: {e}", log.display()));
        let err = out.try_clone().expect("clone log fd");
        let mut cmd = Command::new(binary);
        cmd.args(args);
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info");
        }
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
        let mut p = Self {
            child,
            log,
            binary: binary.to_path_buf(),
        };
        let deadline = Instant::now() + timeout;
        while !ready() {
            if let Ok(Some(status)) = p.child.try_wait() {
                panic!(
                    "{} exited at startup with {status}\n{}",
                    p.binary.display(),
                    p.log_tail()
                );
            }
            assert!(
                Instant::now() < deadline,
                "{} not ready within {timeout:?}\n{}",
                p.binary.display(),
                p.log_tail()
            );
            thread::sleep(Duration::from_millis(5));
        }
        p
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The binary it runs.
    pub fn binary(&self) -> &Path {
        &self.binary
    }

    /// The log file.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Everything it logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last 30 lines of its log, headed by the file name.
    pub fn log_tail(&self) -> String {
        let text = self.log_text();
        let lines: Vec<&str> = text.lines().collect();
        format!(
            "--- {} ---\n{}",
            self.log.display(),
            lines[lines.len().saturating_sub(30)..].join("\n")
        )
    }

    /// True while the process is alive.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Sends `signal` to the process (by PID).
    pub fn signal(&self, signal: nix::sys::signal::Signal) -> nix::Result<()> {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), signal)
    }

    /// User + system CPU time it used so far (from `/proc/<pid>/stat`).
    pub fn cpu_time(&self) -> Duration {
        cpu_time_of(self.child.id())
    }

    /// Stops it: SIGTERM (domsockd logs its counters and removes its sockets), SIGKILL if it
    /// is still there after [`STOP_TIMEOUT`]. Idempotent.
    pub fn stop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.signal(nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + STOP_TIMEOUT;
            while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(10));
            }
            if let Ok(None) = self.child.try_wait() {
                let _ = self.child.kill();
            }
        }
        let _ = self.child.wait();
    }

    /// Waits for it to exit by itself (at most `timeout`); its status if it did.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.stop();
        if thread::panicking() {
            eprintln!("{}", self.log_tail());
        }
    }
}

/// True when running under CI (`CI` set to anything but empty, `0` or `false`, as CI sets
/// `CI=true`): there a test whose part is missing fails instead of skipping.
pub fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !matches!(v.trim(), "" | "0" | "false"))
}

/// Records that the current test (its thread name, as libtest sets it) is skipped because
/// of `why`; the caller then returns without doing the test's work. Stable Rust's harness
/// has no run-time skip (a test that returns early reports `ok`), so this writes
/// `SKIPPED: <binary>::<test>: <why>` to stderr (past libtest's capture) and appends the
/// same line to `summary` (the workspace's `target/test-skips.txt`, which
/// `scripts/test.sh` prints at the end).
///
/// # Panics
/// Under CI ([`under_ci`]): a missing part must fail the run there.
pub fn skip(why: &str, summary: &Path) {
    use std::io::Write;
    let test = thread::current()
        .name()
        .unwrap_or("<unnamed test>")
        .to_string();
    let binary = std::env::current_exe()
        .ok()
        .and_then(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
        .map(|s| {
            s.rsplit_once('-')
                .map_or(s.clone(), |(name, _hash)| name.to_string())
        })
        .unwrap_or_default();
    if under_ci() {
        panic!("{binary}::{test}: missing under CI (CI is set): {why}");
    }
    let line = format!("SKIPPED: {binary}::{test}: {why}\n");
    let _ = io::stderr().write_all(line.as_bytes());
    if let Some(dir) = summary.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(summary)
    {
        // One write of one short line: O_APPEND keeps concurrent tests' lines whole.
        let _ = f.write_all(line.as_bytes());
    }
}

/// A TCP forwarder a test can cut (all current connections) and take down (new
/// connections are closed at once).
#[derive(Debug)]
pub struct CutProxy {
    /// Where to connect instead of the target.
    pub addr: SocketAddr,
    up: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl CutProxy {
    /// Forwards connections on a loopback port to `target`.
    pub fn start(target: SocketAddr) -> Self {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        let addr = l.local_addr().unwrap();
        let up = Arc::new(AtomicBool::new(true));
        let stop = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let (u, st, cs) = (up.clone(), stop.clone(), conns.clone());
        let thread = thread::spawn(move || {
            while !st.load(Ordering::SeqCst) {
                let (c, _) = match l.accept() {
                    Ok(c) => c,
                    Err(_) => {
                        thread::sleep(Duration::from_millis(5));
                        continue;
                    }
                };
                if !u.load(Ordering::SeqCst) {
                    continue;
                }
                c.set_nonblocking(false).unwrap();
                let Ok(s) = TcpStream::connect(target) else {
                    continue;
                };
                let _ = c.set_nodelay(true);
                let _ = s.set_nodelay(true);
                let mut g = cs.lock().unwrap();
                g.push(c.try_clone().unwrap());
                g.push(s.try_clone().unwrap());
                for (mut from, mut to) in [(c.try_clone().unwrap(), s.try_clone().unwrap()), (s, c)]
                {
                    thread::spawn(move || {
                        let mut buf = vec![0u8; 256 << 10];
                        while let Ok(n) = from.read(&mut buf) {
                            if n == 0 || to.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                        let _ = to.shutdown(std::net::Shutdown::Both);
                        let _ = from.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        CutProxy {
            addr,
            up,
            stop,
            conns,
            thread: Some(thread),
        }
    }

    /// Shuts every connection made so far.
    pub fn cut(&self) {
        for s in self.conns.lock().unwrap().drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    /// `false`: new connections are closed at once.
    pub fn set_up(&self, up: bool) {
        self.up.store(up, Ordering::SeqCst);
    }
}

impl Drop for CutProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.cut();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// User + system CPU time process `pid` used so far (from `/proc/<pid>/stat`, 10 ms
/// resolution); zero when it cannot be read.
pub fn cpu_time_of(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let after_comm = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i)?.parse::<u64>().ok())
        .sum();
    // /proc reports clock ticks of USER_HZ, which is 100 on x86_64 whatever the kernel's HZ.
    const USER_HZ: u64 = 100;
    Duration::from_nanos(ticks * 1_000_000_000 / USER_HZ)
}
