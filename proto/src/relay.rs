//! Guest-to-guest relaying decisions: the table of connections between two guests that a
//! backend passes through, and what to do with each packet of them.
//!
//! Relayed packets keep their headers: the two guests' transports run the connection end
//! to end (handshake, credit, shutdown), and the relay only watches. It admits a
//! connection on `REQUEST` (the caller decides with its policy), forwards what belongs to
//! an admitted connection, and answers everything else with an RST, as a kernel would. It
//! keeps its own accounting of the credit each receiver advertised so that a sender that
//! overruns it is cut off here: whatever the relay must hold for a receiver whose ring is
//! full is then bounded by the window, which the relay also caps ([`RelayConfig::max_window_bytes`])
//! by lowering the `buf_alloc` it forwards. Lowering is always safe: a sender only ever
//! sends less.
//!
//! ```text
//!  client guest            relay (this table)               server guest
//!    REQUEST  ------------> admit? (policy) ----forward------>
//!             <--forward--- Requested -> Established <------ RESPONSE
//!    RW       ------------> sent - fwd_cnt <= buf_alloc? ----->
//!             <--forward--- note buf_alloc/fwd_cnt    <------ CREDIT_UPDATE
//!    RST      ------------> forget --------forward----------->
//! ```
//!
//! What it does not do: move payload, look at guest memory, or know about namespaces and
//! names (the caller checks routability before asking).

use crate::addr::{Cid, VsockAddr};
use crate::hash::KeyedState;
use crate::packet::{Header, Op, SocketType};
use std::collections::HashMap;

/// Limits of a relay table.
#[derive(Debug, Clone, Copy)]
pub struct RelayConfig {
    /// Largest receive window a sender is told about (the `buf_alloc` forwarded to it).
    pub max_window_bytes: u32,
    /// Relayed connections one domain may take part in.
    pub max_conns_per_domain: usize,
    /// Seed of the table's hasher (guests choose the ports in keys).
    pub hash_seed: u64,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            max_window_bytes: 1 << 20,
            max_conns_per_domain: 1024,
            hash_seed: 0,
        }
    }
}

/// Why a packet is answered with an RST instead of being forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The caller's admission check said no.
    Denied,
    /// No such connection (and not a `REQUEST`).
    UnknownConnection,
    /// The sender or the receiver has too many relayed connections.
    TooManyConnections,
    /// The destination cannot take connections now (caller's reason).
    Unavailable,
}

/// A broken rule that ends a relayed connection at both ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Violation {
    /// The sender sent more than the receiver's advertised window.
    CreditOverrun {
        /// Bytes in flight after this packet.
        in_flight: u32,
        /// The window.
        window: u32,
    },
    /// Data before the connection was established, a `RESPONSE` from the wrong end, or a
    /// socket type that does not match the connection's.
    Protocol,
}

/// What to do with one packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum Route {
    /// Forward to the destination guest with `buf_alloc` replacing the header's. `last`
    /// says the connection is forgotten (an RST passed).
    Forward {
        /// The `buf_alloc` to put in the forwarded header.
        buf_alloc: u32,
        /// The connection ended with this packet.
        last: bool,
        /// A new connection was admitted with this packet.
        admitted: bool,
    },
    /// Answer the sender with an RST; forward nothing.
    Refuse(Refusal),
    /// Drop silently: an RST for a connection nobody knows, or of another socket type
    /// than its connection's (which its receiver would ignore).
    Drop,
    /// Send an RST to both ends and forget the connection.
    ResetBoth(Violation),
}

/// One relayed connection, as reported when it is removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Relayed {
    /// The end that sent the `REQUEST`.
    pub client: VsockAddr,
    /// The end that listens.
    pub server: VsockAddr,
    /// Stream or seqpacket.
    pub socket_type: SocketType,
}

#[derive(Debug, Clone, Copy, Default)]
struct Flow {
    /// Payload bytes sent toward this flow's receiver (wrapping, like `fwd_cnt`).
    sent: u32,
    /// The receiver's window as forwarded (capped).
    window: u32,
    /// The receiver's last `fwd_cnt`.
    fwd_cnt: u32,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    info: Relayed,
    established: bool,
    /// Toward the client, toward the server.
    flows: [Flow; 2],
}

/// Normalized key: the smaller address first, so both directions find the entry.
pub(crate) type Key = (VsockAddr, VsockAddr);

pub(crate) fn key_of(a: VsockAddr, b: VsockAddr) -> Key {
    if a <= b {
        (a, b)
    } else {
        (b, a)
    }
}

/// The relay's connection table.
#[derive(Debug)]
pub struct RelayTable {
    config: RelayConfig,
    conns: HashMap<Key, Entry, KeyedState>,
    per_domain: HashMap<Cid, usize, KeyedState>,
}

impl RelayTable {
    /// An empty table.
    pub fn new(config: RelayConfig) -> Self {
        Self {
            config,
            conns: HashMap::with_hasher(KeyedState::new(config.hash_seed)),
            per_domain: HashMap::with_hasher(KeyedState::new(config.hash_seed ^ 1)),
        }
    }

    /// Relayed connections now.
    pub fn len(&self) -> usize {
        self.conns.len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    /// Relayed connections `cid` takes part in.
    pub fn count_for(&self, cid: Cid) -> usize {
        self.per_domain.get(&cid).copied().unwrap_or(0)
    }

    fn cap(&self, buf_alloc: u32) -> u32 {
        buf_alloc.min(self.config.max_window_bytes)
    }

    /// Decides what happens to `hdr`, sent by `hdr.src()` (whose CID the caller verified) to
    /// another guest. For a `REQUEST` of a new connection `admit` is asked first.
    pub fn handle(&mut self, hdr: &Header, admit: impl FnOnce() -> Result<(), Refusal>) -> Route {
        let key = key_of(hdr.src(), hdr.dst());
        if hdr.op() == Op::Request {
            if let Some(old) = self.conns.get(&key) {
                if old.established || old.info.client != hdr.src() {
                    self.remove(key);
                    return Route::ResetBoth(Violation::Protocol);
                }
                // A retried connect on the same port: start over.
                self.remove(key);
            }
            if let Err(r) = admit() {
                return Route::Refuse(r);
            }
            let limit = self.config.max_conns_per_domain;
            if self.count_for(hdr.src().cid) >= limit || self.count_for(hdr.dst().cid) >= limit {
                return Route::Refuse(Refusal::TooManyConnections);
            }
            let mut flows = [Flow::default(); 2];
            flows[0] = Flow {
                sent: 0,
                window: self.cap(hdr.buf_alloc()),
                fwd_cnt: hdr.fwd_cnt(),
            };
            self.conns.insert(
                key,
                Entry {
                    info: Relayed {
                        client: hdr.src(),
                        server: hdr.dst(),
                        socket_type: hdr.socket_type(),
                    },
                    established: false,
                    flows,
                },
            );
            for cid in [hdr.src().cid, hdr.dst().cid] {
                *self.per_domain.entry(cid).or_insert(0) += 1;
            }
            return Route::Forward {
                buf_alloc: self.cap(hdr.buf_alloc()),
                last: false,
                admitted: true,
            };
        }
        let window = self.cap(hdr.buf_alloc());
        let Some(entry) = self.conns.get_mut(&key) else {
            return if hdr.op() == Op::Rst {
                Route::Drop
            } else {
                Route::Refuse(Refusal::UnknownConnection)
            };
        };
        if hdr.op() == Op::Rst && hdr.socket_type() != entry.info.socket_type {
            // Its receiver would ignore it (as Linux does), so forwarding it and forgetting
            // the connection would leave that end open with no entry here. It need not be
            // a violation either: it may answer an earlier REQUEST of the other type on the
            // same addresses, before a retried connect restarted the entry.
            return Route::Drop;
        }
        if hdr.op() == Op::Rst {
            self.remove(key);
            return Route::Forward {
                buf_alloc: window,
                last: true,
                admitted: false,
            };
        }
        let from_client = hdr.src() == entry.info.client;
        if hdr.socket_type() != entry.info.socket_type {
            self.remove(key);
            return Route::ResetBoth(Violation::Protocol);
        }
        // The sender is also a receiver: note the window it advertises.
        let (inbound, outbound) = if from_client { (0, 1) } else { (1, 0) };
        entry.flows[inbound].window = window;
        entry.flows[inbound].fwd_cnt = hdr.fwd_cnt();
        match hdr.op() {
            Op::Response => {
                if from_client || entry.established {
                    self.remove(key);
                    return Route::ResetBoth(Violation::Protocol);
                }
                entry.established = true;
            }
            Op::Rw => {
                if !entry.established {
                    self.remove(key);
                    return Route::ResetBoth(Violation::Protocol);
                }
                let flow = &mut entry.flows[outbound];
                flow.sent = flow.sent.wrapping_add(hdr.len());
                let in_flight = flow.sent.wrapping_sub(flow.fwd_cnt);
                if in_flight > flow.window {
                    let window = flow.window;
                    self.remove(key);
                    return Route::ResetBoth(Violation::CreditOverrun { in_flight, window });
                }
            }
            Op::Shutdown | Op::CreditUpdate | Op::CreditRequest => {}
            Op::Request | Op::Rst => unreachable!("handled above"),
        }
        Route::Forward {
            buf_alloc: window,
            last: false,
            admitted: false,
        }
    }

    fn remove(&mut self, key: Key) -> Option<Relayed> {
        let entry = self.conns.remove(&key)?;
        for cid in [entry.info.client.cid, entry.info.server.cid] {
            if let Some(n) = self.per_domain.get_mut(&cid) {
                *n -= 1;
                if *n == 0 {
                    self.per_domain.remove(&cid);
                }
            }
        }
        Some(entry.info)
    }

    /// Forgets the connection between `a` and `b` (either may be the client), if any.
    pub fn forget(&mut self, a: VsockAddr, b: VsockAddr) -> Option<Relayed> {
        self.remove(key_of(a, b))
    }

    /// Forgets every connection `cid` takes part in (its device went away) and returns
    /// them, so the caller can reset the other ends.
    pub fn remove_domain(&mut self, cid: Cid) -> Vec<Relayed> {
        if self.count_for(cid) == 0 {
            return Vec::new();
        }
        self.remove_where(|r| r.client.cid == cid || r.server.cid == cid)
    }

    /// Forgets every connection for which `drop` holds and returns them.
    pub fn remove_where(&mut self, mut drop: impl FnMut(&Relayed) -> bool) -> Vec<Relayed> {
        let keys: Vec<Key> = self
            .conns
            .iter()
            .filter(|(_, e)| drop(&e.info))
            .map(|(k, _)| *k)
            .collect();
        keys.into_iter().filter_map(|k| self.remove(k)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::addr::Port;
    use crate::packet::HeaderBuilder;

    fn a() -> VsockAddr {
        VsockAddr::new(Cid(3), Port(1000))
    }
    fn b() -> VsockAddr {
        VsockAddr::new(Cid(4), Port(5000))
    }

    fn hdr(
        src: VsockAddr,
        dst: VsockAddr,
        op: Op,
        len: u32,
        buf_alloc: u32,
        fwd_cnt: u32,
    ) -> Header {
        HeaderBuilder::new(src, dst, op)
            .len(len)
            .credit(buf_alloc, fwd_cnt)
            .build()
    }

    fn ok() -> Result<(), Refusal> {
        Ok(())
    }

    fn established(t: &mut RelayTable, server_window: u32) {
        assert!(matches!(
            t.handle(&hdr(a(), b(), Op::Request, 0, 1 << 18, 0), ok),
            Route::Forward { admitted: true, .. }
        ));
        assert!(matches!(
            t.handle(&hdr(b(), a(), Op::Response, 0, server_window, 0), ok),
            Route::Forward { .. }
        ));
    }

    #[test]
    fn handshake_data_and_reset() {
        let mut t = RelayTable::new(RelayConfig::default());
        established(&mut t, 4096);
        assert_eq!(t.count_for(Cid(3)), 1);
        assert!(matches!(
            t.handle(&hdr(a(), b(), Op::Rw, 4096, 1 << 18, 0), ok),
            Route::Forward { last: false, .. }
        ));
        // One byte over the server's window.
        assert_eq!(
            t.handle(&hdr(a(), b(), Op::Rw, 1, 1 << 18, 0), ok),
            Route::ResetBoth(Violation::CreditOverrun {
                in_flight: 4097,
                window: 4096
            })
        );
        assert!(t.is_empty());
        assert_eq!(t.count_for(Cid(3)), 0);
    }

    #[test]
    fn credit_updates_open_the_window() {
        let mut t = RelayTable::new(RelayConfig::default());
        established(&mut t, 4096);
        let _ = t.handle(&hdr(a(), b(), Op::Rw, 4096, 1 << 18, 0), ok);
        let _ = t.handle(&hdr(b(), a(), Op::CreditUpdate, 0, 4096, 4096), ok);
        assert!(matches!(
            t.handle(&hdr(a(), b(), Op::Rw, 4096, 1 << 18, 0), ok),
            Route::Forward { .. }
        ));
        assert!(matches!(
            t.handle(&hdr(b(), a(), Op::Rst, 0, 0, 0), ok),
            Route::Forward { last: true, .. }
        ));
        assert_eq!(t.handle(&hdr(b(), a(), Op::Rst, 0, 0, 0), ok), Route::Drop);
    }

    #[test]
    fn window_is_capped() {
        let mut t = RelayTable::new(RelayConfig {
            max_window_bytes: 1000,
            ..RelayConfig::default()
        });
        assert!(matches!(
            t.handle(&hdr(a(), b(), Op::Request, 0, u32::MAX, 0), ok),
            Route::Forward {
                buf_alloc: 1000,
                ..
            }
        ));
        assert!(matches!(
            t.handle(&hdr(b(), a(), Op::Response, 0, u32::MAX, 0), ok),
            Route::Forward {
                buf_alloc: 1000,
                ..
            }
        ));
        assert!(matches!(
            t.handle(&hdr(a(), b(), Op::Rw, 1001, 0, 0), ok),
            Route::ResetBoth(Violation::CreditOverrun { .. })
        ));
    }

    #[test]
    fn refusals_and_violations() {
        let mut t = RelayTable::new(RelayConfig::default());
        assert_eq!(
            t.handle(&hdr(a(), b(), Op::Request, 0, 0, 0), || Err(
                Refusal::Denied
            )),
            Route::Refuse(Refusal::Denied)
        );
        assert!(t.is_empty());
        assert_eq!(
            t.handle(&hdr(a(), b(), Op::Rw, 10, 0, 0), ok),
            Route::Refuse(Refusal::UnknownConnection)
        );
        let _ = t.handle(&hdr(a(), b(), Op::Request, 0, 100, 0), ok);
        // Data before the server accepted.
        assert_eq!(
            t.handle(&hdr(a(), b(), Op::Rw, 10, 0, 0), ok),
            Route::ResetBoth(Violation::Protocol)
        );
        // A client cannot answer its own request.
        let _ = t.handle(&hdr(a(), b(), Op::Request, 0, 100, 0), ok);
        assert_eq!(
            t.handle(&hdr(a(), b(), Op::Response, 0, 100, 0), ok),
            Route::ResetBoth(Violation::Protocol)
        );
    }

    /// Fuzz finding `fuzz/regressions/relay/rst-of-the-wrong-type`: an RST whose socket
    /// type differs from the connection's was forwarded and the connection forgotten, but
    /// the receiver ignores such an RST and kept its end open with no relay entry.
    #[test]
    fn rst_of_the_wrong_type_is_dropped_and_the_connection_kept() {
        let mut t = RelayTable::new(RelayConfig::default());
        established(&mut t, 4096);
        let rst = Header::rst(a(), b(), SocketType::SeqPacket);
        assert_eq!(t.handle(&rst, ok), Route::Drop);
        assert_eq!(t.len(), 1);
        assert!(matches!(
            t.handle(&hdr(a(), b(), Op::Rw, 100, 1 << 18, 0), ok),
            Route::Forward { last: false, .. }
        ));
        assert!(matches!(
            t.handle(&hdr(b(), a(), Op::Rst, 0, 0, 0), ok),
            Route::Forward { last: true, .. }
        ));
    }

    #[test]
    fn forget_one_pair_from_either_end() {
        let mut t = RelayTable::new(RelayConfig::default());
        established(&mut t, 4096);
        assert_eq!(t.forget(b(), a()).map(|r| r.client), Some(a()));
        assert!(t.is_empty());
        assert_eq!(t.count_for(Cid(4)), 0);
        assert_eq!(t.forget(a(), b()), None);
    }

    #[test]
    fn per_domain_limit_and_domain_removal() {
        let mut t = RelayTable::new(RelayConfig {
            max_conns_per_domain: 2,
            ..RelayConfig::default()
        });
        for p in 0..2 {
            let src = VsockAddr::new(Cid(3), Port(p));
            assert!(matches!(
                t.handle(&hdr(src, b(), Op::Request, 0, 0, 0), ok),
                Route::Forward { .. }
            ));
        }
        let src = VsockAddr::new(Cid(3), Port(9));
        assert_eq!(
            t.handle(&hdr(src, b(), Op::Request, 0, 0, 0), ok),
            Route::Refuse(Refusal::TooManyConnections)
        );
        let gone = t.remove_domain(Cid(4));
        assert_eq!(gone.len(), 2);
        assert!(gone.iter().all(|r| r.server == b()));
        assert!(t.is_empty());
        assert_eq!(t.count_for(Cid(3)), 0);
    }
}
