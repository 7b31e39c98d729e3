//! Access policy of domsockd: which guest may open a connection to which guest or host port.
//!
//! [`PolicyConfig`] is the `[policy]` table of the config file. [`Policy::compile`] checks it
//! against the configured [`Domain`]s and turns names, groups and port ranges into indices,
//! so that [`Policy::check`], called once per connection request, is a hash lookup and a
//! scan of the few rules whose `from` names the sending domain.
//!
//! Rules, in the order they are applied by [`Policy::check`]:
//! 1. The sending CID, and the target CID for a guest target, must be configured domains,
//!    else [`DenyReason::UnknownDomain`].
//! 2. Host target: with `guest-to-host = "allow"` (the default) always allowed; with
//!    `"rules"` only through an `allow` rule with `to = "host"`.
//! 3. Guest target in another namespace: [`DenyReason::OtherNamespace`], whatever the rules
//!    say. A rule lives in one namespace and names, groups and `*` resolve inside it.
//! 4. Guest target in the same namespace sharing a group with the sender: allowed on any port
//!    and type (vhost-device-vsock's `groups=`; there is no implicit default group).
//! 5. Otherwise an `allow` rule must match sender, target, port and socket type, else
//!    [`DenyReason::NoRule`]. A domain connecting to its own CID is not special: it needs a
//!    shared group (any group it belongs to) or a rule like any other pair.
//!
//! Compiling rejects every rule that names a namespace, domain or group that does not exist,
//! so a config reload with a typo fails and the caller keeps the policy it had.
//!
//! This module does no I/O, logging or counting, and knows nothing of connections: the data
//! plane decides what a verdict means (RST, counters, logs, resetting connections a reloaded
//! policy no longer allows). It does not validate the syntax of names or the uniqueness of
//! socket paths; the config module does. It also answers name resolution for the control
//! service ([`Policy::resolve`], [`Policy::visible`]) because visibility follows the same
//! namespace boundary.

use domsock_proto::bus::wire::{BusName, CreateParams, Policy as BusPolicy, SlowPolicy};
use domsock_proto::{Cid, Port, SocketType};
use serde::Deserialize;
use std::collections::HashMap;
use std::fmt;
use thiserror::Error;

/// Namespace of a rule that does not name one.
pub const DEFAULT_NAMESPACE: &str = "default";

/// The `to` keyword that means the host (CID 2) rather than a domain.
pub const HOST_KEYWORD: &str = "host";

/// Prefix of a `from`/`to` pattern that names a group.
pub const GROUP_PREFIX: &str = "group:";

/// One domain (guest) as the policy sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Domain {
    /// Guest CID, unique across all namespaces.
    pub cid: Cid,
    /// Name, unique within its namespace.
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// vhost-device-vsock groups; members of a shared group reach each other freely.
    pub groups: Vec<String>,
}

/// The `[policy]` table of the TOML config.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct PolicyConfig {
    /// Whether guests reach host ports freely or only through rules.
    #[serde(default)]
    pub guest_to_host: HostAccess,
    /// `[[policy.allow]]` rules.
    #[serde(default)]
    pub allow: Vec<RuleConfig>,
    /// `[[policy.bus-create]]`: which guests may create (and join) undeclared buses.
    #[serde(default)]
    pub bus_create: Vec<BusCreateRule>,
    /// The `[[bus]]` declarations (top level in the file; carried here so that they
    /// compile, and reload, with the rules that name the same domains).
    #[serde(skip)]
    pub buses: Vec<BusDecl>,
}

/// One `[[bus]]` table: a bus that exists from the start, with its parameters and who of
/// the guests may join it. Host processes join through the namespace's bus socket,
/// whose file permissions decide.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct BusDecl {
    /// Namespace of the bus and of the names in `join`/`publish` ([`DEFAULT_NAMESPACE`]
    /// if absent).
    #[serde(default)]
    pub namespace: Option<String>,
    /// The bus's name (`[A-Za-z0-9._-]`, 1 to 64 characters).
    pub name: String,
    /// `"hub"` (the default), `"switch"` or `"topic"`.
    #[serde(default)]
    pub policy: Option<String>,
    /// Largest message payload (default 64 KiB, at most 1 MiB).
    #[serde(default)]
    pub max_message_bytes: Option<u32>,
    /// Bytes each member's queue holds at most (default 1 MiB, at least the largest
    /// message).
    #[serde(default)]
    pub queue_bytes: Option<u32>,
    /// A message that does not fit a member's queue: `"drop"` (the default, counted and
    /// told) or `"disconnect"`.
    #[serde(default)]
    pub slow: Option<String>,
    /// Guests that may join to listen: names, `group:NAME`, `*`.
    #[serde(default)]
    pub join: Vec<String>,
    /// Guests that may join to publish (and listen).
    #[serde(default)]
    pub publish: Vec<String>,
}

/// One `[[policy.bus-create]]` rule.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct BusCreateRule {
    /// Namespace the pattern resolves in ([`DEFAULT_NAMESPACE`] if absent).
    #[serde(default)]
    pub namespace: Option<String>,
    /// The guests: a name, `group:NAME` or `*`. They may create buses that are not
    /// declared, and join (publish and listen on) every undeclared bus of their namespace.
    pub from: String,
}

/// How guest-to-host connections are decided (`guest-to-host = "..."`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HostAccess {
    /// Every guest may connect to every host port.
    #[default]
    Allow,
    /// A guest needs an `allow` rule with `to = "host"`.
    Rules,
}

/// One `[[policy.allow]]` rule as written in the file; [`Policy::compile`] validates it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RuleConfig {
    /// Namespace the names and groups resolve in ([`DEFAULT_NAMESPACE`] if absent).
    #[serde(default)]
    pub namespace: Option<String>,
    /// Sender: a domain name, `group:NAME` or `*` (every domain of the namespace).
    pub from: String,
    /// Target: a domain name, `group:NAME`, `*` (every domain of the namespace, not the
    /// host) or `host`.
    pub to: String,
    /// Target ports: `*` (the default), `N` or `A-B` (inclusive, `A <= B`).
    #[serde(default)]
    pub ports: Option<String>,
    /// Socket types: `"stream"` and/or `"seqpacket"` (both if absent).
    #[serde(default)]
    pub types: Option<Vec<String>>,
}

/// Where a connection request goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum To {
    /// A guest.
    Domain(Cid),
    /// The host (CID 2).
    Host,
}

impl To {
    /// The target of a connection to `cid`: [`To::Host`] for [`Cid::HOST`], else a domain.
    pub fn from_cid(cid: Cid) -> To {
        if cid == Cid::HOST {
            To::Host
        } else {
            To::Domain(cid)
        }
    }
}

impl fmt::Display for To {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            To::Domain(cid) => write!(f, "cid {cid}"),
            To::Host => f.write_str(HOST_KEYWORD),
        }
    }
}

/// The decision on one connection request.
#[must_use]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Verdict {
    /// The connection may proceed.
    Allow,
    /// The connection must be refused.
    Deny(DenyReason),
}

impl Verdict {
    /// Whether this is [`Verdict::Allow`].
    pub fn is_allowed(self) -> bool {
        self == Verdict::Allow
    }
}

/// Why a connection was denied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DenyReason {
    /// Both domains are in one namespace, but neither a shared group nor a rule allows it.
    NoRule,
    /// The target domain is in another namespace (the caller treats this like
    /// [`DenyReason::UnknownDomain`] towards the guest).
    OtherNamespace,
    /// The sender or the target CID is not a configured domain.
    UnknownDomain,
}

impl fmt::Display for DenyReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DenyReason::NoRule => "no-rule",
            DenyReason::OtherNamespace => "other-namespace",
            DenyReason::UnknownDomain => "unknown-domain",
        })
    }
}

/// Why a port range text was rejected.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PortRangeError {
    /// A bound is not a decimal `u32`.
    #[error("{0:?} is not a port number (decimal, 0..=4294967295)")]
    NotANumber(String),
    /// `A-B` with `A > B`.
    #[error("range start {start} is above its end {end}")]
    Reversed {
        /// Start of the range.
        start: u32,
        /// End of the range.
        end: u32,
    },
}

/// Why a policy did not compile. `rule` is the 0-based index into `[[policy.allow]]`.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PolicyError {
    /// Two domains have the same CID.
    #[error("CID {0} is given to two domains")]
    DuplicateCid(Cid),
    /// Two domains of one namespace have the same name.
    #[error("name {name:?} is used twice in namespace {namespace:?}")]
    DuplicateName {
        /// Namespace.
        namespace: String,
        /// Repeated name.
        name: String,
    },
    /// A rule's namespace has no domain.
    #[error("policy.allow[{rule}]: no domain is in namespace {namespace:?}")]
    UnknownNamespace {
        /// Rule index.
        rule: usize,
        /// The namespace as written (or the default).
        namespace: String,
    },
    /// A rule names a domain its namespace does not have.
    #[error("policy.allow[{rule}]: no domain {name:?} in namespace {namespace:?}")]
    UnknownName {
        /// Rule index.
        rule: usize,
        /// Namespace searched.
        namespace: String,
        /// The name as written.
        name: String,
    },
    /// A rule names a group no domain of its namespace is in.
    #[error("policy.allow[{rule}]: no domain of namespace {namespace:?} is in group {group:?}")]
    UnknownGroup {
        /// Rule index.
        rule: usize,
        /// Namespace searched.
        namespace: String,
        /// The group name (without `group:`).
        group: String,
    },
    /// A rule's `ports` is not `*`, `N` or `A-B`.
    #[error("policy.allow[{rule}]: bad ports {ports:?}")]
    BadPorts {
        /// Rule index.
        rule: usize,
        /// The text as written.
        ports: String,
        /// What is wrong with it.
        #[source]
        source: PortRangeError,
    },
    /// A rule's `types` has something other than `stream` or `seqpacket`.
    #[error("policy.allow[{rule}]: bad socket type {ty:?} (expected \"stream\" or \"seqpacket\")")]
    BadType {
        /// Rule index.
        rule: usize,
        /// The type as written.
        ty: String,
    },
    /// A rule's `types` is an empty list, so it could never match.
    #[error("policy.allow[{rule}]: types is empty")]
    EmptyTypes {
        /// Rule index.
        rule: usize,
    },
    /// A `[[bus]]` table is invalid (name, policy, slow, sizes, or a domain it names).
    #[error("bus[{index}] {name:?}: {what}")]
    BadBus {
        /// Index into the `[[bus]]` tables.
        index: usize,
        /// The bus's name as written.
        name: String,
        /// What is wrong.
        what: String,
    },
    /// Two `[[bus]]` tables declare one bus.
    #[error("bus {name:?} is declared twice in namespace {namespace:?}")]
    DuplicateBus {
        /// Namespace.
        namespace: String,
        /// The bus.
        name: String,
    },
    /// A `[[policy.bus-create]]` rule names what its namespace does not have.
    #[error("policy.bus-create[{index}]: {what}")]
    BadBusCreate {
        /// Rule index.
        index: usize,
        /// What is wrong.
        what: String,
    },
    /// A rule has `from = "host"`: rules only govern connections that guests open.
    #[error(
        "policy.allow[{rule}]: from = \"host\": rules govern guest-initiated connections only"
    )]
    HostAsSource {
        /// Rule index.
        rule: usize,
    },
}

/// Inclusive port range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PortRange {
    start: u32,
    end: u32,
}

impl PortRange {
    const ALL: PortRange = PortRange {
        start: 0,
        end: u32::MAX,
    };

    fn contains(self, port: Port) -> bool {
        (self.start..=self.end).contains(&port.0)
    }
}

/// Parses `*`, `N` or `A-B` (inclusive).
fn parse_ports(text: &str) -> Result<PortRange, PortRangeError> {
    fn number(text: &str) -> Result<u32, PortRangeError> {
        // `u32::from_str` also takes "+5"; a port is plain digits only.
        if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
            return Err(PortRangeError::NotANumber(text.to_owned()));
        }
        text.parse()
            .map_err(|_| PortRangeError::NotANumber(text.to_owned()))
    }
    if text == "*" {
        return Ok(PortRange::ALL);
    }
    match text.split_once('-') {
        None => {
            let port = number(text)?;
            Ok(PortRange {
                start: port,
                end: port,
            })
        }
        Some((start, end)) => {
            let (start, end) = (number(start)?, number(end)?);
            if start > end {
                return Err(PortRangeError::Reversed { start, end });
            }
            Ok(PortRange { start, end })
        }
    }
}

/// Set of socket types, one bit per type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct TypeSet(u8);

impl TypeSet {
    const ALL: TypeSet = TypeSet(Self::bit(SocketType::Stream) | Self::bit(SocketType::SeqPacket));

    const fn bit(ty: SocketType) -> u8 {
        match ty {
            SocketType::Stream => 1,
            SocketType::SeqPacket => 2,
        }
    }

    fn contains(self, ty: SocketType) -> bool {
        self.0 & Self::bit(ty) != 0
    }
}

fn parse_types(rule: usize, types: &[String]) -> Result<TypeSet, PolicyError> {
    if types.is_empty() {
        return Err(PolicyError::EmptyTypes { rule });
    }
    let mut set = TypeSet(0);
    for ty in types {
        let parsed = match ty.as_str() {
            "stream" => SocketType::Stream,
            "seqpacket" => SocketType::SeqPacket,
            _ => {
                return Err(PolicyError::BadType {
                    rule,
                    ty: ty.clone(),
                })
            }
        };
        set.0 |= TypeSet::bit(parsed);
    }
    Ok(set)
}

/// Index into [`Policy::domains`].
type DomainIndex = usize;
/// Interned (namespace, group) pair: equal ids imply the same namespace.
type GroupId = usize;

/// Which domains of the rule's namespace a `from` or `to` pattern selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DomainMatch {
    Any,
    Group(GroupId),
    One(DomainIndex),
}

/// A compiled rule with a guest target; the sender side is folded into
/// [`CompiledDomain::guest_rules`].
#[derive(Debug, Clone)]
struct GuestRule {
    to: DomainMatch,
    ports: PortRange,
    types: TypeSet,
}

/// A compiled rule with `to = "host"`.
#[derive(Debug, Clone)]
struct HostRule {
    ports: PortRange,
    types: TypeSet,
}

#[derive(Debug, Clone)]
struct CompiledDomain {
    domain: Domain,
    namespace: usize,
    /// Sorted, deduplicated.
    groups: Vec<GroupId>,
    /// Indices into [`Policy::guest_rules`] whose `from` selects this domain.
    guest_rules: Vec<usize>,
    /// Indices into [`Policy::host_rules`] whose `from` selects this domain.
    host_rules: Vec<usize>,
}

impl CompiledDomain {
    fn in_group(&self, group: GroupId) -> bool {
        self.groups.binary_search(&group).is_ok()
    }

    fn shares_group_with(&self, other: &CompiledDomain) -> bool {
        let (a, b) = (&self.groups, &other.groups);
        let (mut i, mut j) = (0, 0);
        while i < a.len() && j < b.len() {
            match a[i].cmp(&b[j]) {
                std::cmp::Ordering::Less => i += 1,
                std::cmp::Ordering::Greater => j += 1,
                std::cmp::Ordering::Equal => return true,
            }
        }
        false
    }
}

#[derive(Debug, Clone)]
struct Namespace {
    name: String,
    by_name: HashMap<String, DomainIndex>,
    /// Members sorted by name.
    members: Vec<DomainIndex>,
}

/// A compiled policy: immutable, cheap to query; replace it as a whole on reload.
#[derive(Debug, Clone)]
pub struct Policy {
    host_access: HostAccess,
    domains: Vec<CompiledDomain>,
    by_cid: HashMap<Cid, DomainIndex>,
    namespaces: Vec<Namespace>,
    guest_rules: Vec<GuestRule>,
    host_rules: Vec<HostRule>,
    buses: Vec<DeclaredBus>,
    /// Sorted.
    bus_creators: Vec<Cid>,
}

/// A `[[bus]]` declaration, compiled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeclaredBus {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: BusName,
    /// What it is created with.
    pub params: CreateParams,
    /// Guests that may listen (publishers included), sorted.
    listen: Vec<Cid>,
    /// Guests that may publish, sorted.
    publish: Vec<Cid>,
}

/// What one guest may do on one bus of its namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BusPermit {
    /// Join to receive.
    pub listen: bool,
    /// Join to publish.
    pub publish: bool,
    /// The bus is not declared, and the guest may create it.
    pub create: bool,
}

impl BusPermit {
    /// Whether a member granted `grant` may hold it under this permit.
    pub fn allows(self, grant: domsock_proto::bus::wire::Want) -> bool {
        (self.listen || !grant.receive) && (self.publish || !grant.publish)
    }
}

/// Parses a `[[bus]]` table's parameters.
fn bus_params(decl: &BusDecl) -> Result<CreateParams, String> {
    let policy = match decl.policy.as_deref().unwrap_or("hub") {
        "hub" => BusPolicy::Hub,
        "switch" => BusPolicy::Switch,
        "topic" => BusPolicy::Topic,
        other => return Err(format!("policy {other:?} is not hub, switch or topic")),
    };
    let slow = match decl.slow.as_deref().unwrap_or("drop") {
        "drop" => SlowPolicy::Drop,
        "disconnect" => SlowPolicy::Disconnect,
        other => return Err(format!("slow {other:?} is not drop or disconnect")),
    };
    let params = CreateParams {
        policy,
        slow,
        max_message: decl
            .max_message_bytes
            .unwrap_or(domsock_proto::bus::wire::DEFAULT_MAX_MESSAGE_BYTES),
        queue_bytes: decl
            .queue_bytes
            .unwrap_or(domsock_proto::bus::fanout::DEFAULT_QUEUE_BYTES),
    };
    params.validate().map_err(|e| e.to_string())?;
    Ok(params)
}

impl Policy {
    /// Validates `cfg` against `domains` and builds the lookup tables.
    pub fn compile(cfg: &PolicyConfig, domains: &[Domain]) -> Result<Policy, PolicyError> {
        let mut by_cid = HashMap::with_capacity(domains.len());
        let mut namespace_ids: HashMap<&str, usize> = HashMap::new();
        let mut namespaces: Vec<Namespace> = Vec::new();
        let mut group_ids: HashMap<(usize, &str), GroupId> = HashMap::new();
        let mut compiled = Vec::with_capacity(domains.len());

        for (index, domain) in domains.iter().enumerate() {
            if by_cid.insert(domain.cid, index).is_some() {
                return Err(PolicyError::DuplicateCid(domain.cid));
            }
            let ns = *namespace_ids
                .entry(domain.namespace.as_str())
                .or_insert_with(|| {
                    namespaces.push(Namespace {
                        name: domain.namespace.clone(),
                        by_name: HashMap::new(),
                        members: Vec::new(),
                    });
                    namespaces.len() - 1
                });
            let namespace = &mut namespaces[ns];
            if namespace
                .by_name
                .insert(domain.name.clone(), index)
                .is_some()
            {
                return Err(PolicyError::DuplicateName {
                    namespace: domain.namespace.clone(),
                    name: domain.name.clone(),
                });
            }
            namespace.members.push(index);
            let mut groups: Vec<GroupId> = Vec::with_capacity(domain.groups.len());
            for g in &domain.groups {
                let next = group_ids.len();
                groups.push(*group_ids.entry((ns, g.as_str())).or_insert(next));
            }
            groups.sort_unstable();
            groups.dedup();
            compiled.push(CompiledDomain {
                domain: domain.clone(),
                namespace: ns,
                groups,
                guest_rules: Vec::new(),
                host_rules: Vec::new(),
            });
        }
        for namespace in &mut namespaces {
            namespace
                .members
                .sort_by(|&a, &b| domains[a].name.cmp(&domains[b].name));
        }

        let mut guest_rules = Vec::new();
        let mut host_rules = Vec::new();
        for (rule, rc) in cfg.allow.iter().enumerate() {
            let ns_name = rc.namespace.as_deref().unwrap_or(DEFAULT_NAMESPACE);
            let Some(&ns) = namespace_ids.get(ns_name) else {
                return Err(PolicyError::UnknownNamespace {
                    rule,
                    namespace: ns_name.to_owned(),
                });
            };
            let resolve = |pattern: &str| -> Result<DomainMatch, PolicyError> {
                if pattern == "*" {
                    Ok(DomainMatch::Any)
                } else if let Some(group) = pattern.strip_prefix(GROUP_PREFIX) {
                    group_ids
                        .get(&(ns, group))
                        .map(|&id| DomainMatch::Group(id))
                        .ok_or_else(|| PolicyError::UnknownGroup {
                            rule,
                            namespace: ns_name.to_owned(),
                            group: group.to_owned(),
                        })
                } else {
                    namespaces[ns]
                        .by_name
                        .get(pattern)
                        .map(|&index| DomainMatch::One(index))
                        .ok_or_else(|| PolicyError::UnknownName {
                            rule,
                            namespace: ns_name.to_owned(),
                            name: pattern.to_owned(),
                        })
                }
            };
            if rc.from == HOST_KEYWORD {
                return Err(PolicyError::HostAsSource { rule });
            }
            let from = resolve(&rc.from)?;
            let to = if rc.to == HOST_KEYWORD {
                None
            } else {
                Some(resolve(&rc.to)?)
            };
            let ports = match &rc.ports {
                None => PortRange::ALL,
                Some(text) => parse_ports(text).map_err(|source| PolicyError::BadPorts {
                    rule,
                    ports: text.clone(),
                    source,
                })?,
            };
            let types = match &rc.types {
                None => TypeSet::ALL,
                Some(types) => parse_types(rule, types)?,
            };

            let senders = namespaces[ns].members.iter().copied().filter(|&index| {
                let d = &compiled[index];
                match from {
                    DomainMatch::Any => true,
                    DomainMatch::Group(g) => d.in_group(g),
                    DomainMatch::One(one) => one == index,
                }
            });
            let senders: Vec<DomainIndex> = senders.collect();
            match to {
                Some(to) => {
                    for &s in &senders {
                        compiled[s].guest_rules.push(guest_rules.len());
                    }
                    guest_rules.push(GuestRule { to, ports, types });
                }
                None => {
                    for &s in &senders {
                        compiled[s].host_rules.push(host_rules.len());
                    }
                    host_rules.push(HostRule { ports, types });
                }
            }
        }

        // Which domains of namespace `ns` a `from`-style pattern selects.
        let select = |ns: usize, pattern: &str| -> Result<Vec<Cid>, String> {
            let m = if pattern == "*" {
                DomainMatch::Any
            } else if let Some(group) = pattern.strip_prefix(GROUP_PREFIX) {
                DomainMatch::Group(
                    *group_ids
                        .get(&(ns, group))
                        .ok_or_else(|| format!("no domain is in group {group:?}"))?,
                )
            } else {
                DomainMatch::One(
                    *namespaces[ns]
                        .by_name
                        .get(pattern)
                        .ok_or_else(|| format!("no domain {pattern:?}"))?,
                )
            };
            Ok(namespaces[ns]
                .members
                .iter()
                .filter(|&&i| match m {
                    DomainMatch::Any => true,
                    DomainMatch::Group(g) => compiled[i].in_group(g),
                    DomainMatch::One(one) => one == i,
                })
                .map(|&i| compiled[i].domain.cid)
                .collect())
        };
        let selected = |ns: usize, patterns: &[String]| -> Result<Vec<Cid>, String> {
            let mut cids = Vec::new();
            for p in patterns {
                cids.extend(select(ns, p)?);
            }
            cids.sort_unstable();
            cids.dedup();
            Ok(cids)
        };
        let mut buses: Vec<DeclaredBus> = Vec::new();
        for (index, decl) in cfg.buses.iter().enumerate() {
            let bad = |what: String| PolicyError::BadBus {
                index,
                name: decl.name.clone(),
                what,
            };
            let ns_name = decl.namespace.as_deref().unwrap_or(DEFAULT_NAMESPACE);
            let &ns = namespace_ids
                .get(ns_name)
                .ok_or_else(|| bad(format!("no domain is in namespace {ns_name:?}")))?;
            let name = BusName::new(&decl.name)
                .ok_or_else(|| bad("not a valid bus name ([A-Za-z0-9._-], 1 to 64)".into()))?;
            let params = bus_params(decl).map_err(bad)?;
            let publish = selected(ns, &decl.publish).map_err(|e| bad(format!("publish: {e}")))?;
            let mut listen = selected(ns, &decl.join).map_err(|e| bad(format!("join: {e}")))?;
            listen.extend(&publish);
            listen.sort_unstable();
            listen.dedup();
            if buses
                .iter()
                .any(|b| b.namespace == ns_name && b.name == name)
            {
                return Err(PolicyError::DuplicateBus {
                    namespace: ns_name.to_owned(),
                    name: decl.name.clone(),
                });
            }
            buses.push(DeclaredBus {
                namespace: ns_name.to_owned(),
                name,
                params,
                listen,
                publish,
            });
        }
        let mut bus_creators = Vec::new();
        for (index, rule) in cfg.bus_create.iter().enumerate() {
            let ns_name = rule.namespace.as_deref().unwrap_or(DEFAULT_NAMESPACE);
            let bad = |what: String| PolicyError::BadBusCreate { index, what };
            let &ns = namespace_ids
                .get(ns_name)
                .ok_or_else(|| bad(format!("no domain is in namespace {ns_name:?}")))?;
            bus_creators.extend(select(ns, &rule.from).map_err(bad)?);
        }
        bus_creators.sort_unstable();
        bus_creators.dedup();

        Ok(Policy {
            host_access: cfg.guest_to_host,
            domains: compiled,
            by_cid,
            namespaces,
            guest_rules,
            host_rules,
            buses,
            bus_creators,
        })
    }

    /// Decides whether `from` may open a connection of type `ty` to port `port` of `to`.
    pub fn check(&self, from: Cid, to: To, port: Port, ty: SocketType) -> Verdict {
        let Some(sender) = self.compiled(from) else {
            return Verdict::Deny(DenyReason::UnknownDomain);
        };
        match to {
            To::Host => {
                let allowed = self.host_access == HostAccess::Allow
                    || sender.host_rules.iter().any(|&r| {
                        let rule = &self.host_rules[r];
                        rule.ports.contains(port) && rule.types.contains(ty)
                    });
                verdict(allowed)
            }
            To::Domain(cid) => {
                let Some(target) = self.compiled(cid) else {
                    return Verdict::Deny(DenyReason::UnknownDomain);
                };
                if target.namespace != sender.namespace {
                    return Verdict::Deny(DenyReason::OtherNamespace);
                }
                if sender.shares_group_with(target) {
                    return Verdict::Allow;
                }
                let target_index = self.by_cid[&cid];
                let allowed = sender.guest_rules.iter().any(|&r| {
                    let rule = &self.guest_rules[r];
                    rule.ports.contains(port)
                        && rule.types.contains(ty)
                        && match rule.to {
                            DomainMatch::Any => true,
                            DomainMatch::Group(g) => target.in_group(g),
                            DomainMatch::One(index) => index == target_index,
                        }
                });
                verdict(allowed)
            }
        }
    }

    /// The domain with `cid`, if configured.
    pub fn domain(&self, cid: Cid) -> Option<&Domain> {
        self.compiled(cid).map(|d| &d.domain)
    }

    /// All domains, in the order given to [`Policy::compile`].
    pub fn domains(&self) -> impl Iterator<Item = &Domain> {
        self.domains.iter().map(|d| &d.domain)
    }

    /// The CID of the domain called `name` in the namespace of `from` (the control service's
    /// `RESOLVE`). `None` if `from` is unknown or its namespace has no such name.
    pub fn resolve(&self, from: Cid, name: &str) -> Option<Cid> {
        let sender = self.compiled(from)?;
        let &index = self.namespaces[sender.namespace].by_name.get(name)?;
        Some(self.domains[index].domain.cid)
    }

    /// Domains in the namespace of `from`, `from` included, sorted by name (the control
    /// service's `LIST`). Empty if `from` is unknown.
    pub fn visible(&self, from: Cid) -> Vec<&Domain> {
        let Some(sender) = self.compiled(from) else {
            return Vec::new();
        };
        self.namespaces[sender.namespace]
            .members
            .iter()
            .map(|&index| &self.domains[index].domain)
            .collect()
    }

    /// The namespace names that have at least one domain, in order of first appearance.
    pub fn namespaces(&self) -> impl Iterator<Item = &str> {
        self.namespaces.iter().map(|ns| ns.name.as_str())
    }

    /// The `[[bus]]` declarations.
    pub fn declared_buses(&self) -> &[DeclaredBus] {
        &self.buses
    }

    /// What guest `cid` may do on the bus `name` of its namespace (nothing if `cid` is
    /// not a domain: default deny, as for streams).
    pub fn bus_permit(&self, cid: Cid, name: &BusName) -> BusPermit {
        let Some(d) = self.domain(cid) else {
            return BusPermit::default();
        };
        match self
            .buses
            .iter()
            .find(|b| b.namespace == d.namespace && &b.name == name)
        {
            Some(b) => BusPermit {
                listen: b.listen.binary_search(&cid).is_ok(),
                publish: b.publish.binary_search(&cid).is_ok(),
                create: false,
            },
            None => {
                let may = self.bus_creators.binary_search(&cid).is_ok();
                BusPermit {
                    listen: may,
                    publish: may,
                    create: may,
                }
            }
        }
    }

    fn compiled(&self, cid: Cid) -> Option<&CompiledDomain> {
        self.by_cid.get(&cid).map(|&index| &self.domains[index])
    }
}

fn verdict(allowed: bool) -> Verdict {
    if allowed {
        Verdict::Allow
    } else {
        Verdict::Deny(DenyReason::NoRule)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STREAM: SocketType = SocketType::Stream;
    const SEQPACKET: SocketType = SocketType::SeqPacket;

    fn domain(cid: u64, name: &str, namespace: &str, groups: &[&str]) -> Domain {
        Domain {
            cid: Cid(cid),
            name: name.to_owned(),
            namespace: namespace.to_owned(),
            groups: groups.iter().map(|g| (*g).to_owned()).collect(),
        }
    }

    /// default: web(3) front, db(4) back, cache(5) front+back, lone(6) no group;
    /// tenant-a: web(10) front, db(11); tenant-b: x(20), y(21).
    fn domains() -> Vec<Domain> {
        vec![
            domain(3, "web", "default", &["front"]),
            domain(4, "db", "default", &["back"]),
            domain(5, "cache", "default", &["front", "back"]),
            domain(6, "lone", "default", &[]),
            domain(10, "web", "tenant-a", &["front"]),
            domain(11, "db", "tenant-a", &[]),
            domain(20, "x", "tenant-b", &[]),
            domain(21, "y", "tenant-b", &[]),
        ]
    }

    fn rule(namespace: Option<&str>, from: &str, to: &str) -> RuleConfig {
        RuleConfig {
            namespace: namespace.map(str::to_owned),
            from: from.to_owned(),
            to: to.to_owned(),
            ports: None,
            types: None,
        }
    }

    fn with_ports(mut rule: RuleConfig, ports: &str) -> RuleConfig {
        rule.ports = Some(ports.to_owned());
        rule
    }

    fn with_types(mut rule: RuleConfig, types: &[&str]) -> RuleConfig {
        rule.types = Some(types.iter().map(|t| (*t).to_owned()).collect());
        rule
    }

    fn compile(host: HostAccess, allow: Vec<RuleConfig>) -> Policy {
        let cfg = PolicyConfig {
            guest_to_host: host,
            allow,
            ..Default::default()
        };
        Policy::compile(&cfg, &domains()).expect("policy compiles")
    }

    fn compile_err(allow: Vec<RuleConfig>) -> PolicyError {
        let cfg = PolicyConfig {
            guest_to_host: HostAccess::Rules,
            allow,
            ..Default::default()
        };
        Policy::compile(&cfg, &domains()).expect_err("policy must not compile")
    }

    #[test]
    fn bus_permits_follow_declarations_and_creators_within_the_namespace() {
        let decl = BusDecl {
            namespace: None,
            name: "b".into(),
            policy: Some("switch".into()),
            max_message_bytes: None,
            queue_bytes: None,
            slow: None,
            join: vec!["group:back".into()],
            publish: vec!["web".into()],
        };
        let cfg = PolicyConfig {
            buses: vec![decl.clone()],
            bus_create: vec![BusCreateRule {
                namespace: Some("tenant-a".into()),
                from: "db".into(),
            }],
            ..Default::default()
        };
        let p = Policy::compile(&cfg, &domains()).expect("compiles");
        let b = BusName::new("b").unwrap();
        let permit = |cid| p.bus_permit(Cid(cid), &b);
        let (publish, listen, create) = (
            BusPermit {
                listen: true,
                publish: true,
                create: false,
            },
            BusPermit {
                listen: true,
                publish: false,
                create: false,
            },
            BusPermit {
                listen: true,
                publish: true,
                create: true,
            },
        );
        assert_eq!(permit(3), publish, "web publishes");
        assert_eq!(permit(4), listen, "db is in group back");
        assert_eq!(permit(5), listen, "cache is in group back");
        assert_eq!(permit(6), BusPermit::default(), "lone: default deny");
        assert_eq!(permit(10), BusPermit::default(), "tenant-a has no bus b");
        assert_eq!(permit(11), create, "tenant-a's db creates undeclared buses");
        assert_eq!(permit(20), BusPermit::default());
        assert_eq!(permit(99), BusPermit::default(), "unknown CID");
        let receive = domsock_proto::bus::wire::Want {
            publish: false,
            receive: true,
        };
        assert!(listen.allows(receive));
        assert!(!listen.allows(domsock_proto::bus::wire::Want::BOTH));
        assert!(!BusPermit::default().allows(receive));
        let d = &p.declared_buses()[0];
        assert_eq!(
            (d.namespace.as_str(), d.params.policy, d.params.max_message),
            ("default", BusPolicy::Switch, 64 << 10)
        );

        let err = |decls: Vec<BusDecl>, create: Vec<BusCreateRule>| {
            let cfg = PolicyConfig {
                buses: decls,
                bus_create: create,
                ..Default::default()
            };
            Policy::compile(&cfg, &domains()).expect_err("must not compile")
        };
        let with = |f: &dyn Fn(&mut BusDecl)| {
            let mut d = decl.clone();
            f(&mut d);
            err(vec![d], Vec::new()).to_string()
        };
        assert!(with(&|d| d.policy = Some("mesh".into())).contains("mesh"));
        assert!(with(&|d| d.slow = Some("block".into())).contains("block"));
        assert!(with(&|d| d.join = vec!["nobody".into()]).contains("nobody"));
        assert!(with(&|d| d.publish = vec!["group:none".into()]).contains("none"));
        assert!(with(&|d| d.name = "no/slash".into()).contains("bus name"));
        assert!(with(&|d| d.namespace = Some("blue".into())).contains("blue"));
        assert!(with(&|d| {
            d.max_message_bytes = Some(4096);
            d.queue_bytes = Some(1024);
        })
        .contains("queue_bytes"));
        assert!(matches!(
            err(vec![decl.clone(), decl.clone()], Vec::new()),
            PolicyError::DuplicateBus { .. }
        ));
        let bad_create = BusCreateRule {
            namespace: None,
            from: "group:ops".into(),
        };
        assert!(matches!(
            err(Vec::new(), vec![bad_create]),
            PolicyError::BadBusCreate { index: 0, .. }
        ));
    }

    fn g2g(p: &Policy, from: u64, to: u64, port: u32, ty: SocketType) -> Verdict {
        p.check(Cid(from), To::Domain(Cid(to)), Port(port), ty)
    }

    fn g2h(p: &Policy, from: u64, port: u32, ty: SocketType) -> Verdict {
        p.check(Cid(from), To::Host, Port(port), ty)
    }

    const NO_RULE: Verdict = Verdict::Deny(DenyReason::NoRule);
    const OTHER_NS: Verdict = Verdict::Deny(DenyReason::OtherNamespace);
    const UNKNOWN: Verdict = Verdict::Deny(DenyReason::UnknownDomain);

    #[test]
    fn default_deny_between_domains() {
        let p = compile(HostAccess::Allow, vec![]);
        assert_eq!(g2g(&p, 6, 3, 1234, STREAM), NO_RULE);
        assert_eq!(g2g(&p, 3, 6, 1234, STREAM), NO_RULE);
        // web (front) and db (back) share no group.
        assert_eq!(g2g(&p, 3, 4, 1234, SEQPACKET), NO_RULE);
        assert_eq!(g2g(&p, 20, 21, 1, STREAM), NO_RULE);
        assert!(!g2g(&p, 20, 21, 1, STREAM).is_allowed());
    }

    #[test]
    fn shared_group_allows_any_port_and_type_both_ways() {
        let p = compile(HostAccess::Rules, vec![]);
        for (a, b) in [(3, 5), (5, 3), (4, 5), (5, 4)] {
            for port in [0, 1, 5000, u32::MAX] {
                for ty in [STREAM, SEQPACKET] {
                    assert_eq!(g2g(&p, a, b, port, ty), Verdict::Allow, "{a}->{b}:{port}");
                }
            }
        }
        // Sharing a group with a common peer is not transitive.
        assert_eq!(g2g(&p, 3, 4, 80, STREAM), NO_RULE);
    }

    #[test]
    fn groups_do_not_cross_namespaces() {
        let p = compile(HostAccess::Allow, vec![]);
        // Both are "web" in group "front", in different namespaces.
        assert_eq!(g2g(&p, 3, 10, 80, STREAM), OTHER_NS);
        assert_eq!(g2g(&p, 10, 3, 80, STREAM), OTHER_NS);
        assert_eq!(g2g(&p, 5, 10, 80, STREAM), OTHER_NS);
    }

    #[test]
    fn allow_all_in_two_namespaces_still_isolates_them() {
        let p = compile(
            HostAccess::Rules,
            vec![
                rule(Some("tenant-a"), "*", "*"),
                rule(Some("tenant-b"), "*", "*"),
            ],
        );
        assert_eq!(g2g(&p, 10, 11, 80, STREAM), Verdict::Allow);
        assert_eq!(g2g(&p, 11, 10, 80, SEQPACKET), Verdict::Allow);
        assert_eq!(g2g(&p, 20, 21, 80, STREAM), Verdict::Allow);
        assert_eq!(g2g(&p, 21, 20, 80, STREAM), Verdict::Allow);
        for (a, b) in [
            (10, 20),
            (20, 10),
            (11, 21),
            (21, 11),
            (10, 3),
            (3, 10),
            (20, 6),
        ] {
            assert_eq!(g2g(&p, a, b, 80, STREAM), OTHER_NS, "{a}->{b}");
        }
        // The default namespace got no rule.
        assert_eq!(g2g(&p, 6, 3, 80, STREAM), NO_RULE);
    }

    #[test]
    fn rule_namespace_defaults_to_default() {
        let p = compile(HostAccess::Allow, vec![rule(None, "web", "db")]);
        assert_eq!(g2g(&p, 3, 4, 80, STREAM), Verdict::Allow);
        // Same names in tenant-a are not affected.
        assert_eq!(g2g(&p, 10, 11, 80, STREAM), NO_RULE);
    }

    #[test]
    fn rules_are_directional() {
        let p = compile(HostAccess::Allow, vec![rule(None, "web", "db")]);
        assert_eq!(g2g(&p, 3, 4, 80, STREAM), Verdict::Allow);
        assert_eq!(g2g(&p, 4, 3, 80, STREAM), NO_RULE);
    }

    #[test]
    fn group_and_star_patterns_in_rules() {
        let p = compile(
            HostAccess::Allow,
            vec![
                rule(None, "group:front", "group:back"),
                rule(None, "*", "lone"),
                rule(Some("tenant-a"), "db", "*"),
            ],
        );
        // front = {web, cache}, back = {db, cache}.
        assert_eq!(g2g(&p, 3, 4, 80, STREAM), Verdict::Allow);
        assert_eq!(g2g(&p, 4, 3, 80, STREAM), NO_RULE);
        for from in [3, 4, 5] {
            assert_eq!(g2g(&p, from, 6, 80, STREAM), Verdict::Allow, "{from}->lone");
        }
        assert_eq!(g2g(&p, 6, 3, 80, STREAM), NO_RULE);
        // `*` as target includes the sender itself.
        assert_eq!(g2g(&p, 11, 10, 80, STREAM), Verdict::Allow);
        assert_eq!(g2g(&p, 11, 11, 80, STREAM), Verdict::Allow);
        assert_eq!(g2g(&p, 10, 11, 80, STREAM), NO_RULE);
    }

    #[test]
    fn connecting_to_itself_needs_a_group_or_rule() {
        let p = compile(HostAccess::Allow, vec![]);
        assert_eq!(g2g(&p, 6, 6, 80, STREAM), NO_RULE);
        assert_eq!(g2g(&p, 11, 11, 80, STREAM), NO_RULE);
        // web is in group "front", which it shares with itself.
        assert_eq!(g2g(&p, 3, 3, 80, STREAM), Verdict::Allow);
        let p = compile(HostAccess::Allow, vec![rule(None, "lone", "lone")]);
        assert_eq!(g2g(&p, 6, 6, 80, STREAM), Verdict::Allow);
    }

    #[test]
    fn port_ranges_are_inclusive() {
        let p = compile(
            HostAccess::Allow,
            vec![
                with_ports(rule(None, "web", "db"), "5000-5010"),
                with_ports(rule(None, "web", "lone"), "22"),
                with_ports(rule(None, "db", "lone"), "0-4294967295"),
                with_ports(rule(None, "lone", "db"), "7-7"),
            ],
        );
        assert_eq!(g2g(&p, 3, 4, 4999, STREAM), NO_RULE);
        assert_eq!(g2g(&p, 3, 4, 5000, STREAM), Verdict::Allow);
        assert_eq!(g2g(&p, 3, 4, 5005, STREAM), Verdict::Allow);
        assert_eq!(g2g(&p, 3, 4, 5010, STREAM), Verdict::Allow);
        assert_eq!(g2g(&p, 3, 4, 5011, STREAM), NO_RULE);
        assert_eq!(g2g(&p, 3, 6, 21, STREAM), NO_RULE);
        assert_eq!(g2g(&p, 3, 6, 22, STREAM), Verdict::Allow);
        assert_eq!(g2g(&p, 3, 6, 23, STREAM), NO_RULE);
        assert_eq!(g2g(&p, 4, 6, 0, STREAM), Verdict::Allow);
        assert_eq!(g2g(&p, 4, 6, u32::MAX, STREAM), Verdict::Allow);
        assert_eq!(g2g(&p, 6, 4, 6, STREAM), NO_RULE);
        assert_eq!(g2g(&p, 6, 4, 7, STREAM), Verdict::Allow);
        assert_eq!(g2g(&p, 6, 4, 8, STREAM), NO_RULE);
    }

    #[test]
    fn star_ports_match_every_port() {
        let p = compile(
            HostAccess::Allow,
            vec![with_ports(rule(None, "web", "db"), "*")],
        );
        for port in [0, 1, 65535, u32::MAX] {
            assert_eq!(g2g(&p, 3, 4, port, STREAM), Verdict::Allow);
        }
    }

    #[test]
    fn types_filter() {
        let p = compile(
            HostAccess::Rules,
            vec![
                with_types(rule(None, "web", "db"), &["seqpacket"]),
                with_types(rule(None, "db", "web"), &["stream"]),
                with_types(rule(None, "lone", "web"), &["stream", "seqpacket"]),
                with_types(rule(None, "lone", "host"), &["seqpacket"]),
            ],
        );
        assert_eq!(g2g(&p, 3, 4, 80, SEQPACKET), Verdict::Allow);
        assert_eq!(g2g(&p, 3, 4, 80, STREAM), NO_RULE);
        assert_eq!(g2g(&p, 4, 3, 80, STREAM), Verdict::Allow);
        assert_eq!(g2g(&p, 4, 3, 80, SEQPACKET), NO_RULE);
        assert_eq!(g2g(&p, 6, 3, 80, STREAM), Verdict::Allow);
        assert_eq!(g2g(&p, 6, 3, 80, SEQPACKET), Verdict::Allow);
        assert_eq!(g2h(&p, 6, 80, SEQPACKET), Verdict::Allow);
        assert_eq!(g2h(&p, 6, 80, STREAM), NO_RULE);
    }

    #[test]
    fn rules_add_up() {
        let p = compile(
            HostAccess::Allow,
            vec![
                with_types(with_ports(rule(None, "web", "db"), "80"), &["stream"]),
                with_types(with_ports(rule(None, "web", "db"), "443"), &["seqpacket"]),
            ],
        );
        assert_eq!(g2g(&p, 3, 4, 80, STREAM), Verdict::Allow);
        assert_eq!(g2g(&p, 3, 4, 443, SEQPACKET), Verdict::Allow);
        assert_eq!(g2g(&p, 3, 4, 80, SEQPACKET), NO_RULE);
        assert_eq!(g2g(&p, 3, 4, 443, STREAM), NO_RULE);
    }

    #[test]
    fn host_access_allow_lets_every_domain_reach_every_host_port() {
        let p = compile(HostAccess::Allow, vec![]);
        for cid in [3, 6, 11, 21] {
            for port in [0, 22, u32::MAX] {
                for ty in [STREAM, SEQPACKET] {
                    assert_eq!(g2h(&p, cid, port, ty), Verdict::Allow);
                }
            }
        }
        assert_eq!(g2h(&p, 99, 22, STREAM), UNKNOWN);
    }

    #[test]
    fn host_access_rules_needs_a_host_rule() {
        let p = compile(HostAccess::Rules, vec![]);
        assert_eq!(g2h(&p, 3, 22, STREAM), NO_RULE);

        let p = compile(
            HostAccess::Rules,
            vec![
                with_ports(rule(None, "web", "host"), "22"),
                rule(Some("tenant-a"), "*", "host"),
                rule(Some("tenant-b"), "*", "*"),
            ],
        );
        assert_eq!(g2h(&p, 3, 22, STREAM), Verdict::Allow);
        assert_eq!(g2h(&p, 3, 23, STREAM), NO_RULE);
        assert_eq!(g2h(&p, 4, 22, STREAM), NO_RULE);
        assert_eq!(g2h(&p, 10, 1, SEQPACKET), Verdict::Allow);
        assert_eq!(g2h(&p, 11, u32::MAX, STREAM), Verdict::Allow);
        // `to = "*"` means every domain, never the host.
        assert_eq!(g2h(&p, 20, 22, STREAM), NO_RULE);
        assert_eq!(g2g(&p, 20, 21, 22, STREAM), Verdict::Allow);
        // A host rule does not open guest targets.
        assert_eq!(g2g(&p, 10, 11, 22, STREAM), NO_RULE);
    }

    #[test]
    fn host_rules_compile_under_host_access_allow() {
        let p = compile(
            HostAccess::Allow,
            vec![with_ports(rule(None, "web", "host"), "22")],
        );
        assert_eq!(g2h(&p, 4, 23, STREAM), Verdict::Allow);
    }

    #[test]
    fn unknown_cids_are_denied() {
        let p = compile(HostAccess::Allow, vec![rule(None, "*", "*")]);
        assert_eq!(g2g(&p, 99, 3, 80, STREAM), UNKNOWN);
        assert_eq!(g2g(&p, 3, 99, 80, STREAM), UNKNOWN);
        assert_eq!(g2g(&p, 3, 2, 80, STREAM), UNKNOWN);
        assert_eq!(g2h(&p, 2, 80, STREAM), UNKNOWN);
    }

    #[test]
    fn to_from_cid_maps_the_host_cid() {
        assert_eq!(To::from_cid(Cid::HOST), To::Host);
        assert_eq!(To::from_cid(Cid(3)), To::Domain(Cid(3)));
        assert_eq!(To::Host.to_string(), "host");
        assert_eq!(To::Domain(Cid(7)).to_string(), "cid 7");
        assert_eq!(DenyReason::OtherNamespace.to_string(), "other-namespace");
    }

    #[test]
    fn unknown_namespace_is_an_error() {
        assert_eq!(
            compile_err(vec![rule(Some("tenant-c"), "*", "*")]),
            PolicyError::UnknownNamespace {
                rule: 0,
                namespace: "tenant-c".into()
            }
        );
        // Without domains in "default", a rule without a namespace has nothing to refer to.
        let cfg = PolicyConfig {
            guest_to_host: HostAccess::Allow,
            allow: vec![rule(None, "*", "*")],
            ..Default::default()
        };
        let err = Policy::compile(&cfg, &[domain(3, "a", "ns", &[])]).unwrap_err();
        assert_eq!(
            err,
            PolicyError::UnknownNamespace {
                rule: 0,
                namespace: "default".into()
            }
        );
    }

    #[test]
    fn unknown_name_is_an_error_even_if_another_namespace_has_it() {
        assert_eq!(
            compile_err(vec![rule(None, "*", "*"), rule(None, "wbe", "db")]),
            PolicyError::UnknownName {
                rule: 1,
                namespace: "default".into(),
                name: "wbe".into()
            }
        );
        assert_eq!(
            compile_err(vec![rule(Some("tenant-b"), "x", "web")]),
            PolicyError::UnknownName {
                rule: 0,
                namespace: "tenant-b".into(),
                name: "web".into()
            }
        );
        // Empty pattern.
        assert!(matches!(
            compile_err(vec![rule(None, "", "db")]),
            PolicyError::UnknownName { rule: 0, .. }
        ));
    }

    #[test]
    fn unknown_group_is_an_error_even_if_another_namespace_has_it() {
        assert_eq!(
            compile_err(vec![rule(None, "group:frnt", "*")]),
            PolicyError::UnknownGroup {
                rule: 0,
                namespace: "default".into(),
                group: "frnt".into()
            }
        );
        assert_eq!(
            compile_err(vec![rule(Some("tenant-b"), "*", "group:front")]),
            PolicyError::UnknownGroup {
                rule: 0,
                namespace: "tenant-b".into(),
                group: "front".into()
            }
        );
    }

    #[test]
    fn bad_ports_are_errors() {
        let cases: &[(&str, PortRangeError)] = &[
            ("", PortRangeError::NotANumber(String::new())),
            ("abc", PortRangeError::NotANumber("abc".into())),
            ("+5", PortRangeError::NotANumber("+5".into())),
            (" 5", PortRangeError::NotANumber(" 5".into())),
            ("-5", PortRangeError::NotANumber(String::new())),
            ("5-", PortRangeError::NotANumber(String::new())),
            ("1-2-3", PortRangeError::NotANumber("2-3".into())),
            (
                "4294967296",
                PortRangeError::NotANumber("4294967296".into()),
            ),
            ("**", PortRangeError::NotANumber("**".into())),
            (
                "5010-5000",
                PortRangeError::Reversed {
                    start: 5010,
                    end: 5000,
                },
            ),
        ];
        for (text, expected) in cases {
            assert_eq!(
                compile_err(vec![with_ports(rule(None, "web", "db"), text)]),
                PolicyError::BadPorts {
                    rule: 0,
                    ports: (*text).to_owned(),
                    source: expected.clone()
                },
                "{text:?}"
            );
        }
    }

    #[test]
    fn bad_types_are_errors() {
        assert_eq!(
            compile_err(vec![with_types(
                rule(None, "web", "db"),
                &["stream", "dgram"]
            )]),
            PolicyError::BadType {
                rule: 0,
                ty: "dgram".into()
            }
        );
        assert_eq!(
            compile_err(vec![with_types(rule(None, "web", "db"), &["Stream"])]),
            PolicyError::BadType {
                rule: 0,
                ty: "Stream".into()
            }
        );
        assert_eq!(
            compile_err(vec![with_types(rule(None, "web", "db"), &[])]),
            PolicyError::EmptyTypes { rule: 0 }
        );
    }

    #[test]
    fn host_as_source_is_an_error() {
        assert_eq!(
            compile_err(vec![rule(None, "host", "web")]),
            PolicyError::HostAsSource { rule: 0 }
        );
    }

    #[test]
    fn duplicate_domains_are_errors() {
        let cfg = PolicyConfig::default();
        let err = Policy::compile(
            &cfg,
            &[domain(3, "a", "default", &[]), domain(3, "b", "x", &[])],
        )
        .unwrap_err();
        assert_eq!(err, PolicyError::DuplicateCid(Cid(3)));
        let err = Policy::compile(&cfg, &[domain(3, "a", "x", &[]), domain(4, "a", "x", &[])])
            .unwrap_err();
        assert_eq!(
            err,
            PolicyError::DuplicateName {
                namespace: "x".into(),
                name: "a".into()
            }
        );
        // The same name in two namespaces is fine.
        Policy::compile(&cfg, &[domain(3, "a", "x", &[]), domain(4, "a", "y", &[])]).unwrap();
    }

    #[test]
    fn errors_name_rule_and_text() {
        let err = compile_err(vec![with_ports(rule(None, "web", "db"), "9-1")]);
        assert_eq!(err.to_string(), "policy.allow[0]: bad ports \"9-1\"");
        let source = std::error::Error::source(&err).expect("cause kept as source");
        assert_eq!(source.to_string(), "range start 9 is above its end 1");
        let err = compile_err(vec![rule(None, "*", "*"), rule(None, "*", "dbb")]);
        assert_eq!(
            err.to_string(),
            "policy.allow[1]: no domain \"dbb\" in namespace \"default\""
        );
    }

    #[test]
    fn duplicate_groups_on_a_domain_are_harmless() {
        let cfg = PolicyConfig::default();
        let p = Policy::compile(
            &cfg,
            &[
                domain(3, "a", "default", &["g", "g", "h"]),
                domain(4, "b", "default", &["h"]),
                domain(5, "c", "default", &["g"]),
            ],
        )
        .unwrap();
        assert_eq!(g2g(&p, 3, 4, 1, STREAM), Verdict::Allow);
        assert_eq!(g2g(&p, 5, 3, 1, STREAM), Verdict::Allow);
        assert_eq!(g2g(&p, 4, 5, 1, STREAM), NO_RULE);
    }

    #[test]
    fn resolve_is_scoped_to_the_callers_namespace() {
        let p = compile(HostAccess::Allow, vec![]);
        assert_eq!(p.resolve(Cid(6), "web"), Some(Cid(3)));
        assert_eq!(p.resolve(Cid(11), "web"), Some(Cid(10)));
        assert_eq!(p.resolve(Cid(3), "web"), Some(Cid(3)));
        assert_eq!(p.resolve(Cid(3), "x"), None);
        assert_eq!(p.resolve(Cid(20), "db"), None);
        assert_eq!(p.resolve(Cid(99), "web"), None);
        assert_eq!(p.resolve(Cid(3), "WEB"), None);
    }

    #[test]
    fn visible_is_scoped_and_sorted_by_name() {
        let p = compile(HostAccess::Allow, vec![]);
        let names = |cid| -> Vec<(String, Cid)> {
            p.visible(Cid(cid))
                .into_iter()
                .map(|d| (d.name.clone(), d.cid))
                .collect()
        };
        let default = vec![
            ("cache".to_owned(), Cid(5)),
            ("db".to_owned(), Cid(4)),
            ("lone".to_owned(), Cid(6)),
            ("web".to_owned(), Cid(3)),
        ];
        assert_eq!(names(3), default);
        assert_eq!(names(6), default);
        assert_eq!(
            names(10),
            vec![("db".to_owned(), Cid(11)), ("web".to_owned(), Cid(10))]
        );
        assert!(p.visible(Cid(99)).is_empty());
    }

    #[test]
    fn domain_lookup_and_listing() {
        let p = compile(HostAccess::Allow, vec![]);
        assert_eq!(
            p.domain(Cid(10)),
            Some(&domain(10, "web", "tenant-a", &["front"]))
        );
        assert_eq!(p.domain(Cid(2)), None);
        assert_eq!(p.domains().count(), domains().len());
        assert_eq!(
            p.namespaces().collect::<Vec<_>>(),
            ["default", "tenant-a", "tenant-b"]
        );
    }

    #[test]
    fn deserializes_from_toml() {
        #[derive(Deserialize)]
        struct File {
            policy: PolicyConfig,
        }
        let text = r#"
            [policy]
            guest-to-host = "rules"
            [[policy.allow]]
            namespace = "tenant-a"
            from = "web"
            to = "db"
            ports = "5000-5010"
            types = ["stream", "seqpacket"]
            [[policy.allow]]
            from = "*"
            to = "host"
        "#;
        let file: File = toml::from_str(text).unwrap();
        assert_eq!(
            file.policy,
            PolicyConfig {
                guest_to_host: HostAccess::Rules,
                allow: vec![
                    with_types(
                        with_ports(rule(Some("tenant-a"), "web", "db"), "5000-5010"),
                        &["stream", "seqpacket"]
                    ),
                    rule(None, "*", "host"),
                ],
                ..Default::default()
            }
        );
        let p = Policy::compile(&file.policy, &domains()).unwrap();
        assert_eq!(g2g(&p, 10, 11, 5010, STREAM), Verdict::Allow);
        assert_eq!(g2h(&p, 3, 1, STREAM), Verdict::Allow);
        assert_eq!(g2h(&p, 10, 1, STREAM), NO_RULE);

        let empty: PolicyConfig = toml::from_str("").unwrap();
        assert_eq!(empty, PolicyConfig::default());
        assert_eq!(empty.guest_to_host, HostAccess::Allow);

        assert!(toml::from_str::<PolicyConfig>("guest-to-host = \"deny\"").is_err());
        assert!(toml::from_str::<PolicyConfig>("guest_to_host = \"allow\"").is_err());
        assert!(toml::from_str::<PolicyConfig>(
            "[[allow]]\nfrom = \"a\"\nto = \"b\"\nport = \"1\""
        )
        .is_err());
        assert!(toml::from_str::<PolicyConfig>("[[allow]]\nfrom = \"a\"").is_err());
    }

    /// Compares `check` with a direct reading of the rules over every domain pair, a set of
    /// edge ports and both types.
    #[test]
    fn check_agrees_with_a_naive_reading_of_the_rules() {
        let rules = vec![
            with_ports(rule(None, "group:front", "db"), "5000-5010"),
            with_types(rule(None, "lone", "group:back"), &["seqpacket"]),
            with_ports(rule(None, "db", "host"), "22"),
            with_ports(rule(Some("tenant-a"), "*", "*"), "80"),
            with_types(
                with_ports(rule(Some("tenant-b"), "x", "host"), "1-3"),
                &["stream"],
            ),
            rule(Some("tenant-b"), "y", "x"),
        ];
        let all = domains();
        let p = compile(HostAccess::Rules, rules.clone());
        let selects = |d: &Domain, ns: &str, pattern: &str| {
            d.namespace == ns
                && (pattern == "*"
                    || pattern == d.name
                    || pattern
                        .strip_prefix(GROUP_PREFIX)
                        .is_some_and(|g| d.groups.iter().any(|dg| dg == g)))
        };
        let rule_allows = |from: &Domain, to: Option<&Domain>, port: u32, ty: SocketType| {
            rules.iter().any(|r| {
                let ns = r.namespace.as_deref().unwrap_or(DEFAULT_NAMESPACE);
                let ports = parse_ports(r.ports.as_deref().unwrap_or("*")).unwrap();
                let ty_name = match ty {
                    SocketType::Stream => "stream",
                    SocketType::SeqPacket => "seqpacket",
                };
                let ty_ok = r
                    .types
                    .as_ref()
                    .is_none_or(|t| t.iter().any(|t| t == ty_name));
                let to_ok = match to {
                    None => r.to == HOST_KEYWORD,
                    Some(to) => r.to != HOST_KEYWORD && selects(to, ns, &r.to),
                };
                selects(from, ns, &r.from) && to_ok && ports.contains(Port(port)) && ty_ok
            })
        };
        let ports = [
            0,
            1,
            3,
            4,
            21,
            22,
            23,
            79,
            80,
            81,
            4999,
            5000,
            5010,
            5011,
            u32::MAX,
        ];
        let mut allowed = 0;
        for from in &all {
            for port in ports {
                for ty in [STREAM, SEQPACKET] {
                    let expected = if rule_allows(from, None, port, ty) {
                        Verdict::Allow
                    } else {
                        NO_RULE
                    };
                    assert_eq!(g2h(&p, from.cid.0, port, ty), expected);
                    for to in &all {
                        let expected = if from.namespace != to.namespace {
                            OTHER_NS
                        } else if from.groups.iter().any(|g| to.groups.contains(g))
                            || rule_allows(from, Some(to), port, ty)
                        {
                            Verdict::Allow
                        } else {
                            NO_RULE
                        };
                        let got = g2g(&p, from.cid.0, to.cid.0, port, ty);
                        assert_eq!(got, expected, "{} -> {} :{port} {ty:?}", from.name, to.name);
                        allowed += usize::from(got.is_allowed());
                    }
                }
            }
        }
        // The comparison is not vacuous.
        assert!(allowed > 100, "{allowed}");
    }
}
