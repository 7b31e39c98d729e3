//! Body of the `bus_member` fuzz target (feature `fuzzing`; not part of the API): a
//! [`BusMember`] joined over a real seqpacket socket pair, with whatever the input says
//! the bus service sends on the other end. The cargo-fuzz target in `fuzz/` calls it, and
//! `tests/fuzz_corpus.rs` runs the stored inputs through it on stable Rust.
//!
//! Input: one byte of setup, then frames, each a little-endian `u16` length and that many
//! bytes, sent as one seqpacket message each (at most [`MAX_FRAMES`], as many as the
//! socket takes without blocking). Setup bits: 0-1 the bus's policy (hub, switch, topic;
//! 3 is topic too), 2 the member asks for a subscription before it reads (topic buses),
//! 3-4 the bus's maximum message (16 B, 64 B, 1 KiB, 64 KiB), 5 the first frame replaces
//! the service's JOINED. Without bit 5 the service answers with a valid JOINED.
//!
//! What must hold, beyond not panicking: the member hands out only events that obey the
//! spec (a MESSAGE not its own, with a sequence number, its fields fit for the policy, its
//! payload within the maximum), and exactly the events an independent reading of the
//! frames with [`ServiceFrame::decode`] finds, in order, up to the first frame that
//! reading does not model (a subscription answer, an error, an invalid frame); an invalid
//! frame ends the membership with an error, never with an event.

use crate::bus::{BusError, BusEvent, BusMember, JoinOptions, Violation};
use domsock_proto::bus::wire::{
    max_frame_len, Fields, Joined, MemberId, Policy, ServiceFrame, SlowPolicy, Token, Want,
    MAX_MESSAGE_LIMIT_BYTES,
};
use nix::sys::socket::{send, socketpair, AddressFamily, MsgFlags, SockFlag, SockType};
use std::os::fd::AsRawFd;
use std::time::Duration;

/// Frames one input sends at most.
pub const MAX_FRAMES: usize = 64;

/// The member's own number in the JOINED the service sends.
const ME: MemberId = MemberId(5);

/// What the independent reading expects the member to hand out.
#[derive(Debug, PartialEq, Eq)]
enum Expected {
    Message {
        sender: MemberId,
        seq: u64,
        fields: Vec<u8>,
        payload: Vec<u8>,
    },
    Loss {
        messages: u64,
        bytes: u64,
    },
}

fn fields_key(f: &Fields<'_>) -> Vec<u8> {
    match f {
        Fields::None => vec![0],
        Fields::Topic(t) => [&[1u8][..], t].concat(),
        Fields::Addressed { src, dst } => [&[2u8, src.len() as u8][..], src, dst].concat(),
    }
}

/// The events a valid MESSAGE or LOSS frame gives, or `None` where the reading stops
/// modelling (and `Some(Err(()))` for a frame the member must refuse).
fn model(frame: &[u8], joined: &Joined, max_len: usize) -> Option<Result<Vec<Expected>, ()>> {
    if frame.len() > max_len {
        return Some(Err(()));
    }
    let Ok(f) = ServiceFrame::decode(frame) else {
        return Some(Err(()));
    };
    let message = |f: ServiceFrame<'_>| -> Result<Expected, ()> {
        match f {
            ServiceFrame::Message {
                sender,
                seq,
                fields,
                payload,
            } if joined.granted.receive
                && sender != joined.member
                && seq != 0
                && fields.fit(joined.policy)
                && payload.len() <= joined.max_message as usize =>
            {
                Ok(Expected::Message {
                    sender,
                    seq,
                    fields: fields_key(&fields),
                    payload: payload.to_vec(),
                })
            }
            _ => Err(()),
        }
    };
    match f {
        f @ ServiceFrame::Message { .. } => Some(message(f).map(|m| vec![m])),
        ServiceFrame::Loss { messages: 0, .. } => Some(Err(())),
        ServiceFrame::Loss { messages, bytes } => {
            Some(Ok(vec![Expected::Loss { messages, bytes }]))
        }
        ServiceFrame::Batch(b) => Some(
            b.frames()
                .map(|f| ServiceFrame::decode(f).map_err(|_| ()).and_then(message))
                .collect(),
        ),
        ServiceFrame::Joined(_) | ServiceFrame::Refused { .. } => Some(Err(())),
        ServiceFrame::Error { .. } | ServiceFrame::Subscribed { .. } => None,
    }
}

fn valid_joined(policy: Policy, max_message: u32) -> Joined {
    Joined {
        member: ME,
        policy,
        slow: SlowPolicy::Drop,
        granted: Want::BOTH,
        max_message,
        queue_bytes: 1 << 20,
        token: Token([7; 16]),
        lost: 0,
    }
}

/// The fuzz body.
pub fn bus_member(data: &[u8]) {
    let Some((&setup, mut rest)) = data.split_first() else {
        return;
    };
    let policy = match setup & 3 {
        0 => Policy::Hub,
        1 => Policy::Switch,
        _ => Policy::Topic,
    };
    let subscribe = setup & 4 != 0 && policy == Policy::Topic;
    let max_message = [16u32, 64, 1024, 65536][usize::from((setup >> 3) & 3)];
    let own_joined = setup & 0x20 != 0;
    let mut frames: Vec<&[u8]> = Vec::new();
    while frames.len() < MAX_FRAMES && rest.len() >= 2 {
        let len = usize::from(u16::from_le_bytes([rest[0], rest[1]]));
        let take = len.min(rest.len() - 2);
        // An empty seqpacket message reads as the end of the connection: not a frame.
        if take > 0 {
            frames.push(&rest[2..2 + take]);
        }
        rest = &rest[2 + take..];
    }
    let (member_end, service_end) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
    )
    .expect("a socket pair");
    let joined = valid_joined(policy, max_message);
    let mut first = Vec::new();
    let mut to_send: Vec<&[u8]> = Vec::new();
    if own_joined {
        to_send.extend(frames.iter().copied());
    } else {
        ServiceFrame::Joined(joined).encode(&mut first);
        to_send.push(&first);
        to_send.extend(frames.iter().copied());
    }
    let mut sent = 0;
    for f in &to_send {
        if send(service_end.as_raw_fd(), f, MsgFlags::MSG_NOSIGNAL).is_err() {
            break;
        }
        sent += 1;
    }
    let opts = JoinOptions {
        want: Want::BOTH,
        create: None,
        timeout: Duration::from_millis(1),
    };
    let mut member = match BusMember::join_over(member_end, None, "fuzz", &opts) {
        Ok(m) => m,
        Err(_) => return,
    };
    if own_joined {
        // Whatever JOINED came passed the member's checks: read on under its terms.
        let j = *member.joined();
        assert!(
            (1..=MAX_MESSAGE_LIMIT_BYTES).contains(&j.max_message)
                && j.queue_bytes >= j.max_message
                && j.lost == 0
                && (j.granted.publish || j.granted.receive),
            "a JOINED the spec refuses was accepted: {j:?}"
        );
        drain(&mut member, &j, &frames[1..sent]);
    } else {
        if subscribe && member.send_subscribe(true, b"t").is_err() {
            return;
        }
        // The JOINED was the first message sent; the frames follow it.
        drain(&mut member, &joined, &frames[..sent - 1]);
    }
    // Open until here: the member saw no end of the connection.
    drop(service_end);
}

/// Reads every event the member gives and checks it against the frames.
fn drain(member: &mut BusMember, joined: &Joined, frames: &[&[u8]]) {
    let max_len = max_frame_len(joined.max_message);
    // What the frames up to the first one the reading does not model give, and whether
    // the reading ended at a frame the member must refuse.
    let mut expected: Vec<Expected> = Vec::new();
    let mut refuse_at_end = false;
    let mut complete = true;
    for f in frames {
        match model(f, joined, max_len) {
            Some(Ok(events)) => expected.extend(events),
            Some(Err(())) => {
                refuse_at_end = true;
                break;
            }
            None => {
                complete = false;
                break;
            }
        }
    }
    let mut got: Vec<Expected> = Vec::new();
    let mut error = None;
    for _ in 0..(MAX_FRAMES * 300) {
        match member.try_recv() {
            Ok(Some(BusEvent::Message(m))) => {
                assert_ne!(m.sender, joined.member, "own message handed out");
                assert_ne!(m.seq, 0, "sequence number 0 handed out");
                assert!(m.fields.fit(joined.policy), "fields unfit for the policy");
                assert!(m.payload.len() <= joined.max_message as usize);
                got.push(Expected::Message {
                    sender: m.sender,
                    seq: m.seq,
                    fields: fields_key(&m.fields),
                    payload: m.payload.to_vec(),
                });
            }
            Ok(Some(BusEvent::Loss { messages, bytes })) => {
                assert_ne!(messages, 0, "a loss of nothing handed out");
                got.push(Expected::Loss { messages, bytes });
            }
            // The frame the reading does not model: the comparison ends here.
            Ok(Some(BusEvent::Error { .. } | BusEvent::Subscribed { .. })) => {
                assert!(!complete, "an event no frame before the end gives");
                break;
            }
            Ok(None) => break,
            Err(e) => {
                error = Some(e);
                break;
            }
        }
    }
    // Every frame before the one the reading stopped at was valid: all their events came,
    // in order, and nothing else.
    assert_eq!(got, expected, "the member's events against the frames");
    if refuse_at_end {
        assert!(
            matches!(error, Some(BusError::Protocol(_))),
            "an invalid frame must end the membership: {error:?}"
        );
    } else if complete {
        assert!(
            !matches!(
                error,
                Some(BusError::Protocol(
                    Violation::Decode(_) | Violation::BadMessage(_) | Violation::EmptyLoss
                ))
            ),
            "valid frames refused: {error:?}"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use domsock_proto::bus::wire::{batch_entry_prefix, batch_header};

    fn frame(f: &ServiceFrame<'_>) -> Vec<u8> {
        let mut v = Vec::new();
        f.encode(&mut v);
        v
    }

    fn message(sender: u32, seq: u64, fields: Fields<'_>, payload: &[u8]) -> Vec<u8> {
        frame(&ServiceFrame::Message {
            sender: MemberId(sender),
            seq,
            fields,
            payload,
        })
    }

    fn batch(frames: &[Vec<u8>]) -> Vec<u8> {
        let mut v = batch_header().to_vec();
        for f in frames {
            v.extend_from_slice(&batch_entry_prefix(f.len()));
            v.extend_from_slice(f);
        }
        v
    }

    fn input(setup: u8, frames: &[Vec<u8>]) -> Vec<u8> {
        let mut v = vec![setup];
        for f in frames {
            v.extend_from_slice(&(f.len() as u16).to_le_bytes());
            v.extend_from_slice(f);
        }
        v
    }

    /// The seed inputs of the corpus (`fuzz/corpus/bus_member/seed-*`).
    fn seeds() -> Vec<(&'static str, Vec<u8>)> {
        let m = |seq| message(1, seq, Fields::None, b"payload");
        let t = |seq| message(2, seq, Fields::Topic(b"t/1"), b"x");
        vec![
            ("hub-messages", input(0x08, &[m(1), m(2), m(3)])),
            (
                "hub-loss-batch",
                input(
                    0x08,
                    &[
                        m(1),
                        frame(&ServiceFrame::Loss {
                            messages: 4,
                            bytes: 40,
                        }),
                        batch(&[m(6), m(7), m(8)]),
                    ],
                ),
            ),
            (
                "bad-in-batch",
                input(
                    0x08,
                    &[m(1), batch(&[m(2), message(5, 3, Fields::None, b"")])],
                ),
            ),
            (
                "too-long",
                input(0x00, &[m(1), message(1, 2, Fields::None, &[0; 40])]),
            ),
            (
                "topic-subscribed",
                input(
                    0x0e,
                    &[
                        t(1),
                        frame(&ServiceFrame::Subscribed {
                            subscribe: true,
                            prefix: b"t",
                        }),
                        t(2),
                    ],
                ),
            ),
            (
                "own-joined",
                input(
                    0x28,
                    &[
                        frame(&ServiceFrame::Joined(valid_joined(Policy::Switch, 64))),
                        message(
                            1,
                            1,
                            Fields::Addressed {
                                src: b"a",
                                dst: b"b",
                            },
                            b"x",
                        ),
                    ],
                ),
            ),
        ]
    }

    /// Each seed runs through the body, and the reading it checks against counts what
    /// the seed means to show.
    #[test]
    fn the_seeds_pass_and_say_what_they_mean() {
        for (name, data) in seeds() {
            bus_member(&data);
            if let Ok(dir) = std::env::var("DOMSOCK_FUZZ_SEED_DIR") {
                std::fs::write(format!("{dir}/seed-{name}"), &data).unwrap();
            }
        }
        let j = valid_joined(Policy::Hub, 64);
        let max = max_frame_len(64);
        let ok = message(1, 1, Fields::None, b"p");
        assert_eq!(model(&ok, &j, max).unwrap().unwrap().len(), 1);
        assert_eq!(
            model(&batch(&[ok.clone(), ok.clone()]), &j, max)
                .unwrap()
                .unwrap()
                .len(),
            2
        );
        let own = message(5, 1, Fields::None, b"p");
        assert_eq!(model(&batch(&[ok.clone(), own]), &j, max), Some(Err(())));
        assert_eq!(
            model(&message(1, 1, Fields::None, &[0; 65]), &j, max),
            Some(Err(()))
        );
    }

    /// The check is not vacuous: a member that handed out a frame's events differently
    /// from the reading fails it.
    #[test]
    #[should_panic(expected = "the member's events against the frames")]
    fn a_mismatch_with_the_reading_panics() {
        // The service sends one message; the reading is told of two.
        let (member_end, service_end) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        )
        .unwrap();
        let joined = valid_joined(Policy::Hub, 64);
        for f in [
            frame(&ServiceFrame::Joined(joined)),
            message(1, 1, Fields::None, b"p"),
        ] {
            send(service_end.as_raw_fd(), &f, MsgFlags::empty()).unwrap();
        }
        let opts = JoinOptions {
            want: Want::BOTH,
            create: None,
            timeout: Duration::from_millis(100),
        };
        let mut member = BusMember::join_over(member_end, None, "fuzz", &opts).unwrap();
        let m = message(1, 1, Fields::None, b"p");
        drain(&mut member, &joined, &[&m, &m]);
    }
}
