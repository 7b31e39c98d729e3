//! Fuzz body of the guest-to-guest relay table: arbitrary packets between a few guest
//! addresses, admission answers, and removals, checked against a model of what was
//! admitted and of each direction's credit.

use super::input::{FwdCnt, Window};
use crate::addr::{Cid, Port, VsockAddr};
use crate::packet::{Header, Op};
use crate::relay::{Refusal, RelayConfig, RelayTable, Relayed, Route, Violation};
use crate::test_utils::RawFields;
use arbitrary::{Arbitrary, Unstructured};
use std::collections::HashMap;

const CIDS: [Cid; 3] = [Cid(3), Cid(4), Cid(5)];
const PORTS: [Port; 3] = [Port(1000), Port(1001), Port(5000)];

#[derive(Debug, Clone, Copy, Arbitrary)]
enum Amount {
    Zero,
    Small(u8),
    /// Exactly the credit the receiver's window leaves.
    Allowed,
    Over(u8),
    Raw(u32),
}

#[derive(Debug, Clone, Copy, Arbitrary)]
enum Admit {
    Yes,
    Denied,
    Unavailable,
}

#[derive(Debug, Arbitrary)]
enum Event {
    Packet {
        src: u8,
        dst: u8,
        op: u8,
        type_: u8,
        len: Amount,
        buf_alloc: Window,
        fwd_cnt: FwdCnt,
        admit: Admit,
    },
    Forget(u8, u8),
    RemoveDomain(u8),
}

#[derive(Debug, Arbitrary)]
struct Input {
    max_window: Window,
    max_conns_per_domain: u8,
    events: Vec<Event>,
}

fn addr(i: u8) -> VsockAddr {
    let i = usize::from(i) % (CIDS.len() * PORTS.len());
    VsockAddr::new(CIDS[i / PORTS.len()], PORTS[i % PORTS.len()])
}

use crate::relay::{key_of, Key};

/// One direction of a relayed connection, named by its receiver.
#[derive(Debug, Clone, Copy, Default)]
struct Flow {
    /// Payload bytes forwarded toward the receiver (wrapping).
    sent: u32,
    /// The window the sender was last told (the receiver's `buf_alloc`, capped).
    window: u32,
    /// The receiver's last `fwd_cnt`.
    fwd_cnt: u32,
}

impl Flow {
    fn in_flight(&self) -> u32 {
        self.sent.wrapping_sub(self.fwd_cnt)
    }
}

#[derive(Debug, Clone)]
struct Model {
    info: Relayed,
    established: bool,
    /// Toward the client, toward the server.
    flows: [Flow; 2],
}

/// Relay table.
///
/// Invariants checked on every packet, against a model of the admitted connections:
/// - nothing unadmitted is forwarded: a `Forward` is either the `REQUEST` that the
///   admission check just allowed (and `admit` is asked only for a `REQUEST`), or a packet
///   of a connection admitted earlier and not reset, refused, forgotten or removed since;
///   data is forwarded only after the server's `RESPONSE`;
/// - the forwarded `buf_alloc` is never above the packet's nor above the cap;
/// - credit: after every forwarded `RW`, bytes in flight toward its receiver are within the
///   window the sender was last told; an overrun is a `ResetBoth(CreditOverrun)` with
///   exactly the model's numbers, and the connection is gone afterwards;
/// - refusals and drops happen only where the rules say (unknown connection, domain limit,
///   the caller's refusal; an RST of another type than its connection's is dropped and the
///   connection kept), and the per-domain counts, `len`, `forget` and `remove_domain`
///   agree with the model.
pub fn relay(data: &[u8]) {
    let Ok(input) = Input::arbitrary_take_rest(Unstructured::new(data)) else {
        return;
    };
    let config = RelayConfig {
        max_window_bytes: input.max_window.resolve(),
        max_conns_per_domain: usize::from(input.max_conns_per_domain % 4) + 1,
        hash_seed: 0,
    };
    let mut table = RelayTable::new(config);
    let mut model: HashMap<Key, Model> = HashMap::new();
    for event in input.events {
        match event {
            Event::Packet {
                src,
                dst,
                op,
                type_,
                len,
                buf_alloc,
                fwd_cnt,
                admit,
            } => packet(
                &mut table,
                &mut model,
                &config,
                addr(src),
                addr(dst),
                (op, type_),
                len,
                buf_alloc,
                fwd_cnt,
                admit,
            ),
            Event::Forget(a, b) => {
                let (a, b) = (addr(a), addr(b));
                let want = model.remove(&key_of(a, b)).map(|m| m.info);
                assert_eq!(table.forget(a, b), want);
            }
            Event::RemoveDomain(c) => {
                let cid = CIDS[usize::from(c) % CIDS.len()];
                let mut got = table.remove_domain(cid);
                let mut want: Vec<Relayed> = model
                    .values()
                    .filter(|m| m.info.client.cid == cid || m.info.server.cid == cid)
                    .map(|m| m.info)
                    .collect();
                model.retain(|_, m| m.info.client.cid != cid && m.info.server.cid != cid);
                got.sort_by_key(|r| (r.client, r.server));
                want.sort_by_key(|r| (r.client, r.server));
                assert_eq!(got, want, "remove_domain({cid})");
            }
        }
        check_counts(&table, &model);
    }
}

fn count(model: &HashMap<Key, Model>, cid: Cid) -> usize {
    model
        .values()
        .map(|m| usize::from(m.info.client.cid == cid) + usize::from(m.info.server.cid == cid))
        .sum()
}

fn check_counts(table: &RelayTable, model: &HashMap<Key, Model>) {
    assert_eq!(table.len(), model.len(), "relayed connections");
    for cid in CIDS {
        assert_eq!(table.count_for(cid), count(model, cid), "count_for({cid})");
    }
}

#[allow(clippy::too_many_arguments)]
fn packet(
    table: &mut RelayTable,
    model: &mut HashMap<Key, Model>,
    config: &RelayConfig,
    src: VsockAddr,
    dst: VsockAddr,
    (op, type_): (u8, u8),
    len: Amount,
    buf_alloc: Window,
    fwd_cnt: FwdCnt,
    admit: Admit,
) {
    let key = key_of(src, dst);
    let entry = model.get(&key).cloned();
    // Flows as seen from this sender: the one it receives on and the one it sends on.
    let (inbound, outbound) = match &entry {
        Some(m) if m.info.client == src => (0, 1),
        _ => (1, 0),
    };
    let raw_op = u16::from(op % 8);
    let raw = RawFields {
        src_cid: src.cid.0,
        dst_cid: dst.cid.0,
        src_port: src.port.0,
        dst_port: dst.port.0,
        len: if raw_op == Op::Rw.to_wire() {
            let out = entry
                .as_ref()
                .map(|m| m.flows[outbound])
                .unwrap_or_default();
            let credit = out.window.saturating_sub(out.in_flight());
            match len {
                Amount::Zero => 0,
                Amount::Small(n) => u32::from(n),
                Amount::Allowed => credit,
                Amount::Over(n) => credit.saturating_add(1 + u32::from(n)),
                Amount::Raw(n) => n,
            }
        } else {
            0
        },
        type_: u16::from(type_ % 3),
        op: raw_op,
        flags: 0,
        buf_alloc: buf_alloc.resolve(),
        fwd_cnt: {
            let sent = entry.as_ref().map_or(0, |m| m.flows[inbound].sent);
            fwd_cnt.resolve(sent)
        },
    }
    .to_raw();
    let Ok(hdr) = Header::parse(&raw, u32::MAX) else {
        return;
    };
    let mut asked = false;
    let route = table.handle(&hdr, || {
        asked = true;
        match admit {
            Admit::Yes => Ok(()),
            Admit::Denied => Err(Refusal::Denied),
            Admit::Unavailable => Err(Refusal::Unavailable),
        }
    });
    let capped = hdr.buf_alloc().min(config.max_window_bytes);
    if asked {
        assert_eq!(hdr.op(), Op::Request, "admission asked for {:?}", hdr.op());
    }

    if hdr.op() == Op::Request {
        let conflicting = entry
            .as_ref()
            .is_some_and(|m| m.established || m.info.client != src);
        if conflicting {
            assert!(!asked);
            assert_eq!(route, Route::ResetBoth(Violation::Protocol));
            model.remove(&key);
            return;
        }
        // A retried connect starts over.
        model.remove(&key);
        assert!(asked, "REQUEST forwarded without admission");
        match (admit, route) {
            (Admit::Denied, r) => assert_eq!(r, Route::Refuse(Refusal::Denied)),
            (Admit::Unavailable, r) => assert_eq!(r, Route::Refuse(Refusal::Unavailable)),
            (Admit::Yes, Route::Refuse(Refusal::TooManyConnections)) => {
                let limit = config.max_conns_per_domain;
                assert!(count(model, src.cid) >= limit || count(model, dst.cid) >= limit);
            }
            (Admit::Yes, r) => {
                let limit = config.max_conns_per_domain;
                assert!(count(model, src.cid) < limit && count(model, dst.cid) < limit);
                assert_eq!(
                    r,
                    Route::Forward {
                        buf_alloc: capped,
                        last: false,
                        admitted: true
                    }
                );
                let mut flows = [Flow::default(); 2];
                flows[0] = Flow {
                    sent: 0,
                    window: capped,
                    fwd_cnt: hdr.fwd_cnt(),
                };
                model.insert(
                    key,
                    Model {
                        info: Relayed {
                            client: src,
                            server: dst,
                            socket_type: hdr.socket_type(),
                        },
                        established: false,
                        flows,
                    },
                );
            }
        }
        return;
    }

    let Some(mut m) = entry else {
        let want = if hdr.op() == Op::Rst {
            Route::Drop
        } else {
            Route::Refuse(Refusal::UnknownConnection)
        };
        assert_eq!(route, want, "{:?} of an unknown connection", hdr.op());
        return;
    };
    match route {
        Route::Forward {
            buf_alloc,
            last,
            admitted,
        } => {
            assert!(!admitted);
            assert!(buf_alloc <= hdr.buf_alloc() && buf_alloc <= config.max_window_bytes);
            assert_eq!(buf_alloc, capped);
            assert_eq!(
                hdr.socket_type(),
                m.info.socket_type,
                "forwarded a type mismatch"
            );
            assert_eq!(last, hdr.op() == Op::Rst);
            if last {
                model.remove(&key);
                return;
            }
            m.flows[inbound].window = capped;
            m.flows[inbound].fwd_cnt = hdr.fwd_cnt();
            match hdr.op() {
                Op::Response => {
                    assert!(
                        m.info.client != src && !m.established,
                        "bad RESPONSE forwarded"
                    );
                    m.established = true;
                }
                Op::Rw => {
                    assert!(m.established, "data forwarded before the RESPONSE");
                    let flow = &mut m.flows[outbound];
                    flow.sent = flow.sent.wrapping_add(hdr.len());
                    assert!(
                        flow.in_flight() <= flow.window,
                        "{} bytes in flight above the window {}",
                        flow.in_flight(),
                        flow.window
                    );
                }
                _ => {}
            }
            model.insert(key, m);
        }
        Route::ResetBoth(Violation::CreditOverrun { in_flight, window }) => {
            assert_eq!(hdr.op(), Op::Rw);
            let flow = m.flows[outbound];
            let after = flow
                .sent
                .wrapping_add(hdr.len())
                .wrapping_sub(m.flows[outbound].fwd_cnt);
            assert_eq!((in_flight, window), (after, flow.window));
            assert!(in_flight > window);
            model.remove(&key);
        }
        Route::ResetBoth(Violation::Protocol) => {
            let legal = match hdr.op() {
                Op::Response => m.info.client != src && !m.established,
                Op::Rw => m.established,
                _ => true,
            };
            assert!(
                hdr.socket_type() != m.info.socket_type || !legal,
                "{:?} reset as a protocol violation",
                hdr.op()
            );
            model.remove(&key);
        }
        Route::Refuse(r) => panic!("{:?} of an admitted connection refused: {r:?}", hdr.op()),
        Route::Drop => assert!(
            hdr.op() == Op::Rst && hdr.socket_type() != m.info.socket_type,
            "{:?} of an admitted connection dropped",
            hdr.op()
        ),
    }
}
