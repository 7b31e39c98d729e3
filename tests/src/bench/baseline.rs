//! Host-only baselines: the same workloads over a Unix stream socket pair and over TCP on
//! 127.0.0.1. Every vsock path through a hybrid backend pays at least what these pay (a
//! Unix socket on the host side), so they bound what a backend can reach.

use super::{percentiles, Latency, Plan, Throughput};
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::thread;
use std::time::{Duration, Instant};

/// Read buffer of every bench reader.
pub const READ_BUF_BYTES: usize = 256 * 1024;

/// A connected byte-stream pair.
pub trait StreamPair: Read + Write + Send + Sized + 'static {
    /// Two connected ends.
    fn pair() -> io::Result<(Self, Self)>;
    /// Closes the write side.
    fn shut_write(&self) -> io::Result<()>;
}

impl StreamPair for UnixStream {
    fn pair() -> io::Result<(Self, Self)> {
        UnixStream::pair()
    }
    fn shut_write(&self) -> io::Result<()> {
        self.shutdown(Shutdown::Write)
    }
}

impl StreamPair for TcpStream {
    fn pair() -> io::Result<(Self, Self)> {
        let l = TcpListener::bind("127.0.0.1:0")?;
        let a = TcpStream::connect(l.local_addr()?)?;
        let (b, _) = l.accept()?;
        a.set_nodelay(true)?;
        b.set_nodelay(true)?;
        Ok((a, b))
    }
    fn shut_write(&self) -> io::Result<()> {
        self.shutdown(Shutdown::Write)
    }
}

/// Writes `size`-byte writes for `duration`, then closes; returns bytes written.
pub fn write_for<W: Write>(w: &mut W, size: usize, duration: Duration) -> io::Result<u64> {
    let buf = vec![0xa5u8; size];
    let deadline = Instant::now() + duration;
    let mut total = 0u64;
    // Check the clock every few writes only: at 64 B, a clock read per write would cost a
    // noticeable share of the loop.
    let batch = (256 * 1024 / size).clamp(1, 1024);
    while Instant::now() < deadline {
        for _ in 0..batch {
            w.write_all(&buf)?;
            total += size as u64;
        }
    }
    Ok(total)
}

/// Reads until EOF; returns bytes read.
pub fn read_to_eof<R: Read>(r: &mut R) -> io::Result<u64> {
    let mut buf = vec![0u8; READ_BUF_BYTES];
    let mut total = 0u64;
    loop {
        match r.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => total += n as u64,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// One-way throughput over a fresh pair.
pub fn throughput<P: StreamPair>(size: usize, plan: &Plan) -> io::Result<Throughput> {
    let (mut tx, mut rx) = P::pair()?;
    let start = Instant::now();
    let reader = thread::spawn(move || read_to_eof(&mut rx));
    let duration = plan.duration;
    let written = write_for(&mut tx, size, duration)?;
    tx.shut_write()?;
    let read = reader
        .join()
        .map_err(|_| io::Error::other("reader thread panicked"))??;
    if read != written {
        return Err(io::Error::other(format!(
            "wrote {written} bytes, read {read}"
        )));
    }
    Ok(Throughput {
        bytes: read,
        elapsed: start.elapsed(),
        backend_cpu: None,
    })
}

/// Echoes `size`-byte messages until EOF.
pub fn echo<S: Read + Write>(s: &mut S, size: usize) -> io::Result<()> {
    let mut buf = vec![0u8; size];
    loop {
        match s.read_exact(&mut buf) {
            Ok(()) => s.write_all(&buf)?,
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
    }
}

/// `count` ping-pongs of `size` bytes over `s` (the far end echoes); returns every RTT.
pub fn ping_pong<S: Read + Write>(
    s: &mut S,
    size: usize,
    count: usize,
) -> io::Result<Vec<Duration>> {
    let out = vec![0x5au8; size];
    let mut back = vec![0u8; size];
    let mut rtts = Vec::with_capacity(count);
    for _ in 0..count {
        let t = Instant::now();
        s.write_all(&out)?;
        s.read_exact(&mut back)?;
        rtts.push(t.elapsed());
    }
    Ok(rtts)
}

/// Round-trip latency over a fresh pair.
pub fn latency<P: StreamPair>(size: usize, plan: &Plan) -> io::Result<Latency> {
    let (mut a, mut b) = P::pair()?;
    let echo_thread = thread::spawn(move || echo(&mut b, size));
    let mut rtts = ping_pong(&mut a, size, plan.round_trips)?;
    a.shut_write()?;
    echo_thread
        .join()
        .map_err(|_| io::Error::other("echo thread panicked"))??;
    let (p50, p99) = percentiles(&mut rtts);
    Ok(Latency {
        p50,
        p99,
        backend_cpu_per_rt: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unix_pair_moves_every_byte() {
        let plan = Plan {
            duration: Duration::from_millis(20),
            round_trips: 10,
            repeats: 1,
        };
        let t = throughput::<UnixStream>(4096, &plan).unwrap();
        assert!(t.bytes > 0 && t.bytes % 4096 == 0);
        let l = latency::<UnixStream>(64, &plan).unwrap();
        assert!(l.p50 <= l.p99);
    }

    #[test]
    fn tcp_loopback_works() {
        let plan = Plan {
            duration: Duration::from_millis(20),
            round_trips: 10,
            repeats: 1,
        };
        let t = throughput::<TcpStream>(64, &plan).unwrap();
        assert!(t.bytes > 0);
    }
}
