//! Randomized tests of the guest-to-guest relay table: honest guests are never cut off,
//! whatever their windows and timing; arbitrary packet sequences never panic, never forward
//! anything for a connection that was not admitted, and keep the per-domain counts exact.

mod harness;

use domsock_proto::packet::HeaderBuilder;
use domsock_proto::relay::{Refusal, RelayConfig, RelayTable, Route};
use domsock_proto::{Cid, Header, Op, Port, SocketType, VsockAddr};
use harness::Rng;
use std::collections::HashSet;

/// A stream packet, to be finished with [`HeaderBuilder::build`].
fn builder(
    src: VsockAddr,
    dst: VsockAddr,
    op: Op,
    len: u32,
    buf_alloc: u32,
    fwd_cnt: u32,
) -> HeaderBuilder {
    HeaderBuilder::new(src, dst, op)
        .len(len)
        .credit(buf_alloc, fwd_cnt)
}

fn hdr(src: VsockAddr, dst: VsockAddr, op: Op, len: u32, buf_alloc: u32, fwd_cnt: u32) -> Header {
    builder(src, dst, op, len, buf_alloc, fwd_cnt).build()
}

/// One direction of an honest connection: what the sender last heard and what the receiver
/// has consumed.
#[derive(Default)]
struct Flow {
    sent: u32,
    /// Received by the receiver, not yet consumed by its application.
    buffered: u32,
    fwd_cnt: u32,
    /// The receiver's real buffer.
    buf_alloc: u32,
    /// What the relay forwarded to the sender last.
    heard_window: u32,
    heard_fwd_cnt: u32,
}

#[test]
fn honest_guests_are_never_cut_off() {
    for seed in 0..50u64 {
        let mut rng = Rng::new(seed);
        let cap = 1 + rng.below(1 << 21) as u32;
        let mut t = RelayTable::new(RelayConfig {
            max_window_bytes: cap,
            ..RelayConfig::default()
        });
        let a = VsockAddr::new(Cid(3), Port(40_000));
        let b = VsockAddr::new(Cid(4), Port(5000));
        let mut flows = [Flow::default(), Flow::default()]; // a->b, b->a
        flows[0].buf_alloc = 1 + rng.below(1 << 22) as u32;
        flows[1].buf_alloc = 1 + rng.below(1 << 22) as u32;
        let Route::Forward { buf_alloc, .. } = t.handle(
            &hdr(a, b, Op::Request, 0, flows[1].buf_alloc, flows[1].fwd_cnt),
            || Ok(()),
        ) else {
            panic!("seed {seed}: request not forwarded");
        };
        flows[1].heard_window = buf_alloc;
        flows[1].heard_fwd_cnt = flows[1].fwd_cnt;
        let Route::Forward { buf_alloc, .. } = t.handle(
            &hdr(b, a, Op::Response, 0, flows[0].buf_alloc, flows[0].fwd_cnt),
            || Ok(()),
        ) else {
            panic!("seed {seed}: response not forwarded");
        };
        flows[0].heard_window = buf_alloc;
        flows[0].heard_fwd_cnt = flows[0].fwd_cnt;
        let ends = [(a, b), (b, a)];
        for step in 0..5_000 {
            let d = rng.below(2) as usize;
            let (src, dst) = ends[d];
            let back = 1 - d;
            if rng.chance(60) {
                // The sender sends what the credit it heard of allows.
                let f = &flows[d];
                let in_flight = f.sent.wrapping_sub(f.heard_fwd_cnt);
                let credit = f.heard_window.saturating_sub(in_flight);
                if credit == 0 {
                    continue;
                }
                let len = 1 + rng.below(u64::from(credit.min(65_536))) as u32;
                let (rb, rf) = (flows[back].buf_alloc, flows[back].fwd_cnt);
                let route = t.handle(&hdr(src, dst, Op::Rw, len, rb, rf), || Ok(()));
                let Route::Forward { buf_alloc, .. } = route else {
                    panic!("seed {seed} step {step}: honest data cut off: {route:?}");
                };
                // The packet also told the other direction's sender about our window.
                flows[back].heard_window = buf_alloc;
                flows[back].heard_fwd_cnt = rf;
                let f = &mut flows[d];
                f.sent = f.sent.wrapping_add(len);
                f.buffered += len;
                assert!(f.buffered <= f.buf_alloc, "seed {seed}: the model overran");
            } else {
                // The receiver of direction d consumes some and says so.
                let f = &mut flows[d];
                let n = rng.below(u64::from(f.buffered) + 1) as u32;
                f.buffered -= n;
                f.fwd_cnt = f.fwd_cnt.wrapping_add(n);
                // Sometimes it also resizes its buffer (only up, as Linux does in practice).
                if rng.chance(5) {
                    f.buf_alloc = f.buf_alloc.saturating_add(rng.below(1 << 16) as u32);
                }
                let (rb, rf) = (f.buf_alloc, f.fwd_cnt);
                let route = t.handle(&hdr(dst, src, Op::CreditUpdate, 0, rb, rf), || Ok(()));
                let Route::Forward { buf_alloc, .. } = route else {
                    panic!("seed {seed} step {step}: credit update not forwarded: {route:?}");
                };
                assert!(buf_alloc <= cap, "window above the cap");
                flows[d].heard_window = buf_alloc;
                flows[d].heard_fwd_cnt = rf;
            }
        }
        assert_eq!(t.len(), 1);
    }
}

#[test]
fn arbitrary_packets_never_pass_unadmitted_and_counts_stay_exact() {
    let ops = [
        Op::Request,
        Op::Response,
        Op::Rst,
        Op::Shutdown,
        Op::Rw,
        Op::CreditUpdate,
        Op::CreditRequest,
    ];
    for seed in 0..200u64 {
        let mut rng = Rng::new(seed ^ 0x5eed);
        let mut t = RelayTable::new(RelayConfig {
            max_window_bytes: 1 + rng.below(1 << 20) as u32,
            max_conns_per_domain: 1 + rng.below(6) as usize,
            hash_seed: seed,
        });
        let addr = |rng: &mut Rng| VsockAddr::new(Cid(3 + rng.below(3)), Port(rng.below(3) as u32));
        let mut admitted: HashSet<(VsockAddr, VsockAddr)> = HashSet::new();
        let norm = |x: VsockAddr, y: VsockAddr| if x <= y { (x, y) } else { (y, x) };
        for _ in 0..2_000 {
            let (src, dst) = (addr(&mut rng), addr(&mut rng));
            let op = ops[rng.below(ops.len() as u64) as usize];
            let len = if op == Op::Rw {
                rng.below(70_000) as u32
            } else {
                0
            };
            let mut b = builder(
                src,
                dst,
                op,
                len,
                rng.next_u64() as u32,
                rng.next_u64() as u32,
            );
            if rng.chance(10) {
                b = b.socket_type(SocketType::SeqPacket);
            }
            let h = b.build();
            let deny = rng.chance(20);
            let route = t.handle(&h, || if deny { Err(Refusal::Denied) } else { Ok(()) });
            let key = norm(src, dst);
            match route {
                Route::Forward { admitted: true, .. } => {
                    assert_eq!(op, Op::Request);
                    assert!(!deny);
                    admitted.insert(key);
                }
                Route::Forward { last, .. } => {
                    assert!(
                        admitted.contains(&key),
                        "seed {seed}: {h:?} passed unadmitted"
                    );
                    if last {
                        admitted.remove(&key);
                    }
                }
                Route::ResetBoth(_) => {
                    admitted.remove(&key);
                }
                Route::Refuse(_) | Route::Drop => {
                    if op == Op::Request {
                        // A request may have replaced (and then failed to re-admit) an
                        // older connection on the same pair.
                        admitted.remove(&key);
                    }
                }
            }
            assert_eq!(t.len(), admitted.len(), "seed {seed}");
            let per_domain: usize = (3..6).map(|c| t.count_for(Cid(c))).sum();
            // Each connection counts once for each end's domain (twice for a domain talking
            // to itself).
            assert_eq!(
                per_domain,
                2 * admitted.len(),
                "seed {seed}: per-domain counts drifted"
            );
        }
        for c in 3..6 {
            t.remove_domain(Cid(c));
        }
        assert!(t.is_empty());
        assert!((3..6).all(|c| t.count_for(Cid(c)) == 0));
    }
}
