//! Two endpoints in memory under simulated time.

use super::wire::{self, Frame};
use super::*;

struct Net {
    a: Endpoint,
    b: Endpoint,
    now: Millis,
}

fn cfg() -> EndpointConfig {
    EndpointConfig {
        buf_alloc_bytes: 4096,
        // Autotuning off: these tests count credit in fixed windows (the autotuning tests
        // below turn it on).
        max_window_bytes: 4096,
        window_budget_bytes: 1 << 20,
        keepalive_idle_ms: 100,
        keepalive_dead_ms: 1_000,
        resume_timeout_ms: 3_000,
        max_channels: 16,
    }
}

impl Net {
    fn new() -> Self {
        let mut n = Net {
            a: Endpoint::new(cfg(), "a", "b", Incarnation([1; 16]), Millis(0)),
            b: Endpoint::new(cfg(), "b", "a", Incarnation([2; 16]), Millis(0)),
            now: Millis(0),
        };
        n.a.connected(n.now);
        n.b.connected(n.now);
        n.pump();
        n
    }

    /// Moves everything both ways until quiet; accepts every OPEN. Returns B's events.
    fn pump(&mut self) -> Vec<Event> {
        let mut seen = Vec::new();
        for _ in 0..1000 {
            let mut out = Vec::new();
            self.a.poll_transmit(self.now, &mut out, 1 << 20);
            self.b.handle_bytes(self.now, &out).expect("a's bytes");
            let mut back = Vec::new();
            self.b.poll_transmit(self.now, &mut back, 1 << 20);
            self.a.handle_bytes(self.now, &back).expect("b's bytes");
            for ep in [&mut self.a, &mut self.b] {
                while let Some(e) = ep.poll_event() {
                    if let Event::IncomingOpen { channel, .. } = e {
                        ep.accept(channel).expect("accept");
                    }
                    seen.push(e);
                }
            }
            if out.is_empty() && back.is_empty() {
                break;
            }
        }
        seen
    }

    fn reconnect(&mut self) {
        self.a.connected(self.now);
        self.b.connected(self.now);
    }
}

fn drain(ep: &mut Endpoint, ch: ChannelId) -> Vec<u8> {
    let mut v = Vec::new();
    let mut buf = [0u8; 1000];
    while let Ok(n) = ep.read(ch, &mut buf) {
        if n == 0 {
            break;
        }
        v.extend_from_slice(&buf[..n]);
    }
    v
}

#[test]
fn stream_and_seqpacket_roundtrip() {
    let mut n = Net::new();
    let s = n.a.open(ChannelKind::Stream, b"meta", n.now).unwrap();
    let q = n.b.open(ChannelKind::SeqPacket, b"", n.now).unwrap();
    assert_eq!(s.0 % 2, 0, "a sorts lower: even ids");
    assert_eq!(q.0 % 2, 1);
    assert_eq!(n.a.state(s), Ok(ChannelState::Opening));
    assert_eq!(n.a.write(s, b"x"), Err(ChannelError::WouldBlock));
    let ev = n.pump();
    assert!(ev.contains(&Event::IncomingOpen {
        channel: s,
        kind: ChannelKind::Stream,
        metadata: b"meta".to_vec()
    }));
    assert_eq!(n.a.state(s), Ok(ChannelState::Open));
    assert_eq!(n.a.write(s, b"hello "), Ok(6));
    assert_eq!(n.a.write(s, b"world"), Ok(5));
    n.b.send_msg(q, b"one").unwrap();
    n.b.send_msg(q, b"two!").unwrap();
    n.pump();
    assert_eq!(drain(&mut n.b, s), b"hello world");
    let mut buf = [0u8; 2];
    assert_eq!(
        n.a.recv_msg(q, &mut buf),
        Ok(Some(3)),
        "truncated, full length"
    );
    assert_eq!(&buf, b"on");
    let mut buf = [0u8; 10];
    assert_eq!(n.a.recv_msg(q, &mut buf), Ok(Some(4)));
    assert_eq!(&buf[..4], b"two!");
    assert_eq!(n.a.recv_msg(q, &mut buf), Err(ChannelError::WouldBlock));
    // Shutdown: EOF after the data.
    n.a.write(s, b"tail").unwrap();
    n.a.shutdown(s, false, true).unwrap();
    assert_eq!(n.a.write(s, b"more"), Err(ChannelError::BrokenPipe));
    n.pump();
    assert_eq!(
        n.b.state(s),
        Ok(ChannelState::PeerShutdown {
            rd: false,
            wr: true
        })
    );
    let mut buf = [0u8; 10];
    assert_eq!(n.b.read(s, &mut buf), Ok(4));
    assert_eq!(n.b.read(s, &mut buf), Ok(0), "EOF");
    // Close: the peer sees it, and both forget the channel.
    n.b.close(s);
    n.pump();
    assert_eq!(
        n.a.state(s),
        Ok(ChannelState::Broken(BrokenReason::PeerClosed(
            CloseReason::Normal
        )))
    );
    n.a.close(s);
    assert_eq!(n.a.channel_count(), 1);
    assert_eq!(n.b.channel_count(), 1);
}

#[test]
fn an_aborted_channel_tells_the_peer_its_data_was_given_up() {
    let mut n = Net::new();
    let s = n.a.open(ChannelKind::Stream, b"", n.now).unwrap();
    n.pump();
    n.a.write(s, b"never read").unwrap();
    n.pump();
    n.b.close_with(s, CloseReason::Aborted);
    n.pump();
    assert_eq!(
        n.a.state(s),
        Ok(ChannelState::Broken(BrokenReason::PeerClosed(
            CloseReason::Aborted
        )))
    );
    // Not an end of stream: a read says the channel broke.
    let mut buf = [0u8; 4];
    assert!(matches!(
        n.a.read(s, &mut buf),
        Err(ChannelError::NotOpen(_))
    ));
}

#[test]
fn credit_bounds_the_sender_and_a_stalled_channel_stalls_only_itself() {
    let mut n = Net::new();
    let stalled = n.a.open(ChannelKind::Stream, b"", n.now).unwrap();
    let busy = n.a.open(ChannelKind::Stream, b"", n.now).unwrap();
    n.pump();
    let block = vec![7u8; 10_000];
    assert_eq!(n.a.write(stalled, &block), Ok(4096), "the window, no more");
    assert_eq!(n.a.write(stalled, &block), Err(ChannelError::WouldBlock));
    let mut got = 0;
    for _ in 0..50 {
        got += match n.a.write(busy, &block) {
            Ok(k) => k,
            Err(ChannelError::WouldBlock) => 0,
            Err(e) => panic!("{e}"),
        };
        n.pump();
        drain(&mut n.b, busy);
        n.pump();
    }
    assert!(got >= 50 * 4096, "busy channel moved {got} bytes");
    let c = n.b.counters(stalled).unwrap();
    assert_eq!((c.received, c.consumed), (4096, 0));
    assert_eq!(drain(&mut n.b, stalled).len(), 4096);
    n.pump();
    assert_eq!(n.a.write(stalled, &block), Ok(4096), "credit came back");
}

#[test]
fn a_cut_mid_stream_resumes_without_loss_or_duplication() {
    let mut n = Net::new();
    let ch = n.a.open(ChannelKind::Stream, b"", n.now).unwrap();
    n.pump();
    let data: Vec<u8> = (0..20_000u32).map(|i| (i * 13) as u8).collect();
    let mut written = 0;
    let mut got = Vec::new();
    let mut cuts = 0;
    while got.len() < data.len() {
        if written < data.len() {
            written += n.a.write(ch, &data[written..]).unwrap_or(0);
        }
        let mut out = Vec::new();
        n.a.poll_transmit(n.now, &mut out, 1);
        // Deliver half a frame, then cut: the rest is lost with the connection.
        let half = out.len() / 2;
        n.b.handle_bytes(n.now, &out[..half]).unwrap();
        if cuts < 5 {
            cuts += 1;
            n.reconnect();
        } else {
            n.b.handle_bytes(n.now, &out[half..]).unwrap();
        }
        n.pump();
        got.extend(drain(&mut n.b, ch));
    }
    assert_eq!(got, data);
    assert!(n.a.stats().resumes >= 5);
}

#[test]
fn tunnel_down_past_the_timeout_times_out_both_ends() {
    let mut n = Net::new();
    let ch = n.a.open(ChannelKind::Stream, b"", n.now).unwrap();
    n.pump();
    n.a.write(ch, b"unacked").unwrap();
    n.a.disconnected(n.now);
    n.b.disconnected(n.now);
    n.now = Millis(2_999);
    n.a.handle_timeout(n.now);
    n.b.handle_timeout(n.now);
    assert_eq!(n.a.state(ch), Ok(ChannelState::Open));
    assert_eq!(n.a.poll_timeout(), Some(Millis(3_000)));
    n.now = Millis(3_000);
    n.a.handle_timeout(n.now);
    n.b.handle_timeout(n.now);
    assert_eq!(n.a.state(ch), Ok(ChannelState::TimedOut));
    assert_eq!(n.b.state(ch), Ok(ChannelState::TimedOut));
    let mut buf = [0u8; 4];
    assert_eq!(
        n.b.read(ch, &mut buf),
        Err(ChannelError::NotOpen(ChannelState::TimedOut))
    );
    assert_eq!(
        n.a.write(ch, b"x"),
        Err(ChannelError::NotOpen(ChannelState::TimedOut))
    );
    // A later connection starts fresh.
    n.a.close(ch);
    n.b.close(ch);
    n.reconnect();
    let ev = n.pump();
    assert!(ev.contains(&Event::Up { fresh: true }));
}

#[test]
fn a_restarted_peer_breaks_its_channels() {
    let mut n = Net::new();
    let ch = n.a.open(ChannelKind::Stream, b"", n.now).unwrap();
    n.pump();
    n.b = Endpoint::new(cfg(), "b", "a", Incarnation([3; 16]), n.now);
    n.reconnect();
    n.pump();
    assert_eq!(
        n.a.state(ch),
        Ok(ChannelState::Broken(BrokenReason::PeerRestarted))
    );
}

#[test]
fn keepalive_pings_when_idle_and_declares_a_silent_link_dead() {
    let mut n = Net::new();
    n.now = Millis(100);
    n.a.handle_timeout(n.now);
    let mut out = Vec::new();
    n.a.poll_transmit(n.now, &mut out, 1000);
    assert!(matches!(
        wire::decode(&out),
        Ok(Some((Frame::Ping { .. }, _)))
    ));
    n.now = Millis(1_000);
    n.a.handle_timeout(n.now);
    assert_eq!(n.a.poll_event(), Some(Event::LinkDead));
    assert!(!n.a.is_up());
}

#[test]
fn a_peer_overrunning_its_credit_resets_only_that_channel() {
    let mut n = Net::new();
    let ch = n.a.open(ChannelKind::Stream, b"", n.now).unwrap();
    let other = n.a.open(ChannelKind::Stream, b"", n.now).unwrap();
    n.pump();
    let big = vec![0u8; 5000];
    let forged = Frame::Data {
        channel: ch,
        offset: 0,
        eor: false,
        bytes: &big,
    }
    .to_vec();
    n.b.handle_bytes(n.now, &forged)
        .expect("a channel error, not a link error");
    assert_eq!(
        n.b.state(ch),
        Ok(ChannelState::Broken(BrokenReason::Violation))
    );
    assert_eq!(n.b.stats().violations, 1);
    n.a.write(other, b"fine").unwrap();
    n.pump();
    assert_eq!(drain(&mut n.b, other), b"fine");
    assert_eq!(
        n.a.state(ch),
        Ok(ChannelState::Broken(BrokenReason::PeerClosed(
            CloseReason::ProtocolViolation
        )))
    );
}

#[test]
fn wrong_host_and_frames_before_hello_drop_the_link() {
    let mut a = Endpoint::new(cfg(), "a", "b", Incarnation([1; 16]), Millis(0));
    a.connected(Millis(0));
    let ping = Frame::Ping { nonce: 1 }.to_vec();
    assert!(matches!(
        a.handle_bytes(Millis(0), &ping),
        Err(LinkError::OutOfOrder(_))
    ));
    a.connected(Millis(0));
    let hello = Frame::Hello {
        host: "c".into(),
        incarnation: Incarnation([9; 16]),
        resume: vec![],
    }
    .to_vec();
    assert!(matches!(
        a.handle_bytes(Millis(0), &hello),
        Err(LinkError::WrongHost { .. })
    ));
}

#[test]
fn refused_open_is_reported() {
    let mut n = Net::new();
    let ch = n.a.open(ChannelKind::Stream, b"x", n.now).unwrap();
    let mut out = Vec::new();
    n.a.poll_transmit(n.now, &mut out, 1 << 20);
    n.b.handle_bytes(n.now, &out).unwrap();
    let Some(Event::IncomingOpen { channel, .. }) = n.b.poll_event() else {
        panic!("no open");
    };
    n.b.refuse(channel, RefusalCode::Policy, "no");
    n.pump();
    assert_eq!(
        n.a.state(ch),
        Ok(ChannelState::Refused(RefusalCode::Policy))
    );
    assert_eq!(n.b.channel_count(), 0);
}

#[test]
fn a_data_frame_arriving_in_pieces_is_readable_as_it_comes() {
    let mut n = Net::new();
    let s = n.a.open(ChannelKind::Stream, b"", n.now).unwrap();
    let q = n.a.open(ChannelKind::SeqPacket, b"", n.now).unwrap();
    n.pump();
    // Ten bytes the owner hears of and leaves unread for now.
    n.a.write(s, b"0123456789").unwrap();
    let mut out = Vec::new();
    n.a.poll_transmit(n.now, &mut out, 1);
    n.b.handle_bytes(n.now, &out).unwrap();
    assert_eq!(n.b.poll_event(), Some(Event::Changed(s)));
    let data: Vec<u8> = (0..3000u32).map(|i| (i * 31 + 7) as u8).collect();
    assert_eq!(n.a.write(s, &data[..500]), Ok(500));
    let mut out = Vec::new();
    n.a.poll_transmit(n.now, &mut out, 1);
    n.b.handle_bytes(n.now, &out).unwrap();
    assert_eq!(
        n.b.poll_event(),
        None,
        "unread bytes were there: heard of already"
    );
    let mut ten = [0u8; 10];
    assert_eq!(n.b.read(s, &mut ten), Ok(10));
    assert_eq!(&ten, b"0123456789");
    assert_eq!(n.a.write(s, &data[500..1500]), Ok(1000));
    let mut out = Vec::new();
    n.a.poll_transmit(n.now, &mut out, 1);
    assert_eq!(out.len(), wire::DATA_PREFIX_LEN + 1000, "one DATA frame");
    n.b.handle_bytes(n.now, &out[..wire::DATA_PREFIX_LEN + 400])
        .unwrap();
    // Not empty when the frame began, but read during it: the owner hears at its end.
    let mut got = vec![0u8; 700];
    assert_eq!(n.b.read(s, &mut got), Ok(700));
    n.b.handle_bytes(n.now, &out[wire::DATA_PREFIX_LEN + 400..])
        .unwrap();
    assert_eq!(n.b.poll_event(), Some(Event::Changed(s)));
    got.extend(drain(&mut n.b, s));
    assert_eq!(got, data[..1500]);
    n.pump();
    let data: Vec<u8> = data.iter().map(|b| b ^ 0x5a).collect();
    assert_eq!(n.a.write(s, &data), Ok(3000));
    let mut out = Vec::new();
    n.a.poll_transmit(n.now, &mut out, 1);
    assert_eq!(out.len(), wire::DATA_PREFIX_LEN + 3000, "one DATA frame");
    // Half the prefix byte by byte, then its rest with 100 payload bytes: readable
    // before the frame ends.
    for b in &out[..10] {
        n.b.handle_bytes(n.now, std::slice::from_ref(b)).unwrap();
    }
    n.b.handle_bytes(n.now, &out[10..wire::DATA_PREFIX_LEN + 100])
        .unwrap();
    // The owner hears of the frame once, at its end (not per piece).
    assert_eq!(n.b.poll_event(), None);
    let mut got = drain(&mut n.b, s);
    assert_eq!(got, data[..100]);
    let (middle, last) = out[wire::DATA_PREFIX_LEN + 100..].split_at(2899);
    for piece in middle.chunks(7) {
        n.b.handle_bytes(n.now, piece).unwrap();
    }
    assert_eq!(n.b.poll_event(), None);
    n.b.handle_bytes(n.now, last).unwrap();
    assert_eq!(
        n.b.poll_event(),
        Some(Event::Changed(s)),
        "it read during the frame, so it may wait"
    );
    got.extend(drain(&mut n.b, s));
    assert_eq!(got, data);
    assert_eq!(n.b.counters(s).unwrap().received, 4510);
    // A message is only whole with its last byte.
    n.a.send_msg(q, &data[..2000]).unwrap();
    let mut out = Vec::new();
    n.a.poll_transmit(n.now, &mut out, 1);
    let (head, last) = out.split_at(out.len() - 1);
    n.b.handle_bytes(n.now, head).unwrap();
    let mut buf = vec![0u8; 4096];
    assert_eq!(n.b.recv_msg(q, &mut buf), Err(ChannelError::WouldBlock));
    n.b.handle_bytes(n.now, last).unwrap();
    assert_eq!(n.b.recv_msg(q, &mut buf), Ok(Some(2000)));
    assert_eq!(buf[..2000], data[..2000]);
    // Frames after a split one decode as usual.
    n.a.write(s, b"after").unwrap();
    n.pump();
    assert_eq!(drain(&mut n.b, s), b"after");
}

#[test]
fn a_bad_data_header_resets_the_channel_before_its_payload_arrives() {
    let mut n = Net::new();
    let ch = n.a.open(ChannelKind::Stream, b"", n.now).unwrap();
    let other = n.a.open(ChannelKind::Stream, b"", n.now).unwrap();
    n.pump();
    let payload = vec![1u8; 1000];
    let forged = Frame::Data {
        channel: ch,
        offset: 77,
        eor: false,
        bytes: &payload,
    }
    .to_vec();
    n.b.handle_bytes(n.now, &forged[..wire::DATA_PREFIX_LEN + 1])
        .expect("a channel error, not a link error");
    assert_eq!(
        n.b.state(ch),
        Ok(ChannelState::Broken(BrokenReason::Violation))
    );
    // The rest of the forged payload is skipped, whatever it holds; the next frame counts.
    let mut rest = forged[wire::DATA_PREFIX_LEN + 1..].to_vec();
    rest.fill(0xff);
    n.b.handle_bytes(n.now, &rest).unwrap();
    let mut buf = [0u8; 8];
    assert_eq!(
        n.b.read(ch, &mut buf),
        Err(ChannelError::NotOpen(ChannelState::Broken(
            BrokenReason::Violation
        )))
    );
    n.a.write(other, b"fine").unwrap();
    n.pump();
    assert_eq!(drain(&mut n.b, other), b"fine");
    assert_eq!(n.b.stats().violations, 1);
}

/// Records what [`Endpoint::poll_transmit_into`] hands over, part by part.
#[derive(Default)]
struct Parts(Vec<Vec<u8>>);

impl TransmitSink for Parts {
    fn taken(&self) -> usize {
        self.0.iter().map(Vec::len).sum()
    }
    fn put(&mut self, parts: &[&[u8]]) {
        self.0.extend(parts.iter().map(|p| p.to_vec()));
    }
}

#[test]
fn poll_transmit_into_hands_payload_over_as_its_own_slices() {
    let mut n = Net::new();
    let ch = n.a.open(ChannelKind::Stream, b"", n.now).unwrap();
    n.pump();
    let data: Vec<u8> = (0..4000u32).map(|i| (i ^ (i >> 3)) as u8).collect();
    // A credit frame queued too: control frames go ahead of the DATA frame.
    n.b.write(ch, b"x").unwrap();
    n.pump();
    assert_eq!(drain(&mut n.a, ch), b"x");
    assert_eq!(n.a.write(ch, &data), Ok(4000));
    let mut sink = Parts::default();
    n.a.poll_transmit_into(n.now, &mut sink, 1 << 20);
    assert!(
        sink.0.iter().any(|p| p.as_slice() == data.as_slice()),
        "the payload is one part of its own: {:?}",
        sink.0.iter().map(Vec::len).collect::<Vec<_>>()
    );
    let bytes = sink.0.concat();
    let mut at = 0;
    let mut kinds = Vec::new();
    while let Some((f, used)) = wire::decode(&bytes[at..]).unwrap() {
        kinds.push(std::mem::discriminant(&f));
        if let Frame::Data { bytes, offset, .. } = f {
            assert_eq!((bytes, offset), (data.as_slice(), 0));
        }
        at += used;
        if at == bytes.len() {
            break;
        }
    }
    assert_eq!(at, bytes.len(), "whole frames only");
    let credit = std::mem::discriminant(&Frame::Credit {
        channel: ch,
        received: 0,
        consumed: 0,
        buf_alloc: 0,
    });
    assert_eq!(kinds.first(), Some(&credit));
    n.b.handle_bytes(n.now, &bytes).unwrap();
    assert_eq!(drain(&mut n.b, ch), data);
}

/// The fuzz target's model with pseudo-random event streams (the corpus test replays the
/// stored ones).
#[test]
fn model_under_random_events() {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for round in 0..300 {
        let len = 30 + round * 7 % 3000;
        let data: Vec<u8> = (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect();
        let r = std::panic::catch_unwind(|| crate::fuzzing::tunnel_model(&data));
        if r.is_err() {
            std::fs::write(format!("/tmp/tunnel-model-fail-{round}"), &data).ok();
            panic!("model failed at round {round} (input in /tmp/tunnel-model-fail-{round})");
        }
    }
}

// ---- receive-window autotuning ------------------------------------------------------

const BASE: u32 = 4096;

fn tuned(max_window_bytes: u32, window_budget_bytes: u64) -> EndpointConfig {
    EndpointConfig {
        max_window_bytes,
        window_budget_bytes,
        ..cfg()
    }
}

fn tuned_net(max_window_bytes: u32, window_budget_bytes: u64) -> Net {
    let c = tuned(max_window_bytes, window_budget_bytes);
    let mut n = Net {
        a: Endpoint::new(c.clone(), "a", "b", Incarnation([1; 16]), Millis(0)),
        b: Endpoint::new(c, "b", "a", Incarnation([2; 16]), Millis(0)),
        now: Millis(0),
    };
    n.reconnect();
    n.pump();
    n
}

fn pattern_byte(i: u64) -> u8 {
    (i.wrapping_mul(0x9e37_79b9) >> 7) as u8
}

/// Writes `total` pattern bytes on `ch` (A to B), B reading everything each turn, the
/// clock moving `step_ms` per turn; checks every byte; returns the most A had
/// unacknowledged at once.
fn stream(n: &mut Net, ch: ChannelId, from: u64, total: u64, step_ms: u64) -> u64 {
    let mut written = from;
    let mut read = from;
    let mut most_in_flight = 0;
    let mut buf = vec![0u8; 1 << 20];
    let mut idle_turns = 0;
    while read < from + total {
        let before = read;
        let chunk: Vec<u8> = (written..from + total)
            .take(1 << 16)
            .map(pattern_byte)
            .collect();
        if !chunk.is_empty() {
            written += n.a.write(ch, &chunk).unwrap_or(0) as u64;
        }
        let c = n.a.counters(ch).unwrap();
        most_in_flight = most_in_flight.max(c.sent - c.acked);
        n.pump();
        while let Ok(k) = n.b.read(ch, &mut buf) {
            for (i, &b) in buf[..k].iter().enumerate() {
                assert_eq!(b, pattern_byte(read + i as u64), "byte {}", read + i as u64);
            }
            read += k as u64;
        }
        n.pump();
        n.now = Millis(n.now.0 + step_ms);
        n.a.handle_timeout(n.now);
        n.b.handle_timeout(n.now);
        idle_turns = if read == before { idle_turns + 1 } else { 0 };
        assert!(
            idle_turns < 100,
            "{ch:?} stuck at {read}: {:?}",
            n.b.state(ch)
        );
    }
    most_in_flight
}

#[test]
fn a_reader_that_keeps_up_grows_its_window_and_the_sender_uses_it() {
    let mut n = tuned_net(8 * BASE, 1 << 20);
    let ch = n.a.open(ChannelKind::Stream, b"", n.now).unwrap();
    n.pump();
    assert_eq!(n.b.counters(ch).unwrap().buf_alloc, BASE);
    // The clock does not move: every window is taken at once.
    let in_flight = stream(&mut n, ch, 0, 40 * u64::from(BASE), 0);
    let (rx, tx) = (n.b.counters(ch).unwrap(), n.a.counters(ch).unwrap());
    assert_eq!(rx.buf_alloc, 8 * BASE, "doubled up to the maximum");
    assert_eq!(
        tx.peer_buf_alloc,
        8 * BASE,
        "the sender learned it from CREDIT"
    );
    assert_eq!(
        in_flight,
        u64::from(8 * BASE),
        "and kept the whole window in flight"
    );
    assert_eq!(n.b.stats().window_growths, 3);
    assert_eq!(n.b.window_total(), u64::from(8 * BASE));
    // The other direction's window is its own.
    assert_eq!(n.a.counters(ch).unwrap().buf_alloc, BASE);
    assert_eq!(n.a.write_room(ch), 8 * BASE as usize);
}

#[test]
fn a_reader_slower_than_two_round_trips_keeps_the_configured_window() {
    let mut n = tuned_net(8 * BASE, 1 << 20);
    let ch = n.a.open(ChannelKind::Stream, b"", n.now).unwrap();
    n.pump();
    // Half a window per 5 ms turn, read in two quarter-window pieces whose CREDITs go out
    // at the same instant: the reader takes a whole window over 10 ms, and the round
    // trip reads 0 ms.
    let quarter = BASE as usize / 4;
    let (mut written, mut read) = (0u64, 0u64);
    let mut buf = vec![0u8; quarter];
    for _ in 0..40 {
        let half: Vec<u8> = (written..written + 2 * quarter as u64)
            .map(pattern_byte)
            .collect();
        written += n.a.write(ch, &half).unwrap() as u64;
        n.pump();
        for _ in 0..2 {
            let k = n.b.read(ch, &mut buf).unwrap();
            for (i, &b) in buf[..k].iter().enumerate() {
                assert_eq!(b, pattern_byte(read + i as u64));
            }
            read += k as u64;
            n.pump();
        }
        n.now = Millis(n.now.0 + 5);
        n.a.handle_timeout(n.now);
        n.b.handle_timeout(n.now);
    }
    assert_eq!(
        (read, written),
        (20 * u64::from(BASE), 20 * u64::from(BASE))
    );
    assert_eq!(n.b.stats().srtt_ms, 0);
    assert_eq!(n.b.counters(ch).unwrap().buf_alloc, BASE);
    assert_eq!(n.b.stats().window_growths, 0);
}

#[test]
fn a_stalled_channel_never_grows_and_a_grown_one_that_stalls_holds_its_window() {
    let mut n = tuned_net(8 * BASE, 1 << 20);
    let stalled = n.a.open(ChannelKind::Stream, b"", n.now).unwrap();
    let busy = n.a.open(ChannelKind::Stream, b"", n.now).unwrap();
    n.pump();
    let block = vec![7u8; 100_000];
    assert_eq!(n.a.write(stalled, &block), Ok(BASE as usize));
    stream(&mut n, busy, 0, 40 * u64::from(BASE), 0);
    assert_eq!(n.b.counters(busy).unwrap().buf_alloc, 8 * BASE);
    let c = n.b.counters(stalled).unwrap();
    assert_eq!(
        (c.buf_alloc, c.received, c.consumed),
        (BASE, u64::from(BASE), 0)
    );
    assert_eq!(n.a.write(stalled, &block), Err(ChannelError::WouldBlock));
    // The grown channel's reader stops: it buffers its grown window and no more.
    n.a.write(busy, &block).unwrap();
    for _ in 0..20 {
        let _ = n.a.write(busy, &block);
        n.pump();
    }
    let c = n.b.counters(busy).unwrap();
    assert_eq!(c.buf_alloc, 8 * BASE);
    assert_eq!(c.received - c.consumed, u64::from(8 * BASE));
    let t = n.a.counters(busy).unwrap();
    assert_eq!(t.sent - t.acked, u64::from(8 * BASE));
    assert_eq!(n.b.stats().violations + n.a.stats().violations, 0);
}

#[test]
fn the_budget_bounds_the_sum_of_windows() {
    // Two fast channels, room for ten base windows in all.
    let budget = 10 * u64::from(BASE);
    let mut n = tuned_net(16 * BASE, budget);
    let x = n.a.open(ChannelKind::Stream, b"", n.now).unwrap();
    let y = n.a.open(ChannelKind::Stream, b"", n.now).unwrap();
    n.pump();
    // Taking turns, so both grow (the budget goes to whichever asks first).
    let turn = 4 * u64::from(BASE);
    for i in 0..20 {
        for ch in [x, y] {
            stream(&mut n, ch, i * turn, turn, 0);
        }
        assert!(n.b.window_total() <= budget, "{}", n.b.window_total());
    }
    let (wx, wy) = (
        n.b.counters(x).unwrap().buf_alloc,
        n.b.counters(y).unwrap().buf_alloc,
    );
    assert_eq!(
        u64::from(wx + wy),
        budget,
        "grown to the budget: {wx} + {wy}"
    );
    assert!(wx > BASE && wy > BASE, "both grew: {wx} {wy}");
    assert!(n.b.stats().window_growths_denied > 0);
    // A new channel still gets the configured window, and cannot grow past the budget.
    let z = n.a.open(ChannelKind::Stream, b"", n.now).unwrap();
    n.pump();
    stream(&mut n, z, 0, 16 * u64::from(BASE), 0);
    assert_eq!(n.b.counters(z).unwrap().buf_alloc, BASE);
    // When a grown channel ends, its share goes back to the budget.
    n.a.close(x);
    n.pump();
    n.b.close(x);
    stream(&mut n, z, 16 * u64::from(BASE), 16 * u64::from(BASE), 0);
    assert!(n.b.counters(z).unwrap().buf_alloc > BASE);
    assert!(n.b.window_total() <= budget);
}

#[test]
fn the_round_trip_is_measured_and_a_long_one_lets_a_slower_reader_grow() {
    let mut n = tuned_net(8 * BASE, 1 << 20);
    let ch = n.a.open(ChannelKind::Stream, b"", n.now).unwrap();
    n.pump();
    // B probes; A answers 20 ms later; the answer takes 20 ms more.
    n.b.handle_timeout(n.now);
    let mut ping = Vec::new();
    n.b.poll_transmit(n.now, &mut ping, 1 << 20);
    assert!(matches!(
        wire::decode(&ping),
        Ok(Some((Frame::Ping { .. }, _)))
    ));
    n.now = Millis(n.now.0 + 20);
    n.a.handle_bytes(n.now, &ping).unwrap();
    let mut pong = Vec::new();
    n.a.poll_transmit(n.now, &mut pong, 1 << 20);
    n.now = Millis(n.now.0 + 20);
    n.b.handle_bytes(n.now, &pong).unwrap();
    assert_eq!(n.b.stats().srtt_ms, 40);
    // A window per 5 ms is well within two 40 ms round trips.
    stream(&mut n, ch, 0, 40 * u64::from(BASE), 5);
    assert_eq!(n.b.counters(ch).unwrap().buf_alloc, 8 * BASE);
}

#[test]
fn a_grown_window_resumes_exactly_and_its_replay_covers_it() {
    let mut n = tuned_net(8 * BASE, 1 << 20);
    let ch = n.a.open(ChannelKind::Stream, b"", n.now).unwrap();
    n.pump();
    let total = 40 * u64::from(BASE);
    stream(&mut n, ch, 0, total, 0);
    assert_eq!(n.a.counters(ch).unwrap().peer_buf_alloc, 8 * BASE);
    // A whole grown window in flight, half of it delivered, then the TCP connection
    // goes.
    let data: Vec<u8> = (total..total + u64::from(8 * BASE))
        .map(pattern_byte)
        .collect();
    assert_eq!(n.a.write(ch, &data), Ok(data.len()));
    assert_eq!(n.a.unacked_from(ch, total).as_deref(), Some(&data[..]));
    let mut out = Vec::new();
    n.a.poll_transmit(n.now, &mut out, 1 << 20);
    n.b.handle_bytes(n.now, &out[..out.len() / 2]).unwrap();
    let mut got = drain(&mut n.b, ch);
    n.reconnect();
    n.pump();
    got.extend(drain(&mut n.b, ch));
    assert_eq!(got, data);
    assert!(n.a.stats().retransmitted_bytes > 0);
    assert_eq!(n.b.counters(ch).unwrap().buf_alloc, 8 * BASE);
}

#[test]
fn a_channel_capped_by_its_owner_grows_no_further() {
    let mut n = tuned_net(8 * BASE, 1 << 20);
    let capped = n.a.open(ChannelKind::Stream, b"", n.now).unwrap();
    let free = n.a.open(ChannelKind::Stream, b"", n.now).unwrap();
    n.pump();
    n.b.set_max_window(capped, 2 * BASE).unwrap();
    stream(&mut n, capped, 0, 40 * u64::from(BASE), 0);
    stream(&mut n, free, 0, 40 * u64::from(BASE), 0);
    assert_eq!(n.b.counters(capped).unwrap().buf_alloc, 2 * BASE);
    assert_eq!(n.b.counters(free).unwrap().buf_alloc, 8 * BASE);
    // A cap below the window it has keeps that window (windows never shrink).
    n.b.set_max_window(free, BASE).unwrap();
    stream(&mut n, free, 40 * u64::from(BASE), 8 * u64::from(BASE), 0);
    assert_eq!(n.b.counters(free).unwrap().buf_alloc, 8 * BASE);
    assert_eq!(
        n.b.set_max_window(ChannelId(999), BASE),
        Err(ChannelError::Unknown(ChannelId(999)))
    );
}

/// Found by the relay's join test (a join request channel left `Closing`, and counted, on
/// the requesting host for good): A closes; B hears the CLOSE and its owner releases the
/// dead channel at once, before B's answering CLOSE went out. The answer must still go,
/// and A must let go of the channel.
#[test]
fn a_close_answered_by_a_release_before_the_answer_went_out_ends_on_both_sides() {
    let mut n = Net::new();
    let s = n.a.open(ChannelKind::Stream, b"join", n.now).unwrap();
    n.pump();
    assert_eq!((n.a.channel_count(), n.b.channel_count()), (1, 1));
    n.a.close(s);
    // A's CLOSE reaches B; B's owner releases before B transmits anything.
    let mut out = Vec::new();
    n.a.poll_transmit(n.now, &mut out, 1 << 20);
    n.b.handle_bytes(n.now, &out).expect("a's CLOSE");
    assert!(matches!(n.b.state(s), Ok(ChannelState::Broken(_))));
    n.b.close(s);
    assert_eq!(n.b.channel_count(), 0);
    n.pump();
    assert_eq!(
        n.a.channel_count(),
        0,
        "A still holds the channel it closed"
    );
}
