//! Address newtypes: context ids, ports, socket addresses and connection keys.
//!
//! Every id that crosses an API is one of these types; bare integers only appear at the wire
//! codec.

use std::fmt;

/// A vsock context id (CID). `2` is the host, guests have `>= 3`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cid(pub u64);

impl Cid {
    /// The hypervisor (reserved, never routed).
    pub const HYPERVISOR: Cid = Cid(0);
    /// The local loopback CID (reserved).
    pub const LOCAL: Cid = Cid(1);
    /// The host.
    pub const HOST: Cid = Cid(2);
    /// `VMADDR_CID_ANY`.
    pub const ANY: Cid = Cid(u32::MAX as u64);

    /// Whether this CID may be assigned to a guest.
    pub fn is_guest(self) -> bool {
        self.0 >= 3 && self.0 < u64::from(u32::MAX)
    }
}

impl fmt::Display for Cid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A vsock port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Port(pub u32);

impl fmt::Display for Port {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A vsock socket address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VsockAddr {
    /// Context id.
    pub cid: Cid,
    /// Port.
    pub port: Port,
}

impl VsockAddr {
    /// Builds an address from its parts.
    pub fn new(cid: Cid, port: Port) -> Self {
        Self { cid, port }
    }
}

impl fmt::Display for VsockAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.cid, self.port)
    }
}

/// Identifies one connection from the point of view of one endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConnKey {
    /// Our end.
    pub local: VsockAddr,
    /// The remote end.
    pub peer: VsockAddr,
}

impl fmt::Display for ConnKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}<->{}", self.local, self.peer)
    }
}
