//! Vectored I/O on guest memory: `writev` of all the stream payload a TX batch carried for
//! one connection, straight from the guest's buffers, and `readv` from a host socket
//! straight into several RX buffers at once.
//!
//! This is the only module of domsockd with `unsafe`: vm-memory has no vectored I/O, so
//! the `iovec`s are built here from slices vm-memory has already bounds-checked.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use vm_memory::volatile_memory::{PtrGuard, PtrGuardMut};
use vm_memory::VolatileSlice;

/// `IOV_MAX` on Linux: more iovecs per call are refused.
pub const MAX_IOVECS: usize = 1024;

/// Writes the first [`MAX_IOVECS`] of `slices` with one `writev`; returns the bytes written
/// (possibly fewer than asked: the socket is full).
pub fn writev_slices(fd: BorrowedFd<'_>, slices: &[VolatileSlice<'_, ()>]) -> io::Result<usize> {
    let slices = &slices[..slices.len().min(MAX_IOVECS)];
    if slices.is_empty() {
        return Ok(0);
    }
    let guards: Vec<PtrGuard> = slices.iter().map(VolatileSlice::ptr_guard).collect();
    let iovs: Vec<libc::iovec> = guards
        .iter()
        .zip(slices)
        .map(|(g, s)| libc::iovec {
            iov_base: g.as_ptr().cast_mut().cast(),
            iov_len: s.len(),
        })
        .collect();
    // SAFETY: each iovec describes exactly one VolatileSlice, which vm-memory created only
    // after checking that its whole range lies in a mapped guest memory region; `guards`
    // keeps those mappings valid until writev returns, and `iovs` lives across the call.
    // writev only reads this memory. The guest can change the bytes at the same time; that
    // races only with the data it sends itself, exactly as a plain write of guest memory.
    let r = unsafe { libc::writev(fd.as_raw_fd(), iovs.as_ptr(), iovs.len() as libc::c_int) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

/// Reads into the first [`MAX_IOVECS`] of `slices` with one `readv`; returns the bytes read
/// (0: end of stream).
pub fn readv_slices(fd: BorrowedFd<'_>, slices: &[VolatileSlice<'_, ()>]) -> io::Result<usize> {
    let slices = &slices[..slices.len().min(MAX_IOVECS)];
    if slices.is_empty() {
        return Ok(0);
    }
    let guards: Vec<PtrGuardMut> = slices.iter().map(VolatileSlice::ptr_guard_mut).collect();
    let iovs: Vec<libc::iovec> = guards
        .iter()
        .zip(slices)
        .map(|(g, s)| libc::iovec {
            iov_base: g.as_ptr().cast(),
            iov_len: s.len(),
        })
        .collect();
    // SAFETY: each iovec describes exactly one VolatileSlice, which vm-memory created only
    // after checking that its whole range lies in a mapped guest memory region; `guards`
    // keep those mappings valid until readv returns, and `iovs` lives across the call.
    // readv writes only within these ranges, which are device-writable RX buffers the guest
    // handed us (it must not read them before we return them through the used ring).
    let r = unsafe { libc::readv(fd.as_raw_fd(), iovs.as_ptr(), iovs.len() as libc::c_int) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}
