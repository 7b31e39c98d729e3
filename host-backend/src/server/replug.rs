//! Telling a fresh device on a live vhost-user connection from a confused frontend: the
//! decision half of the [`relay`](super::relay) between QEMU and vhost-user-backend's
//! request handler. Pure: it sees request headers and bodies, never a socket.
//!
//! QEMU keeps the vhost-user connection (its chardev) open when the device is unplugged
//! (`device_del`), and a later `device_add` on the same chardev initialises a new device on
//! it. Logged by the relay with QEMU 10.0.2 (`RUST_LOG=domsock_host::server=debug`); QEMU's
//! `vhost_dev_stop`, `vhost_dev_init` and `vhost_user_backend_init` send it in this order:
//!
//! ```mermaid
//! sequenceDiagram
//!     participant Q as QEMU (one chardev connection)
//!     participant R as relay + FrontendState
//!     participant H as vhost-user-backend handler
//!     Note over Q: device_del
//!     Q->>R: SET_VRING_ENABLE 0 (rx, tx)
//!     Q->>R: GET_VRING_BASE (rx, tx): the rings stop
//!     Note over R,H: forwarded; the device's stop_vring stops the data plane
//!     Q->>R: SET_VRING_CALL (rx, tx)
//!     Note over Q: device_add on the same chardev
//!     Q->>R: GET_FEATURES, GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES, GET_QUEUE_NUM
//!     Q->>R: SET_OWNER (the connection is owned already)
//!     R->>H: RESET_OWNER, SET_PROTOCOL_FEATURES (the value just set), SET_OWNER
//!     Q->>R: GET_FEATURES, SET_VRING_CALL + SET_VRING_ERR (rx, tx), GET_CONFIG
//!     Note over Q: the guest driver probes the new device
//!     Q->>R: SET_VRING_CALL (rx, tx), SET_FEATURES, SET_MEM_TABLE
//!     Q->>R: per ring SET_VRING_NUM, SET_VRING_BASE, SET_VRING_ADDR, SET_VRING_KICK
//!     Q->>R: SET_VRING_ENABLE 1 (rx, tx), SET_VRING_CALL (rx, tx)
//! ```
//!
//! Nothing at all marks the unplug itself: to the backend it looks like a guest reset, and
//! the first request that tells a new device from the old one is its `SET_OWNER`.
//!
//! vhost-user-backend 0.24 refuses a second `SET_OWNER` ("already claimed") and the session
//! ends: QEMU then reports `vhost_get_features failed: Protocol error` and the guest has no
//! vsock until QEMU restarts. The handler is private to that crate, so it cannot be wrapped;
//! the relay instead puts the handler back into the state of a connection nobody owns yet
//! with requests of the protocol itself (`RESET_OWNER`, which vhost-user-backend implements
//! as "forget the owner and the negotiated features"), then forwards the `SET_OWNER`, whose
//! reply (if one was asked for) the handler produces as usual.
//!
//! What a fresh device must not inherit, and who resets it:
//! - the owner and the acked virtio features: `RESET_OWNER`; the new device's `SET_FEATURES`
//!   follows before its rings start;
//! - the acked protocol features: `RESET_OWNER` clears them too, but QEMU negotiates them
//!   *before* `SET_OWNER`, so the value the new device just set is sent again right after;
//! - the rings: already stopped (`GET_VRING_BASE` drops their kick and call fds); the new
//!   device sets every ring up again before starting it;
//! - guest memory: the old table stays mapped (it is the same VM's RAM) until the new
//!   device's `SET_MEM_TABLE` replaces it, which comes before any ring starts;
//! - the data plane: stopped when the rings stopped, as for a guest reset. It is not
//!   stopped again here, so state it keeps across a stop (connections parked for a
//!   re-plug) survives until the new device's rings run.
//!
//! A `SET_OWNER` while a ring still runs is not a re-plug: QEMU stops every ring before it
//! lets a device go, so a frontend that claims a running device has lost track of it (or two
//! devices share one chardev). Resetting would let the newcomer take over rings a guest is
//! still using; it is forwarded instead, the handler refuses it, and the session ends as it
//! always did.

use vhost::vhost_user::message::FrontendReq;

/// Bytes of a vhost-user message header: request, flags, payload size (`u32` each, in the
/// byte order of the host, as QEMU sends them).
pub const HEADER_LEN: usize = 12;
/// Largest payload a request may carry (vhost's `MAX_MSG_SIZE`, which its handler enforces).
pub const MAX_PAYLOAD_BYTES: u32 = 0x1000;
/// Protocol version 1 in the header flags; nothing else set (no reply wanted).
const VERSION_1: u32 = 0x1;
/// `NEED_REPLY` in the header flags.
const NEED_REPLY: u32 = 0x8;
/// Index bits of a `SET_VRING_KICK` / `_CALL` / `_ERR` payload.
const VRING_INDEX_MASK: u64 = 0xff;

/// One request's header, as it travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    /// Request code (`FrontendReq`).
    pub request: u32,
    /// Version and `NEED_REPLY` / `REPLY` bits.
    pub flags: u32,
    /// Payload bytes that follow.
    pub size: u32,
}

impl RequestHeader {
    /// Decodes a header.
    pub fn parse(b: &[u8; HEADER_LEN]) -> Self {
        let word = |i: usize| u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        Self {
            request: word(0),
            flags: word(4),
            size: word(8),
        }
    }

    /// Encodes it.
    pub fn bytes(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&self.request.to_ne_bytes());
        b[4..8].copy_from_slice(&self.flags.to_ne_bytes());
        b[8..12].copy_from_slice(&self.size.to_ne_bytes());
        b
    }

    /// The request, if the code is one vhost knows.
    pub fn code(&self) -> Option<FrontendReq> {
        FrontendReq::try_from(self.request).ok()
    }

    /// Whether the frontend waits for a reply (`NEED_REPLY`).
    pub fn needs_reply(&self) -> bool {
        self.flags & NEED_REPLY != 0
    }
}

/// A whole request the relay sends on its own (never with fds, never asking for a reply).
fn request(code: FrontendReq, payload: &[u8]) -> Vec<u8> {
    let header = RequestHeader {
        request: code.into(),
        flags: VERSION_1,
        size: u32::try_from(payload.len()).expect("relay requests are tiny"),
    };
    let mut m = header.bytes().to_vec();
    m.extend_from_slice(payload);
    m
}

/// What to do with one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Forward it unchanged.
    Forward,
    /// A `SET_OWNER` for a fresh device on a connection whose rings are all stopped: send
    /// `prelude` (whole requests that ask for no reply) to the handler, then forward it.
    FreshDevice {
        /// Requests that reset the handler's owner state.
        prelude: Vec<Vec<u8>>,
        /// Devices this connection has had, this one included.
        device: u64,
    },
    /// A `SET_OWNER` on an owned connection while rings run (`running`: bit `i` for ring
    /// `i`). Forwarded; the handler refuses it and ends the session.
    OwnerWhileRunning {
        /// Running rings.
        running: u64,
    },
}

/// What one frontend connection has set up, as far as [`Verdict`]s need it.
#[derive(Debug, Default)]
pub struct FrontendState {
    /// A `SET_OWNER` went through (and no `RESET_OWNER` since).
    owned: bool,
    /// Bit `i`: ring `i` got a kick fd (it started) and no `GET_VRING_BASE` since.
    running: u64,
    /// The last `SET_PROTOCOL_FEATURES` value.
    protocol_features: Option<u64>,
    /// Devices initialised on this connection (`SET_OWNER`s that went through).
    devices: u64,
}

fn u64_payload(body: &[u8]) -> Option<u64> {
    Some(u64::from_ne_bytes(body.get(..8)?.try_into().ok()?))
}

fn u32_payload(body: &[u8]) -> Option<u32> {
    Some(u32::from_ne_bytes(body.get(..4)?.try_into().ok()?))
}

/// Bit of ring `index`; rings beyond 63 are not tracked (the handler rejects them: a
/// vsock device has 3).
fn ring_bit(index: u64) -> u64 {
    1u64.checked_shl(u32::try_from(index).unwrap_or(u32::MAX))
        .unwrap_or(0)
}

impl FrontendState {
    /// Takes note of one request from the frontend and says what to do with it.
    /// Malformed payloads are forwarded untracked: the handler rejects them itself.
    pub fn on_request(&mut self, header: &RequestHeader, body: &[u8]) -> Verdict {
        let Some(code) = header.code() else {
            return Verdict::Forward;
        };
        match code {
            FrontendReq::SET_OWNER if !self.owned => {
                self.owned = true;
                self.devices += 1;
                Verdict::Forward
            }
            FrontendReq::SET_OWNER if self.running != 0 => Verdict::OwnerWhileRunning {
                running: self.running,
            },
            FrontendReq::SET_OWNER => {
                self.devices += 1;
                let mut prelude = vec![request(FrontendReq::RESET_OWNER, &[])];
                if let Some(features) = self.protocol_features {
                    prelude.push(request(
                        FrontendReq::SET_PROTOCOL_FEATURES,
                        &features.to_ne_bytes(),
                    ));
                }
                Verdict::FreshDevice {
                    prelude,
                    device: self.devices,
                }
            }
            FrontendReq::RESET_OWNER => {
                self.owned = false;
                Verdict::Forward
            }
            FrontendReq::SET_PROTOCOL_FEATURES => {
                if let Some(v) = u64_payload(body) {
                    self.protocol_features = Some(v);
                }
                Verdict::Forward
            }
            FrontendReq::SET_VRING_KICK => {
                if let Some(v) = u64_payload(body) {
                    self.running |= ring_bit(v & VRING_INDEX_MASK);
                }
                Verdict::Forward
            }
            FrontendReq::GET_VRING_BASE => {
                if let Some(index) = u32_payload(body) {
                    self.running &= !ring_bit(u64::from(index));
                }
                Verdict::Forward
            }
            _ => Verdict::Forward,
        }
    }

    /// Rings running (bit `i` for ring `i`).
    pub fn running(&self) -> u64 {
        self.running
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(code: FrontendReq, body: &[u8]) -> (RequestHeader, Vec<u8>) {
        let h = RequestHeader {
            request: code.into(),
            flags: VERSION_1,
            size: body.len() as u32,
        };
        (h, body.to_vec())
    }

    fn send(s: &mut FrontendState, code: FrontendReq, body: &[u8]) -> Verdict {
        let (h, b) = req(code, body);
        s.on_request(&h, &b)
    }

    fn kick(s: &mut FrontendState, ring: u64) -> Verdict {
        send(s, FrontendReq::SET_VRING_KICK, &ring.to_ne_bytes())
    }

    fn stop(s: &mut FrontendState, ring: u32) -> Verdict {
        let mut body = ring.to_ne_bytes().to_vec();
        body.extend_from_slice(&0u32.to_ne_bytes());
        send(s, FrontendReq::GET_VRING_BASE, &body)
    }

    /// QEMU's device initialisation up to SET_OWNER (vhost_user_backend_init's probe first).
    fn plug(s: &mut FrontendState, protocol_features: u64) -> Verdict {
        for code in [
            FrontendReq::GET_FEATURES,
            FrontendReq::GET_PROTOCOL_FEATURES,
        ] {
            assert_eq!(send(s, code, &[]), Verdict::Forward);
        }
        assert_eq!(
            send(
                s,
                FrontendReq::SET_PROTOCOL_FEATURES,
                &protocol_features.to_ne_bytes()
            ),
            Verdict::Forward
        );
        send(s, FrontendReq::SET_OWNER, &[])
    }

    #[test]
    fn header_round_trips() {
        let h = RequestHeader {
            request: 3,
            flags: VERSION_1 | NEED_REPLY,
            size: 8,
        };
        assert_eq!(RequestHeader::parse(&h.bytes()), h);
        assert_eq!(h.code(), Some(FrontendReq::SET_OWNER));
        assert!(h.needs_reply());
        let unknown = RequestHeader {
            request: 9999,
            flags: VERSION_1,
            size: 0,
        };
        assert_eq!(unknown.code(), None);
    }

    #[test]
    fn first_owner_is_forwarded() {
        let mut s = FrontendState::default();
        assert_eq!(plug(&mut s, 0x20b), Verdict::Forward);
    }

    #[test]
    fn replug_after_every_ring_stopped_resets_the_owner_and_keeps_new_protocol_features() {
        let mut s = FrontendState::default();
        assert_eq!(plug(&mut s, 0x20b), Verdict::Forward);
        kick(&mut s, 0);
        kick(&mut s, 1);
        assert_eq!(s.running(), 0b11);
        stop(&mut s, 0);
        stop(&mut s, 1);
        assert_eq!(s.running(), 0);
        // The new device negotiates other protocol features before its SET_OWNER.
        let v = plug(&mut s, 0x20a);
        assert_eq!(
            v,
            Verdict::FreshDevice {
                prelude: vec![
                    request(FrontendReq::RESET_OWNER, &[]),
                    request(FrontendReq::SET_PROTOCOL_FEATURES, &0x20au64.to_ne_bytes()),
                ],
                device: 2,
            }
        );
        // And again: every re-plug is a fresh device.
        kick(&mut s, 0);
        stop(&mut s, 0);
        assert!(matches!(
            plug(&mut s, 0x20a),
            Verdict::FreshDevice { device: 3, .. }
        ));
    }

    #[test]
    fn prelude_requests_ask_for_no_reply_and_carry_their_size() {
        let m = request(FrontendReq::SET_PROTOCOL_FEATURES, &7u64.to_ne_bytes());
        let h = RequestHeader::parse(m[..HEADER_LEN].try_into().unwrap());
        assert_eq!(h.code(), Some(FrontendReq::SET_PROTOCOL_FEATURES));
        assert!(!h.needs_reply());
        assert_eq!(h.size as usize, m.len() - HEADER_LEN);
    }

    #[test]
    fn without_protocol_features_only_the_owner_is_reset() {
        let mut s = FrontendState::default();
        assert_eq!(send(&mut s, FrontendReq::SET_OWNER, &[]), Verdict::Forward);
        assert_eq!(
            send(&mut s, FrontendReq::SET_OWNER, &[]),
            Verdict::FreshDevice {
                prelude: vec![request(FrontendReq::RESET_OWNER, &[])],
                device: 2,
            }
        );
    }

    #[test]
    fn owner_while_a_ring_runs_is_left_to_the_handler() {
        let mut s = FrontendState::default();
        plug(&mut s, 0x20b);
        kick(&mut s, 0);
        kick(&mut s, 1);
        stop(&mut s, 0);
        assert_eq!(
            send(&mut s, FrontendReq::SET_OWNER, &[]),
            Verdict::OwnerWhileRunning { running: 0b10 }
        );
    }

    #[test]
    fn reset_owner_from_the_frontend_makes_the_next_owner_a_first_one() {
        let mut s = FrontendState::default();
        plug(&mut s, 0x20b);
        assert_eq!(
            send(&mut s, FrontendReq::RESET_OWNER, &[]),
            Verdict::Forward
        );
        assert_eq!(send(&mut s, FrontendReq::SET_OWNER, &[]), Verdict::Forward);
    }

    #[test]
    fn polling_kick_flag_and_big_indices_do_not_confuse_the_ring_mask() {
        let mut s = FrontendState::default();
        plug(&mut s, 0);
        // Bit 8: no fd, the frontend polls; the index is still the low byte.
        kick(&mut s, 0x100 | 2);
        assert_eq!(s.running(), 0b100);
        kick(&mut s, 200);
        stop(&mut s, 4000);
        assert_eq!(s.running(), 0b100);
        // Short payloads are not tracked.
        send(&mut s, FrontendReq::GET_VRING_BASE, &[2]);
        assert_eq!(s.running(), 0b100);
    }
}
