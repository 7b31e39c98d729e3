//! The bus service guests reach at host port [`BUS_PORT`] (seqpacket): one connection is
//! one bus membership, in the wire format of [`domsock_proto::bus`].
//!
//! It is one entry of the [service table](super): the engine connects the guest's
//! connection to one end of a Unix seqpacket socket pair, like any host connection (same
//! credit, same RX path, same counters, closed when the device goes), and the other end
//! goes to the bus thread ([`crate::bus::unix::GuestDoor`]) with the guest's CID. A guest
//! that stops reading runs out of credit, the engine stops reading its pair, the pair
//! fills, and the bus thread sees a full socket: the member's bounded queue and loss
//! counting take over, as for a host process. The device going away closes the pair: the
//! membership parks until a REJOIN.
//!
//! What it does not do: decide who may join (the hub asks the policy) or carry data.

use super::Service;
use crate::bus::unix::GuestDoor;
use crate::host::HostSocket;
use crate::vm::VmShared;
use domsock_proto::SocketType;
use std::io;
use std::sync::Arc;

pub use domsock_proto::bus::BUS_PORT;

/// The bus service, as an entry of the service table.
#[derive(Debug)]
pub struct BusService {
    door: Arc<GuestDoor>,
}

impl BusService {
    /// The service handing guests' connections through `door`.
    pub fn new(door: Arc<GuestDoor>) -> Self {
        Self { door }
    }
}

impl Service for BusService {
    fn name(&self) -> &'static str {
        "bus"
    }

    fn open(&self, vm: &Arc<VmShared>) -> io::Result<HostSocket> {
        let (ours, theirs) = HostSocket::pair(SocketType::SeqPacket)?;
        self.door.admit(theirs, vm.cid)?;
        Ok(ours)
    }
}
