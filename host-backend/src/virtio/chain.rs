//! Descriptor chains in guest memory.
//!
//! A chain is walked once: every descriptor's guest range is checked against guest memory
//! and recorded as a region list. Afterwards only the checked regions are used. Headers may
//! span descriptors (a guest is free to split them); payload moves region by region through
//! [`VolatileSlice`]s straight to or from host sockets.

use domsock_proto::{RawHeader, HEADER_LEN};
use std::ops::ControlFlow;
use thiserror::Error;
use virtio_queue::DescriptorChain;
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, VolatileSlice};

/// Guest memory as used by the data plane.
pub type Mem = GuestMemoryMmap<()>;

/// A malformed chain.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ChainError {
    /// A descriptor of the wrong direction (device-writable in TX or readable in RX).
    #[error("descriptor {index} has the wrong direction")]
    WrongDirection {
        /// Position in the chain.
        index: usize,
    },
    /// A descriptor points outside guest memory.
    #[error("descriptor range {addr:#x}+{len} is outside guest memory")]
    OutOfRange {
        /// Guest address.
        addr: u64,
        /// Length.
        len: u32,
    },
    /// The chain is shorter than a header.
    #[error("chain of {total} bytes cannot hold a {HEADER_LEN}-byte header")]
    TooShort {
        /// Bytes in the chain.
        total: usize,
    },
    /// The header claims more payload than the chain holds.
    #[error("header claims {claimed} payload bytes, chain holds {available}")]
    PayloadTruncated {
        /// Claimed.
        claimed: u32,
        /// Available.
        available: usize,
    },
    /// Reading guest memory failed.
    #[error("guest memory access failed")]
    Memory,
}

/// Visits the guest memory of `addr..addr+len` as slices: one slice when the range lies in
/// one memory region (the common case, and a single lookup), else one per region. The
/// generic `Bytes` accessors and slice iterators of vm-memory cost several times more per
/// call, which shows at millions of packets per second.
pub fn for_each_slice<'m, F, R>(
    mem: &'m Mem,
    addr: GuestAddress,
    len: usize,
    mut f: F,
) -> Result<Option<R>, ChainError>
where
    F: FnMut(VolatileSlice<'m, ()>) -> ControlFlow<R>,
{
    if len == 0 {
        return Ok(None);
    }
    if let Ok(s) = mem.get_slice(addr, len) {
        return Ok(match f(s) {
            ControlFlow::Break(r) => Some(r),
            ControlFlow::Continue(()) => None,
        });
    }
    for slice in mem.get_slices(addr, len) {
        let slice = slice.map_err(|_| ChainError::Memory)?;
        if let ControlFlow::Break(r) = f(slice) {
            return Ok(Some(r));
        }
    }
    Ok(None)
}

/// The checked regions of one chain.
#[derive(Debug, Default)]
pub struct Regions {
    regions: Vec<(GuestAddress, usize)>,
    total: usize,
}

impl Regions {
    /// Replaces the contents with the descriptors of `chain`, all of which must be
    /// device-readable (`writable == false`) or device-writable (`writable == true`).
    pub fn load<M>(
        &mut self,
        chain: DescriptorChain<M>,
        mem: &Mem,
        writable: bool,
    ) -> Result<(), ChainError>
    where
        M: std::ops::Deref<Target = Mem>,
    {
        self.regions.clear();
        self.total = 0;
        for (index, desc) in chain.enumerate() {
            if desc.is_write_only() != writable {
                return Err(ChainError::WrongDirection { index });
            }
            let len = desc.len() as usize;
            if len == 0 {
                continue;
            }
            if !mem.check_range(desc.addr(), len) {
                return Err(ChainError::OutOfRange {
                    addr: desc.addr().0,
                    len: desc.len(),
                });
            }
            self.regions.push((desc.addr(), len));
            self.total += len;
        }
        Ok(())
    }

    /// Total bytes.
    pub fn total(&self) -> usize {
        self.total
    }

    /// Payload capacity after the header.
    pub fn payload_capacity(&self) -> usize {
        self.total.saturating_sub(HEADER_LEN)
    }

    /// Reads the header from the start of the chain.
    pub fn read_header(&self, mem: &Mem) -> Result<RawHeader, ChainError> {
        if self.total < HEADER_LEN {
            return Err(ChainError::TooShort { total: self.total });
        }
        // Straight into the wire struct: no intermediate buffer, no conversion.
        let mut raw = RawHeader::default();
        let buf = raw.bytes_mut();
        let mut filled = 0;
        for &(addr, len) in &self.regions {
            let n = len.min(HEADER_LEN - filled);
            let mut at = filled;
            for_each_slice(mem, addr, n, |s| {
                s.copy_to(&mut buf[at..at + s.len()]);
                at += s.len();
                ControlFlow::<()>::Continue(())
            })?;
            filled += n;
            if filled == HEADER_LEN {
                break;
            }
        }
        Ok(raw)
    }

    /// Writes a header at the start of the chain.
    pub fn write_header(&self, mem: &Mem, hdr: &RawHeader) -> Result<(), ChainError> {
        if self.total < HEADER_LEN {
            return Err(ChainError::TooShort { total: self.total });
        }
        let bytes = hdr.bytes();
        let mut done = 0;
        for &(addr, len) in &self.regions {
            let n = len.min(HEADER_LEN - done);
            let mut at = done;
            for_each_slice(mem, addr, n, |s| {
                s.copy_from(&bytes[at..at + s.len()]);
                at += s.len();
                ControlFlow::<()>::Continue(())
            })?;
            done += n;
            if done == HEADER_LEN {
                break;
            }
        }
        Ok(())
    }

    /// Visits the payload as guest memory slices, starting `skip` bytes into the payload and
    /// covering at most `len` bytes. The visitor may stop early with `Break`.
    pub fn for_each_payload_slice<'m, F, R>(
        &self,
        mem: &'m Mem,
        skip: usize,
        len: usize,
        mut f: F,
    ) -> Result<Option<R>, ChainError>
    where
        F: FnMut(VolatileSlice<'m, ()>) -> ControlFlow<R>,
    {
        for (start, n) in self.payload_spans(skip, len) {
            if let Some(r) = for_each_slice(mem, start, n, &mut f)? {
                return Ok(Some(r));
            }
        }
        Ok(None)
    }

    /// The guest ranges of `len` payload bytes starting `skip` bytes into the payload, in
    /// order (cut short where the chain ends).
    fn payload_spans(
        &self,
        skip: usize,
        len: usize,
    ) -> impl Iterator<Item = (GuestAddress, usize)> + '_ {
        let mut offset = HEADER_LEN + skip;
        let mut left = len;
        self.regions.iter().filter_map(move |&(addr, rlen)| {
            if left == 0 {
                return None;
            }
            if offset >= rlen {
                offset -= rlen;
                return None;
            }
            let n = (rlen - offset).min(left);
            let start = addr.unchecked_add(offset as u64);
            offset = 0;
            left -= n;
            Some((start, n))
        })
    }

    /// Appends the guest ranges holding the first `len` payload bytes to `out` (ranges
    /// checked when the chain was loaded).
    pub fn payload_ranges(&self, len: usize, out: &mut Vec<(GuestAddress, usize)>) {
        out.extend(self.payload_spans(0, len));
    }

    /// Copies `len` payload bytes starting `skip` bytes into the payload into `out`.
    pub fn copy_payload(
        &self,
        mem: &Mem,
        skip: usize,
        len: usize,
        out: &mut Vec<u8>,
    ) -> Result<(), ChainError> {
        let start = out.len();
        out.resize(start + len, 0);
        let mut pos = start;
        self.for_each_payload_slice(mem, skip, len, |s| {
            let n = s.len();
            s.copy_to(&mut out[pos..pos + n]);
            pos += n;
            ControlFlow::<()>::Continue(())
        })?;
        Ok(())
    }

    /// Copies bytes into the payload area starting `skip` bytes into it.
    pub fn write_payload(&self, mem: &Mem, skip: usize, data: &[u8]) -> Result<(), ChainError> {
        let mut pos = 0;
        self.for_each_payload_slice(mem, skip, data.len(), |s| {
            let n = s.len();
            s.copy_from(&data[pos..pos + n]);
            pos += n;
            ControlFlow::<()>::Continue(())
        })?;
        Ok(())
    }
}

/// The payload of a loaded TX chain, as the router hands it to a receiving port: read
/// straight from the sender's guest memory, so the one copy goes from there to wherever
/// the receiver reads.
#[derive(Debug, Clone, Copy)]
pub struct ChainPayload<'a> {
    regions: &'a Regions,
    mem: &'a Mem,
    len: usize,
}

impl<'a> ChainPayload<'a> {
    /// The first `len` payload bytes of `regions` (checked against the chain when the
    /// header was parsed).
    pub fn new(regions: &'a Regions, mem: &'a Mem, len: usize) -> Self {
        Self { regions, mem, len }
    }
}

impl crate::port::Payload for ChainPayload<'_> {
    fn len(&self) -> usize {
        self.len
    }

    fn copy_into(&self, off: usize, dst: &VolatileSlice<'_, ()>) -> bool {
        let mut pos = 0usize;
        self.regions
            .for_each_payload_slice(self.mem, off, dst.len(), |s| {
                match dst.offset(pos) {
                    Ok(d) => s.copy_to_volatile_slice(d),
                    Err(_) => return ControlFlow::Break(()),
                }
                pos += s.len();
                ControlFlow::Continue(())
            })
            .is_ok()
            && pos == dst.len()
    }

    fn append_to(&self, off: usize, len: usize, out: &mut Vec<u8>) -> bool {
        self.regions.copy_payload(self.mem, off, len, out).is_ok()
    }
}
