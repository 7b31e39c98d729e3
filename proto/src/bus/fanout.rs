//! One bus's membership and fan-out decisions, sans-IO.
//!
//! [`Bus`] knows the members, what each was granted, their subscriptions (topic buses),
//! the addresses it learned (switch buses), each sender's sequence numbers and how many
//! bytes each member's queue holds. The bus service asks it, for every PUBLISH, who
//! receives the message ([`Bus::publish`]), then, per receiver, whether the message fits
//! that receiver's queue ([`Bus::offer`]); it tells it when a queued message went out
//! ([`Bus::sent`]) and asks before each delivery whether a LOSS notice must go first
//! ([`Bus::take_loss`]). The service holds the queued bytes; this type holds only their
//! accounting, so every bound is decided here and tested without sockets.
//!
//! What it does not do: the permission decision (the daemon's policy yields the
//! [`Grant`] a member joins with), randomness (the caller passes each member's token) and
//! time (the caller passes `now`).

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::time::{Duration, Instant};

use thiserror::Error;

use super::wire::{
    is_broadcast, ErrorCode, Fields, MemberId, Policy, RefuseCode, SlowPolicy, Token, Want,
    DEFAULT_MAX_MESSAGE_BYTES, MAX_TOPIC_BYTES,
};

/// What a member may do, as the policy decided at join: the same bits as
/// [`Want`], at most what the member asked for.
pub type Grant = Want;

/// Members of one bus unless configured otherwise.
pub const DEFAULT_MAX_MEMBERS: usize = 256;
/// Subscriptions of one member unless configured otherwise.
pub const DEFAULT_MAX_SUBSCRIPTIONS: usize = 64;
/// Addresses a switch bus remembers unless configured otherwise.
pub const DEFAULT_SWITCH_TABLE_ENTRIES: usize = 4096;
/// A member's queue bound unless configured otherwise.
pub const DEFAULT_QUEUE_BYTES: u32 = 1 << 20;
/// How long a parked membership waits for its REJOIN unless configured otherwise.
pub const DEFAULT_PARK_TIMEOUT: Duration = Duration::from_secs(30);

/// A bus's configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BusConfig {
    /// Who receives a message.
    pub policy: Policy,
    /// What happens to a message that does not fit a receiver's queue.
    pub slow: SlowPolicy,
    /// Largest payload of one message.
    pub max_message: u32,
    /// Bytes each member's queue holds at most (frames as sent, heads included).
    pub queue_bytes: u32,
    /// Members at most.
    pub max_members: usize,
    /// Subscriptions per member at most.
    pub max_subscriptions: usize,
    /// Learned addresses at most (switch); the oldest learned is forgotten first.
    pub switch_table_entries: usize,
    /// How long a parked membership is kept.
    pub park_timeout: Duration,
}

impl BusConfig {
    /// The defaults for a bus of `policy`.
    pub fn new(policy: Policy) -> BusConfig {
        BusConfig {
            policy,
            slow: SlowPolicy::Drop,
            max_message: DEFAULT_MAX_MESSAGE_BYTES,
            queue_bytes: DEFAULT_QUEUE_BYTES,
            max_members: DEFAULT_MAX_MEMBERS,
            max_subscriptions: DEFAULT_MAX_SUBSCRIPTIONS,
            switch_table_entries: DEFAULT_SWITCH_TABLE_ENTRIES,
            park_timeout: DEFAULT_PARK_TIMEOUT,
        }
    }
}

/// Why a JOIN or REJOIN is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum JoinError {
    /// The bus has [`BusConfig::max_members`] members.
    #[error("the bus has its maximum of {0} members")]
    Full(usize),
    /// The grant allows neither publishing nor receiving.
    #[error("the member may neither publish nor receive")]
    Nothing,
    /// The token is taken (the caller's randomness repeated itself).
    #[error("membership token already in use")]
    TokenInUse,
    /// No parked membership has this token.
    #[error("no parked membership has this token")]
    UnknownToken,
}

impl JoinError {
    /// The REFUSED code a member is told.
    pub fn code(&self) -> RefuseCode {
        match self {
            JoinError::Full(_) => RefuseCode::Full,
            JoinError::Nothing => RefuseCode::Denied,
            JoinError::TokenInUse => RefuseCode::Full,
            JoinError::UnknownToken => RefuseCode::UnknownToken,
        }
    }
}

/// Why one request of a member failed; its membership stays.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum RequestError {
    /// Not a member (never joined, left, or disconnected as a slow member).
    #[error("not a member of the bus")]
    NotJoined,
    /// A PUBLISH without publish permission, or a SUBSCRIBE without receive permission.
    #[error("not permitted: the member may not {0}")]
    NotPermitted(&'static str),
    /// A payload larger than the bus's maximum.
    #[error("message of {len} bytes, the bus takes at most {max}")]
    TooLarge {
        /// The payload's length.
        len: usize,
        /// The bus's maximum.
        max: u32,
    },
    /// Fields that are not the bus policy's.
    #[error("message fields do not match the bus's {0} policy")]
    Fields(Policy),
    /// A subscription on a bus whose policy is not topic.
    #[error("subscriptions are for topic buses; this one is {0}")]
    NotTopic(Policy),
    /// A subscription beyond the per-member bound.
    #[error("at most {0} subscriptions per member")]
    TooManySubscriptions(usize),
}

impl RequestError {
    /// The ERROR code a member is told.
    pub fn code(&self) -> ErrorCode {
        match self {
            RequestError::NotJoined => ErrorCode::NotJoined,
            RequestError::NotPermitted(_) => ErrorCode::NotPermitted,
            RequestError::TooLarge { .. } => ErrorCode::TooLarge,
            RequestError::Fields(_) | RequestError::NotTopic(_) => ErrorCode::Fields,
            RequestError::TooManySubscriptions(_) => ErrorCode::TooManySubscriptions,
        }
    }
}

/// What happens to one message for one receiver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum Offer {
    /// Queue it (its bytes are now counted against the receiver's bound).
    Queue,
    /// It did not fit: dropped for this receiver and counted.
    Dropped,
    /// It did not fit and the bus disconnects slow members: the membership has ended;
    /// close the receiver's connection and drop its queue.
    Disconnect,
}

/// What a member lost, told by a LOSS frame or at REJOIN.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Loss {
    /// Messages dropped.
    pub messages: u64,
    /// Their frame bytes.
    pub bytes: u64,
}

/// A bus's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BusCounters {
    /// PUBLISHes accepted.
    pub published: u64,
    /// Messages queued for a receiver.
    pub queued: u64,
    /// Messages dropped for a receiver whose queue was full.
    pub dropped: u64,
    /// Members disconnected as slow.
    pub disconnected: u64,
    /// Requests refused (every [`RequestError`]).
    pub refused_requests: u64,
    /// Addresses learned (switch), first time or moved to another member.
    pub learned: u64,
    /// Learned addresses forgotten because the table was full.
    pub table_evictions: u64,
    /// Parked memberships that expired.
    pub expired: u64,
}

#[derive(Debug)]
struct Member {
    token: Token,
    grant: Grant,
    /// `Some(since)` while its connection is gone.
    parked: Option<Instant>,
    next_seq: u64,
    queued_bytes: u64,
    /// Dropped since the last LOSS (or REJOIN) told it.
    untold: Loss,
    subscriptions: BTreeSet<Vec<u8>>,
}

/// One bus (see the module doc).
#[derive(Debug)]
pub struct Bus {
    cfg: BusConfig,
    members: BTreeMap<MemberId, Member>,
    by_token: HashMap<Token, MemberId>,
    next_id: u32,
    /// Topic buses: prefix -> subscribers.
    topics: BTreeMap<Vec<u8>, BTreeSet<MemberId>>,
    /// Switch buses: address -> member, and the order addresses were learned in.
    table: HashMap<Vec<u8>, MemberId>,
    learned_order: VecDeque<Vec<u8>>,
    counters: BusCounters,
}

impl Bus {
    /// An empty bus.
    pub fn new(cfg: BusConfig) -> Bus {
        Bus {
            cfg,
            members: BTreeMap::new(),
            by_token: HashMap::new(),
            next_id: 1,
            topics: BTreeMap::new(),
            table: HashMap::new(),
            learned_order: VecDeque::new(),
            counters: BusCounters::default(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &BusConfig {
        &self.cfg
    }

    /// The counters.
    pub fn counters(&self) -> BusCounters {
        self.counters
    }

    /// Members, parked ones included.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Whether the bus has no members.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Whether `id` is a member whose connection is gone.
    pub fn is_parked(&self, id: MemberId) -> bool {
        self.members.get(&id).is_some_and(|m| m.parked.is_some())
    }

    /// What `id` was granted, if it is a member.
    pub fn grant(&self, id: MemberId) -> Option<Grant> {
        self.members.get(&id).map(|m| m.grant)
    }

    /// Bytes queued for `id` (0 for a non-member).
    pub fn queued_bytes(&self, id: MemberId) -> u64 {
        self.members.get(&id).map_or(0, |m| m.queued_bytes)
    }

    /// A new member with `grant` and the REJOIN secret `token`.
    pub fn join(&mut self, grant: Grant, token: Token) -> Result<MemberId, JoinError> {
        if !grant.publish && !grant.receive {
            return Err(JoinError::Nothing);
        }
        if self.members.len() >= self.cfg.max_members {
            return Err(JoinError::Full(self.cfg.max_members));
        }
        if self.by_token.contains_key(&token) {
            return Err(JoinError::TokenInUse);
        }
        // Ids are not reused while a member holds one; after 2^32 joins they wrap and skip
        // those in use (the bus has at most `max_members`, so one is free).
        let id = loop {
            let id = MemberId(self.next_id);
            self.next_id = self.next_id.wrapping_add(1).max(1);
            if !self.members.contains_key(&id) {
                break id;
            }
        };
        self.members.insert(
            id,
            Member {
                token,
                grant,
                parked: None,
                next_seq: 1,
                queued_bytes: 0,
                untold: Loss::default(),
                subscriptions: BTreeSet::new(),
            },
        );
        self.by_token.insert(token, id);
        Ok(id)
    }

    /// The member's connection is gone: it stays a member, its messages queue up to its
    /// bound, and [`Bus::rejoin`] takes it back until the park timeout.
    pub fn park(&mut self, id: MemberId, now: Instant) {
        if let Some(m) = self.members.get_mut(&id) {
            m.parked.get_or_insert(now);
        }
    }

    /// The member `token` belongs to, if any.
    pub fn member_of(&self, token: &Token) -> Option<MemberId> {
        self.by_token.get(token).copied()
    }

    /// Takes back the parked membership of `token`: its id, and what it lost while away
    /// (told in JOINED; no LOSS follows for it).
    pub fn rejoin(&mut self, token: &Token) -> Result<(MemberId, Loss), JoinError> {
        let id = *self.by_token.get(token).ok_or(JoinError::UnknownToken)?;
        let m = self.members.get_mut(&id).ok_or(JoinError::UnknownToken)?;
        m.parked = None;
        Ok((id, std::mem::take(&mut m.untold)))
    }

    /// Ends parked memberships older than the park timeout; returns them (their queues go).
    pub fn expire(&mut self, now: Instant) -> Vec<MemberId> {
        let timeout = self.cfg.park_timeout;
        let gone: Vec<MemberId> = self
            .members
            .iter()
            .filter(|(_, m)| {
                m.parked
                    .is_some_and(|since| now.saturating_duration_since(since) >= timeout)
            })
            .map(|(&id, _)| id)
            .collect();
        for &id in &gone {
            self.leave(id);
            self.counters.expired += 1;
        }
        gone
    }

    /// Ends a membership (LEAVE, or its connection closed for good); false if `id` was
    /// not a member.
    pub fn leave(&mut self, id: MemberId) -> bool {
        let Some(m) = self.members.remove(&id) else {
            return false;
        };
        self.by_token.remove(&m.token);
        for prefix in &m.subscriptions {
            if let Some(set) = self.topics.get_mut(prefix) {
                set.remove(&id);
                if set.is_empty() {
                    self.topics.remove(prefix);
                }
            }
        }
        let before = self.table.len();
        self.table.retain(|_, owner| *owner != id);
        if self.table.len() != before {
            let table = &self.table;
            self.learned_order.retain(|a| table.contains_key(a));
        }
        true
    }

    fn member(&mut self, id: MemberId) -> Result<&mut Member, RequestError> {
        self.members.get_mut(&id).ok_or(RequestError::NotJoined)
    }

    fn refused<T>(&mut self, e: RequestError) -> Result<T, RequestError> {
        self.counters.refused_requests += 1;
        Err(e)
    }

    /// Subscribes `id` to topics starting with `prefix`; `Ok(false)` if it already was.
    pub fn subscribe(&mut self, id: MemberId, prefix: &[u8]) -> Result<bool, RequestError> {
        let (policy, max) = (self.cfg.policy, self.cfg.max_subscriptions);
        let checked = match self.member(id) {
            Err(e) => Err(e),
            Ok(_) if policy != Policy::Topic => Err(RequestError::NotTopic(policy)),
            Ok(m) if !m.grant.receive => Err(RequestError::NotPermitted("receive")),
            Ok(m) if m.subscriptions.contains(prefix) => return Ok(false),
            Ok(m) if m.subscriptions.len() >= max => Err(RequestError::TooManySubscriptions(max)),
            Ok(_) if prefix.len() > MAX_TOPIC_BYTES => Err(RequestError::TooLarge {
                len: prefix.len(),
                max: MAX_TOPIC_BYTES as u32,
            }),
            Ok(m) => {
                m.subscriptions.insert(prefix.to_vec());
                Ok(())
            }
        };
        match checked {
            Ok(()) => {
                self.topics.entry(prefix.to_vec()).or_default().insert(id);
                Ok(true)
            }
            Err(e) => self.refused(e),
        }
    }

    /// Drops `id`'s subscription to `prefix`; `Ok(false)` if it had none.
    pub fn unsubscribe(&mut self, id: MemberId, prefix: &[u8]) -> Result<bool, RequestError> {
        let m = match self.member(id) {
            Ok(m) => m,
            Err(e) => return self.refused(e),
        };
        if !m.subscriptions.remove(prefix) {
            return Ok(false);
        }
        if let Some(set) = self.topics.get_mut(prefix) {
            set.remove(&id);
            if set.is_empty() {
                self.topics.remove(prefix);
            }
        }
        Ok(true)
    }

    /// A PUBLISH of `payload_len` bytes with `fields` from `from`: checks it, gives it the
    /// sender's next sequence number (returned), learns its source address (switch) and
    /// fills `receivers` (cleared first) with who gets it, in member order, never the
    /// sender. A refused PUBLISH changes nothing but the refusal counter.
    pub fn publish(
        &mut self,
        from: MemberId,
        fields: &Fields<'_>,
        payload_len: usize,
        receivers: &mut Vec<MemberId>,
    ) -> Result<u64, RequestError> {
        receivers.clear();
        let (policy, max) = (self.cfg.policy, self.cfg.max_message);
        let checked = match self.members.get(&from) {
            None => Err(RequestError::NotJoined),
            Some(m) if !m.grant.publish => Err(RequestError::NotPermitted("publish")),
            Some(_) if payload_len > max as usize => Err(RequestError::TooLarge {
                len: payload_len,
                max,
            }),
            Some(_) if !fields.fit(policy) => Err(RequestError::Fields(policy)),
            Some(_) => Ok(()),
        };
        if let Err(e) = checked {
            return self.refused(e);
        }
        let seq = match self.members.get_mut(&from) {
            Some(m) => {
                let seq = m.next_seq;
                m.next_seq += 1;
                seq
            }
            None => return self.refused(RequestError::NotJoined),
        };
        self.counters.published += 1;
        let receiving = |members: &BTreeMap<MemberId, Member>, id: &MemberId| {
            *id != from && members.get(id).is_some_and(|m| m.grant.receive)
        };
        match *fields {
            Fields::None => receivers.extend(
                self.members
                    .keys()
                    .filter(|id| receiving(&self.members, id)),
            ),
            Fields::Addressed { src, dst } => {
                if !is_broadcast(src) {
                    self.learn(src, from);
                }
                match self.table.get(dst).copied() {
                    Some(owner) if !is_broadcast(dst) => {
                        if receiving(&self.members, &owner) {
                            receivers.push(owner);
                        }
                    }
                    _ => receivers.extend(
                        self.members
                            .keys()
                            .filter(|id| receiving(&self.members, id)),
                    ),
                }
            }
            Fields::Topic(topic) => {
                for len in 0..=topic.len() {
                    if let Some(set) = self.topics.get(&topic[..len]) {
                        receivers.extend(set.iter().filter(|id| receiving(&self.members, id)));
                    }
                }
                receivers.sort_unstable();
                receivers.dedup();
            }
        }
        Ok(seq)
    }

    /// Remembers that `addr` belongs to `owner`; forgets the oldest address when full.
    fn learn(&mut self, addr: &[u8], owner: MemberId) {
        match self.table.get_mut(addr) {
            Some(o) if *o == owner => return,
            Some(o) => *o = owner,
            None => {
                if self.cfg.switch_table_entries == 0 {
                    return;
                }
                while self.table.len() >= self.cfg.switch_table_entries {
                    let Some(old) = self.learned_order.pop_front() else {
                        break;
                    };
                    if self.table.remove(&old).is_some() {
                        self.counters.table_evictions += 1;
                    }
                }
                self.table.insert(addr.to_vec(), owner);
                self.learned_order.push_back(addr.to_vec());
            }
        }
        self.counters.learned += 1;
    }

    /// The member a switch bus learned `addr` for.
    pub fn owner_of(&self, addr: &[u8]) -> Option<MemberId> {
        self.table.get(addr).copied()
    }

    /// Whether a message of `frame_len` bytes (head and payload as sent) fits `to`'s
    /// queue. An empty queue always takes one message, so no message is too big for a
    /// receiver that keeps up.
    pub fn offer(&mut self, to: MemberId, frame_len: usize) -> Offer {
        let (bound, slow) = (u64::from(self.cfg.queue_bytes), self.cfg.slow);
        let Some(m) = self.members.get_mut(&to) else {
            return Offer::Dropped;
        };
        let len = frame_len as u64;
        if m.queued_bytes == 0 || m.queued_bytes + len <= bound {
            m.queued_bytes += len;
            self.counters.queued += 1;
            return Offer::Queue;
        }
        match slow {
            SlowPolicy::Drop => {
                m.untold.messages += 1;
                m.untold.bytes += len;
                self.counters.dropped += 1;
                Offer::Dropped
            }
            SlowPolicy::Disconnect => {
                self.leave(to);
                self.counters.disconnected += 1;
                Offer::Disconnect
            }
        }
    }

    /// A queued message of `frame_len` bytes went out to `to`.
    pub fn sent(&mut self, to: MemberId, frame_len: usize) {
        if let Some(m) = self.members.get_mut(&to) {
            m.queued_bytes = m.queued_bytes.saturating_sub(frame_len as u64);
        }
    }

    /// What `to` lost since it was last told, if anything: send a LOSS with it before the
    /// next MESSAGE. Not while parked (REJOIN tells it).
    pub fn take_loss(&mut self, to: MemberId) -> Option<Loss> {
        let m = self.members.get_mut(&to)?;
        if m.parked.is_some() || m.untold.messages == 0 {
            return None;
        }
        Some(std::mem::take(&mut m.untold))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RECV: Grant = Grant {
        publish: false,
        receive: true,
    };
    const PUB: Grant = Grant {
        publish: true,
        receive: false,
    };

    fn token(n: u8) -> Token {
        Token([n; 16])
    }

    fn bus(policy: Policy) -> Bus {
        Bus::new(BusConfig::new(policy))
    }

    fn members(b: &mut Bus, grants: &[Grant]) -> Vec<MemberId> {
        grants
            .iter()
            .enumerate()
            .map(|(i, &g)| b.join(g, token(i as u8)).unwrap())
            .collect()
    }

    fn to(b: &mut Bus, from: MemberId, fields: Fields<'_>) -> Vec<MemberId> {
        let mut r = Vec::new();
        b.publish(from, &fields, 8, &mut r).unwrap();
        r
    }

    #[test]
    fn a_hub_delivers_to_every_receiver_but_the_sender() {
        let mut b = bus(Policy::Hub);
        let m = members(&mut b, &[Grant::BOTH, Grant::BOTH, RECV, PUB]);
        assert_eq!(to(&mut b, m[0], Fields::None), [m[1], m[2]]);
        assert_eq!(to(&mut b, m[3], Fields::None), [m[0], m[1], m[2]]);
        // A receive-only member may not publish.
        let mut r = vec![m[0]];
        assert_eq!(
            b.publish(m[2], &Fields::None, 8, &mut r),
            Err(RequestError::NotPermitted("publish"))
        );
        assert!(r.is_empty());
        assert_eq!(b.counters().published, 2);
        assert_eq!(b.counters().refused_requests, 1);
    }

    #[test]
    fn each_sender_counts_its_own_publishes_from_one() {
        let mut b = bus(Policy::Hub);
        let m = members(&mut b, &[Grant::BOTH, Grant::BOTH]);
        let mut r = Vec::new();
        let seqs: Vec<u64> = [m[0], m[1], m[0], m[0], m[1]]
            .iter()
            .map(|&from| b.publish(from, &Fields::None, 1, &mut r).unwrap())
            .collect();
        assert_eq!(seqs, [1, 1, 2, 3, 2]);
    }

    #[test]
    fn a_publish_is_checked_against_the_bus() {
        let mut b = bus(Policy::Topic);
        let m = members(&mut b, &[Grant::BOTH]);
        let mut r = Vec::new();
        let max = DEFAULT_MAX_MESSAGE_BYTES;
        assert_eq!(
            b.publish(m[0], &Fields::Topic(b"t"), max as usize + 1, &mut r),
            Err(RequestError::TooLarge {
                len: max as usize + 1,
                max
            })
        );
        assert!(b
            .publish(m[0], &Fields::Topic(b"t"), max as usize, &mut r)
            .is_ok());
        assert_eq!(
            b.publish(m[0], &Fields::None, 1, &mut r),
            Err(RequestError::Fields(Policy::Topic))
        );
        assert_eq!(
            b.publish(MemberId(99), &Fields::Topic(b"t"), 1, &mut r),
            Err(RequestError::NotJoined)
        );
        assert_eq!(RequestError::Fields(Policy::Hub).code(), ErrorCode::Fields);
    }

    #[test]
    fn a_switch_learns_addresses_and_floods_the_unknown() {
        let mut b = bus(Policy::Switch);
        let m = members(&mut b, &[Grant::BOTH, Grant::BOTH, Grant::BOTH]);
        let (a0, a1, bcast) = (&[0xA0][..], &[0xA1][..], &[0xFF, 0xFF][..]);
        // Unknown destination: flooded; a0 learned for m0.
        assert_eq!(
            to(&mut b, m[0], Fields::Addressed { src: a0, dst: a1 }),
            [m[1], m[2]]
        );
        assert_eq!(b.owner_of(a0), Some(m[0]));
        // m1 answers a0: exactly one receiver, and a1 learned.
        assert_eq!(
            to(&mut b, m[1], Fields::Addressed { src: a1, dst: a0 }),
            [m[0]]
        );
        assert_eq!(
            to(
                &mut b,
                m[2],
                Fields::Addressed {
                    src: &[0xA2],
                    dst: a1
                }
            ),
            [m[1]]
        );
        // Broadcast floods even when learned as a source; a broadcast source is not learned.
        assert_eq!(
            to(
                &mut b,
                m[0],
                Fields::Addressed {
                    src: bcast,
                    dst: bcast
                }
            ),
            [m[1], m[2]]
        );
        assert_eq!(b.owner_of(bcast), None);
        // To itself: nowhere.
        assert!(to(&mut b, m[0], Fields::Addressed { src: a0, dst: a0 }).is_empty());
        // An address moves with its sender; a leaving member's addresses are forgotten.
        assert_eq!(
            to(
                &mut b,
                m[2],
                Fields::Addressed {
                    src: a0,
                    dst: &[0xEE]
                }
            ),
            [m[0], m[1]]
        );
        assert_eq!(b.owner_of(a0), Some(m[2]));
        assert!(b.leave(m[2]));
        assert_eq!(b.owner_of(a0), None);
        assert_eq!(b.owner_of(a1), Some(m[1]));
        assert_eq!(
            to(&mut b, m[1], Fields::Addressed { src: a1, dst: a0 }),
            [m[0]]
        );
    }

    #[test]
    fn a_switch_table_is_bounded_and_forgets_the_oldest() {
        let mut b = Bus::new(BusConfig {
            switch_table_entries: 3,
            ..BusConfig::new(Policy::Switch)
        });
        let m = members(&mut b, &[Grant::BOTH, Grant::BOTH]);
        for a in 1..=5u8 {
            to(
                &mut b,
                m[0],
                Fields::Addressed {
                    src: &[a],
                    dst: &[0xEE],
                },
            );
        }
        assert_eq!(b.counters().table_evictions, 2);
        assert_eq!(b.owner_of(&[1]), None);
        assert_eq!(b.owner_of(&[2]), None);
        for a in 3..=5u8 {
            assert_eq!(b.owner_of(&[a]), Some(m[0]));
        }
        // Forgotten: flooded again.
        assert_eq!(
            to(
                &mut b,
                m[1],
                Fields::Addressed {
                    src: &[9],
                    dst: &[1]
                }
            ),
            [m[0]]
        );
        assert!(b.table.len() <= 3 && b.learned_order.len() <= 3);
    }

    #[test]
    fn a_topic_bus_delivers_to_matching_prefixes_once() {
        let mut b = bus(Policy::Topic);
        let m = members(&mut b, &[Grant::BOTH, RECV, RECV, RECV]);
        assert_eq!(b.subscribe(m[1], b"temp/"), Ok(true));
        assert_eq!(b.subscribe(m[1], b"temp/k1"), Ok(true));
        assert_eq!(b.subscribe(m[1], b"temp/"), Ok(false));
        assert_eq!(b.subscribe(m[2], b"hum/"), Ok(true));
        assert_eq!(b.subscribe(m[3], b""), Ok(true));
        // The sender's own subscription does not send it its message.
        assert_eq!(b.subscribe(m[0], b"temp"), Ok(true));
        assert_eq!(to(&mut b, m[0], Fields::Topic(b"temp/k1")), [m[1], m[3]]);
        assert_eq!(to(&mut b, m[0], Fields::Topic(b"hum/k1")), [m[2], m[3]]);
        assert_eq!(to(&mut b, m[0], Fields::Topic(b"tem")), [m[3]]);
        assert_eq!(b.unsubscribe(m[1], b"temp/"), Ok(true));
        assert_eq!(b.unsubscribe(m[1], b"temp/"), Ok(false));
        assert_eq!(to(&mut b, m[0], Fields::Topic(b"temp/k2")), [m[3]]);
        assert_eq!(to(&mut b, m[0], Fields::Topic(b"temp/k1")), [m[1], m[3]]);
        // Leaving drops every subscription.
        assert!(b.leave(m[1]));
        assert_eq!(to(&mut b, m[0], Fields::Topic(b"temp/k1")), [m[3]]);
        assert!(!b.topics.contains_key(&b"temp/k1"[..]));
    }

    #[test]
    fn subscriptions_are_permitted_and_bounded() {
        let mut b = Bus::new(BusConfig {
            max_subscriptions: 2,
            ..BusConfig::new(Policy::Topic)
        });
        let m = members(&mut b, &[PUB, RECV]);
        assert_eq!(
            b.subscribe(m[0], b"x"),
            Err(RequestError::NotPermitted("receive"))
        );
        assert_eq!(b.subscribe(m[1], b"a"), Ok(true));
        assert_eq!(b.subscribe(m[1], b"b"), Ok(true));
        assert_eq!(
            b.subscribe(m[1], b"c"),
            Err(RequestError::TooManySubscriptions(2))
        );
        let mut hub = bus(Policy::Hub);
        let h = members(&mut hub, &[RECV]);
        assert_eq!(
            hub.subscribe(h[0], b"a"),
            Err(RequestError::NotTopic(Policy::Hub))
        );
    }

    #[test]
    fn a_slow_receiver_loses_messages_and_is_told_how_many() {
        let mut b = Bus::new(BusConfig {
            queue_bytes: 100,
            max_message: 100,
            ..BusConfig::new(Policy::Hub)
        });
        let m = members(&mut b, &[Grant::BOTH, RECV, RECV]);
        // An empty queue takes even a message larger than the bound.
        assert_eq!(b.offer(m[1], 150), Offer::Queue);
        assert_eq!(b.offer(m[1], 1), Offer::Dropped);
        b.sent(m[1], 150);
        assert_eq!(b.offer(m[1], 60), Offer::Queue);
        assert_eq!(b.offer(m[1], 40), Offer::Queue);
        assert_eq!(b.offer(m[1], 1), Offer::Dropped);
        assert_eq!(b.offer(m[1], 7), Offer::Dropped);
        // The other receiver is not affected.
        assert_eq!(b.offer(m[2], 60), Offer::Queue);
        assert_eq!(b.queued_bytes(m[1]), 100);
        assert_eq!(
            b.take_loss(m[1]),
            Some(Loss {
                messages: 3,
                bytes: 9
            })
        );
        assert_eq!(b.take_loss(m[1]), None);
        assert_eq!(b.take_loss(m[2]), None);
        let c = b.counters();
        assert_eq!((c.queued, c.dropped), (4, 3));
    }

    #[test]
    fn a_bus_that_disconnects_slow_members_ends_their_membership() {
        let mut b = Bus::new(BusConfig {
            queue_bytes: 10,
            max_message: 10,
            slow: SlowPolicy::Disconnect,
            ..BusConfig::new(Policy::Hub)
        });
        let m = members(&mut b, &[Grant::BOTH, RECV, RECV]);
        assert_eq!(b.offer(m[1], 10), Offer::Queue);
        assert_eq!(b.offer(m[1], 1), Offer::Disconnect);
        assert_eq!(b.counters().disconnected, 1);
        assert_eq!(to(&mut b, m[0], Fields::None), [m[2]]);
        // Its token no longer rejoins.
        assert_eq!(b.rejoin(&token(1)), Err(JoinError::UnknownToken));
    }

    #[test]
    fn a_parked_member_keeps_its_subscriptions_and_learns_its_loss_on_rejoin() {
        let t0 = Instant::now();
        let mut b = Bus::new(BusConfig {
            queue_bytes: 100,
            max_message: 50,
            ..BusConfig::new(Policy::Topic)
        });
        let m = members(&mut b, &[Grant::BOTH, RECV]);
        assert_eq!(b.subscribe(m[1], b"k"), Ok(true));
        b.park(m[1], t0);
        assert!(b.is_parked(m[1]));
        // Still a receiver while parked: queued up to its bound, then dropped.
        for _ in 0..4 {
            let r = to(&mut b, m[0], Fields::Topic(b"k1"));
            assert_eq!(r, [m[1]]);
            let _ = b.offer(m[1], 40);
        }
        assert_eq!(b.queued_bytes(m[1]), 80);
        // Not told while parked.
        assert_eq!(b.take_loss(m[1]), None);
        // Before the timeout nothing expires.
        assert!(b
            .expire(t0 + DEFAULT_PARK_TIMEOUT - Duration::from_millis(1))
            .is_empty());
        let (id, lost) = b.rejoin(&token(1)).unwrap();
        assert_eq!(id, m[1]);
        assert_eq!(
            lost,
            Loss {
                messages: 2,
                bytes: 80
            }
        );
        assert!(!b.is_parked(m[1]));
        assert_eq!(b.take_loss(m[1]), None);
        assert_eq!(to(&mut b, m[0], Fields::Topic(b"k2")), [m[1]]);
        assert_eq!(b.rejoin(&token(9)), Err(JoinError::UnknownToken));
    }

    #[test]
    fn a_parked_membership_expires_at_the_park_timeout() {
        let t0 = Instant::now();
        let mut b = bus(Policy::Hub);
        let m = members(&mut b, &[Grant::BOTH, RECV]);
        b.park(m[1], t0);
        // Parking again does not restart the clock.
        b.park(m[1], t0 + Duration::from_secs(10));
        assert!(b
            .expire(t0 + DEFAULT_PARK_TIMEOUT - Duration::from_millis(1))
            .is_empty());
        assert_eq!(b.expire(t0 + DEFAULT_PARK_TIMEOUT), [m[1]]);
        assert_eq!(b.counters().expired, 1);
        assert!(to(&mut b, m[0], Fields::None).is_empty());
        assert_eq!(b.rejoin(&token(1)), Err(JoinError::UnknownToken));
    }

    #[test]
    fn joins_are_bounded_and_ids_are_not_reused_while_held() {
        let mut b = Bus::new(BusConfig {
            max_members: 2,
            ..BusConfig::new(Policy::Hub)
        });
        assert_eq!(b.join(Grant::default(), token(0)), Err(JoinError::Nothing));
        let m1 = b.join(RECV, token(1)).unwrap();
        assert_eq!(b.join(RECV, token(1)), Err(JoinError::TokenInUse));
        let m2 = b.join(RECV, token(2)).unwrap();
        assert_eq!(b.join(RECV, token(3)), Err(JoinError::Full(2)));
        assert!(b.leave(m1));
        assert!(!b.leave(m1));
        let m3 = b.join(RECV, token(3)).unwrap();
        assert!(m3 != m1 && m3 != m2);
        // Wrapping skips ids in use.
        b.next_id = u32::MAX;
        assert!(b.leave(m3));
        let m4 = b.join(RECV, token(4)).unwrap();
        assert_eq!(m4, MemberId(u32::MAX));
        assert!(b.leave(m2));
        b.next_id = m4.0;
        let m5 = b.join(RECV, token(5)).unwrap();
        assert_eq!(m5, MemberId(1));
    }
}
