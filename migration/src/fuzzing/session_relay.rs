//! Body of the session relay codec fuzz target.

use crate::relay::{self, Frame, RelayOpen, FRAME_HEADER_LEN};
use crate::session::snapshot::SNAPSHOT_HEADER_LEN;

/// The tail limit the target decodes snapshots with (small, so the limit is often hit).
const LIMIT: usize = 4096;

/// Session relay codec (`migration/src/relay.rs`): what a peer host sends in a relay
/// channel's OPEN metadata and frames.
///
/// The first byte picks the part: even, the bytes after it are OPEN metadata; odd, a
/// stream of frames. Never panics; accepted metadata re-encodes to exactly the input;
/// every frame header accepted is bounded by its kind's limit before its payload is read,
/// and every frame decoded re-encodes to exactly its bytes (DATA, IMPORTED, FAILED with
/// valid UTF-8, SNAPSHOT and HANDOFF alike); [`relay::data_payloads`] returns only whole
/// DATA payloads of the input, in order.
pub fn session_relay(data: &[u8]) {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    if pick % 2 == 0 {
        if let Ok(m) = RelayOpen::decode(rest) {
            assert_eq!(m.encode(), rest, "metadata re-encoding differs");
            assert!(relay::valid_name(&m.domain) && relay::valid_name(&m.namespace));
            if let Some(
                relay::RelayTarget::Dialed { domain, .. }
                | relay::RelayTarget::Accepted { domain, .. },
            ) = &m.target
            {
                assert!(relay::valid_name(domain));
            }
        }
        if let Ok(j) = relay::JoinOpen::decode(rest) {
            assert_eq!(j.encode(), rest, "join request re-encoding differs");
            assert_ne!(j.dialer, j.acceptor);
        }
        return;
    }
    let mut buf = rest;
    while let Ok(Some(h)) = relay::parse_header(buf, LIMIT) {
        // The largest kind (HANDOFF): host name, pending bytes and a snapshot whose tail
        // and message ends are within the limit.
        let snapshot = SNAPSHOT_HEADER_LEN + LIMIT + 8 * (LIMIT + 1);
        assert!(h.len <= 8 + 1 + relay::MAX_NAME + 4 + relay::MAX_PENDING + snapshot);
        if buf.len() < h.frame_len() {
            break;
        }
        let bytes = &buf[..h.frame_len()];
        if let Ok(f) = relay::decode(h, &bytes[FRAME_HEADER_LEN..], LIMIT) {
            let lossy = matches!(&f, Frame::Failed(_))
                && std::str::from_utf8(&bytes[FRAME_HEADER_LEN..]).is_err();
            if !lossy {
                let mut out = Vec::new();
                f.encode(&mut out);
                assert_eq!(out, bytes, "frame re-encoding differs");
            }
        }
        buf = &buf[h.frame_len()..];
    }
    let total: usize = relay::data_payloads(rest).iter().map(|p| p.len()).sum();
    assert!(total <= rest.len());
}
