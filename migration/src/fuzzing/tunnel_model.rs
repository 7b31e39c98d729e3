//! Body of the `tunnel_model` fuzz target: two tunnel [`Endpoint`]s in memory, driven by
//! the fuzzer's bytes through opens, writes, reads, partial deliveries, TCP cuts,
//! reconnects, clock jumps, shutdowns and closes.
//!
//! Invariants: every byte (and every seqpacket message) an owner reads is the next one its
//! peer's owner wrote on that channel (nothing skipped, repeated or reordered, across any
//! number of reconnects); no receiver ever buffers more than it granted and no sender has
//! more unacknowledged bytes than the window; receive windows grow (autotuning: the clock
//! moves only on clock events, so most readers look fast) but never past the maximum, a
//! sender never believes a larger window than its receiver granted, and the windows'
//! growth beyond the configured size stays within the budget; receive buffers hold no
//! more chunks than their buffered bytes fill plus one per channel, and the chunk pool
//! keeps its bound; honest endpoints never see a link error;
//! and once the fuzzer's events are spent, a final reconnect and drain delivers every
//! byte written on the channels still open at both ends.

use crate::tunnel::rxbuf::{CHUNK_BYTES, POOL_MAX_FREE_CHUNKS};
use crate::tunnel::wire::{ChannelId, ChannelKind, Incarnation};
use crate::tunnel::{ChannelState, Endpoint, EndpointConfig, Event, Millis};
use std::collections::{BTreeMap, BTreeSet, VecDeque};

const BUF_ALLOC: u32 = 3000;
/// Autotuning's bounds: four times the configured window per channel, and a budget that
/// the 8 channels' configured windows alone nearly fill.
const MAX_WINDOW: u32 = 4 * BUF_ALLOC;
const BUDGET: u64 = 30_000;

fn pattern(ch: ChannelId, from_a: bool, at: u64) -> u8 {
    (at.wrapping_mul(31) ^ (u64::from(ch.0) * 7) ^ (u64::from(from_a) * 0x55)) as u8
}

#[derive(Debug, Default)]
struct Dir {
    written: u64,
    read: u64,
    /// Seqpacket: message lengths written and not yet read.
    msgs: VecDeque<usize>,
}

#[derive(Debug)]
struct Pair {
    kind: ChannelKind,
    a_to_b: Dir,
    b_to_a: Dir,
}

struct Model {
    a: Endpoint,
    b: Endpoint,
    ab: Vec<u8>,
    ba: Vec<u8>,
    up: bool,
    now: Millis,
    pairs: BTreeMap<ChannelId, Pair>,
    /// Every channel either end may still hold (a pair ends when one end closes).
    channels: BTreeSet<ChannelId>,
}

impl Model {
    fn ep(&mut self, a: bool) -> &mut Endpoint {
        if a {
            &mut self.a
        } else {
            &mut self.b
        }
    }

    fn events(&mut self, a: bool, accept: bool) {
        while let Some(e) = self.ep(a).poll_event() {
            match e {
                Event::IncomingOpen { channel, kind, .. } => {
                    // The opener may have closed it already (the OPEN and the CLOSE
                    // arrived in one delivery): then accepting fails, cleanly.
                    if accept && self.ep(a).accept(channel).is_ok() {
                        self.channels.insert(channel);
                        self.pairs.entry(channel).or_insert(Pair {
                            kind,
                            a_to_b: Dir::default(),
                            b_to_a: Dir::default(),
                        });
                    } else if !accept {
                        self.ep(a)
                            .refuse(channel, crate::tunnel::RefusalCode::Policy, "no");
                    }
                }
                Event::LinkDead => self.cut(),
                Event::Up { .. } | Event::Changed(_) => {}
            }
        }
    }

    fn cut(&mut self) {
        self.up = false;
        self.ab.clear();
        self.ba.clear();
        let now = self.now;
        self.a.disconnected(now);
        self.b.disconnected(now);
    }

    fn connect(&mut self) {
        if !self.up {
            self.up = true;
            let now = self.now;
            self.a.connected(now);
            self.b.connected(now);
        }
    }

    /// Moves up to `n` bytes from `from_a`'s side to the other.
    fn deliver(&mut self, from_a: bool, n: usize) {
        let now = self.now;
        let pipe_len = if from_a { self.ab.len() } else { self.ba.len() };
        if pipe_len < n {
            let mut out = std::mem::take(if from_a { &mut self.ab } else { &mut self.ba });
            self.ep(from_a).poll_transmit(now, &mut out, n.max(1));
            *(if from_a { &mut self.ab } else { &mut self.ba }) = out;
        }
        let pipe = if from_a { &mut self.ab } else { &mut self.ba };
        let k = n.min(pipe.len());
        let chunk: Vec<u8> = pipe.drain(..k).collect();
        let r = self.ep(!from_a).handle_bytes(now, &chunk);
        assert_eq!(r, Ok(()), "an honest peer's bytes were refused");
        self.events(!from_a, true);
    }

    fn write(&mut self, ch: ChannelId, from_a: bool, n: usize) {
        let Some(p) = self.pairs.get(&ch) else { return };
        let kind = p.kind;
        let d = if from_a { &p.a_to_b } else { &p.b_to_a };
        let start = d.written;
        let data: Vec<u8> = (0..n as u64)
            .map(|i| pattern(ch, from_a, start + i))
            .collect();
        let r = match kind {
            ChannelKind::Stream => self.ep(from_a).write(ch, &data),
            ChannelKind::SeqPacket => self.ep(from_a).send_msg(ch, &data).map(|()| n),
        };
        if let Ok(k) = r {
            let p = self.pairs.get_mut(&ch).expect("pair");
            let d = if from_a { &mut p.a_to_b } else { &mut p.b_to_a };
            d.written += k as u64;
            if kind == ChannelKind::SeqPacket {
                d.msgs.push_back(k);
            }
        }
    }

    fn read(&mut self, ch: ChannelId, at_a: bool, n: usize) {
        let Some(p) = self.pairs.get(&ch) else { return };
        let kind = p.kind;
        let mut buf = vec![0u8; n.max(1)];
        // Bytes read at A were written by B.
        let from_a = !at_a;
        match kind {
            ChannelKind::Stream => {
                if let Ok(k) = self.ep(at_a).read(ch, &mut buf) {
                    let p = self.pairs.get_mut(&ch).expect("pair");
                    let d = if from_a { &mut p.a_to_b } else { &mut p.b_to_a };
                    for (i, &b) in buf[..k].iter().enumerate() {
                        assert_eq!(
                            b,
                            pattern(ch, from_a, d.read + i as u64),
                            "{ch:?} byte {} wrong",
                            d.read + i as u64
                        );
                    }
                    d.read += k as u64;
                    assert!(d.read <= d.written, "read more than written");
                }
            }
            ChannelKind::SeqPacket => {
                let mut big = vec![0u8; MAX_WINDOW as usize];
                if let Ok(Some(len)) = self.ep(at_a).recv_msg(ch, &mut big) {
                    let p = self.pairs.get_mut(&ch).expect("pair");
                    let d = if from_a { &mut p.a_to_b } else { &mut p.b_to_a };
                    assert_eq!(d.msgs.pop_front(), Some(len), "{ch:?} message length");
                    for (i, &b) in big[..len].iter().enumerate() {
                        assert_eq!(b, pattern(ch, from_a, d.read + i as u64), "{ch:?} message");
                    }
                    d.read += len as u64;
                }
            }
        }
    }

    fn check_bounds(&self) {
        for &ch in self.pairs.keys() {
            for (ep, peer) in [(&self.a, &self.b), (&self.b, &self.a)] {
                if let Ok(c) = ep.counters(ch) {
                    assert!(
                        (BUF_ALLOC..=MAX_WINDOW).contains(&c.buf_alloc),
                        "{ch:?} window {}",
                        c.buf_alloc
                    );
                    assert!(
                        c.received - c.consumed <= u64::from(c.buf_alloc),
                        "{ch:?} buffers {} > window {}",
                        c.received - c.consumed,
                        c.buf_alloc
                    );
                    assert!(
                        c.sent - c.acked <= u64::from(c.peer_buf_alloc.max(BUF_ALLOC)),
                        "{ch:?} has {} unacknowledged",
                        c.sent - c.acked
                    );
                    if let Ok(p) = peer.counters(ch) {
                        assert!(
                            c.peer_buf_alloc <= p.buf_alloc,
                            "{ch:?} sender believes {} > granted {}",
                            c.peer_buf_alloc,
                            p.buf_alloc
                        );
                    }
                }
            }
        }
        for ep in [&self.a, &self.b] {
            // Receive buffers hold what is buffered, rounded up to chunks, plus at most
            // one partly used chunk per channel; the pool keeps its bound.
            let buffered: usize = self
                .channels
                .iter()
                .filter_map(|&ch| ep.counters(ch).ok())
                .map(|c| ((c.received - c.consumed) as usize).div_ceil(CHUNK_BYTES) + 1)
                .sum();
            let m = ep.rx_memory();
            assert!(
                m.held_chunks <= buffered,
                "receive buffers hold {} chunks for at most {buffered}",
                m.held_chunks
            );
            assert!(m.free_chunks <= POOL_MAX_FREE_CHUNKS, "pool keeps {m:?}");
            let grown = ep
                .window_total()
                .saturating_sub(u64::from(BUF_ALLOC) * ep.channel_count() as u64);
            assert!(
                grown <= BUDGET,
                "windows grew {grown} past the configured ones"
            );
        }
    }
}

fn open_both(ep: &Endpoint, ch: ChannelId) -> bool {
    matches!(
        ep.state(ch),
        Ok(ChannelState::Open | ChannelState::PeerShutdown { .. })
    )
}

/// Two endpoints under random events; see the module doc for the invariants.
pub fn tunnel_model(data: &[u8]) {
    let cfg = EndpointConfig {
        buf_alloc_bytes: BUF_ALLOC,
        max_window_bytes: MAX_WINDOW,
        window_budget_bytes: BUDGET,
        keepalive_idle_ms: 100,
        keepalive_dead_ms: 1_000,
        resume_timeout_ms: 5_000,
        max_channels: 8,
    };
    let now = Millis(0);
    let mut m = Model {
        a: Endpoint::new(cfg.clone(), "a", "b", Incarnation([1; 16]), now),
        b: Endpoint::new(cfg, "b", "a", Incarnation([2; 16]), now),
        ab: Vec::new(),
        ba: Vec::new(),
        up: false,
        now,
        pairs: BTreeMap::new(),
        channels: BTreeSet::new(),
    };
    m.connect();
    let mut it = data.chunks_exact(3);
    for op in &mut it {
        let (code, x, y) = (op[0], op[1], op[2]);
        let side_a = code & 0x80 != 0;
        let ids: Vec<ChannelId> = m.pairs.keys().copied().collect();
        let ch = ids.get(usize::from(x) % ids.len().max(1)).copied();
        match code & 0x0f {
            0 => {
                let kind = if y & 1 == 0 {
                    ChannelKind::Stream
                } else {
                    ChannelKind::SeqPacket
                };
                let now = m.now;
                if let Ok(id) = m.ep(side_a).open(kind, &[y], now) {
                    m.channels.insert(id);
                    m.pairs.insert(
                        id,
                        Pair {
                            kind,
                            a_to_b: Dir::default(),
                            b_to_a: Dir::default(),
                        },
                    );
                }
            }
            1..=3 => {
                if let Some(ch) = ch {
                    m.write(ch, side_a, usize::from(y) * 16 + 1);
                }
            }
            4 | 5 => {
                if let Some(ch) = ch {
                    m.read(ch, side_a, usize::from(y) * 16 + 1);
                }
            }
            6..=9 => {
                if m.up {
                    m.deliver(side_a, usize::from(y) * 64 + usize::from(x));
                }
            }
            10 => m.cut(),
            11 => m.connect(),
            12 => {
                m.now = Millis(m.now.0 + u64::from(y) * 20);
                let now = m.now;
                m.a.handle_timeout(now);
                m.b.handle_timeout(now);
                m.events(true, true);
                m.events(false, true);
            }
            13 => {
                if let Some(ch) = ch {
                    let _ = m.ep(side_a).shutdown(ch, false, true);
                }
            }
            14 => {
                if let Some(ch) = ch {
                    m.ep(side_a).close(ch);
                    m.pairs.remove(&ch);
                }
            }
            _ => {
                if m.up {
                    m.deliver(true, usize::from(y));
                    m.deliver(false, usize::from(x));
                }
            }
        }
        m.check_bounds();
    }
    // Drain: one clean connection, everything pumped and read.
    m.connect();
    for _ in 0..10_000 {
        let mut moved = false;
        for from_a in [true, false] {
            let before = (m.ab.len(), m.ba.len());
            m.deliver(from_a, 1 << 20);
            moved |= before != (m.ab.len(), m.ba.len());
        }
        let ids: Vec<ChannelId> = m.pairs.keys().copied().collect();
        for ch in ids {
            for at_a in [true, false] {
                let before = m.pairs[&ch].a_to_b.read + m.pairs[&ch].b_to_a.read;
                m.read(ch, at_a, 1 << 16);
                moved |= before != m.pairs[&ch].a_to_b.read + m.pairs[&ch].b_to_a.read;
            }
        }
        m.check_bounds();
        if !moved && !m.a.wants_transmit() && !m.b.wants_transmit() {
            break;
        }
    }
    for (ch, p) in &m.pairs {
        if open_both(&m.a, *ch) && open_both(&m.b, *ch) {
            assert_eq!(p.a_to_b.read, p.a_to_b.written, "{ch:?} a->b undelivered");
            assert_eq!(p.b_to_a.read, p.b_to_a.written, "{ch:?} b->a undelivered");
        }
    }
}
