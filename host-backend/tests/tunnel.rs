//! The tunnel runtime over loopback TCP with real TLS (rustls, certificates from
//! `certs::make_test_pki`): many checksummed channels, a stalled channel, a foreign CA,
//! TCP cuts mid-stream through an in-test proxy, and a tunnel that stays down past the
//! resume timeout.

use domsock_host::test_utils::CutProxy;
use domsock_host::test_utils::TempDir;
use domsock_host::tunnel::{
    certs, unix, Acceptor, ChannelEnd, ChannelKind, ChannelState, ReadyGroup, Refusal, RefusalCode,
    TunnelConfig, TunnelService,
};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsFd;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use xxhash_rust::xxh3::Xxh3;

const DEADLINE: Duration = Duration::from_secs(20);

#[derive(Default)]
struct Accepted {
    ends: Mutex<Vec<(ChannelEnd, Vec<u8>)>>,
    cv: Condvar,
}

impl Acceptor for Accepted {
    fn on_open(&self, _peer: &str, metadata: &[u8], _kind: ChannelKind) -> Result<(), Refusal> {
        if metadata == b"deny" {
            return Err(Refusal {
                code: RefusalCode::Policy,
                text: "test policy".into(),
            });
        }
        Ok(())
    }
    fn accepted(&self, end: ChannelEnd, metadata: Vec<u8>) {
        self.ends.lock().unwrap().push((end, metadata));
        self.cv.notify_all();
    }
}

impl Accepted {
    /// The accepted end opened with `metadata`.
    fn take(&self, metadata: &[u8]) -> ChannelEnd {
        let mut g = self.ends.lock().unwrap();
        let until = Instant::now() + DEADLINE;
        loop {
            if let Some(i) = g.iter().position(|(_, m)| m == metadata) {
                return g.swap_remove(i).0;
            }
            let left = until.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "no channel {:?} accepted", metadata);
            g = self.cv.wait_timeout(g, left).unwrap().0;
        }
    }
}

fn config(dir: &Path, host: &str, peer: &str, peer_addr: Option<SocketAddr>) -> TunnelConfig {
    let mut c = TunnelConfig::new(
        host,
        "127.0.0.1:0".parse().unwrap(),
        dir.join(format!("{host}.pem")),
        dir.join(format!("{host}.key")),
        dir.join("ca.pem"),
    );
    c.peers.insert(peer.to_owned(), peer_addr);
    c.keepalive_idle = Duration::from_millis(200);
    c.keepalive_dead = Duration::from_secs(3);
    c.resume_timeout = Duration::from_secs(20);
    c.buf_alloc_bytes = 256 << 10;
    c
}

struct Pair {
    _dir: TempDir,
    a: TunnelService,
    b: TunnelService,
    a_acc: Arc<Accepted>,
    b_acc: Arc<Accepted>,
    proxy: Option<CutProxy>,
}

/// Hosts "a" (dials) and "b" (listens); with `proxied`, a reaches b through a [`CutProxy`].
fn pair(tag: &str, proxied: bool, tweak: impl Fn(&mut TunnelConfig)) -> Pair {
    let dir = TempDir::new(tag).unwrap();
    certs::make_test_pki(dir.path(), ["a", "b"]).unwrap();
    let b_acc = Arc::new(Accepted::default());
    let mut bc = config(dir.path(), "b", "a", None);
    tweak(&mut bc);
    let b = TunnelService::start(bc, b_acc.clone()).unwrap();
    let proxy = proxied.then(|| CutProxy::start(b.local_addr()));
    let target = proxy.as_ref().map_or(b.local_addr(), |p| p.addr);
    let a_acc = Arc::new(Accepted::default());
    let mut ac = config(dir.path(), "a", "b", Some(target));
    tweak(&mut ac);
    let a = TunnelService::start(ac, a_acc.clone()).unwrap();
    Pair {
        _dir: dir,
        a,
        b,
        a_acc,
        b_acc,
        proxy,
    }
}

fn wait_fd(end: &ChannelEnd, until: Instant) {
    assert!(Instant::now() < until, "deadline passed on {end:?}");
    let mut fds = [PollFd::new(end.as_fd(), PollFlags::POLLIN)];
    let _ = poll(&mut fds, PollTimeout::from(50u16));
}

fn pattern(seed: u64, at: u64) -> u8 {
    (at.wrapping_mul(0x9e37_79b9) >> 7 ^ seed) as u8
}

/// Writes `len` pattern bytes in 64 KiB writes, then shuts the write side.
fn send(end: &ChannelEnd, seed: u64, len: u64) -> u64 {
    let until = Instant::now() + DEADLINE;
    let mut h = Xxh3::new();
    let mut chunk = vec![0u8; 64 << 10];
    let mut at = 0u64;
    while at < len {
        let n = (len - at).min(chunk.len() as u64) as usize;
        for (i, b) in chunk[..n].iter_mut().enumerate() {
            *b = pattern(seed, at + i as u64);
        }
        let mut off = 0;
        while off < n {
            end.clear_wakeup();
            match end.write(&chunk[off..n]) {
                Ok(k) => off += k,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => wait_fd(end, until),
                Err(e) => panic!("write on {end:?}: {e}"),
            }
        }
        h.update(&chunk[..n]);
        at += n as u64;
    }
    end.shutdown(std::net::Shutdown::Write).unwrap();
    h.digest()
}

/// Reads to EOF; returns (length, checksum).
fn recv(end: &ChannelEnd) -> (u64, u64) {
    let until = Instant::now() + DEADLINE;
    let mut h = Xxh3::new();
    let mut buf = vec![0u8; 64 << 10];
    let mut total = 0u64;
    loop {
        end.clear_wakeup();
        match end.read(&mut buf) {
            Ok(0) => return (total, h.digest()),
            Ok(n) => {
                h.update(&buf[..n]);
                total += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => wait_fd(end, until),
            Err(e) => panic!("read on {end:?} after {total} bytes: {e}"),
        }
    }
}

fn expected(seed: u64, len: u64) -> (u64, u64) {
    let mut h = Xxh3::new();
    let v: Vec<u8> = (0..len).map(|i| pattern(seed, i)).collect();
    h.update(&v);
    (len, h.digest())
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let until = Instant::now() + DEADLINE;
    while !f() {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn many_channels_both_ways_arrive_checksummed() {
    let p = pair("tunnel-many", false, |_| {});
    const N: u64 = 12;
    const LEN: u64 = 3 << 20;
    std::thread::scope(|s| {
        for i in 0..N {
            let (p, from_a) = (&p, i % 3 != 0);
            s.spawn(move || {
                let meta = format!("ch{i}").into_bytes();
                let (opener, acc) = if from_a {
                    (&p.a, &p.b_acc)
                } else {
                    (&p.b, &p.a_acc)
                };
                let peer = if from_a { "b" } else { "a" };
                let mine = opener.open(peer, &meta, ChannelKind::Stream).unwrap();
                let theirs = acc.take(&meta);
                assert_eq!(theirs.id(), mine.id());
                std::thread::scope(|s2| {
                    let r1 = s2.spawn(|| recv(&theirs));
                    let r2 = s2.spawn(|| recv(&mine));
                    send(&mine, i, LEN);
                    send(&theirs, i + 100, LEN / 2);
                    assert_eq!(r1.join().unwrap(), expected(i, LEN), "channel {i} forth");
                    assert_eq!(
                        r2.join().unwrap(),
                        expected(i + 100, LEN / 2),
                        "channel {i} back"
                    );
                });
                let c = mine.counters();
                assert_eq!((c.sent, c.received, c.consumed), (LEN, LEN / 2, LEN / 2));
            });
        }
    });
    let ca = p.a.counters("b").unwrap();
    assert_eq!(ca.connections, 1);
    assert!(ca.bytes_sent > N * LEN * 2 / 3, "{ca:?}");
    assert!(ca.frames_received > 0);
}

/// One thread serves many channels in both directions through one [`ReadyGroup`]: it
/// waits on the group's eventfd alone and touches a channel only when its key was
/// reported (a change the group failed to report would stall that channel until the
/// deadline). The channels join after data arrived, so the join itself must report what
/// came before it; replies go back while the other side still sends, so writes wait for
/// credit through the group too.
#[test]
fn one_ready_group_serves_many_channels_on_one_thread() {
    let p = pair("tunnel-group", false, |_| {});
    const N: usize = 16;
    const LEN: u64 = 1 << 20;
    let senders: Vec<ChannelEnd> = (0..N)
        .map(|i| {
            p.a.open("b", format!("g{i}").as_bytes(), ChannelKind::Stream)
                .unwrap()
        })
        .collect();
    std::thread::scope(|s| {
        for (i, e) in senders.iter().enumerate() {
            s.spawn(move || {
                send(e, i as u64, LEN);
                let got = recv(e);
                assert_eq!(got, expected(i as u64 + 500, LEN / 4), "channel {i} back");
            });
        }
        let group = ReadyGroup::new().unwrap();
        let mut ends: Vec<ChannelEnd> = (0..N)
            .map(|i| p.b_acc.take(format!("g{i}").as_bytes()))
            .collect();
        // Data is waiting before the ends join: the join must report it.
        for e in &ends {
            wait_until("data before the join", || e.counters().received > 0);
        }
        struct St {
            rx: Xxh3,
            rx_len: u64,
            eof: bool,
            tx_at: u64,
        }
        let mut st: Vec<St> = (0..N)
            .map(|_| St {
                rx: Xxh3::new(),
                rx_len: 0,
                eof: false,
                tx_at: 0,
            })
            .collect();
        for (i, e) in ends.iter().enumerate() {
            e.join_group(&group, i as u64);
        }
        let mut ready = Vec::new();
        let mut buf = vec![0u8; 64 << 10];
        let mut wakeups = 0u64;
        let until = Instant::now() + DEADLINE;
        while st.iter().any(|c| !c.eof || c.tx_at < LEN / 4) {
            assert!(
                Instant::now() < until,
                "group stalled: {:?}",
                st.iter().map(|c| (c.rx_len, c.tx_at)).collect::<Vec<_>>()
            );
            group.clear_wakeup();
            group.take_ready(&mut ready);
            if ready.is_empty() {
                let mut fds = [PollFd::new(group.as_fd(), PollFlags::POLLIN)];
                if poll(&mut fds, PollTimeout::from(2_000u16)).unwrap() == 0 {
                    // No wakeup for 2 s: nothing may be listed (a mark without a wakeup).
                    group.take_ready(&mut ready);
                    assert!(ready.is_empty(), "keys {ready:?} listed without a wakeup");
                }
                wakeups += 1;
                continue;
            }
            for k in ready.drain(..) {
                let (e, c) = (&ends[k as usize], &mut st[k as usize]);
                while c.tx_at < LEN / 4 {
                    let n = (LEN / 4 - c.tx_at).min(buf.len() as u64) as usize;
                    let chunk: Vec<u8> = (0..n as u64)
                        .map(|j| pattern(k + 500, c.tx_at + j))
                        .collect();
                    match e.write(&chunk) {
                        Ok(w) => c.tx_at += w as u64,
                        Err(err) if err.kind() == io::ErrorKind::WouldBlock => break,
                        Err(err) => panic!("write on {k}: {err}"),
                    }
                    if c.tx_at == LEN / 4 {
                        e.shutdown(std::net::Shutdown::Write).unwrap();
                    }
                }
                while !c.eof {
                    match e.read(&mut buf) {
                        Ok(0) => c.eof = true,
                        Ok(n) => {
                            c.rx.update(&buf[..n]);
                            c.rx_len += n as u64;
                        }
                        Err(err) if err.kind() == io::ErrorKind::WouldBlock => break,
                        Err(err) => panic!("read on {k}: {err}"),
                    }
                }
            }
        }
        for (i, c) in st.iter().enumerate() {
            assert_eq!(
                (c.rx_len, c.rx.digest()),
                expected(i as u64, LEN),
                "channel {i} forth"
            );
        }
        assert!(wakeups > 0);
        ends.clear();
    });
}

/// Ping-pong of small messages: each write must reach the driver at once. The driver
/// skips the eventfd while it is going to transmit anyway; a write it misses would wait
/// for its next timer (keepalive set far off here, so up to its 1 s poll cap).
#[test]
fn small_round_trips_never_wait_for_a_timer() {
    let p = pair("tunnel-pingpong", false, |c| {
        c.keepalive_idle = Duration::from_secs(10);
        c.keepalive_dead = Duration::from_secs(30);
    });
    let a = p.a.open("b", b"ping", ChannelKind::Stream).unwrap();
    let b = p.b_acc.take(b"ping");
    const ROUNDS: usize = 1500;
    fn read_exact(end: &ChannelEnd, buf: &mut [u8], until: Instant) {
        let mut got = 0;
        while got < buf.len() {
            end.clear_wakeup();
            match end.read(&mut buf[got..]) {
                Ok(0) => panic!("EOF on {end:?}"),
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => wait_fd(end, until),
                Err(e) => panic!("read on {end:?}: {e}"),
            }
        }
    }
    fn write_all(end: &ChannelEnd, buf: &[u8], until: Instant) {
        let mut off = 0;
        while off < buf.len() {
            end.clear_wakeup();
            match end.write(&buf[off..]) {
                Ok(n) => off += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => wait_fd(end, until),
                Err(e) => panic!("write on {end:?}: {e}"),
            }
        }
    }
    let until = Instant::now() + DEADLINE;
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut buf = [0u8; 64];
            for i in 0..ROUNDS {
                let len = 1 + i % 64;
                read_exact(&b, &mut buf[..len], until);
                buf[..len].reverse();
                write_all(&b, &buf[..len], until);
            }
        });
        let mut slowest = Duration::ZERO;
        let mut buf = [0u8; 64];
        for i in 0..ROUNDS {
            let len = 1 + i % 64;
            let msg: Vec<u8> = (0..len).map(|k| pattern(i as u64, k as u64)).collect();
            let t = Instant::now();
            write_all(&a, &msg, until);
            read_exact(&a, &mut buf[..len], until);
            slowest = slowest.max(t.elapsed());
            let mut want = msg.clone();
            want.reverse();
            assert_eq!(buf[..len], want[..], "round {i}");
        }
        assert!(
            slowest < Duration::from_millis(500),
            "a round trip took {slowest:?}: a write waited for a timer"
        );
    });
    let c = a.counters();
    let total: u64 = (0..ROUNDS as u64).map(|i| 1 + i % 64).sum();
    assert_eq!((c.sent, c.received, c.consumed), (total, total, total));
}

#[test]
fn a_stalled_channel_does_not_block_the_others() {
    let p = pair("tunnel-stall", false, |_| {});
    let stalled = p.a.open("b", b"stalled", ChannelKind::Stream).unwrap();
    let stalled_b = p.b_acc.take(b"stalled");
    // Fill the stalled channel's window: its reader never reads.
    let until = Instant::now() + DEADLINE;
    let mut sent = 0u64;
    let block = vec![0x5a; 64 << 10];
    while sent < 256 << 10 {
        match stalled.write(&block) {
            Ok(n) => sent += n as u64,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => wait_fd(&stalled, until),
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(
        stalled.write(&block).unwrap_err().kind(),
        io::ErrorKind::WouldBlock,
        "the window is 256 KiB"
    );
    let busy = p.a.open("b", b"busy", ChannelKind::Stream).unwrap();
    let busy_b = p.b_acc.take(b"busy");
    std::thread::scope(|s| {
        let r = s.spawn(|| recv(&busy_b));
        send(&busy, 1, 32 << 20);
        assert_eq!(r.join().unwrap(), expected(1, 32 << 20));
    });
    let c = stalled_b.counters();
    assert_eq!((c.received, c.consumed), (256 << 10, 0), "{c:?}");
    // Autotuning never grows a window whose reader takes nothing; the busy one's may
    // have grown (whether it did depends on the machine's speed).
    assert_eq!(c.buf_alloc, 256 << 10, "{c:?}");
    assert_eq!(stalled.counters().peer_buf_alloc, 256 << 10);
    eprintln!(
        "busy channel's window at the end: {} KiB ({} growths)",
        busy.counters().peer_buf_alloc >> 10,
        p.b.counters("a").unwrap().window_growths
    );
    // The stalled channel still works once read.
    stalled.shutdown(std::net::Shutdown::Write).unwrap();
    let (n, _) = recv(&stalled_b);
    assert_eq!(n, 256 << 10);
}

#[test]
fn a_peer_with_a_foreign_ca_is_refused_and_counted() {
    let p = pair("tunnel-ca", false, |_| {});
    let rogue_dir = TempDir::new("tunnel-rogue").unwrap();
    certs::make_test_pki(rogue_dir.path(), ["a"]).unwrap();
    let rogue_acc = Arc::new(Accepted::default());
    let rogue = TunnelService::start(
        config(rogue_dir.path(), "a", "b", Some(p.b.local_addr())),
        rogue_acc,
    )
    .unwrap();
    wait_until("refusals on both sides", || {
        p.b.refused_peers() >= 1 && rogue.refused_peers() >= 1
    });
    assert!(!rogue.is_up("b"));
    assert!(
        p.a.is_up("b") || {
            wait_until("the real a", || p.a.is_up("b"));
            true
        }
    );
    // A plain TCP client without TLS is refused too.
    let before = p.b.refused_peers();
    let mut s = TcpStream::connect(p.b.local_addr()).unwrap();
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    wait_until("the plain client refused", || p.b.refused_peers() > before);
}

#[test]
fn an_open_the_engine_refuses_is_reported() {
    let p = pair("tunnel-refuse", false, |_| {});
    let end = p.a.open("b", b"deny", ChannelKind::Stream).unwrap();
    wait_until("refusal", || {
        end.state() == ChannelState::Refused(RefusalCode::Policy)
    });
    assert_eq!(
        end.write(b"x").unwrap_err().kind(),
        io::ErrorKind::ConnectionRefused
    );
}

#[test]
fn cutting_tcp_mid_stream_resumes_without_loss_or_duplication() {
    let p = pair("tunnel-cut", true, |_| {});
    let proxy = p.proxy.as_ref().unwrap();
    const LEN: u64 = 24 << 20;
    let fwd = p.a.open("b", b"fwd", ChannelKind::Stream).unwrap();
    let fwd_b = p.b_acc.take(b"fwd");
    let back = p.b.open("a", b"back", ChannelKind::Stream).unwrap();
    let back_a = p.a_acc.take(b"back");
    std::thread::scope(|s| {
        let r1 = s.spawn(|| recv(&fwd_b));
        let r2 = s.spawn(|| recv(&back_a));
        let w1 = s.spawn(|| send(&fwd, 7, LEN));
        let w2 = s.spawn(|| send(&back, 8, LEN));
        for i in 0..4 {
            // Cut while bytes are in flight both ways, each time on a connection that is
            // up again (bytes of the one before can reach the target first: a cut between
            // two connections cut nothing, and the test then saw one reconnect too few).
            let target = (i + 1) * LEN / 6;
            wait_until("progress", || fwd_b.counters().received >= target);
            wait_until("reconnected", || {
                p.a.counters("b").is_some_and(|c| c.connections > i)
            });
            proxy.cut();
        }
        w1.join().unwrap();
        w2.join().unwrap();
        assert_eq!(r1.join().unwrap(), expected(7, LEN));
        assert_eq!(r2.join().unwrap(), expected(8, LEN));
    });
    let c = p.a.counters("b").unwrap();
    assert!(c.reconnects >= 4, "{c:?}");
    assert!(c.link_errors >= 4, "{c:?}");
}

#[test]
fn a_tunnel_down_past_the_timeout_fails_both_ends_cleanly() {
    let p = pair("tunnel-timeout", true, |c| {
        c.resume_timeout = Duration::from_millis(1500);
        c.keepalive_dead = Duration::from_millis(600);
    });
    let proxy = p.proxy.as_ref().unwrap();
    let a_end = p.a.open("b", b"t", ChannelKind::Stream).unwrap();
    let b_end = p.b_acc.take(b"t");
    wait_until("OPENED", || a_end.state() == ChannelState::Open);
    a_end.write(b"before").unwrap();
    wait_until("data", || b_end.counters().received == 6);
    proxy.set_up(false);
    proxy.cut();
    let t0 = Instant::now();
    wait_until("both ends timed out", || {
        a_end.state() == ChannelState::TimedOut && b_end.state() == ChannelState::TimedOut
    });
    assert!(
        t0.elapsed() >= Duration::from_millis(1000),
        "{:?}",
        t0.elapsed()
    );
    let mut buf = [0u8; 16];
    // Bytes that arrived before the cut are still there; then the documented error.
    assert_eq!(b_end.read(&mut buf).unwrap(), 6);
    assert_eq!(
        b_end.read(&mut buf).unwrap_err().kind(),
        io::ErrorKind::TimedOut
    );
    assert_eq!(
        a_end.write(b"x").unwrap_err().kind(),
        io::ErrorKind::TimedOut
    );
    let c = p.a.counters("b").unwrap();
    assert_eq!(c.channels_timed_out, 1, "{c:?}");
    // The tunnel comes back; new channels work.
    proxy.set_up(true);
    wait_until("tunnel back", || p.a.is_up("b") && p.b.is_up("a"));
    let again = p.a.open("b", b"again", ChannelKind::Stream).unwrap();
    let again_b = p.b_acc.take(b"again");
    std::thread::scope(|s| {
        let r = s.spawn(|| recv(&again_b));
        send(&again, 3, 1 << 20);
        assert_eq!(r.join().unwrap(), expected(3, 1 << 20));
    });
}

#[test]
fn the_unix_adapter_pumps_both_ways() {
    let p = pair("tunnel-unix", false, |_| {});
    let a_end = p.a.open("b", b"u", ChannelKind::Stream).unwrap();
    let b_end = p.b_acc.take(b"u");
    let (mut mine, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
    mine.set_read_timeout(Some(DEADLINE)).unwrap();
    let pump = unix::pump(b_end, theirs).unwrap();
    std::thread::scope(|s| {
        let r = s.spawn(|| recv(&a_end));
        let data: Vec<u8> = (0..(4u64 << 20)).map(|i| pattern(5, i)).collect();
        let w = s.spawn(move || {
            mine.write_all(&data).unwrap();
            mine.shutdown(std::net::Shutdown::Write).unwrap();
            let mut back = Vec::new();
            mine.read_to_end(&mut back).unwrap();
            back
        });
        // The socket's EOF reaches the channel while the other direction is still open.
        assert_eq!(r.join().unwrap(), expected(5, 4 << 20));
        send(&a_end, 6, 1 << 20);
        let back = w.join().unwrap();
        assert_eq!(back.len(), 1 << 20);
        assert!(back
            .iter()
            .enumerate()
            .all(|(i, &b)| b == pattern(6, i as u64)));
    });
    let stats = pump.join().unwrap().unwrap();
    assert_eq!((stats.to_channel, stats.to_socket), (4 << 20, 1 << 20));
}
