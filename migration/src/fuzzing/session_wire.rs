//! Body of the session handshake codec fuzz target: [`Frame`] on raw bytes and on
//! arbitrary fields, and the RESUME proof ([`ResumeClaim`]).

use crate::session::proof::ResumeClaim;
use crate::session::wire::{Closed, Frame, Refusal, WireError, MAX_FRAME_LEN, PREAMBLE_LEN};
use crate::session::{Nonce, Secret, SessionId, Tag};
use arbitrary::{Arbitrary, Unstructured};
use domsock_proto::{Cid, Port, SocketType};

const MAGIC: &[u8; 4] = b"DSSN";

/// Body length of each frame kind, read off the diagram in [`crate::session::wire`] (not
/// from the codec, so a layout change has to change both).
fn body_len(kind: u8) -> Option<usize> {
    Some(match kind {
        1 => 16,
        2 => 72,
        3 => 80,
        4 => 32,
        5 => 8,
        6 => 8,
        7 => 8,
        8 => 72,
        _ => return None,
    })
}

/// Whether a complete frame of `kind` has a reserved byte or bit set, per the diagram.
fn reserved_set(kind: u8, body: &[u8]) -> bool {
    let nonzero = |r: std::ops::Range<usize>| body[r].iter().any(|&b| b != 0);
    match kind {
        1 => nonzero(13..16),
        3 => body[40] & !0b11 != 0 || nonzero(41..48),
        4 => body[8] & !0b11 != 0 || nonzero(9..16),
        5 => nonzero(2..4),
        6 => nonzero(5..8),
        7 => nonzero(4..8),
        _ => false,
    }
}

const REFUSALS: [Refusal; 8] = [
    Refusal::UnknownSession,
    Refusal::BadProof,
    Refusal::Expired,
    Refusal::OutOfRange,
    Refusal::TargetRefused,
    Refusal::Unsupported,
    Refusal::TooMany,
    Refusal::Malformed,
];

#[derive(Debug, Arbitrary)]
enum FrameFields {
    Open {
        cid: u64,
        port: u32,
        seqpacket: bool,
    },
    Opened {
        id: [u8; 16],
        secret: [u8; 32],
        next_nonce: [u8; 16],
        window: u32,
        park_timeout_ms: u32,
    },
    Resume {
        id: [u8; 16],
        client_nonce: [u8; 16],
        received: u64,
        closed: (bool, bool),
        proof: [u8; 32],
    },
    Resumed {
        received: u64,
        closed: (bool, bool),
        next_nonce: [u8; 16],
    },
    Refused {
        reason: u8,
        errno: u32,
    },
    Listen {
        port: u32,
        seqpacket: bool,
    },
    Listening {
        port: u32,
    },
    Offered {
        id: [u8; 16],
        secret: [u8; 32],
        next_nonce: [u8; 16],
        window: u32,
        park_timeout_ms: u32,
    },
}

#[derive(Debug, Arbitrary)]
struct ClaimFields {
    id: [u8; 16],
    server_nonce: [u8; 16],
    client_nonce: [u8; 16],
    received: u64,
    closed: (bool, bool),
    secret: [u8; 32],
    /// Picks the bit flipped in each covered field.
    flip: u16,
}

#[derive(Debug, Arbitrary)]
struct Fields {
    frame: FrameFields,
    claim: ClaimFields,
    /// Bytes after the frame (application data on the real stream).
    trailing: Vec<u8>,
}

/// Session handshake codec and resume proof.
///
/// Raw bytes into [`Frame::decode`]: it never panics; a decoded frame re-encodes to exactly
/// the bytes it consumed, and every shorter prefix of them is `Ok(None)`; `Ok(None)` is
/// only ever a prefix of a frame the preamble allows; every error describes the input
/// (the magic seen, the version, the kind, the lengths) and a field error is reported only
/// once the whole frame is there. The same bytes read as frame fields: every frame encodes
/// to its kind's length, decodes back to itself whatever follows it, and needs all its
/// bytes. And as a claim: a claim proved with a secret verifies, also after crossing the
/// wire in a RESUME; flipping one bit of the session id, either nonce, the received
/// count, any shutdown bit, the secret or the tag makes it fail.
pub fn session_wire(data: &[u8]) {
    raw(data);
    if let Ok(f) = Fields::arbitrary_take_rest(Unstructured::new(data)) {
        structured(&f);
        proof(&f.claim);
    }
}

fn raw(data: &[u8]) {
    match Frame::decode(data) {
        Ok(Some((frame, used))) => {
            assert!((PREAMBLE_LEN..=MAX_FRAME_LEN).contains(&used) && used <= data.len());
            assert_eq!(frame.encode(), &data[..used], "re-encoding differs");
            for cut in 0..used {
                assert_eq!(
                    Frame::decode(&data[..cut]),
                    Ok(None),
                    "{frame:?} cut at {cut}"
                );
            }
        }
        Ok(None) => {
            let n = data.len().min(MAGIC.len());
            assert_eq!(data[..n], MAGIC[..n], "need-more on a wrong magic");
            if data.len() >= PREAMBLE_LEN {
                assert_eq!(data[4], 1, "need-more on another version");
                let len = body_len(data[5]).expect("need-more on an unknown kind");
                assert_eq!(usize::from(u16::from_le_bytes([data[6], data[7]])), len);
                assert!(
                    data.len() < PREAMBLE_LEN + len,
                    "need-more with the whole frame"
                );
            }
        }
        Err(e) => {
            let whole = |kind: u8| {
                let len = body_len(kind).expect("a known kind");
                assert!(
                    data.len() >= PREAMBLE_LEN + len,
                    "{e} before the whole frame"
                );
                &data[PREAMBLE_LEN..PREAMBLE_LEN + len]
            };
            match e {
                WireError::BadMagic(m) => {
                    let n = data.len().min(MAGIC.len());
                    assert_ne!(data[..n], MAGIC[..n]);
                    assert_eq!(m[..n], data[..n]);
                    assert!(m[n..].iter().all(|&b| b == 0));
                }
                WireError::UnsupportedVersion(v) => {
                    assert!(data.len() >= PREAMBLE_LEN && data[..4] == *MAGIC);
                    assert!(v != 1 && data[4] == v);
                }
                WireError::UnknownKind(k) => {
                    assert!(data.len() >= PREAMBLE_LEN && data[4] == 1);
                    assert!(data[5] == k && body_len(k).is_none());
                }
                WireError::BadLength {
                    kind,
                    len,
                    expected,
                } => {
                    assert!(data.len() >= PREAMBLE_LEN && data[5] == kind);
                    assert_eq!(len, u16::from_le_bytes([data[6], data[7]]));
                    assert_eq!(Some(usize::from(expected)), body_len(kind));
                    assert_ne!(len, expected);
                }
                WireError::Reserved => assert!(reserved_set(data[5], whole(data[5]))),
                WireError::BadValue { field, value } => {
                    let body = whole(data[5]);
                    assert!(
                        !reserved_set(data[5], body),
                        "reserved bits are checked first"
                    );
                    match (data[5], field) {
                        (kind @ (1 | 6), "socket type") => {
                            let at = if kind == 1 { 12 } else { 4 };
                            assert_eq!(value, u32::from(body[at]));
                            assert!(!(1..=2).contains(&value));
                        }
                        (5, "refusal reason") => {
                            assert_eq!(value, u32::from(u16::from_le_bytes([body[0], body[1]])));
                            assert!(!(1..=8).contains(&value));
                        }
                        other => panic!("unexpected bad value {other:?} = {value}"),
                    }
                }
            }
        }
    }
}

fn socket_type(seqpacket: bool) -> SocketType {
    if seqpacket {
        SocketType::SeqPacket
    } else {
        SocketType::Stream
    }
}

fn closed((send, rcv): (bool, bool)) -> Closed {
    Closed { send, rcv }
}

fn frame_of(f: &FrameFields) -> Frame {
    match *f {
        FrameFields::Open {
            cid,
            port,
            seqpacket,
        } => Frame::Open {
            cid: Cid(cid),
            port: Port(port),
            socket_type: socket_type(seqpacket),
        },
        FrameFields::Opened {
            id,
            secret,
            next_nonce,
            window,
            park_timeout_ms,
        } => Frame::Opened {
            id: SessionId(id),
            secret: Secret(secret),
            next_nonce: Nonce(next_nonce),
            window,
            park_timeout_ms,
        },
        FrameFields::Resume {
            id,
            client_nonce,
            received,
            closed: c,
            proof,
        } => Frame::Resume {
            id: SessionId(id),
            client_nonce: Nonce(client_nonce),
            received,
            closed: closed(c),
            proof: Tag(proof),
        },
        FrameFields::Resumed {
            received,
            closed: c,
            next_nonce,
        } => Frame::Resumed {
            received,
            closed: closed(c),
            next_nonce: Nonce(next_nonce),
        },
        FrameFields::Refused { reason, errno } => Frame::Refused {
            reason: REFUSALS[usize::from(reason) % REFUSALS.len()],
            errno,
        },
        FrameFields::Listen { port, seqpacket } => Frame::Listen {
            port: Port(port),
            socket_type: socket_type(seqpacket),
        },
        FrameFields::Listening { port } => Frame::Listening { port: Port(port) },
        FrameFields::Offered {
            id,
            secret,
            next_nonce,
            window,
            park_timeout_ms,
        } => Frame::Offered {
            id: SessionId(id),
            secret: Secret(secret),
            next_nonce: Nonce(next_nonce),
            window,
            park_timeout_ms,
        },
    }
}

fn structured(f: &Fields) {
    let frame = frame_of(&f.frame);
    let bytes = frame.encode();
    assert_eq!(bytes[..4], *MAGIC);
    assert_eq!(Some(bytes.len() - PREAMBLE_LEN), body_len(bytes[5]));
    assert!(bytes.len() <= MAX_FRAME_LEN);
    for cut in 0..bytes.len() {
        assert_eq!(
            Frame::decode(&bytes[..cut]),
            Ok(None),
            "{frame:?} cut at {cut}"
        );
    }
    let mut stream = bytes.clone();
    stream.extend_from_slice(&f.trailing);
    assert_eq!(
        Frame::decode(&stream),
        Ok(Some((frame.clone(), bytes.len()))),
        "{frame:?} followed by {} bytes",
        f.trailing.len()
    );
}

fn flip_bit<const N: usize>(mut b: [u8; N], bit: u16) -> [u8; N] {
    let bit = usize::from(bit) % (N * 8);
    b[bit / 8] ^= 1 << (bit % 8);
    b
}

fn proof(c: &ClaimFields) {
    let claim = ResumeClaim {
        id: SessionId(c.id),
        server_nonce: Nonce(c.server_nonce),
        client_nonce: Nonce(c.client_nonce),
        received: c.received,
        closed: closed(c.closed),
    };
    let secret = Secret(c.secret);
    let tag = claim.prove(&secret);
    assert!(claim.verify(&secret, &tag), "a proof does not verify");

    // Through the wire, as the daemon sees it.
    let resume = Frame::Resume {
        id: claim.id,
        client_nonce: claim.client_nonce,
        received: claim.received,
        closed: claim.closed,
        proof: tag,
    };
    let Ok(Some((
        Frame::Resume {
            id,
            client_nonce,
            received,
            closed: on_wire,
            proof,
        },
        _,
    ))) = Frame::decode(&resume.encode())
    else {
        panic!("a RESUME does not decode");
    };
    let seen = ResumeClaim {
        id,
        server_nonce: claim.server_nonce,
        client_nonce,
        received,
        closed: on_wire,
    };
    assert!(
        seen.verify(&secret, &proof),
        "a proof does not survive the wire"
    );

    let bit = c.flip;
    let mut tampered = Vec::new();
    let mut t = claim;
    t.id = SessionId(flip_bit(c.id, bit));
    tampered.push(("session id", t));
    let mut t = claim;
    t.server_nonce = Nonce(flip_bit(c.server_nonce, bit));
    tampered.push(("server nonce", t));
    let mut t = claim;
    t.client_nonce = Nonce(flip_bit(c.client_nonce, bit));
    tampered.push(("client nonce", t));
    let mut t = claim;
    t.received ^= 1 << (bit % 64);
    tampered.push(("received", t));
    for (send, rcv) in [(true, false), (false, true), (true, true)] {
        let mut t = claim;
        t.closed.send ^= send;
        t.closed.rcv ^= rcv;
        tampered.push(("shutdown bits", t));
    }
    for (field, t) in tampered {
        assert!(!t.verify(&secret, &tag), "the {field} is not covered");
    }
    assert!(
        !claim.verify(&Secret(flip_bit(c.secret, bit)), &tag),
        "another secret verifies"
    );
    assert!(
        !claim.verify(&secret, &Tag(flip_bit(tag.0, bit))),
        "a changed tag verifies"
    );
}
