//! Body of the session snapshot codec fuzz target.

use crate::session::snapshot::{SessionSnapshot, SnapshotError, SNAPSHOT_HEADER_LEN};
use domsock_proto::SocketType;

/// The tail limit the target decodes with (small, so the limit is often hit).
const LIMIT: usize = 4096;

/// Session snapshot codec.
///
/// Raw bytes: `decode` never panics; whatever it accepts re-encodes to exactly the input,
/// keeps its tail within the limit, and has message ends that are increasing and inside
/// the tail (ending at its end on seqpacket); a `Truncated` error names the real length
/// and needs more than it, `Trailing` the real excess, `TooLarge` a tail above the limit.
pub fn session_snapshot(data: &[u8]) {
    match SessionSnapshot::decode(data, LIMIT) {
        Ok(s) => {
            assert!(s.tail.len() <= LIMIT);
            assert_eq!(s.encode(), data, "re-encoding differs");
            let end = s.tail_start + s.tail.len() as u64;
            assert!(s.message_ends.windows(2).all(|w| w[0] < w[1]));
            assert!(s
                .message_ends
                .iter()
                .all(|&e| e >= s.tail_start && e <= end));
            if s.socket_type == SocketType::Stream {
                assert!(s.message_ends.is_empty() && s.messages_acked == 0);
            } else if !s.tail.is_empty() {
                assert_eq!(s.message_ends.last(), Some(&end));
            }
        }
        Err(SnapshotError::Truncated { have, need }) => {
            assert_eq!(have, data.len());
            assert!(have < need);
        }
        Err(SnapshotError::Trailing(n)) => assert!(n > 0 && n < data.len()),
        Err(SnapshotError::TooLarge { len, limit }) => assert!(len > limit && limit == LIMIT),
        Err(_) => assert!(data.len() >= SNAPSHOT_HEADER_LEN),
    }
}
