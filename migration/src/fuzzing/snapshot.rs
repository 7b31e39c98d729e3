//! Body of the snapshot codec fuzz target.

use crate::{ConnSnapshot, SnapshotError, ENCODED_LEN, VERSION};
use arbitrary::{Arbitrary, Unstructured};
use domsock_proto::{Cid, ConnKey, Port, Shutdown, SocketType, VsockAddr};

#[derive(Debug, Arbitrary)]
struct Fields {
    local: (u64, u32),
    peer: (u64, u32),
    seqpacket: bool,
    local_shutdown: u8,
    peer_shutdown: u8,
    /// `buf_alloc, fwd_cnt, rx_cnt, peer_buf_alloc, peer_fwd_cnt, tx_cnt`; an unconsumed
    /// and an in-flight count near their bounds are likelier through the offsets.
    counters: [u32; 6],
    unconsumed_offset: Option<i8>,
    in_flight_offset: Option<i8>,
    cut: Option<u8>,
}

/// Snapshot codec.
///
/// Raw bytes: `decode` never panics; whatever it accepts satisfies the validation rules
/// (unconsumed bytes within `buf_alloc`, in-flight bytes within `peer_buf_alloc`, two
/// distinct CIDs) and re-encodes to exactly the input; its errors describe the input
/// (a `Truncated` gives the real length, `Trailing` the real excess).
/// The same bytes read as snapshot fields: `encode` then `decode` gives the snapshot back
/// exactly when the rules hold and `Inconsistent` otherwise; every cut or extension of a
/// valid encoding is rejected.
pub fn snapshot(data: &[u8]) {
    match ConnSnapshot::decode(data) {
        Ok(s) => {
            assert!(valid(&s), "accepted an inconsistent snapshot {s:?}");
            assert_eq!(&s.encode()[..], data, "re-encoding differs");
        }
        Err(SnapshotError::Truncated { have, need }) => {
            assert_eq!(have, data.len());
            assert!(have < need && (need == 8 || need == ENCODED_LEN));
        }
        Err(SnapshotError::Trailing(n)) => assert_eq!(n + ENCODED_LEN, data.len()),
        Err(SnapshotError::UnsupportedVersion(v)) => assert_ne!(v, VERSION),
        Err(_) => assert!(data.len() >= 8),
    }
    if let Ok(f) = Fields::arbitrary_take_rest(Unstructured::new(data)) {
        structured(f);
    }
}

fn valid(s: &ConnSnapshot) -> bool {
    s.rx_cnt.wrapping_sub(s.fwd_cnt) <= s.buf_alloc
        && s.tx_cnt.wrapping_sub(s.peer_fwd_cnt) <= s.peer_buf_alloc
        && s.key.local.cid != s.key.peer.cid
}

fn structured(f: Fields) {
    let [buf_alloc, fwd_cnt, mut rx_cnt, peer_buf_alloc, peer_fwd_cnt, mut tx_cnt] = f.counters;
    if let Some(d) = f.unconsumed_offset {
        rx_cnt = fwd_cnt
            .wrapping_add(buf_alloc)
            .wrapping_add_signed(i32::from(d));
    }
    if let Some(d) = f.in_flight_offset {
        tx_cnt = peer_fwd_cnt
            .wrapping_add(peer_buf_alloc)
            .wrapping_add_signed(i32::from(d));
    }
    let s = ConnSnapshot {
        key: ConnKey {
            local: VsockAddr::new(Cid(f.local.0), Port(f.local.1)),
            peer: VsockAddr::new(Cid(f.peer.0), Port(f.peer.1)),
        },
        socket_type: if f.seqpacket {
            SocketType::SeqPacket
        } else {
            SocketType::Stream
        },
        local_shutdown: Shutdown::from_flags(u32::from(f.local_shutdown)),
        peer_shutdown: Shutdown::from_flags(u32::from(f.peer_shutdown)),
        buf_alloc,
        fwd_cnt,
        rx_cnt,
        peer_buf_alloc,
        peer_fwd_cnt,
        tx_cnt,
    };
    let bytes = s.encode();
    match ConnSnapshot::decode(&bytes) {
        Ok(back) => {
            assert!(valid(&s));
            assert_eq!(back, s);
        }
        Err(SnapshotError::Inconsistent(_)) => assert!(!valid(&s), "rejected {s:?}"),
        Err(e) => panic!("own encoding of {s:?} rejected: {e}"),
    }
    if let Some(cut) = f.cut {
        let n = usize::from(cut) % ENCODED_LEN;
        assert!(
            ConnSnapshot::decode(&bytes[..n]).is_err(),
            "cut to {n} bytes"
        );
        let mut longer = bytes.to_vec();
        longer.push(cut);
        assert!(ConnSnapshot::decode(&longer).is_err(), "one byte longer");
    }
}
