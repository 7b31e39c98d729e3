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
//! A host's domsockd is started either with one `--vm` ([`Host::spawn_domsockd`]) or from
//! a config file ([`Hosts::spawn_domsockd_config`] with a [`DaemonConfig`]): several VMs,
//! the admin socket, a policy, and a `[tunnel]` to every other host (certificates from
//! `domsock-certs`, generated once per [`Hosts`] by [`Hosts::tunnel_certs`]; each host's
//! directory gets only its own key).
//!
//! On start, namespaces `ds-h-<pid>-*` whose test process is gone are deleted; on drop,
//! this harness deletes its own. What it does not do: stop processes (their owners do, by
//! PID, before the namespaces go), or route between hosts beyond the one bridge.

use std::io::{self, BufRead, BufReader, Write};
use std::net::Ipv4Addr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use domsock_host::test_utils::Process;

use serde_json::Value;

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
/// The admin socket in each host's runtime directory.
pub const ADMIN_SOCKET: &str = "admin.sock";
/// Where each host's tunnel certificates are, in its runtime directory.
const TUNNEL_DIR: &str = "tunnel";
/// Bound on one admin request (connect, write, reply).
const ADMIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// Longest admin reply read.
const MAX_ADMIN_REPLY_BYTES: u64 = 1 << 20;

/// One `[[vm]]` of a host's domsockd config file.
#[derive(Debug, Clone)]
pub struct ConfiguredVm {
    /// Guest CID (its sockets are `vhost<cid>.sock`, `vm<cid>.vsock`, as [`Host::spec`]).
    pub cid: u32,
    /// Domain name.
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// vhost-device-vsock groups (members may connect to each other).
    pub groups: Vec<String>,
}

/// What a host's domsockd config file says: its VMs, the admin socket, the tunnel to every
/// other host, and any further tables (e.g. `[policy]`) verbatim.
#[derive(Debug, Clone, Default)]
pub struct DaemonConfig {
    /// The VMs.
    pub vms: Vec<ConfiguredVm>,
    /// `admin-socket` at [`ADMIN_SOCKET`] in the runtime directory.
    pub admin: bool,
    /// `[tunnel]` listening on the host's bridge address at this port, every other host a
    /// peer (needs [`Hosts::tunnel_certs`]).
    pub tunnel_port: Option<u16>,
    /// TOML tables appended after the `[[vm]]`s.
    pub tables: String,
}

/// A set of hosts on one bridge.
#[derive(Debug)]
pub struct Hosts {
    bridge_netns: String,
    hosts: Vec<Host>,
    /// Holds `<root>`; removed last.
    root: TempDir,
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
            root,
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

    /// Certificates for the tunnel between these hosts (`domsock-certs --hosts a,b,...`,
    /// next to the backend binary): each host's directory gets the CA certificate and its
    /// own certificate and key. Idempotent.
    ///
    /// # Errors
    /// When the tool fails or a file cannot be copied.
    pub fn tunnel_certs(&self) -> io::Result<()> {
        let pki = self.pki_dir();
        if pki.join("ca.pem").exists() {
            return Ok(());
        }
        let tool = artifacts::workspace_root().join("target/release/domsock-certs");
        let names: Vec<&str> = self.hosts.iter().map(|h| h.name.as_str()).collect();
        let out = Command::new(&tool)
            .arg("--out")
            .arg(&pki)
            .args(["--hosts", &names.join(",")])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| io::Error::other(format!("{}: {e}", tool.display())))?;
        if !out.status.success() {
            return Err(io::Error::other(format!(
                "domsock-certs: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        for h in &self.hosts {
            let dir = h.dir.join(TUNNEL_DIR);
            std::fs::create_dir_all(&dir)?;
            std::fs::copy(pki.join("ca.pem"), dir.join("ca.pem"))?;
            for ext in ["pem", "key"] {
                let file = format!("{}.{ext}", h.name);
                std::fs::copy(pki.join(&file), dir.join(&file))?;
            }
        }
        Ok(())
    }

    /// The directory of the test CA and every host's certificate and key (made by
    /// [`Hosts::tunnel_certs`]), as every process sees it (not under a host's view).
    pub fn pki_dir(&self) -> PathBuf {
        self.root.path().join("pki")
    }

    /// The `[tunnel]` table of host `name`: it listens on its bridge address at `port`;
    /// every other host is a peer at the same port, dialled by the host whose name sorts
    /// first (the other one's address is `""`).
    pub fn tunnel_toml(&self, name: &str, port: u16) -> String {
        let me = self.host(name);
        let tls = me.run.join(TUNNEL_DIR);
        let mut t = format!(
            "[tunnel]\nhost = \"{name}\"\nlisten = \"{ip}:{port}\"\ncert = \"{tls}/{name}.pem\"\n\
             key = \"{tls}/{name}.key\"\nca = \"{tls}/ca.pem\"\n[tunnel.peers]\n",
            ip = me.ip,
            tls = tls.display(),
        );
        for p in self.hosts.iter().filter(|h| h.name != name) {
            let addr = if me.name < p.name {
                format!("{}:{port}", p.ip)
            } else {
                String::new()
            };
            t.push_str(&format!("{} = \"{addr}\"\n", p.name));
        }
        t
    }

    /// The config file of host `name`'s domsockd for `cfg`, paths as the host sees them.
    pub fn domsockd_toml(&self, name: &str, cfg: &DaemonConfig) -> String {
        let h = self.host(name);
        let mut t = String::new();
        if cfg.admin {
            t.push_str(&format!(
                "admin-socket = \"{}\"\n",
                h.run_path(ADMIN_SOCKET).display()
            ));
        }
        for vm in &cfg.vms {
            let spec = h.spec(vm.cid);
            let groups: Vec<String> = vm.groups.iter().map(|g| format!("{g:?}")).collect();
            t.push_str(&format!(
                "\n[[vm]]\nguest-cid = {}\nsocket = \"{}\"\nuds-path = \"{}\"\nname = {:?}\n\
                 namespace = {:?}\ngroups = [{}]\n",
                vm.cid,
                spec.socket.display(),
                spec.uds.display(),
                vm.name,
                vm.namespace,
                groups.join(", "),
            ));
        }
        if !cfg.tables.is_empty() {
            t.push('\n');
            t.push_str(&cfg.tables);
            if !cfg.tables.ends_with('\n') {
                t.push('\n');
            }
        }
        if let Some(port) = cfg.tunnel_port {
            t.push('\n');
            t.push_str(&self.tunnel_toml(name, port));
        }
        t
    }

    /// Starts host `name`'s domsockd from a config file for `cfg` (written to
    /// `<log_dir>/domsockd-<host>.toml` and to the host's runtime directory, which is what
    /// the daemon reads); output in `<log_dir>/domsockd-<host>.log`; returns once every
    /// VM's vhost-user socket (and the admin socket, if configured) exists.
    ///
    /// # Panics
    /// If it cannot start or does not create its sockets in time.
    pub fn spawn_domsockd_config(&self, name: &str, cfg: &DaemonConfig, log_dir: &Path) -> Process {
        let h = self.host(name);
        std::fs::create_dir_all(log_dir).expect("create log dir");
        if cfg.tunnel_port.is_some() {
            self.tunnel_certs().expect("tunnel certificates");
        }
        let toml = self.domsockd_toml(name, cfg);
        std::fs::write(log_dir.join(format!("domsockd-{name}.toml")), &toml)
            .expect("write config copy");
        std::fs::write(h.local("domsockd.toml"), &toml).expect("write config");
        let mut all: Vec<String> = h.wrapper()[1..].to_vec();
        all.push(artifacts::backend_binary().display().to_string());
        all.push("--config".into());
        all.push(h.run_path("domsockd.toml").display().to_string());
        let mut ready: Vec<PathBuf> = cfg.vms.iter().map(|v| h.local_spec(v.cid).socket).collect();
        if cfg.admin {
            ready.push(h.local(ADMIN_SOCKET));
        }
        Process::start(
            Path::new(&h.wrapper()[0]),
            &all,
            log_dir.join(format!("domsockd-{name}.log")),
            BACKEND_STARTUP_TIMEOUT,
            || ready.iter().all(|p| p.exists()),
        )
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

    /// The admin socket of this host's domsockd, as the test process sees it.
    pub fn admin_path(&self) -> PathBuf {
        self.local(ADMIN_SOCKET)
    }

    /// One admin request (`{"v":1,"op":OP}` plus `fields`) to this host's domsockd; the
    /// reply as it came, whether `ok` or not.
    ///
    /// # Errors
    /// When the socket cannot be reached, or the reply is not one JSON line in time.
    pub fn admin(&self, op: &str, fields: Value) -> io::Result<Value> {
        let mut req = match fields {
            Value::Object(m) => Value::Object(m),
            _ => Value::Object(serde_json::Map::new()),
        };
        req["v"] = Value::from(1);
        req["op"] = Value::from(op);
        let mut s = UnixStream::connect(self.admin_path())?;
        s.set_read_timeout(Some(ADMIN_TIMEOUT))?;
        s.set_write_timeout(Some(ADMIN_TIMEOUT))?;
        s.write_all(format!("{req}\n").as_bytes())?;
        let mut line = Vec::new();
        BufReader::new(io::Read::take(s, MAX_ADMIN_REPLY_BYTES)).read_until(b'\n', &mut line)?;
        serde_json::from_slice(&line).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }

    /// The `tunnel` object of this host's domsockd `status`.
    ///
    /// # Errors
    /// As [`Host::admin`], or when the reply has no `tunnel`.
    pub fn tunnel_status(&self) -> io::Result<Value> {
        let r = self.admin("status", Value::Null)?;
        match r.get("tunnel") {
            Some(t) if r["ok"] == true => Ok(t.clone()),
            _ => Err(io::Error::other(format!("status without a tunnel: {r}"))),
        }
    }
}
