//! The bus service with host-process members over real Unix `SOCK_SEQPACKET` sockets,
//! speaking the wire format of `domsock_proto::bus` byte for byte.

use domsock_host::bus::{unix, BusHub};
use domsock_proto::bus::wire::{
    BusName, CreateParams, ErrorCode, Fields, MemberFrame, MemberId, Policy, RefuseCode,
    ServiceFrame, SlowPolicy, Want,
};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{
    connect, recv, send, socket, AddressFamily, MsgFlags, SockFlag, SockType, UnixAddr,
};
use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const STEP: Duration = Duration::from_secs(5);

fn dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ds-bus-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// One host-process member's connection.
struct Client {
    fd: OwnedFd,
    buf: Vec<u8>,
    /// MESSAGEs of a BATCH not yet handed out.
    pending: VecDeque<Got>,
    /// BATCH frames received.
    batches: u64,
    /// Seqpacket messages received.
    frames: u64,
}

/// What a client received, owned.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Got {
    Joined {
        member: MemberId,
        token: [u8; 16],
        lost: u64,
        granted: Want,
    },
    Refused(RefuseCode),
    Message {
        sender: MemberId,
        seq: u64,
        payload: Vec<u8>,
    },
    Loss {
        messages: u64,
    },
    Error(ErrorCode),
    Subscribed,
}

impl Client {
    fn connect(path: &Path) -> Client {
        let fd = socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .unwrap();
        connect(fd.as_raw_fd(), &UnixAddr::new(path).unwrap()).unwrap();
        Client {
            fd,
            buf: vec![0; 1 << 21],
            pending: VecDeque::new(),
            batches: 0,
            frames: 0,
        }
    }

    fn send(&self, f: &MemberFrame<'_>) {
        let mut v = Vec::new();
        f.encode(&mut v);
        send(self.fd.as_raw_fd(), &v, MsgFlags::empty()).unwrap();
    }

    fn join(path: &Path, name: &str, want: Want, create: Option<CreateParams>) -> (Client, Got) {
        Client::join_with(path, name, want, create, false)
    }

    fn join_with(
        path: &Path,
        name: &str,
        want: Want,
        create: Option<CreateParams>,
        batches: bool,
    ) -> (Client, Got) {
        let mut c = Client::connect(path);
        c.send(&MemberFrame::Join {
            name: BusName::new(name).unwrap(),
            want,
            create,
            batches,
        });
        let got = c.recv(STEP).expect("an answer to JOIN");
        (c, got)
    }

    fn recv(&mut self, timeout: Duration) -> Option<Got> {
        if let Some(g) = self.pending.pop_front() {
            return Some(g);
        }
        let mut pfd = [PollFd::new(self.fd.as_fd(), PollFlags::POLLIN)];
        let ms = PollTimeout::try_from(timeout).unwrap();
        if poll(&mut pfd, ms).unwrap() == 0 {
            return None;
        }
        let n = recv(self.fd.as_raw_fd(), &mut self.buf, MsgFlags::empty()).unwrap();
        if n == 0 {
            return None;
        }
        self.frames += 1;
        if let ServiceFrame::Batch(b) = ServiceFrame::decode(&self.buf[..n]).expect("valid") {
            self.batches += 1;
            for f in b.frames() {
                self.pending.push_back(Self::got(f));
            }
            return self.pending.pop_front();
        }
        Some(Self::got(&self.buf[..n]))
    }

    fn got(frame: &[u8]) -> Got {
        {
            match ServiceFrame::decode(frame).expect("a valid service frame") {
                ServiceFrame::Joined(j) => Got::Joined {
                    member: j.member,
                    token: j.token.0,
                    lost: j.lost,
                    granted: j.granted,
                },
                ServiceFrame::Refused { code, .. } => Got::Refused(code),
                ServiceFrame::Message {
                    sender,
                    seq,
                    payload,
                    ..
                } => Got::Message {
                    sender,
                    seq,
                    payload: payload.to_vec(),
                },
                ServiceFrame::Loss { messages, .. } => Got::Loss { messages },
                ServiceFrame::Error { code, .. } => Got::Error(code),
                ServiceFrame::Subscribed { .. } => Got::Subscribed,
                ServiceFrame::Batch(_) => panic!("a BATCH inside a BATCH"),
            }
        }
    }
}

fn create(policy: Policy, queue_bytes: u32) -> Option<CreateParams> {
    Some(CreateParams {
        policy,
        slow: SlowPolicy::Drop,
        max_message: 4096,
        queue_bytes,
    })
}

fn member_of(g: &Got) -> MemberId {
    match g {
        Got::Joined { member, .. } => *member,
        other => panic!("not joined: {other:?}"),
    }
}

/// The payload member `m` publishes as its `i`th message: its id, the index, a checksum.
fn payload(m: MemberId, i: u32) -> Vec<u8> {
    let mut v = Vec::with_capacity(64);
    v.extend_from_slice(&m.0.to_le_bytes());
    v.extend_from_slice(&i.to_le_bytes());
    v.extend_from_slice(&(m.0 as u64 * 1_000_003 + u64::from(i)).to_le_bytes());
    v.resize(64, (i % 251) as u8);
    v
}

#[test]
fn three_host_members_of_a_hub_each_get_every_other_members_messages_once_in_order() {
    const N: u32 = 2000;
    let d = dir("hub");
    let srv = unix::spawn(BusHub::new(), &d, &["red".to_owned()]).unwrap();
    let path = &srv.sockets[0];
    let mut clients: Vec<(Client, MemberId)> = (0..3)
        .map(|_| {
            let (c, g) = Client::join(path, "chat", Want::BOTH, create(Policy::Hub, 1 << 20));
            (c, member_of(&g))
        })
        .collect();
    let ids: Vec<MemberId> = clients.iter().map(|c| c.1).collect();
    // Everyone publishes N messages, interleaved, while everyone reads.
    let mut next: HashMap<(MemberId, MemberId), u32> = HashMap::new();
    let mut got = 0u64;
    let want = u64::from(N) * 3 * 2;
    for i in 0..N {
        for (c, id) in &clients {
            c.send(&MemberFrame::Publish {
                fields: Fields::None,
                payload: &payload(*id, i),
            });
        }
        // Drain what is there without waiting.
        for (c, me) in clients.iter_mut() {
            while let Some(g) = c.recv(Duration::ZERO) {
                check(&g, *me, &mut next);
                got += 1;
            }
        }
    }
    let deadline = Instant::now() + STEP;
    while got < want && Instant::now() < deadline {
        for (c, me) in clients.iter_mut() {
            while let Some(g) = c.recv(Duration::from_millis(10)) {
                check(&g, *me, &mut next);
                got += 1;
            }
        }
    }
    assert_eq!(got, want, "every member got every other member's messages");
    for &to in &ids {
        for &from in &ids {
            if to != from {
                assert_eq!(next.get(&(to, from)), Some(&N), "{to} from {from}");
            }
        }
    }
}

/// A MESSAGE for `me`: never its own, the next of its sender's, payload intact.
fn check(g: &Got, me: MemberId, next: &mut HashMap<(MemberId, MemberId), u32>) {
    let Got::Message {
        sender,
        seq,
        payload: p,
    } = g
    else {
        panic!("{me} got {g:?}");
    };
    assert_ne!(*sender, me, "a member got its own message");
    let n = next.entry((me, *sender)).or_insert(0);
    assert_eq!(*seq, u64::from(*n) + 1, "{me}: {sender}'s sequence");
    assert_eq!(p, &payload(*sender, *n), "{me}: {sender}'s message {n}");
    *n += 1;
}

#[test]
fn a_switch_delivers_learned_unicast_to_one_member_and_floods_the_unknown() {
    let d = dir("switch");
    let srv = unix::spawn(BusHub::new(), &d, &["red".to_owned()]).unwrap();
    let path = &srv.sockets[0];
    let mut m: Vec<(Client, MemberId)> = (0..3)
        .map(|_| {
            let (c, g) = Client::join(path, "lan", Want::BOTH, create(Policy::Switch, 1 << 16));
            (c, member_of(&g))
        })
        .collect();
    let publish = |c: &Client, src: &[u8], dst: &[u8], p: &[u8]| {
        c.send(&MemberFrame::Publish {
            fields: Fields::Addressed { src, dst },
            payload: p,
        })
    };
    // m0 to an unknown address: both others get it.
    publish(&m[0].0, b"\x0a", b"\x0b", b"who has b");
    for i in [1, 2] {
        assert!(
            matches!(m[i].0.recv(STEP), Some(Got::Message { ref payload, .. }) if payload == b"who has b")
        );
    }
    // m1 answers from b to a (learned from m0): only m0.
    publish(&m[1].0, b"\x0b", b"\x0a", b"i am b");
    assert!(
        matches!(m[0].0.recv(STEP), Some(Got::Message { ref payload, .. }) if payload == b"i am b")
    );
    // m2 to b (learned from m1): only m1.
    publish(&m[2].0, b"\x0c", b"\x0b", b"to b");
    assert!(
        matches!(m[1].0.recv(STEP), Some(Got::Message { ref payload, .. }) if payload == b"to b")
    );
    // Nothing else arrived anywhere.
    for (c, id) in m.iter_mut() {
        assert_eq!(c.recv(Duration::from_millis(100)), None, "{id}");
    }
}

#[test]
fn a_topic_bus_delivers_only_to_matching_subscribers() {
    let d = dir("topic");
    let srv = unix::spawn(BusHub::new(), &d, &["red".to_owned()]).unwrap();
    let path = &srv.sockets[0];
    let (p, _) = Client::join(path, "sensors", Want::BOTH, create(Policy::Topic, 1 << 16));
    let (mut temp, _) = Client::join(path, "sensors", Want::BOTH, None);
    let (mut hum, _) = Client::join(path, "sensors", Want::BOTH, None);
    temp.send(&MemberFrame::Subscribe(b"temp/"));
    assert_eq!(temp.recv(STEP), Some(Got::Subscribed));
    hum.send(&MemberFrame::Subscribe(b"hum/"));
    assert_eq!(hum.recv(STEP), Some(Got::Subscribed));
    for (t, body) in [
        (&b"temp/k1"[..], &b"21.5"[..]),
        (b"hum/k1", b"40"),
        (b"wind/k1", b"3"),
    ] {
        p.send(&MemberFrame::Publish {
            fields: Fields::Topic(t),
            payload: body,
        });
    }
    assert!(
        matches!(temp.recv(STEP), Some(Got::Message { ref payload, .. }) if payload == b"21.5")
    );
    assert!(matches!(hum.recv(STEP), Some(Got::Message { ref payload, .. }) if payload == b"40"));
    assert_eq!(temp.recv(Duration::from_millis(100)), None);
    assert_eq!(hum.recv(Duration::from_millis(100)), None);
}

#[test]
fn refusals_and_errors_are_clear() {
    let d = dir("refuse");
    let srv = unix::spawn(BusHub::new(), &d, &["red".to_owned()]).unwrap();
    let path = &srv.sockets[0];
    let (_, g) = Client::join(path, "nope", Want::BOTH, None);
    assert_eq!(g, Got::Refused(RefuseCode::NoSuchBus));
    let (_owner, _) = Client::join(path, "b", Want::BOTH, create(Policy::Hub, 1 << 16));
    let (_, g) = Client::join(path, "b", Want::BOTH, create(Policy::Topic, 1 << 16));
    assert_eq!(g, Got::Refused(RefuseCode::Mismatch));
    // A first frame that is not JOIN.
    let mut c = Client::connect(path);
    c.send(&MemberFrame::Leave);
    assert_eq!(c.recv(STEP), Some(Got::Refused(RefuseCode::Malformed)));
    // A receive-only member may not publish, and keeps its membership.
    let listen_only = Want {
        publish: false,
        receive: true,
    };
    let (mut l, g) = Client::join(path, "b", listen_only, None);
    assert!(matches!(g, Got::Joined { granted, .. } if granted == listen_only));
    l.send(&MemberFrame::Publish {
        fields: Fields::None,
        payload: b"x",
    });
    assert_eq!(l.recv(STEP), Some(Got::Error(ErrorCode::NotPermitted)));
    // Too large, and fields of another policy.
    let (mut w, _) = Client::join(path, "b", Want::BOTH, None);
    w.send(&MemberFrame::Publish {
        fields: Fields::None,
        payload: &[0; 4097],
    });
    assert_eq!(w.recv(STEP), Some(Got::Error(ErrorCode::TooLarge)));
    w.send(&MemberFrame::Publish {
        fields: Fields::Topic(b"t"),
        payload: b"x",
    });
    assert_eq!(w.recv(STEP), Some(Got::Error(ErrorCode::Fields)));
    // Still a member: the listener gets w's next message.
    w.send(&MemberFrame::Publish {
        fields: Fields::None,
        payload: b"ok",
    });
    assert!(matches!(l.recv(STEP), Some(Got::Message { ref payload, .. }) if payload == b"ok"));
}

#[test]
fn a_stalled_member_loses_messages_and_is_told_while_the_others_get_all() {
    const N: u32 = 3000;
    let d = dir("slow");
    let srv = unix::spawn(BusHub::new(), &d, &["red".to_owned()]).unwrap();
    let path = &srv.sockets[0];
    // 64 KiB queues: far less than N messages.
    let (p, pg) = Client::join(path, "feed", Want::BOTH, create(Policy::Hub, 64 << 10));
    let sender = member_of(&pg);
    let (mut fast, _) = Client::join(path, "feed", Want::BOTH, None);
    let (mut slow, _) = Client::join(path, "feed", Want::BOTH, None);
    let mut fast_got = 0u32;
    for i in 0..N {
        p.send(&MemberFrame::Publish {
            fields: Fields::None,
            payload: &payload(sender, i),
        });
        while let Some(g) = fast.recv(Duration::ZERO) {
            assert!(
                matches!(g, Got::Message { seq, .. } if seq == u64::from(fast_got) + 1),
                "{g:?}"
            );
            fast_got += 1;
        }
    }
    while fast_got < N {
        let g = fast.recv(STEP).expect("the fast member's messages");
        assert!(
            matches!(g, Got::Message { seq, .. } if seq == u64::from(fast_got) + 1),
            "{g:?}"
        );
        fast_got += 1;
    }
    // The slow member now reads: what its socket and its queue held, in order.
    let (mut seen, mut lost, mut last) = (0u64, 0u64, 0u64);
    while let Some(g) = slow.recv(Duration::from_millis(200)) {
        match g {
            Got::Message { seq, .. } => {
                assert!(seq > last, "in order");
                last = seq;
                seen += 1;
            }
            Got::Loss { messages } => lost += messages,
            other => panic!("{other:?}"),
        }
        if seen + lost == u64::from(N) {
            break;
        }
    }
    // What it lost is told before its next message.
    p.send(&MemberFrame::Publish {
        fields: Fields::None,
        payload: &payload(sender, N),
    });
    loop {
        match slow.recv(STEP).expect("the next message") {
            Got::Loss { messages } => lost += messages,
            Got::Message { seq, .. } => {
                assert_eq!(seq, u64::from(N) + 1);
                break;
            }
            other => panic!("{other:?}"),
        }
    }
    assert!(lost > 0, "the slow member lost messages ({seen} seen)");
    assert_eq!(
        seen + lost,
        u64::from(N),
        "every message seen or counted lost"
    );
    eprintln!("slow member: {seen} delivered, {lost} lost of {N}; fast member all {N}");
}

/// A member that asked for batches and fell behind catches up in BATCH frames: every
/// message once and in order, in far fewer seqpacket messages than messages, none larger
/// than a batch may be; a member that did not ask gets MESSAGEs one by one.
#[test]
fn a_member_that_fell_behind_gets_what_waited_in_batches() {
    const N: u32 = 2000;
    let d = dir("batch");
    let srv = unix::spawn(BusHub::new(), &d, &["red".to_owned()]).unwrap();
    let path = &srv.sockets[0];
    // Queues hold every message: nothing is lost, only delayed.
    let (p, pg) = Client::join(path, "feed", Want::BOTH, create(Policy::Hub, 4 << 20));
    let sender = member_of(&pg);
    let (mut batched, _) = Client::join_with(path, "feed", Want::BOTH, None, true);
    let (mut single, _) = Client::join(path, "feed", Want::BOTH, None);
    for i in 0..N {
        p.send(&MemberFrame::Publish {
            fields: Fields::None,
            payload: &payload(sender, i),
        });
    }
    for (c, name) in [(&mut batched, "batched"), (&mut single, "single")] {
        let mut next = 1u64;
        while next <= u64::from(N) {
            match c
                .recv(STEP)
                .unwrap_or_else(|| panic!("{name}: message {next}"))
            {
                Got::Message {
                    seq,
                    sender: s,
                    payload: got,
                } => {
                    assert_eq!((s, seq), (sender, next), "{name}: in order, once");
                    assert_eq!(got, payload(sender, seq as u32 - 1), "{name}: bytes");
                    next += 1;
                }
                other => panic!("{name}: {other:?}"),
            }
        }
        assert!(
            c.recv(Duration::from_millis(100)).is_none(),
            "{name}: nothing more"
        );
    }
    assert_eq!(single.batches, 0, "no BATCH to a member that did not ask");
    assert_eq!(single.frames, u64::from(N) + 1);
    assert!(
        batched.batches > 0,
        "the member that fell behind got batches"
    );
    assert!(
        batched.frames * 4 < u64::from(N),
        "{} seqpacket messages for {N} MESSAGEs",
        batched.frames
    );
    eprintln!(
        "batched member: {N} messages in {} seqpacket messages ({} batches)",
        batched.frames, batched.batches
    );
}

#[test]
fn a_member_that_went_away_rejoins_with_its_subscription_and_learns_its_loss() {
    let d = dir("rejoin");
    let srv = unix::spawn(BusHub::new(), &d, &["red".to_owned()]).unwrap();
    let path = &srv.sockets[0];
    let small = CreateParams {
        policy: Policy::Topic,
        slow: SlowPolicy::Drop,
        max_message: 512,
        queue_bytes: 2048,
    };
    let (p, _) = Client::join(path, "s", Want::BOTH, Some(small));
    let (mut m, g) = Client::join(path, "s", Want::BOTH, None);
    let (id, token) = match g {
        Got::Joined { member, token, .. } => (member, token),
        other => panic!("{other:?}"),
    };
    m.send(&MemberFrame::Subscribe(b"k"));
    assert_eq!(m.recv(STEP), Some(Got::Subscribed));
    drop(m);
    std::thread::sleep(Duration::from_millis(100));
    // 100-byte payloads (116-byte frames): 2048 bytes hold 17, the rest are lost.
    for _ in 0..40 {
        p.send(&MemberFrame::Publish {
            fields: Fields::Topic(b"k1"),
            payload: &[7; 100],
        });
    }
    std::thread::sleep(Duration::from_millis(100));
    let mut m = Client::connect(path);
    m.send(&MemberFrame::Rejoin(domsock_proto::bus::wire::Token(token)));
    match m.recv(STEP) {
        Some(Got::Joined { member, lost, .. }) => {
            assert_eq!(member, id);
            assert_eq!(lost, 40 - 17, "lost while away");
        }
        other => panic!("{other:?}"),
    }
    for _ in 0..17 {
        assert!(matches!(m.recv(STEP), Some(Got::Message { .. })));
    }
    assert_eq!(m.recv(Duration::from_millis(100)), None);
    // An unknown token is refused.
    let mut x = Client::connect(path);
    x.send(&MemberFrame::Rejoin(domsock_proto::bus::wire::Token(
        [0; 16],
    )));
    assert_eq!(x.recv(STEP), Some(Got::Refused(RefuseCode::UnknownToken)));
}

#[test]
fn domsockd_serves_a_bus_socket_per_namespace_of_its_vms() {
    use domsock_host::test_utils::{Process, TempDir};
    let t = TempDir::new("bus-daemon").unwrap();
    let bus_dir = t.join("bus");
    let args: Vec<String> = [
        "--vm".to_owned(),
        format!(
            "guest-cid=3,socket={},uds-path={},name=web,namespace=red",
            t.join("vm3.sock").display(),
            t.join("vm3.uds").display()
        ),
        "--vm".to_owned(),
        format!(
            "guest-cid=4,socket={},uds-path={},name=db,namespace=blue",
            t.join("vm4.sock").display(),
            t.join("vm4.uds").display()
        ),
        "--bus-dir".to_owned(),
        bus_dir.display().to_string(),
    ]
    .into();
    let (red, blue) = (bus_dir.join("red.sock"), bus_dir.join("blue.sock"));
    let _d = Process::start(
        Path::new(env!("CARGO_BIN_EXE_domsockd")),
        &args,
        t.join("domsockd.log"),
        STEP,
        || red.exists() && blue.exists(),
    );
    let (a, g) = Client::join(&red, "ops", Want::BOTH, create(Policy::Hub, 1 << 16));
    let sender = member_of(&g);
    let (mut b, _) = Client::join(&red, "ops", Want::BOTH, None);
    // Namespaces isolate buses: "ops" does not exist in blue.
    let (_, g) = Client::join(&blue, "ops", Want::BOTH, None);
    assert_eq!(g, Got::Refused(RefuseCode::NoSuchBus));
    a.send(&MemberFrame::Publish {
        fields: Fields::None,
        payload: b"hello",
    });
    assert_eq!(
        b.recv(STEP),
        Some(Got::Message {
            sender,
            seq: 1,
            payload: b"hello".to_vec()
        })
    );
}
