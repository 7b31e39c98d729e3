//! Body of the `tunnel_wire` fuzz target: the tunnel frame codec on raw bytes.
//!
//! Invariants: [`decode`] never panics; a decoded frame re-encodes to exactly the bytes it
//! consumed (the codec is canonical), uses at most [`MAX_FRAME_LEN`] bytes, and every
//! shorter prefix of those bytes is `Ok(None)`; `Ok(None)` only ever comes for fewer
//! bytes than the frame its header declares; and the decoded frame's fields are within
//! the documented bounds. [`decode_data_start`] agrees with [`decode`]: the same fields
//! for a whole DATA frame, nothing for other kinds, a start only for a DATA frame whose
//! payload is not all there yet, and no error `decode` would not name as well.

use crate::tunnel::wire::{
    decode, decode_data_start, DataStart, Frame, DATA_PREFIX_LEN, HEADER_LEN, MAX_CHANNELS,
    MAX_DATA_LEN, MAX_FRAME_LEN, MAX_METADATA_LEN, MAX_REASON_TEXT_LEN,
};

/// Tunnel frame codec; see the module doc.
pub fn tunnel_wire(data: &[u8]) {
    let mut rest = data;
    // A stream of frames, as the endpoint reads them.
    while !rest.is_empty() {
        let start = decode_data_start(rest);
        match (&decode(rest), &start) {
            (
                Ok(Some((
                    Frame::Data {
                        channel,
                        offset,
                        eor,
                        bytes,
                    },
                    _,
                ))),
                _,
            ) => assert_eq!(
                start,
                Ok(Some(DataStart {
                    channel: *channel,
                    offset: *offset,
                    eor: *eor,
                    len: bytes.len(),
                }))
            ),
            (Ok(Some(_)), _) => assert_eq!(start, Ok(None), "a start for another kind"),
            (Ok(None), Ok(Some(ds))) => assert!(
                rest[0] == 5 && DATA_PREFIX_LEN + ds.len > rest.len(),
                "a start for a whole frame or another kind"
            ),
            (Ok(None), Err(e)) => panic!("decode needs more where the start says {e}"),
            (Err(e), Err(e2)) => assert_eq!(e, e2),
            _ => {}
        }
        match decode(rest) {
            Ok(Some((frame, used))) => {
                assert!((HEADER_LEN..=MAX_FRAME_LEN).contains(&used) && used <= rest.len());
                assert_eq!(frame.to_vec(), &rest[..used], "re-encoding differs");
                for cut in 0..used {
                    assert_eq!(decode(&rest[..cut]), Ok(None), "{frame:?} cut at {cut}");
                }
                match &frame {
                    Frame::Hello { resume, host, .. } => {
                        assert!(resume.len() <= MAX_CHANNELS && !host.is_empty())
                    }
                    Frame::Open { metadata, .. } => assert!(metadata.len() <= MAX_METADATA_LEN),
                    Frame::Refused { text, .. } => assert!(text.len() <= MAX_REASON_TEXT_LEN),
                    Frame::Data { bytes, .. } => {
                        assert!(!bytes.is_empty() && bytes.len() <= MAX_DATA_LEN)
                    }
                    _ => {}
                }
                rest = &rest[used..];
            }
            Ok(None) => {
                if rest.len() >= HEADER_LEN {
                    let len = u32::from_le_bytes([rest[8], rest[9], rest[10], rest[11]]);
                    assert!(
                        rest.len() < HEADER_LEN + len as usize,
                        "need-more with a whole frame"
                    );
                }
                break;
            }
            Err(_) => break,
        }
    }
}
