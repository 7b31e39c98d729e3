//! Runs the vhost-user vsock backend process under test.
//!
//! CLI contract (shared by domsockd and vhost-device-vsock):
//! `<backend> --vm guest-cid=N,socket=PATH,uds-path=PATH [--vm ...]`; domsockd also takes
//! `--config FILE` ([`Backend::spawn_config`]). The backend listens on
//! each `socket` for QEMU; the spawn returns once every socket exists. Its output goes to a
//! log file. It is stopped by PID (SIGTERM, then SIGKILL) when the [`Backend`] is dropped.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::artifacts;

/// How long a backend may take to create its sockets.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a backend may take to exit after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(3);

/// One `--vm` of the backend.
#[derive(Debug, Clone)]
pub struct VmSpec {
    /// Guest CID the backend assigns.
    pub cid: u32,
    /// vhost-user socket QEMU connects to.
    pub socket: PathBuf,
    /// Hybrid-vsock host socket base path.
    pub uds: PathBuf,
}

impl VmSpec {
    /// Spec with sockets `<dir>/vhost<cid>.sock` and `<dir>/vm<cid>.vsock`.
    pub fn in_dir(dir: &Path, cid: u32) -> Self {
        Self {
            cid,
            socket: dir.join(format!("vhost{cid}.sock")),
            uds: dir.join(format!("vm{cid}.vsock")),
        }
    }

    /// The `--vm` value: `guest-cid=N,socket=PATH,uds-path=PATH`.
    pub fn arg(&self) -> String {
        format!(
            "guest-cid={},socket={},uds-path={}",
            self.cid,
            self.socket.display(),
            self.uds.display()
        )
    }
}

/// A running backend process.
#[derive(Debug)]
pub struct Backend {
    child: Child,
    log: PathBuf,
    binary: PathBuf,
}

impl Backend {
    /// Starts the backend binary from [`artifacts::backend_binary`] and waits for its sockets.
    ///
    /// # Panics
    /// If it cannot start, exits, or does not create its sockets in time.
    pub fn spawn(specs: &[VmSpec], log_dir: &Path) -> Backend {
        Self::spawn_binary(&artifacts::backend_binary(), specs, log_dir)
    }

    /// Like [`Backend::spawn`], with an explicit backend binary.
    ///
    /// # Panics
    /// If it cannot start, exits, or does not create its sockets in time.
    pub fn spawn_binary(binary: &Path, specs: &[VmSpec], log_dir: &Path) -> Backend {
        Self::spawn_binary_args(binary, &[], specs, log_dir)
    }

    /// Like [`Backend::spawn_binary`], with extra command-line arguments before the `--vm`s.
    ///
    /// # Panics
    /// If it cannot start, exits, or does not create its sockets in time.
    pub fn spawn_binary_args(
        binary: &Path,
        args: &[String],
        specs: &[VmSpec],
        log_dir: &Path,
    ) -> Backend {
        Self::spawn_binary_vm_fields(binary, args, specs, "", log_dir)
    }

    /// Like [`Backend::spawn_binary_args`], appending `more_fields` (e.g. `,groups=g`) to
    /// every `--vm` value.
    ///
    /// # Panics
    /// If it cannot start, exits, or does not create its sockets in time.
    pub fn spawn_binary_vm_fields(
        binary: &Path,
        args: &[String],
        specs: &[VmSpec],
        more_fields: &str,
        log_dir: &Path,
    ) -> Backend {
        let mut all = args.to_vec();
        for s in specs {
            all.push("--vm".to_owned());
            all.push(format!("{}{more_fields}", s.arg()));
        }
        Self::spawn_waiting(binary, &all, specs, log_dir)
    }

    /// Starts the backend from [`artifacts::backend_binary`] with `--config <config>` and
    /// `args`, and waits for the vhost-user sockets of `specs` (the VMs the file configures).
    ///
    /// # Panics
    /// If it cannot start, exits, or does not create its sockets in time.
    pub fn spawn_config(
        config: &Path,
        args: &[String],
        specs: &[VmSpec],
        log_dir: &Path,
    ) -> Backend {
        let mut all = vec!["--config".to_owned(), config.display().to_string()];
        all.extend_from_slice(args);
        Self::spawn_waiting(&artifacts::backend_binary(), &all, specs, log_dir)
    }

    /// Runs `binary args` with its output in `<log_dir>/backend.log` and waits until every
    /// socket of `specs` exists.
    fn spawn_waiting(binary: &Path, args: &[String], specs: &[VmSpec], log_dir: &Path) -> Backend {
        let binary = binary.to_path_buf();
        std::fs::create_dir_all(log_dir).expect("create log dir");
        let log = log_dir.join("backend.log");
        let out = File::create(&log).expect("create backend log");
        let err = out.try_clone().expect("clone log fd");
        let mut cmd = Command::new(&binary);
        cmd.args(args);
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info");
        }
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start backend {}: {e}", binary.display()));
        let mut backend = Backend { child, log, binary };

        let deadline = Instant::now() + STARTUP_TIMEOUT;
        while !specs.iter().all(|s| s.socket.exists()) {
            if let Ok(Some(status)) = backend.child.try_wait() {
                panic!(
                    "backend exited at startup with {status}:\n{}",
                    backend.log_tail()
                );
            }
            if Instant::now() > deadline {
                panic!(
                    "backend did not create its sockets within {STARTUP_TIMEOUT:?}:\n{}",
                    backend.log_tail()
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
        backend
    }

    /// The backend's process id (for signals such as SIGUSR1, which makes domsockd log its
    /// counters).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the backend logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Backend binary in use.
    pub fn binary(&self) -> &Path {
        &self.binary
    }

    /// True while the process is alive.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// User + system CPU time the backend used so far (from `/proc/<pid>/stat`).
    pub fn cpu_time(&self) -> Duration {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap_or_default();
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

    /// The end of the backend's log.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        format!(
            "--- {} ---\n{}",
            self.log.display(),
            lines[lines.len().saturating_sub(30)..].join("\n")
        )
    }
}

impl Drop for Backend {
    /// SIGTERM first (domsockd then logs its counters and removes its sockets), SIGKILL if it
    /// is still there after [`STOP_TIMEOUT`].
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + STOP_TIMEOUT;
            while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(10));
            }
            if let Ok(None) = self.child.try_wait() {
                let _ = self.child.kill();
            }
        }
        let _ = self.child.wait();
        if thread::panicking() {
            eprintln!("{}", self.log_tail());
        }
    }
}
