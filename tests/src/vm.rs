//! Boots QEMU guests with a `vhost-user-vsock-pci` device and follows their serial console.
//!
//! The guest's `/init` (tests/vm/init.sh) runs the `domsock` commands given here as kernel
//! parameters `ds_cmd<N>` (words joined by `~`) and then powers off, reboots or holds. The
//! QEMU flags are those measured in VM-RECIPE.md: TCG, memfd-backed shared memory (vhost-user
//! needs it), serial console on stdout. The vsock device has the id [`VSOCK_DEVICE_ID`] and
//! every VM a QMP socket ([`Vm::qmp`]) for hot-unplug and hot-plug. A [`Vm`] kills its QEMU
//! process (by PID) when dropped and, if the test is failing, prints the end of the console.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use crate::artifacts::{self, Kernel};
use crate::qmp::{Qmp, QmpError};
use crate::serial::{Console, DsLine, WaitEnd};

/// Guest RAM; also the size of the shared memfd backend.
const GUEST_MEM_MIB: u32 = 512;
/// Kernel parameters reach /init as at most 32 environment variables, shared with a few of
/// the kernel's own; /init reads at most this many commands.
const MAX_GUEST_CMDS: usize = 20;
/// Lines of console shown when a test fails.
const TAIL_LINES: usize = 40;
/// QEMU id of the vhost-user chardev the vsock device uses.
pub const VHOST_CHARDEV_ID: &str = "vhu0";
/// QEMU id of the vsock device (QMP `device_del` names it).
pub const VSOCK_DEVICE_ID: &str = "vsock0";

/// `device_add` arguments that plug the vsock device back as it was at boot.
pub fn vsock_device_args() -> Value {
    json!({
        "driver": "vhost-user-vsock-pci",
        "chardev": VHOST_CHARDEV_ID,
        "id": VSOCK_DEVICE_ID,
    })
}

/// Serialises VM tests inside one test binary: every guest wants a whole CPU under TCG, and
/// parallel guests would distort timings and risk timeouts. Each case holds this for its run.
pub fn exclusive() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// What the guest does after its commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum After {
    /// `poweroff -f`: QEMU exits.
    PowerOff,
    /// `reboot -f`: the guest boots again and runs the same commands (QEMU runs without
    /// `-no-reboot`), until the test kills QEMU.
    Reboot,
    /// Keep running until the test kills QEMU.
    Hold,
}

/// How to boot one guest.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// Name used in logs.
    pub name: String,
    /// Kernel and initramfs.
    pub kernel: Kernel,
    /// The backend's vhost-user socket for this guest.
    pub vhost_socket: PathBuf,
    /// Guest program invocations, each a list of words (`bg` first runs it in the background).
    pub cmds: Vec<Vec<String>>,
    /// What to do afterwards.
    pub after: After,
    /// Directory for the console and QEMU logs.
    pub log_dir: PathBuf,
    /// More QEMU arguments (e.g. a network device), after the standard ones.
    pub qemu_args: Vec<String>,
    /// More kernel parameters (`name=value`, handed to /init as environment variables).
    pub kernel_params: Vec<String>,
    /// Program and arguments QEMU runs under (e.g. [`crate::hosts::Host::wrapper`]); empty:
    /// none.
    pub wrapper: Vec<String>,
    /// Boot with the vsock device plugged; without it only the chardev is there (a live
    /// migration target, which gets the device by `device_add` after the migration).
    pub vsock_device: bool,
    /// `-incoming <uri>`: the guest's state arrives by live migration.
    pub incoming: Option<String>,
    /// The QMP socket as QEMU sees it and as the test sees it (they differ when QEMU runs
    /// in another mount view); default: `<name>.qmp` next to the vhost-user socket.
    pub qmp_paths: Option<(PathBuf, PathBuf)>,
    /// The memfd memory backend with `share=on` (vhost-user needs it; `false` gives a guest
    /// whose vsock device initialises but never moves a packet).
    pub shared_memory: bool,
}

impl VmConfig {
    /// A guest that powers off after its commands.
    pub fn new(name: &str, kernel: &Kernel, vhost_socket: &Path, log_dir: &Path) -> Self {
        Self {
            name: name.to_owned(),
            kernel: kernel.clone(),
            vhost_socket: vhost_socket.to_path_buf(),
            cmds: Vec::new(),
            after: After::PowerOff,
            log_dir: log_dir.to_path_buf(),
            qemu_args: Vec::new(),
            kernel_params: Vec::new(),
            wrapper: Vec::new(),
            vsock_device: true,
            incoming: None,
            qmp_paths: None,
            shared_memory: true,
        }
    }

    /// Guest memory not shared with the backend (`share=off`): a broken vsock device.
    pub fn unshared_memory(mut self) -> Self {
        self.shared_memory = false;
        self
    }

    /// Runs QEMU under `wrapper` (program and arguments before QEMU's own path).
    pub fn wrapped(mut self, wrapper: &[String]) -> Self {
        self.wrapper = wrapper.to_vec();
        self
    }

    /// Boots without the vsock device (the chardev stays).
    pub fn without_vsock_device(mut self) -> Self {
        self.vsock_device = false;
        self
    }

    /// Waits for the guest's state on `-incoming <uri>`.
    pub fn incoming(mut self, uri: &str) -> Self {
        self.incoming = Some(uri.to_owned());
        self
    }

    /// The QMP socket at `qemu_view` for QEMU, reached by the test at `test_view`.
    pub fn qmp_socket(mut self, qemu_view: &Path, test_view: &Path) -> Self {
        self.qmp_paths = Some((qemu_view.to_path_buf(), test_view.to_path_buf()));
        self
    }

    /// Adds QEMU arguments.
    pub fn qemu_args<S: AsRef<str>>(mut self, args: &[S]) -> Self {
        self.qemu_args
            .extend(args.iter().map(|a| a.as_ref().to_owned()));
        self
    }

    /// Adds a kernel parameter `name=value` (/init sees it as an environment variable).
    pub fn kernel_param(mut self, name: &str, value: &str) -> Self {
        self.kernel_params.push(format!("{name}={value}"));
        self
    }

    /// Adds a guest program invocation, words separated by spaces
    /// (`"send --cid 2 --port 5000 --bytes 1M"`).
    pub fn cmd(mut self, line: &str) -> Self {
        self.cmds
            .push(line.split_whitespace().map(str::to_owned).collect());
        self
    }

    /// Sets what happens after the commands.
    pub fn after(mut self, after: After) -> Self {
        self.after = after;
        self
    }

    fn kernel_cmdline(&self) -> String {
        assert!(
            self.cmds.len() <= MAX_GUEST_CMDS,
            "at most {MAX_GUEST_CMDS} guest commands"
        );
        // `DOMSOCK_LOG` reaches the guest program as an environment variable (through
        // /init): every session's resume attempts go to the serial log.
        let mut line = String::from("console=ttyS0 quiet panic=-1 DOMSOCK_LOG=info");
        line.push_str(match self.after {
            After::PowerOff => " ds_after=poweroff",
            After::Reboot => " ds_after=reboot",
            After::Hold => " ds_after=hold",
        });
        for p in &self.kernel_params {
            assert!(
                !p.contains(['"', '\'']) && !p.contains(char::is_whitespace),
                "kernel parameter {p:?} cannot be passed on the kernel command line"
            );
            line.push(' ');
            line.push_str(p);
        }
        // Diagnosis only: extra kernel parameters for every guest, e.g.
        // `DOMSOCK_VM_KERNEL_ARGS="loglevel=7"` to see the kernel's own lines (the serial
        // log stamps each line with the host's time).
        if let Ok(extra) = std::env::var("DOMSOCK_VM_KERNEL_ARGS") {
            for p in extra.split_whitespace() {
                line.push(' ');
                line.push_str(p);
            }
        }
        for (i, words) in self.cmds.iter().enumerate() {
            for w in words {
                assert!(
                    !w.is_empty()
                        && !w.contains(['~', '"', '\''])
                        && !w.contains(char::is_whitespace),
                    "guest command word {w:?} cannot be passed on the kernel command line"
                );
            }
            line.push_str(&format!(" ds_cmd{i}={}", words.join("~")));
        }
        line
    }
}

/// A running QEMU guest.
#[derive(Debug)]
pub struct Vm {
    name: String,
    child: Child,
    console: Arc<Console>,
    /// Index of the first console line later waits look at; advanced past every match.
    cursor: Mutex<usize>,
    started: Instant,
    reader: Option<JoinHandle<()>>,
    serial_log: PathBuf,
    qmp_socket: PathBuf,
}

impl Vm {
    /// Starts QEMU. Does not wait for the guest to boot.
    ///
    /// # Panics
    /// If QEMU cannot be started.
    pub fn boot(cfg: &VmConfig) -> Vm {
        std::fs::create_dir_all(&cfg.log_dir).expect("create log dir");
        let serial_log = cfg.log_dir.join(format!("{}.serial.log", cfg.name));
        let qemu_log = cfg.log_dir.join(format!("{}.qemu.log", cfg.name));
        // Next to the vhost-user socket: a short path (Unix socket paths are limited).
        let (qemu_qmp, qmp_socket) = cfg.qmp_paths.clone().unwrap_or_else(|| {
            let p = cfg.vhost_socket.with_file_name(format!("{}.qmp", cfg.name));
            (p.clone(), p)
        });
        let _ = std::fs::remove_file(&qmp_socket);
        let mem = format!("{GUEST_MEM_MIB}M");
        let mut cmd = match cfg.wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(artifacts::qemu_binary());
                c
            }
            None => Command::new(artifacts::qemu_binary()),
        };
        cmd.args([
            "-accel",
            &artifacts::accel(),
            "-cpu",
            &artifacts::qemu_cpu(),
        ])
        .args([
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-serial",
            "stdio",
        ])
        .args(["-m", &mem, "-smp", "1"])
        .args([
            "-object",
            &format!(
                "memory-backend-memfd,id=mem,size={mem},share={}",
                if cfg.shared_memory { "on" } else { "off" }
            ),
        ])
        .args(["-machine", "pc,memory-backend=mem"])
        .args([
            "-chardev",
            &format!(
                "socket,id={VHOST_CHARDEV_ID},path={}",
                cfg.vhost_socket.display()
            ),
        ])
        .args([
            "-qmp",
            &format!("unix:{},server=on,wait=off", qemu_qmp.display()),
        ])
        .arg("-kernel")
        .arg(&cfg.kernel.vmlinuz)
        .arg("-initrd")
        .arg(&cfg.kernel.initramfs)
        .args(["-append", &cfg.kernel_cmdline()])
        .args(&cfg.qemu_args);
        if cfg.vsock_device {
            cmd.args([
                "-device",
                &format!("vhost-user-vsock-pci,chardev={VHOST_CHARDEV_ID},id={VSOCK_DEVICE_ID}"),
            ]);
        }
        if let Some(uri) = &cfg.incoming {
            cmd.args(["-incoming", uri]);
        }
        if cfg.after != After::Reboot {
            cmd.arg("-no-reboot");
        }
        let qemu_err = File::create(&qemu_log).expect("create QEMU log");
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(qemu_err);
        let started = Instant::now();
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start QEMU {:?}: {e}", cmd.get_program()));

        let console = Arc::new(Console::default());
        let stdout = child.stdout.take().expect("piped stdout");
        let echo = std::env::var_os("DOMSOCK_VM_ECHO").is_some();
        let (c, name, log_path) = (Arc::clone(&console), cfg.name.clone(), serial_log.clone());
        let reader = thread::spawn(move || {
            let mut log = File::create(&log_path).ok();
            let mut r = BufReader::new(stdout);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match r.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                let line = String::from_utf8_lossy(&buf)
                    .trim_end_matches(['\r', '\n'])
                    .to_owned();
                if let Some(f) = log.as_mut() {
                    // Host wall-clock time in ms, to line guest events up with the host's
                    // logs and migrate reports (`started_unix_ms`).
                    let now = SystemTime::now()
                        .duration_since(UNIX_EPOCH)
                        .unwrap_or_default();
                    let _ = writeln!(f, "[{:.1}] {line}", now.as_secs_f64() * 1000.0);
                }
                if echo {
                    eprintln!("[{name}] {line}");
                }
                c.push(line);
            }
            c.close();
        });
        Vm {
            name: cfg.name.clone(),
            child,
            console,
            cursor: Mutex::new(0),
            started,
            reader: Some(reader),
            serial_log,
            qmp_socket,
        }
    }

    /// A new QMP session with this VM's QEMU (capabilities negotiated), within `timeout`.
    pub fn qmp(&self, timeout: Duration) -> Result<Qmp, QmpError> {
        Qmp::connect(&self.qmp_socket, timeout)
    }

    /// The QMP socket, as the test process reaches it.
    pub fn qmp_path(&self) -> &Path {
        &self.qmp_socket
    }

    /// QEMU's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Time since QEMU was started.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    fn fail(&self, what: &str) -> ! {
        panic!(
            "VM {}: {what}\n--- last console lines ({}) ---\n{}\n---",
            self.name,
            self.serial_log.display(),
            self.console.tail(TAIL_LINES)
        )
    }

    /// Waits (from the cursor on) for a marker line accepted by `matches` and moves the cursor
    /// past it. A failure marker (`DS-ERROR`, or `DS-DONE` with a non-zero status) that comes
    /// first fails the test, unless `matches` accepts it.
    ///
    /// # Panics
    /// On timeout, console end, or a failure marker.
    pub fn wait(
        &self,
        what: &str,
        timeout: Duration,
        mut matches: impl FnMut(&DsLine) -> bool,
    ) -> DsLine {
        let mut cursor = self.cursor.lock().unwrap_or_else(|e| e.into_inner());
        let deadline = Instant::now() + timeout;
        let res = self
            .console
            .wait_match(*cursor, deadline, |line| match DsLine::parse(line) {
                Some(l) => matches(&l) || is_failure(&l),
                None => false,
            });
        match res {
            Ok((idx, line)) => {
                *cursor = idx + 1;
                drop(cursor);
                let l = DsLine::parse(&line).expect("matched lines parse");
                if !matches(&l) {
                    self.fail(&format!("guest failed while waiting for {what}: {}", l.raw));
                }
                l
            }
            Err(WaitEnd::Timeout) => {
                drop(cursor);
                self.fail(&format!("timed out after {timeout:?} waiting for {what}"))
            }
            Err(WaitEnd::Closed) => {
                drop(cursor);
                self.fail(&format!(
                    "console closed (QEMU exited) while waiting for {what}"
                ))
            }
        }
    }

    /// Waits (from the cursor on) for any console line accepted by `matches`, marker or not,
    /// and moves the cursor past it. A failure marker that comes first fails the test.
    ///
    /// # Panics
    /// On timeout, console end, or a failure marker.
    pub fn wait_text(
        &self,
        what: &str,
        timeout: Duration,
        mut matches: impl FnMut(&str) -> bool,
    ) -> String {
        let mut cursor = self.cursor.lock().unwrap_or_else(|e| e.into_inner());
        let deadline = Instant::now() + timeout;
        let res = self.console.wait_match(*cursor, deadline, |line| {
            matches(line) || DsLine::parse(line).is_some_and(|l| is_failure(&l))
        });
        match res {
            Ok((idx, line)) => {
                *cursor = idx + 1;
                drop(cursor);
                if !matches(&line) {
                    self.fail(&format!("guest failed while waiting for {what}: {line}"));
                }
                line
            }
            Err(WaitEnd::Timeout) => {
                drop(cursor);
                self.fail(&format!("timed out after {timeout:?} waiting for {what}"))
            }
            Err(WaitEnd::Closed) => {
                drop(cursor);
                self.fail(&format!(
                    "console closed (QEMU exited) while waiting for {what}"
                ))
            }
        }
    }

    /// Every console line so far (marker or not), from the first.
    pub fn console_lines(&self) -> Vec<String> {
        self.console.lines()
    }

    /// Waits for `DS-BOOT`.
    pub fn expect_boot(&self, timeout: Duration) -> DsLine {
        self.wait("DS-BOOT", timeout, |l| l.is("DS-BOOT", None))
    }

    /// Waits for the guest's CID report (printed by /init right after loading the modules).
    pub fn expect_cid(&self, timeout: Duration) -> u32 {
        let l = self.wait("DS-RESULT cmd=cid", timeout, |l| {
            l.is("DS-RESULT", Some("cid"))
        });
        u32::try_from(l.u64("cid")).expect("CID fits u32")
    }

    /// Waits for `DS-READY port=<port>`.
    pub fn expect_ready(&self, port: u32, timeout: Duration) -> DsLine {
        let p = port.to_string();
        self.wait(&format!("DS-READY port={port}"), timeout, |l| {
            l.is("DS-READY", None) && l.get("port") == Some(&p)
        })
    }

    /// Waits for `DS-RESULT cmd=<cmd>`.
    pub fn expect_result(&self, cmd: &str, timeout: Duration) -> DsLine {
        self.wait(&format!("DS-RESULT cmd={cmd}"), timeout, |l| {
            l.is("DS-RESULT", Some(cmd))
        })
    }

    /// Waits for `DS-DONE rc=0`.
    pub fn expect_done(&self, timeout: Duration) -> DsLine {
        self.wait("DS-DONE rc=0", timeout, |l| {
            l.is("DS-DONE", None) && l.get("rc") == Some("0")
        })
    }

    /// Waits for QEMU to exit by itself.
    ///
    /// # Panics
    /// If it is still running after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return status,
                Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
                Ok(None) => self.fail(&format!(
                    "QEMU still running {timeout:?} after the guest finished"
                )),
                Err(e) => self.fail(&format!("waiting for QEMU: {e}")),
            }
        }
    }

    /// Kills QEMU (SIGKILL to its PID) and reaps it.
    pub fn kill(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

fn is_failure(l: &DsLine) -> bool {
    l.kind == "DS-ERROR" || (l.kind == "DS-DONE" && l.get("rc") != Some("0"))
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.kill();
        if thread::panicking() {
            eprintln!(
                "--- VM {} console tail ({}) ---\n{}\n---",
                self.name,
                self.serial_log.display(),
                self.console.tail(TAIL_LINES)
            );
        }
    }
}
