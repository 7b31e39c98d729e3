//! Several "hosts" on this machine for live-migration tests: each a network namespace with
//! its own view of a runtime directory, its own domsockd and its own QEMU.
//!
//! Layout (every name starts with `ds-h-<pid of the test>-`; nothing is created in the root
//! network namespace):
//! ```text
//!  ds-h-<pid>-br: bridge br0 ── p0 ┐        ┌ p1 ...
//!                                   veth      veth
//!  ds-h-<pid>-a:  eth0 10.231.77.1/24       ds-h-<pid>-b: eth0 10.231.77.2/24
//! ```
//! The veth pairs are created inside each host's namespace and their peers moved into the
//! bridge namespace. Unix sockets ignore network namespaces, so each host also gets its own
//! mount view: every process "on host X" runs as
//! `ip netns exec ds-h-<pid>-x unshare --mount --propagation private sh -c 'mount --bind
//! <root>/hosts/x <root>/run && mount -t tmpfs ds-hosts <root>/hosts && exec "$@"'`, so
//! on every host `<root>/run` is that host's own directory (the same path everywhere, as
//! `/run/domsock` would be on real machines: the source and destination QEMU get the same
//! `-chardev` path) and `<root>/hosts` is empty, so no host can name another's sockets.
//! Every `exec` keeps the PID, so a process started this way is stopped by its own PID.
//!
//! The test process itself stays in the root namespaces and plays the operator who can
//! reach every host: it sees host X's directory at `<root>/hosts/x` ([`Host::local`]), where
//! it reaches QMP sockets, the admin sockets and the hybrid-vsock sockets of X's domsockd.
//! A listener it binds there is, for X's domsockd, a host process on X.
//!
//! On start, namespaces `ds-h-<pid>-*` whose test process is gone are deleted; on drop,
//! this harness deletes its own. What it does not do: stop processes (their owners do, by
//! PID, before the namespaces go), or route between hosts beyond the one bridge.

use std::io;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use domsock_host::test_utils::Process;

use crate::artifacts::{self, Kernel};
use crate::backend::VmSpec;
use crate::tmp::TempDir;
use crate::vm::VmConfig;

/// Prefix of every network namespace this harness creates.
pub const NETNS_PREFIX: &str = "ds-h-";
/// The hosts' subnet: host i is `10.231.77.(i+1)/24`.
const SUBNET: [u8; 3] = [10, 231, 77];
/// How long a domsockd may take to create its sockets.
const BACKEND_STARTUP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// A set of hosts on one bridge.
#[derive(Debug)]
pub struct Hosts {
    bridge_netns: String,
    hosts: Vec<Host>,
    /// Holds `<root>`; removed last.
    _root: TempDir,
}

/// One host: a network namespace and a mount view of its runtime directory.
#[derive(Debug, Clone)]
pub struct Host {
    /// Short name (`a`, `b`, ...).
    pub name: String,
    /// Its network namespace.
    pub netns: String,
    /// Its address on the bridge.
    pub ip: Ipv4Addr,
    /// The directory, as the test process sees it (`<root>/hosts/<name>`).
    dir: PathBuf,
    /// The same directory as processes on the host see it (`<root>/run`).
    run: PathBuf,
    /// What the host's view hides (`<root>/hosts`).
    hidden: PathBuf,
}

fn ip(args: &[&str]) -> io::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// Deletes `ds-h-<pid>-*` namespaces whose process `<pid>` no longer exists.
fn delete_stale_namespaces() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(rest) = name.strip_prefix(NETNS_PREFIX) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = ip(&["netns", "del", name]);
        }
    }
}

impl Hosts {
    /// Creates the bridge namespace and one host per name (at most 200).
    ///
    /// # Errors
    /// When `ip` fails (e.g. not root); what was created is deleted again.
    pub fn new(names: &[&str]) -> io::Result<Hosts> {
        assert!(names.len() <= 200, "at most 200 hosts");
        delete_stale_namespaces();
        let root = TempDir::new("hosts")?;
        let pid = std::process::id();
        let bridge_netns = format!("{NETNS_PREFIX}{pid}-br");
        let hidden = root.path().join("hosts");
        let run = root.path().join("run");
        std::fs::create_dir_all(&run)?;
        let mut hosts = Hosts {
            bridge_netns: bridge_netns.clone(),
            hosts: Vec::new(),
            _root: root,
        };
        ip(&["netns", "add", &bridge_netns])?;
        let br = |args: &[&str]| {
            let mut a = vec!["-n", &bridge_netns];
            a.extend_from_slice(args);
            ip(&a)
        };
        br(&["link", "set", "lo", "up"])?;
        br(&["link", "add", "br0", "type", "bridge"])?;
        br(&["link", "set", "br0", "up"])?;
        for (i, name) in names.iter().enumerate() {
            assert!(
                !name.is_empty() && name.chars().all(|c| c.is_ascii_lowercase()),
                "host names are lowercase letters: {name:?}"
            );
            let netns = format!("{NETNS_PREFIX}{pid}-{name}");
            let octet = u8::try_from(i + 1).expect("at most 200 hosts");
            let host = Host {
                name: (*name).to_owned(),
                netns: netns.clone(),
                ip: Ipv4Addr::new(SUBNET[0], SUBNET[1], SUBNET[2], octet),
                dir: hidden.join(name),
                run: run.clone(),
                hidden: hidden.clone(),
            };
            std::fs::create_dir_all(&host.dir)?;
            ip(&["netns", "add", &netns])?;
            hosts.hosts.push(host.clone());
            let peer = format!("p{i}");
            let h = |args: &[&str]| {
                let mut a = vec!["-n", &netns];
                a.extend_from_slice(args);
                ip(&a)
            };
            h(&["link", "set", "lo", "up"])?;
            h(&["link", "add", "eth0", "type", "veth", "peer", "name", &peer])?;
            h(&["link", "set", &peer, "netns", &bridge_netns])?;
            br(&["link", "set", &peer, "master", "br0"])?;
            br(&["link", "set", &peer, "up"])?;
            h(&["addr", "add", &format!("{}/24", host.ip), "dev", "eth0"])?;
            h(&["link", "set", "eth0", "up"])?;
        }
        Ok(hosts)
    }

    /// The host called `name`.
    ///
    /// # Panics
    /// If there is none.
    pub fn host(&self, name: &str) -> &Host {
        self.hosts
            .iter()
            .find(|h| h.name == name)
            .unwrap_or_else(|| panic!("no host {name:?}"))
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for h in &self.hosts {
            let _ = ip(&["netns", "del", &h.netns]);
        }
        let _ = ip(&["netns", "del", &self.bridge_netns]);
    }
}

impl Host {
    /// The words that run a program on this host (its network namespace and mount view);
    /// the program and its arguments follow.
    pub fn wrapper(&self) -> Vec<String> {
        let script = format!(
            "mount --bind {dir} {run} && mount -t tmpfs ds-hosts {hidden} && exec \"$@\"",
            dir = self.dir.display(),
            run = self.run.display(),
            hidden = self.hidden.display(),
        );
        [
            "ip",
            "netns",
            "exec",
            &self.netns,
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            &script,
            &format!("ds-host-{}", self.name),
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect()
    }

    /// A command that runs `program` on this host.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let w = self.wrapper();
        let mut c = Command::new(&w[0]);
        c.args(&w[1..]).arg(program);
        c
    }

    /// Runs `sh -c script` on this host and returns its output.
    ///
    /// # Errors
    /// If it cannot be started.
    pub fn sh(&self, script: &str) -> io::Result<Output> {
        self.command("sh")
            .args(["-c", script])
            .stdin(Stdio::null())
            .output()
    }

    /// `name` in the host's runtime directory, as processes on the host see it.
    pub fn run_path(&self, name: &str) -> PathBuf {
        self.run.join(name)
    }

    /// `name` in the host's runtime directory, as the test process sees it.
    pub fn local(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The `--vm` spec of guest `cid` as the host sees it (`vhost<cid>.sock`, `vm<cid>.vsock`
    /// in its runtime directory).
    pub fn spec(&self, cid: u32) -> VmSpec {
        VmSpec::in_dir(&self.run, cid)
    }

    /// The same spec, as the test process sees it.
    pub fn local_spec(&self, cid: u32) -> VmSpec {
        VmSpec::in_dir(&self.dir, cid)
    }

    /// Starts domsockd on this host for guest `cid` (`args` before the `--vm`); output in
    /// `<log_dir>/domsockd-<host>.log`; returns once its vhost-user socket exists.
    ///
    /// # Panics
    /// If it cannot start or does not create its socket in time.
    pub fn spawn_domsockd(&self, cid: u32, args: &[String], log_dir: &Path) -> Process {
        std::fs::create_dir_all(log_dir).expect("create log dir");
        let mut all: Vec<String> = self.wrapper()[1..].to_vec();
        all.push(artifacts::backend_binary().display().to_string());
        all.extend_from_slice(args);
        all.push("--vm".into());
        all.push(self.spec(cid).arg());
        let ready = self.local_spec(cid).socket;
        Process::start(
            Path::new(&self.wrapper()[0]),
            &all,
            log_dir.join(format!("domsockd-{}.log", self.name)),
            BACKEND_STARTUP_TIMEOUT,
            || ready.exists(),
        )
    }

    /// A guest `name` on this host: QEMU on this host, its chardev on this host's domsockd
    /// socket for `cid`, its QMP socket `<name>.qmp` in the runtime directory.
    pub fn vm_config(&self, name: &str, kernel: &Kernel, cid: u32, log_dir: &Path) -> VmConfig {
        let qmp = format!("{name}.qmp");
        VmConfig::new(name, kernel, &self.spec(cid).socket, log_dir)
            .wrapped(&self.wrapper())
            .qmp_socket(&self.run_path(&qmp), &self.local(&qmp))
    }

    /// A migration target for a guest of `cid`: as [`Host::vm_config`], but without the vsock
    /// device (only its chardev) and with `-incoming tcp:<ip>:<port>`.
    pub fn incoming_vm_config(
        &self,
        name: &str,
        kernel: &Kernel,
        cid: u32,
        port: u16,
        log_dir: &Path,
    ) -> VmConfig {
        self.vm_config(name, kernel, cid, log_dir)
            .without_vsock_device()
            .incoming(&self.incoming_uri(port))
    }

    /// `tcp:<ip>:<port>`.
    pub fn incoming_uri(&self, port: u16) -> String {
        format!("tcp:{}:{port}", self.ip)
    }
}
