//! Guest-side client of domsockd's control service: who am I, and which CID has the domain
//! called `name` in my namespace.
//!
//! The service listens on the host CID ([`VMADDR_CID_HOST`]), port [`CONTROL_PORT`], and
//! needs no guest configuration. Requests and replies are lines whose grammar (and the
//! sans-IO codec) lives in [`domsock_proto::control`]; this module only moves them over a
//! byte stream, one request and one reply at a time, any number of requests per connection:
//!
//! ```text
//! guest                                   domsockd
//!   | connect(CID 2, port 1023)              |
//!   | RESOLVE db\n ------------------------> |
//!   | <------------------------------ OK 7\n |
//!   | connect(CID 7, port P) ...             |
//! ```
//!
//! [`ControlClient`] is generic over any `Read + Write` stream so the framing can be tested
//! without vsock; [`ControlClient::connect`] opens the real AF_VSOCK connection and must only
//! run inside a guest. What this module does not do: cache answers (a CID can change when a
//! domain is recreated), retry, or decide anything about policy: a name that resolves may still
//! be refused at connect time.

use std::io::{self, Read, Write};
use std::time::Duration;

use domsock_proto::addr::Cid;
use domsock_proto::control::{
    split_line, Identity, LineError, Reply, Request, CONTROL_PORT, MAX_LINE_BYTES,
    MAX_LIST_LINE_BYTES,
};
use thiserror::Error;

use crate::vsock::{SockType, VsockAddr, VsockSocket, VMADDR_CID_HOST};

/// The token domsockd answers `RESOLVE` with when the name is unknown in the caller's
/// namespace (names of other namespaces are never visible, so they look the same).
pub const NOT_FOUND: &str = "not-found";
/// Bytes read from the stream per `read` call while waiting for a reply line.
const READ_CHUNK_BYTES: usize = 4096;

/// Why a control request failed.
#[derive(Debug, Error)]
pub enum ControlError {
    /// The control service could not be reached.
    #[error("cannot connect to the control service at {addr}")]
    Connect {
        /// Host CID and control port.
        addr: VsockAddr,
        /// Cause (its errno says whether anything listens there).
        #[source]
        source: io::Error,
    },
    /// Reading or writing the control connection failed.
    #[error("control connection I/O failed after {sent} request(s)")]
    Io {
        /// Requests sent on this connection before the failure, this one included.
        sent: u64,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The service closed the connection before a whole reply line arrived.
    #[error("control service closed the connection with {pending} bytes of an unfinished reply")]
    Closed {
        /// Bytes of the unfinished line.
        pending: usize,
    },
    /// The reply line is not valid for the request.
    #[error("malformed reply to {request:?}")]
    BadReply {
        /// The request line, without its newline.
        request: String,
        /// Cause.
        #[source]
        source: LineError,
    },
    /// The service answered `ERR <reason>` where that is not an expected outcome.
    #[error("control service refused {request:?}: {reason}")]
    Refused {
        /// The request line, without its newline.
        request: String,
        /// The reason token.
        reason: String,
    },
    /// The name is not a domain of the caller's namespace.
    #[error("no domain named {0:?} in this namespace")]
    NotFound(String),
    /// A CID in a reply is not a guest CID a vsock address can hold.
    #[error("control service returned CID {0}, which is not a guest CID")]
    BadCid(u64),
    /// The name resolved, but connecting to it failed.
    #[error("connect to {name:?} at {addr}")]
    ConnectPeer {
        /// The name asked for.
        name: String,
        /// Where it resolved to.
        addr: VsockAddr,
        /// Cause (ECONNRESET when policy denies the connection).
        #[source]
        source: io::Error,
    },
}

impl ControlError {
    /// The OS error behind this failure, if any (for errno reporting).
    pub fn os_error(&self) -> Option<&io::Error> {
        match self {
            ControlError::Connect { source, .. }
            | ControlError::Io { source, .. }
            | ControlError::ConnectPeer { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// A client on one control connection.
#[derive(Debug)]
pub struct ControlClient<S> {
    stream: S,
    /// Bytes read but not yet consumed as a reply line.
    inbox: Vec<u8>,
    sent: u64,
}

/// The AF_VSOCK stream a [`ControlClient`] uses inside a guest.
#[derive(Debug)]
pub struct ControlStream(VsockSocket);

impl Read for ControlStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.recv(buf)
    }
}

impl Write for ControlStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.send(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The control service's address.
pub fn service_addr() -> VsockAddr {
    VsockAddr::new(VMADDR_CID_HOST, CONTROL_PORT.0)
}

impl ControlClient<ControlStream> {
    /// Connects to the control service; `timeout` bounds the connect and every later read
    /// and write.
    pub fn connect(timeout: Duration) -> Result<Self, ControlError> {
        let addr = service_addr();
        let connect_err = |source| ControlError::Connect { addr, source };
        let sock = VsockSocket::connect(SockType::Stream, addr, timeout).map_err(connect_err)?;
        sock.set_read_timeout(timeout).map_err(connect_err)?;
        sock.set_write_timeout(timeout).map_err(connect_err)?;
        Ok(Self::new(ControlStream(sock)))
    }
}

impl<S: Read + Write> ControlClient<S> {
    /// A client over an already connected stream.
    pub fn new(stream: S) -> Self {
        Self {
            stream,
            inbox: Vec::new(),
            sent: 0,
        }
    }

    /// Sends `req` and waits for its reply line. `ERR` replies come back as
    /// [`Reply::Error`]; only transport and framing problems are errors here.
    pub fn request(&mut self, req: &Request) -> Result<Reply, ControlError> {
        let line = req.encode();
        self.sent += 1;
        let sent = self.sent;
        self.stream
            .write_all(line.as_bytes())
            .map_err(|source| ControlError::Io { sent, source })?;
        let max = match req {
            Request::List => MAX_LIST_LINE_BYTES,
            Request::Resolve(_) | Request::WhoAmI => MAX_LINE_BYTES,
        };
        let bad = |source| ControlError::BadReply {
            request: line.trim_end().to_owned(),
            source,
        };
        loop {
            if let Some((text, used)) = split_line(&self.inbox, max).map_err(bad)? {
                let reply = Reply::parse(req, text).map_err(bad)?;
                self.inbox.drain(..used);
                return Ok(reply);
            }
            let start = self.inbox.len();
            self.inbox.resize(start + READ_CHUNK_BYTES, 0);
            let read = loop {
                match self.stream.read(&mut self.inbox[start..]) {
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    other => break other,
                }
            };
            let n = read.map_err(|source| ControlError::Io { sent, source });
            self.inbox.truncate(start + *n.as_ref().unwrap_or(&0));
            if n? == 0 {
                return Err(ControlError::Closed { pending: start });
            }
        }
    }

    /// The CID of the domain `name` of the caller's namespace.
    pub fn resolve(&mut self, name: &str) -> Result<Cid, ControlError> {
        let req = Request::Resolve(name.to_owned());
        match self.request(&req)? {
            Reply::Resolved(cid) => Ok(cid),
            Reply::Error(reason) if reason == NOT_FOUND => {
                Err(ControlError::NotFound(name.to_owned()))
            }
            other => Err(unexpected(&req, other)),
        }
    }

    /// The caller's own name, namespace and CID.
    pub fn whoami(&mut self) -> Result<Identity, ControlError> {
        let req = Request::WhoAmI;
        match self.request(&req)? {
            Reply::Identity(id) => Ok(id),
            other => Err(unexpected(&req, other)),
        }
    }

    /// Every domain of the caller's namespace (itself included), sorted by name.
    pub fn list(&mut self) -> Result<Vec<(String, Cid)>, ControlError> {
        let req = Request::List;
        match self.request(&req)? {
            Reply::List(items) => Ok(items),
            other => Err(unexpected(&req, other)),
        }
    }

    /// The underlying stream.
    pub fn into_inner(self) -> S {
        self.stream
    }
}

/// `Reply::parse` only yields reply kinds that fit the request, so anything else is `ERR`.
fn unexpected(req: &Request, reply: Reply) -> ControlError {
    let request = req.encode().trim_end().to_owned();
    match reply {
        Reply::Error(reason) => ControlError::Refused { request, reason },
        other => ControlError::Refused {
            request,
            reason: format!("unexpected reply {other:?}"),
        },
    }
}

/// A guest CID from the control service as a vsock address CID.
pub fn guest_cid(cid: Cid) -> Result<u32, ControlError> {
    u32::try_from(cid.0)
        .ok()
        .filter(|_| cid.is_guest())
        .ok_or(ControlError::BadCid(cid.0))
}

/// Resolves `name` on a fresh control connection.
pub fn resolve(name: &str, timeout: Duration) -> Result<u32, ControlError> {
    guest_cid(ControlClient::connect(timeout)?.resolve(name)?)
}

/// Resolves `name` and connects to its port `port` with a socket of type `ty`; `timeout`
/// bounds each step. Returns the socket and the address it reached.
pub fn connect_name(
    name: &str,
    port: u32,
    ty: SockType,
    timeout: Duration,
) -> Result<(VsockSocket, VsockAddr), ControlError> {
    let addr = VsockAddr::new(resolve(name, timeout)?, port);
    let sock =
        VsockSocket::connect(ty, addr, timeout).map_err(|source| ControlError::ConnectPeer {
            name: name.to_owned(),
            addr,
            source,
        })?;
    Ok((sock, addr))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scripted service: replies are read from `replies`, requests collected in `requests`;
    /// reads hand out at most `read_max` bytes to exercise reassembly.
    struct Script {
        replies: io::Cursor<Vec<u8>>,
        requests: Vec<u8>,
        read_max: usize,
    }

    impl Script {
        fn new(replies: &str, read_max: usize) -> Self {
            Self {
                replies: io::Cursor::new(replies.as_bytes().to_vec()),
                requests: Vec::new(),
                read_max,
            }
        }
    }

    impl Read for Script {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = buf.len().min(self.read_max);
            self.replies.read(&mut buf[..n])
        }
    }

    impl Write for Script {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.requests.extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn requests_in_sequence_with_split_and_merged_replies() {
        let replies =
            "OK 7\nERR not-found\nOK name=web namespace=red cid=3\r\nOK a=3 b=4\nERR busy\n";
        for read_max in [1, 3, 4096] {
            let mut c = ControlClient::new(Script::new(replies, read_max));
            assert_eq!(c.resolve("db").unwrap(), Cid(7));
            assert!(matches!(c.resolve("x"), Err(ControlError::NotFound(n)) if n == "x"));
            let id = c.whoami().unwrap();
            assert_eq!(
                (id.name.as_str(), id.namespace.as_str(), id.cid),
                ("web", "red", Cid(3))
            );
            assert_eq!(
                c.list().unwrap(),
                vec![("a".to_owned(), Cid(3)), ("b".to_owned(), Cid(4))]
            );
            assert!(matches!(
                c.resolve("y"),
                Err(ControlError::Refused { reason, .. }) if reason == "busy"
            ));
            let script = c.into_inner();
            assert_eq!(
                String::from_utf8(script.requests).unwrap(),
                "RESOLVE db\nRESOLVE x\nWHOAMI\nLIST\nRESOLVE y\n"
            );
        }
    }

    #[test]
    fn early_close_and_garbage_are_errors() {
        let mut c = ControlClient::new(Script::new("OK 7", 4096));
        assert!(matches!(
            c.resolve("db"),
            Err(ControlError::Closed { pending: 4 })
        ));
        let mut c = ControlClient::new(Script::new("HELLO\n", 4096));
        assert!(matches!(
            c.resolve("db"),
            Err(ControlError::BadReply { .. })
        ));
        let long = "x".repeat(MAX_LINE_BYTES + 1);
        let mut c = ControlClient::new(Script::new(&long, 4096));
        assert!(matches!(c.whoami(), Err(ControlError::BadReply { .. })));
    }

    #[test]
    fn only_guest_cids_are_addresses() {
        assert_eq!(guest_cid(Cid(3)).unwrap(), 3);
        assert!(guest_cid(Cid(2)).is_err());
        assert!(guest_cid(Cid(u64::from(u32::MAX))).is_err());
        assert!(guest_cid(Cid(1 << 40)).is_err());
    }
}
