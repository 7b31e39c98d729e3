//! What the router needs from a domain endpoint, whatever carries it.
//!
//! The router decides (policy, relay table) and hands each packet to the receiving
//! domain's [`DomainPort`]. A port takes a header and a [`Payload`] it copies from once,
//! straight into wherever the domain reads (a virtio RX ring today; later a Xen grant
//! ring, a parked session's buffer, a tunnel to another host), and is told when to signal.
//!
//! ```text
//!  sender's TX path --route()--> Router --offer(hdr, payload)--> dyn DomainPort
//!                                        \--signal()----------->   (virtio: GuestPort)
//! ```
//!
//! What it does not do: decide anything. Ports are dumb pipes with bounded queues; every
//! decision about who may reach whom is the router's.

use domsock_proto::RawHeader;
use std::fmt;
use vm_memory::VolatileSlice;

/// The payload of one packet, wherever it is (a sender's guest memory, a heap copy).
pub trait Payload {
    /// Bytes in the payload.
    fn len(&self) -> usize;

    /// Whether the payload is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Copies `dst.len()` bytes starting at payload offset `off` into `dst`; `false` if
    /// the source could not be read (the bytes in `dst` are then unspecified).
    fn copy_into(&self, off: usize, dst: &VolatileSlice<'_, ()>) -> bool;

    /// Appends `len` bytes starting at payload offset `off` to `out`; `false` if the
    /// source could not be read.
    fn append_to(&self, off: usize, len: usize, out: &mut Vec<u8>) -> bool;
}

/// A payload in host memory (a backlog copy, or nothing at all for control packets).
#[derive(Debug, Clone, Copy)]
pub struct HeapPayload<'a>(pub &'a [u8]);

impl Payload for HeapPayload<'_> {
    fn len(&self) -> usize {
        self.0.len()
    }

    fn copy_into(&self, off: usize, dst: &VolatileSlice<'_, ()>) -> bool {
        match self.0.get(off..off + dst.len()) {
            Some(src) => {
                dst.copy_from(src);
                true
            }
            None => false,
        }
    }

    fn append_to(&self, off: usize, len: usize, out: &mut Vec<u8>) -> bool {
        match self.0.get(off..off + len) {
            Some(src) => {
                out.extend_from_slice(src);
                true
            }
            None => false,
        }
    }
}

/// What a port did with an offered packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum Offer {
    /// Delivered whole, or the rest queued within the port's bounds: it will arrive.
    Accepted,
    /// The port's queue is full; nothing of the packet was taken. The router resets the
    /// connection rather than block the sender.
    Full,
    /// The domain is not there (its device stopped); the packet was discarded. Its
    /// connections are being reset by whoever noticed.
    Gone,
}

/// Whether a domain can take packets now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Availability {
    /// Its transport runs: packets reach it.
    Running,
    /// Its transport is being set up and runs soon: packets wait (bounded) rather than be
    /// refused, so a connect right after the domain came up is not turned away.
    Starting,
    /// Nobody is there: new connections to it are refused.
    Away,
}

/// One domain's receiving end, as the router sees it.
pub trait DomainPort: Send + Sync + fmt::Debug {
    /// Puts one packet toward the domain: `hdr` (its `len` is the payload's length) and
    /// the payload, copied once. May be called from any sender's thread.
    fn offer(&self, hdr: RawHeader, payload: &dyn Payload) -> Offer;

    /// Lets the domain know about what was offered since the last call (a virtio
    /// interrupt, an event channel notify), if it asked to be told.
    fn signal(&self);

    /// Whether the domain can take packets now.
    fn availability(&self) -> Availability;
}
