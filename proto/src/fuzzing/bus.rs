//! Fuzz bodies of the bus: the frame codec, and membership/fan-out event sequences checked
//! against a model.

use crate::bus::fanout::{Bus, BusConfig, Grant, JoinError, Offer, RequestError};
use crate::bus::wire::{
    is_broadcast, Fields, MemberFrame, MemberId, Policy, ServiceFrame, SlowPolicy, Token,
    MAX_TOPIC_BYTES,
};
use arbitrary::{Arbitrary, Unstructured};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

/// Bus frame codec. Input: one byte choosing the direction (even: member frames, odd:
/// service frames), then one frame.
///
/// Checks: decoding never panics; what decodes encodes back to exactly the input bytes
/// (the encoding is canonical), and decodes again to the same frame.
pub fn bus_wire(data: &[u8]) {
    let Some((&dir, frame)) = data.split_first() else {
        return;
    };
    let mut out = Vec::new();
    if dir % 2 == 0 {
        if let Ok(f) = MemberFrame::decode(frame) {
            f.encode(&mut out);
            assert_eq!(out, frame, "member frame {f:?} re-encoded differently");
            assert_eq!(MemberFrame::decode(&out).as_ref(), Ok(&f));
        }
    } else if let Ok(f) = ServiceFrame::decode(frame) {
        f.encode(&mut out);
        assert_eq!(out, frame, "service frame {f:?} re-encoded differently");
        assert_eq!(ServiceFrame::decode(&out).as_ref(), Ok(&f));
        if let ServiceFrame::Batch(b) = f {
            // What the decode checked is what a member hands out: every entry a MESSAGE.
            let mut n = 0;
            for inner in b.frames() {
                assert!(matches!(
                    ServiceFrame::decode(inner),
                    Ok(ServiceFrame::Message { .. })
                ));
                n += 1;
            }
            assert_eq!(n, b.len());
            assert!((2..=crate::bus::wire::MAX_BATCH_FRAMES).contains(&n));
        }
    }
}

#[derive(Debug, Arbitrary)]
enum Event {
    Join {
        publish: bool,
        receive: bool,
        token: u8,
    },
    Leave(u8),
    Park(u8),
    Rejoin(u8),
    Subscribe(u8, u8),
    Unsubscribe(u8, u8),
    /// `src`/`dst` index a few addresses, 0 being broadcast; `topic` a few topics.
    Publish {
        from: u8,
        src: u8,
        dst: u8,
        topic: u8,
        len: u16,
        fields_ok: bool,
    },
    Sent(u8),
    Elapse(u16),
    Expire,
}

#[derive(Debug, Arbitrary)]
struct Input {
    policy: u8,
    disconnect: bool,
    queue_bytes: u16,
    max_members: u8,
    table: u8,
    events: Vec<Event>,
}

const TOPICS: [&[u8]; 5] = [b"", b"a", b"ab", b"abc", b"b"];
const ADDRS: [&[u8]; 4] = [&[0xFF, 0xFF], &[1], &[2], &[3, 3]];

#[derive(Debug)]
struct ModelMember {
    grant: Grant,
    token: u8,
    parked: Option<Instant>,
    seq: u64,
    queue: VecDeque<usize>,
    untold: u64,
    subs: BTreeSet<&'static [u8]>,
}

/// Membership and fan-out. Input: a bus configuration and a sequence of joins, leaves,
/// parks, rejoins, (un)subscriptions, publishes (each receiver then offered the message),
/// sends and time passing.
///
/// Checks against a model: joins are refused exactly when the model says (full, nothing
/// granted, token in use); a publish is accepted exactly when the sender is a member with
/// publish permission and the policy's fields, its sequence number is the sender's count
/// from 1, and its receivers are exactly the model's (hub: every receiving member but the
/// sender; topic: those with a matching prefix, once; switch: the learned owner, or all
/// when unknown or broadcast), in member order; each offer queues exactly when the model's
/// queue is empty or has room, otherwise drops (counted, told by the next `take_loss` or
/// at rejoin) or disconnects; queued bytes match the model; the switch table never
/// exceeds its bound and expiry removes exactly the parked members past the timeout.
pub fn bus_fanout(data: &[u8]) {
    let Ok(input) = Input::arbitrary_take_rest(Unstructured::new(data)) else {
        return;
    };
    let policy = match input.policy % 3 {
        0 => Policy::Hub,
        1 => Policy::Switch,
        _ => Policy::Topic,
    };
    let cfg = BusConfig {
        slow: if input.disconnect {
            SlowPolicy::Disconnect
        } else {
            SlowPolicy::Drop
        },
        max_message: 1024,
        queue_bytes: u32::from(input.queue_bytes).max(1024),
        max_members: usize::from(input.max_members % 8) + 1,
        max_subscriptions: 3,
        switch_table_entries: usize::from(input.table % 4),
        park_timeout: Duration::from_millis(500),
        ..BusConfig::new(policy)
    };
    let bound = cfg.queue_bytes as usize;
    let mut bus = Bus::new(cfg.clone());
    let mut model: BTreeMap<MemberId, ModelMember> = BTreeMap::new();
    let mut table: BTreeMap<&'static [u8], MemberId> = BTreeMap::new();
    let mut now = Instant::now();
    let mut receivers = Vec::new();
    let pick = |model: &BTreeMap<MemberId, ModelMember>, i: u8| -> MemberId {
        // Mostly members, sometimes an id that is none.
        let ids: Vec<MemberId> = model.keys().copied().collect();
        match ids.len() {
            0 => MemberId(u32::from(i)),
            n if usize::from(i) < n * 4 => ids[usize::from(i) % n],
            _ => MemberId(u32::from(i) + 1000),
        }
    };
    for ev in input.events.iter().take(400) {
        match *ev {
            Event::Join {
                publish,
                receive,
                token,
            } => {
                let grant = Grant { publish, receive };
                let got = bus.join(grant, Token([token; 16]));
                let want = if !publish && !receive {
                    Err(JoinError::Nothing)
                } else if model.len() >= cfg.max_members {
                    Err(JoinError::Full(cfg.max_members))
                } else if model.values().any(|m| m.token == token) {
                    Err(JoinError::TokenInUse)
                } else {
                    Ok(())
                };
                match (got, want) {
                    (Ok(id), Ok(())) => {
                        assert!(!model.contains_key(&id), "id {id} reused");
                        model.insert(
                            id,
                            ModelMember {
                                grant,
                                token,
                                parked: None,
                                seq: 1,
                                queue: VecDeque::new(),
                                untold: 0,
                                subs: BTreeSet::new(),
                            },
                        );
                    }
                    (Err(g), Err(w)) => assert_eq!(g, w),
                    (g, w) => panic!("join: got {g:?}, model {w:?}"),
                }
            }
            Event::Leave(i) => {
                let id = pick(&model, i);
                assert_eq!(bus.leave(id), model.remove(&id).is_some());
                table.retain(|_, o| *o != id);
            }
            Event::Park(i) => {
                let id = pick(&model, i);
                bus.park(id, now);
                if let Some(m) = model.get_mut(&id) {
                    m.parked.get_or_insert(now);
                }
            }
            Event::Rejoin(token) => {
                let got = bus.rejoin(&Token([token; 16]));
                let want = model.iter_mut().find(|(_, m)| m.token == token);
                match (got, want) {
                    (Ok((id, lost)), Some((&mid, m))) => {
                        assert_eq!(id, mid);
                        assert_eq!(lost.messages, m.untold, "loss told at rejoin");
                        m.untold = 0;
                        m.parked = None;
                    }
                    (Err(JoinError::UnknownToken), None) => {}
                    (g, w) => panic!("rejoin: got {g:?}, model {w:?}"),
                }
            }
            Event::Subscribe(i, t) | Event::Unsubscribe(i, t) => {
                let id = pick(&model, i);
                let topic = TOPICS[usize::from(t) % TOPICS.len()];
                let sub = matches!(ev, Event::Subscribe(..));
                let got = if sub {
                    bus.subscribe(id, topic)
                } else {
                    bus.unsubscribe(id, topic)
                };
                let Some(m) = model.get_mut(&id) else {
                    assert_eq!(got, Err(RequestError::NotJoined));
                    continue;
                };
                if !sub {
                    assert_eq!(got, Ok(m.subs.remove(topic)));
                } else if policy != Policy::Topic {
                    assert_eq!(got, Err(RequestError::NotTopic(policy)));
                } else if !m.grant.receive {
                    assert_eq!(got, Err(RequestError::NotPermitted("receive")));
                } else if m.subs.contains(topic) {
                    assert_eq!(got, Ok(false));
                } else if m.subs.len() >= cfg.max_subscriptions {
                    assert_eq!(got, Err(RequestError::TooManySubscriptions(3)));
                } else {
                    assert_eq!(got, Ok(true));
                    m.subs.insert(topic);
                }
            }
            Event::Publish {
                from,
                src,
                dst,
                topic,
                len,
                fields_ok,
            } => {
                let from = pick(&model, from);
                let (src, dst) = (
                    ADDRS[usize::from(src) % ADDRS.len()],
                    ADDRS[usize::from(dst) % ADDRS.len()],
                );
                let topic = match TOPICS[usize::from(topic) % TOPICS.len()] {
                    b"" => &b"abcd"[..MAX_TOPIC_BYTES.min(4)],
                    t => t,
                };
                let right = match policy {
                    Policy::Hub => Fields::None,
                    Policy::Switch => Fields::Addressed { src, dst },
                    Policy::Topic => Fields::Topic(topic),
                };
                let fields = match (fields_ok, policy) {
                    (true, _) => right,
                    (false, Policy::Hub) => Fields::Topic(topic),
                    (false, _) => Fields::None,
                };
                let len = usize::from(len) % 1100;
                let got = bus.publish(from, &fields, len, &mut receivers);
                let Some(m) = model.get_mut(&from) else {
                    assert_eq!(got, Err(RequestError::NotJoined));
                    assert!(receivers.is_empty());
                    continue;
                };
                if !m.grant.publish {
                    assert_eq!(got, Err(RequestError::NotPermitted("publish")));
                    continue;
                }
                if len > 1024 {
                    assert!(matches!(got, Err(RequestError::TooLarge { .. })));
                    continue;
                }
                if !fields_ok {
                    assert_eq!(got, Err(RequestError::Fields(policy)));
                    continue;
                }
                assert_eq!(got, Ok(m.seq), "per-sender sequence");
                m.seq += 1;
                let all: Vec<MemberId> = model
                    .iter()
                    .filter(|(&id, m)| id != from && m.grant.receive)
                    .map(|(&id, _)| id)
                    .collect();
                let want: Vec<MemberId> = match policy {
                    Policy::Hub => all,
                    Policy::Topic => model
                        .iter()
                        .filter(|(&id, m)| {
                            id != from
                                && m.grant.receive
                                && m.subs.iter().any(|s| topic.starts_with(s))
                        })
                        .map(|(&id, _)| id)
                        .collect(),
                    Policy::Switch => {
                        if !is_broadcast(src) && cfg.switch_table_entries > 0 {
                            if !table.contains_key(src) && table.len() >= cfg.switch_table_entries {
                                // The bus forgets its oldest; the model follows the bus.
                                table.retain(|a, _| bus.owner_of(a).is_some());
                            }
                            table.insert(src, from);
                        }
                        match table.get(dst) {
                            Some(&o) if !is_broadcast(dst) => {
                                all.into_iter().filter(|&id| id == o).collect()
                            }
                            _ => all,
                        }
                    }
                };
                assert_eq!(receivers, want, "receivers of a {policy} publish");
                // Each receiver is offered the message (head of 16 bytes plus payload).
                let frame = 16 + len;
                for &to in &want {
                    let Some(r) = model.get_mut(&to) else {
                        continue;
                    };
                    let queued: usize = r.queue.iter().sum();
                    let offer = bus.offer(to, frame);
                    if r.queue.is_empty() || queued + frame <= bound {
                        assert_eq!(offer, Offer::Queue);
                        r.queue.push_back(frame);
                    } else if cfg.slow == SlowPolicy::Drop {
                        assert_eq!(offer, Offer::Dropped);
                        r.untold += 1;
                    } else {
                        assert_eq!(offer, Offer::Disconnect);
                        model.remove(&to);
                        table.retain(|_, o| *o != to);
                    }
                }
            }
            Event::Sent(i) => {
                let id = pick(&model, i);
                if let Some(m) = model.get_mut(&id) {
                    if let Some(len) = m.queue.pop_front() {
                        bus.sent(id, len);
                    }
                    // A LOSS goes before the next message, told once.
                    let loss = bus.take_loss(id);
                    if m.parked.is_some() || m.untold == 0 {
                        assert_eq!(loss, None);
                    } else {
                        assert_eq!(loss.map(|l| l.messages), Some(m.untold));
                        m.untold = 0;
                    }
                }
            }
            Event::Elapse(ms) => now += Duration::from_millis(u64::from(ms % 1000)),
            Event::Expire => {
                let gone = bus.expire(now);
                let want: Vec<MemberId> = model
                    .iter()
                    .filter(|(_, m)| m.parked.is_some_and(|p| now - p >= cfg.park_timeout))
                    .map(|(&id, _)| id)
                    .collect();
                assert_eq!(gone, want, "expired");
                for id in gone {
                    model.remove(&id);
                    table.retain(|_, o| *o != id);
                }
            }
        }
        assert_eq!(bus.len(), model.len());
        for (&id, m) in &model {
            assert_eq!(
                bus.queued_bytes(id),
                m.queue.iter().sum::<usize>() as u64,
                "{id}"
            );
            assert_eq!(bus.is_parked(id), m.parked.is_some());
        }
        for (&a, &o) in &table {
            assert_eq!(bus.owner_of(a), Some(o), "learned address {a:?}");
        }
        if cfg.switch_table_entries == 0 {
            assert!(ADDRS.iter().all(|a| bus.owner_of(a).is_none()));
        }
    }
}
