//! Fuzz bodies of the pure codecs: the packet header, the hybrid `CONNECT` line, the
//! control service and the peer preamble.

use crate::addr::{Cid, Port};
use crate::control::{
    split_line, valid_name, Identity, LineError, PeerPreamble, Reply, Request, MAX_LINE_BYTES,
    MAX_LIST_LINE_BYTES, MAX_NAME_BYTES,
};
use crate::hybrid::{ok_line, parse_connect_line, ConnectLineError, MAX_CONNECT_LINE_BYTES};
use crate::packet::{Header, HeaderError, Op, RawHeader, HEADER_LEN};
use arbitrary::{Arbitrary, Unstructured};

/// Header codec. Input: 4 bytes of `max_payload`, then header bytes (zero-padded to 44).
///
/// Checks: `RawHeader` decode/encode is the identity on 44 bytes; `Header::parse` accepts
/// exactly the known types and operations, a payload only on `RW` and only up to
/// `max_payload`; what it accepts converts back to the same raw header and bytes;
/// `rst_reply` swaps the addresses, carries no payload and parses again; `receiver_key` of
/// the reply is the original sender's view.
pub fn header(data: &[u8]) {
    let (max_bytes, rest) = data.split_at(data.len().min(4));
    let mut max = [0u8; 4];
    max[..max_bytes.len()].copy_from_slice(max_bytes);
    let max_payload = u32::from_le_bytes(max);
    let mut bytes = [0u8; HEADER_LEN];
    let n = rest.len().min(HEADER_LEN);
    bytes[..n].copy_from_slice(&rest[..n]);

    let raw = RawHeader::decode(&bytes);
    assert_eq!(raw.encode(), bytes, "RawHeader round trip");

    match Header::parse(&raw, max_payload) {
        Ok(h) => {
            assert!(
                matches!(raw.type_(), 1 | 2),
                "accepted type {}",
                raw.type_()
            );
            assert!((1..=7).contains(&raw.op()), "accepted op {}", raw.op());
            if h.op() == Op::Rw {
                assert!(h.len() <= max_payload);
            } else {
                assert_eq!(h.len(), 0, "{:?} with payload accepted", h.op());
            }
            assert_eq!(h.to_raw(), raw);
            assert_eq!(h.encode(), bytes);
            let rst = h.rst_reply();
            assert_eq!((rst.src(), rst.dst()), (h.dst(), h.src()));
            assert_eq!((rst.op(), rst.len()), (Op::Rst, 0));
            assert_eq!(Header::parse(&rst.to_raw(), 0), Ok(rst));
            assert_eq!(rst.receiver_key().local, h.src());
            assert_eq!(h.receiver_key().local, h.dst());
        }
        Err(HeaderError::BadType(t)) => {
            assert_eq!(t, raw.type_());
            assert!(!matches!(t, 1 | 2));
        }
        Err(HeaderError::BadOp(op)) => {
            assert_eq!(op, raw.op());
            assert!(!(1..=7).contains(&op));
        }
        Err(HeaderError::UnexpectedPayload { op, len }) => {
            assert_ne!(op, Op::Rw);
            assert_eq!(op.to_wire(), raw.op());
            assert!(len != 0 && len == raw.len());
        }
        Err(HeaderError::PayloadTooLong { len, max }) => {
            assert_eq!(raw.op(), Op::Rw.to_wire());
            assert!(len > max && len == raw.len() && max == max_payload);
        }
    }
}

/// Hybrid `CONNECT` line parser, on the raw bytes a host process sent.
///
/// Checks: "need more" only without a newline and below the limit; an accepted line ends
/// at its newline within the limit, is `CONNECT <digits>` (any case, optional `\r`), and
/// parses the same from the line alone and from its canonical form; every error is either
/// a too-long line or a line that really is not `CONNECT <u32>`; `ok_line` is one line.
pub fn hybrid(data: &[u8]) {
    let newline = data.iter().position(|&b| b == b'\n');
    match parse_connect_line(data) {
        Ok(None) => {
            assert!(newline.is_none());
            assert!(data.len() < MAX_CONNECT_LINE_BYTES);
        }
        Ok(Some((port, used))) => {
            assert_eq!(Some(used - 1), newline);
            assert!(used <= MAX_CONNECT_LINE_BYTES);
            let line = &data[..used - 1];
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            let text = std::str::from_utf8(line).expect("an accepted line is ASCII");
            let mut words = text.split_ascii_whitespace();
            assert!(words
                .next()
                .is_some_and(|w| w.eq_ignore_ascii_case("CONNECT")));
            let digits = words.next().expect("an accepted line has a port");
            assert!(digits.bytes().all(|b| b.is_ascii_digit()));
            assert_eq!(digits.parse::<u32>(), Ok(port.0));
            assert_eq!(words.next(), None);
            assert_eq!(parse_connect_line(&data[..used]), Ok(Some((port, used))));
            let canonical = format!("CONNECT {}\n", port.0);
            assert_eq!(
                parse_connect_line(canonical.as_bytes()),
                Ok(Some((port, canonical.len())))
            );
            let ok = ok_line(port);
            assert_eq!(ok.matches('\n').count(), 1);
            assert!(ok.ends_with('\n'));
        }
        Err(ConnectLineError::TooLong) => {
            assert!(newline.map_or(data.len(), |nl| nl) >= MAX_CONNECT_LINE_BYTES);
        }
        Err(ConnectLineError::Malformed(_)) => {
            let nl = newline.expect("malformed needs a complete line");
            assert!(nl < MAX_CONNECT_LINE_BYTES);
            let line = &data[..nl];
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            let text = String::from_utf8_lossy(line);
            let mut words = text.split_ascii_whitespace();
            let well_formed = words
                .next()
                .is_some_and(|w| w.eq_ignore_ascii_case("CONNECT"))
                && words.next().is_some_and(|p| {
                    p.bytes().all(|b| b.is_ascii_digit()) && p.parse::<u32>().is_ok()
                })
                && words.next().is_none();
            assert!(!well_formed, "rejected a well-formed line {text:?}");
        }
    }
}

/// Characters a domain or namespace name may use (`control::valid_name`).
const NAME_CHARS: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-";

/// A valid name built from fuzz bytes (1 to `MAX_NAME_BYTES` characters).
#[derive(Debug)]
struct Name(String);

impl<'a> Arbitrary<'a> for Name {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        let len = u.int_in_range(1..=MAX_NAME_BYTES)?;
        let mut s = String::with_capacity(len);
        for _ in 0..len {
            s.push(char::from(*u.choose(NAME_CHARS)?));
        }
        Ok(Name(s))
    }
}

#[derive(Debug, Arbitrary)]
enum StructuredRequest {
    Resolve(Name),
    WhoAmI,
    List,
}

#[derive(Debug, Arbitrary)]
struct StructuredControl {
    request: StructuredRequest,
    cid: u64,
    identity: (Name, Name),
    list: Vec<(Name, u64)>,
    error: Option<Name>,
    port: u32,
}

/// Control service and peer preamble codecs.
///
/// On the raw bytes: `split_line` only asks for more without a newline below its limit and
/// returns a line without `\n`; whatever `Request::parse`, `Reply::parse` (for each kind
/// of request) and `PeerPreamble::parse` accept re-encodes to a line that parses to the
/// same value (their encoders produce the canonical form), within the line limits.
/// On the same bytes read as structured values with valid names: every request, reply and
/// preamble round-trips through encode, `split_line` and parse.
pub fn control(data: &[u8]) {
    raw_control(data);
    if let Ok(s) = StructuredControl::arbitrary_take_rest(Unstructured::new(data)) {
        structured_control(s);
    }
}

fn reparse_line(line: &str, max: usize) -> &str {
    let (text, used) = split_line(line.as_bytes(), max)
        .unwrap_or_else(|e| panic!("encoded line {line:?} does not split: {e}"))
        .unwrap_or_else(|| panic!("encoded line {line:?} is incomplete"));
    assert_eq!(used, line.len(), "encoded line {line:?} is not one line");
    text
}

fn raw_control(data: &[u8]) {
    let window = &data[..data.len().min(MAX_LINE_BYTES)];
    match split_line(data, MAX_LINE_BYTES) {
        Ok(None) => {
            assert!(!window.contains(&b'\n'));
            assert!(data.len() < MAX_LINE_BYTES);
        }
        Err(LineError::TooLong(max)) => {
            assert_eq!(max, MAX_LINE_BYTES);
            assert!(!window.contains(&b'\n') && data.len() >= MAX_LINE_BYTES);
        }
        Err(LineError::Malformed(_)) => {
            let nl = window
                .iter()
                .position(|&b| b == b'\n')
                .expect("a whole line");
            assert!(std::str::from_utf8(&data[..nl]).is_err());
        }
        Ok(Some((line, used))) => {
            assert!(used <= MAX_LINE_BYTES && data[used - 1] == b'\n');
            assert!(!line.contains('\n'));
            if let Ok(req) = Request::parse(line) {
                let encoded = req.encode();
                assert!(encoded.len() <= MAX_LINE_BYTES);
                assert_eq!(
                    Request::parse(reparse_line(&encoded, MAX_LINE_BYTES)),
                    Ok(req)
                );
            }
            for req in [Request::Resolve("x".into()), Request::WhoAmI, Request::List] {
                if let Ok(reply) = Reply::parse(&req, line) {
                    let encoded = reply.encode();
                    assert_eq!(
                        Reply::parse(&req, reparse_line(&encoded, MAX_LIST_LINE_BYTES)),
                        Ok(reply),
                        "reply to {req:?} from {line:?}"
                    );
                }
            }
        }
    }
    match PeerPreamble::parse(data) {
        Ok(Some((p, used))) => {
            assert!(used <= MAX_LINE_BYTES && data[used - 1] == b'\n');
            assert!(valid_name(&p.identity.name) && valid_name(&p.identity.namespace));
            let encoded = p.encode();
            assert_eq!(
                PeerPreamble::parse(encoded.as_bytes()),
                Ok(Some((p, encoded.len())))
            );
        }
        Ok(None) => assert!(!window.contains(&b'\n')),
        Err(_) => {}
    }
}

fn structured_control(s: StructuredControl) {
    let req = match s.request {
        StructuredRequest::Resolve(n) => Request::Resolve(n.0),
        StructuredRequest::WhoAmI => Request::WhoAmI,
        StructuredRequest::List => Request::List,
    };
    let encoded = req.encode();
    assert!(encoded.len() <= MAX_LINE_BYTES);
    assert_eq!(
        Request::parse(reparse_line(&encoded, MAX_LINE_BYTES)).as_ref(),
        Ok(&req)
    );

    let identity = Identity {
        name: s.identity.0 .0,
        namespace: s.identity.1 .0,
        cid: Cid(s.cid),
    };
    let reply = match (&s.error, &req) {
        (Some(why), _) => Reply::Error(why.0.clone()),
        (None, Request::Resolve(_)) => Reply::Resolved(Cid(s.cid)),
        (None, Request::WhoAmI) => Reply::Identity(identity.clone()),
        (None, Request::List) => {
            Reply::List(s.list.into_iter().map(|(n, c)| (n.0, Cid(c))).collect())
        }
    };
    let encoded = reply.encode();
    if encoded.len() <= MAX_LIST_LINE_BYTES {
        assert_eq!(
            Reply::parse(&req, reparse_line(&encoded, MAX_LIST_LINE_BYTES)),
            Ok(reply)
        );
    }

    let preamble = PeerPreamble {
        identity,
        port: Port(s.port),
    };
    let encoded = preamble.encode();
    assert!(encoded.len() <= MAX_LINE_BYTES);
    let mut stream = encoded.clone().into_bytes();
    stream.extend_from_slice(b"guest data\n");
    assert_eq!(
        PeerPreamble::parse(&stream),
        Ok(Some((preamble, encoded.len())))
    );
    for cut in [0, encoded.len() / 2, encoded.len() - 1] {
        assert_eq!(
            PeerPreamble::parse(&stream[..cut]),
            Ok(None),
            "cut at {cut}"
        );
    }
}
