//! A user-space virtio-vsock *driver* for hermetic data-plane tests.
//!
//! [`TestGuest`] owns guest memory, lays out three split virtqueues in it (rx=0, tx=1,
//! event=2) and configures the device's [`VringRwLock`]s the way the vhost-user handler does
//! (`set_queue_size`, `set_queue_info`, `set_queue_ready`, `set_enabled`). Tests put
//! descriptor chains into the rings as a guest driver would, call [`DataPlane::pump`] (what
//! the worker thread runs on every kick or host-socket event), and read back from the used
//! rings what the device returned.
//!
//! It does not emulate QEMU, the vhost-user protocol, kicks or interrupts: the pump is
//! called directly, and host socket readiness reaches the data plane through its own nested
//! epoll, polled inside `pump`.
//!
//! The ring writer is our own rather than `virtio_queue::mock::MockSplitQueue`: the mock's
//! `add_chain` writes fixed addresses and never takes descriptors off its free list, its
//! `add_desc_chains` neither wraps the avail ring index modulo the queue size nor manages the
//! descriptor table, and it has no used-ring reader. A test that keeps hundreds of chains
//! flowing through a 256-entry ring needs all three.
//!
//! The wire header is encoded and decoded here independently of `domsock-proto`, so the
//! tests check the bytes the device writes rather than trusting the codec under test.

#![allow(dead_code)] // Each test binary uses a different subset.

use domsock_host::engine::DataPlane;
use domsock_host::vm::VmShared;
use domsock_proto::Cid;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};

pub type Mem = GuestMemoryMmap<()>;
pub type Vring = VringRwLock<GuestMemoryAtomic<Mem>>;

pub const GUEST_CID: u64 = 3;
pub const HOST_CID: u64 = 2;
pub const HEADER_LEN: usize = 44;
/// What domsockd advertises per connection (`EndpointConfig::default().buf_alloc_bytes`).
pub const DEVICE_BUF_ALLOC: u32 = 256 * 1024;

pub const TYPE_STREAM: u16 = 1;
pub const TYPE_SEQPACKET: u16 = 2;

pub const OP_REQUEST: u16 = 1;
pub const OP_RESPONSE: u16 = 2;
pub const OP_RST: u16 = 3;
pub const OP_SHUTDOWN: u16 = 4;
pub const OP_RW: u16 = 5;
pub const OP_CREDIT_UPDATE: u16 = 6;
pub const OP_CREDIT_REQUEST: u16 = 7;

pub const SHUTDOWN_RCV: u32 = 1;
pub const SHUTDOWN_SEND: u32 = 2;
pub const SEQ_EOM: u32 = 1;

pub const RX: usize = 0;
pub const TX: usize = 1;
pub const EVENT: usize = 2;

const QUEUE_SIZE: u16 = 256;
const MEM_BYTES: usize = 64 << 20;
/// Rings start above 0: virtio-queue treats an avail ring at guest address 0 as "not ready".
const RING_BASE: u64 = 0x1_0000;
const RING_STRIDE: u64 = 0x1_0000;
const DATA_BASE: u64 = 0x10_0000;
/// A guest address no test memory maps.
pub const OUTSIDE_MEMORY: u64 = 1 << 40;

const VRING_DESC_F_NEXT: u16 = 1;
const VRING_DESC_F_WRITE: u16 = 2;

/// Pump iterations [`TestGuest::pump_until`] allows before failing.
const PUMP_LIMIT: usize = 2_000;
/// A test that has not finished after this long aborts the test binary instead of hanging.
const WATCHDOG: Duration = Duration::from_secs(90);
/// Bound on blocking host-socket reads.
pub const HOST_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// The 44-byte virtio-vsock header, little-endian on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Hdr {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

impl Hdr {
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Hdr {
        assert!(
            b.len() >= HEADER_LEN,
            "{} bytes cannot hold a header",
            b.len()
        );
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
        let u16_at = |o: usize| u16::from_le_bytes(b[o..o + 2].try_into().unwrap());
        Hdr {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    /// `header || payload`, as a guest puts a packet in memory.
    pub fn with_payload(&self, payload: &[u8]) -> Vec<u8> {
        let mut v = self.encode().to_vec();
        v.extend_from_slice(payload);
        v
    }
}

/// The guest's view of one connection: addresses, type and its own credit counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestConn {
    pub guest_port: u32,
    pub host_port: u32,
    pub type_: u16,
    /// Receive buffer the guest advertises.
    pub buf_alloc: u32,
    /// Payload bytes the guest has consumed (what it advertises as fwd_cnt).
    pub fwd_cnt: u32,
}

impl GuestConn {
    pub fn stream(guest_port: u32, host_port: u32) -> Self {
        Self {
            guest_port,
            host_port,
            type_: TYPE_STREAM,
            buf_alloc: 64 * 1024,
            fwd_cnt: 0,
        }
    }

    pub fn seqpacket(guest_port: u32, host_port: u32) -> Self {
        Self {
            type_: TYPE_SEQPACKET,
            ..Self::stream(guest_port, host_port)
        }
    }

    /// A guest->host header of this connection.
    pub fn hdr(&self, op: u16, len: u32, flags: u32) -> Hdr {
        Hdr {
            src_cid: GUEST_CID,
            dst_cid: HOST_CID,
            src_port: self.guest_port,
            dst_port: self.host_port,
            len,
            type_: self.type_,
            op,
            flags,
            buf_alloc: self.buf_alloc,
            fwd_cnt: self.fwd_cnt,
        }
    }

    /// Whether a host->guest packet belongs to this connection.
    pub fn owns(&self, p: &RxPacket) -> bool {
        p.hdr.src_cid == HOST_CID
            && p.hdr.dst_cid == GUEST_CID
            && p.hdr.src_port == self.host_port
            && p.hdr.dst_port == self.guest_port
    }
}

/// One descriptor of a chain as the guest builds it.
#[derive(Debug, Clone, Copy)]
pub enum Seg {
    /// Device-readable, filled with the next `n` bytes of the packet being sent.
    Read(usize),
    /// Device-writable, `n` bytes.
    Write(u32),
    /// Whatever a hostile guest likes: any address, length and direction; not backed by an
    /// allocation.
    Raw { addr: u64, len: u32, writable: bool },
}

/// A chain the device put in a used ring.
#[derive(Debug, Clone)]
pub struct Used {
    pub head: u16,
    pub len: u32,
    /// The chain's descriptors: (address, length, device-writable).
    pub segs: Vec<(u64, u32, bool)>,
}

impl Used {
    /// Bytes of device-writable descriptors.
    pub fn writable_capacity(&self) -> usize {
        self.segs.iter().filter(|s| s.2).map(|s| s.1 as usize).sum()
    }
}

/// A host->guest packet read back from the RX used ring.
#[derive(Debug, Clone)]
pub struct RxPacket {
    pub hdr: Hdr,
    pub payload: Vec<u8>,
    /// Payload room the guest gave the chain it arrived in.
    pub room: usize,
}

/// The driver side of one split virtqueue living in guest memory.
#[derive(Debug)]
struct RingDriver {
    desc: u64,
    avail: u64,
    used: u64,
    size: u16,
    free: Vec<u16>,
    avail_idx: u16,
    used_seen: u16,
    outstanding: HashMap<u16, InFlight>,
}

/// A chain the device has not returned yet.
#[derive(Debug)]
struct InFlight {
    indices: Vec<u16>,
    segs: Vec<(u64, u32, bool)>,
}

impl RingDriver {
    fn new(base: u64, size: u16) -> Self {
        let desc = base;
        let avail = desc + 16 * u64::from(size);
        // Used ring: 4-byte aligned, after avail's flags, idx, ring and used_event.
        let used = (avail + 6 + 2 * u64::from(size) + 3) & !3;
        Self {
            desc,
            avail,
            used,
            size,
            free: (0..size).rev().collect(),
            avail_idx: 0,
            used_seen: 0,
            outstanding: HashMap::new(),
        }
    }

    /// Writes the descriptors of one chain and publishes its head in the avail ring.
    fn add(&mut self, mem: &Mem, segs: &[(u64, u32, bool)]) -> u16 {
        assert!(!segs.is_empty(), "a chain needs a descriptor");
        assert!(
            self.free.len() >= segs.len(),
            "ring full: {} free descriptors, chain of {}",
            self.free.len(),
            segs.len()
        );
        let idx: Vec<u16> = (0..segs.len()).map(|_| self.free.pop().unwrap()).collect();
        for (i, &(addr, len, writable)) in segs.iter().enumerate() {
            let mut flags = if writable { VRING_DESC_F_WRITE } else { 0 };
            let next = if i + 1 < segs.len() {
                flags |= VRING_DESC_F_NEXT;
                idx[i + 1]
            } else {
                0
            };
            self.write_desc(mem, idx[i], Descriptor::new(addr, len, flags, next));
        }
        let head = idx[0];
        let segs = segs.to_vec();
        self.outstanding
            .insert(head, InFlight { indices: idx, segs });
        self.publish(mem, head);
        head
    }

    /// A one-descriptor chain whose `next` points back at itself.
    fn add_looping(&mut self, mem: &Mem, addr: u64, len: u32) -> u16 {
        let i = self.free.pop().expect("ring full");
        self.write_desc(mem, i, Descriptor::new(addr, len, VRING_DESC_F_NEXT, i));
        let segs = vec![(addr, len, false)];
        self.outstanding.insert(
            i,
            InFlight {
                indices: vec![i],
                segs,
            },
        );
        self.publish(mem, i);
        i
    }

    fn write_desc(&self, mem: &Mem, index: u16, d: Descriptor) {
        mem.write_obj(d, GuestAddress(self.desc + 16 * u64::from(index)))
            .unwrap();
    }

    fn publish(&mut self, mem: &Mem, head: u16) {
        let slot = u64::from(self.avail_idx % self.size);
        mem.write_obj(head.to_le(), GuestAddress(self.avail + 4 + 2 * slot))
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.write_obj(self.avail_idx.to_le(), GuestAddress(self.avail + 2))
            .unwrap();
    }

    /// Chains the device returned since the last call, in order.
    fn take_used(&mut self, mem: &Mem) -> Vec<Used> {
        let used_idx = u16::from_le(mem.read_obj::<u16>(GuestAddress(self.used + 2)).unwrap());
        let mut out = Vec::new();
        assert!(
            used_idx.wrapping_sub(self.used_seen) <= self.size,
            "device moved used.idx from {} to {}",
            self.used_seen,
            used_idx
        );
        while self.used_seen != used_idx {
            let slot = u64::from(self.used_seen % self.size);
            let elem = GuestAddress(self.used + 4 + 8 * slot);
            let id = u32::from_le(mem.read_obj::<u32>(elem).unwrap());
            let len = u32::from_le(mem.read_obj::<u32>(GuestAddress(elem.0 + 4)).unwrap());
            let head = u16::try_from(id).unwrap_or_else(|_| panic!("used id {id} out of range"));
            let InFlight { indices, segs } = self.outstanding.remove(&head).unwrap_or_else(|| {
                panic!("device returned chain {head}, which is not outstanding")
            });
            self.free.extend(indices);
            out.push(Used { head, len, segs });
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }

    fn outstanding(&self) -> usize {
        self.outstanding.len()
    }
}

/// Sets a flag when dropped; until then a thread waits to abort a hung test binary.
#[derive(Debug)]
struct Watchdog(Arc<AtomicBool>);

impl Watchdog {
    fn start(name: String) -> Self {
        let done = Arc::new(AtomicBool::new(false));
        let flag = done.clone();
        std::thread::spawn(move || {
            let start = Instant::now();
            while start.elapsed() < WATCHDOG {
                if flag.load(Ordering::Relaxed) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            eprintln!("test guest {name} still running after {WATCHDOG:?}: the data plane hangs");
            std::process::abort();
        });
        Self(done)
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

pub use domsock_host::test_utils::TempDir;

/// Counters that say something went wrong; a hostile-input test checks that exactly the
/// expected ones moved.
pub const FAILURE_COUNTERS: &[&str] = &[
    "malformed_chains",
    "bad_headers",
    "spoofed_packets",
    "unroutable_packets",
    "refused_connections",
    "bad_handshakes",
    "protocol_resets",
    "host_errors",
    "unknown_connection_rsts",
];

/// One VM: guest memory, rings, the real data plane, and a directory for host sockets.
pub struct TestGuest {
    pub shared: Arc<VmShared>,
    pub plane: DataPlane,
    mem: GuestMemoryAtomic<Mem>,
    vrings: Vec<Vring>,
    rings: Vec<RingDriver>,
    next_buf: u64,
    rx: VecDeque<RxPacket>,
    /// RX chains the device returned with no packet in them (len 0).
    pub rx_returned_empty: Vec<Used>,
    /// Keep this many RX chains posted, cycling through these layouts.
    rx_refill: usize,
    rx_layouts: Vec<Vec<u32>>,
    rx_layout_next: usize,
    /// TX chains returned so far.
    pub tx_returned: usize,
    dir: TempDir,
    _watchdog: Watchdog,
}

impl std::fmt::Debug for TestGuest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestGuest")
            .field("dir", &self.dir)
            .field("stats", &self.shared.stats.to_string())
            .finish_non_exhaustive()
    }
}

impl TestGuest {
    /// A running guest: memory set, all three queues ready and enabled, 32 RX buffers of
    /// 4 KiB payload posted (what a Linux guest does).
    pub fn new(tag: &str) -> Self {
        Self::with_rx(tag, 32, &[&[(HEADER_LEN + 4096) as u32]])
    }

    /// Like [`TestGuest::new`], keeping `count` RX chains of the given layouts posted.
    pub fn with_rx(tag: &str, count: usize, layouts: &[&[u32]]) -> Self {
        let dir = TempDir::new(tag).unwrap();
        let shared = VmShared::bind(Cid(GUEST_CID), tag.into(), dir.path().join("vs")).unwrap();
        let mmap = Mem::from_ranges(&[(GuestAddress(0), MEM_BYTES)]).unwrap();
        let mem = GuestMemoryAtomic::new(mmap);
        let mut vrings = Vec::new();
        let mut rings = Vec::new();
        for q in 0..3u64 {
            let ring = RingDriver::new(RING_BASE + q * RING_STRIDE, QUEUE_SIZE);
            let vring = Vring::new(mem.clone(), QUEUE_SIZE).unwrap();
            vring.set_queue_size(QUEUE_SIZE);
            vring
                .set_queue_info(ring.desc, ring.avail, ring.used)
                .unwrap();
            vring.set_queue_ready(true);
            vring.set_enabled(true);
            vrings.push(vring);
            rings.push(ring);
        }
        let mut plane = DataPlane::new(shared.clone()).unwrap();
        plane.set_memory(mem.clone());
        let mut g = Self {
            shared,
            plane,
            mem,
            vrings,
            rings,
            next_buf: DATA_BASE,
            rx: VecDeque::new(),
            rx_returned_empty: Vec::new(),
            rx_refill: count,
            rx_layouts: layouts.iter().map(|l| l.to_vec()).collect(),
            rx_layout_next: 0,
            tx_returned: 0,
            dir,
            _watchdog: Watchdog::start(tag.into()),
        };
        g.refill_rx();
        g
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn vrings(&self) -> &[Vring] {
        &self.vrings
    }

    fn memory(&self) -> vm_memory::GuestMemoryLoadGuard<Mem> {
        self.mem.memory()
    }

    fn alloc(&mut self, len: usize) -> u64 {
        let addr = self.next_buf;
        let end = addr + len as u64;
        assert!(end <= MEM_BYTES as u64, "test guest memory exhausted");
        self.next_buf = (end + 7) & !7;
        addr
    }

    // ---- TX -----------------------------------------------------------------------------

    /// Puts one TX chain built from `layout` in the ring; `Read` segments take consecutive
    /// bytes of `bytes`, which must be used up exactly. Returns the head.
    pub fn add_tx_chain(&mut self, bytes: &[u8], layout: &[Seg]) -> u16 {
        let mut segs = Vec::new();
        let mut pos = 0;
        for s in layout {
            match *s {
                Seg::Read(n) => {
                    let addr = self.alloc(n);
                    self.memory()
                        .write_slice(&bytes[pos..pos + n], GuestAddress(addr))
                        .unwrap();
                    pos += n;
                    segs.push((addr, n as u32, false));
                }
                Seg::Write(n) => segs.push((self.alloc(n as usize), n, true)),
                Seg::Raw {
                    addr,
                    len,
                    writable,
                } => segs.push((addr, len, writable)),
            }
        }
        assert_eq!(pos, bytes.len(), "layout does not cover the packet");
        let mem = self.memory();
        self.rings[TX].add(&mem, &segs)
    }

    /// A TX chain of one descriptor holding `bytes` whose `next` points at itself.
    pub fn add_tx_looping(&mut self, bytes: &[u8]) -> u16 {
        let addr = self.alloc(bytes.len());
        let mem = self.memory();
        mem.write_slice(bytes, GuestAddress(addr)).unwrap();
        self.rings[TX].add_looping(&mem, addr, bytes.len() as u32)
    }

    /// Sends `hdr` and `payload` as Linux does: header and payload in separate descriptors
    /// (just the header when there is no payload).
    pub fn send(&mut self, hdr: Hdr, payload: &[u8]) -> u16 {
        let bytes = hdr.with_payload(payload);
        if payload.is_empty() {
            self.add_tx_chain(&bytes, &[Seg::Read(HEADER_LEN)])
        } else {
            self.add_tx_chain(&bytes, &[Seg::Read(HEADER_LEN), Seg::Read(payload.len())])
        }
    }

    /// Sends `header || payload` cut into descriptors of the given sizes (which must add up).
    pub fn send_split(&mut self, hdr: Hdr, payload: &[u8], cuts: &[usize]) -> u16 {
        let layout: Vec<Seg> = cuts.iter().map(|&n| Seg::Read(n)).collect();
        self.add_tx_chain(&hdr.with_payload(payload), &layout)
    }

    /// Data on `conn`, accounted nowhere (the device does the credit check).
    pub fn send_rw(&mut self, conn: &GuestConn, data: &[u8]) -> u16 {
        self.send(conn.hdr(OP_RW, data.len() as u32, 0), data)
    }

    /// A control packet on `conn`.
    pub fn send_ctl(&mut self, conn: &GuestConn, op: u16, flags: u32) -> u16 {
        self.send(conn.hdr(op, 0, flags), &[])
    }

    pub fn tx_outstanding(&self) -> usize {
        self.rings[TX].outstanding()
    }

    // ---- RX -----------------------------------------------------------------------------

    /// Posts one RX chain per layout; each layout lists device-writable descriptor sizes.
    pub fn post_rx(&mut self, layouts: &[&[u32]]) {
        for l in layouts {
            let segs: Vec<Seg> = l.iter().map(|&n| Seg::Write(n)).collect();
            self.post_rx_chain(&segs);
        }
    }

    /// Posts one RX chain of arbitrary segments (hostile guests).
    pub fn post_rx_chain(&mut self, layout: &[Seg]) -> u16 {
        let mut segs = Vec::new();
        for s in layout {
            match *s {
                Seg::Read(n) => segs.push((self.alloc(n), n as u32, false)),
                Seg::Write(n) => segs.push((self.alloc(n as usize), n, true)),
                Seg::Raw {
                    addr,
                    len,
                    writable,
                } => segs.push((addr, len, writable)),
            }
        }
        let mem = self.memory();
        self.rings[RX].add(&mem, &segs)
    }

    /// Keep `count` RX chains posted after every pump, cycling through `layouts`.
    /// `count == 0` stops refilling (tests that post RX buffers by hand).
    pub fn set_rx_refill(&mut self, count: usize, layouts: &[&[u32]]) {
        self.rx_refill = count;
        self.rx_layouts = layouts.iter().map(|l| l.to_vec()).collect();
        self.rx_layout_next = 0;
        self.refill_rx();
    }

    fn refill_rx(&mut self) {
        while self.rings[RX].outstanding() < self.rx_refill {
            let l = self.rx_layouts[self.rx_layout_next % self.rx_layouts.len()].clone();
            self.rx_layout_next += 1;
            self.post_rx(&[&l]);
        }
    }

    pub fn rx_outstanding(&self) -> usize {
        self.rings[RX].outstanding()
    }

    fn harvest(&mut self) {
        let mem = self.memory();
        let tx = self.rings[TX].take_used(&mem);
        for u in &tx {
            assert_eq!(u.len, 0, "TX chain {} returned with len {}", u.head, u.len);
        }
        self.tx_returned += tx.len();
        for u in self.rings[RX].take_used(&mem) {
            if u.len == 0 {
                self.rx_returned_empty.push(u);
                continue;
            }
            let cap = u.writable_capacity();
            assert!(
                u.len as usize >= HEADER_LEN && u.len as usize <= cap,
                "RX chain {} used len {} (capacity {cap})",
                u.head,
                u.len
            );
            let mut bytes = Vec::with_capacity(u.len as usize);
            for &(addr, len, writable) in &u.segs {
                assert!(writable, "device used a readable RX descriptor");
                let want = (u.len as usize - bytes.len()).min(len as usize);
                let start = bytes.len();
                bytes.resize(start + want, 0);
                mem.read_slice(&mut bytes[start..], GuestAddress(addr))
                    .unwrap();
                if bytes.len() == u.len as usize {
                    break;
                }
            }
            let hdr = Hdr::decode(&bytes);
            assert_eq!(
                u.len as usize,
                HEADER_LEN + hdr.len as usize,
                "used len disagrees with the header's len: {hdr:?}"
            );
            self.rx.push_back(RxPacket {
                hdr,
                payload: bytes[HEADER_LEN..].to_vec(),
                room: cap - HEADER_LEN,
            });
        }
        drop(mem);
        self.refill_rx();
    }

    // ---- running the device -------------------------------------------------------------

    /// One pass of the worker thread, then read both used rings and refill RX.
    pub fn pump(&mut self) {
        self.plane.pump(&self.vrings);
        self.harvest();
    }

    /// One pass of the worker thread at the simulated instant `now` (timeouts fire when
    /// `now` passes them; nothing sleeps), then read both used rings and refill RX.
    pub fn pump_at(&mut self, now: Instant) {
        self.plane
            .pump_at(&self.vrings, domsock_host::engine::Wake::All, now);
        self.harvest();
    }

    /// Pumps until `done` holds; fails the test after a bounded number of tries.
    pub fn pump_until(&mut self, what: &str, mut done: impl FnMut(&mut Self) -> bool) {
        for i in 0..PUMP_LIMIT {
            self.pump();
            if done(self) {
                return;
            }
            if i > 10 {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        panic!("gave up waiting for {what}; stats: {}", self.shared.stats);
    }

    /// Pumps a few times so that anything that can happen has happened.
    pub fn settle(&mut self) {
        for _ in 0..5 {
            self.pump();
        }
    }

    /// Takes every RX packet read back so far.
    pub fn take_rx(&mut self) -> Vec<RxPacket> {
        self.rx.drain(..).collect()
    }

    /// Takes the RX packets of `conn`, leaving the others queued.
    pub fn take_rx_of(&mut self, conn: &GuestConn) -> Vec<RxPacket> {
        let (mine, rest): (Vec<_>, Vec<_>) = self.rx.drain(..).partition(|p| conn.owns(p));
        self.rx = rest.into();
        mine
    }

    /// RX packets read back and not taken yet.
    pub fn rx_pending(&self) -> impl Iterator<Item = &RxPacket> {
        self.rx.iter()
    }

    // ---- guest connections --------------------------------------------------------------

    /// REQUEST on `conn` and wait for the device's RESPONSE, which is returned.
    pub fn connect(&mut self, conn: &GuestConn) -> Hdr {
        self.send_ctl(conn, OP_REQUEST, 0);
        let mut got = None;
        self.pump_until("RESPONSE", |g| {
            for p in g.take_rx_of(conn) {
                assert_eq!(p.hdr.op, OP_RESPONSE, "expected RESPONSE, got {:?}", p.hdr);
                got = Some(p.hdr);
            }
            got.is_some()
        });
        got.unwrap()
    }

    /// Pumps until `n` payload bytes arrived on `conn`; checks every packet's header and
    /// returns the payload. The guest consumes what arrives (`fwd_cnt` grows) but tells the
    /// device only if `credit_updates` is set.
    pub fn recv_stream(&mut self, conn: &mut GuestConn, n: usize, credit_updates: bool) -> Vec<u8> {
        let mut data = Vec::new();
        let c = *conn;
        let mut fwd = conn.fwd_cnt;
        let mut told = conn.fwd_cnt;
        self.pump_until(&format!("{n} bytes on port {}", c.guest_port), |g| {
            for p in g.take_rx_of(&c) {
                assert_eq!(p.hdr.op, OP_RW, "unexpected packet {:?}", p.hdr);
                assert_eq!(p.hdr.type_, c.type_);
                assert_eq!(p.hdr.len as usize, p.payload.len());
                fwd = fwd.wrapping_add(p.hdr.len);
                data.extend_from_slice(&p.payload);
            }
            if credit_updates && fwd != told {
                told = fwd;
                let now = GuestConn { fwd_cnt: fwd, ..c };
                g.send_ctl(&now, OP_CREDIT_UPDATE, 0);
            }
            data.len() >= n
        });
        conn.fwd_cnt = fwd;
        assert_eq!(data.len(), n, "more data than expected");
        data
    }

    // ---- host side ----------------------------------------------------------------------

    /// Path of the host listener for guest connections to `port`.
    pub fn port_path(&self, port: u32) -> PathBuf {
        self.dir().join(format!("vs_{port}"))
    }

    /// A host stream listener for guest connections to `port`.
    pub fn listen_stream(&self, port: u32) -> UnixListener {
        UnixListener::bind(self.port_path(port)).unwrap()
    }

    /// A host `SOCK_SEQPACKET` listener for guest connections to `port`.
    ///
    /// std has no seqpacket listener, but `accept(2)` does not care about the socket type:
    /// wrapping the listening fd in a `UnixListener` yields accepted seqpacket sockets as
    /// `UnixStream`s, whose `read`/`write` keep message boundaries. That keeps the tests free
    /// of `unsafe` fd juggling.
    pub fn listen_seqpacket(&self, port: u32) -> UnixListener {
        use nix::sys::socket::{
            bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType, UnixAddr,
        };
        let fd = socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .unwrap();
        bind(
            fd.as_raw_fd(),
            &UnixAddr::new(&self.port_path(port)).unwrap(),
        )
        .unwrap();
        listen(&fd, Backlog::new(64).unwrap()).unwrap();
        UnixListener::from(fd)
    }

    /// A host-initiated connection: connect to `<uds>` and send `CONNECT <port>`.
    pub fn host_connect(&self, port: u32) -> UnixStream {
        let mut s = UnixStream::connect(self.dir().join("vs")).unwrap();
        s.set_read_timeout(Some(HOST_READ_TIMEOUT)).unwrap();
        writeln!(s, "CONNECT {port}").unwrap();
        s
    }

    // ---- counters -----------------------------------------------------------------------

    pub fn stat(&self, name: &str) -> u64 {
        self.stats()
            .get(name)
            .copied()
            .unwrap_or_else(|| panic!("no counter {name}"))
    }

    pub fn stats(&self) -> BTreeMap<&'static str, u64> {
        self.shared.stats.snapshot().into_iter().collect()
    }

    /// Failure counters that moved since `before` (an empty map: since the start), with
    /// how much.
    pub fn failures_since(&self, before: &BTreeMap<&'static str, u64>) -> Vec<(&'static str, u64)> {
        let now = self.stats();
        FAILURE_COUNTERS
            .iter()
            .filter_map(|&k| {
                let d = now[k] - before.get(k).copied().unwrap_or(0);
                (d != 0).then_some((k, d))
            })
            .collect()
    }
}

/// Accepts one host connection, waiting a bounded time.
pub fn accept(listener: &UnixListener) -> UnixStream {
    listener.set_nonblocking(true).unwrap();
    let start = Instant::now();
    loop {
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false).unwrap();
                s.set_read_timeout(Some(HOST_READ_TIMEOUT)).unwrap();
                return s;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(
                    start.elapsed() < HOST_READ_TIMEOUT,
                    "no connection to accept"
                );
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
}

/// Whether a connection is waiting on `listener` (without blocking).
pub fn try_accept(listener: &UnixListener) -> Option<UnixStream> {
    listener.set_nonblocking(true).unwrap();
    match listener.accept() {
        Ok((s, _)) => {
            s.set_nonblocking(false).unwrap();
            s.set_read_timeout(Some(HOST_READ_TIMEOUT)).unwrap();
            Some(s)
        }
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => None,
        Err(e) => panic!("accept: {e}"),
    }
}

/// Reads exactly `n` bytes (bounded by the socket's read timeout).
pub fn read_n(s: &mut UnixStream, n: usize) -> Vec<u8> {
    use std::io::Read;
    let mut buf = vec![0u8; n];
    s.read_exact(&mut buf).unwrap();
    buf
}

/// Whether the next read sees end-of-file (bounded by the socket's read timeout).
pub fn reads_eof(s: &mut UnixStream) -> bool {
    use std::io::Read;
    let mut b = [0u8; 1];
    matches!(s.read(&mut b), Ok(0))
}

/// Receives one seqpacket message and its real length (`MSG_TRUNC` reports the length
/// even if the buffer was smaller).
pub fn recv_message(s: &UnixStream, max: usize) -> (usize, Vec<u8>) {
    use nix::sys::socket::{recv, MsgFlags};
    let mut buf = vec![0u8; max];
    let n = recv(s.as_raw_fd(), &mut buf, MsgFlags::MSG_TRUNC).unwrap();
    buf.truncate(n.min(max));
    (n, buf)
}

/// Deterministic test bytes, different per `seed`.
pub fn pattern(seed: u32, n: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(12345);
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}
