//! Fuzz body of the config file and its access policy: TOML files built from structured
//! input (and raw text) go through the daemon's own path, `Config::try_from(Args)` with
//! `--config FILE`; what is accepted is compiled and queried, and every answer is compared
//! with a direct reading of the rules in `policy`'s module doc.

use crate::config::{Args, Config};
use crate::policy::{DenyReason, HostAccess, PolicyConfig, To, Verdict, DEFAULT_NAMESPACE};
use arbitrary::{Arbitrary, Unstructured};
use domsock_proto::control::valid_name;
use domsock_proto::{Cid, Port, SocketType};
use std::fmt::Write as _;
use std::path::PathBuf;

const NAMES: [&str; 6] = ["web", "db", "a", "vm3", "host", "bad name"];
const NAMESPACES: [&str; 3] = [DEFAULT_NAMESPACE, "tenant-a", "x/y"];
const GROUPS: [&str; 4] = ["front", "back", "g", ""];
const TYPES: [&str; 3] = ["stream", "seqpacket", "dgram"];
const PORTS: [u32; 5] = [0, 1, 5000, 5010, u32::MAX];

fn pick<T: Copy>(items: &[T], i: u8) -> T {
    items[usize::from(i) % items.len()]
}

#[derive(Debug, Arbitrary)]
struct Vm {
    cid: u8,
    name: Option<u8>,
    namespace: Option<u8>,
    groups: Vec<u8>,
}

#[derive(Debug, Arbitrary)]
enum Pattern {
    Any,
    Name(u8),
    Group(u8),
    Host,
    Raw(String),
}

impl Pattern {
    fn text(&self) -> String {
        match self {
            Pattern::Any => "*".into(),
            Pattern::Name(i) => pick(&NAMES, *i).into(),
            Pattern::Group(i) => format!("group:{}", pick(&GROUPS, *i)),
            Pattern::Host => "host".into(),
            Pattern::Raw(s) => s.clone(),
        }
    }
}

#[derive(Debug, Arbitrary)]
enum Ports {
    Any,
    One(u8),
    Range(u8, u8),
    Raw(String),
}

impl Ports {
    fn text(&self) -> String {
        match self {
            Ports::Any => "*".into(),
            Ports::One(p) => pick(&PORTS, *p).to_string(),
            Ports::Range(a, b) => format!("{}-{}", pick(&PORTS, *a), pick(&PORTS, *b)),
            Ports::Raw(s) => s.clone(),
        }
    }
}

#[derive(Debug, Arbitrary)]
struct Rule {
    namespace: Option<u8>,
    from: Pattern,
    to: Pattern,
    ports: Option<Ports>,
    types: Option<Vec<u8>>,
}

#[derive(Debug, Arbitrary)]
struct Query {
    from: u8,
    /// 2 is the host.
    to: u8,
    port: u8,
    raw_port: Option<u32>,
    seqpacket: bool,
    name: u8,
}

#[derive(Debug, Arbitrary)]
struct Input {
    vms: Vec<Vm>,
    rules_for_host: bool,
    rules: Vec<Rule>,
    queries: Vec<Query>,
    /// A whole config file as text, parsed the same way.
    raw: Option<String>,
}

/// Config file and access policy (`config`, `policy`).
///
/// Never panics on any file. A file built from structured input is accepted exactly when
/// the documented rules hold (at least one VM; guest CIDs, unique; valid names other than
/// `host`, unique per namespace; valid namespaces and groups; every rule's namespace,
/// names and groups exist; no `from = "host"`; ports `*`, `N` or `A-B` with `A <= B`;
/// socket types non-empty and known). For every accepted file (raw text too), the compiled
/// policy's `check`, `resolve` and `visible` answer every query as a direct reading of the
/// rules does: unknown domain, host access, namespace isolation, shared groups, then rules.
pub fn policy(data: &[u8]) {
    let Ok(input) = Input::arbitrary_take_rest(Unstructured::new(data)) else {
        return;
    };
    let file = PolicyFile::new();
    let (text, expect_valid) = structured_file(&input);
    let config = file.load(&text);
    if config.is_ok() != expect_valid {
        panic!(
            "config accepted: {}, expected {expect_valid}: {:?}\n{text}",
            config.is_ok(),
            config.err()
        );
    }
    if let Ok(config) = config {
        check_queries(&config, &input.queries);
    }
    if let Some(raw) = &input.raw {
        let _ = toml::from_str::<PolicyConfig>(raw);
        if let Ok(config) = file.load(raw) {
            check_queries(&config, &input.queries);
        }
    }
}

/// A per-thread temporary config file (the daemon's loader takes a path).
struct PolicyFile(PathBuf);

impl PolicyFile {
    fn new() -> Self {
        let thread = format!("{:?}", std::thread::current().id());
        let id: String = thread.chars().filter(char::is_ascii_digit).collect();
        PolicyFile(std::env::temp_dir().join(format!(
            "domsock-fuzz-policy-{}-{id}.toml",
            std::process::id()
        )))
    }

    fn load(&self, text: &str) -> Result<Config, crate::config::ConfigError> {
        std::fs::write(&self.0, text).expect("write the temporary config file");
        Config::try_from(Args {
            config: Some(self.0.clone()),
            queue_size: 1024,
            session_park_timeout_ms: u64::from(domsock_migration::session::DEFAULT_PARK_TIMEOUT_MS),
            ..Args::default()
        })
    }
}

impl Drop for PolicyFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn toml_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The TOML text for the structured input, and whether the rules say it is valid.
fn structured_file(input: &Input) -> (String, bool) {
    let mut text = String::new();
    let mut valid = !input.vms.is_empty();
    // (cid, name, namespace, groups) as the daemon will see them.
    let mut domains: Vec<(u64, String, String, Vec<String>)> = Vec::new();
    for (i, vm) in input.vms.iter().enumerate() {
        let cid = u64::from(vm.cid % 8);
        let _ = writeln!(
            text,
            "[[vm]]\nguest-cid = {cid}\nsocket = \"/run/fuzz/{i}.vhost\"\nuds-path = \"/run/fuzz/{i}.vsock\""
        );
        let name = match vm.name {
            Some(n) => {
                let _ = writeln!(text, "name = {}", toml_string(pick(&NAMES, n)));
                pick(&NAMES, n).to_string()
            }
            None => format!("vm{cid}"),
        };
        let namespace = match vm.namespace {
            Some(n) => {
                let _ = writeln!(text, "namespace = {}", toml_string(pick(&NAMESPACES, n)));
                pick(&NAMESPACES, n).to_string()
            }
            None => DEFAULT_NAMESPACE.to_string(),
        };
        let groups: Vec<String> = vm
            .groups
            .iter()
            .map(|&g| pick(&GROUPS, g).to_string())
            .collect();
        if !groups.is_empty() {
            let list: Vec<String> = groups.iter().map(|g| toml_string(g)).collect();
            let _ = writeln!(text, "groups = [{}]", list.join(", "));
        }
        valid &= Cid(cid).is_guest()
            && domains.iter().all(|d| d.0 != cid)
            && valid_name(&name)
            && name != "host"
            && valid_name(&namespace)
            && groups.iter().all(|g| valid_name(g))
            && domains
                .iter()
                .all(|d| (d.1.as_str(), d.2.as_str()) != (&name, &namespace));
        domains.push((cid, name, namespace, groups));
    }
    text.push_str("[policy]\n");
    if input.rules_for_host {
        text.push_str("guest-to-host = \"rules\"\n");
    }
    for rule in &input.rules {
        text.push_str("[[policy.allow]]\n");
        let namespace = match rule.namespace {
            Some(n) => {
                let _ = writeln!(text, "namespace = {}", toml_string(pick(&NAMESPACES, n)));
                pick(&NAMESPACES, n)
            }
            None => DEFAULT_NAMESPACE,
        };
        let (from, to) = (rule.from.text(), rule.to.text());
        let _ = writeln!(
            text,
            "from = {}\nto = {}",
            toml_string(&from),
            toml_string(&to)
        );
        if let Some(p) = &rule.ports {
            let _ = writeln!(text, "ports = {}", toml_string(&p.text()));
            valid &= parse_ports(&p.text()).is_some();
        }
        if let Some(types) = &rule.types {
            let list: Vec<String> = types
                .iter()
                .map(|&t| toml_string(pick(&TYPES, t)))
                .collect();
            let _ = writeln!(text, "types = [{}]", list.join(", "));
            valid &= !types.is_empty() && types.iter().all(|&t| pick(&TYPES, t) != "dgram");
        }
        let members: Vec<_> = domains.iter().filter(|d| d.2 == namespace).collect();
        let resolves = |p: &str| {
            p == "*"
                || match p.strip_prefix("group:") {
                    Some(g) => members.iter().any(|d| d.3.iter().any(|x| x == g)),
                    None => members.iter().any(|d| d.1 == p),
                }
        };
        valid &= !members.is_empty()
            && from != "host"
            && resolves(&from)
            && (to == "host" || resolves(&to));
    }
    (text, valid)
}

/// `*`, `N` or `A-B` (plain decimal digits, `A <= B`), as an inclusive range.
fn parse_ports(text: &str) -> Option<(u32, u32)> {
    let number = |s: &str| {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            None
        } else {
            s.parse::<u32>().ok()
        }
    };
    if text == "*" {
        return Some((0, u32::MAX));
    }
    match text.split_once('-') {
        None => number(text).map(|p| (p, p)),
        Some((a, b)) => {
            let (a, b) = (number(a)?, number(b)?);
            (a <= b).then_some((a, b))
        }
    }
}

/// Whether a rule's `from`/`to` pattern selects the domain `(name, groups)`.
fn selects(pattern: &str, name: &str, groups: &[String]) -> bool {
    pattern == "*"
        || match pattern.strip_prefix("group:") {
            Some(g) => groups.iter().any(|x| x == g),
            None => pattern == name,
        }
}

/// The access rules of `policy`'s module doc, read directly off the config.
fn reference_check(config: &Config, from: Cid, to: To, port: Port, ty: SocketType) -> Verdict {
    let domain = |cid: Cid| config.vms.iter().find(|v| v.guest_cid == cid.0);
    let Some(sender) = domain(from) else {
        return Verdict::Deny(DenyReason::UnknownDomain);
    };
    let (s_name, s_ns) = (sender.display_name(), sender.namespace());
    let type_name = match ty {
        SocketType::Stream => "stream",
        SocketType::SeqPacket => "seqpacket",
    };
    let rule_matches = |target: Option<(&str, &[String])>| {
        config.policy.allow.iter().any(|r| {
            r.namespace.as_deref().unwrap_or(DEFAULT_NAMESPACE) == s_ns
                && selects(&r.from, &s_name, &sender.groups)
                && match target {
                    None => r.to == "host",
                    Some((name, groups)) => r.to != "host" && selects(&r.to, name, groups),
                }
                && r.ports
                    .as_deref()
                    .map_or(Some((0, u32::MAX)), parse_ports)
                    .is_some_and(|(a, b)| (a..=b).contains(&port.0))
                && r.types
                    .as_ref()
                    .is_none_or(|t| t.iter().any(|x| x == type_name))
        })
    };
    let allowed = match to {
        To::Host => config.policy.guest_to_host == HostAccess::Allow || rule_matches(None),
        To::Domain(cid) => {
            let Some(target) = domain(cid) else {
                return Verdict::Deny(DenyReason::UnknownDomain);
            };
            if target.namespace() != s_ns {
                return Verdict::Deny(DenyReason::OtherNamespace);
            }
            sender.groups.iter().any(|g| target.groups.contains(g))
                || rule_matches(Some((&target.display_name(), &target.groups)))
        }
    };
    if allowed {
        Verdict::Allow
    } else {
        Verdict::Deny(DenyReason::NoRule)
    }
}

fn check_queries(config: &Config, queries: &[Query]) {
    let policy = config
        .compile_policy()
        .expect("a validated config compiles");
    for q in queries {
        let from = Cid(u64::from(q.from % 10));
        let to = To::from_cid(Cid(u64::from(q.to % 10)));
        let port = Port(q.raw_port.unwrap_or(pick(&PORTS, q.port)));
        let ty = if q.seqpacket {
            SocketType::SeqPacket
        } else {
            SocketType::Stream
        };
        assert_eq!(
            policy.check(from, to, port, ty),
            reference_check(config, from, to, port, ty),
            "check({from}, {to}, {port}, {ty:?})"
        );
        let ns_of = |cid: Cid| {
            config
                .vms
                .iter()
                .find(|v| v.guest_cid == cid.0)
                .map(|v| v.namespace())
        };
        let name = pick(&NAMES, q.name);
        let want = ns_of(from).and_then(|ns| {
            config
                .vms
                .iter()
                .find(|v| v.namespace() == ns && v.display_name() == name)
                .map(|v| Cid(v.guest_cid))
        });
        assert_eq!(policy.resolve(from, name), want, "resolve({from}, {name})");
        let mut want: Vec<(String, u64)> = match ns_of(from) {
            Some(ns) => config
                .vms
                .iter()
                .filter(|v| v.namespace() == ns)
                .map(|v| (v.display_name(), v.guest_cid))
                .collect(),
            None => Vec::new(),
        };
        want.sort();
        let got: Vec<(String, u64)> = policy
            .visible(from)
            .iter()
            .map(|d| (d.name.clone(), d.cid.0))
            .collect();
        assert_eq!(got, want, "visible({from})");
    }
}
