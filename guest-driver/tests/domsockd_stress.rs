//! Stress and failure cases of a real `domsockd` process driven by the user-space guest:
//! hundreds of concurrent connections both ways, credit stalls with 1 MiB writes, seqpacket
//! messages as large as the credit allows, RST paths (abrupt closes on either side, host paths
//! that are not listeners, socket type mismatch, a full host backlog), TX packets spread over
//! many descriptors, tiny RX buffers, a seqpacket message that outgrows domsockd's buffer,
//! guest data lingering after its device stopped (delivered within the linger limit, counted
//! lost after it), and a guest that dies and comes back five times.
//!
//! Each case runs its own domsockd in its own temp dir and checks data byte-exact. That the
//! backend's connection table ends empty is checked through its open file descriptors (every
//! connection holds a host socket) and its counters (logged on SIGUSR1). Needs
//! `target/release/domsockd` or `$DOMSOCKD`, like `domsockd.rs`.
//!
//! Every case runs in CI; none is ignored.

mod support;

use domsock_guest::pattern::{Checksum, PatternStream};
use domsock_guest::uvirtio::{
    ConnKey, EndpointConfig, GuestConfig, Header, HeaderPlacement, Port, RxLayout, SockError,
    SocketType, UserGuest,
};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};
use support::*;

const KIB: usize = 1024;
const MIB: usize = 1024 * KIB;
/// The receive buffer domsockd advertises per connection (its `buf_alloc`): what a guest may
/// have in flight towards one host socket.
const DOMSOCKD_BUF_ALLOC: usize = 256 * KIB;
/// Bound on an abrupt close reaching the other side.
const PROMPT: Duration = Duration::from_secs(2);
/// A refused connect must be answered at least this fast.
const REFUSED_WITHIN: Duration = Duration::from_millis(500);
/// No progress for this long means a sender is stalled.
const STALL: Duration = Duration::from_millis(300);
/// Connections of the "hundreds of connections" cases.
const CONNS: usize = 300;

/// Failure counters that must stay 0 in every case that does not provoke them.
const FAILURES: &[&str] = &[
    "malformed_chains",
    "bad_headers",
    "spoofed_packets",
    "unroutable_packets",
    "protocol_resets",
    "host_errors",
    "lingered_bytes_lost",
];

// ---- helpers ----------------------------------------------------------------------------

/// A stream listener at `<uds>_<port>` with an explicit backlog (`-1`: the system maximum).
fn listen_with_backlog(uds: &Path, port: u32, backlog: i32) -> UnixListener {
    use nix::sys::socket::UnixAddr;
    use nix::sys::socket::{bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType};
    let fd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .unwrap();
    bind(
        fd.as_raw_fd(),
        &UnixAddr::new(&port_path(uds, port)).unwrap(),
    )
    .unwrap();
    listen(&fd, Backlog::new(backlog).unwrap()).unwrap();
    UnixListener::from(fd)
}

fn request_len(id: usize) -> usize {
    1000 + id * 37 % 7000
}

fn reply_len(id: usize) -> usize {
    500 + id * 53 % 6000
}

/// Connection `id`'s request: its id, then its own pattern.
fn request(id: usize) -> Vec<u8> {
    let mut m = (id as u32).to_le_bytes().to_vec();
    m.extend(pattern(id as u64, request_len(id)));
    m
}

fn reply(id: usize) -> Vec<u8> {
    pattern(1_000_000 + id as u64, reply_len(id))
}

/// Host end of one guest connection: reads and checks a request, answers, expects EOF.
/// Returns the connection's id.
fn serve_request(mut s: UnixStream) -> usize {
    let mut id = [0u8; 4];
    s.read_exact(&mut id).unwrap();
    let id = u32::from_le_bytes(id) as usize;
    assert!(id < CONNS, "bad connection id {id}");
    let mut got = vec![0u8; request_len(id)];
    s.read_exact(&mut got)
        .unwrap_or_else(|e| panic!("host reading request {id}: {e}"));
    assert!(got == pattern(id as u64, got.len()), "request {id} differs");
    s.write_all(&reply(id)).unwrap();
    let mut rest = [0u8; 1];
    assert_eq!(
        s.read(&mut rest).unwrap(),
        0,
        "connection {id}: expected EOF"
    );
    id
}

/// Waits (without a guest to poll) at most `timeout` until domsockd holds at most `fds`
/// descriptors.
fn wait_fds_at_most(b: &Backend, fds: usize, timeout: Duration, what: &str) {
    let deadline = Instant::now() + timeout;
    while b.fd_count() > fds {
        assert!(
            Instant::now() < deadline,
            "{what}: domsockd still holds {} fds, expected at most {fds}",
            b.fd_count()
        );
        thread::sleep(Duration::from_millis(5));
    }
}

/// Offers `data` to the guest in 1 MiB writes until it cannot send more for [`STALL`] (the
/// host reader is paused); returns the bytes the guest took.
fn send_until_stalled(g: &mut UserGuest, key: ConnKey, data: &[u8]) -> usize {
    let mut sent = 0;
    let deadline = Instant::now() + STEP_TIMEOUT;
    let mut last_progress = Instant::now();
    while last_progress.elapsed() < STALL {
        assert!(Instant::now() < deadline, "the guest never stalled");
        assert!(
            sent < data.len(),
            "the guest sent everything: nothing stalled it"
        );
        let end = (sent + MIB).min(data.len());
        match g.send(key, &data[sent..end]) {
            Ok(n) => {
                sent += n;
                last_progress = Instant::now();
            }
            Err(SockError::WouldBlock) => g.poll(Some(Duration::from_millis(10))).unwrap(),
            Err(e) => panic!("send after {sent} bytes: {}", chain(&e)),
        }
    }
    sent
}

/// Reads `s` until EOF or an error, checking that what arrives is the pattern for `seed`.
/// Returns the bytes read, when the stream ended, and the error that ended it (`None`: EOF).
fn read_pattern_until_end(
    s: &mut UnixStream,
    seed: u64,
) -> (usize, Instant, Option<io::ErrorKind>) {
    let mut gen = PatternStream::new(seed);
    let mut buf = vec![0u8; 64 * KIB];
    let mut expected = vec![0u8; 64 * KIB];
    let mut total = 0;
    loop {
        match s.read(&mut buf) {
            Ok(0) => return (total, Instant::now(), None),
            Ok(n) => {
                gen.fill(&mut expected[..n]);
                assert!(
                    buf[..n] == expected[..n],
                    "seed {seed}: bytes {total}..{} differ",
                    total + n
                );
                total += n;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return (total, Instant::now(), Some(e.kind())),
        }
    }
}

/// Writes the pattern for `seed` to `s` until a write fails (at most 256 MiB); returns the
/// bytes written, when it failed, and how.
fn write_pattern_until_error(s: &mut UnixStream, seed: u64) -> (usize, Instant, io::ErrorKind) {
    let mut gen = PatternStream::new(seed);
    let mut buf = vec![0u8; 64 * KIB];
    let mut total = 0;
    while total < 256 * MIB {
        gen.fill(&mut buf);
        let mut off = 0;
        while off < buf.len() {
            match s.write(&buf[off..]) {
                Ok(n) => off += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return (total + off, Instant::now(), e.kind()),
            }
        }
        total += buf.len();
    }
    panic!("wrote {total} bytes and the connection is still open");
}

/// The guest reads to the end; returns the bytes, and the error if the stream ended with
/// one instead of EOF.
fn guest_read_until_end(g: &mut UserGuest, key: ConnKey) -> (Vec<u8>, Option<SockError>) {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * KIB];
    loop {
        match g.recv_timeout(key, &mut buf, STEP_TIMEOUT) {
            Ok(0) => return (out, None),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e @ SockError::TimedOut { .. }) => {
                panic!("guest read hung after {} bytes: {e}", out.len())
            }
            Err(e) => return (out, Some(e)),
        }
    }
}

// ---- 1. hundreds of connections ---------------------------------------------------------

#[test]
fn hundreds_of_guest_connections_to_a_host_listener() {
    let b = Backend::domsockd("many-g2h", &[3]);
    let mut g = b.guest(0, GuestConfig::default());
    let idle_fds = b.fd_count();
    // Two rounds: the second shows the first left nothing behind that gets in the way.
    for round in 0..2u32 {
        let port = 5000 + round;
        let listener = listen_with_backlog(&b.vm(0).uds, port, -1);
        let host_side = thread::spawn(move || {
            let workers: Vec<_> = (0..CONNS)
                .map(|_| {
                    let s = accept(&listener);
                    thread::spawn(move || serve_request(s))
                })
                .collect();
            let mut ids: Vec<usize> = workers
                .into_iter()
                .map(|w| w.join().expect("host worker panicked"))
                .collect();
            ids.sort_unstable();
            ids
        });
        let start = Instant::now();
        // All requests go out before any answer comes back.
        let keys: Vec<ConnKey> = (0..CONNS)
            .map(|_| g.start_connect(host(port), SocketType::Stream).unwrap())
            .collect();
        poll_until(&mut g, "every connection established", STEP_TIMEOUT, |g| {
            keys.iter().all(|&k| {
                g.is_connected(k)
                    .unwrap_or_else(|e| panic!("connect {k}: {}", chain(&e)))
            })
        });
        let connected = start.elapsed();
        assert!(
            b.fd_count() >= idle_fds + CONNS,
            "domsockd holds {} fds with {CONNS} connections open (idle: {idle_fds})",
            b.fd_count()
        );
        for (id, &k) in keys.iter().enumerate() {
            g.write_all(k, &request(id), STEP_TIMEOUT)
                .unwrap_or_else(|e| panic!("request {id}: {}", chain(&e)));
        }
        for (id, &k) in keys.iter().enumerate() {
            let mut got = vec![0u8; reply_len(id)];
            g.read_exact(k, &mut got, STEP_TIMEOUT)
                .unwrap_or_else(|e| panic!("reply {id}: {}", chain(&e)));
            assert!(got == reply(id), "reply {id} differs");
        }
        for k in keys {
            g.close(k).unwrap();
        }
        let ids = join_polling(&mut g, host_side);
        assert_eq!(ids, (0..CONNS).collect::<Vec<_>>());
        poll_until(
            &mut g,
            "domsockd to close every host socket",
            STEP_TIMEOUT,
            |_| b.fd_count() <= idle_fds,
        );
        eprintln!(
            "round {round}: {CONNS} guest->host connections up in {connected:?}, all done in {:?}",
            start.elapsed()
        );
    }
    assert_eq!(g.sockets(), 0);
    let c = b.counters(3);
    assert_eq!(c.get("accepted_connections"), 2 * CONNS as u64);
    c.assert_zero(&["refused_connections"]);
    c.assert_zero(FAILURES);
    let s = g.stats();
    assert_eq!((s.protocol_resets, s.refused_requests), (0, 0), "{s:?}");
}

#[test]
fn hundreds_of_host_connects_to_a_guest_listener() {
    let b = Backend::domsockd("many-h2g", &[3]);
    let cfg = GuestConfig {
        listen_backlog: 2 * CONNS,
        ..GuestConfig::default()
    };
    let mut g = b.guest(0, cfg);
    let idle_fds = b.fd_count();
    g.listen(Port(6000), SocketType::Stream).unwrap();
    let uds = b.vm(0).uds.clone();
    let start = Instant::now();
    let host_side = thread::spawn(move || {
        let mut conns = Vec::new();
        for id in 0..CONNS {
            let (mut s, line) = host_connect(&uds, 6000);
            assert_eq!(line, "OK 6000", "CONNECT {id}");
            s.write_all(&request(id)).unwrap();
            conns.push(s);
        }
        for (id, s) in conns.iter_mut().enumerate() {
            let mut got = vec![0u8; reply_len(id)];
            s.read_exact(&mut got)
                .unwrap_or_else(|e| panic!("host reading reply {id}: {e}"));
            assert!(got == reply(id), "reply {id} differs");
        }
        // Odd connections are closed by the host first, even ones by the guest.
        let mut guest_closes = Vec::new();
        for (id, s) in conns.into_iter().enumerate() {
            if id % 2 == 0 {
                guest_closes.push((id, s));
            }
        }
        for (id, mut s) in guest_closes {
            let mut b = [0u8; 1];
            assert_eq!(s.read(&mut b).unwrap(), 0, "connection {id}: expected EOF");
        }
    });
    let mut keys: Vec<Option<ConnKey>> = vec![None; CONNS];
    for _ in 0..CONNS {
        let k = g.accept_timeout(Port(6000), STEP_TIMEOUT).unwrap();
        let mut id = [0u8; 4];
        g.read_exact(k, &mut id, STEP_TIMEOUT).unwrap();
        let id = u32::from_le_bytes(id) as usize;
        let mut got = vec![0u8; request_len(id)];
        g.read_exact(k, &mut got, STEP_TIMEOUT)
            .unwrap_or_else(|e| panic!("request {id}: {}", chain(&e)));
        assert!(got == pattern(id as u64, got.len()), "request {id} differs");
        g.write_all(k, &reply(id), STEP_TIMEOUT).unwrap();
        assert!(keys[id].replace(k).is_none(), "id {id} twice");
    }
    let connected = start.elapsed();
    assert!(
        b.fd_count() >= idle_fds + CONNS,
        "domsockd holds {} fds with {CONNS} connections open (idle: {idle_fds})",
        b.fd_count()
    );
    let keys: Vec<ConnKey> = keys.into_iter().map(|k| k.expect("every id")).collect();
    for k in keys.iter().step_by(2) {
        g.close(*k).unwrap();
    }
    for (id, &k) in keys.iter().enumerate().skip(1).step_by(2) {
        let mut b = [0u8; 16];
        let n = g
            .recv_timeout(k, &mut b, STEP_TIMEOUT)
            .unwrap_or_else(|e| panic!("connection {id}: {}", chain(&e)));
        assert_eq!(n, 0, "connection {id}: expected EOF");
        g.close(k).unwrap();
    }
    join_polling(&mut g, host_side);
    poll_until(
        &mut g,
        "domsockd to close every host socket",
        STEP_TIMEOUT,
        |_| b.fd_count() <= idle_fds,
    );
    eprintln!(
        "{CONNS} host->guest connections up in {connected:?}, all done in {:?}",
        start.elapsed()
    );
    assert_eq!(g.sockets(), 0);
    let c = b.counters(3);
    assert_eq!(c.get("host_connects"), CONNS as u64);
    c.assert_zero(&["bad_handshakes"]);
    c.assert_zero(FAILURES);
    let s = g.stats();
    assert_eq!((s.protocol_resets, s.refused_requests), (0, 0), "{s:?}");
}

// ---- 2. credit stalls -------------------------------------------------------------------

#[test]
fn guest_writer_stalls_at_the_credit_while_the_host_reader_is_paused() {
    let b = Backend::domsockd("stall-g2h", &[3]);
    let mut g = b.guest(0, GuestConfig::default());
    let listener = listen_stream(&b.vm(0).uds, 5100);
    let key = g
        .connect_timeout(host(5100), SocketType::Stream, STEP_TIMEOUT)
        .unwrap();
    let mut s = accept(&listener);
    let data = pattern(21, 16 * MIB);
    let sent = send_until_stalled(&mut g, key, &data);
    // What the host socket holds is exactly what domsockd passed on: the rest of what the
    // guest sent is in domsockd's hands, bounded by the credit it advertised. The guest
    // stops only once that credit is used up; with credit-update elision its view of it may
    // lag by less than half the buffer (else domsockd would have sent an update).
    let queued = peek_queued(&s);
    assert!(
        queued[..] == data[..queued.len()],
        "the host socket holds different bytes"
    );
    let held = sent - queued.len();
    eprintln!(
        "stalled: guest sent {sent}, host socket holds {}, domsockd holds {held}",
        queued.len()
    );
    assert!(
        held <= DOMSOCKD_BUF_ALLOC,
        "domsockd took {held} bytes beyond what reached the host socket, more than its buf_alloc"
    );
    assert!(
        held > DOMSOCKD_BUF_ALLOC / 2,
        "the guest stopped with only {held} bytes in domsockd: credit was left unused"
    );
    // Still stalled, nothing lost or duplicated while waiting.
    g.poll(Some(Duration::from_millis(50))).unwrap();
    assert!(matches!(
        g.send(key, &data[sent..sent + MIB]),
        Err(SockError::WouldBlock)
    ));
    assert_eq!(peek_queued(&s).len(), queued.len());

    // The reader resumes: the rest goes in 1 MiB writes.
    let host_side = thread::spawn(move || read_to_eof(&mut s));
    for chunk in data[sent..].chunks(MIB) {
        g.write_all(key, chunk, STEP_TIMEOUT)
            .unwrap_or_else(|e| panic!("write after resuming: {}", chain(&e)));
    }
    g.close(key).unwrap();
    let got = join_polling(&mut g, host_side);
    let mut expected = Checksum::new();
    expected.update(&data);
    assert_eq!(got.bytes(), data.len() as u64);
    assert_eq!(
        got.digest(),
        expected.digest(),
        "host received different bytes"
    );
    b.counters(3).assert_zero(FAILURES);
}

#[test]
fn guest_close_delivers_everything_domsockd_holds() {
    let b = Backend::domsockd("stall-close", &[3]);
    let mut g = b.guest(0, GuestConfig::default());
    let idle_fds = b.fd_count();
    let listener = listen_stream(&b.vm(0).uds, 5150);
    let key = g
        .connect_timeout(host(5150), SocketType::Stream, STEP_TIMEOUT)
        .unwrap();
    let mut s = accept(&listener);
    let data = pattern(22, 4 * MIB);
    let sent = send_until_stalled(&mut g, key, &data);
    // Close while domsockd still holds up to its buf_alloc of guest data: the host must get
    // all of it, then EOF (not a reset, not a truncated stream).
    g.close(key).unwrap();
    let host_side = thread::spawn(move || read_pattern_until_end(&mut s, 22));
    let (got, _, err) = join_polling(&mut g, host_side);
    assert_eq!(err, None, "host read ended with an error after {got} bytes");
    assert_eq!(
        got, sent,
        "host got {got} of the {sent} bytes the guest sent"
    );
    poll_until(&mut g, "the connection to be gone", STEP_TIMEOUT, |_| {
        b.fd_count() <= idle_fds
    });
    b.counters(3).assert_zero(FAILURES);
}

#[test]
fn host_writer_respects_a_small_guest_buffer() {
    let b = Backend::domsockd("stall-h2g", &[3]);
    let cfg = GuestConfig {
        endpoint: EndpointConfig {
            buf_alloc_bytes: 64 * KIB as u32,
            ..EndpointConfig::default()
        },
        ..GuestConfig::default()
    };
    let mut g = b.guest(0, cfg);
    g.listen(Port(6100), SocketType::Stream).unwrap();
    let uds = b.vm(0).uds.clone();
    const LEN: usize = 4 * MIB;
    let host_side = thread::spawn(move || {
        let (mut s, line) = host_connect(&uds, 6100);
        assert_eq!(line, "OK 6100");
        let sent = write_pattern(&mut s, 31, LEN, MIB);
        s.shutdown(std::net::Shutdown::Write).unwrap();
        (sent, read_to_eof(&mut s))
    });
    let key = g.accept_timeout(Port(6100), STEP_TIMEOUT).unwrap();
    // A slow reader: odd-sized reads with pauses (no polling) in between, so domsockd keeps
    // running into the 64 KiB credit. An overrun would end the connection with a protocol
    // violation, which the driver checks on every packet.
    let mut got = Checksum::new();
    let mut buf = vec![0u8; 12_345];
    let start = Instant::now();
    for reads in 0.. {
        let n = g
            .recv_timeout(key, &mut buf, STEP_TIMEOUT)
            .unwrap_or_else(|e| panic!("guest read after {} bytes: {}", got.bytes(), chain(&e)));
        if n == 0 {
            break;
        }
        got.update(&buf[..n]);
        if reads % 2 == 0 {
            thread::sleep(Duration::from_millis(1));
        }
    }
    eprintln!(
        "4 MiB host->guest through a 64 KiB guest buffer, slow reader: {:?}",
        start.elapsed()
    );
    let reply = guest_send_pattern(&mut g, key, 32, 5000, 5000);
    g.close(key).unwrap();
    let (sent, host_got) = join_polling(&mut g, host_side);
    assert_eq!(got.bytes(), LEN as u64);
    assert_eq!(
        got.digest(),
        sent.digest(),
        "guest received different bytes"
    );
    assert_eq!(host_got.digest(), reply.digest());
    assert_eq!(g.stats().protocol_resets, 0, "{:?}", g.stats());
    b.counters(3).assert_zero(FAILURES);
}

/// Guest->host seqpacket messages sent back to back to a host that reads them one at a time
/// after a pause: `sizes[i]` is message `i` of the pattern for `100 + i`.
fn pipelined_messages_to_host(g: &mut UserGuest, uds: &Path, port: u32, sizes: &[usize]) {
    let listener = listen_seqpacket(uds, port);
    let expected = sizes.to_vec();
    let host_side = thread::spawn(move || {
        let s = accept(&listener);
        for (i, &n) in expected.iter().enumerate() {
            thread::sleep(Duration::from_millis(20));
            let m = recv_message(&s, 512 * KIB);
            assert_eq!(m.len(), n, "message {i}");
            assert!(m == pattern(100 + i as u64, n), "message {i} differs");
        }
        let mut b = [0u8; 1];
        assert_eq!((&s).read(&mut b).unwrap(), 0, "expected EOF");
    });
    let key = g
        .connect_timeout(host(port), SocketType::SeqPacket, STEP_TIMEOUT)
        .unwrap();
    for (i, &n) in sizes.iter().enumerate() {
        g.send_msg_timeout(key, &pattern(100 + i as u64, n), STEP_TIMEOUT)
            .unwrap_or_else(|e| panic!("send message {i} of {n} bytes: {}", chain(&e)));
    }
    g.close(key).unwrap();
    join_polling(g, host_side);
}

/// Guest->host seqpacket messages, each sent once the host has read the previous one:
/// `sizes[i]` is message `i` of the pattern for `300 + i`.
fn lock_step_messages_to_host(g: &mut UserGuest, uds: &Path, port: u32, sizes: &[usize]) {
    let listener = listen_seqpacket(uds, port);
    let expected = sizes.to_vec();
    let (ack_tx, ack_rx) = mpsc::channel();
    let host_side = thread::spawn(move || {
        let s = accept(&listener);
        for (i, &n) in expected.iter().enumerate() {
            let m = recv_message(&s, 512 * KIB);
            assert_eq!(m.len(), n, "message {i}");
            assert!(m == pattern(300 + i as u64, n), "message {i} differs");
            ack_tx.send(()).unwrap();
        }
    });
    let key = g
        .connect_timeout(host(port), SocketType::SeqPacket, STEP_TIMEOUT)
        .unwrap();
    for (i, &n) in sizes.iter().enumerate() {
        g.send_msg_timeout(key, &pattern(300 + i as u64, n), STEP_TIMEOUT)
            .unwrap_or_else(|e| panic!("send message {i} of {n} bytes: {}", chain(&e)));
        poll_until(g, "the host to read the message", STEP_TIMEOUT, |_| {
            ack_rx.try_recv().is_ok()
        });
    }
    g.close(key).unwrap();
    join_polling(g, host_side);
}

/// Seqpacket messages as large as the receiver's buffer allows, both ways, to slow readers.
///
/// Guest -> host: messages of up to half domsockd's buffer back to back, so the guest keeps
/// waiting for credit between them (larger ones: see
/// `seqpacket_messages_beyond_the_credit_last_heard_of`); then messages of up to domsockd's
/// whole 256 KiB buffer one at a time. Those need a host socket send buffer larger
/// than the default 212,992 bytes (`net.core.wmem_default`): with it, every message over
/// 212,960 bytes failed with `EMSGSIZE` and reset the connection. Host -> guest: messages of
/// up to the guest's whole 256 KiB buffer, back to back.
#[test]
fn seqpacket_messages_as_large_as_the_credit_allows() {
    let b = Backend::domsockd("seq-big", &[3]);
    let mut g = b.guest(0, GuestConfig::default());
    let uds = b.vm(0).uds.clone();
    let half = DOMSOCKD_BUF_ALLOC / 2;
    pipelined_messages_to_host(
        &mut g,
        &uds,
        5200,
        &[half, 1, half - 1, half, 64 * KIB + 1, half, 7, half],
    );

    // One at a time. Each message here is over half the buffer, so domsockd's credit update
    // after it gives the guest the whole buffer back (a small one in between would not,
    // without a CREDIT_REQUEST: see `seqpacket_messages_beyond_the_credit_last_heard_of`).
    lock_step_messages_to_host(
        &mut g,
        &uds,
        5201,
        &[
            200 * KIB,
            212_960,
            212_961,
            DOMSOCKD_BUF_ALLOC,
            DOMSOCKD_BUF_ALLOC,
        ],
    );

    // Host -> guest: up to the guest's whole buffer. The host socket needs a send buffer
    // that takes such a message.
    let down: Vec<usize> = vec![256 * KIB, 200 * KIB, 1, 256 * KIB, 100 * KIB, 4097];
    let listener = listen_seqpacket(&uds, 5202);
    let sizes = down.clone();
    let host_side = thread::spawn(move || {
        let mut s = accept(&listener);
        nix::sys::socket::setsockopt(&s, nix::sys::socket::sockopt::SndBuf, &(2 * MIB)).unwrap();
        for (i, &n) in sizes.iter().enumerate() {
            assert_eq!(s.write(&pattern(200 + i as u64, n)).unwrap(), n);
        }
        let mut b = [0u8; 1];
        assert_eq!(s.read(&mut b).unwrap(), 0, "expected EOF");
    });
    let key = g
        .connect_timeout(host(5202), SocketType::SeqPacket, STEP_TIMEOUT)
        .unwrap();
    let mut buf = vec![0u8; 512 * KIB];
    for (i, &n) in down.iter().enumerate() {
        thread::sleep(Duration::from_millis(20));
        let m = g
            .recv_msg_timeout(key, &mut buf, STEP_TIMEOUT)
            .unwrap_or_else(|e| panic!("message {i} of {n} bytes: {}", chain(&e)))
            .expect("a message, not EOF");
        assert_eq!((m.len, m.msg_len), (n, n), "message {i}");
        assert!(
            buf[..n] == pattern(200 + i as u64, n)[..],
            "message {i} differs"
        );
    }
    g.close(key).unwrap();
    join_polling(&mut g, host_side);
    assert_eq!(g.stats().protocol_resets, 0);
    b.counters(3).assert_zero(FAILURES);
}

/// Guest->host seqpacket messages larger than the credit the guest last heard of, though
/// domsockd has the room: a 1-byte message then a 256 KiB one, one at a time; and messages
/// over half the buffer back to back to a slow reader.
///
/// domsockd sends a seqpacket `CREDIT_UPDATE` only while the guest's view of its free
/// buffer is below half (`Credit::wants_eager_update` in domsock-proto). After the 1-byte
/// message the guest believes 262,143 bytes are free and hears nothing more; the uvirtio
/// guest needs credit for a whole message before sending any of it, so it must ask with
/// `CREDIT_REQUEST` (Linux guests instead send a message's packets as credit comes in).
#[test]
fn seqpacket_messages_beyond_the_credit_last_heard_of() {
    let b = Backend::domsockd("seq-deadlock", &[3]);
    let mut g = b.guest(0, GuestConfig::default());
    let uds = b.vm(0).uds.clone();
    lock_step_messages_to_host(&mut g, &uds, 5210, &[1, DOMSOCKD_BUF_ALLOC]);
    pipelined_messages_to_host(
        &mut g,
        &uds,
        5211,
        &[
            200 * KIB,
            1,
            150 * KIB,
            200 * KIB,
            64 * KIB + 1,
            200 * KIB,
            7,
        ],
    );
    b.counters(3).assert_zero(FAILURES);
}

/// A host message the guest's buffer can never hold whole is refused with a reset (not a
/// stall); one that exactly fits arrives.
#[test]
fn seqpacket_message_larger_than_the_guest_buffer_resets() {
    let b = Backend::domsockd("seq-toobig", &[3]);
    let cfg = GuestConfig {
        endpoint: EndpointConfig {
            buf_alloc_bytes: 64 * KIB as u32,
            ..EndpointConfig::default()
        },
        ..GuestConfig::default()
    };
    let mut g = b.guest(0, cfg);
    let listener = listen_seqpacket(&b.vm(0).uds, 5260);
    let host_side = thread::spawn(move || {
        let mut s = accept(&listener);
        assert_eq!(s.write(&pattern(1, 64 * KIB)).unwrap(), 64 * KIB);
        assert_eq!(s.write(&pattern(2, 64 * KIB + 1)).unwrap(), 64 * KIB + 1);
        // domsockd closes its end when it resets the connection.
        let mut b = [0u8; 1];
        match s.read(&mut b) {
            Ok(0) => {}
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
            other => panic!("expected the host end closed, got {other:?}"),
        }
    });
    let key = g
        .connect_timeout(host(5260), SocketType::SeqPacket, STEP_TIMEOUT)
        .unwrap();
    let mut buf = vec![0u8; 128 * KIB];
    let m = g
        .recv_msg_timeout(key, &mut buf, STEP_TIMEOUT)
        .unwrap()
        .expect("the fitting message");
    assert_eq!((m.len, m.msg_len), (64 * KIB, 64 * KIB));
    assert!(buf[..64 * KIB] == pattern(1, 64 * KIB)[..]);
    let start = Instant::now();
    let e = g.recv_msg_timeout(key, &mut buf, STEP_TIMEOUT).unwrap_err();
    assert!(matches!(e, SockError::Reset(_)), "{}", chain(&e));
    assert!(
        start.elapsed() < PROMPT,
        "reset after {:?}",
        start.elapsed()
    );
    g.close(key).unwrap();
    join_polling(&mut g, host_side);
    assert_eq!(b.counters(3).get("host_errors"), 1);
}

/// A guest->host seqpacket message that outgrows domsockd's buffer (`buf_alloc`, 256 KiB)
/// before its end (EOM) can never be written whole: domsockd resets the connection at once
/// (counted as a protocol reset) instead of waiting forever. One packet less stays up.
/// The guest plays a sender that spends all its credit on one message: raw packets
/// without EOM, 64 KiB each.
#[test]
fn seqpacket_message_outgrowing_domsockds_buffer_resets() {
    let b = Backend::domsockd("seq-outgrow", &[3]);
    let mut g = b.guest(0, GuestConfig::default());
    let listener = listen_seqpacket(&b.vm(0).uds, 5270);
    // The host never reads: there is nothing to read before the message's end anyway.
    let host_side = thread::spawn(move || {
        let s = accept(&listener);
        assert!(
            wait_peer_closed(&s, STEP_TIMEOUT).is_some(),
            "domsockd never closed the host end"
        );
    });
    let key = g
        .connect_timeout(host(5270), SocketType::SeqPacket, STEP_TIMEOUT)
        .unwrap();
    let packet = 64 * KIB;
    let part = |g: &mut UserGuest, i: usize| {
        let hdr = Header::rw(
            key,
            SocketType::SeqPacket,
            packet as u32,
            0, // no EOM: the message goes on
            EndpointConfig::default().buf_alloc_bytes,
            0,
        );
        g.send_raw_timeout(&hdr, &pattern(i as u64, packet), STEP_TIMEOUT)
            .unwrap();
        g.flush_timeout(STEP_TIMEOUT).unwrap();
    };
    let parts = DOMSOCKD_BUF_ALLOC / packet;
    for i in 0..parts - 1 {
        part(&mut g, i);
    }
    // One packet short of the buffer: still a message in progress.
    let mut buf = [0u8; 16];
    g.poll(Some(Duration::from_millis(100))).unwrap();
    assert!(
        matches!(g.recv_msg(key, &mut buf), Err(SockError::WouldBlock)),
        "the connection ended before its message outgrew the buffer"
    );
    assert_eq!(b.counters(3).get("protocol_resets"), 0);

    let start = Instant::now();
    part(&mut g, parts - 1);
    let e = g.recv_msg_timeout(key, &mut buf, PROMPT).unwrap_err();
    assert!(
        matches!(e, SockError::Reset(_)),
        "a message as large as domsockd's buffer and unfinished was not reset: {}",
        chain(&e)
    );
    eprintln!(
        "reset {:?} after the packet that filled the buffer",
        start.elapsed()
    );
    join_polling(&mut g, host_side);
    let c = b.counters(3);
    assert_eq!(c.get("protocol_resets"), 1, "{c:?}");
}

/// domsockd's `LINGER_TIMEOUT_MS` (host-backend `tunables.rs`): how long guest data a
/// stopped device left behind may wait for a host reader.
const LINGER_LIMIT: Duration = Duration::from_secs(10);

/// Waits without reading until the peer of `s` closed its socket (`POLLHUP`, reported even
/// with unread data queued), at most `timeout`; returns when.
fn wait_peer_closed(s: &UnixStream, timeout: Duration) -> Option<Instant> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        let ms = u16::try_from(left.as_millis().min(1000)).unwrap_or(1000);
        // No events asked for: POLLHUP comes anyway, and nothing else nix cannot name.
        let mut fds = [PollFd::new(std::os::fd::AsFd::as_fd(s), PollFlags::empty())];
        poll(&mut fds, PollTimeout::from(ms)).unwrap();
        let ev = fds[0].revents().expect("poll flags nix knows");
        if ev.contains(PollFlags::POLLHUP) {
            return Some(Instant::now());
        }
    }
}

/// The device stops (guest gone) while domsockd holds guest data two paused host readers
/// have not taken. One reader resumes after a second and gets every byte, then EOF. The
/// other stays paused: after the linger limit (10 s) domsockd gives up, closes its end and
/// counts exactly what was not delivered in `lingered_bytes_lost`.
#[test]
fn lingering_guest_data_waits_for_the_linger_limit_and_no_longer() {
    let b = Backend::domsockd("linger", &[3]);
    let mut g = b.guest(0, GuestConfig::default());
    let listener = listen_stream(&b.vm(0).uds, 5400);
    let mut conns = Vec::new();
    for seed in [41u64, 42] {
        let key = g
            .connect_timeout(host(5400), SocketType::Stream, STEP_TIMEOUT)
            .unwrap();
        let s = accept(&listener);
        let data = pattern(seed, 16 * MIB);
        let sent = send_until_stalled(&mut g, key, &data);
        let held = sent - peek_queued(&s).len();
        assert!(held > 0, "domsockd holds nothing for connection {seed}");
        eprintln!("connection {seed}: guest sent {sent}, domsockd holds {held}");
        conns.push((s, seed, sent));
    }
    drop(g);
    let stopped = Instant::now();
    b.wait_for_log("device stopped", 1);

    let (mut timely, seed_t, sent_t) = conns.remove(0);
    let (mut paused, seed_p, sent_p) = conns.remove(0);
    let timely_reader = thread::spawn(move || {
        thread::sleep(Duration::from_secs(1));
        read_pattern_until_end(&mut timely, seed_t)
    });
    let closed =
        wait_peer_closed(&paused, LINGER_LIMIT + Duration::from_secs(3)).map(|t| t - stopped);
    let (got_t, _, err_t) = timely_reader.join().unwrap();
    assert_eq!(
        (got_t, err_t),
        (sent_t, None),
        "the reader that resumed after 1 s got {got_t} of {sent_t} bytes"
    );
    let closed = closed.unwrap_or_else(|| {
        panic!("domsockd still held the paused reader's connection after the linger limit")
    });
    eprintln!("paused reader's connection closed {closed:?} after the device stopped");
    assert!(
        closed >= LINGER_LIMIT - Duration::from_millis(200),
        "closed {closed:?} after the stop, before the linger limit"
    );
    paused.set_read_timeout(Some(STEP_TIMEOUT)).unwrap();
    let (got_p, _, err_p) = read_pattern_until_end(&mut paused, seed_p);
    assert_eq!(err_p, None);
    assert!(got_p < sent_p, "the paused reader got all {sent_p} bytes");
    let c = b.counters(3);
    assert_eq!(c.get("lingered_connections"), 2, "{c:?}");
    assert_eq!(
        c.get("lingered_bytes_lost"),
        (sent_p - got_p) as u64,
        "lost bytes miscounted: {c:?}"
    );
}

// ---- 3. RST paths -----------------------------------------------------------------------

#[test]
fn host_abrupt_close_while_sending_to_the_guest() {
    let b = Backend::domsockd("rst-host-h2g", &[3]);
    let mut g = b.guest(0, GuestConfig::default());
    g.listen(Port(6200), SocketType::Stream).unwrap();
    let uds = b.vm(0).uds.clone();
    const LEN: usize = 300 * KIB;
    let host_side = thread::spawn(move || {
        let (mut s, line) = host_connect(&uds, 6200);
        assert_eq!(line, "OK 6200");
        s.write_all(&pattern(41, LEN)).unwrap();
        // Closing with the guest's bytes unread makes this an abortive close for Unix
        // sockets: domsockd's end gets ECONNRESET after the data.
        let mut b = [0u8; 1];
        s.read_exact(&mut b).unwrap();
        drop(s);
        Instant::now()
    });
    let key = g.accept_timeout(Port(6200), STEP_TIMEOUT).unwrap();
    g.write_all(key, &[7u8; 10 * KIB], STEP_TIMEOUT).unwrap();
    let (got, end) = guest_read_until_end(&mut g, key);
    let ended = Instant::now();
    let closed_at = join_polling(&mut g, host_side);
    assert!(
        got.len() == LEN && got == pattern(41, LEN),
        "guest got {} bytes (or different ones) of the {LEN} the host wrote before closing",
        got.len()
    );
    assert!(
        matches!(end, None | Some(SockError::Reset(_))),
        "stream ended with {end:?}"
    );
    assert!(ended.saturating_duration_since(closed_at) < PROMPT);
    eprintln!(
        "host abortive close seen by the guest as {} after {:?}",
        end.map_or("EOF".to_string(), |e| e.to_string()),
        ended.saturating_duration_since(closed_at)
    );
    // Sending now fails instead of hanging.
    let e = g.write_all(key, b"late", PROMPT).unwrap_err();
    assert!(
        matches!(e, SockError::Reset(_) | SockError::BrokenPipe(_)),
        "{}",
        chain(&e)
    );
    g.close(key).unwrap();
}

#[test]
fn host_abrupt_close_while_the_guest_sends() {
    let b = Backend::domsockd("rst-host-g2h", &[3]);
    let mut g = b.guest(0, GuestConfig::default());
    let idle_fds = b.fd_count();
    let listener = listen_stream(&b.vm(0).uds, 5300);
    let host_side = thread::spawn(move || {
        let mut s = accept(&listener);
        let mut got = vec![0u8; 100 * KIB];
        s.read_exact(&mut got).unwrap();
        assert!(got == pattern(42, got.len()), "host got different bytes");
        drop(s);
        Instant::now()
    });
    let key = g
        .connect_timeout(host(5300), SocketType::Stream, STEP_TIMEOUT)
        .unwrap();
    let mut gen = PatternStream::new(42);
    let mut chunk = vec![0u8; MIB];
    let mut sent = 0usize;
    let e = loop {
        assert!(
            sent < 256 * MIB,
            "the guest sent {sent} bytes into a closed connection"
        );
        gen.fill(&mut chunk);
        match g.write_all(key, &chunk, Duration::from_secs(5)) {
            Ok(()) => sent += chunk.len(),
            Err(e) => break e,
        }
    };
    let failed = Instant::now();
    let closed_at = join_polling(&mut g, host_side);
    assert!(
        matches!(e, SockError::Reset(_) | SockError::BrokenPipe(_)),
        "guest write ended with {}",
        chain(&e)
    );
    let after = failed.saturating_duration_since(closed_at);
    eprintln!("host close seen by the sending guest as {e} after {after:?}");
    assert!(
        after < PROMPT,
        "guest noticed the host close after {after:?}"
    );
    g.close(key).unwrap();
    poll_until(&mut g, "the connection to be gone", STEP_TIMEOUT, |_| {
        b.fd_count() <= idle_fds
    });
}

#[test]
fn guest_close_while_the_host_sends() {
    let b = Backend::domsockd("rst-guest-h2g", &[3]);
    let mut g = b.guest(0, GuestConfig::default());
    let idle_fds = b.fd_count();
    g.listen(Port(6300), SocketType::Stream).unwrap();
    let uds = b.vm(0).uds.clone();
    let host_side = thread::spawn(move || {
        let (mut s, line) = host_connect(&uds, 6300);
        assert_eq!(line, "OK 6300");
        let (written, failed_at, kind) = write_pattern_until_error(&mut s, 43);
        let mut b = [0u8; 1];
        let read = s.read(&mut b).map_err(|e| e.kind());
        (written, failed_at, kind, read)
    });
    let key = g.accept_timeout(Port(6300), STEP_TIMEOUT).unwrap();
    let mut got = vec![0u8; 100 * KIB];
    g.read_exact(key, &mut got, STEP_TIMEOUT).unwrap();
    assert!(got == pattern(43, got.len()));
    let closed_at = Instant::now();
    g.close(key).unwrap();
    let (written, failed_at, kind, read) = join_polling(&mut g, host_side);
    let after = failed_at.saturating_duration_since(closed_at);
    eprintln!("guest close seen by the writing host as {kind:?} after {after:?} ({written} bytes written)");
    assert!(
        matches!(
            kind,
            io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
        ),
        "host write failed with {kind:?}"
    );
    assert!(
        after < PROMPT,
        "host noticed the guest close after {after:?}"
    );
    assert!(
        matches!(read, Ok(0) | Err(io::ErrorKind::ConnectionReset)),
        "host read after the close: {read:?}"
    );
    poll_until(&mut g, "the connection to be gone", STEP_TIMEOUT, |_| {
        b.fd_count() <= idle_fds
    });
}

#[test]
fn guest_connect_refused_at_once_when_the_host_path_is_no_listener_of_that_type() {
    let b = Backend::domsockd("rst-paths", &[3]);
    let mut g = b.guest(0, GuestConfig::default());
    let uds = b.vm(0).uds.clone();
    std::fs::write(port_path(&uds, 5400), b"not a socket").unwrap();
    std::fs::create_dir(port_path(&uds, 5401)).unwrap();
    // A socket file nobody listens on any more.
    drop(UnixListener::bind(port_path(&uds, 5402)).unwrap());
    let seq_listener = listen_seqpacket(&uds, 5403);
    let stream_listener = listen_stream(&uds, 5404);
    let cases = [
        (5400, SocketType::Stream, "regular file"),
        (5400, SocketType::SeqPacket, "regular file"),
        (5401, SocketType::Stream, "directory"),
        (5402, SocketType::Stream, "stale socket file"),
        (5402, SocketType::SeqPacket, "stale socket file"),
        (5403, SocketType::Stream, "stream to a seqpacket listener"),
        (
            5404,
            SocketType::SeqPacket,
            "seqpacket to a stream listener",
        ),
    ];
    for (port, ty, what) in cases {
        let start = Instant::now();
        let e = g.connect_timeout(host(port), ty, STEP_TIMEOUT).unwrap_err();
        let t = start.elapsed();
        assert!(matches!(e, SockError::Refused(_)), "{what}: {}", chain(&e));
        assert!(t < REFUSED_WITHIN, "{what}: refused after {t:?}");
        eprintln!("{ty:?} connect, {what}: refused in {t:?}");
    }
    // The mismatched listeners never saw a connection.
    for l in [&seq_listener, &stream_listener] {
        l.set_nonblocking(true).unwrap();
        assert!(matches!(l.accept(), Err(e) if e.kind() == io::ErrorKind::WouldBlock));
    }
    // The guest and the backend are fine.
    stream_to_host(&mut g, &uds, 5405, MIB, 64 * KIB);
    let c = b.counters(3);
    assert_eq!(c.get("refused_connections"), cases.len() as u64);
    assert_eq!(c.get("accepted_connections"), 1);
    c.assert_zero(FAILURES);
}

/// A host listener whose backlog is full (nobody accepts) refuses further guest connects at
/// once, and takes new ones again once the host accepts.
#[test]
fn full_host_backlog_refuses_at_once() {
    let b = Backend::domsockd("rst-backlog", &[3]);
    let mut g = b.guest(0, GuestConfig::default());
    let listener = listen_with_backlog(&b.vm(0).uds, 5500, 0);
    let mut pending = Vec::new();
    let refused = loop {
        assert!(
            pending.len() < 8,
            "a backlog of 0 took {} connections",
            pending.len()
        );
        let start = Instant::now();
        match g.connect_timeout(host(5500), SocketType::Stream, STEP_TIMEOUT) {
            Ok(k) => pending.push(k),
            Err(SockError::Refused(_)) => break start.elapsed(),
            Err(e) => panic!("{}", chain(&e)),
        }
    };
    assert!(!pending.is_empty(), "nothing got into the backlog");
    assert!(refused < REFUSED_WITHIN, "refused after {refused:?}");
    eprintln!(
        "backlog full after {} connections; the next refused in {refused:?}",
        pending.len()
    );
    // The pending connections work once accepted, in order, and free a backlog slot.
    for (i, &k) in pending.iter().enumerate() {
        g.write_all(k, &[i as u8; 3], STEP_TIMEOUT).unwrap();
    }
    let s = accept(&listener);
    let k = g
        .connect_timeout(host(5500), SocketType::Stream, STEP_TIMEOUT)
        .unwrap();
    pending.push(k);
    let mut streams = vec![s];
    for _ in 1..pending.len() {
        streams.push(accept(&listener));
    }
    g.write_all(k, &[pending.len() as u8 - 1; 3], STEP_TIMEOUT)
        .unwrap();
    for (i, mut s) in streams.into_iter().enumerate() {
        let mut got = [0u8; 3];
        s.read_exact(&mut got).unwrap();
        assert_eq!(got, [i as u8; 3]);
    }
    for k in pending {
        g.close(k).unwrap();
    }
    g.flush_timeout(STEP_TIMEOUT).unwrap();
    let c = b.counters(3);
    assert_eq!(c.get("refused_connections"), 1);
    c.assert_zero(FAILURES);
}

// ---- 4. multi-descriptor TX packets -----------------------------------------------------

#[test]
fn tx_packets_spread_over_many_descriptors() {
    let b = Backend::domsockd("tx-segs", &[3]);
    let uds = b.vm(0).uds.clone();
    let messages: &[usize] = &[1, 4095, 65_536, 65_537, 200_000];
    let configs = [
        (
            "Linux 6.12: header + 4 KiB page fragments",
            GuestConfig {
                tx_payload_segment_bytes: Some(4096),
                ..GuestConfig::default()
            },
            messages,
        ),
        (
            "1000-byte segments",
            GuestConfig {
                tx_payload_segment_bytes: Some(1000),
                queue_size: 1024,
                ..GuestConfig::default()
            },
            messages,
        ),
        (
            "header split at byte 20, 1000-byte segments",
            GuestConfig {
                tx_header_split_at: Some(20),
                tx_payload_segment_bytes: Some(1000),
                queue_size: 1024,
                ..GuestConfig::default()
            },
            messages,
        ),
        (
            "header split at byte 1, its last 43 bytes with the first 4093 payload bytes",
            GuestConfig {
                tx_header: HeaderPlacement::SameDescriptor,
                tx_header_split_at: Some(1),
                tx_payload_segment_bytes: Some(4093),
                ..GuestConfig::default()
            },
            messages,
        ),
        (
            "header split at byte 43, payload whole",
            GuestConfig {
                tx_header_split_at: Some(43),
                ..GuestConfig::default()
            },
            messages,
        ),
        (
            "one-byte segments, 1001-descriptor chains",
            GuestConfig {
                tx_payload_segment_bytes: Some(1),
                max_tx_payload_bytes: 1000,
                queue_size: 1024,
                ..GuestConfig::default()
            },
            // A message's packets go out together and one full packet takes 1001 of the
            // ring's 1024 descriptors: 1000 + 22 bytes is the largest message.
            &[1, 999, 1000, 1022][..],
        ),
    ];
    for (i, (what, cfg, sizes)) in configs.into_iter().enumerate() {
        let mut g = b.guest(0, cfg);
        let port = 5600 + 10 * i as u32;
        let start = Instant::now();
        // Full packets, then odd write sizes that cut packets at every offset.
        stream_to_host(&mut g, &uds, port, 4 * MIB, 64 * KIB);
        stream_to_host(&mut g, &uds, port + 1, MIB, 12_345);
        let listener = listen_seqpacket(&uds, port + 2);
        let expected = sizes.to_vec();
        let host_side = thread::spawn(move || {
            let s = accept(&listener);
            for (j, &n) in expected.iter().enumerate() {
                let m = recv_message(&s, 256 * KIB);
                assert!(m == pattern(j as u64, n), "message {j} of {n} bytes");
            }
        });
        let key = g
            .connect_timeout(host(port + 2), SocketType::SeqPacket, STEP_TIMEOUT)
            .unwrap();
        for (j, &n) in sizes.iter().enumerate() {
            g.send_msg_timeout(key, &pattern(j as u64, n), STEP_TIMEOUT)
                .unwrap_or_else(|e| panic!("{what}: message {j}: {}", chain(&e)));
        }
        if sizes.len() == 4 {
            // One byte more: the driver says so instead of waiting forever.
            let e = g.send_msg(key, &[0u8; 1023]).unwrap_err();
            assert!(
                matches!(
                    e,
                    SockError::MessageExceedsRing {
                        len: 1023,
                        descriptors: 1025,
                        ring: 1024
                    }
                ),
                "{}",
                chain(&e)
            );
        }
        join_polling(&mut g, host_side);
        g.close(key).unwrap();
        g.flush_timeout(STEP_TIMEOUT).unwrap();
        eprintln!(
            "{what}: 5 MiB + {} messages in {:?}",
            sizes.len(),
            start.elapsed()
        );
        let c = b.counters(3);
        c.assert_zero(FAILURES);
    }
}

// ---- 5. tiny RX buffers -----------------------------------------------------------------

#[test]
fn tiny_rx_buffers() {
    let b = Backend::domsockd("rx-tiny", &[3]);
    let uds = b.vm(0).uds.clone();
    let layouts = [
        (64, HeaderPlacement::SameDescriptor),
        (64, HeaderPlacement::SeparateDescriptor),
        (1, HeaderPlacement::SameDescriptor),
        (1, HeaderPlacement::SeparateDescriptor),
    ];
    for (i, (payload_bytes, header)) in layouts.into_iter().enumerate() {
        let cfg = GuestConfig {
            rx_layout: RxLayout {
                payload_bytes,
                header,
            },
            ..GuestConfig::default()
        };
        let mut g = b.guest(0, cfg);
        let port = 6400 + 10 * i as u32;
        let t = stream_from_host(&mut g, &uds, port, MIB, 64 * KIB);
        eprintln!("{payload_bytes}-byte RX buffers, header {header:?}: 1 MiB host->guest in {t:?}");
        // Seqpacket messages of 4 KiB arrive whole across thousands of tiny packets.
        let sizes = [4096usize, 1, 4096, 4095, 4097, 4096];
        let listener = listen_seqpacket(&uds, port + 1);
        let host_side = thread::spawn(move || {
            let mut s = accept(&listener);
            for (j, &n) in sizes.iter().enumerate() {
                assert_eq!(s.write(&pattern(j as u64, n)).unwrap(), n);
            }
            let mut b = [0u8; 1];
            assert_eq!(s.read(&mut b).unwrap(), 0, "expected EOF");
        });
        let key = g
            .connect_timeout(host(port + 1), SocketType::SeqPacket, STEP_TIMEOUT)
            .unwrap();
        let mut buf = vec![0u8; 8192];
        for (j, &n) in sizes.iter().enumerate() {
            let m = g
                .recv_msg_timeout(key, &mut buf, STEP_TIMEOUT)
                .unwrap_or_else(|e| panic!("message {j}: {}", chain(&e)))
                .expect("a message, not EOF");
            assert_eq!((m.len, m.msg_len), (n, n), "message {j}");
            assert!(buf[..n] == pattern(j as u64, n)[..], "message {j} differs");
        }
        g.close(key).unwrap();
        join_polling(&mut g, host_side);
        let s = g.stats();
        assert_eq!(
            (
                s.rx_bad_header,
                s.rx_short,
                s.rx_truncated,
                s.protocol_resets
            ),
            (0, 0, 0, 0),
            "{s:?}"
        );
        b.counters(3).assert_zero(FAILURES);
    }
}

// ---- 6. guest crash and reconnect -------------------------------------------------------

/// domsockd's log line when it is ready for the next guest session.
const WAITING_FOR_FRONTEND: &str = "waiting for frontend";

/// Runs one guest session that does nothing and waits until domsockd is ready for the next:
/// it prepares the next session's device when one ends, so its steady descriptor count is
/// reached only then. Returns that count.
fn idle_fds_after_a_first_session(b: &Backend) -> usize {
    drop(b.guest(0, GuestConfig::default()));
    b.wait_for_log(WAITING_FOR_FRONTEND, 2);
    b.fd_count()
}

/// A guest with live connections both ways is dropped without closing anything (a VM crash
/// or a killed QEMU): every host end sees the end of its stream promptly, domsockd gets back
/// to the descriptors it held before, and a new guest with the same
/// CID works.
#[test]
fn guest_crash_and_reconnect_five_times() {
    const PER_DIRECTION: usize = 8;
    const ROUNDS: usize = 5;
    let b = Backend::domsockd("crash", &[3]);
    let uds = b.vm(0).uds.clone();
    let idle_fds = idle_fds_after_a_first_session(&b);
    let mut peak_fds = 0;
    for round in 0..ROUNDS as u32 {
        let mut g = b.guest(0, GuestConfig::default());
        // Guest -> host, with data still flowing when the guest dies.
        let g2h_port = 5700 + round;
        let listener = listen_stream(&uds, g2h_port);
        let g2h_readers = thread::spawn(move || {
            (0..PER_DIRECTION)
                .map(|i| {
                    let mut s = accept(&listener);
                    s.set_read_timeout(Some(PROMPT * 3)).unwrap();
                    let seed = u64::from(round) * 100 + i as u64;
                    // The guest connects one after another, so the i-th accepted is its i-th.
                    thread::spawn(move || read_pattern_until_end(&mut s, seed))
                })
                .collect::<Vec<_>>()
        });
        let mut g2h = Vec::new();
        for i in 0..PER_DIRECTION {
            let k = g
                .connect_timeout(host(g2h_port), SocketType::Stream, STEP_TIMEOUT)
                .unwrap();
            let data = pattern(u64::from(round) * 100 + i as u64, MIB);
            g.write_all(k, &data[..64 * KIB], STEP_TIMEOUT).unwrap();
            g2h.push((k, data));
        }
        // domsockd has taken those 64 KiB each: the host must get at least that much.
        g.flush_timeout(STEP_TIMEOUT).unwrap();
        let g2h_readers = join_polling(&mut g, g2h_readers);
        // Host -> guest, the host writing as fast as it can.
        let h2g_port = 6700;
        g.listen(Port(h2g_port), SocketType::Stream).unwrap();
        let (tx, rx) = mpsc::channel();
        let uds2 = uds.clone();
        let connector = thread::spawn(move || {
            for i in 0..PER_DIRECTION {
                let (mut s, line) = host_connect(&uds2, h2g_port);
                assert_eq!(line, format!("OK {h2g_port}"));
                s.set_write_timeout(Some(PROMPT * 3)).unwrap();
                let seed = 1000 + i as u64;
                tx.send(thread::spawn(move || {
                    write_pattern_until_error(&mut s, seed)
                }))
                .unwrap();
            }
        });
        for i in 0..PER_DIRECTION {
            let k = g.accept_timeout(Port(h2g_port), STEP_TIMEOUT).unwrap();
            let mut got = vec![0u8; 10 * KIB];
            g.read_exact(k, &mut got, STEP_TIMEOUT).unwrap();
            assert!(got == pattern(1000 + i as u64, got.len()), "h2g {i}");
        }
        join_polling(&mut g, connector);
        let h2g_writers: Vec<_> = rx.try_iter().collect();
        assert_eq!(h2g_writers.len(), PER_DIRECTION);
        // More guest data in flight: whatever fits now.
        for (k, data) in &g2h {
            let _ = g.send(*k, &data[64 * KIB..]);
        }
        peak_fds = peak_fds.max(b.fd_count());

        let crashed_at = Instant::now();
        drop(g);

        for (i, r) in g2h_readers.into_iter().enumerate() {
            let (n, ended, err) = r.join().expect("host reader");
            let after = ended.saturating_duration_since(crashed_at);
            assert!(
                matches!(err, None | Some(io::ErrorKind::ConnectionReset)),
                "round {round}: g2h {i} ended with {err:?} after {n} bytes"
            );
            assert!(
                n >= 64 * KIB,
                "round {round}: g2h {i}: only {n} bytes arrived"
            );
            assert!(
                after < PROMPT,
                "round {round}: g2h {i} ended {after:?} after the crash"
            );
        }
        for (i, w) in h2g_writers.into_iter().enumerate() {
            let (_, failed, kind) = w.join().expect("host writer");
            let after = failed.saturating_duration_since(crashed_at);
            assert!(
                matches!(
                    kind,
                    io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
                ),
                "round {round}: h2g {i} write failed with {kind:?}"
            );
            assert!(
                after < PROMPT,
                "round {round}: h2g {i} ended {after:?} after the crash"
            );
        }
        b.wait_for_log(WAITING_FOR_FRONTEND, round as usize + 3);
        wait_fds_at_most(&b, idle_fds, STEP_TIMEOUT, &format!("round {round}"));
    }
    // A last guest works normally.
    let mut g = b.guest(0, GuestConfig::default());
    stream_to_host(&mut g, &uds, 5790, 2 * MIB, 64 * KIB);
    stream_from_host(&mut g, &uds, 6790, 2 * MIB, 64 * KIB);
    drop(g);
    b.wait_for_log(WAITING_FOR_FRONTEND, ROUNDS + 3);
    let fds = b.fd_count();
    let c = b.counters(3);
    eprintln!(
        "fds: idle {idle_fds}, peak {peak_fds}, after {} sessions {fds}",
        ROUNDS + 1
    );
    assert!(
        fds <= idle_fds,
        "{fds} fds after the sessions, {idle_fds} before"
    );
    assert_eq!(c.get("device_stops"), ROUNDS as u64 + 2, "{c:?}");
    c.assert_zero(&[
        "malformed_chains",
        "bad_headers",
        "spoofed_packets",
        "protocol_resets",
        "lingered_bytes_lost",
    ]);
}

/// Guest sessions that come and go leave domsockd's descriptor count where it was.
///
/// vhost-user-backend 0.24's `VringEpollHandler::new` registers the exit `EventConsumer`
/// that the backend's `exit_event()` returns with `consumer.into_raw_fd()` and never closes
/// it; domsockd closes it once the session's daemon is gone (`close_leaked_fds`).
#[test]
fn guest_sessions_leak_no_file_descriptors() {
    let b = Backend::domsockd("fd-leak", &[3]);
    let uds = b.vm(0).uds.clone();
    let idle_fds = idle_fds_after_a_first_session(&b);
    for n in 0..5usize {
        let mut g = b.guest(0, GuestConfig::default());
        stream_to_host(&mut g, &uds, 5800 + n as u32, 64 * KIB, 4096);
        drop(g);
        b.wait_for_log(WAITING_FOR_FRONTEND, n + 3);
        wait_fds_at_most(&b, idle_fds, PROMPT, &format!("after session {}", n + 2));
    }
}
