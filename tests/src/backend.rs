//! Runs the vhost-user vsock backend process under test.
//!
//! CLI contract (shared by domsockd and vhost-device-vsock):
//! `<backend> --vm guest-cid=N,socket=PATH,uds-path=PATH [--vm ...]`; domsockd also takes
//! `--config FILE` ([`Backend::spawn_config`]). The backend listens on
//! each `socket` for QEMU; the spawn returns once every socket exists. Its output goes to a
//! log file. It is stopped by PID (SIGTERM, then SIGKILL) when the [`Backend`] is dropped
//! (the shared runner `domsock_host::test_utils::Process` does the process handling).

use domsock_host::test_utils::Process;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::artifacts;

/// How long a backend may take to create its sockets.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(10);

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
    process: Process,
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
        std::fs::create_dir_all(log_dir).expect("create log dir");
        let sockets: Vec<PathBuf> = specs.iter().map(|s| s.socket.clone()).collect();
        let process = Process::start(
            binary,
            args,
            log_dir.join("backend.log"),
            STARTUP_TIMEOUT,
            || sockets.iter().all(|s| s.exists()),
        );
        Backend { process }
    }

    /// The backend's process id (for signals such as SIGUSR1, which makes domsockd log its
    /// counters).
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// Everything the backend logged so far.
    pub fn log_text(&self) -> String {
        self.process.log_text()
    }

    /// Backend binary in use.
    pub fn binary(&self) -> &Path {
        self.process.binary()
    }

    /// True while the process is alive.
    pub fn is_running(&mut self) -> bool {
        self.process.is_running()
    }

    /// User + system CPU time the backend used so far (from `/proc/<pid>/stat`).
    pub fn cpu_time(&self) -> Duration {
        self.process.cpu_time()
    }

    /// The end of the backend's log.
    pub fn log_tail(&self) -> String {
        self.process.log_tail()
    }
}
