//! The host side of the "hybrid vsock" convention (Firecracker, vhost-device-vsock): a host
//! process connects to the backend's Unix socket and writes `CONNECT <port>\n`; the backend
//! answers `OK <port>\n` once the guest accepted, and the socket becomes the stream.
//!
//! Only the line parser lives here, as a pure function over bytes read so far.

use crate::addr::Port;
use thiserror::Error;

/// Longest handshake line we wait for, newline included.
pub const MAX_CONNECT_LINE_BYTES: usize = 64;

/// A malformed handshake.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ConnectLineError {
    /// No newline within [`MAX_CONNECT_LINE_BYTES`].
    #[error("handshake line longer than {MAX_CONNECT_LINE_BYTES} bytes")]
    TooLong,
    /// Not `CONNECT <decimal port>`.
    #[error("expected `CONNECT <port>`, got {0:?}")]
    Malformed(String),
}

/// Parses the handshake from the bytes received so far. `Ok(None)` means "need more
/// bytes"; `Ok(Some((port, consumed)))` gives the port and the length of the line including
/// its newline (bytes after it already belong to the stream).
pub fn parse_connect_line(buf: &[u8]) -> Result<Option<(Port, usize)>, ConnectLineError> {
    let Some(nl) = buf.iter().position(|&b| b == b'\n') else {
        return if buf.len() >= MAX_CONNECT_LINE_BYTES {
            Err(ConnectLineError::TooLong)
        } else {
            Ok(None)
        };
    };
    if nl >= MAX_CONNECT_LINE_BYTES {
        return Err(ConnectLineError::TooLong);
    }
    let line = &buf[..nl];
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let text = String::from_utf8_lossy(line);
    let malformed = || ConnectLineError::Malformed(text.to_string());
    let mut parts = text.split_ascii_whitespace();
    match (parts.next(), parts.next(), parts.next()) {
        (Some(cmd), Some(port), None) if cmd.eq_ignore_ascii_case("CONNECT") => {
            if !port.bytes().all(|b| b.is_ascii_digit()) {
                return Err(malformed());
            }
            let port: u32 = port.parse().map_err(|_| malformed())?;
            Ok(Some((Port(port), nl + 1)))
        }
        _ => Err(malformed()),
    }
}

/// The success reply for `port`.
pub fn ok_line(port: Port) -> String {
    format!("OK {}\n", port.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses() {
        assert_eq!(
            parse_connect_line(b"CONNECT 1234\n"),
            Ok(Some((Port(1234), 13)))
        );
        assert_eq!(
            parse_connect_line(b"CONNECT 5\r\nhello"),
            Ok(Some((Port(5), 11)))
        );
        assert_eq!(parse_connect_line(b"connect 7\n"), Ok(Some((Port(7), 10))));
        assert_eq!(parse_connect_line(b"CONNECT 12"), Ok(None));
        assert_eq!(parse_connect_line(b""), Ok(None));
    }

    #[test]
    fn rejects() {
        assert!(matches!(
            parse_connect_line(b"CONNECT\n"),
            Err(ConnectLineError::Malformed(_))
        ));
        assert!(matches!(
            parse_connect_line(b"CONNECT -1\n"),
            Err(ConnectLineError::Malformed(_))
        ));
        assert!(matches!(
            parse_connect_line(b"CONNECT 4294967296\n"),
            Err(ConnectLineError::Malformed(_))
        ));
        assert!(matches!(
            parse_connect_line(b"CONNECT 1 2\n"),
            Err(ConnectLineError::Malformed(_))
        ));
        assert_eq!(
            parse_connect_line(&[b'x'; 64]),
            Err(ConnectLineError::TooLong)
        );
        assert_eq!(ok_line(Port(9)), "OK 9\n");
    }

    /// `CONNECT 000…05` padded with leading zeros to `len` bytes, newline not included.
    fn padded_line(len: usize) -> Vec<u8> {
        let mut line = b"CONNECT ".to_vec();
        line.resize(len - 1, b'0');
        line.push(b'5');
        line
    }

    /// The newline may sit at index `MAX_CONNECT_LINE_BYTES - 1` and no further, whether the
    /// bytes so far end there or more follow; without one, `MAX_CONNECT_LINE_BYTES - 1`
    /// bytes still wait for more and one more byte is too long.
    #[test]
    fn newline_bound_is_exact() {
        let max = MAX_CONNECT_LINE_BYTES;
        let mut longest = padded_line(max - 1);
        longest.push(b'\n');
        assert_eq!(longest.len(), max);
        assert_eq!(parse_connect_line(&longest), Ok(Some((Port(5), max))));
        let mut with_stream = longest.clone();
        with_stream.extend_from_slice(b"stream bytes");
        assert_eq!(parse_connect_line(&with_stream), Ok(Some((Port(5), max))));

        let mut one_more = padded_line(max);
        one_more.push(b'\n');
        assert_eq!(
            parse_connect_line(&one_more),
            Err(ConnectLineError::TooLong)
        );
        // Newline far beyond the bound, with bytes after it.
        let mut far = padded_line(max + 20);
        far.extend_from_slice(b"\nmore");
        assert_eq!(parse_connect_line(&far), Err(ConnectLineError::TooLong));

        // No newline yet.
        assert_eq!(parse_connect_line(&padded_line(max - 1)), Ok(None));
        assert_eq!(
            parse_connect_line(&padded_line(max)),
            Err(ConnectLineError::TooLong)
        );
    }
}
