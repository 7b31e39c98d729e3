//! Fuzz-input pieces the endpoint and relay bodies share: how a peer's advertised window
//! and `fwd_cnt` are drawn from the fuzzer's bytes.

use arbitrary::Arbitrary;

/// The receive window a peer packet advertises.
#[derive(Debug, Clone, Copy, Arbitrary)]
pub(super) enum Window {
    Zero,
    Small(u16),
    Typical,
    Max,
    Raw(u32),
}

impl Window {
    pub(super) fn resolve(self) -> u32 {
        match self {
            Window::Zero => 0,
            Window::Small(n) => u32::from(n),
            Window::Typical => 256 * 1024,
            Window::Max => u32::MAX,
            Window::Raw(n) => n,
        }
    }
}

/// The `fwd_cnt` a peer packet carries, relative to what we sent it.
#[derive(Debug, Clone, Copy, Arbitrary)]
pub(super) enum FwdCnt {
    /// Everything we sent was consumed.
    Acked,
    /// `n` bytes are still in the peer's buffer.
    Behind(u16),
    /// A lying peer: more consumed than we ever sent.
    Ahead(u16),
    Raw(u32),
}

impl FwdCnt {
    pub(super) fn resolve(self, tx: u32) -> u32 {
        match self {
            FwdCnt::Acked => tx,
            FwdCnt::Behind(n) => tx.wrapping_sub(u32::from(n)),
            FwdCnt::Ahead(n) => tx.wrapping_add(u32::from(n)),
            FwdCnt::Raw(n) => n,
        }
    }
}
