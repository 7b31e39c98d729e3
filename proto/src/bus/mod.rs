//! Bus sockets: many-to-many messaging across domains, sans-IO.
//!
//! A **bus** has a name inside a namespace, a delivery [`Policy`](wire::Policy), a maximum message size
//! and, per member, a bounded queue. Every member appears attached to the one bus; the bus
//! service in domsockd copies each message once per receiver, straight into that
//! receiver's ring or socket. No broker process relays in the middle. This module is the
//! part without I/O:
//!
//! - [`wire`]: the frames, their codec and their bounds (the spec below);
//! - [`fanout`]: membership, permissions granted at join, the three delivery policies,
//!   per-sender sequence numbers and the per-member queue accounting (who gets a message,
//!   who loses it, when a member is told how many it lost).
//!
//! What it does not do: sockets, queues of bytes, clocks or randomness (the caller passes
//! `now` and the random member tokens in), and deciding who may join (the daemon's policy
//! evaluates that and hands the result in as a [`fanout::Grant`]).
//!
//! # Wire format, version 1
//!
//! A member talks to the bus service over one **seqpacket** connection: a guest over vsock
//! to the host (CID 2) at port [`BUS_PORT`], a host process over a Unix `SOCK_SEQPACKET`
//! socket. Every frame is exactly one seqpacket message, so a frame needs no length field:
//! its length is the message's. All integers are little-endian. A frame starts with a
//! 4-byte header:
//!
//! ```text
//!  0         1         2                   4
//!  +---------+---------+-------------------+--------------------
//!  | version |  kind   |  flags (u16 LE)   |  body (kind-specific)
//!  +---------+---------+-------------------+--------------------
//! ```
//!
//! `version` is 1. A service that receives another version answers `REFUSED Version`
//! (encoded in version 1) and closes. Bits of `flags` a kind does not define must be 0.
//!
//! Member to service:
//!
//! | kind | name | body |
//! |---|---|---|
//! | `0x01` | JOIN | `name_len u8`, bus name (1..=64 bytes of `[A-Za-z0-9._-]`), `want u8` (bit 0 publish, bit 1 receive), then only if flags bit 0 (*create*): `policy u8` (0 hub, 1 switch, 2 topic), `slow u8` (0 drop, 1 disconnect), `max_message u32`, `queue_bytes u32`. Flags bit 3 (*batches*): the member takes BATCH frames (the membership keeps this across REJOINs) |
//! | `0x02` | REJOIN | `token [16]` from an earlier JOINED: the same membership, its subscriptions and what was queued for it |
//! | `0x03` | PUBLISH | the [fields](#message-fields) the bus's policy needs, then the payload |
//! | `0x04` | SUBSCRIBE | topic prefix (0..=255 bytes, the rest of the frame; empty matches every topic) |
//! | `0x05` | UNSUBSCRIBE | the same prefix |
//! | `0x06` | LEAVE | empty: the membership ends (a connection that closes without LEAVE leaves its membership parked, see below) |
//!
//! Service to member:
//!
//! | kind | name | body |
//! |---|---|---|
//! | `0x81` | JOINED | `member u32`, `policy u8`, `slow u8`, `granted u8` (bits as `want`), `reserved u8` (0), `max_message u32`, `queue_bytes u32`, `token [16]`, `lost u64` (messages dropped while the member was away; 0 on a first JOIN) |
//! | `0x82` | REFUSED | `code u16`, `text_len u8`, UTF-8 text: the join failed and the service closes |
//! | `0x83` | MESSAGE | `sender u32`, `seq u64`, the sender's [fields](#message-fields), the payload |
//! | `0x84` | LOSS | `messages u64`, `bytes u64`: dropped for this member since the last LOSS (sent before the next MESSAGE) |
//! | `0x85` | ERROR | `code u16`, `text_len u8`, text: one request failed (e.g. a PUBLISH without permission); the membership stays |
//! | `0x86` | SUBSCRIBED | `op u8` (4 subscribe, 5 unsubscribe), prefix: the change is in force for every message published after it |
//! | `0x87` | BATCH | 2..=256 entries, each `len u32` and a whole MESSAGE frame of `len` bytes (header included), nothing after the last: the MESSAGEs in order, as if sent one by one. Only to a member that set *batches* in its JOIN; never longer than the bus's longest MESSAGE frame nor 32 KiB, so a receive buffer for one MESSAGE takes it whole |
//!
//! A service sends a BATCH when MESSAGEs queued for a member that could not take them one
//! by one (its connection was full): what waited goes in as few seqpacket messages as
//! fit, so a receiver that fell behind catches up at a fraction of the per-message cost.
//! A MESSAGE it can send at once goes alone, so batching adds no latency. LOSS, answers
//! and JOINED are never inside a BATCH.
//!
//! ## Message fields
//!
//! PUBLISH and MESSAGE carry, between their fixed part and the payload, the fields of the
//! bus's policy, announced by flag bits (a PUBLISH whose fields do not match the policy
//! gets `ERROR Fields`):
//!
//! - flags bit 1 (*addressed*, switch buses): `src_len u8`, source address, `dst_len u8`,
//!   destination address; addresses are 1..=16 bytes; a destination of all `0xFF` bytes is
//!   broadcast;
//! - flags bit 2 (*topic*, topic buses): `topic_len u8`, topic (1..=255 bytes).
//!
//! ## Delivery
//!
//! - **hub**: every receiving member but the sender.
//! - **switch**: the bus learns from each PUBLISH that its source address belongs to the
//!   sender (as an Ethernet switch learns MAC addresses); a destination it has learned goes
//!   to that one member, an unknown or broadcast destination to every receiving member but
//!   the sender. A destination learned for the sender itself goes nowhere.
//! - **topic**: every receiving member but the sender with a subscription that is a prefix
//!   of the message's topic, once however many of its prefixes match.
//!
//! Message boundaries are kept and each receiver sees each sender's messages in the order
//! they were published; `seq` counts a sender's publishes on this bus from 1 (a receiver
//! that is not sent all of them sees gaps; losses are told by LOSS, not by gaps).
//!
//! ## Slow members and absence
//!
//! Each member has a queue of at most `queue_bytes`. A message that does not fit is
//! dropped for that member (`slow` = drop: counted and told by the next LOSS) or ends its
//! membership (`slow` = disconnect). A publisher never waits for a receiver. A member whose
//! connection breaks (its device went away) stays a member, *parked*: messages are queued
//! for it up to its bound, then dropped and counted, and a REJOIN with its token restores
//! it, its subscriptions and its queue; JOINED then says how many messages it lost.
//!
//! ```mermaid
//! sequenceDiagram
//!     participant M as member
//!     participant S as bus service
//!     M->>S: JOIN "sensors" want=publish|receive
//!     S->>M: JOINED member=7 policy=topic token=...
//!     M->>S: SUBSCRIBE "temp/"
//!     S->>M: SUBSCRIBED "temp/"
//!     M->>S: PUBLISH topic="temp/k1" payload
//!     S-->>M: MESSAGE sender=3 seq=41 topic="temp/k2" payload
//!     Note over M,S: device gone; messages queue, then drop
//!     M->>S: REJOIN token
//!     S->>M: JOINED member=7 lost=12
//! ```

pub mod fanout;
pub mod wire;

use crate::addr::Port;

/// The bus service's port on the host CID.
pub const BUS_PORT: Port = Port(1021);
