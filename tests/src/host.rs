//! Host ends of hybrid vsock (the Firecracker / vhost-device-vsock convention):
//! - a guest connecting to CID 2 port P reaches the Unix socket `<uds-path>_<P>`: a stream
//!   listener for guest SOCK_STREAM, a SOCK_SEQPACKET listener for guest SOCK_SEQPACKET;
//! - a host process connects to `<uds-path>`, writes `CONNECT <P>\n`, gets `OK <port>\n`, and
//!   then has a stream to guest port P.
//!
//! Every blocking call here has a timeout. Seqpacket sockets are created with `nix` and then
//! handled through std's `UnixListener`/`UnixStream`, whose `accept`, `read` and `write` map
//! to calls that keep message boundaries on a SOCK_SEQPACKET socket (one `read` returns one
//! message, one `write` sends one).

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use domsock_guest::pattern::{Checksum, PatternStream};

/// `<uds>_<port>`: where guest connections to host port `port` arrive.
pub fn port_path(uds: &Path, port: u32) -> PathBuf {
    let mut s = uds.as_os_str().to_owned();
    s.push(format!("_{port}"));
    PathBuf::from(s)
}

/// Binds a stream listener for guest connections to host port `port`.
pub fn listen_stream(uds: &Path, port: u32) -> io::Result<UnixListener> {
    UnixListener::bind(port_path(uds, port))
}

/// Binds a SOCK_SEQPACKET listener for guest seqpacket connections to host port `port`.
pub fn listen_seqpacket(uds: &Path, port: u32) -> io::Result<UnixListener> {
    use nix::sys::socket::{
        bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType, UnixAddr,
    };
    use std::os::fd::AsRawFd;
    let fd = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    let addr = UnixAddr::new(&port_path(uds, port))?;
    bind(fd.as_raw_fd(), &addr)?;
    listen(&fd, Backlog::new(16)?)?;
    Ok(UnixListener::from(fd))
}

/// Accepts one connection within `timeout`; the stream gets `idle` as read and write timeout.
pub fn accept(
    listener: &UnixListener,
    timeout: Duration,
    idle: Duration,
) -> io::Result<UnixStream> {
    listener.set_nonblocking(true)?;
    let deadline = Instant::now() + timeout;
    let stream = loop {
        match listener.accept() {
            Ok((s, _)) => break s,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("no connection within {timeout:?}"),
                    ));
                }
                thread::sleep(Duration::from_millis(2));
            }
            Err(e) => return Err(e),
        }
    };
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(idle))?;
    stream.set_write_timeout(Some(idle))?;
    Ok(stream)
}

/// Outcome of the `CONNECT <port>` handshake.
#[derive(Debug)]
pub enum Handshake {
    /// `OK ...` received; the stream now carries the guest connection.
    Connected {
        /// The stream.
        stream: UnixStream,
        /// The backend's reply line, without the newline.
        reply: String,
    },
    /// The backend closed the connection or answered something other than `OK`.
    Refused {
        /// The reply line, or `EOF` when the backend just closed.
        reply: String,
    },
}

/// Connects to guest port `port` through `<uds>` and the `CONNECT` handshake; the reply must
/// come within `timeout`. The returned stream has `timeout` as read and write timeout.
pub fn connect_guest(uds: &Path, port: u32, timeout: Duration) -> io::Result<Handshake> {
    let mut stream = UnixStream::connect(uds)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    stream.write_all(format!("CONNECT {port}\n").as_bytes())?;
    // Byte by byte so that nothing after the newline (guest data) is consumed here.
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match stream.read(&mut byte) {
            Ok(0) => {
                if line.is_empty() {
                    return Ok(Handshake::Refused {
                        reply: "EOF".into(),
                    });
                }
                return Ok(Handshake::Refused {
                    reply: String::from_utf8_lossy(&line).into_owned(),
                });
            }
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) if line.len() >= 256 => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "handshake reply longer than 256 bytes",
                ))
            }
            Ok(_) => line.push(byte[0]),
            // A reset is as good a refusal as EOF.
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
                return Ok(Handshake::Refused {
                    reply: "ECONNRESET".into(),
                })
            }
            Err(e) => return Err(e),
        }
    }
    let reply = String::from_utf8_lossy(&line).into_owned();
    if reply.starts_with("OK ") || reply == "OK" {
        Ok(Handshake::Connected { stream, reply })
    } else {
        Ok(Handshake::Refused { reply })
    }
}

/// Like [`connect_guest`], but a refusal is an error.
pub fn connect_guest_ok(uds: &Path, port: u32, timeout: Duration) -> io::Result<UnixStream> {
    match connect_guest(uds, port, timeout)? {
        Handshake::Connected { stream, .. } => Ok(stream),
        Handshake::Refused { reply } => Err(io::Error::new(
            io::ErrorKind::ConnectionRefused,
            format!("CONNECT {port} refused: {reply:?}"),
        )),
    }
}

/// Byte count, checksum and duration of one direction of a transfer.
#[derive(Debug, Clone)]
pub struct Transfer {
    /// Bytes and XXH3-64.
    pub sum: Checksum,
    /// From the first to the last byte (for reads: until EOF).
    pub elapsed: Duration,
}

/// Reads until EOF.
pub fn read_to_eof(stream: &mut UnixStream) -> io::Result<Transfer> {
    let mut sum = Checksum::new();
    let mut buf = vec![0u8; 256 * 1024];
    let start = Instant::now();
    loop {
        match stream.read(&mut buf) {
            Ok(0) => {
                return Ok(Transfer {
                    sum,
                    elapsed: start.elapsed(),
                })
            }
            Ok(n) => sum.update(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("read after {} bytes: {e}", sum.bytes()),
                ))
            }
        }
    }
}

/// Reads exactly `len` bytes (an early EOF is an error). Does not wait for EOF, so the
/// transfer is measured independently of how the backend propagates a half-close.
pub fn read_len(stream: &mut UnixStream, len: u64) -> io::Result<Transfer> {
    let mut sum = Checksum::new();
    let mut buf = vec![0u8; 256 * 1024];
    let start = Instant::now();
    while sum.bytes() < len {
        let want = (len - sum.bytes()).min(buf.len() as u64) as usize;
        match stream.read(&mut buf[..want]) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("EOF after {} of {len} bytes", sum.bytes()),
                ))
            }
            Ok(n) => sum.update(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("read after {} bytes: {e}", sum.bytes()),
                ))
            }
        }
    }
    Ok(Transfer {
        sum,
        elapsed: start.elapsed(),
    })
}

/// Writes `len` bytes of the pattern stream for `seed` in `chunk`-byte writes.
pub fn write_pattern(
    stream: &mut UnixStream,
    seed: u64,
    len: u64,
    chunk: usize,
) -> io::Result<Transfer> {
    let mut gen = PatternStream::new(seed);
    let mut sum = Checksum::new();
    let mut buf = vec![0u8; chunk.max(1)];
    let start = Instant::now();
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        gen.fill(&mut buf[..n]);
        stream.write_all(&buf[..n]).map_err(|e| {
            io::Error::new(e.kind(), format!("write after {} bytes: {e}", sum.bytes()))
        })?;
        sum.update(&buf[..n]);
        left -= n as u64;
    }
    Ok(Transfer {
        sum,
        elapsed: start.elapsed(),
    })
}

/// Serves one seqpacket connection: echoes every message until EOF; returns the sizes seen.
pub fn seqpacket_echo(stream: &mut UnixStream) -> io::Result<Vec<usize>> {
    // Larger than any test message: a message that arrives bigger than sent shows as a size
    // mismatch, not as a silent truncation.
    let mut buf = vec![0u8; 256 * 1024];
    let mut sizes = Vec::new();
    loop {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return Ok(sizes);
        }
        let sent = stream.write(&buf[..n])?;
        if sent != n {
            return Err(io::Error::other(format!(
                "echo of {n}-byte message sent only {sent} bytes"
            )));
        }
        sizes.push(n);
    }
}

/// Echoes a byte stream until EOF, then closes; returns the byte count.
pub fn stream_echo(stream: &mut UnixStream) -> io::Result<u64> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            stream.shutdown(Shutdown::Write)?;
            return Ok(total);
        }
        stream.write_all(&buf[..n])?;
        total += n as u64;
    }
}
