//! Bus sockets with guest members: user-space guests joining domsockd's bus service over
//! vsock seqpacket to host port 1021 (through the engine, as a kernel guest would) beside
//! host processes on the namespace's Unix socket, speaking the wire format of
//! `domsock_proto::bus` byte for byte. Declarations and permissions come from the config
//! file (`[[bus]]`, `[[policy.bus-create]]`) and are reloaded with SIGHUP.
//!
//! Needs `target/release/domsockd` (`cargo build --release -p domsock-host`) or `$DOMSOCKD`.

mod support;

use domsock_guest::uvirtio::{ConnKey, GuestConfig, SockError, SocketType, UserGuest};
use domsock_proto::bus::wire::{
    BusName, CreateParams, ErrorCode, Fields, MemberFrame, Policy, RefuseCode, ServiceFrame,
    SlowPolicy, Token, Want,
};
use domsock_proto::bus::BUS_PORT;
use nix::sys::socket::{
    connect, recv, send, socket, AddressFamily, MsgFlags, SockFlag, SockType, UnixAddr,
};
use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};
use support::*;

const STEP: Duration = Duration::from_secs(10);
const RUN: Duration = Duration::from_secs(120);
const RECEIVE: Want = Want {
    publish: false,
    receive: true,
};

/// What a member received, owned.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Got {
    Joined {
        member: u32,
        token: Token,
        lost: u64,
        granted: Want,
    },
    Refused(RefuseCode, String),
    Message {
        sender: u32,
        seq: u64,
        fields: Vec<u8>,
        payload: Vec<u8>,
    },
    Loss(u64),
    Error(ErrorCode),
    Subscribed,
}

fn decode(frame: &[u8]) -> Got {
    match ServiceFrame::decode(frame).expect("the service sends valid frames") {
        ServiceFrame::Joined(j) => Got::Joined {
            member: j.member.0,
            token: j.token,
            lost: j.lost,
            granted: j.granted,
        },
        ServiceFrame::Refused { code, text } => Got::Refused(code, text.to_owned()),
        ServiceFrame::Message {
            sender,
            seq,
            fields,
            payload,
        } => Got::Message {
            sender: sender.0,
            seq,
            fields: match fields {
                Fields::None => Vec::new(),
                Fields::Topic(t) => t.to_vec(),
                Fields::Addressed { dst, .. } => dst.to_vec(),
            },
            payload: payload.to_vec(),
        },
        ServiceFrame::Loss { messages, .. } => Got::Loss(messages),
        ServiceFrame::Error { code, .. } => Got::Error(code),
        ServiceFrame::Subscribed { .. } => Got::Subscribed,
        ServiceFrame::Batch(_) => panic!("a BATCH to a member that did not ask for batches"),
    }
}

fn encode(f: &MemberFrame<'_>) -> Vec<u8> {
    let mut v = Vec::new();
    f.encode(&mut v);
    v
}

fn join_frame(name: &str, want: Want, create: Option<CreateParams>) -> Vec<u8> {
    encode(&MemberFrame::Join {
        name: BusName::new(name).unwrap(),
        want,
        create,
        batches: false,
    })
}

/// The payload of `sender`'s message `seq`: every byte depends on both, so a message
/// delivered to the wrong place, twice or damaged is seen.
fn payload(sender: u32, seq: u64, len: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(len);
    let mut x =
        xxhash_rust::xxh3::xxh3_64(&[sender.to_le_bytes(), (seq as u32).to_le_bytes()].concat());
    while v.len() < len {
        v.extend_from_slice(&x.to_le_bytes());
        x = x.rotate_left(7) ^ 0x9e37_79b9_7f4a_7c15;
    }
    v.truncate(len);
    v
}

/// A guest's bus connection.
struct GuestMember {
    key: ConnKey,
    buf: Vec<u8>,
}

impl GuestMember {
    fn connect(g: &mut UserGuest) -> GuestMember {
        let key = g
            .connect_timeout(host(BUS_PORT.0), SocketType::SeqPacket, STEP)
            .unwrap_or_else(|e| panic!("bus connect: {}", chain(&e)));
        GuestMember {
            key,
            buf: vec![0; 1 << 17],
        }
    }

    fn join(
        g: &mut UserGuest,
        name: &str,
        want: Want,
        create: Option<CreateParams>,
    ) -> (GuestMember, Got) {
        let mut m = GuestMember::connect(g);
        m.send(g, &join_frame(name, want, create));
        let got = m.next(g).expect("an answer to JOIN");
        (m, got)
    }

    fn send(&self, g: &mut UserGuest, frame: &[u8]) {
        g.send_msg_timeout(self.key, frame, STEP)
            .unwrap_or_else(|e| panic!("bus send: {}", chain(&e)));
    }

    /// Sends without waiting: false if credit or ring room is short now.
    fn try_send(&self, g: &mut UserGuest, frame: &[u8]) -> bool {
        match g.send_msg(self.key, frame) {
            Ok(()) => true,
            Err(SockError::WouldBlock) => false,
            Err(e) => panic!("bus send: {}", chain(&e)),
        }
    }

    /// The next frame within [`STEP`]; `None` at end of stream.
    fn next(&mut self, g: &mut UserGuest) -> Option<Got> {
        let m = match g.recv_msg_timeout(self.key, &mut self.buf, STEP) {
            Ok(m) => m?,
            // The service closed: the end may come as a reset once its SHUTDOWN is read.
            Err(SockError::Reset(_)) => return None,
            Err(e) => panic!("bus recv: {}", chain(&e)),
        };
        assert!(!m.truncated());
        Some(decode(&self.buf[..m.len]))
    }

    /// A frame if one is there now.
    fn poll(&mut self, g: &mut UserGuest) -> Option<Got> {
        match g.recv_msg(self.key, &mut self.buf) {
            Ok(Some(m)) => Some(decode(&self.buf[..m.len])),
            Ok(None) => panic!("bus connection ended"),
            Err(SockError::WouldBlock) => None,
            Err(e) => panic!("bus recv: {}", chain(&e)),
        }
    }

    /// Whether nothing arrives within `wait`.
    fn quiet(&mut self, g: &mut UserGuest, wait: Duration) -> Option<Got> {
        let end = Instant::now() + wait;
        while Instant::now() < end {
            if let Some(got) = self.poll(g) {
                return Some(got);
            }
            thread::sleep(Duration::from_millis(1));
        }
        None
    }
}

/// A host process's bus connection (Unix `SOCK_SEQPACKET`).
struct HostMember {
    fd: OwnedFd,
    buf: Vec<u8>,
}

impl HostMember {
    fn join(
        path: &Path,
        name: &str,
        want: Want,
        create: Option<CreateParams>,
    ) -> (HostMember, Got) {
        let fd = socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .unwrap();
        connect(fd.as_raw_fd(), &UnixAddr::new(path).unwrap()).unwrap();
        let tv = nix::sys::time::TimeVal::new(STEP.as_secs() as i64, 0);
        nix::sys::socket::setsockopt(&fd, nix::sys::socket::sockopt::ReceiveTimeout, &tv).unwrap();
        let mut m = HostMember {
            fd,
            buf: vec![0; 1 << 17],
        };
        m.send(&join_frame(name, want, create));
        let got = m.next().expect("an answer to JOIN");
        (m, got)
    }

    fn send(&self, frame: &[u8]) {
        send(self.fd.as_raw_fd(), frame, MsgFlags::empty()).unwrap();
    }

    fn next(&mut self) -> Option<Got> {
        let n = recv(self.fd.as_raw_fd(), &mut self.buf, MsgFlags::empty())
            .unwrap_or_else(|e| panic!("host member recv: {e}"));
        (n > 0).then(|| decode(&self.buf[..n]))
    }

    fn poll(&mut self) -> Option<Got> {
        match recv(self.fd.as_raw_fd(), &mut self.buf, MsgFlags::MSG_DONTWAIT) {
            Ok(0) => panic!("host member connection ended"),
            Ok(n) => Some(decode(&self.buf[..n])),
            Err(nix::errno::Errno::EAGAIN) => None,
            Err(e) => panic!("host member recv: {e}"),
        }
    }
}

fn member_of(got: &Got) -> u32 {
    match got {
        Got::Joined { member, .. } => *member,
        other => panic!("expected JOINED, got {other:?}"),
    }
}

fn publish(payload: &[u8]) -> Vec<u8> {
    encode(&MemberFrame::Publish {
        fields: Fields::None,
        payload,
    })
}

fn publish_topic(topic: &str, payload: &[u8]) -> Vec<u8> {
    encode(&MemberFrame::Publish {
        fields: Fields::Topic(topic.as_bytes()),
        payload,
    })
}

fn publish_to(src: &[u8], dst: &[u8], payload: &[u8]) -> Vec<u8> {
    encode(&MemberFrame::Publish {
        fields: Fields::Addressed { src, dst },
        payload,
    })
}

/// Per receiver: for each sender the next sequence number expected, and the count.
#[derive(Debug, Default)]
struct Tally {
    next: HashMap<u32, u64>,
    received: u64,
}

impl Tally {
    /// Checks a MESSAGE: the sender's next in order, its payload intact.
    fn take(&mut self, who: &str, got: Got, len: usize) {
        let Got::Message {
            sender,
            seq,
            payload: p,
            ..
        } = got
        else {
            panic!("{who}: expected a MESSAGE, got {got:?}");
        };
        let next = self.next.entry(sender).or_insert(1);
        assert_eq!(
            seq, *next,
            "{who}: sender {sender} out of order or duplicated"
        );
        assert!(
            p == payload(sender, seq, len),
            "{who}: payload of {sender}/{seq} damaged"
        );
        *next += 1;
        self.received += 1;
    }
}

/// domsockd with `--bus-dir` (in a directory of its own, removed on drop).
struct BusBackend {
    b: Backend,
    dir: PathBuf,
}

impl std::ops::Deref for BusBackend {
    type Target = Backend;
    fn deref(&self) -> &Backend {
        &self.b
    }
}

impl Drop for BusBackend {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl BusBackend {
    fn start(tag: &str, vms: &[VmOpts], config: &str) -> BusBackend {
        let dir = std::env::temp_dir().join(format!("ds-gbus-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let args = vec!["--bus-dir".to_string(), dir.display().to_string()];
        let b = Backend::spawn_with(&domsockd(), tag, vms, &args, Some(config));
        BusBackend { b, dir }
    }

    /// The bus socket of namespace `ns`, for host processes.
    fn socket(&self, ns: &str) -> PathBuf {
        self.dir.join(format!("{ns}.sock"))
    }
}

/// The `bus counters` line domsockd logs on SIGUSR1.
fn bus_counters(b: &Backend) -> HashMap<String, u64> {
    let before = b
        .log_text()
        .lines()
        .filter(|l| l.contains("bus counters"))
        .count();
    let pid = nix::unistd::Pid::from_raw(b.pid() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGUSR1).unwrap();
    b.wait_for_log("bus counters", before + 1);
    let text = b.log_text();
    let line = text
        .lines()
        .rfind(|l| l.contains("bus counters"))
        .unwrap()
        .to_owned();
    let (_, stats) = line.split_once("stats=").expect("stats=");
    stats
        .split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| {
            (
                k.to_owned(),
                v.trim_matches('"').parse().unwrap_or(u64::MAX),
            )
        })
        .collect()
}

#[test]
fn three_guests_and_a_host_process_each_receive_every_other_members_messages_once_in_order() {
    const N: u64 = 3000;
    const LEN: usize = 64;
    let vms = [VmOpts::new(3), VmOpts::new(4), VmOpts::new(5)];
    let b = BusBackend::start(
        "bus-hub",
        &vms,
        "[[bus]]\nname = \"room\"\npolicy = \"hub\"\npublish = [\"*\"]\nqueue-bytes = 4194304\n",
    );
    let total_others = 3 * N;
    let mut handles = Vec::new();
    let start = Arc::new(std::sync::Barrier::new(4));
    for i in 0..3 {
        let mut g = b.guest(i, GuestConfig::default());
        let start = start.clone();
        handles.push(thread::spawn(move || {
            let (mut m, joined) = GuestMember::join(&mut g, "room", Want::BOTH, None);
            let me = member_of(&joined);
            start.wait();
            let mut tally = Tally::default();
            let mut sent = 0u64;
            let deadline = Instant::now() + RUN;
            while sent < N || tally.received < total_others {
                assert!(
                    Instant::now() < deadline,
                    "guest {i}: sent {sent}, received {tally:?}"
                );
                let mut busy = false;
                if sent < N && m.try_send(&mut g, &publish(&payload(me, sent + 1, LEN))) {
                    sent += 1;
                    busy = true;
                }
                while let Some(got) = m.poll(&mut g) {
                    tally.take(&format!("guest {i}"), got, LEN);
                    busy = true;
                }
                if !busy {
                    thread::sleep(Duration::from_micros(100));
                }
            }
            assert_eq!(tally.next.len(), 3, "guest {i}: senders {:?}", tally.next);
            assert!(
                !tally.next.contains_key(&me),
                "guest {i} received its own messages"
            );
            assert!(
                tally.next.values().all(|&n| n == N + 1),
                "guest {i}: {:?}",
                tally.next
            );
            assert!(m.quiet(&mut g, Duration::from_millis(200)).is_none());
            (me, tally.received)
        }));
    }
    let (mut h, joined) = HostMember::join(&b.socket("default"), "room", Want::BOTH, None);
    let me = member_of(&joined);
    start.wait();
    let t = Instant::now();
    let mut tally = Tally::default();
    let mut sent = 0;
    let deadline = Instant::now() + RUN;
    while sent < N || tally.received < total_others {
        assert!(
            Instant::now() < deadline,
            "host: sent {sent}, received {tally:?}"
        );
        if sent < N {
            sent += 1;
            h.send(&publish(&payload(me, sent, LEN)));
        }
        while let Some(got) = h.poll() {
            tally.take("host", got, LEN);
        }
        if sent == N && tally.received < total_others {
            thread::sleep(Duration::from_micros(200));
        }
    }
    assert!(!tally.next.contains_key(&me));
    assert!(
        tally.next.values().all(|&n| n == N + 1),
        "host: {:?}",
        tally.next
    );
    let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let secs = t.elapsed().as_secs_f64();
    eprintln!(
        "hub bus, 3 guests + 1 host process, {N} x {LEN} B each: every member got the other three's {total_others} in order, in {secs:.2} s ({:.0} deliveries/s)",
        (4 * total_others) as f64 / secs
    );
    let mut ids: Vec<u32> = results.iter().map(|r| r.0).chain([me]).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 4, "member ids must differ");
    let c = bus_counters(&b);
    assert_eq!(c["joins"], 4, "{c:?}");
    assert_eq!(c["request_errors"], 0, "{c:?}");
}

#[test]
fn switch_delivers_a_learned_unicast_to_one_and_floods_unknown_and_topic_only_to_matching() {
    let vms = [VmOpts::new(3), VmOpts::new(4), VmOpts::new(5)];
    let b = BusBackend::start(
        "bus-switch",
        &vms,
        "[[bus]]\nname = \"lan\"\npolicy = \"switch\"\npublish = [\"*\"]\n\n\
         [[bus]]\nname = \"sensors\"\npolicy = \"topic\"\npublish = [\"*\"]\n",
    );
    let mut g: Vec<UserGuest> = (0..3).map(|i| b.guest(i, GuestConfig::default())).collect();
    let mut m: Vec<GuestMember> = Vec::new();
    let mut id = Vec::new();
    for gi in g.iter_mut() {
        let (mm, j) = GuestMember::join(gi, "lan", Want::BOTH, None);
        id.push(member_of(&j));
        m.push(mm);
    }
    let addr = [[0xaa_u8; 6], [0xbb; 6], [0xcc; 6]];
    let bcast = [0xff_u8; 6];
    // Each announces itself with a broadcast; the switch learns the three sources.
    for i in 0..3 {
        m[i].send(
            &mut g[i],
            &publish_to(&addr[i], &bcast, &payload(id[i], 1, 32)),
        );
        for j in (0..3).filter(|&j| j != i) {
            let got = m[j].next(&mut g[j]).unwrap();
            assert!(
                matches!(&got, Got::Message { sender, seq: 1, .. } if *sender == id[i]),
                "{got:?}"
            );
        }
    }
    // 0 -> bb: to guest 1 only. Then an unknown destination: flooded to 1 and 2. Guest 2
    // sees the flood as 0's next message: the unicast never reached it.
    m[0].send(
        &mut g[0],
        &publish_to(&addr[0], &addr[1], &payload(id[0], 2, 32)),
    );
    m[0].send(
        &mut g[0],
        &publish_to(&addr[0], &[0xdd; 6], &payload(id[0], 3, 32)),
    );
    let got = m[1].next(&mut g[1]).unwrap();
    assert!(
        matches!(&got, Got::Message { seq: 2, fields, .. } if fields == &addr[1]),
        "{got:?}"
    );
    let got = m[1].next(&mut g[1]).unwrap();
    assert!(matches!(&got, Got::Message { seq: 3, .. }), "{got:?}");
    let got = m[2].next(&mut g[2]).unwrap();
    assert!(
        matches!(&got, Got::Message { seq: 3, fields, .. } if fields == &[0xdd; 6]),
        "guest 2 must get the flood and not the unicast: {got:?}"
    );
    assert!(
        m[0].quiet(&mut g[0], Duration::from_millis(100)).is_none(),
        "the sender gets nothing back"
    );

    // Topic: guest 0 subscribes temp/, guest 1 hum/, both end; guest 2 publishes.
    let mut t: Vec<GuestMember> = Vec::new();
    for gi in g.iter_mut() {
        t.push(GuestMember::join(gi, "sensors", Want::BOTH, None).0);
    }
    for (i, prefixes) in [(0, ["temp/", "end"]), (1, ["hum/", "end"])] {
        for p in prefixes {
            t[i].send(&mut g[i], &encode(&MemberFrame::Subscribe(p.as_bytes())));
            assert_eq!(t[i].next(&mut g[i]).unwrap(), Got::Subscribed);
        }
    }
    for topic in ["temp/kitchen", "hum/kitchen", "other/x", "end"] {
        t[2].send(&mut g[2], &publish_topic(topic, topic.as_bytes()));
    }
    for (i, want) in [(0, ["temp/kitchen", "end"]), (1, ["hum/kitchen", "end"])] {
        for topic in want {
            let got = t[i].next(&mut g[i]).unwrap();
            assert!(
                matches!(&got, Got::Message { fields, .. } if fields == topic.as_bytes()),
                "guest {i}: {got:?}"
            );
        }
    }
    assert!(t[2].quiet(&mut g[2], Duration::from_millis(100)).is_none());
}

const PERMS: &str = "[[bus]]\nname = \"news\"\npublish = [\"pub\"]\njoin = [\"reader\"]\n\n\
[[bus]]\nnamespace = \"other\"\nname = \"news\"\npublish = [\"*\"]\n\n\
[[policy.bus-create]]\nfrom = \"pub\"\n";

fn perm_vms() -> [VmOpts; 4] {
    [
        VmOpts::new(3).name("pub"),
        VmOpts::new(4).name("reader"),
        VmOpts::new(5).name("outsider"),
        VmOpts::new(6).name("pub").namespace("other"),
    ]
}

#[test]
fn permissions_refuse_clearly_namespaces_isolate_and_a_reload_applies() {
    let b = BusBackend::start("bus-perm", &perm_vms(), PERMS);
    let mut publ = b.guest(0, GuestConfig::default());
    let mut reader = b.guest(1, GuestConfig::default());
    let mut outsider = b.guest(2, GuestConfig::default());
    let mut other = b.guest(3, GuestConfig::default());

    // Default deny: not named by the bus.
    let (mut o, got) = GuestMember::join(&mut outsider, "news", RECEIVE, None);
    assert!(
        matches!(&got, Got::Refused(RefuseCode::Denied, t) if t.contains("may not join")),
        "{got:?}"
    );
    assert_eq!(o.next(&mut outsider), None, "a refused connection ends");
    // A listener asking to publish is refused, as asking a read-only file for writing.
    let (_, got) = GuestMember::join(&mut reader, "news", Want::BOTH, None);
    assert!(
        matches!(&got, Got::Refused(RefuseCode::Denied, t) if t.contains("only listen")),
        "{got:?}"
    );
    let (mut r, got) = GuestMember::join(&mut reader, "news", RECEIVE, None);
    assert!(
        matches!(got, Got::Joined { granted, .. } if granted == RECEIVE),
        "{got:?}"
    );
    // ... and a PUBLISH without the grant is an ERROR, the membership stays.
    r.send(&mut reader, &publish(b"not mine"));
    assert_eq!(
        r.next(&mut reader),
        Some(Got::Error(ErrorCode::NotPermitted))
    );
    let (mut p, got) = GuestMember::join(&mut publ, "news", Want::BOTH, None);
    let pub_id = member_of(&got);
    // The other namespace's "news" is another bus: its member sees nothing of ours.
    let (mut x, got) = GuestMember::join(&mut other, "news", Want::BOTH, None);
    member_of(&got);
    // A host process of the other namespace, on a bus of its own: a non-member of ours.
    let (mut hx, got) = HostMember::join(&b.socket("other"), "news", RECEIVE, None);
    member_of(&got);
    p.send(&mut publ, &publish(&payload(pub_id, 1, 40)));
    let got = r.next(&mut reader).unwrap();
    assert!(
        matches!(&got, Got::Message { sender, seq: 1, .. } if *sender == pub_id),
        "{got:?}"
    );
    x.send(&mut other, &publish(b"from other"));
    let got = hx.next().unwrap();
    assert!(
        matches!(&got, Got::Message { payload, .. } if payload == b"from other"),
        "{got:?}"
    );
    assert!(
        r.quiet(&mut reader, Duration::from_millis(150)).is_none(),
        "default's reader got the other namespace's message"
    );
    assert!(p.quiet(&mut publ, Duration::from_millis(50)).is_none());
    assert!(
        x.quiet(&mut other, Duration::from_millis(50)).is_none(),
        "the other namespace saw default's message"
    );
    // The other namespace cannot see default's undeclared buses either, nor create any.
    let create = CreateParams {
        policy: Policy::Hub,
        slow: SlowPolicy::Drop,
        max_message: 1024,
        queue_bytes: 65536,
    };
    let (_, got) = GuestMember::join(&mut publ, "adhoc", Want::BOTH, Some(create));
    member_of(&got);
    let (_, got) = GuestMember::join(&mut other, "adhoc", Want::BOTH, None);
    assert!(
        matches!(got, Got::Refused(RefuseCode::Denied, _)),
        "{got:?}"
    );
    let (_, got) = GuestMember::join(&mut reader, "adhoc", RECEIVE, None);
    assert!(
        matches!(got, Got::Refused(RefuseCode::Denied, _)),
        "not a creator: {got:?}"
    );
    let c = bus_counters(&b);
    assert_eq!(c["refused_denied"], 4, "{c:?}");
    assert_eq!(c["request_errors"], 1, "{c:?}");

    // Reload: the reader loses "news" and gains the new "fresh".
    b.rewrite_config(
        "[[bus]]\nname = \"news\"\npublish = [\"pub\"]\n\n\
         [[bus]]\nname = \"fresh\"\njoin = [\"reader\"]\n\n\
         [[bus]]\nnamespace = \"other\"\nname = \"news\"\npublish = [\"*\"]\n\n\
         [[policy.bus-create]]\nfrom = \"pub\"\n",
    );
    b.reload();
    let got = r.next(&mut reader).unwrap();
    assert!(
        matches!(&got, Got::Refused(RefuseCode::Denied, t) if t.contains("reload")),
        "{got:?}"
    );
    assert_eq!(
        r.next(&mut reader),
        None,
        "removed by the reload: the connection ends"
    );
    let (_, got) = GuestMember::join(&mut reader, "fresh", RECEIVE, None);
    member_of(&got);
    let (_, got) = GuestMember::join(&mut reader, "news", RECEIVE, None);
    assert!(
        matches!(got, Got::Refused(RefuseCode::Denied, _)),
        "{got:?}"
    );
    // The publisher kept its membership through the reload.
    p.send(&mut publ, &publish(&payload(pub_id, 2, 40)));
    assert!(p.quiet(&mut publ, Duration::from_millis(50)).is_none());
    let c = bus_counters(&b);
    assert_eq!(c["removed_by_reload"], 1, "{c:?}");
    assert_eq!(c["refused_denied"], 5, "{c:?}");
}

#[test]
fn a_stalled_guest_member_does_not_slow_the_others_and_learns_its_loss() {
    const N: u64 = 20_000;
    const LEN: usize = 64;
    const WINDOW: u64 = 256;
    let vms = [VmOpts::new(3), VmOpts::new(4)];
    let b = BusBackend::start(
        "bus-stall",
        &vms,
        "[[bus]]\nname = \"feed\"\npublish = [\"*\"]\nqueue-bytes = 262144\n",
    );
    let mut fast = b.guest(0, GuestConfig::default());
    let mut slow = b.guest(1, GuestConfig::default());
    let (mut f, _) = GuestMember::join(&mut fast, "feed", RECEIVE, None);
    let (mut h2, _) = HostMember::join(&b.socket("default"), "feed", RECEIVE, None);
    let (mut publisher, got) = HostMember::join(&b.socket("default"), "feed", Want::BOTH, None);
    let pid = member_of(&got);
    let seq = Arc::new(AtomicU64::new(0));

    // One run: the publisher keeps at most WINDOW messages ahead of the fast guest (so
    // the fast ones never lose), the host member reads along; returns the fast guest's rate.
    let run = |f: &mut GuestMember,
               fast: &mut UserGuest,
               h2: &mut HostMember,
               publisher: &mut HostMember| {
        let first = seq.load(Ordering::Relaxed) + 1;
        let last = first + N - 1;
        let t = Instant::now();
        let mut got_fast = first - 1;
        let mut got_host = first - 1;
        let mut next = first;
        let deadline = Instant::now() + RUN;
        while got_fast < last || got_host < last {
            assert!(
                Instant::now() < deadline,
                "fast {got_fast} host {got_host} of {last}"
            );
            while next <= last && next <= got_fast.min(got_host) + WINDOW {
                publisher.send(&publish(&payload(pid, next, LEN)));
                next += 1;
            }
            while let Some(got) = f.poll(fast) {
                match got {
                    Got::Message {
                        seq, payload: p, ..
                    } => {
                        assert_eq!(seq, got_fast + 1, "the fast guest lost or reordered");
                        assert!(p == payload(pid, seq, LEN));
                        got_fast = seq;
                    }
                    other => panic!("fast guest: {other:?}"),
                }
            }
            while let Some(got) = h2.poll() {
                match got {
                    Got::Message { seq, .. } => {
                        assert_eq!(seq, got_host + 1, "the host member lost or reordered");
                        got_host = seq;
                    }
                    other => panic!("host member: {other:?}"),
                }
            }
        }
        seq.store(last, Ordering::Relaxed);
        N as f64 / t.elapsed().as_secs_f64()
    };
    let alone = run(&mut f, &mut fast, &mut h2, &mut publisher);
    // A guest member that never reads.
    let (mut s, got) = GuestMember::join(&mut slow, "feed", RECEIVE, None);
    member_of(&got);
    let first_stalled = seq.load(Ordering::Relaxed) + 1;
    let beside = run(&mut f, &mut fast, &mut h2, &mut publisher);
    eprintln!(
        "{N} x {LEN} B messages, publisher paced by the fast guest: fast guest {alone:.0} msg/s alone, {beside:.0} msg/s beside a stalled guest member ({:.2}x)",
        beside / alone
    );
    // The stalled member reads at last: what was queued for it, until nothing more comes.
    let (mut delivered, mut lost, mut losses) = (0u64, 0u64, 0);
    let mut last_seq = first_stalled - 1;
    let mut take = |got: Got, delivered: &mut u64, lost: &mut u64, losses: &mut u32| match got {
        Got::Message {
            seq, payload: p, ..
        } => {
            assert!(seq > last_seq, "out of order");
            assert!(p == payload(pid, seq, LEN));
            last_seq = seq;
            *delivered += 1;
            seq
        }
        Got::Loss(n) => {
            *lost += n;
            *losses += 1;
            0
        }
        other => panic!("stalled member: {other:?}"),
    };
    while let Some(got) = s.quiet(&mut slow, Duration::from_millis(300)) {
        take(got, &mut delivered, &mut lost, &mut losses);
    }
    // One more message: the LOSS of what was dropped goes out before it.
    let end = seq.load(Ordering::Relaxed) + 1;
    publisher.send(&publish(&payload(pid, end, LEN)));
    while take(
        s.next(&mut slow).expect("stalled member's stream"),
        &mut delivered,
        &mut lost,
        &mut losses,
    ) != end
    {}
    eprintln!("stalled guest member, reading at last: {delivered} delivered, {lost} lost (told in {losses} LOSS)");
    assert_eq!(
        delivered + lost,
        N + 1,
        "every message delivered or counted"
    );
    assert!(
        lost > 0 && losses >= 1,
        "the stall must have cost messages, told by LOSS"
    );
}

#[test]
fn a_guest_member_whose_device_is_replugged_rejoins_without_resubscribing_and_learns_its_loss() {
    const N: u64 = 4000;
    const LEN: usize = 64;
    let vms = [VmOpts::new(3)];
    let b = BusBackend::start(
        "bus-replug",
        &vms,
        "[[bus]]\nname = \"t\"\npolicy = \"topic\"\njoin = [\"*\"]\nqueue-bytes = 65536\n",
    );
    let mut g = b.guest(0, GuestConfig::default());
    let (mut m, got) = GuestMember::join(&mut g, "t", RECEIVE, None);
    let Got::Joined { member, token, .. } = got else {
        panic!("{got:?}")
    };
    m.send(&mut g, &encode(&MemberFrame::Subscribe(b"t/")));
    assert_eq!(m.next(&mut g), Some(Got::Subscribed));
    let (publisher, got) = HostMember::join(&b.socket("default"), "t", Want::BOTH, None);
    let pid = member_of(&got);
    let topic_msg = |seq: u64| publish_topic("t/x", &payload(pid, seq, LEN));
    for seq in 1..=10 {
        publisher.send(&topic_msg(seq));
    }
    for seq in 1..=10 {
        let got = m.next(&mut g).unwrap();
        assert!(
            matches!(got, Got::Message { seq: s, .. } if s == seq),
            "{got:?}"
        );
    }
    g.replug()
        .unwrap_or_else(|e| panic!("replug: {}", chain(&e)));
    b.wait_for_log("bus member parked", 1);
    for seq in 11..=10 + N {
        publisher.send(&topic_msg(seq));
    }
    // Back: a new connection, REJOIN with the token, no SUBSCRIBE.
    let mut m = GuestMember::connect(&mut g);
    m.send(&mut g, &encode(&MemberFrame::Rejoin(token)));
    let got = m.next(&mut g).unwrap();
    let Got::Joined {
        member: again,
        lost,
        ..
    } = got
    else {
        panic!("{got:?}")
    };
    assert_eq!(again, member, "the same membership");
    let mut delivered = 0;
    let mut last = 10;
    while delivered + lost < N {
        match m.next(&mut g).unwrap() {
            Got::Message {
                seq, payload: p, ..
            } => {
                assert!(seq > last);
                assert!(p == payload(pid, seq, LEN));
                last = seq;
                delivered += 1;
            }
            other => panic!("after rejoin: {other:?}"),
        }
    }
    eprintln!("replugged guest member: told {lost} lost while away, then given {delivered} queued");
    assert_eq!(
        delivered + lost,
        N,
        "every message published while away delivered or counted"
    );
    assert!(
        lost > 0 && delivered > 0,
        "a 64 KiB queue keeps some of {N}, not all"
    );
    // Its subscription held: the next message arrives without a SUBSCRIBE.
    publisher.send(&topic_msg(11 + N));
    let got = m.next(&mut g).unwrap();
    assert!(
        matches!(got, Got::Message { seq, .. } if seq == 11 + N),
        "{got:?}"
    );
    let c = bus_counters(&b);
    assert_eq!(c["rejoins"], 1, "{c:?}");
}
