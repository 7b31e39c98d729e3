//! Command line and config file: one path from either to a validated [`Config`].
//!
//! The command line is a drop-in for vhost-device-vsock's: `--vm guest-cid=N,socket=PATH,
//! uds-path=PATH` (repeatable), or the single-VM `--guest-cid/--socket/--uds-path`, or
//! `--config FILE` (TOML with the same fields). Our own fields (`name=`) extend the same
//! syntax. Unknown fields are errors, never silently ignored.

use crate::policy::{Domain, PolicyConfig, DEFAULT_NAMESPACE, HOST_KEYWORD};
use crate::router::ListenerConfig;
use crate::tunables::MAX_SESSION_PARK_TIMEOUT_MS;
use clap::Parser;
use domsock_proto::control::valid_name;
use domsock_proto::Cid;
use serde::Deserialize;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use thiserror::Error;

/// Command line of `domsockd`.
#[derive(Debug, Parser, Default, Clone)]
#[command(
    name = "domsockd",
    version,
    about = "vhost-user vsock backend for many VMs, with sibling (guest-to-guest) routing, \
             an access policy, names and namespaces"
)]
pub struct Args {
    /// One VM: `guest-cid=N,socket=PATH,uds-path=PATH[,name=NAME][,namespace=NS]
    /// [,groups=G1+G2]`. Repeat for several VMs served by this process. VMs sharing a
    /// group (in one namespace) may connect to each other on any port.
    #[arg(long = "vm", value_name = "FIELDS")]
    pub vm: Vec<String>,
    /// One host listener for every guest: `port=P,path=PATH[,namespace=NS]`. Guests
    /// connecting to host port P reach PATH (after a one-line peer preamble) when their
    /// VM has no `<uds>_<P>`. Repeatable.
    #[arg(long = "listen", value_name = "FIELDS")]
    pub listen: Vec<String>,
    /// Single-VM form: the guest's CID.
    #[arg(long, value_name = "CID")]
    pub guest_cid: Option<u64>,
    /// Single-VM form: the vhost-user socket QEMU connects to.
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Single-VM form: the host-side Unix socket prefix (`<uds>` and `<uds>_<port>`).
    #[arg(long, value_name = "PATH")]
    pub uds_path: Option<PathBuf>,
    /// TOML config file with a `[[vm]]` table per VM (same fields as `--vm`).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Virtqueue size offered to the frontend.
    #[arg(long, default_value_t = 1024)]
    pub queue_size: u16,
    /// After each event, keep polling a VM's TX ring and host sockets this many
    /// microseconds before sleeping: lower latency for more CPU (0: off).
    #[arg(long, value_name = "US", default_value_t = 0)]
    pub busy_poll_us: u64,
    /// How long a session whose guest lost its vsock device is kept parked (host end
    /// open, data buffered) before both ends are closed.
    #[arg(long, value_name = "MS", default_value_t = u64::from(domsock_migration::session::DEFAULT_PARK_TIMEOUT_MS))]
    pub session_park_timeout_ms: u64,
    /// Unix socket of the admin service (status, and the migration steps of
    /// `domsock migrate`): one JSON request per line, one JSON reply per line.
    #[arg(long, value_name = "PATH")]
    pub admin_socket: Option<PathBuf>,
    /// Directory of the bus sockets for host processes: `<DIR>/<namespace>.sock` for every
    /// namespace of the configured VMs (Unix `SOCK_SEQPACKET`; the files' permissions are
    /// who may join that namespace's buses).
    #[arg(long, value_name = "DIR")]
    pub bus_dir: Option<PathBuf>,
    /// Accept the admin service's fault-injection requests (`hold-joins`): for tests
    /// only, never in production (command line only, not a config-file key).
    #[arg(long)]
    pub fault_injection: bool,
}

/// One VM's settings.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct VmConfig {
    /// Guest CID (>= 3).
    pub guest_cid: u64,
    /// vhost-user socket path.
    pub socket: PathBuf,
    /// Host-side Unix socket prefix.
    pub uds_path: PathBuf,
    /// Domain name (defaults to `vm<cid>`), unique within its namespace.
    #[serde(default)]
    pub name: Option<String>,
    /// Namespace (tenant); defaults to `default`.
    #[serde(default)]
    pub namespace: Option<String>,
    /// vhost-device-vsock groups: VMs sharing one may connect to each other on any port.
    #[serde(default)]
    pub groups: Vec<String>,
}

impl VmConfig {
    /// The VM's name.
    pub fn display_name(&self) -> String {
        self.name
            .clone()
            .unwrap_or_else(|| format!("vm{}", self.guest_cid))
    }

    /// The VM's namespace.
    pub fn namespace(&self) -> String {
        self.namespace
            .clone()
            .unwrap_or_else(|| DEFAULT_NAMESPACE.to_string())
    }

    /// The VM as the policy sees it.
    pub fn domain(&self) -> Domain {
        Domain {
            cid: Cid(self.guest_cid),
            name: self.display_name(),
            namespace: self.namespace(),
            groups: self.groups.clone(),
        }
    }
}

/// Smallest `[tunnel] window-bytes`: a window must hold a few frames' worth.
pub const MIN_TUNNEL_WINDOW_BYTES: u64 = 4096;

/// The `[tunnel]` table: this host's end of the TLS tunnels to other domsockd hosts.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct TunnelSection {
    /// This host's name: the DNS name in its certificate, and how peers name it.
    pub host: String,
    /// Address to accept peers on (`IP:PORT`).
    pub listen: std::net::SocketAddr,
    /// PEM certificate chain of this host.
    pub cert: PathBuf,
    /// Its PEM private key.
    pub key: PathBuf,
    /// PEM CA certificate(s) peers' certificates must chain to.
    pub ca: PathBuf,
    /// Peer host names and their tunnel addresses (`""` for a peer that dials us: the
    /// host whose name sorts first dials).
    #[serde(default)]
    pub peers: std::collections::BTreeMap<String, String>,
    /// A tunnel down this long ends its channels (default 30 s).
    #[serde(default)]
    pub resume_timeout_ms: Option<u64>,
    /// Receive window of a channel when it opens (default 128 KiB).
    #[serde(default)]
    pub window_bytes: Option<u32>,
    /// Largest window autotuning grows a channel's to (default 4 MiB; equal to
    /// `window-bytes`: no autotuning).
    #[serde(default)]
    pub max_window_bytes: Option<u32>,
    /// Per peer: windows grow only while all channels' windows sum to at most this
    /// (default 64 MiB).
    #[serde(default)]
    pub window_budget_bytes: Option<u64>,
}

impl TunnelSection {
    /// The tunnel runtime's configuration.
    pub fn runtime_config(&self) -> Result<crate::tunnel::TunnelConfig, ConfigError> {
        let mut cfg = crate::tunnel::TunnelConfig::new(
            &self.host,
            self.listen,
            self.cert.clone(),
            self.key.clone(),
            self.ca.clone(),
        );
        for (name, addr) in &self.peers {
            let addr = if addr.is_empty() {
                None
            } else {
                Some(addr.parse().map_err(|_| ConfigError::BadTunnelPeer {
                    peer: name.clone(),
                    addr: addr.clone(),
                })?)
            };
            cfg.peers.insert(name.clone(), addr);
        }
        if let Some(ms) = self.resume_timeout_ms {
            cfg.resume_timeout = std::time::Duration::from_millis(ms);
        }
        cfg.buf_alloc_bytes = self.window_bytes.unwrap_or(cfg.buf_alloc_bytes);
        cfg.max_window_bytes = self.max_window_bytes.unwrap_or(cfg.max_window_bytes);
        cfg.window_budget_bytes = self.window_budget_bytes.unwrap_or(cfg.window_budget_bytes);
        let most = domsock_migration::tunnel::endpoint::MAX_WINDOW_BYTES;
        let window = |key, value: u64, min: u64, max: u64| {
            if (min..=max).contains(&value) {
                Ok(())
            } else {
                Err(ConfigError::BadTunnelWindow {
                    key,
                    value,
                    min,
                    max,
                })
            }
        };
        window(
            "window-bytes",
            cfg.buf_alloc_bytes.into(),
            MIN_TUNNEL_WINDOW_BYTES,
            most.into(),
        )?;
        window(
            "max-window-bytes",
            cfg.max_window_bytes.into(),
            cfg.buf_alloc_bytes.into(),
            most.into(),
        )?;
        window(
            "window-budget-bytes",
            cfg.window_budget_bytes,
            cfg.max_window_bytes.into(),
            u64::MAX,
        )?;
        Ok(cfg)
    }
}

/// The TOML file layout.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct FileConfig {
    #[serde(default)]
    queue_size: Option<u16>,
    #[serde(default)]
    busy_poll_us: Option<u64>,
    #[serde(default)]
    session_park_timeout_ms: Option<u64>,
    #[serde(default)]
    admin_socket: Option<PathBuf>,
    #[serde(default)]
    bus_dir: Option<PathBuf>,
    #[serde(default)]
    tunnel: Option<TunnelSection>,
    #[serde(default)]
    vm: Vec<VmConfig>,
    #[serde(default)]
    policy: Option<PolicyConfig>,
    #[serde(default)]
    listen: Vec<ListenerConfig>,
    #[serde(default)]
    bus: Vec<crate::policy::BusDecl>,
}

/// Validated daemon configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// VMs to serve.
    pub vms: Vec<VmConfig>,
    /// Virtqueue size.
    pub queue_size: u16,
    /// Busy-poll window after each event (zero: off).
    pub busy_poll: std::time::Duration,
    /// How long a parked session waits for its guest.
    pub session_park_timeout: std::time::Duration,
    /// The admin service's socket, if any.
    pub admin_socket: Option<PathBuf>,
    /// The directory of the host processes' bus sockets, if any.
    pub bus_dir: Option<PathBuf>,
    /// The tunnel to other hosts (`[tunnel]`), if configured.
    pub tunnel: Option<TunnelSection>,
    /// The access policy (`[policy]` of the config file; `groups=` add to it).
    pub policy: PolicyConfig,
    /// All-guests host listeners.
    pub listeners: Vec<ListenerConfig>,
}

/// Why a configuration was rejected.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// A `--vm` value has a field without `=`.
    #[error("--vm field {0:?} is not key=value")]
    NotKeyValue(String),
    /// Unknown field name.
    #[error(
        "unknown --vm field {0:?} (known: guest-cid, socket, uds-path, name, namespace, groups)"
    )]
    UnknownField(String),
    /// A field appears twice.
    #[error("--vm field {0:?} given twice")]
    DuplicateField(String),
    /// A required field is missing.
    #[error("VM {vm:?} lacks required field {field}")]
    MissingField {
        /// The offending `--vm` text.
        vm: String,
        /// Field name.
        field: &'static str,
    },
    /// The CID is not a number.
    #[error("guest-cid {0:?} is not a number")]
    BadCid(String),
    /// The CID is reserved.
    #[error("guest-cid {0} is reserved (guests use 3..=4294967294)")]
    ReservedCid(u64),
    /// Two VMs share a CID.
    #[error("guest-cid {0} is used by two VMs")]
    DuplicateCid(u64),
    /// Two VMs share a path.
    #[error("path {0} is used by two VMs")]
    DuplicatePath(PathBuf),
    /// Two VMs of one namespace share a name.
    #[error("name {0:?} is used by two VMs")]
    DuplicateName(String),
    /// A name or namespace outside `[A-Za-z0-9._-]{1,64}`, or the reserved `host`.
    #[error(
        "{what} {value:?} is not a valid name ([A-Za-z0-9._-], 1 to 64 characters, not `host`)"
    )]
    BadName {
        /// Which field.
        what: &'static str,
        /// Its value.
        value: String,
    },
    /// A `--listen` value is malformed.
    #[error("--listen {0:?}: expected port=P,path=PATH[,namespace=NS]")]
    BadListen(String),
    /// Two listeners for one port and namespace.
    #[error("two listeners for port {0} in the same namespace scope")]
    DuplicateListener(u32),
    /// A listener names a namespace no VM is in.
    #[error("listener for port {port} names namespace {namespace:?}, which no VM is in")]
    UnknownListenerNamespace {
        /// Port.
        port: u32,
        /// Namespace.
        namespace: String,
    },
    /// The policy does not compile against the VMs.
    #[error("invalid policy")]
    Policy(#[source] crate::policy::PolicyError),
    /// Single-VM flags mixed with `--vm`, or incomplete.
    #[error("use either --vm, --config, or all of --guest-cid/--socket/--uds-path")]
    MixedForms,
    /// No VM given.
    #[error("no VM configured (use --vm, --config or --guest-cid/--socket/--uds-path)")]
    NoVm,
    /// Busy polling longer than a millisecond per event is a misconfiguration.
    #[error("busy-poll-us {0} is above the limit of 1000")]
    BusyPollTooLong(u64),
    /// A `[tunnel.peers]` address does not parse.
    #[error("tunnel peer {peer:?}: {addr:?} is not IP:PORT")]
    BadTunnelPeer {
        /// The peer.
        peer: String,
        /// What was given.
        addr: String,
    },
    /// A `[tunnel]` window size outside its range.
    #[error("tunnel {key} = {value} is outside {min}..={max}")]
    BadTunnelWindow {
        /// The key.
        key: &'static str,
        /// What was given (or the default it was checked against).
        value: u64,
        /// Smallest allowed.
        min: u64,
        /// Largest allowed.
        max: u64,
    },
    /// The session park timeout is 0 or longer than a day.
    #[error("session park timeout {0} ms is outside 1..={MAX_SESSION_PARK_TIMEOUT_MS} ms")]
    BadParkTimeout(u64),
    /// Queue size must be a power of two in 1..=32768.
    #[error("queue size {0} must be a power of two up to 32768")]
    BadQueueSize(u16),
    /// The config file could not be read.
    #[error("cannot read config file {path}")]
    ReadFile {
        /// File.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The config file is not valid TOML for us.
    #[error("invalid config file {path}")]
    ParseFile {
        /// File.
        path: PathBuf,
        /// Cause.
        #[source]
        source: Box<toml::de::Error>,
    },
}

/// Parses one `--vm` value.
pub fn parse_vm_fields(text: &str) -> Result<VmConfig, ConfigError> {
    let mut cid = None;
    let mut socket = None;
    let mut uds = None;
    let mut name = None;
    let mut namespace = None;
    let mut groups = None;
    for field in text.split(',').filter(|f| !f.is_empty()) {
        let (k, v) = field
            .split_once('=')
            .ok_or_else(|| ConfigError::NotKeyValue(field.to_string()))?;
        let dup = || ConfigError::DuplicateField(k.to_string());
        match k {
            "guest-cid" | "guest_cid" => {
                let n: u64 = v.parse().map_err(|_| ConfigError::BadCid(v.to_string()))?;
                if cid.replace(n).is_some() {
                    return Err(dup());
                }
            }
            "socket" => {
                if socket.replace(PathBuf::from(v)).is_some() {
                    return Err(dup());
                }
            }
            "uds-path" | "uds_path" => {
                if uds.replace(PathBuf::from(v)).is_some() {
                    return Err(dup());
                }
            }
            "name" => {
                if name.replace(v.to_string()).is_some() {
                    return Err(dup());
                }
            }
            "namespace" => {
                if namespace.replace(v.to_string()).is_some() {
                    return Err(dup());
                }
            }
            "groups" => {
                let g: Vec<String> = v.split('+').map(str::to_string).collect();
                if groups.replace(g).is_some() {
                    return Err(dup());
                }
            }
            _ => return Err(ConfigError::UnknownField(k.to_string())),
        }
    }
    let missing = |field| ConfigError::MissingField {
        vm: text.to_string(),
        field,
    };
    Ok(VmConfig {
        guest_cid: cid.ok_or_else(|| missing("guest-cid"))?,
        socket: socket.ok_or_else(|| missing("socket"))?,
        uds_path: uds.ok_or_else(|| missing("uds-path"))?,
        name,
        namespace,
        groups: groups.unwrap_or_default(),
    })
}

/// Parses one `--listen` value.
pub fn parse_listen_fields(text: &str) -> Result<ListenerConfig, ConfigError> {
    let bad = || ConfigError::BadListen(text.to_string());
    let (mut port, mut path, mut namespace) = (None, None, None);
    for field in text.split(',').filter(|f| !f.is_empty()) {
        let (k, v) = field.split_once('=').ok_or_else(bad)?;
        let fresh = match k {
            "port" => port.replace(v.parse::<u32>().map_err(|_| bad())?).is_none(),
            "path" => path.replace(PathBuf::from(v)).is_none(),
            "namespace" => namespace.replace(v.to_string()).is_none(),
            _ => return Err(bad()),
        };
        if !fresh {
            return Err(bad());
        }
    }
    Ok(ListenerConfig {
        port: port.ok_or_else(bad)?,
        path: path.ok_or_else(bad)?,
        namespace,
    })
}

fn load_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile {
        path: path.to_path_buf(),
        source,
    })?;
    toml::from_str(&text).map_err(|source| ConfigError::ParseFile {
        path: path.to_path_buf(),
        source: Box::new(source),
    })
}

impl TryFrom<Args> for Config {
    type Error = ConfigError;

    fn try_from(args: Args) -> Result<Self, ConfigError> {
        let single = [
            args.guest_cid.is_some(),
            args.socket.is_some(),
            args.uds_path.is_some(),
        ];
        let mut queue_size = args.queue_size;
        let mut busy_poll_us = args.busy_poll_us;
        let mut park_ms = args.session_park_timeout_ms;
        let mut admin_socket = args.admin_socket.clone();
        let mut bus_dir = args.bus_dir.clone();
        let mut tunnel = None;
        let mut vms = Vec::new();
        if single.iter().any(|&b| b) {
            if !single.iter().all(|&b| b) || !args.vm.is_empty() {
                return Err(ConfigError::MixedForms);
            }
            vms.push(VmConfig {
                guest_cid: args.guest_cid.expect("checked"),
                socket: args.socket.expect("checked"),
                uds_path: args.uds_path.expect("checked"),
                name: None,
                namespace: None,
                groups: Vec::new(),
            });
        }
        for v in &args.vm {
            vms.push(parse_vm_fields(v)?);
        }
        let mut listeners = args
            .listen
            .iter()
            .map(|l| parse_listen_fields(l))
            .collect::<Result<Vec<_>, _>>()?;
        let mut policy = PolicyConfig::default();
        if let Some(path) = &args.config {
            let file = load_file(path)?;
            if let Some(q) = file.queue_size {
                queue_size = q;
            }
            if let Some(b) = file.busy_poll_us {
                busy_poll_us = b;
            }
            if let Some(p) = file.session_park_timeout_ms {
                park_ms = p;
            }
            if admin_socket.is_none() {
                admin_socket = file.admin_socket;
            }
            if bus_dir.is_none() {
                bus_dir = file.bus_dir;
            }
            tunnel = file.tunnel;
            vms.extend(file.vm);
            listeners.extend(file.listen);
            if let Some(p) = file.policy {
                policy = p;
            }
            policy.buses = file.bus;
        }
        let config = Config {
            vms,
            queue_size,
            busy_poll: std::time::Duration::from_micros(busy_poll_us),
            session_park_timeout: std::time::Duration::from_millis(park_ms),
            admin_socket,
            bus_dir,
            tunnel,
            policy,
            listeners,
        };
        config.validate()?;
        Ok(config)
    }
}

impl Config {
    /// Checks cross-field rules.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.vms.is_empty() {
            return Err(ConfigError::NoVm);
        }
        if self.busy_poll > std::time::Duration::from_micros(1000) {
            return Err(ConfigError::BusyPollTooLong(
                self.busy_poll.as_micros() as u64
            ));
        }
        if let Some(t) = &self.tunnel {
            t.runtime_config()?;
        }
        let park_ms = self.session_park_timeout.as_millis();
        if park_ms == 0 || park_ms > u128::from(MAX_SESSION_PARK_TIMEOUT_MS) {
            return Err(ConfigError::BadParkTimeout(park_ms as u64));
        }
        if !self.queue_size.is_power_of_two() || self.queue_size > 32768 {
            return Err(ConfigError::BadQueueSize(self.queue_size));
        }
        let mut cids = HashSet::new();
        let mut paths = HashSet::new();
        let mut names = HashSet::new();
        for vm in &self.vms {
            if !Cid(vm.guest_cid).is_guest() {
                return Err(ConfigError::ReservedCid(vm.guest_cid));
            }
            if !cids.insert(vm.guest_cid) {
                return Err(ConfigError::DuplicateCid(vm.guest_cid));
            }
            for p in [&vm.socket, &vm.uds_path] {
                if !paths.insert(p.clone()) {
                    return Err(ConfigError::DuplicatePath(p.clone()));
                }
            }
            let bad = |what, value: String| ConfigError::BadName { what, value };
            let (name, ns) = (vm.display_name(), vm.namespace());
            if !valid_name(&name) || name == HOST_KEYWORD {
                return Err(bad("name", name));
            }
            if !valid_name(&ns) {
                return Err(bad("namespace", ns));
            }
            if let Some(g) = vm.groups.iter().find(|g| !valid_name(g)) {
                return Err(bad("group", g.clone()));
            }
            if !names.insert((ns, name.clone())) {
                return Err(ConfigError::DuplicateName(name));
            }
        }
        let namespaces: HashSet<String> = self.vms.iter().map(VmConfig::namespace).collect();
        let mut scopes = HashSet::new();
        for l in &self.listeners {
            if let Some(ns) = &l.namespace {
                if !namespaces.contains(ns) {
                    return Err(ConfigError::UnknownListenerNamespace {
                        port: l.port,
                        namespace: ns.clone(),
                    });
                }
            }
            if !scopes.insert((l.port, l.namespace.clone())) {
                return Err(ConfigError::DuplicateListener(l.port));
            }
        }
        self.compile_policy()?;
        Ok(())
    }

    /// The VMs as the policy sees them.
    pub fn domains(&self) -> Vec<Domain> {
        self.vms.iter().map(VmConfig::domain).collect()
    }

    /// The compiled access policy.
    pub fn compile_policy(&self) -> Result<crate::policy::Policy, ConfigError> {
        crate::policy::Policy::compile(&self.policy, &self.domains()).map_err(ConfigError::Policy)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(v: &[&str]) -> Args {
        Args::try_parse_from(std::iter::once("domsockd").chain(v.iter().copied())).unwrap()
    }

    #[test]
    fn vhost_device_vsock_syntax() {
        let c = Config::try_from(args(&[
            "--vm",
            "guest-cid=3,socket=/tmp/a.sock,uds-path=/tmp/a.vsock",
            "--vm",
            "guest-cid=4,socket=/tmp/b.sock,uds-path=/tmp/b.vsock,name=web,groups=g1+g2",
        ]))
        .unwrap();
        assert_eq!(c.vms.len(), 2);
        assert_eq!(c.vms[0].guest_cid, 3);
        assert_eq!(c.vms[0].display_name(), "vm3");
        assert_eq!(c.vms[1].display_name(), "web");
        assert_eq!(c.vms[1].groups, vec!["g1", "g2"]);
    }

    #[test]
    fn single_vm_flags() {
        let c = Config::try_from(args(&[
            "--guest-cid",
            "5",
            "--socket",
            "/tmp/s",
            "--uds-path",
            "/tmp/u",
        ]))
        .unwrap();
        assert_eq!(c.vms[0].guest_cid, 5);
        assert!(matches!(
            Config::try_from(args(&["--guest-cid", "5"])),
            Err(ConfigError::MixedForms)
        ));
    }

    #[test]
    fn rejects_bad_values() {
        let bad = |s: &str| Config::try_from(args(&["--vm", s])).unwrap_err();
        assert!(matches!(
            bad("guest-cid=2,socket=/a,uds-path=/b"),
            ConfigError::ReservedCid(2)
        ));
        assert!(matches!(
            bad("guest-cid=x,socket=/a,uds-path=/b"),
            ConfigError::BadCid(_)
        ));
        assert!(matches!(
            bad("guest-cid=3,socket=/a"),
            ConfigError::MissingField { .. }
        ));
        assert!(matches!(
            bad("guest-cid=3,socket=/a,uds-path=/b,forward-cid=1"),
            ConfigError::UnknownField(_)
        ));
        assert!(matches!(
            bad("guest-cid=3,guest-cid=4,socket=/a,uds-path=/b"),
            ConfigError::DuplicateField(_)
        ));
        assert!(matches!(
            Config::try_from(args(&[
                "--vm",
                "guest-cid=3,socket=/a,uds-path=/b",
                "--vm",
                "guest-cid=3,socket=/c,uds-path=/d"
            ])),
            Err(ConfigError::DuplicateCid(3))
        ));
        assert!(matches!(
            Config::try_from(args(&[])),
            Err(ConfigError::NoVm)
        ));
    }

    #[test]
    fn bus_tables_reach_the_policy() {
        let dir = std::env::temp_dir().join(format!("domsock-cfg-bus-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("d.toml");
        let vm =
            "[[vm]]\nguest-cid = 7\nsocket = \"/tmp/x\"\nuds-path = \"/tmp/y\"\nname = \"db\"\n";
        let with = |tables: &str| {
            std::fs::write(&path, format!("{vm}{tables}")).unwrap();
            Config::try_from(args(&["--config", path.to_str().unwrap()]))
        };
        let c = with(
            "[[bus]]\nname = \"s\"\npolicy = \"topic\"\nqueue-bytes = 131072\npublish = [\"db\"]\n\n\
             [[policy.bus-create]]\nfrom = \"*\"\n",
        )
        .unwrap();
        let p = c.compile_policy().unwrap();
        let d = &p.declared_buses()[0];
        assert_eq!(
            (d.name.as_str(), d.params.queue_bytes, d.params.slow),
            ("s", 131072, domsock_proto::bus::wire::SlowPolicy::Drop)
        );
        let name = domsock_proto::bus::wire::BusName::new("s").unwrap();
        assert!(p.bus_permit(Cid(7), &name).publish);
        assert!(
            p.bus_permit(
                Cid(7),
                &domsock_proto::bus::wire::BusName::new("t").unwrap()
            )
            .create
        );
        assert!(matches!(
            with("[[bus]]\nname = \"s\"\npolicy = \"mesh\"\n"),
            Err(ConfigError::Policy(
                crate::policy::PolicyError::BadBus { .. }
            ))
        ));
        assert!(matches!(
            with("[[bus]]\nname = \"s\"\nbogus = 1\n"),
            Err(ConfigError::ParseFile { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn toml_file() {
        let dir = std::env::temp_dir().join(format!("domsock-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("d.toml");
        std::fs::write(
            &path,
            "queue-size = 256\n[[vm]]\nguest-cid = 7\nsocket = \"/tmp/x\"\nuds-path = \"/tmp/y\"\nname = \"db\"\n",
        )
        .unwrap();
        let c = Config::try_from(args(&["--config", path.to_str().unwrap()])).unwrap();
        assert_eq!(c.queue_size, 256);
        assert_eq!(c.vms[0].display_name(), "db");
        let tunnel = "[tunnel]\nhost = \"a\"\nlisten = \"127.0.0.1:7100\"\ncert = \"/c\"\n\
                      key = \"/k\"\nca = \"/ca\"\n";
        let vm = "[[vm]]\nguest-cid = 7\nsocket = \"/tmp/x\"\nuds-path = \"/tmp/y\"\n";
        let with = |keys: &str| {
            std::fs::write(&path, format!("{tunnel}{keys}{vm}")).unwrap();
            Config::try_from(args(&["--config", path.to_str().unwrap()]))
        };
        let t = with("").unwrap().tunnel.unwrap().runtime_config().unwrap();
        assert_eq!(
            (t.buf_alloc_bytes, t.max_window_bytes, t.window_budget_bytes),
            (128 << 10, 4 << 20, 64 << 20)
        );
        let t = with(
            "window-bytes = 65536\nmax-window-bytes = 1048576\nwindow-budget-bytes = 8388608\n",
        )
        .unwrap()
        .tunnel
        .unwrap()
        .runtime_config()
        .unwrap();
        assert_eq!(
            (t.buf_alloc_bytes, t.max_window_bytes, t.window_budget_bytes),
            (64 << 10, 1 << 20, 8 << 20)
        );
        for (keys, key) in [
            ("window-bytes = 100\n", "window-bytes"),
            ("max-window-bytes = 65536\n", "max-window-bytes"),
            ("max-window-bytes = 33554432\n", "max-window-bytes"),
            ("window-budget-bytes = 1048576\n", "window-budget-bytes"),
        ] {
            assert!(
                matches!(with(keys), Err(ConfigError::BadTunnelWindow { key: k, .. }) if k == key),
                "{keys}"
            );
        }
        std::fs::write(&path, "[[vm]]\nguest-cid = 7\nbogus = 1\n").unwrap();
        assert!(matches!(
            Config::try_from(args(&["--config", path.to_str().unwrap()])),
            Err(ConfigError::ParseFile { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
