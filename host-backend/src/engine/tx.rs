//! The TX path: packets the guest put on its TX queue.
//!
//! A TX batch pops every chain, checks it against guest memory once
//! ([`crate::virtio::chain`]), parses the header at the boundary and then uses only the
//! parsed copy. Packets for the host go to the endpoint, whose verdict moves payload to
//! the connection's host socket; packets for other domains go to the router with the
//! chain as their [`crate::port::Payload`]. Stream payload of a batch is written
//! with one `writev` per connection straight from the guest's buffers when the batch ends
//! (`flush_dirty`); the chains go back to the guest only after that, and only what a host
//! socket did not take is copied, into the connection's outbox (bounded by the credit we
//! advertise).
//!
//! What it does not do: put anything on the RX ring (answers the endpoint queues go out
//! through the RX path).

use super::conn::would_block;
use super::DataPlane;
use crate::iov;
use crate::metrics::VmStats;
use crate::router::Routed;
use crate::tunables::MAX_PAYLOAD_BYTES;
use crate::virtio::chain::{ChainPayload, Mem};
use crate::virtio::rx::signal_if_needed;
use crate::virtio::Vring;
use domsock_proto::rules::DropClass;
use domsock_proto::{Cid, ConnKey, Header, Incoming, RawHeader, SocketType};
use std::io::ErrorKind;
use std::ops::ControlFlow;
use tracing::{debug, warn};
use vhost_user_backend::VringT;
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, VolatileSlice};

impl DataPlane {
    /// Runs one TX batch: every chain the guest queued, then the batch's writes, then the
    /// chains go back and receivers of guest-to-guest packets are signalled.
    pub(super) fn process_tx(&mut self, vring: &Vring, atomic: &GuestMemoryAtomic<Mem>) {
        // Chains go back to the guest only after the batch's stream payload has been
        // written from (or copied out of) their buffers: see `flush_dirty`. The batch is
        // bounded by the ring: the guest cannot add chains it has not got back.
        let mut heads = std::mem::take(&mut self.tx_heads);
        loop {
            let mem = atomic.memory();
            let mut guard = vring.get_mut();
            let queue = guard.get_queue_mut();
            if queue.disable_notification(&*mem).is_err() {
                break;
            }
            while let Some(chain) = queue.pop_descriptor_chain(atomic.memory()) {
                heads.push(chain.head_index());
                self.handle_tx_chain(chain, &mem);
            }
            match queue.enable_notification(&*mem) {
                Ok(true) => continue,
                _ => break,
            }
        }
        let mem = atomic.memory();
        self.flush_dirty(&mem);
        self.router.end_batch(&self.shared, &mut self.g2g);
        if !heads.is_empty() {
            {
                let mut guard = vring.get_mut();
                let queue = guard.get_queue_mut();
                for head in heads.drain(..) {
                    if queue.add_used(&*mem, head, 0).is_err() {
                        warn!(vm = %self.shared.name, "add_used failed on TX");
                    }
                }
            }
            signal_if_needed(vring, atomic);
        }
        self.tx_heads = heads;
    }

    /// Ends a TX batch: per connection, what waited in the outbox first, then one `writev`
    /// of the batch's payload straight from guest memory.
    fn flush_dirty(&mut self, mem: &Mem) {
        for key in std::mem::take(&mut self.dirty) {
            if let Some(hc) = self.conns.get_mut(&key) {
                hc.dirty = false;
            }
            self.flush_outbox(key);
            self.flush_pending(key, mem);
            self.after_change(key);
        }
    }

    /// Writes a connection's pending batch payload with `writev`; what the socket does not
    /// take (or everything, if older bytes still wait in the outbox) is copied into the
    /// outbox, since the guest gets its buffers back right after.
    fn flush_pending(&mut self, key: ConnKey, mem: &Mem) {
        let Some(hc) = self.conns.get_mut(&key) else {
            return;
        };
        if hc.pending.is_empty() {
            return;
        }
        let ranges = std::mem::take(&mut hc.pending);
        let total = std::mem::take(&mut hc.pending_len);
        let mut slices = Vec::with_capacity(ranges.len());
        for &(addr, len) in &ranges {
            let r = crate::virtio::chain::for_each_slice(mem, addr, len, |s| {
                slices.push(s);
                ControlFlow::<()>::Continue(())
            });
            if r.is_err() {
                // Checked when the chain was loaded; the memory map cannot change while
                // the worker holds this lock.
                VmStats::inc(&self.shared.stats.malformed_chains);
                self.endpoint.reset(key);
                return;
            }
        }
        let mut written = 0usize;
        let mut next = 0usize;
        let mut failed = false;
        while next < slices.len() && hc.out_stream.is_empty() {
            let asked: usize = slices[next..]
                .iter()
                .take(iov::MAX_IOVECS)
                .map(VolatileSlice::len)
                .sum();
            match iov::writev_slices(hc.sock.as_fd(), &slices[next..]) {
                Ok(n) => {
                    written += n;
                    let mut left = n;
                    while left > 0 {
                        let len = slices[next].len();
                        if left >= len {
                            left -= len;
                            next += 1;
                        } else {
                            slices[next] = slices[next].offset(left).expect("within the slice");
                            left = 0;
                        }
                    }
                    if n < asked {
                        break; // the socket is full
                    }
                }
                Err(e) if would_block(&e) => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => {
                    failed = true;
                    break;
                }
            }
        }
        if !failed && written < total {
            let mut rest = Vec::with_capacity(total - written);
            for s in &slices[next..] {
                let at = rest.len();
                rest.resize(at + s.len(), 0);
                s.copy_to(&mut rest[at..]);
            }
            hc.out_stream.extend(rest);
        }
        if written > 0 {
            self.endpoint.consumed(&key, written as u32);
        }
        if failed {
            VmStats::inc(&self.shared.stats.host_errors);
            self.endpoint.reset(key);
        }
    }

    fn handle_tx_chain<M>(&mut self, chain: virtio_queue::DescriptorChain<M>, mem: &Mem)
    where
        M: std::ops::Deref<Target = Mem>,
    {
        let stats = &self.shared.stats;
        if let Err(e) = self.regions.load(chain, mem, false) {
            VmStats::inc(&stats.malformed_chains);
            debug!(error = %e, "malformed TX chain");
            return;
        }
        let raw = match self.regions.read_header(mem) {
            Ok(r) => r,
            Err(e) => {
                VmStats::inc(&stats.malformed_chains);
                debug!(error = %e, "malformed TX chain");
                return;
            }
        };
        let hdr = match Header::parse(&raw, MAX_PAYLOAD_BYTES) {
            Ok(h) => h,
            Err(e) => {
                VmStats::inc(&stats.bad_headers);
                debug!(error = %e, "bad TX header");
                self.reset_raw(&raw);
                return;
            }
        };
        if hdr.src().cid != self.shared.cid {
            VmStats::inc(&stats.spoofed_packets);
            debug!(src = %hdr.src(), "spoofed source CID");
            return;
        }
        if self.regions.payload_capacity() < hdr.len() as usize {
            VmStats::inc(&stats.malformed_chains);
            debug!(
                claimed = hdr.len(),
                have = self.regions.payload_capacity(),
                "payload truncated"
            );
            self.reset_key(hdr.receiver_key());
            return;
        }
        VmStats::inc(&stats.tx_packets);
        VmStats::add(&stats.tx_bytes, u64::from(hdr.len()));
        if hdr.dst().cid != Cid::HOST
            && (self.proxied == 0 || self.endpoint.get(&hdr.receiver_key()).is_none())
        {
            self.route_to_guest(&hdr, &raw, mem);
            return;
        }
        tracing::trace!(op = ?hdr.op(), len = hdr.len(), buf_alloc = hdr.buf_alloc(), fwd_cnt = hdr.fwd_cnt(), key = %hdr.receiver_key(), "tx packet");
        let incoming = self.endpoint.handle(&hdr);
        match incoming {
            Incoming::Request(req) => self.guest_connect(&req),
            Incoming::Connected(key) => self.host_connected(key),
            Incoming::Data { key, len, eom, .. } => {
                self.deliver(key, len, eom, mem);
                self.after_change(key);
            }
            Incoming::PeerShutdown(key, _) | Incoming::Credit(key) => self.after_change(key),
            Incoming::Reset(key) | Incoming::Closed(key) => self.guest_closed(key, hdr.fwd_cnt()),
            Incoming::Dropped(reason) => {
                match reason.class(hdr.op()) {
                    DropClass::AnsweredUnknown => VmStats::inc(&stats.unknown_connection_rsts),
                    DropClass::Violation(why) => {
                        VmStats::inc(&stats.protocol_resets);
                        debug!(why, key = %hdr.receiver_key(), "connection reset");
                    }
                    DropClass::Quiet => {}
                }
                self.after_change(hdr.receiver_key());
            }
        }
    }

    /// A packet for another guest: the router relays it (on this thread) or says why not.
    fn route_to_guest(&mut self, hdr: &Header, raw: &RawHeader, mem: &Mem) {
        let stats = &self.shared.stats;
        let payload = ChainPayload::new(&self.regions, mem, hdr.len() as usize);
        match self
            .router
            .route(&self.shared, hdr, raw, &payload, &mut self.g2g)
        {
            Routed::Forwarded | Routed::Dropped => {}
            Routed::Unroutable => {
                VmStats::inc(&stats.unroutable_packets);
                debug!(dst = %hdr.dst(), "unroutable destination");
                self.endpoint.refuse(hdr);
            }
            Routed::Refused(why) => {
                use domsock_proto::relay::Refusal;
                match why {
                    Refusal::UnknownConnection => VmStats::inc(&stats.unknown_connection_rsts),
                    Refusal::Unavailable | Refusal::TooManyConnections => {
                        VmStats::inc(&stats.refused_connections)
                    }
                    Refusal::Denied => {} // counted by the router, which logs it
                }
                debug!(dst = %hdr.dst(), ?why, "guest-to-guest packet refused");
                self.endpoint.refuse(hdr);
            }
            Routed::Violation(_) | Routed::Overflow => self.endpoint.refuse(hdr),
        }
    }

    fn reset_raw(&mut self, raw: &RawHeader) {
        let key = raw.receiver_key();
        if key.peer.cid == self.shared.cid {
            self.reset_key(key);
        }
    }

    fn reset_key(&mut self, key: ConnKey) {
        if self.endpoint.get(&key).is_some() {
            self.endpoint.reset(key);
        }
        self.after_change(key);
    }

    /// Hands `len` payload bytes of the current TX chain to the host socket (or outbox).
    fn deliver(&mut self, key: ConnKey, len: u32, eom: bool, mem: &Mem) {
        let Some(hc) = self.conns.get_mut(&key) else {
            self.endpoint.reset(key);
            return;
        };
        let len = len as usize;
        if hc.in_greeting() {
            let mut bytes = Vec::new();
            if self.regions.copy_payload(mem, 0, len, &mut bytes).is_err() {
                VmStats::inc(&self.shared.stats.malformed_chains);
                self.endpoint.reset(key);
                return;
            }
            self.endpoint.consumed(&key, len as u32);
            self.session_greeting(key, &bytes);
            return;
        }
        hc.note_received(len, eom);
        if hc.socket_type == SocketType::Stream {
            // Written at the end of the TX batch, with one writev per connection straight
            // from the guest's buffers (see `flush_dirty`), whose chains wait until then.
            self.regions.payload_ranges(len, &mut hc.pending);
            hc.pending_len += len;
            if !hc.dirty {
                hc.dirty = true;
                self.dirty.push(key);
            }
            return;
        }
        // Seqpacket: a message goes out whole, with one write.
        let regions = &self.regions;
        let mut failed = false;
        let mut consumed = 0usize;
        if hc.partial_msg.is_empty() && eom && hc.out_msgs.is_empty() {
            // Whole message in one packet: send it at once. It is copied out first because
            // a seqpacket message must leave in one write even when it spans descriptors.
            let mut msg = Vec::new();
            if regions.copy_payload(mem, 0, len, &mut msg).is_err() {
                failed = true;
            } else {
                match hc.sock.write(&msg) {
                    Ok(_) => consumed = len,
                    Err(e) if would_block(&e) => hc.out_msgs.push_back(msg),
                    Err(_) => failed = true,
                }
            }
        } else if regions
            .copy_payload(mem, 0, len, &mut hc.partial_msg)
            .is_err()
        {
            failed = true;
        } else if eom {
            let msg = std::mem::take(&mut hc.partial_msg);
            hc.out_msgs.push_back(msg);
        } else {
            let unconsumed = self
                .endpoint
                .get(&key)
                .map_or(0, |c| c.credit().unconsumed());
            if unconsumed >= self.endpoint.config().buf_alloc_bytes {
                // The message can never complete within our buffer: the guest
                // ignored our buf_alloc. Reset rather than stall.
                VmStats::inc(&self.shared.stats.protocol_resets);
                failed = true;
            }
        }
        if consumed > 0 {
            self.endpoint.consumed(&key, consumed as u32);
        }
        if failed {
            VmStats::inc(&self.shared.stats.host_errors);
            self.endpoint.reset(key);
            return;
        }
        self.flush_outbox(key);
    }

    pub(super) fn flush_outbox(&mut self, key: ConnKey) {
        let Some(hc) = self.conns.get_mut(&key) else {
            return;
        };
        let hc_type = hc.socket_type;
        let before = hc.outbox_len();
        let result = hc.write_outbox();
        let (consumed, still_carried) = hc.split_flushed(before - hc.outbox_len());
        if consumed > 0 {
            self.endpoint.consumed(&key, consumed as u32);
        }
        if let (Some(carried), SocketType::Stream) = (still_carried, hc_type) {
            // Bytes of an earlier connection reached the host: the window opens again.
            let window = self.endpoint.config().buf_alloc_bytes;
            self.endpoint
                .set_buf_alloc(&key, window.saturating_sub(carried as u32));
        }
        if result.is_err() {
            VmStats::inc(&self.shared.stats.host_errors);
            self.endpoint.reset(key);
        }
    }
}
