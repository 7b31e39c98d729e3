//! Fuzz body of descriptor-chain parsing: arbitrary descriptor tables (direct and
//! indirect), ring indices and memory contents, written by virtio-queue's mock driver into
//! a small guest memory with holes, then walked the way the data plane walks them.

// The one place this body names the chain module (it may move).
use crate::chain::{ChainError, Mem, Regions};
use arbitrary::{Arbitrary, Unstructured};
use domsock_proto::{Header, RawHeader, HEADER_LEN};
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueOwnedT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

/// Guest memory: the ring area, two adjacent regions (a range may span both), and a small
/// region behind a hole.
const REGIONS: [(u64, usize); 4] = [
    (0, 0x2000),
    (0x10000, 0x1000),
    (0x11000, 0x1000),
    (0x20000, 0x100),
];
const QUEUE_SIZE: u16 = 16;
/// Chains above this size are walked but not compared byte by byte.
const MAX_COMPARED_BYTES: usize = 1 << 20;

#[derive(Debug, Clone, Copy, Arbitrary)]
enum Addr {
    In { region: u8, offset: u16 },
    Raw(u64),
}

impl Addr {
    fn resolve(self) -> u64 {
        match self {
            Addr::In { region, offset } => {
                let (start, len) = REGIONS[usize::from(region) % REGIONS.len()];
                // Slightly past the end now and then.
                start + u64::from(offset) % (len as u64 + 64)
            }
            Addr::Raw(a) => a,
        }
    }
}

#[derive(Debug, Clone, Copy, Arbitrary)]
enum Len {
    Small(u8),
    Header,
    HeaderPlus(u8),
    /// Up to the end of the region the address is in.
    ToRegionEnd,
    Raw(u32),
}

#[derive(Debug, Clone, Copy, Arbitrary)]
struct Desc {
    addr: Addr,
    len: Len,
    /// `NEXT`, `WRITE`, `INDIRECT` (low three bits).
    flags: u8,
    next: u8,
}

impl Desc {
    fn raw(self) -> RawDescriptor {
        let addr = self.addr.resolve();
        let len = match self.len {
            Len::Small(n) => u32::from(n),
            Len::Header => HEADER_LEN as u32,
            Len::HeaderPlus(n) => HEADER_LEN as u32 + u32::from(n),
            Len::ToRegionEnd => REGIONS
                .iter()
                .find(|(s, l)| (*s..*s + *l as u64).contains(&addr))
                .map_or(0, |(s, l)| (s + *l as u64 - addr) as u32),
            Len::Raw(n) => n,
        };
        RawDescriptor::from(SplitDescriptor::new(
            addr,
            len,
            u16::from(self.flags & 7),
            u16::from(self.next),
        ))
    }
}

#[derive(Debug, Arbitrary)]
struct Input {
    writable: bool,
    max_payload: u32,
    /// The descriptor table; heads go to the available ring as the mock driver decides.
    queue: Vec<Desc>,
    /// Indirect tables (or anything) written as descriptors at an address.
    tables: Vec<(Addr, Vec<Desc>)>,
    /// Raw bytes written into guest memory after the rings are set up.
    fill: Vec<(Addr, Vec<u8>)>,
    skip: u16,
    len: u32,
    header: [u8; HEADER_LEN],
    payload: Vec<u8>,
}

/// Descriptor-chain parsing (`chain::Regions`).
///
/// For every chain the queue yields, with a reference walk of the same descriptors:
/// - `load` fails exactly on the first descriptor of the wrong direction or outside guest
///   memory (zero-length ones are skipped), and otherwise totals the descriptor lengths;
/// - `read_header` is `TooShort` below 44 bytes and otherwise decodes the chain's first 44
///   bytes, however they are split across descriptors and memory regions;
/// - `payload_ranges` covers exactly the requested payload (at most the capacity), only
///   with guest ranges that are valid memory, holding the chain's bytes after the header;
///   `copy_payload` with any offset returns those bytes; the header's own `len`, when it
///   fits, maps the same way;
/// - for a device-writable chain whose buffers do not overlap, `write_header` and
///   `write_payload` read back unchanged.
pub fn chain(data: &[u8]) {
    let Ok(input) = Input::arbitrary_take_rest(Unstructured::new(data)) else {
        return;
    };
    let ranges: Vec<(GuestAddress, usize)> =
        REGIONS.iter().map(|&(s, l)| (GuestAddress(s), l)).collect();
    let mem = Mem::from_ranges(&ranges).expect("fixed layout");
    let mock = MockSplitQueue::new(&mem, QUEUE_SIZE);
    let descs: Vec<RawDescriptor> = input
        .queue
        .iter()
        .take(usize::from(QUEUE_SIZE))
        .map(|d| d.raw())
        .collect();
    if mock.add_desc_chains(&descs, 0).is_err() {
        return;
    }
    for (at, table) in &input.tables {
        let mut addr = at.resolve();
        for d in table {
            // Writes outside guest memory just fail, like a guest's would be impossible.
            let _ = mem.write_obj(d.raw(), GuestAddress(addr));
            addr = addr.wrapping_add(16);
        }
    }
    for (at, bytes) in &input.fill {
        let _ = mem.write_slice(bytes, GuestAddress(at.resolve()));
    }
    let Ok(mut queue) = mock.create_queue::<Queue>() else {
        return;
    };
    let Ok(iter) = queue.iter(&mem) else {
        return;
    };
    let mut regions = Regions::default();
    for desc_chain in iter.take(usize::from(QUEUE_SIZE)) {
        let reference: Vec<(GuestAddress, u32, bool)> = desc_chain
            .clone()
            .map(|d| (d.addr(), d.len(), d.is_write_only()))
            .collect();
        let result = regions.load(desc_chain, &mem, input.writable);
        check_load(&mem, &reference, input.writable, &result);
        if result.is_ok() {
            check_regions(&mem, &regions, &reference, &input);
        }
    }
}

fn in_memory(mem: &Mem, addr: GuestAddress, len: usize) -> bool {
    mem.check_range(addr, len)
}

fn check_load(
    mem: &Mem,
    reference: &[(GuestAddress, u32, bool)],
    writable: bool,
    result: &Result<(), ChainError>,
) {
    let first_bad = reference
        .iter()
        .enumerate()
        .find_map(|(i, &(addr, len, w))| {
            if w != writable {
                Some(ChainError::WrongDirection { index: i })
            } else if len != 0 && !in_memory(mem, addr, len as usize) {
                Some(ChainError::OutOfRange { addr: addr.0, len })
            } else {
                None
            }
        });
    match (result, first_bad) {
        (Ok(()), None) => {}
        (Err(got), Some(want)) => assert_eq!(*got, want),
        (got, want) => panic!("load gave {got:?}, expected {want:?} for {reference:x?}"),
    }
}

fn check_regions(
    mem: &Mem,
    regions: &Regions,
    reference: &[(GuestAddress, u32, bool)],
    input: &Input,
) {
    let total: usize = reference.iter().map(|r| r.1 as usize).sum();
    assert_eq!(regions.total(), total);
    let cap = total.saturating_sub(HEADER_LEN);
    assert_eq!(regions.payload_capacity(), cap);

    let header = regions.read_header(mem);
    if total < HEADER_LEN {
        assert_eq!(header, Err(ChainError::TooShort { total }));
        return;
    }
    if total > MAX_COMPARED_BYTES {
        return;
    }
    let mut bytes = Vec::with_capacity(total);
    for &(addr, len, _) in reference {
        let start = bytes.len();
        bytes.resize(start + len as usize, 0);
        mem.read_slice(&mut bytes[start..], addr)
            .expect("checked by load");
    }
    let want: [u8; HEADER_LEN] = bytes[..HEADER_LEN].try_into().expect("44 bytes");
    let raw = header.expect("a chain of 44 bytes has a header");
    assert_eq!(raw, RawHeader::decode(&want));

    let len = (input.len as usize).min(cap);
    check_payload_ranges(mem, regions, &bytes, len);
    if let Ok(h) = Header::parse(&raw, input.max_payload) {
        if (h.len() as usize) <= cap {
            check_payload_ranges(mem, regions, &bytes, h.len() as usize);
        }
    }
    let skip = usize::from(input.skip) % (cap + 1);
    let n = len.min(cap - skip);
    let mut out = Vec::new();
    regions
        .copy_payload(mem, skip, n, &mut out)
        .expect("ranges checked by load");
    assert_eq!(out, &bytes[HEADER_LEN + skip..HEADER_LEN + skip + n]);

    if input.writable && !overlapping(reference) {
        let hdr = RawHeader::decode(&input.header);
        regions.write_header(mem, &hdr).expect("checked ranges");
        assert_eq!(regions.read_header(mem), Ok(hdr));
        let data = &input.payload[..input.payload.len().min(cap - skip)];
        regions
            .write_payload(mem, skip, data)
            .expect("checked ranges");
        let mut back = Vec::new();
        regions
            .copy_payload(mem, skip, data.len(), &mut back)
            .expect("checked ranges");
        assert_eq!(back, data);
    }
}

fn check_payload_ranges(mem: &Mem, regions: &Regions, bytes: &[u8], len: usize) {
    let mut ranges = Vec::new();
    regions.payload_ranges(len, &mut ranges);
    let mut got = Vec::with_capacity(len);
    for &(addr, n) in &ranges {
        assert!(n > 0, "empty payload range");
        assert!(
            in_memory(mem, addr, n),
            "payload range {addr:?}+{n} outside memory"
        );
        let start = got.len();
        got.resize(start + n, 0);
        mem.read_slice(&mut got[start..], addr)
            .expect("valid range");
    }
    assert_eq!(
        got.len(),
        len,
        "payload ranges cover {} of {len} bytes",
        got.len()
    );
    assert_eq!(got, &bytes[HEADER_LEN..HEADER_LEN + len]);
}

/// Whether two non-empty buffers of the chain share guest memory.
fn overlapping(reference: &[(GuestAddress, u32, bool)]) -> bool {
    let mut spans: Vec<(u64, u64)> = reference
        .iter()
        .filter(|r| r.1 > 0)
        .map(|r| (r.0 .0, r.0 .0 + u64::from(r.1)))
        .collect();
    spans.sort_unstable();
    spans.windows(2).any(|w| w[1].0 < w[0].1)
}
