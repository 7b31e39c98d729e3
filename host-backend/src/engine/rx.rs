//! The RX path: host->guest data and the endpoint's control packets into the guest's RX
//! buffers.
//!
//! The engine asks its [`GuestPort`](crate::virtio::GuestPort) for a writer (which first
//! puts what other guests' packets left in the backlog on the ring), then, chain by chain:
//! control packets the endpoint queued go first, one per chain; then connections in the
//! ready queue are read straight into the chain's payload area, as far as the guest's
//! credit and the buffer allow. A stream whose last read filled its buffer gets up to
//! [`RX_BATCH_MAX_CHAINS`] chains filled with one `readv`. A seqpacket message is read
//! whole (it must leave the host socket in one `recv`): one that fits the chain and the
//! credit (and belongs to no session, which must keep a copy for replay) is read straight
//! into the chain as one EOM packet; a larger one goes through the connection's inbox and
//! is cut into packets, EOM on the last.
//!
//! What it does not do: ring bookkeeping (pop, `add_used`, counters, notifications:
//! the writer does) or decide credit (the endpoint does).

use super::conn::{would_block, HostConn};
use super::DataPlane;
use crate::iov;
use crate::metrics::VmStats;
use crate::tunables::{MAX_RX_PAYLOAD_BYTES, RX_BATCH_MAX_CHAINS};
use crate::virtio::chain::{Mem, Regions};
use crate::virtio::rx::RxWriter;
use domsock_proto::rules;
use domsock_proto::{ConnKey, Endpoint, RawHeader, SocketType};
use std::io::{self, ErrorKind};
use std::ops::ControlFlow;
use std::time::Instant;
use tracing::warn;

/// Result of trying to fill one RX buffer from one connection.
enum Fill {
    /// The header of the packet whose payload was written after it.
    Data(RawHeader),
    /// Nothing to send on this connection now.
    Nothing,
}

impl DataPlane {
    /// Puts what waits for the guest on its RX ring, as far as buffers go.
    pub(super) fn fill_rx(&mut self, now: Instant) {
        if !self.endpoint.has_transmit() && self.ready.is_empty() {
            // Guest-to-guest packets that waited for RX buffers still go.
            self.port.drain();
            return;
        }
        let port = self.port.clone();
        let _ = port.with_writer(|w| self.fill_with(w, now));
    }

    fn fill_with(&mut self, w: &mut RxWriter<'_>, now: Instant) {
        loop {
            loop {
                if !self.endpoint.has_transmit() && self.ready.is_empty() {
                    return;
                }
                let Some(head) = w.pop(&mut self.regions) else {
                    break;
                };
                if self.fill_batch(w, head) {
                    continue;
                }
                if !self.fill_one(now, w, head) {
                    w.unpop();
                    return;
                }
            }
            // Out of RX buffers with work left: notifications are re-armed; look again,
            // closing the race with a guest that just added buffers.
            if !w.rearm() {
                return;
            }
        }
    }

    /// Host->guest stream data in bulk: when the next connection to serve is a stream whose
    /// last read filled its buffer, pops more RX chains (up to [`RX_BATCH_MAX_CHAINS`], as
    /// far as credit goes) behind the one in `self.regions` (head `head`) and fills them all
    /// with one `readv`, one packet per chain, in ring order. Chains it did not need go back
    /// to the ring. Returns `false` (nothing consumed, `self.regions` untouched) when the
    /// case does not apply or nothing could be read; the caller goes on as usual then.
    fn fill_batch(&mut self, w: &mut RxWriter<'_>, head: u16) -> bool {
        let Some(&key) = self.ready.front() else {
            return false;
        };
        if self.endpoint.has_transmit() {
            return false; // control packets go first, one chain each
        }
        let credit = self.endpoint.send_credit(&key) as usize;
        let first_room = self.regions.payload_capacity().min(MAX_RX_PAYLOAD_BYTES);
        let credit = match self.conns.get(&key) {
            Some(hc)
                if hc.socket_type == SocketType::Stream
                    && !hc.in_greeting()
                    && hc.readiness == super::conn::Readiness::Full
                    && !hc.host_eof()
                    && hc.inbox_pending() == 0
                    && first_room > 0
                    // A session may not send more than its replay buffer can keep.
                    && credit.min(hc.session_room()) > first_room =>
            {
                credit.min(hc.session_room())
            }
            _ => return false,
        };
        let mem = w.mem();
        // Speculatively take more chains; one that cannot carry payload stays in the ring
        // and ends the batch (the normal path consumes and counts it next).
        let mut rooms = vec![first_room];
        let mut planned = first_room;
        let mut extra = 0usize;
        while planned < credit && extra + 1 < RX_BATCH_MAX_CHAINS {
            if self.rx_extra.len() <= extra {
                self.rx_extra.push(Regions::default());
                self.rx_extra_heads.push(0);
            }
            let Some(h) = w.pop_for_payload(&mut self.rx_extra[extra]) else {
                break;
            };
            let room = self.rx_extra[extra]
                .payload_capacity()
                .min(MAX_RX_PAYLOAD_BYTES)
                .min(credit - planned);
            self.rx_extra_heads[extra] = h;
            rooms.push(room);
            planned += room;
            extra += 1;
        }
        if extra == 0 {
            return false;
        }
        let mut slices = Vec::with_capacity(rooms.len() * 2);
        let mut ok = self
            .regions
            .for_each_payload_slice(mem, 0, rooms[0], |s| {
                slices.push(s);
                ControlFlow::<()>::Continue(())
            })
            .is_ok();
        for (r, &room) in self.rx_extra[..extra].iter().zip(&rooms[1..]) {
            ok &= r
                .for_each_payload_slice(mem, 0, room, |s| {
                    slices.push(s);
                    ControlFlow::<()>::Continue(())
                })
                .is_ok();
        }
        let hc = self.conns.get_mut(&key).expect("checked above");
        let result = if ok {
            iov::readv_slices(hc.sock.as_fd(), &slices)
        } else {
            Err(io::Error::from(ErrorKind::InvalidData))
        };
        let n = match result {
            Ok(n) if n > 0 => n,
            other => {
                for _ in 0..extra {
                    w.unpop();
                }
                match other {
                    Ok(_) => {} // EOF: the normal path reads it again and ends the stream
                    Err(e) if would_block(&e) => hc.note_drained(),
                    Err(_) => hc.note_read_error(), // the normal path reports the error
                }
                return false;
            }
        };
        if hc.session.is_some() {
            hc.record_sent(n, |copy| slices.iter().for_each(|s| copy(*s)));
        }
        drop(slices);
        hc.note_read(n, planned, false);
        self.ready.pop_front();
        hc.in_ready = false;
        let mut left = n;
        let mut used = 0usize;
        for (i, &room) in rooms.iter().enumerate() {
            let take = left.min(room);
            if take == 0 {
                break;
            }
            left -= take;
            let Some(hdr) = rw_header(&mut self.endpoint, &self.shared.name, key, take, false)
            else {
                break;
            };
            used = i + 1;
            let (regions, head) = if i == 0 {
                (&self.regions, head)
            } else {
                (&self.rx_extra[i - 1], self.rx_extra_heads[i - 1])
            };
            w.complete(head, regions, &hdr);
        }
        for _ in used.max(1)..rooms.len() {
            w.unpop();
        }
        if used == 0 {
            // send_rw failed on the first chain: hand it back empty rather than lose it.
            w.return_empty(head);
        }
        self.after_change(key);
        true
    }

    /// Fills the RX chain in `self.regions` (head `head`) and gives it to the guest;
    /// `false` (chain untouched) if there was nothing to send after all.
    fn fill_one(&mut self, now: Instant, w: &mut RxWriter<'_>, head: u16) -> bool {
        loop {
            if let Some(hdr) = self.endpoint.poll_transmit() {
                w.complete(head, &self.regions, &hdr.to_raw());
                return true;
            }
            if self.ready.is_empty() {
                return false;
            }
            if self.regions.payload_capacity() == 0 {
                // A header-only chain carries no data: every ready connection would refuse
                // it and be re-queued by `after_change`, spinning here. Hand it back empty.
                w.return_malformed(head);
                return true;
            }
            let Some(key) = self.ready.pop_front() else {
                return false;
            };
            if let Some(hc) = self.conns.get_mut(&key) {
                hc.in_ready = false;
            }
            if let Fill::Data(hdr) = self.fill_from_conn(now, key, w.mem()) {
                w.complete(head, &self.regions, &hdr);
                self.after_change(key);
                return true;
            }
            self.after_change(key);
        }
    }

    fn fill_from_conn(&mut self, now: Instant, key: ConnKey, mem: &Mem) -> Fill {
        let Some(hc) = self.conns.get_mut(&key) else {
            return Fill::Nothing;
        };
        // The rest of a seqpacket message already begun goes on bytes alone (the credit
        // knows it).
        let credit = self.endpoint.send_credit(&key) as usize;
        let room = self.regions.payload_capacity().min(MAX_RX_PAYLOAD_BYTES);
        if credit == 0 {
            // A guest with free bytes sends no update by itself; the packet bound needs one.
            self.endpoint.request_credit_if_packet_bound(&key);
            return Fill::Nothing;
        }
        if room == 0 {
            return Fill::Nothing;
        }
        let max = credit.min(room);
        match hc.socket_type {
            SocketType::Stream => {
                let mut n = 0usize;
                // Handshake leftovers (and a resumed session's greeting and replay) go
                // first.
                if hc.inbox_pending() > 0 {
                    let Some(take) = hc.drain_inbox(&self.regions, mem, max) else {
                        return Fill::Nothing;
                    };
                    n = take;
                } else if hc.readable() && !hc.host_eof() {
                    // A session may not send more than its replay buffer can keep.
                    let max = max.min(hc.session_room());
                    if max == 0 {
                        if hc.session_needs_ack() {
                            self.endpoint.request_credit(&key);
                        }
                        return Fill::Nothing;
                    }
                    match read_stream(hc, &self.regions, mem, max) {
                        Ok(k) if k > 0 && hc.session.is_some() => {
                            n = k;
                            let regions = &self.regions;
                            hc.record_sent(k, |copy| {
                                let _ = regions.for_each_payload_slice(mem, 0, k, |s| {
                                    copy(s);
                                    ControlFlow::<()>::Continue(())
                                });
                            });
                        }
                        Ok(k) => n = k,
                        Err(()) => {
                            VmStats::inc(&self.shared.stats.host_errors);
                            self.endpoint.reset(key);
                            return Fill::Nothing;
                        }
                    }
                }
                if n > 0 {
                    return self.emit_rw(key, n, false);
                }
                let hc = self.conns.get(&key).expect("present");
                if hc.host_eof() && hc.inbox_pending() == 0 {
                    let how = hc.eof_shutdown();
                    self.endpoint.shutdown(now, &key, how);
                }
                Fill::Nothing
            }
            SocketType::SeqPacket => {
                if hc.inbox_pending() == 0 {
                    if let Some(msg) = hc.session_replay_message() {
                        hc.inbox = msg;
                        hc.inbox_off = 0;
                    }
                }
                if hc.inbox_pending() == 0 {
                    if !hc.readable() || hc.host_eof() {
                        return Fill::Nothing;
                    }
                    match hc.sock.peek_message_len() {
                        Ok(0) => {
                            hc.note_eof();
                            let how = hc.eof_shutdown();
                            self.endpoint.shutdown(now, &key, how);
                            return Fill::Nothing;
                        }
                        // A session keeps each message until the guest consumed it.
                        Ok(len) if len > hc.session_capacity() => {
                            warn!(vm = %self.shared.name, %key, len, "seqpacket message larger than a session's replay buffer");
                            VmStats::inc(&self.shared.stats.host_errors);
                            self.endpoint.reset(key);
                            return Fill::Nothing;
                        }
                        Ok(len) if len > hc.session_room() => {
                            // Only the guest's fwd_cnt frees the replay buffer, and a
                            // guest with room to spare sends no credit update by itself:
                            // ask for one (once per acknowledgement).
                            if hc.session_needs_ack() {
                                self.endpoint.request_credit(&key);
                            }
                            return Fill::Nothing;
                        }
                        Ok(len) => {
                            let peer_buf = self
                                .endpoint
                                .get(&key)
                                .map_or(0, |c| rules::largest_message(c.credit()));
                            if hc.session.is_none() && len <= max {
                                // One packet's worth, and nothing to keep for a replay:
                                // straight from the socket into the RX buffer, with no
                                // copy on the heap (a bus member's MESSAGE takes this way).
                                if read_message(hc, &self.regions, mem, len).is_err() {
                                    VmStats::inc(&self.shared.stats.host_errors);
                                    self.endpoint.reset(key);
                                    return Fill::Nothing;
                                }
                                return self.emit_rw(key, len, true);
                            }
                            hc.inbox.resize(len, 0);
                            hc.inbox_off = 0;
                            if !matches!(hc.sock.read(&mut hc.inbox), Ok(n) if n == len) {
                                VmStats::inc(&self.shared.stats.host_errors);
                                self.endpoint.reset(key);
                                return Fill::Nothing;
                            }
                            if len as u64 > u64::from(peer_buf) {
                                // The guest could never take this message whole.
                                warn!(vm = %self.shared.name, %key, len, peer_buf, "seqpacket message larger than the guest's buffer");
                                VmStats::inc(&self.shared.stats.host_errors);
                                self.endpoint.reset(key);
                                return Fill::Nothing;
                            }
                            hc.record_inbox_message();
                        }
                        Err(e) if would_block(&e) => {
                            hc.note_drained();
                            return Fill::Nothing;
                        }
                        Err(_) => {
                            VmStats::inc(&self.shared.stats.host_errors);
                            self.endpoint.reset(key);
                            return Fill::Nothing;
                        }
                    }
                }
                let hc = self.conns.get_mut(&key).expect("present");
                let Some(take) = hc.drain_inbox(&self.regions, mem, max) else {
                    return Fill::Nothing;
                };
                let eom = hc.inbox_pending() == 0;
                self.emit_rw(key, take, eom)
            }
        }
    }

    fn emit_rw(&mut self, key: ConnKey, n: usize, eom: bool) -> Fill {
        match rw_header(&mut self.endpoint, &self.shared.name, key, n, eom) {
            Some(hdr) => Fill::Data(hdr),
            None => Fill::Nothing,
        }
    }
}

/// Reads the seqpacket message of `len` bytes waiting on the host socket (peeked) straight
/// into the payload area of `regions`, which has room for it. `Err` if the socket did not
/// give exactly one message of that length.
fn read_message(hc: &mut HostConn, regions: &Regions, mem: &Mem, len: usize) -> Result<(), ()> {
    let mut slices = Vec::with_capacity(4);
    regions
        .for_each_payload_slice(mem, 0, len, |s| {
            slices.push(s);
            ControlFlow::<()>::Continue(())
        })
        .map_err(|_| ())?;
    match iov::readv_slices(hc.sock.as_fd(), &slices) {
        Ok(n) if n == len => Ok(()),
        _ => Err(()),
    }
}

/// Reads up to `max` stream bytes from the host socket straight into the payload area of
/// `regions`, updating what the connection knows about the socket. `Err` only for a read
/// error with nothing read (the connection is reset then); an error after some bytes
/// keeps them and lets the next read report it.
fn read_stream(hc: &mut HostConn, regions: &Regions, mem: &Mem, max: usize) -> Result<usize, ()> {
    let sock = &mut hc.sock;
    let mut n = 0usize;
    let mut eof = false;
    let mut err = false;
    let mut would_block_seen = false;
    let _ = regions.for_each_payload_slice(mem, 0, max, |mut s| match sock.read_volatile(&mut s) {
        Ok(0) => {
            eof = true;
            ControlFlow::Break(())
        }
        Ok(k) => {
            n += k;
            if k < s.len() {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        }
        Err(e) if would_block(&e) => {
            would_block_seen = true;
            ControlFlow::Break(())
        }
        Err(_) => {
            err = true;
            ControlFlow::Break(())
        }
    });
    if eof {
        hc.note_eof();
    } else if err {
        hc.note_read_error();
    } else {
        hc.note_read(n, max, would_block_seen);
    }
    if err && n == 0 {
        return Err(());
    }
    Ok(n)
}

/// The header of an `RW` packet of `n` bytes on `key`, with the credit accounted for;
/// `None` (and the connection reset) if the endpoint refuses, which cannot happen when
/// `n` is within the credit the caller asked for: losing data silently would be worse
/// than a reset.
fn rw_header(
    endpoint: &mut Endpoint,
    vm: &str,
    key: ConnKey,
    n: usize,
    eom: bool,
) -> Option<RawHeader> {
    match endpoint.send_rw(&key, n as u32, eom, false) {
        Ok(hdr) => {
            if tracing::enabled!(tracing::Level::TRACE) {
                if let Some(c) = endpoint.get(&key) {
                    tracing::trace!(%key, len = n, credit_after = c.credit().peer_credit(), in_flight = c.credit().in_flight(), "rx data");
                }
            }
            Some(hdr.to_raw())
        }
        Err(e) => {
            warn!(vm, error = %e, "send_rw refused");
            endpoint.reset(key);
            None
        }
    }
}
