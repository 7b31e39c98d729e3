//! Services domsockd itself provides at well-known host ports, as one table.
//!
//! A guest connection to host CID 2 is first looked up here by (port, socket type); an
//! entry answers it in-process instead of a host Unix socket. The table holds the
//! control service ([`control`], port 1023, stream) and, when the daemon runs its bus
//! thread, the bus service ([`bus`], port 1021, seqpacket).
//!
//! A service hands the engine one end of a socket (a Unix socket pair), so its
//! connections are carried exactly like any host connection: same credit, same counters,
//! same shutdown rules. Services are not subject to the host-port policy (every guest may
//! ask who it is), and each bounds its own connections per VM.
//!
//! What it does not do: the data path (the engine), or decisions between domains (the
//! router).

pub mod bus;
pub mod control;

use crate::host::HostSocket;
use crate::router::Router;
use crate::vm::VmShared;
use domsock_proto::{Port, SocketType};
use std::fmt;
use std::io;
use std::sync::Arc;

/// An in-process service at a host port.
pub trait Service: Send + Sync + fmt::Debug {
    /// Name for logs and counters.
    fn name(&self) -> &'static str;

    /// Opens a connection of the guest of `vm` and returns the host end the engine
    /// carries. An error refuses the guest's connection (counted as refused).
    fn open(&self, vm: &Arc<VmShared>) -> io::Result<HostSocket>;
}

#[derive(Debug)]
struct Entry {
    port: Port,
    socket_type: SocketType,
    service: Arc<dyn Service>,
}

/// The services of one daemon, by host port and socket type.
#[derive(Debug, Default)]
pub struct ServiceTable {
    entries: Vec<Entry>,
}

impl ServiceTable {
    /// The standard table: the control service at [`control::CONTROL_PORT`] (stream), and
    /// the bus service at [`bus::BUS_PORT`] (seqpacket) if the router knows the bus
    /// thread's door.
    pub fn standard(router: Arc<Router>) -> Self {
        let mut t = Self::default();
        t.insert(
            control::CONTROL_PORT,
            SocketType::Stream,
            Arc::new(control::ControlService::new(router.clone())),
        );
        if let Some(door) = router.bus_door() {
            t.insert(
                bus::BUS_PORT,
                SocketType::SeqPacket,
                Arc::new(bus::BusService::new(door)),
            );
        }
        t
    }

    /// Adds (or replaces) the service at `port` for `socket_type`.
    pub fn insert(&mut self, port: Port, socket_type: SocketType, service: Arc<dyn Service>) {
        self.entries
            .retain(|e| !(e.port == port && e.socket_type == socket_type));
        self.entries.push(Entry {
            port,
            socket_type,
            service,
        });
    }

    /// The service a guest reaches at host `port` with `socket_type`, if any.
    pub fn lookup(&self, port: Port, socket_type: SocketType) -> Option<&Arc<dyn Service>> {
        self.entries
            .iter()
            .find(|e| e.port == port && e.socket_type == socket_type)
            .map(|e| &e.service)
    }
}
