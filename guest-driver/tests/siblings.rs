//! Guest-to-guest ("siblings") through a real `domsockd` process, driven by user-space
//! guests: streams both ways at once checked byte-exact (also into tiny RX buffers),
//! seqpacket boundaries, many connections at once, closes and a guest that vanishes, the
//! policy (groups, `[[policy.allow]]` rules, `guest-to-host = "rules"`, default deny,
//! namespaces, SIGHUP reload of rules and groups, a broken file on reload), the control
//! service at CID 2 port 1023, the all-guests host listener and its preamble, forged source
//! CIDs and packets outside any handshake, credit overruns, a receiver that stops taking
//! packets, the backlog bounds for such receivers (8 MiB each, 64 MiB together), and a
//! connect to a guest whose device has only just come up.
//!
//! Every case runs its own domsockd in its own temp dir, configured with `--vm` flags or a
//! `--config` file there (see `support::Backend::spawn_with`). A guest is single-threaded
//! and moves only when polled, so a connection between two guests of one thread is made by
//! polling both ([`connect_pair`]); a guest that is never polled again stops consuming its
//! RX ring, which is how the hostile receiver is played. Needs `target/release/domsockd`
//! or `$DOMSOCKD`, like `domsockd.rs`.

mod support;

use domsock_guest::pattern::{Checksum, PatternStream};
use domsock_guest::uvirtio::{
    Cid, ConnKey, EndpointConfig, GuestConfig, HeaderPlacement, Op, Port, RxLayout, Shutdown,
    SockError, SocketType, UserGuest, VsockAddr,
};
use domsock_proto::control::{
    split_line, PeerPreamble, Reply, Request, CONTROL_PORT, MAX_LIST_LINE_BYTES,
};
use domsock_proto::packet::HeaderBuilder;
use domsock_proto::test_utils::Rng;
use domsock_proto::Header;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};
use support::*;

const KIB: usize = 1024;
const MIB: usize = 1024 * KIB;
/// A refused or denied connect must be answered at least this fast.
const REFUSED_WITHIN: Duration = Duration::from_millis(500);
/// Bound on a connect that is expected to fail: long enough to see a wrongful success.
const FAIL_WAIT: Duration = Duration::from_secs(2);
/// How long a guest is polled to show that nothing arrives.
const QUIET: Duration = Duration::from_millis(200);
/// Bound on a policy reload taking effect.
const RELOAD_WITHIN: Duration = Duration::from_secs(3);

/// Failure counters that must stay 0 where a case does not provoke them.
const FAILURES: &[&str] = &[
    "malformed_chains",
    "bad_headers",
    "spoofed_packets",
    "unroutable_packets",
    "protocol_resets",
    "host_errors",
    "denied_connections",
];

// ---- helpers ----------------------------------------------------------------------------

fn addr(cid: u64, port: u32) -> VsockAddr {
    VsockAddr::new(Cid(cid), Port(port))
}

/// A guest on the VM with `cid` whose device domsockd has certainly started serving: one
/// control-service round trip (WHOAMI, which must name `cid`) has gone through its queues.
/// Tests of other things start from here, so they do not depend on how soon domsockd
/// admits guest-to-guest traffic to a device that just came up; that has its own test
/// (`connect_to_a_guest_right_after_it_started`).
fn ready(b: &Backend, cid: u64, cfg: GuestConfig) -> UserGuest {
    let mut g = b.guest_on(cid, cfg);
    let mut ctl = ControlClient::connect(&mut g);
    match ctl.call(&mut g, &Request::WhoAmI) {
        Reply::Identity(id) => assert_eq!(id.cid, Cid(cid), "WHOAMI of {cid}: {id:?}"),
        r => panic!("WHOAMI of {cid}: {r:?}"),
    }
    g.close(ctl.key).unwrap();
    g
}

/// Polls `g` for [`QUIET`], so that what was still in flight (e.g. the end of `ready`'s
/// control connection) has arrived before a test counts packets.
fn settle(g: &mut UserGuest) {
    let until = Instant::now() + QUIET;
    while Instant::now() < until {
        g.poll(Some(Duration::from_millis(5))).unwrap();
    }
}

/// Polls each guest once without sleeping.
fn poll_all(gs: &mut [&mut UserGuest]) {
    for g in gs.iter_mut() {
        g.poll(Some(Duration::ZERO))
            .unwrap_or_else(|e| panic!("poll guest {}: {}", g.cid(), chain(&e)));
    }
}

/// `a` connects to `b`'s listener on `port` (`b` must listen), both polled until `a` is
/// connected and `b` accepted. Returns `(a's key, b's key)`.
fn connect_pair(
    a: &mut UserGuest,
    b: &mut UserGuest,
    port: u32,
    ty: SocketType,
) -> (ConnKey, ConnKey) {
    let peer = addr(b.cid().0, port);
    let ka = a.start_connect(peer, ty).unwrap();
    let deadline = Instant::now() + STEP_TIMEOUT;
    let mut kb = None;
    loop {
        if kb.is_none() {
            kb = b.accept(Port(port)).unwrap();
        }
        let connected = a
            .is_connected(ka)
            .unwrap_or_else(|e| panic!("{} -> {peer} ({ty:?}): {}", a.cid(), chain(&e)));
        if let (true, Some(kb)) = (connected, kb) {
            return (ka, kb);
        }
        assert!(
            Instant::now() < deadline,
            "{} -> {peer}: connected {connected}, accepted {}",
            a.cid(),
            kb.is_some()
        );
        a.poll(Some(Duration::from_millis(1))).unwrap();
        b.poll(Some(Duration::from_millis(1))).unwrap();
    }
}

/// `a` connects to `peer` while `others` are polled too (they may hold the listener);
/// returns the outcome within `timeout` and how long it took. A connect still pending at
/// the deadline is closed and reported as `ConnectTimedOut`.
fn try_connect(
    a: &mut UserGuest,
    others: &mut [&mut UserGuest],
    peer: VsockAddr,
    ty: SocketType,
    timeout: Duration,
) -> (Result<ConnKey, SockError>, Duration) {
    let start = Instant::now();
    let key = a.start_connect(peer, ty).unwrap();
    loop {
        match a.is_connected(key) {
            Ok(true) => return (Ok(key), start.elapsed()),
            Ok(false) => {}
            Err(e) => {
                a.close(key).unwrap();
                return (Err(e), start.elapsed());
            }
        }
        if start.elapsed() >= timeout {
            a.close(key).unwrap();
            return (Err(SockError::ConnectTimedOut(key)), start.elapsed());
        }
        poll_all(others);
        a.poll(Some(Duration::from_millis(1))).unwrap();
    }
}

/// `a`'s connect to `peer` must be refused (RST) within [`REFUSED_WITHIN`], and `listener`
/// (the guest listening at `peer`, polled meanwhile) must see no connection on its port.
fn expect_refused(
    a: &mut UserGuest,
    listener: Option<&mut UserGuest>,
    peer: VsockAddr,
    ty: SocketType,
) -> Duration {
    let mut others: Vec<&mut UserGuest> = listener.into_iter().collect();
    let (r, t) = try_connect(a, &mut others, peer, ty, FAIL_WAIT);
    match r {
        Err(SockError::Refused(_)) => {}
        Ok(k) => panic!("{} -> {peer} ({ty:?}) connected as {k}", a.cid()),
        Err(e) => panic!("{} -> {peer} ({ty:?}): {} after {t:?}", a.cid(), chain(&e)),
    }
    assert!(
        t < REFUSED_WITHIN,
        "{} -> {peer} ({ty:?}) refused only after {t:?}",
        a.cid()
    );
    if let Some(l) = others.pop() {
        expect_no_accept(l, peer.port.0);
    }
    t
}

/// Polls `g` for [`QUIET`]; nothing may be accepted on `port` (if `g` listens there).
fn expect_no_accept(g: &mut UserGuest, port: u32) {
    let until = Instant::now() + QUIET;
    while Instant::now() < until {
        match g.accept(Port(port)) {
            Ok(Some(k)) => panic!("guest {} accepted {k} on port {port}", g.cid()),
            Ok(None) | Err(SockError::NotListening(_)) => {}
            Err(e) => panic!("guest {}: accept on {port}: {}", g.cid(), chain(&e)),
        }
        g.poll(Some(Duration::from_millis(5))).unwrap();
    }
}

/// Sends `len` pattern bytes for `seed` on `key` in writes of up to `chunk` bytes while
/// reading what the peer sends, then shuts our sending side; returns once the peer's EOF
/// arrived too, with (what we sent, what we received).
fn duplex(
    g: &mut UserGuest,
    key: ConnKey,
    seed: u64,
    len: usize,
    chunk: usize,
) -> (Checksum, Checksum) {
    let mut gen = PatternStream::new(seed);
    let (mut sent, mut got) = (Checksum::new(), Checksum::new());
    let mut out = vec![0u8; chunk];
    let (mut out_off, mut out_len, mut generated) = (0usize, 0usize, 0usize);
    let mut inbuf = vec![0u8; 256 * KIB];
    let (mut shut, mut eof) = (false, false);
    let deadline = Instant::now() + STEP_TIMEOUT;
    while !(shut && eof) {
        assert!(
            Instant::now() < deadline,
            "guest {}: sent {} of {len}, received {} (eof {eof})",
            g.cid(),
            sent.bytes(),
            got.bytes()
        );
        let mut progress = false;
        if !shut {
            if out_off == out_len && generated < len {
                let n = chunk.min(len - generated);
                gen.fill(&mut out[..n]);
                sent.update(&out[..n]);
                (out_off, out_len) = (0, n);
                generated += n;
            }
            if out_off < out_len {
                match g.send(key, &out[out_off..out_len]) {
                    Ok(n) => {
                        out_off += n;
                        progress = true;
                    }
                    Err(SockError::WouldBlock) => {}
                    Err(e) => panic!(
                        "guest {} send after {} bytes: {}",
                        g.cid(),
                        generated - (out_len - out_off),
                        chain(&e)
                    ),
                }
            }
            if out_off == out_len && generated == len {
                g.shutdown(key, Shutdown::SEND).unwrap();
                shut = true;
            }
        }
        if !eof {
            match g.recv(key, &mut inbuf) {
                Ok(0) => eof = true,
                Ok(n) => {
                    got.update(&inbuf[..n]);
                    progress = true;
                }
                Err(SockError::WouldBlock) => {}
                Err(e) => panic!(
                    "guest {} recv after {} bytes: {}",
                    g.cid(),
                    got.bytes(),
                    chain(&e)
                ),
            }
        }
        if !progress {
            g.poll(Some(Duration::from_millis(5))).unwrap();
        }
    }
    (sent, got)
}

/// 64 MiB (`len`) each way at once between `a` and `b` over one stream, one thread per
/// guest; checks both directions byte-exact. Returns the guests and the elapsed time.
fn duplex_pair(
    mut a: UserGuest,
    mut b: UserGuest,
    port: u32,
    len: usize,
) -> (UserGuest, UserGuest, Duration) {
    b.listen(Port(port), SocketType::Stream).unwrap();
    let (ka, kb) = connect_pair(&mut a, &mut b, port, SocketType::Stream);
    let start = Instant::now();
    let ta = thread::spawn(move || {
        let r = duplex(&mut a, ka, 1, len, MIB);
        a.close(ka).unwrap();
        (a, r)
    });
    let tb = thread::spawn(move || {
        let r = duplex(&mut b, kb, 2, len, MIB);
        b.close(kb).unwrap();
        (b, r)
    });
    let (a, (a_sent, a_got)) = ta.join().expect("guest a thread");
    let (b, (b_sent, b_got)) = tb.join().expect("guest b thread");
    let t = start.elapsed();
    for (what, sent, got) in [("a->b", &a_sent, &b_got), ("b->a", &b_sent, &a_got)] {
        assert_eq!(sent.bytes(), len as u64, "{what}: sent");
        assert_eq!(got.bytes(), len as u64, "{what}: received");
        assert_eq!(got.digest(), sent.digest(), "{what}: different bytes");
    }
    (a, b, t)
}

/// Guest stats that must stay 0 on a well-behaved device.
fn assert_clean(g: &UserGuest) {
    let s = g.stats();
    assert_eq!(
        (
            s.rx_bad_header,
            s.rx_short,
            s.rx_truncated,
            s.rx_misaddressed,
            s.protocol_resets
        ),
        (0, 0, 0, 0, 0),
        "guest {}: {s:?}",
        g.cid()
    );
}

/// A line-oriented control-service client on one guest connection.
struct ControlClient {
    key: ConnKey,
    pending: Vec<u8>,
}

impl ControlClient {
    fn connect(g: &mut UserGuest) -> Self {
        let key = g
            .connect_timeout(
                VsockAddr::new(Cid::HOST, CONTROL_PORT),
                SocketType::Stream,
                STEP_TIMEOUT,
            )
            .unwrap_or_else(|e| panic!("guest {}: control connect: {}", g.cid(), chain(&e)));
        Self {
            key,
            pending: Vec::new(),
        }
    }

    /// Sends `line` (newline included) and returns the reply line.
    fn call_raw(&mut self, g: &mut UserGuest, line: &str) -> String {
        g.write_all(self.key, line.as_bytes(), STEP_TIMEOUT)
            .unwrap_or_else(|e| panic!("control write {line:?}: {}", chain(&e)));
        let mut buf = [0u8; 4096];
        loop {
            if let Some((reply, used)) = split_line(&self.pending, MAX_LIST_LINE_BYTES)
                .unwrap_or_else(|e| panic!("control reply to {line:?}: {e}"))
            {
                let reply = reply.to_string();
                self.pending.drain(..used);
                assert!(
                    self.pending.is_empty(),
                    "more than one reply line to {line:?}: {reply:?} then {:?}",
                    String::from_utf8_lossy(&self.pending)
                );
                return reply;
            }
            let n = g
                .recv_timeout(self.key, &mut buf, STEP_TIMEOUT)
                .unwrap_or_else(|e| panic!("control reply to {line:?}: {}", chain(&e)));
            assert!(
                n > 0,
                "control service closed before replying to {line:?} (got {:?})",
                String::from_utf8_lossy(&self.pending)
            );
            self.pending.extend_from_slice(&buf[..n]);
        }
    }

    fn call(&mut self, g: &mut UserGuest, req: &Request) -> Reply {
        let line = self.call_raw(g, &req.encode());
        Reply::parse(req, &line).unwrap_or_else(|e| panic!("reply to {req:?}: {e}"))
    }
}

/// Reads one `\n`-terminated line byte by byte (nothing after it is consumed).
fn read_line(s: &mut UnixStream) -> Vec<u8> {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while line.len() < 512 {
        match s.read(&mut b) {
            Ok(0) => panic!("EOF after {:?}", String::from_utf8_lossy(&line)),
            Ok(_) => {
                line.push(b[0]);
                if b[0] == b'\n' {
                    return line;
                }
            }
            Err(e) => panic!("reading a line after {line:?}: {e}"),
        }
    }
    panic!("no newline in {:?}", String::from_utf8_lossy(&line));
}

/// A SOCK_SEQPACKET listener at `path`.
fn listen_seqpacket_at(path: &Path) -> UnixListener {
    use nix::sys::socket::UnixAddr;
    use nix::sys::socket::{bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType};
    use std::os::fd::AsRawFd;
    let fd = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .unwrap();
    bind(fd.as_raw_fd(), &UnixAddr::new(path).unwrap()).unwrap();
    listen(&fd, Backlog::new(16).unwrap()).unwrap();
    UnixListener::from(fd)
}

/// Whether `l` has a connection waiting (it is taken and returned).
fn try_accept(l: &UnixListener) -> Option<UnixStream> {
    l.set_nonblocking(true).unwrap();
    match l.accept() {
        Ok((s, _)) => Some(s),
        Err(e) if e.kind() == ErrorKind::WouldBlock => None,
        Err(e) => panic!("accept: {e}"),
    }
}

/// What ended a connection from `g`'s side: `Ok(())` once a read sees EOF or reset, or the
/// error text; waits at most `timeout`, polling `others` too.
fn wait_connection_end(
    g: &mut UserGuest,
    others: &mut [&mut UserGuest],
    key: ConnKey,
    timeout: Duration,
) -> Result<&'static str, String> {
    let deadline = Instant::now() + timeout;
    let mut buf = vec![0u8; 64 * KIB];
    loop {
        match g.recv(key, &mut buf) {
            Ok(0) => return Ok("EOF"),
            Ok(_) => {}
            Err(SockError::Reset(_)) => return Ok("reset"),
            Err(SockError::WouldBlock) => {}
            Err(e) => return Err(chain(&e)),
        }
        if Instant::now() >= deadline {
            return Err(format!("still open after {timeout:?}"));
        }
        poll_all(others);
        g.poll(Some(Duration::from_millis(2))).unwrap();
    }
}

/// `from` sends 100 kB on `kf` that `to` reads intact on `kt`.
fn one_way(from: &mut UserGuest, kf: ConnKey, to: &mut UserGuest, kt: ConnKey, seed: u64) {
    let msg = pattern(seed, 100_000);
    from.write_all(kf, &msg, STEP_TIMEOUT)
        .unwrap_or_else(|e| panic!("{} write: {}", from.cid(), chain(&e)));
    let mut got = vec![0u8; msg.len()];
    to.read_exact(kt, &mut got, STEP_TIMEOUT)
        .unwrap_or_else(|e| panic!("{} read: {}", to.cid(), chain(&e)));
    assert!(
        got == msg,
        "{} -> {}: different bytes",
        from.cid(),
        to.cid()
    );
}

/// `from` sends `len` pattern bytes on `kf` and shuts its sending side; `to` reads them to
/// EOF on `kt`, checked byte-exact. One thread: the two guests are polled in turn.
fn transfer(from: &mut UserGuest, kf: ConnKey, to: &mut UserGuest, kt: ConnKey, len: usize) {
    let data = pattern(len as u64, len);
    let (mut off, mut shut) = (0usize, false);
    let mut got = Vec::with_capacity(len);
    let mut buf = vec![0u8; 256 * KIB];
    let deadline = Instant::now() + STEP_TIMEOUT;
    loop {
        assert!(
            Instant::now() < deadline,
            "{} -> {}: sent {off}, received {} of {len}",
            from.cid(),
            to.cid(),
            got.len()
        );
        if off < len {
            match from.send(kf, &data[off..(off + MIB).min(len)]) {
                Ok(n) => off += n,
                Err(SockError::WouldBlock) => {}
                Err(e) => panic!("send after {off} bytes: {}", chain(&e)),
            }
        } else if !shut {
            from.shutdown(kf, Shutdown::SEND).unwrap();
            shut = true;
        }
        match to.recv(kt, &mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(SockError::WouldBlock) => {}
            Err(e) => panic!("recv after {} bytes: {}", got.len(), chain(&e)),
        }
        from.poll(Some(Duration::from_millis(1))).unwrap();
        to.poll(Some(Duration::from_millis(1))).unwrap();
    }
    assert_eq!(got.len(), len, "{} -> {}: length", from.cid(), to.cid());
    assert!(
        got == data,
        "{} -> {}: different bytes",
        from.cid(),
        to.cid()
    );
}

/// A short exchange both ways between `a` (`ka`) and `b` (`kb`).
fn exchange(a: &mut UserGuest, ka: ConnKey, b: &mut UserGuest, kb: ConnKey, seed: u64) {
    one_way(a, ka, b, kb, seed);
    one_way(b, kb, a, ka, seed + 1);
}

// ---- 1. streams both ways ---------------------------------------------------------------

#[test]
fn stream_64_mib_both_ways_between_group_members() {
    // Groups on the command line (`groups=a+b`); the tiny-buffer pair shares another group.
    let vms = [
        VmOpts::new(3).groups(&["pair", "other"]),
        VmOpts::new(4).groups(&["pair"]),
        VmOpts::new(5).groups(&["tiny"]),
        VmOpts::new(6).groups(&["x", "tiny"]),
    ];
    let b = Backend::domsockd_with("g2g-duplex", &vms, None);
    let (ga, gb, t) = duplex_pair(
        ready(&b, 3, GuestConfig::default()),
        ready(&b, 4, GuestConfig::default()),
        5000,
        64 * MIB,
    );
    eprintln!(
        "g2g 64 MiB each way at once in 1 MiB writes: {t:?} ({:.1} MB/s per direction)",
        mbps(64 * MIB as u64, t)
    );
    assert_clean(&ga);
    assert_clean(&gb);

    // The receiver of each direction posts 1000-byte RX buffers (header in a descriptor of
    // its own) on one side and Linux 6.1's layout on the other: 64 KiB packets are split.
    let tiny = GuestConfig {
        rx_layout: RxLayout {
            payload_bytes: 1000,
            header: HeaderPlacement::SeparateDescriptor,
        },
        ..GuestConfig::default()
    };
    let linux61 = GuestConfig {
        rx_layout: RxLayout::LINUX_6_1,
        ..GuestConfig::default()
    };
    let (gc, gd, t) = duplex_pair(ready(&b, 5, linux61), ready(&b, 6, tiny), 5001, 64 * MIB);
    eprintln!("g2g 64 MiB each way, one side with 1000-byte RX buffers: {t:?}");
    assert_clean(&gc);
    assert_clean(&gd);
    assert!(
        gd.stats().rx_packets >= (64 * MIB / 1000) as u64,
        "the tiny receiver got fewer packets than 1000-byte pieces: {:?}",
        gd.stats()
    );

    for cid in [3, 4, 5, 6] {
        let c = b.counters(cid);
        c.assert_zero(FAILURES);
        // Each VM sent and received 64 MiB guest-to-guest, however the daemon attributes
        // g2g traffic (sender, receiver or both).
        assert!(
            c.get("g2g_bytes") >= 64 * MIB as u64,
            "VM {cid}: g2g_bytes {c:?}"
        );
        assert!(
            c.get("g2g_packets") >= (64 * MIB / (64 * KIB)) as u64,
            "VM {cid}: g2g_packets {c:?}"
        );
    }
}

/// Linux readers that keep up send a credit update after nearly every read (whenever the
/// receive queue runs empty): dozens per TX batch. Only the last of a batch's run for one
/// connection tells the other guest anything, and a data packet that follows tells it as
/// much (every header carries the sender's credit), so domsockd forwards none of the
/// others: forwarding them cost the receiving guest an RX buffer and a wake-up each and
/// opened its window in RX-buffer steps (issue 8, item 8: 11 MB/s each way between two
/// 6.1 guests). The receiver must still end up with the newest credit.
#[test]
fn superseded_credit_updates_are_not_forwarded() {
    let vms = [
        VmOpts::new(3).name("a").groups(&["g"]),
        VmOpts::new(4).name("b").groups(&["g"]),
    ];
    let b = Backend::domsockd_with("g2g-credit-merge", &vms, None);
    let mut ga = ready(&b, 3, GuestConfig::default());
    let mut gb = ready(&b, 4, GuestConfig::default());
    gb.listen(Port(7000), SocketType::Stream).unwrap();
    let (ka, kb) = connect_pair(&mut ga, &mut gb, 7000, SocketType::Stream);
    // 100,000 bytes each way; a has read all of b's, so its true fwd_cnt is 100,000.
    exchange(&mut ga, ka, &mut gb, kb, 1);
    settle(&mut ga);
    settle(&mut gb);
    let mut fwd_cnt = 100_000;
    let credit = |buf_alloc: u32, fwd_cnt: u32, op: Op, len: u32| {
        HeaderBuilder::new(ka.local, ka.peer, op)
            .socket_type(SocketType::Stream)
            .len(len)
            .credit(buf_alloc, fwd_cnt)
            .build()
    };
    // What b may send after a's newest header (a has read everything of b's before), which
    // a then reads.
    let credit_b_sees = |gb: &mut UserGuest, ga: &mut UserGuest| {
        let n = gb.send(kb, &vec![b'c'; 200 * KIB]).unwrap();
        let mut got = vec![0u8; n];
        ga.read_exact(ka, &mut got, STEP_TIMEOUT).unwrap();
        n as u32
    };
    let merged_before = b.counters(3).get("g2g_credit_updates_merged");

    // 32 credit updates in one TX batch, each advertising a different buf_alloc.
    let run = |fwd_cnt: u32| -> Vec<Header> {
        (0..32)
            .map(|i| credit(40_000 + i, fwd_cnt, Op::CreditUpdate, 0))
            .collect()
    };
    let run1 = run(fwd_cnt);
    let packets: Vec<(Header, &[u8])> = run1.iter().map(|h| (*h, &[][..])).collect();
    let rx_before = gb.stats().rx_packets;
    ga.send_raw_batch_timeout(&packets, STEP_TIMEOUT).unwrap();
    settle(&mut gb);
    assert_eq!(
        gb.stats().rx_packets - rx_before,
        1,
        "b got more than the last of 32 credit updates sent in one batch"
    );
    let sent = credit_b_sees(&mut gb, &mut ga);
    assert_eq!(sent, 40_031, "b's view of a's buf_alloc");
    fwd_cnt += sent;
    // Whatever a's reads of that made it send goes first.
    settle(&mut ga);
    settle(&mut gb);

    // A run of credit updates that a data packet of the same batch follows: only the data
    // packet arrives, and its header's credit is what b ends up with.
    let data = [b'd'; 100];
    let run2 = run(fwd_cnt);
    let mut packets: Vec<(Header, &[u8])> = run2.iter().map(|h| (*h, &[][..])).collect();
    packets.push((
        credit(50_000, fwd_cnt, Op::Rw, data.len() as u32),
        &data[..],
    ));
    let rx_before = gb.stats().rx_packets;
    ga.send_raw_batch_timeout(&packets, STEP_TIMEOUT).unwrap();
    settle(&mut gb);
    assert_eq!(
        gb.stats().rx_packets - rx_before,
        1,
        "b got credit updates that a later data packet of the batch superseded"
    );
    let mut got = [0u8; 100];
    gb.read_exact(kb, &mut got, STEP_TIMEOUT).unwrap();
    assert_eq!(got, data);
    assert_eq!(
        credit_b_sees(&mut gb, &mut ga),
        50_000,
        "b's view of a's buf_alloc"
    );

    // At least those 31 + 32 (a's own reads may have added a few of its own).
    let c = b.counters(3);
    assert!(
        c.get("g2g_credit_updates_merged") - merged_before >= 31 + 32,
        "{c:?}"
    );
    c.assert_zero(FAILURES);
    b.counters(4).assert_zero(FAILURES);
    // Both guests still work (on a new connection: a's own accounting of the old one does
    // not know about the forged data packet).
    let (ka, kb) = connect_pair(&mut ga, &mut gb, 7000, SocketType::Stream);
    exchange(&mut ga, ka, &mut gb, kb, 2);
}

// ---- 2. seqpacket -----------------------------------------------------------------------

#[test]
fn seqpacket_between_group_members_keeps_boundaries() {
    // Groups in the config file (`groups = [..]`).
    let vms = [
        VmOpts::new(3).name("left").groups(&["seq"]),
        VmOpts::new(4).name("right").groups(&["seq"]),
    ];
    let b = Backend::domsockd_with("g2g-seq", &vms, Some(""));
    let mut sizes = vec![1usize, 4096, 65_536];
    // A few more sizes in between, from a fixed-seed LCG.
    let mut x: u64 = 0x5eed;
    for _ in 0..6 {
        x = x
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        sizes.push(2 + (x >> 33) as usize % 65_533);
    }
    sizes.extend([4095, 4097, 65_535, 200_000]);
    let tiny = GuestConfig {
        rx_layout: RxLayout {
            payload_bytes: 700,
            header: HeaderPlacement::SameDescriptor,
        },
        ..GuestConfig::default()
    };
    for (round, bcfg) in [GuestConfig::default(), tiny].into_iter().enumerate() {
        let mut ga = ready(&b, 3, GuestConfig::default());
        let mut gb = ready(&b, 4, bcfg);
        let port = 6000 + round as u32;
        gb.listen(Port(port), SocketType::SeqPacket).unwrap();
        let (ka, kb) = connect_pair(&mut ga, &mut gb, port, SocketType::SeqPacket);
        let mut buf = vec![0u8; 256 * KIB];
        // Lock step: each message to b, checked, and echoed back to a.
        for (i, &n) in sizes.iter().enumerate() {
            let msg = pattern(i as u64, n);
            ga.send_msg_timeout(ka, &msg, STEP_TIMEOUT)
                .unwrap_or_else(|e| panic!("round {round}: send {i} ({n} B): {}", chain(&e)));
            let m = gb
                .recv_msg_timeout(kb, &mut buf, STEP_TIMEOUT)
                .unwrap_or_else(|e| panic!("round {round}: recv {i} ({n} B): {}", chain(&e)))
                .expect("a message, not EOF");
            assert_eq!((m.len, m.msg_len), (n, n), "round {round}: message {i}");
            assert!(buf[..n] == msg[..], "round {round}: message {i} differs");
            gb.send_msg_timeout(kb, &buf[..n], STEP_TIMEOUT).unwrap();
            let m = ga
                .recv_msg_timeout(ka, &mut buf, STEP_TIMEOUT)
                .unwrap()
                .expect("an echo, not EOF");
            assert_eq!((m.len, m.msg_len), (n, n), "round {round}: echo {i}");
            assert!(buf[..n] == msg[..], "round {round}: echo {i} differs");
        }
        // Pipelined: many small messages in flight at once stay separate and in order.
        let small: Vec<usize> = (0..200).map(|i| 1 + (i * 37) % 1200).collect();
        for (i, &n) in small.iter().enumerate() {
            ga.send_msg_timeout(ka, &pattern(1000 + i as u64, n), STEP_TIMEOUT)
                .unwrap();
        }
        for (i, &n) in small.iter().enumerate() {
            let m = gb
                .recv_msg_timeout(kb, &mut buf, STEP_TIMEOUT)
                .unwrap()
                .expect("a message");
            assert_eq!((m.len, m.msg_len), (n, n), "round {round}: pipelined {i}");
            assert!(buf[..n] == pattern(1000 + i as u64, n)[..]);
        }
        ga.close(ka).unwrap();
        assert!(
            gb.recv_msg_timeout(kb, &mut buf, STEP_TIMEOUT)
                .unwrap()
                .is_none(),
            "expected EOF after the peer closed"
        );
        gb.close(kb).unwrap();
        assert_clean(&ga);
        assert_clean(&gb);
    }
    // The peer guest's own refusals pass through: no listener on the port, and a stream
    // connect to a seqpacket listener. Neither is a policy denial.
    let mut ga = ready(&b, 3, GuestConfig::default());
    let mut gb = ready(&b, 4, GuestConfig::default());
    gb.listen(Port(6100), SocketType::SeqPacket).unwrap();
    expect_refused(&mut ga, Some(&mut gb), addr(4, 6101), SocketType::SeqPacket);
    expect_refused(&mut ga, Some(&mut gb), addr(4, 6100), SocketType::Stream);
    assert!(gb.stats().refused_requests >= 2, "{:?}", gb.stats());
    for cid in [3, 4] {
        b.counters(cid).assert_zero(FAILURES);
    }
}

// ---- 3. default deny --------------------------------------------------------------------

#[test]
fn pair_without_group_or_rule_is_denied_at_once() {
    let b = Backend::domsockd_with(
        "g2g-deny",
        &[VmOpts::new(3).groups(&["a"]), VmOpts::new(4).groups(&["b"])],
        None,
    );
    let mut ga = ready(&b, 3, GuestConfig::default());
    let mut gb = ready(&b, 4, GuestConfig::default());
    gb.listen(Port(5000), SocketType::Stream).unwrap();
    gb.listen(Port(5001), SocketType::SeqPacket).unwrap();
    ga.listen(Port(5000), SocketType::Stream).unwrap();
    let before_a = b.counters(3).get("denied_connections");
    let before_b = b.counters(4).get("denied_connections");
    for (port, ty) in [(5000, SocketType::Stream), (5001, SocketType::SeqPacket)] {
        let t = expect_refused(&mut ga, Some(&mut gb), addr(4, port), ty);
        eprintln!("denied {ty:?} connect refused in {t:?}");
    }
    // And the other way.
    expect_refused(&mut gb, Some(&mut ga), addr(3, 5000), SocketType::Stream);
    let (ca, cb) = (b.counters(3), b.counters(4));
    assert_eq!(
        ca.get("denied_connections") - before_a,
        2,
        "sender 3: {ca:?}"
    );
    assert_eq!(
        cb.get("denied_connections") - before_b,
        1,
        "sender 4: {cb:?}"
    );
    assert_eq!(ca.get("g2g_bytes") + cb.get("g2g_bytes"), 0);
    for c in [&ca, &cb] {
        c.assert_zero(&["unroutable_packets", "spoofed_packets", "protocol_resets"]);
    }
    // A warning names both domains.
    let log = b.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("WARN") && l.contains("vm3") && l.contains("vm4")),
        "no warning naming vm3 and vm4\n{}",
        b.log_tail()
    );
    // The guests themselves are fine: both still reach the host.
    stream_to_host(&mut ga, &b.vm(0).uds, 5100, 100_000, 10_000);
    stream_to_host(&mut gb, &b.vm(1).uds, 5100, 100_000, 10_000);
}

// ---- 4. policy rules --------------------------------------------------------------------

const WEB_DB_RULES: &str = r#"
[[policy.allow]]
from = "web"
to = "db"
ports = "5000"

[[policy.allow]]
from = "web"
to = "db"
ports = "6000-6001"
types = ["seqpacket"]
"#;

#[test]
fn policy_rule_allows_one_direction_and_port() {
    let vms = [VmOpts::new(3).name("web"), VmOpts::new(4).name("db")];
    let b = Backend::domsockd_with("g2g-rule", &vms, Some(WEB_DB_RULES));
    let mut web = ready(&b, 3, GuestConfig::default());
    let mut db = ready(&b, 4, GuestConfig::default());
    for (port, ty) in [
        (5000, SocketType::Stream),
        (5001, SocketType::Stream),
        (6000, SocketType::SeqPacket),
        (6001, SocketType::Stream),
        (6002, SocketType::SeqPacket),
    ] {
        db.listen(Port(port), ty).unwrap();
    }
    web.listen(Port(5000), SocketType::Stream).unwrap();
    let before_web = b.counters(3).get("denied_connections");
    let before_db = b.counters(4).get("denied_connections");

    // Allowed: web -> db:5000 stream, and seqpacket on 6000.
    let (kw, kd) = connect_pair(&mut web, &mut db, 5000, SocketType::Stream);
    exchange(&mut web, kw, &mut db, kd, 10);
    let (sw, sd) = connect_pair(&mut web, &mut db, 6000, SocketType::SeqPacket);
    web.send_msg_timeout(sw, &pattern(3, 5000), STEP_TIMEOUT)
        .unwrap();
    let mut buf = vec![0u8; 8192];
    let m = db
        .recv_msg_timeout(sd, &mut buf, STEP_TIMEOUT)
        .unwrap()
        .unwrap();
    assert_eq!(m.msg_len, 5000);
    assert!(buf[..5000] == pattern(3, 5000)[..]);

    // Denied: another port, a type the rule does not list, a port outside the range, and
    // the reverse direction.
    expect_refused(&mut web, Some(&mut db), addr(4, 5001), SocketType::Stream);
    expect_refused(&mut web, Some(&mut db), addr(4, 6001), SocketType::Stream);
    expect_refused(
        &mut web,
        Some(&mut db),
        addr(4, 6002),
        SocketType::SeqPacket,
    );
    expect_refused(&mut db, Some(&mut web), addr(3, 5000), SocketType::Stream);
    let (cw, cd) = (b.counters(3), b.counters(4));
    assert_eq!(cw.get("denied_connections") - before_web, 3, "web: {cw:?}");
    assert_eq!(cd.get("denied_connections") - before_db, 1, "db: {cd:?}");

    // The allowed connections were not disturbed by the denials.
    exchange(&mut web, kw, &mut db, kd, 20);
    // guest-to-host defaults to "allow".
    stream_to_host(&mut web, &b.vm(0).uds, 7000, 100_000, 10_000);
    stream_to_host(&mut db, &b.vm(1).uds, 7000, 100_000, 10_000);
    for c in [&cw, &cd] {
        c.assert_zero(&["unroutable_packets", "spoofed_packets", "protocol_resets"]);
    }
}

// ---- 5. namespaces ----------------------------------------------------------------------

const NS_ALLOW_ALL: &str = r#"
[[policy.allow]]
namespace = "alpha"
from = "*"
to = "*"

[[policy.allow]]
namespace = "beta"
from = "*"
to = "*"
"#;

#[test]
fn namespaces_are_invisible_to_each_other() {
    // The name "db" exists in both namespaces.
    let vms = [
        VmOpts::new(3).name("app").namespace("alpha"),
        VmOpts::new(4).name("db").namespace("alpha"),
        VmOpts::new(5).name("worker").namespace("beta"),
        VmOpts::new(6).name("db").namespace("beta"),
    ];
    let b = Backend::domsockd_with("g2g-ns", &vms, Some(NS_ALLOW_ALL));
    let mut g: Vec<UserGuest> = [3, 4, 5, 6]
        .iter()
        .map(|&cid| ready(&b, cid, GuestConfig::default()))
        .collect();
    for gi in g.iter_mut() {
        gi.listen(Port(5000), SocketType::Stream).unwrap();
    }
    let [app, db_a, worker, db_b] = &mut g[..] else {
        unreachable!()
    };
    // Inside each namespace the allow-all rule lets everyone in.
    let (k1, k2) = connect_pair(app, db_a, 5000, SocketType::Stream);
    exchange(app, k1, db_a, k2, 1);
    let (k3, k4) = connect_pair(worker, db_b, 5000, SocketType::Stream);
    exchange(worker, k3, db_b, k4, 2);
    let (k5, k6) = connect_pair(db_a, app, 5000, SocketType::Stream);
    exchange(db_a, k5, app, k6, 3);

    // Across namespaces: exactly like a CID that does not exist.
    let before = b.counters(3);
    expect_refused(app, Some(&mut *worker), addr(5, 5000), SocketType::Stream);
    expect_refused(app, Some(&mut *db_b), addr(6, 5000), SocketType::Stream);
    let after = b.counters(3);
    expect_refused(app, None, addr(77, 5000), SocketType::Stream);
    let after_missing = b.counters(3);
    let unroutable = |c: &Counters| c.get("unroutable_packets");
    assert!(
        unroutable(&after) >= unroutable(&before) + 2,
        "cross-namespace connects not counted as unroutable: {before:?} -> {after:?}"
    );
    assert_eq!(
        after.get("denied_connections"),
        before.get("denied_connections"),
        "cross-namespace connects counted as denied (they must look nonexistent)"
    );
    assert_eq!(
        unroutable(&after_missing) - unroutable(&after),
        (unroutable(&after) - unroutable(&before)) / 2,
        "a CID of another namespace and a missing CID are counted differently"
    );
    // And from the other side.
    expect_refused(worker, Some(&mut *app), addr(3, 5000), SocketType::Stream);

    // The control service answers within the caller's namespace only.
    let mut ctl = ControlClient::connect(app);
    assert_eq!(
        ctl.call(app, &Request::Resolve("worker".into())),
        Reply::Error("not-found".into())
    );
    assert_eq!(
        ctl.call(app, &Request::Resolve("db".into())),
        Reply::Resolved(Cid(4))
    );
    assert_eq!(
        ctl.call(app, &Request::List),
        Reply::List(vec![("app".into(), Cid(3)), ("db".into(), Cid(4))])
    );
    let mut ctl_b = ControlClient::connect(worker);
    assert_eq!(
        ctl_b.call(worker, &Request::Resolve("db".into())),
        Reply::Resolved(Cid(6))
    );
    assert_eq!(
        ctl_b.call(worker, &Request::Resolve("app".into())),
        Reply::Error("not-found".into())
    );
    match ctl_b.call(worker, &Request::WhoAmI) {
        Reply::Identity(id) => {
            assert_eq!(
                (id.name.as_str(), id.namespace.as_str(), id.cid),
                ("worker", "beta", Cid(5))
            )
        }
        r => panic!("WHOAMI: {r:?}"),
    }
    // Connections inside the namespaces still work.
    exchange(app, k1, db_a, k2, 4);
    exchange(worker, k3, db_b, k4, 5);
}

// ---- 6. control service -----------------------------------------------------------------

#[test]
fn control_service_names_the_right_cids() {
    let vms = [
        VmOpts::new(3).name("web"),
        VmOpts::new(4).name("db"),
        VmOpts::new(5), // default name vm5
    ];
    let b = Backend::domsockd_with("ctl", &vms, None);
    let mut web = ready(&b, 3, GuestConfig::default());
    let mut other = ready(&b, 5, GuestConfig::default());
    let before = b.counters(3).get("control_requests");
    let mut ctl = ControlClient::connect(&mut web);
    match ctl.call(&mut web, &Request::WhoAmI) {
        Reply::Identity(id) => assert_eq!(
            (id.name.as_str(), id.namespace.as_str(), id.cid),
            ("web", "default", Cid(3))
        ),
        r => panic!("WHOAMI: {r:?}"),
    }
    assert_eq!(
        ctl.call(&mut web, &Request::Resolve("db".into())),
        Reply::Resolved(Cid(4))
    );
    assert_eq!(
        ctl.call(&mut web, &Request::Resolve("vm5".into())),
        Reply::Resolved(Cid(5))
    );
    assert_eq!(
        ctl.call(&mut web, &Request::Resolve("web".into())),
        Reply::Resolved(Cid(3))
    );
    assert_eq!(
        ctl.call(&mut web, &Request::Resolve("nosuch".into())),
        Reply::Error("not-found".into())
    );
    assert_eq!(
        ctl.call(&mut web, &Request::List),
        Reply::List(vec![
            ("db".into(), Cid(4)),
            ("vm5".into(), Cid(5)),
            ("web".into(), Cid(3))
        ])
    );
    // Anything else is an error line, and the connection goes on.
    let bad = ctl.call_raw(&mut web, "HELLO there\n");
    assert!(bad.starts_with("ERR"), "{bad:?}");
    // Several requests in one write get one reply each, in order.
    web.write_all(ctl.key, b"RESOLVE db\nWHOAMI\n", STEP_TIMEOUT)
        .unwrap();
    let mut got = Vec::new();
    let deadline = Instant::now() + STEP_TIMEOUT;
    while got.iter().filter(|&&c| c == b'\n').count() < 2 {
        assert!(Instant::now() < deadline, "pipelined replies: {got:?}");
        let mut buf = [0u8; 512];
        let n = web.recv_timeout(ctl.key, &mut buf, STEP_TIMEOUT).unwrap();
        assert!(n > 0, "EOF");
        got.extend_from_slice(&buf[..n]);
    }
    assert_eq!(
        String::from_utf8_lossy(&got),
        "OK 4\nOK name=web namespace=default cid=3\n"
    );
    let after = b.counters(3).get("control_requests");
    assert!(
        after >= before + 9,
        "control_requests {before} -> {after} after 9 requests"
    );
    // 20 000 pipelined requests, read while writing: one reply each, in order, however
    // the replies back up (the service must take requests only as fast as its replies go).
    const PIPELINED: usize = 20_000;
    let requests: Vec<u8> = (0..PIPELINED)
        .flat_map(|i| {
            if i % 2 == 0 {
                b"WHOAMI\n".to_vec()
            } else {
                b"RESOLVE db\n".to_vec()
            }
        })
        .collect();
    let (mut off, mut replies, mut partial) = (0usize, 0usize, Vec::new());
    let mut buf = vec![0u8; 64 * KIB];
    let deadline = Instant::now() + STEP_TIMEOUT;
    while replies < PIPELINED {
        assert!(
            Instant::now() < deadline,
            "pipelined: wrote {off} of {} bytes, {replies} replies",
            requests.len()
        );
        if off < requests.len() {
            match web.send(ctl.key, &requests[off..]) {
                Ok(n) => off += n,
                Err(SockError::WouldBlock) => {}
                Err(e) => panic!("pipelined write after {off} bytes: {}", chain(&e)),
            }
        }
        match web.recv(ctl.key, &mut buf) {
            Ok(0) => panic!("control service closed after {replies} pipelined replies"),
            Ok(n) => {
                partial.extend_from_slice(&buf[..n]);
                let mut start = 0;
                while let Some(nl) = partial[start..].iter().position(|&c| c == b'\n') {
                    let line = &partial[start..start + nl];
                    let want: &[u8] = if replies % 2 == 0 {
                        b"OK name=web namespace=default cid=3"
                    } else {
                        b"OK 4"
                    };
                    assert_eq!(
                        line,
                        want,
                        "pipelined reply {replies}: {:?}",
                        String::from_utf8_lossy(line)
                    );
                    replies += 1;
                    start += nl + 1;
                }
                partial.drain(..start);
            }
            Err(SockError::WouldBlock) => web.poll(Some(Duration::from_millis(1))).unwrap(),
            Err(e) => panic!("pipelined read after {replies} replies: {}", chain(&e)),
        }
    }
    // Another guest gets its own identity.
    let mut ctl5 = ControlClient::connect(&mut other);
    match ctl5.call(&mut other, &Request::WhoAmI) {
        Reply::Identity(id) => assert_eq!(
            (id.name.as_str(), id.namespace.as_str(), id.cid),
            ("vm5", "default", Cid(5))
        ),
        r => panic!("WHOAMI: {r:?}"),
    }
    web.close(ctl.key).unwrap();
    other.close(ctl5.key).unwrap();
    b.counters(3).assert_zero(FAILURES);
}

// ---- 7. SIGHUP reload -------------------------------------------------------------------

const A_TO_B: &str = r#"
[[policy.allow]]
from = "a"
to = "b"
"#;

const A_TO_B_AND_C_TO_B: &str = r#"
[[policy.allow]]
from = "a"
to = "b"

[[policy.allow]]
from = "c"
to = "b"
ports = "5000"
"#;

/// Connects `a` to `b`:`port` until it works (the reload that allows it took effect).
fn connect_once_allowed(
    a: &mut UserGuest,
    b: &mut UserGuest,
    port: u32,
    what: &str,
) -> (ConnKey, ConnKey) {
    let deadline = Instant::now() + RELOAD_WITHIN;
    loop {
        let peer = addr(b.cid().0, port);
        let (r, _) = try_connect(a, &mut [&mut *b], peer, SocketType::Stream, FAIL_WAIT);
        match r {
            Ok(ka) => {
                let kb = b
                    .accept_timeout(Port(port), STEP_TIMEOUT)
                    .unwrap_or_else(|e| panic!("{what}: accept: {}", chain(&e)));
                return (ka, kb);
            }
            Err(SockError::Refused(_)) => {
                assert!(
                    Instant::now() < deadline,
                    "{what}: still denied {RELOAD_WITHIN:?} after SIGHUP"
                );
                thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("{what}: {}", chain(&e)),
        }
    }
}

#[test]
fn sighup_reload_resets_connections_no_longer_allowed() {
    let vms = [
        VmOpts::new(3).name("a"),
        VmOpts::new(4).name("b"),
        VmOpts::new(5).name("c"),
    ];
    let b = Backend::domsockd_with("g2g-hup", &vms, Some(A_TO_B));
    let mut ga = ready(&b, 3, GuestConfig::default());
    let mut gb = ready(&b, 4, GuestConfig::default());
    let mut gc = ready(&b, 5, GuestConfig::default());
    gb.listen(Port(5000), SocketType::Stream).unwrap();
    let (ka, kb) = connect_pair(&mut ga, &mut gb, 5000, SocketType::Stream);
    exchange(&mut ga, ka, &mut gb, kb, 1);
    expect_refused(&mut gc, Some(&mut gb), addr(4, 5000), SocketType::Stream);

    // The rule goes away: the established connection is reset on both sides.
    b.rewrite_config("");
    b.reload();
    let end_a = wait_connection_end(&mut ga, &mut [&mut gb], ka, RELOAD_WITHIN);
    let end_b = wait_connection_end(&mut gb, &mut [&mut ga], kb, RELOAD_WITHIN);
    eprintln!("after the reload: a sees {end_a:?}, b sees {end_b:?}");
    assert!(
        end_a.is_ok() && end_b.is_ok(),
        "connection no longer allowed was not ended: a {end_a:?}, b {end_b:?}\n{}",
        b.log_tail()
    );
    ga.close(ka).unwrap();
    gb.close(kb).unwrap();
    let before = b.counters(3).get("denied_connections");
    expect_refused(&mut ga, Some(&mut gb), addr(4, 5000), SocketType::Stream);
    assert_eq!(b.counters(3).get("denied_connections"), before + 1);

    // Allowed again; then a reload that keeps a->b (and adds c->b) leaves it alone.
    b.rewrite_config(A_TO_B);
    b.reload();
    let (ka, kb) = connect_once_allowed(&mut ga, &mut gb, 5000, "a->b after re-allowing");
    exchange(&mut ga, ka, &mut gb, kb, 2);
    b.rewrite_config(A_TO_B_AND_C_TO_B);
    b.reload();
    let (kc, kbc) = connect_once_allowed(&mut gc, &mut gb, 5000, "c->b after adding its rule");
    // The reload has happened (c gets in); a's connection survived it.
    exchange(&mut ga, ka, &mut gb, kb, 3);
    exchange(&mut gc, kc, &mut gb, kbc, 4);
    // A large transfer over the surviving connection still flows byte-exact.
    transfer(&mut ga, ka, &mut gb, kb, 4 * MIB);
    for cid in [3, 4, 5] {
        b.counters(cid)
            .assert_zero(&["unroutable_packets", "spoofed_packets", "protocol_resets"]);
    }
}

// ---- 8. all-guests host listener --------------------------------------------------------

const LISTENERS: &str = r#"
[[listen]]
port = 5000
path = "@DIR@/all5000.sock"

[[listen]]
port = 5000
path = "@DIR@/beta5000.sock"
namespace = "beta"

[[listen]]
port = 5001
path = "@DIR@/seq5001.sock"

[[listen]]
port = 5002
path = "@DIR@/nobody-binds-this.sock"

[[listen]]
port = 5003
path = "@DIR@/beta5003.sock"
namespace = "beta"
"#;

/// Accepts `n` connections on `l`; for each reads the preamble and `data_len` bytes, which
/// must be the pattern for the preamble's CID, and echoes them. Returns the preambles.
fn serve_preambled(l: UnixListener, n: usize, data_len: usize) -> Vec<PeerPreamble> {
    let mut out = Vec::new();
    for _ in 0..n {
        let mut s = accept(&l);
        let line = read_line(&mut s);
        let (p, used) = PeerPreamble::parse(&line)
            .unwrap_or_else(|e| panic!("preamble {:?}: {e}", String::from_utf8_lossy(&line)))
            .expect("a whole line");
        assert_eq!(used, line.len());
        let mut data = vec![0u8; data_len];
        s.read_exact(&mut data).unwrap();
        assert!(
            data == pattern(p.identity.cid.0, data_len),
            "data after the preamble of {p:?} differs"
        );
        s.write_all(&data).unwrap();
        out.push(p);
    }
    out
}

#[test]
fn all_guests_listener_names_each_peer() {
    let vms = [
        VmOpts::new(3).name("web"),
        VmOpts::new(4).name("api"),
        VmOpts::new(5).name("web").namespace("beta"),
    ];
    let b = Backend::domsockd_with("g2h-listen", &vms, Some(LISTENERS));
    let all = UnixListener::bind(b.dir().join("all5000.sock")).unwrap();
    let beta = UnixListener::bind(b.dir().join("beta5000.sock")).unwrap();
    let all_probe = all.try_clone().unwrap();
    const LEN: usize = 3000;
    let h_all = thread::spawn(move || serve_preambled(all, 2, LEN));
    let h_beta = thread::spawn(move || serve_preambled(beta, 1, LEN));
    let mut guests: Vec<UserGuest> = [3, 4, 5]
        .iter()
        .map(|&cid| ready(&b, cid, GuestConfig::default()))
        .collect();
    let mut keys = Vec::new();
    for g in guests.iter_mut() {
        let key = g
            .connect_timeout(host(5000), SocketType::Stream, STEP_TIMEOUT)
            .unwrap_or_else(|e| panic!("guest {}: {}", g.cid(), chain(&e)));
        g.write_all(key, &pattern(g.cid().0, LEN), STEP_TIMEOUT)
            .unwrap();
        keys.push(key);
    }
    for (g, &key) in guests.iter_mut().zip(&keys) {
        let mut echo = vec![0u8; LEN];
        g.read_exact(key, &mut echo, STEP_TIMEOUT)
            .unwrap_or_else(|e| panic!("guest {} echo: {}", g.cid(), chain(&e)));
        assert!(echo == pattern(g.cid().0, LEN), "guest {} echo", g.cid());
    }
    let mut seen = h_all.join().expect("any-namespace listener");
    let beta_seen = h_beta.join().expect("beta listener");
    seen.sort_by_key(|p| p.identity.cid);
    let expect = |p: &PeerPreamble, name: &str, ns: &str, cid: u64, key: ConnKey| {
        assert_eq!(
            (
                p.identity.name.as_str(),
                p.identity.namespace.as_str(),
                p.identity.cid,
                p.port
            ),
            (name, ns, Cid(cid), key.local.port),
            "{p:?}"
        );
    };
    assert_eq!(seen.len(), 2);
    expect(&seen[0], "web", "default", 3, keys[0]);
    expect(&seen[1], "api", "default", 4, keys[1]);
    assert_eq!(
        beta_seen.len(),
        1,
        "the beta guest must use the beta listener"
    );
    expect(&beta_seen[0], "web", "beta", 5, keys[2]);
    for (g, key) in guests.iter_mut().zip(keys) {
        g.close(key).unwrap();
    }
    assert_eq!(b.counters(3).get("listener_connections"), 1);

    // SOCK_SEQPACKET: the preamble is a message of its own.
    let seq = listen_seqpacket_at(&b.dir().join("seq5001.sock"));
    let h_seq = thread::spawn(move || {
        let s = accept(&seq);
        let first = recv_message(&s, 64 * KIB);
        let (p, used) = PeerPreamble::parse(&first).unwrap().expect("a whole line");
        assert_eq!(used, first.len(), "preamble merged with data: {first:?}");
        let m = recv_message(&s, 64 * KIB);
        assert_eq!(m, pattern(44, 1000));
        (p, recv_message(&s, 64 * KIB))
    });
    let g = &mut guests[1];
    let k = g
        .connect_timeout(host(5001), SocketType::SeqPacket, STEP_TIMEOUT)
        .unwrap();
    g.send_msg_timeout(k, &pattern(44, 1000), STEP_TIMEOUT)
        .unwrap();
    g.send_msg_timeout(k, b"second", STEP_TIMEOUT).unwrap();
    let (p, second) = join_polling(g, h_seq);
    assert_eq!(second, b"second");
    expect(&p, "api", "default", 4, k);
    g.close(k).unwrap();

    // A listener path nobody bound, and a port whose only listener is for another
    // namespace: refused at once, like a port without listener.
    let beta_5003 = UnixListener::bind(b.dir().join("beta5003.sock")).unwrap();
    expect_refused(&mut guests[0], None, host(5002), SocketType::Stream);
    expect_refused(&mut guests[0], None, host(5003), SocketType::Stream);
    thread::sleep(QUIET);
    assert!(
        try_accept(&beta_5003).is_none(),
        "a guest of namespace default reached the beta-only listener"
    );

    // A per-VM <uds>_5000 wins over the all-guests listener, and gets no preamble.
    let own = listen_stream(&b.vm(0).uds, 5000);
    let g = &mut guests[0];
    let k = g
        .connect_timeout(host(5000), SocketType::Stream, STEP_TIMEOUT)
        .unwrap();
    g.write_all(k, b"direct", STEP_TIMEOUT).unwrap();
    let mut s = accept(&own);
    let mut got = [0u8; 6];
    s.read_exact(&mut got).unwrap();
    assert_eq!(
        &got, b"direct",
        "the per-VM listener got a preamble or other bytes"
    );
    thread::sleep(QUIET);
    assert!(
        try_accept(&all_probe).is_none(),
        "the all-guests listener got a connection the per-VM one should have had"
    );
    g.close(k).unwrap();
    assert_eq!(b.counters(3).get("listener_connections"), 1);
    for cid in [3, 4, 5] {
        b.counters(cid).assert_zero(FAILURES);
    }
}

// ---- 9. spoofing ------------------------------------------------------------------------

#[test]
fn forged_source_cid_is_dropped_and_counted() {
    // b and c share a group; a does not, and pretends to be c (or the host, or b itself).
    let vms = [
        VmOpts::new(3).name("a"),
        VmOpts::new(4).name("b").groups(&["g"]),
        VmOpts::new(5).name("c").groups(&["g"]),
    ];
    let b = Backend::domsockd_with("g2g-spoof", &vms, None);
    let mut ga = ready(&b, 3, GuestConfig::default());
    let mut gb = ready(&b, 4, GuestConfig::default());
    let mut gc = ready(&b, 5, GuestConfig::default());
    gb.listen(Port(7000), SocketType::Stream).unwrap();
    let host_a = listen_stream(&b.vm(0).uds, 5000);
    let host_c = listen_stream(&b.vm(2).uds, 5000);
    settle(&mut gb);
    settle(&mut gc);
    let rx_b = gb.stats().rx_packets;
    let rx_c = gc.stats().rx_packets;
    let before = b.counters(3).get("spoofed_packets");

    let header = |src: VsockAddr, dst: VsockAddr, op: Op, len: u32| {
        HeaderBuilder::new(src, dst, op)
            .len(len)
            .credit(256 * 1024, 0)
            .build()
    };
    let forged = [
        header(addr(5, 1234), addr(4, 7000), Op::Request, 0),
        header(addr(2, 1234), addr(4, 7000), Op::Request, 0),
        header(addr(4, 1235), addr(4, 7000), Op::Request, 0),
        header(addr(5, 1234), addr(4, 7000), Op::Rw, 5),
        header(addr(5, 1236), addr(2, 5000), Op::Request, 0),
        header(addr(5, 1237), addr(5, 7000), Op::Request, 0),
    ];
    for h in &forged {
        let payload = vec![b'x'; h.len() as usize];
        ga.send_raw_timeout(h, &payload, STEP_TIMEOUT).unwrap();
    }
    ga.flush_timeout(STEP_TIMEOUT).unwrap();
    // Nothing reaches b, c or a host listener.
    expect_no_accept(&mut gb, 7000);
    gc.poll(Some(QUIET)).unwrap();
    assert_eq!(gb.stats().rx_packets, rx_b, "b received packets");
    assert_eq!(gc.stats().rx_packets, rx_c, "c received packets");
    assert!(
        try_accept(&host_a).is_none(),
        "host <uds a>_5000 got a connection"
    );
    assert!(
        try_accept(&host_c).is_none(),
        "host <uds c>_5000 got a connection"
    );
    let ca = b.counters(3);
    assert_eq!(
        ca.get("spoofed_packets") - before,
        forged.len() as u64,
        "{ca:?}"
    );
    ca.assert_zero(&["denied_connections", "protocol_resets"]);
    b.counters(4).assert_zero(FAILURES);
    b.counters(5).assert_zero(FAILURES);
    // The spoofer's device still works for honest traffic.
    assert_clean(&ga);
    stream_to_host(&mut ga, &b.vm(0).uds, 5001, 100_000, 10_000);
    drop(host_a);
}

// ---- 10. hostile receiver ---------------------------------------------------------------

/// The receive buffer the stuck guest advertises.
const STUCK_BUF_ALLOC: usize = 16 * MIB;

#[test]
fn stuck_receiver_stalls_no_other_conversation() {
    let vms = [
        VmOpts::new(3).name("a").groups(&["g"]),
        VmOpts::new(4).name("stuck").groups(&["g"]),
        VmOpts::new(5).name("c").groups(&["g"]),
    ];
    let b = Backend::domsockd_with("g2g-stuck", &vms, None);
    let mut ga = ready(&b, 3, GuestConfig::default());
    // A small RX ring of tiny buffers: 16 x 64 bytes, which a's credit overruns many times.
    // It advertises a 16 MiB receive buffer, which domsockd must not fill on its behalf.
    let stuck_cfg = GuestConfig {
        queue_size: 16,
        rx_layout: RxLayout {
            payload_bytes: 64,
            header: HeaderPlacement::SameDescriptor,
        },
        endpoint: EndpointConfig {
            buf_alloc_bytes: STUCK_BUF_ALLOC as u32,
            ..EndpointConfig::default()
        },
        ..GuestConfig::default()
    };
    let mut gs = ready(&b, 4, stuck_cfg);
    let uds_a = b.vm(0).uds.clone();

    // Baselines: a -> host, and a -> c guest-to-guest, before anything is stuck.
    const HOST_LEN: usize = 32 * MIB;
    const G2G_LEN: usize = 16 * MIB;
    let base_host = stream_to_host(&mut ga, &uds_a, 5000, HOST_LEN, 256 * KIB);
    let vm_c = b.vm(2).clone();
    let g2g_to_c = |ga: &mut UserGuest, port: u32| -> Duration {
        let (tx, rx) = std::sync::mpsc::channel();
        let vm_c = vm_c.clone();
        let h = thread::spawn(move || {
            let mut gc = UserGuest::connect(&vm_c.socket, GuestConfig::default()).unwrap();
            // Served for sure once a control round trip went through (see `ready`).
            let mut ctl = ControlClient::connect(&mut gc);
            ctl.call(&mut gc, &Request::WhoAmI);
            gc.close(ctl.key).unwrap();
            gc.listen(Port(port), SocketType::Stream).unwrap();
            tx.send(()).unwrap();
            let k = gc.accept_timeout(Port(port), STEP_TIMEOUT).unwrap();
            guest_recv_to_eof(&mut gc, k, 256 * KIB)
        });
        rx.recv().unwrap();
        let start = Instant::now();
        let k = ga
            .connect_timeout(addr(5, port), SocketType::Stream, STEP_TIMEOUT)
            .unwrap_or_else(|e| panic!("a -> c: {}", chain(&e)));
        let sent = guest_send_pattern(ga, k, port.into(), G2G_LEN, MIB);
        ga.close(k).unwrap();
        let got = join_polling(ga, h);
        let t = start.elapsed();
        assert_eq!(got.bytes(), G2G_LEN as u64);
        assert_eq!(got.digest(), sent.digest());
        t
    };
    let base_g2g = g2g_to_c(&mut ga, 6000);

    // a connects to the stuck guest, which accepts and is never polled again: it neither
    // reads nor gives RX buffers back. a sends until the credit stops it.
    gs.listen(Port(7000), SocketType::Stream).unwrap();
    let (ka, ks) = connect_pair(&mut ga, &mut gs, 7000, SocketType::Stream);
    let stuck_data = pattern(77, STUCK_BUF_ALLOC);
    let mut sent_to_stuck = 0usize;
    let mut quiet_since = Instant::now();
    let deadline = Instant::now() + STEP_TIMEOUT;
    while quiet_since.elapsed() < Duration::from_millis(300) {
        assert!(
            Instant::now() < deadline,
            "a never stopped sending to the stuck guest"
        );
        match ga.send(ka, &stuck_data[sent_to_stuck..]) {
            Ok(n) => {
                sent_to_stuck += n;
                quiet_since = Instant::now();
            }
            Err(SockError::WouldBlock) => ga.poll(Some(Duration::from_millis(10))).unwrap(),
            Err(e) => panic!("a -> stuck after {sent_to_stuck} bytes: {}", chain(&e)),
        }
    }
    eprintln!("a sent {sent_to_stuck} bytes to the stuck guest before its credit ran out");
    assert!(
        sent_to_stuck > 16 * 64,
        "a could send only {sent_to_stuck} bytes: more than the stuck RX ring holds must go"
    );
    assert!(
        sent_to_stuck < STUCK_BUF_ALLOC,
        "domsockd took all {sent_to_stuck} bytes the stuck guest's buffer allows: what it \
         holds for a receiver that does not read must be bounded below that"
    );

    // Meanwhile a's other conversations go on at full speed.
    let stuck_host = stream_to_host(&mut ga, &uds_a, 5001, HOST_LEN, 256 * KIB);
    let stuck_g2g = g2g_to_c(&mut ga, 6001);
    eprintln!(
        "a -> host 32 MiB: {base_host:?} before, {stuck_host:?} with a stuck peer; \
         a -> c 16 MiB: {base_g2g:?} before, {stuck_g2g:?} with a stuck peer"
    );
    let bound = |base: Duration| base * 3 + Duration::from_secs(1);
    assert!(
        stuck_host < bound(base_host),
        "a -> host slowed from {base_host:?} to {stuck_host:?} while another guest was stuck"
    );
    assert!(
        stuck_g2g < bound(base_g2g),
        "a -> c slowed from {base_g2g:?} to {stuck_g2g:?} while another guest was stuck"
    );
    let fallback =
        b.counters(3).get("g2g_fallback_bytes") + b.counters(4).get("g2g_fallback_bytes");
    assert!(
        fallback > 0,
        "the stuck guest's ring held at most 1 KiB of {sent_to_stuck} bytes, yet no \
         g2g_fallback_bytes were counted"
    );

    // The stuck guest wakes up: everything a sent arrives intact.
    let mut got = vec![0u8; sent_to_stuck];
    gs.read_exact(ks, &mut got, STEP_TIMEOUT)
        .unwrap_or_else(|e| panic!("stuck guest reading what a sent: {}", chain(&e)));
    assert!(
        got == stuck_data[..sent_to_stuck],
        "the stuck guest got different bytes"
    );
    assert_clean(&gs);
    for cid in [3, 4, 5] {
        b.counters(cid).assert_zero(FAILURES);
    }
}

// ---- 10b. backlog bounds ----------------------------------------------------------------

/// domsockd's `G2G_BACKLOG_MAX_BYTES` and `G2G_BACKLOG_TOTAL_MAX_BYTES` (host-backend
/// `tunables.rs`): what waits for one receiver whose RX ring is full, and for all of them.
const BACKLOG_MAX: usize = 8 * MIB;
const BACKLOG_TOTAL_MAX: usize = 64 * MIB;
/// The sender's largest TX packet: the backlog may end at most this far from its bound.
const PACKET: usize = 64 * KIB;

/// A receiver that accepts its connections and is then never polled: its ring holds 16 RX
/// buffers of 64 bytes (1 KiB, so nearly all that is sent to it waits in domsockd's
/// backlog), and it advertises 16 MiB per connection (domsockd forwards a window of 1 MiB).
fn stuck_receiver_config() -> GuestConfig {
    GuestConfig {
        queue_size: 16,
        rx_layout: RxLayout {
            payload_bytes: 64,
            header: HeaderPlacement::SameDescriptor,
        },
        endpoint: EndpointConfig {
            buf_alloc_bytes: 16 * MIB as u32,
            ..EndpointConfig::default()
        },
        ..GuestConfig::default()
    }
}

/// One connection to a stuck receiver and the bytes pushed on it.
struct Pushed {
    sender: ConnKey,
    receiver: ConnKey,
    data: Vec<u8>,
}

/// Sends all of `data` (at most the 1 MiB window) on `key` and waits until domsockd took
/// it; stops early if the connection is reset.
fn push(g: &mut UserGuest, key: ConnKey, data: &[u8]) {
    let mut sent = 0;
    let deadline = Instant::now() + STEP_TIMEOUT;
    while sent < data.len() {
        assert!(
            Instant::now() < deadline,
            "sent only {sent} of {} bytes",
            data.len()
        );
        match g.send(key, &data[sent..]) {
            Ok(n) => sent += n,
            Err(SockError::WouldBlock) => g.poll(Some(Duration::from_millis(1))).unwrap(),
            Err(SockError::Reset(_)) => return,
            Err(e) => panic!("send after {sent} bytes: {}", chain(&e)),
        }
    }
    g.flush_timeout(STEP_TIMEOUT).unwrap();
}

/// Whether the sender's end of `key` was reset (else it is still up, with nothing to read).
fn was_reset(g: &mut UserGuest, key: ConnKey) -> bool {
    match g.recv(key, &mut [0u8; 1]) {
        Err(SockError::WouldBlock) => false,
        Err(SockError::Reset(_)) => true,
        other => panic!("connection {key}: {other:?}"),
    }
}

/// The receiver wakes up: every connection that was not reset delivers all its bytes,
/// intact; a reset one delivers a prefix, then the reset.
fn check_delivered(g: &mut UserGuest, pushed: &[Pushed], reset: &[bool]) {
    for (i, (p, &r)) in pushed.iter().zip(reset).enumerate() {
        if !r {
            let mut got = vec![0u8; p.data.len()];
            g.read_exact(p.receiver, &mut got, STEP_TIMEOUT)
                .unwrap_or_else(|e| panic!("receiver, connection {i}: {}", chain(&e)));
            assert!(got == p.data, "receiver, connection {i}: different bytes");
            continue;
        }
        let mut got = Vec::new();
        let mut buf = vec![0u8; 64 * KIB];
        let e = loop {
            match g.recv_timeout(p.receiver, &mut buf, STEP_TIMEOUT) {
                Ok(0) => panic!("receiver, reset connection {i}: EOF instead of a reset"),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) => break e,
            }
        };
        assert!(
            matches!(e, SockError::Reset(_)),
            "receiver, reset connection {i}: {}",
            chain(&e)
        );
        assert!(
            got[..] == p.data[..got.len()],
            "receiver, reset connection {i}: different bytes before the reset"
        );
    }
}

/// Per receiver: a guest that takes no packets has at most 8 MiB waiting for it in
/// domsockd. Nine connections to it from one sender, each within its 1 MiB window: 7.5 MiB
/// on the first eight fit; the ninth would overflow the backlog and is reset, while the
/// backlog (`g2g_fallback_bytes`, nothing drains) stays within one packet of 8 MiB. Once
/// the receiver reads again, the eight get every byte.
#[test]
fn stuck_receivers_backlog_is_bounded_at_8_mib() {
    let vms = [
        VmOpts::new(3).name("a").groups(&["g"]),
        VmOpts::new(4).name("stuck").groups(&["g"]),
    ];
    let b = Backend::domsockd_with("g2g-backlog", &vms, None);
    let mut ga = ready(&b, 3, GuestConfig::default());
    let mut gs = ready(&b, 4, stuck_receiver_config());
    gs.listen(Port(7000), SocketType::Stream).unwrap();
    let sizes = [MIB, MIB, MIB, MIB, MIB, MIB, MIB, MIB / 2, MIB];
    let pushed: Vec<Pushed> = sizes
        .iter()
        .enumerate()
        .map(|(i, &len)| {
            let (sender, receiver) = connect_pair(&mut ga, &mut gs, 7000, SocketType::Stream);
            Pushed {
                sender,
                receiver,
                data: pattern(500 + i as u64, len),
            }
        })
        .collect();
    let before = b.counters(4).get("g2g_fallback_bytes");
    // From here on the receiver is not polled.
    let start = Instant::now();
    for p in &pushed {
        push(&mut ga, p.sender, &p.data);
    }
    settle(&mut ga);
    eprintln!(
        "pushed {} connections in {:?}",
        pushed.len(),
        start.elapsed()
    );
    let reset: Vec<bool> = pushed
        .iter()
        .map(|p| was_reset(&mut ga, p.sender))
        .collect();
    let backlog = (b.counters(4).get("g2g_fallback_bytes") - before) as usize;
    eprintln!("backlog {backlog} bytes; reset: {reset:?}");
    let last = pushed.len() - 1;
    assert!(
        reset[..last].iter().all(|r| !r),
        "a connection below the 8 MiB backlog was reset: {reset:?}"
    );
    assert!(
        reset[last],
        "the connection that overflows the 8 MiB backlog was not reset (backlog {backlog})"
    );
    assert!(
        backlog <= BACKLOG_MAX + PACKET,
        "the backlog grew to {backlog} bytes"
    );
    assert!(
        backlog >= BACKLOG_MAX - 2 * PACKET,
        "reset with only {backlog} bytes in the backlog"
    );
    check_delivered(&mut gs, &pushed, &reset);
}

/// Across receivers: nine stuck guests, each with less than 8 MiB waiting, may not hold more
/// than 64 MiB together. Eight take 7.5 MiB each (60 MiB); the ninth 3.5 MiB more fit, the
/// next connection to it crosses 64 MiB and is reset, though that receiver holds less than
/// 5 MiB.
#[test]
fn stuck_receivers_backlogs_are_bounded_at_64_mib_together() {
    const RECEIVERS: u64 = 9;
    let mut vms = vec![VmOpts::new(3).name("a").groups(&["g"])];
    vms.extend(
        (0..RECEIVERS).map(|i| VmOpts::new(4 + i).name(&format!("stuck{i}")).groups(&["g"])),
    );
    let b = Backend::domsockd_with("g2g-backlog-total", &vms, None);
    let mut ga = ready(&b, 3, GuestConfig::default());
    let mut receivers: Vec<UserGuest> = (0..RECEIVERS)
        .map(|i| ready(&b, 4 + i, stuck_receiver_config()))
        .collect();
    let full = [MIB, MIB, MIB, MIB, MIB, MIB, MIB, MIB / 2];
    let last = [MIB, MIB, MIB, MIB / 2, MIB];
    let mut plan: Vec<Vec<Pushed>> = Vec::new();
    for (r, gr) in receivers.iter_mut().enumerate() {
        gr.listen(Port(7000), SocketType::Stream).unwrap();
        let sizes: &[usize] = if r as u64 == RECEIVERS - 1 {
            &last
        } else {
            &full
        };
        plan.push(
            sizes
                .iter()
                .enumerate()
                .map(|(i, &len)| {
                    let (sender, receiver) = connect_pair(&mut ga, gr, 7000, SocketType::Stream);
                    Pushed {
                        sender,
                        receiver,
                        data: pattern(1000 * r as u64 + i as u64, len),
                    }
                })
                .collect(),
        );
    }
    let fallback = |b: &Backend| -> Vec<usize> {
        (0..RECEIVERS)
            .map(|i| b.counters(4 + i).get("g2g_fallback_bytes") as usize)
            .collect()
    };
    let before = fallback(&b);
    // From here on no receiver is polled.
    let start = Instant::now();
    for p in plan.iter().flatten() {
        push(&mut ga, p.sender, &p.data);
    }
    settle(&mut ga);
    eprintln!(
        "pushed {} connections in {:?}",
        plan.iter().map(Vec::len).sum::<usize>(),
        start.elapsed()
    );
    let reset: Vec<Vec<bool>> = plan
        .iter()
        .map(|ps| ps.iter().map(|p| was_reset(&mut ga, p.sender)).collect())
        .collect();
    let backlogs: Vec<usize> = fallback(&b)
        .iter()
        .zip(&before)
        .map(|(a, b)| a - b)
        .collect();
    let total: usize = backlogs.iter().sum();
    eprintln!("backlogs {backlogs:?} (total {total}); reset: {reset:?}");
    let (last_reset, earlier) = reset.split_last().unwrap();
    assert!(
        earlier.iter().flatten().all(|r| !r),
        "a connection to a receiver before the 64 MiB were reached was reset: {reset:?}"
    );
    assert_eq!(
        last_reset,
        &[false, false, false, false, true],
        "only the connection that crosses 64 MiB in all backlogs is reset"
    );
    assert!(
        backlogs.iter().all(|&n| n < BACKLOG_MAX),
        "a receiver's own backlog reached 8 MiB: {backlogs:?}"
    );
    assert!(
        backlogs[backlogs.len() - 1] < 5 * MIB,
        "the receiver whose connection was reset held {} bytes: not the total's doing",
        backlogs[backlogs.len() - 1]
    );
    assert!(
        total <= BACKLOG_TOTAL_MAX + PACKET,
        "the backlogs grew to {total} bytes together"
    );
    assert!(
        total >= BACKLOG_TOTAL_MAX - 4 * PACKET,
        "reset with only {total} bytes in all backlogs"
    );
    let gr = receivers.last_mut().unwrap();
    check_delivered(gr, plan.last().unwrap(), last_reset);
}

// ---- 11. guest-to-host rules ------------------------------------------------------------

const HOST_RULES: &str = r#"
[policy]
guest-to-host = "rules"

[[policy.allow]]
from = "web"
to = "host"
ports = "5000"
"#;

#[test]
fn guest_to_host_rules_gate_host_ports_but_not_the_control_service() {
    let vms = [VmOpts::new(3).name("web"), VmOpts::new(4).name("db")];
    let b = Backend::domsockd_with("g2h-rules", &vms, Some(HOST_RULES));
    let mut web = ready(&b, 3, GuestConfig::default());
    let mut db = ready(&b, 4, GuestConfig::default());
    let web_5001 = listen_stream(&b.vm(0).uds, 5001);
    let db_5000 = listen_stream(&b.vm(1).uds, 5000);
    stream_to_host(&mut web, &b.vm(0).uds, 5000, 1 << 20, 64 * KIB);
    let (dw, dd) = (
        b.counters(3).get("denied_connections"),
        b.counters(4).get("denied_connections"),
    );
    expect_refused(&mut web, None, host(5001), SocketType::Stream);
    expect_refused(&mut db, None, host(5000), SocketType::Stream);
    assert_eq!(b.counters(3).get("denied_connections"), dw + 1);
    assert_eq!(b.counters(4).get("denied_connections"), dd + 1);
    thread::sleep(QUIET);
    assert!(
        try_accept(&web_5001).is_none(),
        "denied web -> host:5001 reached the host"
    );
    assert!(
        try_accept(&db_5000).is_none(),
        "denied db -> host:5000 reached the host"
    );
    // The control service needs no rule.
    let mut ctl = ControlClient::connect(&mut db);
    assert_eq!(
        ctl.call(&mut db, &Request::Resolve("web".into())),
        Reply::Resolved(Cid(3))
    );
}

// ---- 12. group changes on reload --------------------------------------------------------

#[test]
fn sighup_reload_rereads_vm_groups() {
    let grouped = [
        VmOpts::new(3).name("a").groups(&["g"]),
        VmOpts::new(4).name("b").groups(&["g", "h"]),
        VmOpts::new(5).name("c").groups(&["h"]),
    ];
    let b = Backend::domsockd_with("g2g-hup-groups", &grouped, Some(""));
    let mut ga = ready(&b, 3, GuestConfig::default());
    let mut gb = ready(&b, 4, GuestConfig::default());
    let mut gc = ready(&b, 5, GuestConfig::default());
    gb.listen(Port(5000), SocketType::Stream).unwrap();
    let (ka, kb) = connect_pair(&mut ga, &mut gb, 5000, SocketType::Stream);
    let (kc, kbc) = connect_pair(&mut gc, &mut gb, 5000, SocketType::Stream);
    exchange(&mut ga, ka, &mut gb, kb, 1);
    exchange(&mut gc, kc, &mut gb, kbc, 2);

    // b leaves group g: a's connection goes, c's (group h) stays.
    let regrouped = [
        VmOpts::new(3).name("a").groups(&["g"]),
        VmOpts::new(4).name("b").groups(&["h"]),
        VmOpts::new(5).name("c").groups(&["h"]),
    ];
    b.rewrite_config_vms(&regrouped, "");
    b.reload();
    let end_a = wait_connection_end(&mut ga, &mut [&mut gb], ka, RELOAD_WITHIN);
    assert!(
        end_a.is_ok(),
        "a's connection survived b leaving their group: {end_a:?}\n{}",
        b.log_tail()
    );
    let end_b = wait_connection_end(&mut gb, &mut [&mut ga], kb, RELOAD_WITHIN);
    assert!(end_b.is_ok(), "b's end of it: {end_b:?}");
    ga.close(ka).unwrap();
    gb.close(kb).unwrap();
    expect_refused(&mut ga, Some(&mut gb), addr(4, 5000), SocketType::Stream);
    exchange(&mut gc, kc, &mut gb, kbc, 3);
}

// ---- 13. closes and a guest going away ----------------------------------------------------

#[test]
fn close_delivers_and_a_vanished_guest_resets_its_peers() {
    let vms = [VmOpts::new(3).groups(&["g"]), VmOpts::new(4).groups(&["g"])];
    let b = Backend::domsockd_with("g2g-close", &vms, None);
    let mut ga = ready(&b, 3, GuestConfig::default());
    let mut gb = ready(&b, 4, GuestConfig::default());
    gb.listen(Port(5000), SocketType::Stream).unwrap();
    // A full close right after the last write: everything written still arrives, then EOF.
    let (ka, kb) = connect_pair(&mut ga, &mut gb, 5000, SocketType::Stream);
    let data = pattern(5, 200_000);
    ga.write_all(ka, &data, STEP_TIMEOUT).unwrap();
    ga.close(ka).unwrap();
    let mut got = Vec::new();
    gb.read_to_end(kb, &mut got, STEP_TIMEOUT)
        .unwrap_or_else(|e| panic!("b reading after a's close: {}", chain(&e)));
    assert_eq!(got.len(), data.len());
    assert!(got == data);
    gb.close(kb).unwrap();
    ga.flush_timeout(STEP_TIMEOUT).unwrap();

    // Connections both ways, then a's guest goes away without closing anything: b's ends
    // are reset (or see EOF) promptly.
    ga.listen(Port(6000), SocketType::Stream).unwrap();
    let (ka1, kb1) = connect_pair(&mut ga, &mut gb, 5000, SocketType::Stream);
    let (kb2, ka2) = connect_pair(&mut gb, &mut ga, 6000, SocketType::Stream);
    exchange(&mut ga, ka1, &mut gb, kb1, 1);
    exchange(&mut gb, kb2, &mut ga, ka2, 2);
    drop(ga);
    for k in [kb1, kb2] {
        let end = wait_connection_end(&mut gb, &mut [], k, Duration::from_secs(2));
        assert!(
            end.is_ok(),
            "b's connection {k} after a vanished: {end:?}\n{}",
            b.log_tail()
        );
    }
    // A new session of VM 3 connects again.
    let mut ga = ready(&b, 3, GuestConfig::default());
    let (ka, kb) = connect_pair(&mut ga, &mut gb, 5000, SocketType::Stream);
    exchange(&mut ga, ka, &mut gb, kb, 3);
    for cid in [3, 4] {
        b.counters(cid).assert_zero(FAILURES);
    }
}

// ---- 14. many connections between two guests ----------------------------------------------

#[test]
fn many_concurrent_connections_between_two_guests() {
    const CONNS: usize = 100;
    let vms = [VmOpts::new(3).groups(&["g"]), VmOpts::new(4).groups(&["g"])];
    let b = Backend::domsockd_with("g2g-many", &vms, None);
    let mut ga = ready(&b, 3, GuestConfig::default());
    let mut gb = ready(&b, 4, GuestConfig::default());
    gb.listen(Port(5000), SocketType::Stream).unwrap();
    gb.listen(Port(5001), SocketType::SeqPacket).unwrap();
    let pairs: Vec<(ConnKey, ConnKey, SocketType)> = (0..CONNS)
        .map(|i| {
            let (port, ty) = if i % 2 == 0 {
                (5000, SocketType::Stream)
            } else {
                (5001, SocketType::SeqPacket)
            };
            let (ka, kb) = connect_pair(&mut ga, &mut gb, port, ty);
            (ka, kb, ty)
        })
        .collect();
    // Every connection gets its own message, all in flight at once.
    let msg = |i: usize| pattern(100 + i as u64, 1000 + 37 * i);
    for (i, (ka, _, _)) in pairs.iter().enumerate() {
        ga.write_all(*ka, &msg(i), STEP_TIMEOUT).unwrap();
    }
    let mut buf = vec![0u8; 16 * KIB];
    for (i, (_, kb, ty)) in pairs.iter().enumerate() {
        let want = msg(i);
        let got = match ty {
            SocketType::Stream => {
                let mut v = vec![0u8; want.len()];
                gb.read_exact(*kb, &mut v, STEP_TIMEOUT).unwrap();
                v
            }
            SocketType::SeqPacket => {
                let m = gb
                    .recv_msg_timeout(*kb, &mut buf, STEP_TIMEOUT)
                    .unwrap()
                    .unwrap();
                buf[..m.len].to_vec()
            }
        };
        assert!(
            got == want,
            "connection {i} ({ty:?}) got another connection's bytes"
        );
        gb.write_all(*kb, &want[..10], STEP_TIMEOUT).unwrap();
    }
    for (i, (ka, _, _)) in pairs.iter().enumerate() {
        let mut v = [0u8; 10];
        ga.read_exact(*ka, &mut v, STEP_TIMEOUT).unwrap();
        assert!(v[..] == msg(i)[..10], "reply on connection {i}");
    }
    for (ka, kb, _) in pairs {
        ga.close(ka).unwrap();
        gb.close(kb).unwrap();
    }
    ga.flush_timeout(STEP_TIMEOUT).unwrap();
    gb.flush_timeout(STEP_TIMEOUT).unwrap();
    for cid in [3, 4] {
        b.counters(cid).assert_zero(FAILURES);
    }
}

// ---- 15. hostile sender ---------------------------------------------------------------------

#[test]
fn hostile_sender_cannot_bypass_the_relay() {
    let vms = [
        VmOpts::new(3).name("a").groups(&["g"]),
        VmOpts::new(4).name("b").groups(&["g"]),
        VmOpts::new(5).name("outsider"),
    ];
    let b = Backend::domsockd_with("g2g-hostile", &vms, None);
    let mut ga = ready(&b, 3, GuestConfig::default());
    let mut gb = ready(&b, 4, GuestConfig::default());
    let mut go = ready(&b, 5, GuestConfig::default());
    gb.listen(Port(7000), SocketType::Stream).unwrap();
    let raw = |src: VsockAddr, dst: VsockAddr, op: Op, len: u32, flags: u32| {
        HeaderBuilder::new(src, dst, op)
            .len(len)
            .flags(flags)
            .credit(256 * 1024, 0)
            .build()
    };

    // The outsider (no group with b) skips the handshake: data, credit, a response and a
    // shutdown for a connection that was never made. None of it may reach b.
    settle(&mut gb);
    let rx_b = gb.stats().rx_packets;
    let (src, dst) = (addr(5, 4000), addr(4, 7000));
    for h in [
        raw(src, dst, Op::Rw, 100, 0),
        raw(src, dst, Op::CreditUpdate, 0, 0),
        raw(src, dst, Op::CreditRequest, 0, 0),
        raw(src, dst, Op::Response, 0, 0),
        raw(src, dst, Op::Shutdown, 0, 3),
    ] {
        let payload = vec![b'z'; h.len() as usize];
        go.send_raw_timeout(&h, &payload, STEP_TIMEOUT).unwrap();
    }
    go.flush_timeout(STEP_TIMEOUT).unwrap();
    expect_no_accept(&mut gb, 7000);
    assert_eq!(
        gb.stats().rx_packets,
        rx_b,
        "packets of a never-made connection from a denied peer reached b"
    );

    // A member overruns b's window on an established connection with forged data packets:
    // the connection is reset, and b never holds more than the window it advertised.
    let (ka, kb) = connect_pair(&mut ga, &mut gb, 7000, SocketType::Stream);
    exchange(&mut ga, ka, &mut gb, kb, 1);
    let before = b.counters(3).get("protocol_resets");
    let rx_bytes_b = gb.stats().rx_bytes;
    let chunk = vec![b'o'; 64 * KIB];
    for _ in 0..6 {
        let h = raw(ka.local, ka.peer, Op::Rw, chunk.len() as u32, 0);
        ga.send_raw_timeout(&h, &chunk, STEP_TIMEOUT).unwrap();
    }
    ga.flush_timeout(STEP_TIMEOUT).unwrap();
    let end_b = wait_connection_end(&mut gb, &mut [&mut ga], kb, Duration::from_secs(2));
    let end_a = wait_connection_end(&mut ga, &mut [&mut gb], ka, Duration::from_secs(2));
    eprintln!("credit overrun: a sees {end_a:?}, b sees {end_b:?}");
    let gs = gb.stats();
    eprintln!("b: {gs:?}");
    assert!(
        end_b.is_ok() && end_a.is_ok(),
        "credit overrun did not end the connection: a {end_a:?}, b {end_b:?}\n{}",
        b.log_tail()
    );
    assert!(
        gs.rx_bytes - rx_bytes_b <= 256 * KIB as u64,
        "b received {} bytes on a window of 256 KiB",
        gs.rx_bytes - rx_bytes_b
    );
    assert_eq!(
        gs.protocol_resets, 0,
        "b had to detect the overrun itself: domsockd forwarded beyond the window"
    );
    assert!(
        b.counters(3).get("protocol_resets") > before,
        "the overrun was not counted on the sender: {:?}",
        b.counters(3)
    );
    // Both guests still work.
    let (ka, kb) = connect_pair(&mut ga, &mut gb, 7000, SocketType::Stream);
    exchange(&mut ga, ka, &mut gb, kb, 2);
}

// ---- 16. a peer that just came up -----------------------------------------------------------

#[test]
fn connect_to_a_guest_right_after_it_started() {
    let vms = [
        VmOpts::new(3).groups(&["g"]),
        VmOpts::new(4).groups(&["g"]),
        VmOpts::new(5).groups(&["g"]),
    ];
    let b = Backend::domsockd_with("g2g-fresh", &vms, None);
    let mut ga = ready(&b, 3, GuestConfig::default());
    // VM 5 has no guest session at all: a connect to it is answered at once, not left to
    // time out.
    expect_refused(&mut ga, None, addr(5, 5000), SocketType::Stream);
    // A guest whose device setup just returned (rings started, RX buffers posted, kicked)
    // is a running peer: a connect to its listener must get through, every time.
    const ROUNDS: usize = 100;
    let mut refused = 0;
    for round in 0..ROUNDS {
        let mut gb = b.guest_on(4, GuestConfig::default());
        gb.listen(Port(5000), SocketType::Stream).unwrap();
        let (r, _) = try_connect(
            &mut ga,
            &mut [&mut gb],
            addr(4, 5000),
            SocketType::Stream,
            STEP_TIMEOUT,
        );
        match r {
            Ok(k) => {
                let kb = gb.accept_timeout(Port(5000), STEP_TIMEOUT).unwrap();
                one_way(&mut ga, k, &mut gb, kb, round as u64);
                ga.close(k).unwrap();
            }
            Err(SockError::Refused(_)) => refused += 1,
            Err(e) => panic!(
                "round {round}: {} (the new guest of VM 4: {:?})",
                chain(&e),
                gb.stats()
            ),
        }
        drop(gb);
    }
    assert_eq!(
        refused,
        0,
        "{refused} of {ROUNDS} connects to a guest that had just finished its device setup \
         were refused (counters of 3: {:?})",
        b.counters(3)
    );
}

// ---- 17. a broken config on reload ------------------------------------------------------------

#[test]
fn sighup_with_a_broken_config_keeps_the_running_policy() {
    let vms = [
        VmOpts::new(3).name("a"),
        VmOpts::new(4).name("b"),
        VmOpts::new(5).name("c"),
    ];
    let mut b = Backend::domsockd_with("g2g-hup-bad", &vms, Some(A_TO_B));
    let mut ga = ready(&b, 3, GuestConfig::default());
    let mut gb = ready(&b, 4, GuestConfig::default());
    let mut gc = ready(&b, 5, GuestConfig::default());
    gb.listen(Port(5000), SocketType::Stream).unwrap();
    let (ka, kb) = connect_pair(&mut ga, &mut gb, 5000, SocketType::Stream);
    let broken_files = [
        // Each would, if half applied, let c in or drop a's rule.
        "[[policy.allow]]\nfrom = \"c\"\nto = \"b\"\nports = \"not-a-port\"\n",
        "[[policy.allow]]\nfrom = \"c\"\nto = \"b\"\n[[policy.allow\n",
        "[[policy.allow]]\nfrom = \"c\"\nto = \"b\"\nbogus-field = 1\n",
    ];
    for (i, broken) in broken_files.into_iter().enumerate() {
        b.rewrite_config(broken);
        b.reload();
        // Give the reload time to happen (and fail); the guests keep polling meanwhile.
        let until = Instant::now() + Duration::from_millis(300);
        while Instant::now() < until {
            poll_all(&mut [&mut ga, &mut gb, &mut gc]);
            thread::sleep(Duration::from_millis(5));
        }
        assert!(
            b.is_running(),
            "domsockd exited on broken config {i}\n{}",
            b.log_tail()
        );
        exchange(&mut ga, ka, &mut gb, kb, i as u64);
        expect_refused(&mut gc, Some(&mut gb), addr(4, 5000), SocketType::Stream);
    }
    // A good file applies again.
    b.rewrite_config(A_TO_B_AND_C_TO_B);
    b.reload();
    connect_once_allowed(&mut gc, &mut gb, 5000, "c->b after a good reload");
    exchange(&mut ga, ka, &mut gb, kb, 9);
}

// ---- 18. an over-long control line ------------------------------------------------------------

#[test]
fn control_service_rejects_an_over_long_line() {
    let b = Backend::domsockd_with("ctl-long", &[VmOpts::new(3).name("web")], None);
    let mut web = ready(&b, 3, GuestConfig::default());
    let mut buf = vec![0u8; 4096];
    // A request line longer than the limit gets an error line or the connection ends;
    // never silence.
    let long = ControlClient::connect(&mut web);
    let mut line = b"RESOLVE ".to_vec();
    line.extend(std::iter::repeat_n(b'x', 400));
    line.push(b'\n');
    web.write_all(long.key, &line, STEP_TIMEOUT).unwrap();
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(2);
    let outcome = loop {
        match web.recv(long.key, &mut buf) {
            Ok(0) => break "EOF".to_string(),
            Ok(n) => {
                got.extend_from_slice(&buf[..n]);
                if got.contains(&b'\n') {
                    break String::from_utf8_lossy(&got).into_owned();
                }
            }
            Err(SockError::WouldBlock) => {}
            Err(e) => break chain(&e),
        }
        assert!(
            Instant::now() < deadline,
            "no answer to an over-long request line (got {got:?})"
        );
        web.poll(Some(Duration::from_millis(5))).unwrap();
    };
    eprintln!("over-long control line: {outcome:?}");
    assert!(
        outcome.starts_with("ERR") || outcome == "EOF" || outcome.contains("reset"),
        "over-long control line: {outcome:?}"
    );
    let _ = web.close(long.key);

    // The service still answers on a new connection.
    let mut ctl = ControlClient::connect(&mut web);
    assert_eq!(
        ctl.call(&mut web, &Request::Resolve("web".into())),
        Reply::Resolved(Cid(3))
    );
    // A guest's malformed request is no host socket error.
    b.counters(3).assert_zero(FAILURES);
}

// ---- 19. a member sending garbage ---------------------------------------------------------

#[test]
fn random_packets_from_a_member_never_hurt_other_conversations() {
    let vms = [
        VmOpts::new(3).name("a").groups(&["g"]),
        VmOpts::new(4).name("b").groups(&["g"]),
        VmOpts::new(5).name("c").groups(&["g"]),
    ];
    let mut b = Backend::domsockd_with("g2g-garbage", &vms, None);
    let mut ga = ready(&b, 3, GuestConfig::default());
    let gb = ready(&b, 4, GuestConfig::default());
    let gc = ready(&b, 5, GuestConfig::default());
    // b and c stream 16 MiB both ways on their own threads while a sends 20,000 packets
    // of every kind: to b and c, to the host and its control service, to itself, to CIDs
    // nobody has, with forged source CIDs, for connections that exist and that do not,
    // with random credit fields. (The conversation's port is not among a's targets only
    // so that b's accept cannot pick up one of a's requests instead of c's.)
    let conversation = thread::spawn(move || duplex_pair(gc, gb, 7300, 16 * MIB));
    let mut rng = Rng::new(0x9e37_79b9_7f4a_7c15);
    let ops = [
        Op::Request,
        Op::Response,
        Op::Rst,
        Op::Shutdown,
        Op::Rw,
        Op::CreditUpdate,
        Op::CreditRequest,
    ];
    let cids = [2u64, 3, 4, 5, 6, 1, 0, u64::from(u32::MAX), 77];
    let ports = [7000u32, 1023, 1, 5000, 40_000, u32::MAX];
    let payload = vec![0xa5u8; 4096];
    let start = Instant::now();
    for i in 0..20_000u32 {
        let op = rng.pick(&ops);
        let len = if op == Op::Rw {
            (rng.next_u64() % 4097) as u32
        } else {
            0
        };
        let src_cid = if rng.next_u64() % 10 == 0 {
            rng.pick(&cids)
        } else {
            3
        };
        // Drawn in this order, so a seed gives the same packets as before.
        let src = addr(src_cid, rng.pick(&ports).wrapping_add(i % 3));
        let dst = addr(rng.pick(&cids), rng.pick(&ports));
        let socket_type = if rng.next_u64() % 2 == 0 {
            SocketType::Stream
        } else {
            SocketType::SeqPacket
        };
        let flags = (rng.next_u64() % 4) as u32;
        let (buf_alloc, fwd_cnt) = (rng.next_u64() as u32, rng.next_u64() as u32);
        let h = HeaderBuilder::new(src, dst, op)
            .socket_type(socket_type)
            .len(len)
            .flags(flags)
            .credit(buf_alloc, fwd_cnt)
            .build();
        ga.send_raw_timeout(&h, &payload[..len as usize], STEP_TIMEOUT)
            .unwrap_or_else(|e| panic!("packet {i} ({h:?}): {}\n{}", chain(&e), b.log_tail()));
        if i % 64 == 0 {
            ga.poll(Some(Duration::ZERO)).unwrap();
        }
    }
    ga.flush_timeout(STEP_TIMEOUT).unwrap();
    let garbage_time = start.elapsed();
    let (gc, mut gb, t) = conversation.join().expect("b<->c conversation");
    eprintln!("20,000 random packets in {garbage_time:?}; b<->c 16 MiB each way in {t:?}");
    assert!(b.is_running(), "domsockd died\n{}", b.log_tail());
    let ca = b.counters(3);
    assert!(ca.get("spoofed_packets") > 0, "{ca:?}");
    assert!(ca.get("unroutable_packets") > 0, "{ca:?}");
    // b and c never saw a failure of their own.
    for (cid, name) in [(4, "b"), (5, "c")] {
        let cs = b.counters(cid);
        for f in [
            "malformed_chains",
            "bad_headers",
            "spoofed_packets",
            "protocol_resets",
        ] {
            assert_eq!(cs.get(f), 0, "{name}: {f} moved: {cs:?}");
        }
    }
    drop(gc);
    // a itself still works once it behaves: a fresh connection to b moves data both ways.
    settle(&mut ga);
    gb.listen(Port(7100), SocketType::Stream).unwrap();
    let (ka, kb) = connect_pair(&mut ga, &mut gb, 7100, SocketType::Stream);
    exchange(&mut ga, ka, &mut gb, kb, 9);
}

// ---- 20. reload and guest-to-host connections ----------------------------------------------

#[test]
fn sighup_reload_resets_host_connections_no_longer_allowed() {
    let vms = [VmOpts::new(3).name("web"), VmOpts::new(4).name("db")];
    let b = Backend::domsockd_with("g2h-reload", &vms, Some(HOST_RULES));
    let mut web = ready(&b, 3, GuestConfig::default());
    let listener = listen_stream(&b.vm(0).uds, 5000);
    let key = web
        .connect_timeout(host(5000), SocketType::Stream, STEP_TIMEOUT)
        .unwrap();
    let mut hs = listener.accept().unwrap().0;
    web.write_all(key, b"before", STEP_TIMEOUT).unwrap();
    web.flush_timeout(STEP_TIMEOUT).unwrap();
    let mut got = [0u8; 6];
    hs.set_read_timeout(Some(STEP_TIMEOUT)).unwrap();
    hs.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"before");

    // A reload that keeps the rule keeps the connection.
    b.rewrite_config(HOST_RULES);
    b.reload();
    thread::sleep(QUIET);
    web.write_all(key, b"during", STEP_TIMEOUT).unwrap();
    web.flush_timeout(STEP_TIMEOUT).unwrap();
    hs.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"during");

    // A reload without it resets the guest's end and closes the host's.
    b.rewrite_config("[policy]\nguest-to-host = \"rules\"\n");
    b.reload();
    let end = wait_connection_end(&mut web, &mut [], key, RELOAD_WITHIN);
    assert_eq!(end, Ok("reset"), "{}", b.log_tail());
    let mut rest = Vec::new();
    assert_eq!(hs.read_to_end(&mut rest).unwrap(), 0, "host end not closed");
    expect_refused(&mut web, None, host(5000), SocketType::Stream);
    assert!(
        b.log_text()
            .contains("no longer allowed by the reloaded policy"),
        "{}",
        b.log_tail()
    );
}

// ---- sessions to siblings ------------------------------------------------------------

/// `a` opens a session to `b`'s listener on `port` through the session port; returns
/// `a`'s key (after OPENED, which is returned too) and `b`'s accepted key.
fn open_sibling_session(
    a: &mut UserGuest,
    b: &mut UserGuest,
    port: u32,
) -> (ConnKey, domsock_migration::session::wire::Frame, ConnKey) {
    use domsock_migration::session::wire::Frame;
    let ka = a
        .connect_timeout(host(1022), SocketType::Stream, STEP_TIMEOUT)
        .unwrap();
    let open = Frame::Open {
        cid: b.cid(),
        port: Port(port),
        socket_type: SocketType::Stream,
    };
    a.write_all(ka, &open.encode(), STEP_TIMEOUT).unwrap();
    let deadline = Instant::now() + STEP_TIMEOUT;
    let mut kb = None;
    let mut buf = Vec::new();
    loop {
        assert!(Instant::now() < deadline, "no OPENED / accept: {buf:?}");
        if kb.is_none() {
            kb = b.accept(Port(port)).unwrap();
        }
        let mut chunk = [0u8; 128];
        match a.recv(ka, &mut chunk) {
            Ok(0) => panic!("EOF before OPENED"),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(SockError::WouldBlock) => {}
            Err(e) => panic!("recv: {}", chain(&e)),
        }
        if let (Some((f, used)), Some(kb)) = (Frame::decode(&buf).unwrap(), kb) {
            assert_eq!(used, buf.len());
            return (ka, f, kb);
        }
        a.poll(Some(Duration::from_millis(1))).unwrap();
        b.poll(Some(Duration::from_millis(1))).unwrap();
    }
}

#[test]
fn a_session_to_a_sibling_is_an_ordinary_connection_for_the_sibling() {
    use domsock_migration::session::wire::{Frame, Refusal};
    let vms = [
        VmOpts::new(3).groups(&["pair"]),
        VmOpts::new(4).groups(&["pair"]),
        VmOpts::new(5),
    ];
    let b = Backend::domsockd_with("g2g-session", &vms, None);
    let mut ga = ready(&b, 3, GuestConfig::default());
    let mut gb = ready(&b, 4, GuestConfig::default());
    gb.listen(Port(5000), SocketType::Stream).unwrap();
    let (ka, opened, kb) = open_sibling_session(&mut ga, &mut gb, 5000);
    assert!(matches!(opened, Frame::Opened { .. }), "{opened:?}");
    assert_eq!(
        kb.peer.cid,
        Cid(3),
        "the sibling sees the session's guest as its peer"
    );
    exchange(&mut ga, ka, &mut gb, kb, 77);
    transfer(&mut ga, ka, &mut gb, kb, 8 * MIB);
    assert_eq!(b.counters(3).get("sessions_opened"), 1);
    // A sibling outside the policy: refused with EACCES in the frame, counted as denied.
    let mut gc = ready(&b, 5, GuestConfig::default());
    gc.listen(Port(5000), SocketType::Stream).unwrap();
    let k = ga
        .connect_timeout(host(1022), SocketType::Stream, STEP_TIMEOUT)
        .unwrap();
    let open = Frame::Open {
        cid: Cid(5),
        port: Port(5000),
        socket_type: SocketType::Stream,
    };
    ga.write_all(k, &open.encode(), STEP_TIMEOUT).unwrap();
    let mut answer = vec![0u8; 16];
    ga.read_exact(k, &mut answer, STEP_TIMEOUT).unwrap();
    assert_eq!(
        Frame::decode(&answer).unwrap().map(|f| f.0),
        Some(Frame::Refused {
            reason: Refusal::TargetRefused,
            errno: libc::EACCES as u32
        })
    );
    expect_no_accept(&mut gc, 5000);
}
