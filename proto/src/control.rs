//! Wire formats of domsockd's small text services, as pure codecs:
//!
//! - the **control service** a guest reaches at host CID 2, port [`CONTROL_PORT`], to learn
//!   its own identity and resolve domain names in its namespace without any configuration:
//!   one request line, one reply line, any number of times per connection;
//! - the **peer preamble**, the one line a host process accepting on an all-guests listener
//!   reads before the guest's first byte, naming who connected.
//!
//! ```text
//! guest -> RESOLVE db\n             host -> OK 7\n  |  ERR not-found\n
//! guest -> WHOAMI\n                 host -> OK name=web namespace=tenant-a cid=3\n
//! guest -> LIST\n                   host -> OK db=7 web=3\n
//! preamble:  DOMSOCK-PEER namespace=tenant-a name=web cid=3 port=1234\n
//! ```
//!
//! Names and namespaces are 1 to [`MAX_NAME_BYTES`] characters of `[A-Za-z0-9._-]`, so
//! every field is one whitespace-free token. Lines end with `\n` (a `\r` before it is
//! tolerated) and are at most [`MAX_LINE_BYTES`] long. What this module does not do: any
//! I/O, or deciding who may resolve what (that is the daemon's policy).

use crate::addr::{Cid, Port};
use std::fmt;
use thiserror::Error;

/// The control service's port on the host CID.
pub const CONTROL_PORT: Port = Port(1023);
/// Longest request or reply line, newline included.
pub const MAX_LINE_BYTES: usize = 256;
/// Longest reply line of `LIST` (a namespace can hold many domains).
pub const MAX_LIST_LINE_BYTES: usize = 64 * 1024;
/// Longest domain or namespace name.
pub const MAX_NAME_BYTES: usize = 64;
/// First token of the peer preamble.
pub const PREAMBLE_TAG: &str = "DOMSOCK-PEER";

/// Whether `s` is a valid domain or namespace name.
pub fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_NAME_BYTES
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// A malformed line.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum LineError {
    /// No newline within the allowed length.
    #[error("line longer than {0} bytes")]
    TooLong(usize),
    /// The line does not follow the grammar.
    #[error("malformed line {0:?}")]
    Malformed(String),
}

/// Splits off the first line of `buf`: `Ok(None)` needs more bytes; otherwise the line
/// (without `\r\n`) and the bytes it used.
pub fn split_line(buf: &[u8], max: usize) -> Result<Option<(&str, usize)>, LineError> {
    let Some(nl) = buf.iter().take(max).position(|&b| b == b'\n') else {
        return if buf.len() >= max {
            Err(LineError::TooLong(max))
        } else {
            Ok(None)
        };
    };
    let line = &buf[..nl];
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let text = std::str::from_utf8(line)
        .map_err(|_| LineError::Malformed(String::from_utf8_lossy(line).into_owned()))?;
    Ok(Some((text, nl + 1)))
}

/// A control request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// The CID of a domain of the caller's namespace.
    Resolve(String),
    /// The caller's own identity.
    WhoAmI,
    /// Every domain of the caller's namespace.
    List,
}

impl Request {
    /// Parses one request line (without its newline).
    pub fn parse(line: &str) -> Result<Request, LineError> {
        let malformed = || LineError::Malformed(line.to_string());
        let mut parts = line.split_ascii_whitespace();
        let req = match (parts.next(), parts.next()) {
            (Some(c), Some(name)) if c.eq_ignore_ascii_case("RESOLVE") && valid_name(name) => {
                Request::Resolve(name.to_string())
            }
            (Some(c), None) if c.eq_ignore_ascii_case("WHOAMI") => Request::WhoAmI,
            (Some(c), None) if c.eq_ignore_ascii_case("LIST") => Request::List,
            _ => return Err(malformed()),
        };
        if parts.next().is_some() {
            return Err(malformed());
        }
        Ok(req)
    }

    /// The request line, newline included.
    pub fn encode(&self) -> String {
        match self {
            Request::Resolve(n) => format!("RESOLVE {n}\n"),
            Request::WhoAmI => "WHOAMI\n".to_string(),
            Request::List => "LIST\n".to_string(),
        }
    }
}

/// A domain's identity as domsockd reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// Domain name.
    pub name: String,
    /// Namespace (tenant).
    pub namespace: String,
    /// Current CID.
    pub cid: Cid,
}

/// A control reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// `RESOLVE` found the name.
    Resolved(Cid),
    /// Answer to `WHOAMI`.
    Identity(Identity),
    /// Answer to `LIST`: names and CIDs.
    List(Vec<(String, Cid)>),
    /// The request failed; a token such as `not-found` or `bad-request`.
    Error(String),
}

impl Reply {
    /// The reply line, newline included.
    pub fn encode(&self) -> String {
        match self {
            Reply::Resolved(cid) => format!("OK {}\n", cid.0),
            Reply::Identity(id) => format!(
                "OK name={} namespace={} cid={}\n",
                id.name, id.namespace, id.cid.0
            ),
            Reply::List(items) => {
                let mut s = String::from("OK");
                for (n, c) in items {
                    s.push_str(&format!(" {n}={}", c.0));
                }
                s.push('\n');
                s
            }
            Reply::Error(why) => format!("ERR {why}\n"),
        }
    }

    /// Parses the reply line (without its newline) to `req`.
    pub fn parse(req: &Request, line: &str) -> Result<Reply, LineError> {
        let malformed = || LineError::Malformed(line.to_string());
        if let Some(rest) = line.strip_prefix("ERR") {
            let why = rest.trim();
            return Ok(Reply::Error(
                if why.is_empty() { "error" } else { why }.into(),
            ));
        }
        let rest = line.strip_prefix("OK").ok_or_else(malformed)?;
        if !(rest.is_empty() || rest.starts_with(' ')) {
            return Err(malformed());
        }
        let mut parts = rest.split_ascii_whitespace();
        match req {
            Request::Resolve(_) => {
                let cid = parts
                    .next()
                    .and_then(|c| c.parse().ok())
                    .ok_or_else(malformed)?;
                if parts.next().is_some() {
                    return Err(malformed());
                }
                Ok(Reply::Resolved(Cid(cid)))
            }
            Request::WhoAmI => {
                let fields =
                    Fields::parse(rest, &["name", "namespace", "cid"]).ok_or_else(malformed)?;
                Ok(Reply::Identity(Identity {
                    name: fields.0[0].clone(),
                    namespace: fields.0[1].clone(),
                    cid: Cid(fields.0[2].parse().map_err(|_| malformed())?),
                }))
            }
            Request::List => {
                let mut items = Vec::new();
                for p in parts {
                    let (n, c) = p.split_once('=').ok_or_else(malformed)?;
                    let c: u64 = c.parse().map_err(|_| malformed())?;
                    if !valid_name(n) {
                        return Err(malformed());
                    }
                    items.push((n.to_string(), Cid(c)));
                }
                Ok(Reply::List(items))
            }
        }
    }
}

/// `key=value` tokens in a fixed order, values validated as names or numbers by callers.
struct Fields(Vec<String>);

impl Fields {
    fn parse(text: &str, keys: &[&str]) -> Option<Fields> {
        let mut parts = text.split_ascii_whitespace();
        let mut values = Vec::with_capacity(keys.len());
        for key in keys {
            let (k, v) = parts.next()?.split_once('=')?;
            if k != *key || v.is_empty() {
                return None;
            }
            values.push(v.to_string());
        }
        if parts.next().is_some() {
            return None;
        }
        Some(Fields(values))
    }
}

/// Who connected, as a host process on an all-guests listener learns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerPreamble {
    /// The guest's identity.
    pub identity: Identity,
    /// The guest's source port.
    pub port: Port,
}

impl PeerPreamble {
    /// The preamble line, newline included.
    pub fn encode(&self) -> String {
        self.to_string()
    }

    /// Parses the preamble from the bytes read so far: `Ok(None)` needs more; otherwise
    /// the preamble and the bytes it used (what follows is the guest's data).
    pub fn parse(buf: &[u8]) -> Result<Option<(PeerPreamble, usize)>, LineError> {
        let Some((line, used)) = split_line(buf, MAX_LINE_BYTES)? else {
            return Ok(None);
        };
        let malformed = || LineError::Malformed(line.to_string());
        let rest = line
            .strip_prefix(PREAMBLE_TAG)
            .filter(|r| r.starts_with(' '))
            .ok_or_else(malformed)?;
        let f = Fields::parse(rest, &["namespace", "name", "cid", "port"]).ok_or_else(malformed)?;
        if !valid_name(&f.0[0]) || !valid_name(&f.0[1]) {
            return Err(malformed());
        }
        Ok(Some((
            PeerPreamble {
                identity: Identity {
                    namespace: f.0[0].clone(),
                    name: f.0[1].clone(),
                    cid: Cid(f.0[2].parse().map_err(|_| malformed())?),
                },
                port: Port(f.0[3].parse().map_err(|_| malformed())?),
            },
            used,
        )))
    }
}

impl fmt::Display for PeerPreamble {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{PREAMBLE_TAG} namespace={} name={} cid={} port={}",
            self.identity.namespace, self.identity.name, self.identity.cid.0, self.port.0
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> Identity {
        Identity {
            name: "web".into(),
            namespace: "tenant-a".into(),
            cid: Cid(3),
        }
    }

    #[test]
    fn requests_round_trip() {
        for r in [
            Request::Resolve("db-1.x".into()),
            Request::WhoAmI,
            Request::List,
        ] {
            let line = r.encode();
            let (text, used) = split_line(line.as_bytes(), MAX_LINE_BYTES)
                .unwrap()
                .unwrap();
            assert_eq!(used, line.len());
            assert_eq!(Request::parse(text).unwrap(), r);
        }
        assert_eq!(
            Request::parse("resolve db").unwrap(),
            Request::Resolve("db".into())
        );
        for bad in [
            "",
            "RESOLVE",
            "RESOLVE a b",
            "RESOLVE a/b",
            "WHOAMI x",
            "HELLO",
        ] {
            assert!(Request::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn replies_round_trip() {
        let cases = [
            (Request::Resolve("db".into()), Reply::Resolved(Cid(7))),
            (Request::WhoAmI, Reply::Identity(id())),
            (
                Request::List,
                Reply::List(vec![("db".into(), Cid(7)), ("web".into(), Cid(3))]),
            ),
            (Request::List, Reply::List(vec![])),
            (
                Request::Resolve("x".into()),
                Reply::Error("not-found".into()),
            ),
        ];
        for (req, rep) in cases {
            let line = rep.encode();
            let text = line.strip_suffix('\n').unwrap();
            assert_eq!(Reply::parse(&req, text).unwrap(), rep, "{line:?}");
        }
        assert!(Reply::parse(&Request::WhoAmI, "OK name=a cid=3").is_err());
        assert!(Reply::parse(&Request::Resolve("a".into()), "OKAY 3").is_err());
    }

    #[test]
    fn preamble_round_trip_and_partial_input() {
        let p = PeerPreamble {
            identity: id(),
            port: Port(49152),
        };
        let mut bytes = p.encode().into_bytes();
        assert_eq!(
            String::from_utf8_lossy(&bytes),
            "DOMSOCK-PEER namespace=tenant-a name=web cid=3 port=49152\n"
        );
        let line_len = bytes.len();
        bytes.extend_from_slice(b"payload");
        assert_eq!(PeerPreamble::parse(&bytes[..10]).unwrap(), None);
        let (got, used) = PeerPreamble::parse(&bytes).unwrap().unwrap();
        assert_eq!((got, used), (p, line_len));
        assert!(PeerPreamble::parse(b"DOMSOCK-PEERX namespace=a name=b cid=3 port=1\n").is_err());
        assert!(PeerPreamble::parse(b"DOMSOCK-PEER namespace=a name=b/c cid=3 port=1\n").is_err());
        assert!(PeerPreamble::parse(&[b'x'; MAX_LINE_BYTES]).is_err());
    }

    #[test]
    fn names() {
        assert!(valid_name("tenant-a.web_1"));
        assert!(!valid_name(""));
        assert!(!valid_name("a b"));
        assert!(!valid_name(&"x".repeat(MAX_NAME_BYTES + 1)));
    }
}
