//! The vhost-user frontend half of the VMM: connect to a vsock backend's socket, negotiate,
//! share guest memory and hand over the rings, the way QEMU's `vhost-user-vsock` does.
//!
//! ```mermaid
//! sequenceDiagram
//!     participant G as UserGuest (frontend)
//!     participant B as backend (domsockd, vhost-device-vsock)
//!     G->>B: SET_OWNER
//!     G->>B: GET_FEATURES
//!     B-->>G: VERSION_1, EVENT_IDX?, SEQPACKET?, PROTOCOL_FEATURES?
//!     G->>B: GET_PROTOCOL_FEATURES (if PROTOCOL_FEATURES)
//!     B-->>G: CONFIG?, MQ?, ...
//!     G->>B: SET_PROTOCOL_FEATURES (CONFIG, MQ: what was offered)
//!     G->>B: GET_QUEUE_NUM (if MQ)
//!     B-->>G: 3
//!     G->>B: GET_CONFIG offset 0, 8 bytes (if CONFIG)
//!     B-->>G: le64 guest_cid
//!     G->>B: SET_FEATURES (acked subset)
//!     G->>B: SET_MEM_TABLE (memfd, mapped by the backend)
//!     loop rx(0), tx(1), event(2)
//!         G->>B: SET_VRING_NUM, SET_VRING_ADDR, SET_VRING_BASE 0
//!         G->>B: SET_VRING_CALL (eventfd), SET_VRING_KICK (eventfd)
//!     end
//!     G->>B: SET_VRING_ENABLE 1 per ring (if PROTOCOL_FEATURES)
//!     G->>B: GET_FEATURES (a request with a reply: everything before it was handled)
//!     B-->>G: features
//!     G->>B: kick every ring once
//! ```
//!
//! [`unplug`] and [`negotiate_device`] with [`OwnerOrder::AfterProbe`] replay what QEMU
//! sends when the device is unplugged and a new one is plugged on the same connection
//! (QMP `device_del`, `device_add`): the rings stop, then the new device is initialised
//! from `GET_FEATURES` on, with `SET_OWNER` after the feature probe.
//!
//! None of these backends offers `REPLY_ACK`, so requests without a reply are not
//! acknowledged; a backend that rejects one closes the socket, and the next request that
//! expects a reply fails. The final `GET_FEATURES` makes the setup synchronous: a backend
//! handles requests in order, so its reply means the rings are enabled. Without it a kick
//! could arrive between `SET_VRING_KICK` and `SET_VRING_ENABLE`, which vhost-user-backend
//! 0.20 (vhost-device-vsock 0.3.0) reads and drops; with EVENT_IDX the device then never
//! asks for another kick and the ring stalls. Every exchange is bounded by a socket
//! timeout, so a backend that is busy with another frontend cannot hang the caller.

use super::config::GuestConfig;
use super::error::SetupError;
use super::memory::Mem;
use super::ring::RingAddrs;
use domsock_proto::config_space::VsockConfig;
use domsock_proto::packet::VIRTIO_VSOCK_F_SEQPACKET;
use domsock_proto::Cid;
use std::io::ErrorKind;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};
use vhost::vhost_user::message::VhostUserConfigFlags;
use vhost::vhost_user::{
    Frontend, VhostUserFrontend, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use vm_memory::{GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;

/// Virtqueues of a vsock device.
pub(crate) const VSOCK_QUEUES: u64 = 3;
/// Bytes of the vsock config space we read: all of it (`le64 guest_cid`).
const CONFIG_CID_BYTES: u32 = VsockConfig::LEN as u32;

/// What the frontend and the device agreed on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    /// Feature bits the device offered.
    pub device_features: u64,
    /// Feature bits we acknowledged (`SET_FEATURES`).
    pub driver_features: u64,
    /// `VIRTIO_RING_F_EVENT_IDX` is in use on every ring.
    pub event_idx: bool,
    /// `VIRTIO_VSOCK_F_SEQPACKET` is in use.
    pub seqpacket: bool,
    /// vhost-user protocol features we acknowledged (empty without `PROTOCOL_FEATURES`).
    pub protocol_features: VhostUserProtocolFeatures,
    /// Virtqueues the device reports (`GET_QUEUE_NUM`; 3 when it has no `MQ`).
    pub device_queues: u64,
    /// The guest CID came from the device's config space (`GET_CONFIG`), not the caller.
    pub cid_from_device: bool,
}

impl Negotiated {
    /// Whether the event queue (index 2) was set up.
    pub fn has_event_queue(&self) -> bool {
        self.device_queues >= VSOCK_QUEUES
    }
}

/// Pause between connection attempts while the backend's socket refuses.
const CONNECT_RETRY_MS: u64 = 10;

/// Connects to the backend's socket. A socket file that exists but refuses (the backend
/// has bound it and not yet called `listen`) is retried until `timeout`, as the vhost
/// crate's own `Frontend::connect` does.
fn connect_socket(path: &Path, timeout: Duration) -> Result<UnixStream, SetupError> {
    let deadline = Instant::now() + timeout;
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return Ok(s),
            Err(e) if e.kind() == ErrorKind::ConnectionRefused && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(CONNECT_RETRY_MS));
            }
            Err(source) => {
                return Err(SetupError::Connect {
                    path: path.to_path_buf(),
                    source,
                })
            }
        }
    }
}

/// Where `SET_OWNER` goes in a device's initialisation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OwnerOrder {
    /// First, as the sequence in the module doc has it.
    First,
    /// After the feature probe (`GET_FEATURES`, the protocol features, `GET_QUEUE_NUM`),
    /// then `GET_FEATURES` once more: QEMU's order (`vhost_user_backend_init` probes, then
    /// `vhost_dev_init` claims the device).
    AfterProbe,
}

/// Connects and negotiates features; returns the frontend, the agreement and the CID.
pub(crate) fn negotiate(
    path: &Path,
    cfg: &GuestConfig,
) -> Result<(Frontend, Negotiated, Cid), SetupError> {
    let stream = connect_socket(path, cfg.vhost_user_timeout)?;
    let timeouts = stream
        .set_read_timeout(Some(cfg.vhost_user_timeout))
        .and_then(|()| stream.set_write_timeout(Some(cfg.vhost_user_timeout)));
    timeouts.map_err(|source| SetupError::Connect {
        path: path.to_path_buf(),
        source,
    })?;
    let mut frontend = Frontend::from_stream(stream, VSOCK_QUEUES);
    let (negotiated, cid) = negotiate_device(&mut frontend, cfg, OwnerOrder::First)?;
    Ok((frontend, negotiated, cid))
}

/// Initialises a device on a connected frontend, up to `SET_FEATURES`.
pub(crate) fn negotiate_device(
    frontend: &mut Frontend,
    cfg: &GuestConfig,
    order: OwnerOrder,
) -> Result<(Negotiated, Cid), SetupError> {
    if order == OwnerOrder::First {
        frontend
            .set_owner()
            .map_err(SetupError::vhost("SET_OWNER"))?;
    }
    let device_features = frontend
        .get_features()
        .map_err(SetupError::vhost("GET_FEATURES"))?;
    if device_features & (1 << VIRTIO_F_VERSION_1) == 0 {
        return Err(SetupError::NoVersion1 {
            offered: device_features,
        });
    }
    let offers = |bit: u32| device_features & (1u64 << bit) != 0;
    let has_protocol_features =
        device_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0;

    let mut protocol_features = VhostUserProtocolFeatures::empty();
    if has_protocol_features {
        let offered = frontend
            .get_protocol_features()
            .map_err(SetupError::vhost("GET_PROTOCOL_FEATURES"))?;
        protocol_features =
            offered & (VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::MQ);
        frontend
            .set_protocol_features(protocol_features)
            .map_err(SetupError::vhost("SET_PROTOCOL_FEATURES"))?;
    }
    let device_queues = if protocol_features.contains(VhostUserProtocolFeatures::MQ) {
        frontend
            .get_queue_num()
            .map_err(SetupError::vhost("GET_QUEUE_NUM"))?
    } else {
        VSOCK_QUEUES
    };
    if device_queues < 2 {
        return Err(SetupError::TooFewQueues {
            queues: device_queues,
        });
    }
    if order == OwnerOrder::AfterProbe {
        frontend
            .set_owner()
            .map_err(SetupError::vhost("SET_OWNER"))?;
        frontend
            .get_features()
            .map_err(SetupError::vhost("GET_FEATURES (after SET_OWNER)"))?;
    }

    let (cid, cid_from_device) = if protocol_features.contains(VhostUserProtocolFeatures::CONFIG) {
        let (_, payload) = frontend
            .get_config(
                0,
                CONFIG_CID_BYTES,
                VhostUserConfigFlags::empty(),
                &[0u8; CONFIG_CID_BYTES as usize],
            )
            .map_err(SetupError::vhost("GET_CONFIG"))?;
        let config = VsockConfig::from_prefix(&payload).ok_or(SetupError::Vhost {
            step: "GET_CONFIG",
            source: vhost::Error::VhostUserProtocol(vhost::vhost_user::Error::InvalidMessage),
        })?;
        let device = config.guest_cid().0;
        if !Cid(device).is_guest() {
            return Err(SetupError::BadCid(device));
        }
        if let Some(expected) = cfg.cid {
            if expected.0 != device {
                return Err(SetupError::CidMismatch {
                    device,
                    expected: expected.0,
                });
            }
        }
        (Cid(device), true)
    } else {
        (cfg.cid.ok_or(SetupError::NoCid)?, false)
    };

    let event_idx = cfg.event_idx && offers(VIRTIO_RING_F_EVENT_IDX);
    let seqpacket = cfg.seqpacket && device_features & (1 << VIRTIO_VSOCK_F_SEQPACKET) != 0;
    let mut driver_features = 1u64 << VIRTIO_F_VERSION_1;
    if event_idx {
        driver_features |= 1 << VIRTIO_RING_F_EVENT_IDX;
    }
    if seqpacket {
        driver_features |= 1 << VIRTIO_VSOCK_F_SEQPACKET;
    }
    if has_protocol_features {
        driver_features |= VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
    }
    frontend
        .set_features(driver_features)
        .map_err(SetupError::vhost("SET_FEATURES"))?;

    Ok((
        Negotiated {
            device_features,
            driver_features,
            event_idx,
            seqpacket,
            protocol_features,
            device_queues,
            cid_from_device,
        },
        cid,
    ))
}

/// `SET_MEM_TABLE` with the memfd behind every region of `mem`.
pub(crate) fn share_memory(frontend: &Frontend, mem: &Mem) -> Result<(), SetupError> {
    let regions = mem
        .iter()
        .map(VhostUserMemoryRegionInfo::from_guest_region)
        .collect::<Result<Vec<_>, _>>()
        .map_err(SetupError::vhost("SET_MEM_TABLE"))?;
    frontend
        .set_mem_table(&regions)
        .map(drop)
        .map_err(SetupError::vhost("SET_MEM_TABLE"))
}

/// Hands ring `index` to the device. Ring addresses travel as frontend virtual addresses,
/// which the backend translates through the memory table.
pub(crate) fn start_queue(
    frontend: &Frontend,
    index: usize,
    addrs: RingAddrs,
    mem: &Mem,
    kick: &EventFd,
    call: &EventFd,
) -> Result<(), SetupError> {
    let host = |gpa: GuestAddress| {
        mem.get_host_address(gpa)
            .map(|p| p as u64)
            .map_err(|_| SetupError::Vhost {
                step: "SET_VRING_ADDR",
                source: vhost::Error::InvalidGuestMemory,
            })
    };
    let config = VringConfigData {
        queue_max_size: addrs.size,
        queue_size: addrs.size,
        flags: 0,
        desc_table_addr: host(addrs.desc)?,
        used_ring_addr: host(addrs.used)?,
        avail_ring_addr: host(addrs.avail)?,
        log_addr: None,
    };
    frontend
        .set_vring_num(index, addrs.size)
        .map_err(SetupError::vhost("SET_VRING_NUM"))?;
    frontend
        .set_vring_addr(index, &config)
        .map_err(SetupError::vhost("SET_VRING_ADDR"))?;
    frontend
        .set_vring_base(index, 0)
        .map_err(SetupError::vhost("SET_VRING_BASE"))?;
    frontend
        .set_vring_call(index, call)
        .map_err(SetupError::vhost("SET_VRING_CALL"))?;
    frontend
        .set_vring_kick(index, kick)
        .map_err(SetupError::vhost("SET_VRING_KICK"))
}

/// `SET_VRING_ENABLE 1` (only meaningful with `PROTOCOL_FEATURES`; without it the backend
/// enabled every ring at `SET_FEATURES`).
pub(crate) fn enable_queue(
    frontend: &mut Frontend,
    negotiated: &Negotiated,
    index: usize,
) -> Result<(), SetupError> {
    if negotiated.driver_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0 {
        return Ok(());
    }
    frontend
        .set_vring_enable(index, true)
        .map_err(SetupError::vhost("SET_VRING_ENABLE"))
}

/// What QEMU sends a backend when the device is unplugged (`device_del`; its
/// `vhost_dev_stop`): `SET_VRING_ENABLE 0` for every ring, `GET_VRING_BASE` for every ring
/// (the rings stop), then `SET_VRING_CALL` again for every ring. The connection stays open.
pub(crate) fn unplug(
    frontend: &mut Frontend,
    negotiated: &Negotiated,
    calls: &[&EventFd],
) -> Result<(), SetupError> {
    if negotiated.driver_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0 {
        for q in 0..calls.len() {
            frontend
                .set_vring_enable(q, false)
                .map_err(SetupError::vhost("SET_VRING_ENABLE 0"))?;
        }
    }
    for q in 0..calls.len() {
        frontend
            .get_vring_base(q)
            .map_err(SetupError::vhost("GET_VRING_BASE"))?;
    }
    for (q, call) in calls.iter().enumerate() {
        frontend
            .set_vring_call(q, call)
            .map_err(SetupError::vhost("SET_VRING_CALL"))?;
    }
    Ok(())
}

/// Waits until the backend has handled every request sent so far (see the module doc).
pub(crate) fn sync(frontend: &Frontend) -> Result<(), SetupError> {
    frontend
        .get_features()
        .map(drop)
        .map_err(SetupError::vhost("GET_FEATURES (sync)"))
}
