//! The bus library (`domsock_guest::bus`) and `domsock bus` against a real `domsockd
//! --bus-dir` (host-process members over Unix seqpacket), and against a fake service
//! that sends malformed frames. Nothing here opens an AF_VSOCK socket: the vsock dialer is
//! only exercised inside QEMU guests.

mod support;

use domsock_guest::bus::pattern::{pattern_message, OrderCheck};
use domsock_guest::bus::{
    BusDialer, BusError, BusEvent, BusMember, JoinOptions, UnixBusDialer, Violation,
};
use domsock_host::test_utils::{Process, TempDir};
use domsock_proto::bus::wire::{
    CreateParams, ErrorCode, Fields, Joined, MemberFrame, MemberId, Policy, RefuseCode,
    ServiceFrame, SlowPolicy, Token, Want,
};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{
    recv, send, shutdown, socketpair, AddressFamily, MsgFlags, Shutdown, SockFlag, SockType,
};
use std::io::{BufRead, BufReader};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const STEP: Duration = Duration::from_secs(10);

/// A `domsockd` with one VM in namespace `red` and its bus socket `red.sock`.
struct Service {
    _dir: TempDir,
    _daemon: Process,
    sock: PathBuf,
}

fn service(tag: &str) -> Service {
    let dir = TempDir::new(tag).unwrap();
    let bus_dir = dir.join("bus");
    let args: Vec<String> = vec![
        "--vm".into(),
        format!(
            "guest-cid=3,socket={},uds-path={},name=web,namespace=red",
            dir.join("vm3.sock").display(),
            dir.join("vm3.uds").display()
        ),
        "--bus-dir".into(),
        bus_dir.display().to_string(),
    ];
    let sock = bus_dir.join("red.sock");
    let daemon = Process::start(
        &support::domsockd(),
        &args,
        dir.join("domsockd.log"),
        STEP,
        || sock.exists(),
    );
    Service {
        _dir: dir,
        _daemon: daemon,
        sock,
    }
}

fn creating(policy: Policy, max_message: u32, queue_bytes: u32) -> JoinOptions {
    JoinOptions {
        create: Some(CreateParams {
            policy,
            slow: SlowPolicy::Drop,
            max_message,
            queue_bytes,
        }),
        timeout: STEP,
        ..JoinOptions::default()
    }
}

fn joining(want: Want) -> JoinOptions {
    JoinOptions {
        want,
        timeout: STEP,
        ..JoinOptions::default()
    }
}

const RECEIVE: Want = Want {
    publish: false,
    receive: true,
};

/// The next message's (sender, seq, payload), skipping nothing: any other event fails.
fn next_message(m: &mut BusMember) -> (MemberId, u64, Vec<u8>) {
    let id = m.id();
    match m.recv_timeout(STEP) {
        Ok(Some(BusEvent::Message(msg))) => (msg.sender, msg.seq, msg.payload.to_vec()),
        other => panic!("{id}: expected a message, got {other:?}"),
    }
}

fn assert_quiet(m: &mut BusMember) {
    let id = m.id();
    match m.recv_timeout(Duration::from_millis(150)) {
        Ok(None) => {}
        other => panic!("{id}: expected nothing, got {other:?}"),
    }
}

#[test]
fn a_hub_delivers_every_other_members_checked_messages_once_in_order() {
    const N: u64 = 1500;
    let s = service("bus-hub");
    let mut members: Vec<BusMember> = (0..3)
        .map(|_| {
            BusMember::join_unix(&s.sock, "chat", &creating(Policy::Hub, 4096, 1 << 20)).unwrap()
        })
        .collect();
    let mut checks: Vec<OrderCheck> = (0..3).map(|_| OrderCheck::new()).collect();
    let mut buf = Vec::new();
    let drain = |members: &mut Vec<BusMember>, checks: &mut Vec<OrderCheck>, wait: Duration| {
        for (m, c) in members.iter_mut().zip(checks.iter_mut()) {
            let me = m.id();
            while let Some(ev) = m.recv_timeout(wait).unwrap() {
                match ev {
                    BusEvent::Message(msg) => {
                        assert_ne!(msg.sender, me);
                        c.message(&msg)
                    }
                    other => panic!("{other:?}"),
                }
            }
        }
    };
    for i in 0..N {
        for m in members.iter_mut() {
            pattern_message(i, 64 + (i as usize % 200), &mut buf);
            m.publish(&buf).unwrap();
        }
        drain(&mut members, &mut checks, Duration::ZERO);
    }
    let deadline = Instant::now() + STEP;
    while !checks.iter().all(|c| c.complete(N, 2)) && Instant::now() < deadline {
        drain(&mut members, &mut checks, Duration::from_millis(20));
    }
    for (m, c) in members.iter().zip(&checks) {
        let s = c.summary(Some(N));
        assert_eq!(
            (s.received, s.senders, s.out_of_order, s.bad, s.lost),
            (2 * N, 2, 0, 0, 0),
            "{}",
            m.id()
        );
        assert_eq!(m.stats().published, N);
        assert_eq!(m.stats().received, 2 * N);
    }
}

#[test]
fn a_switch_delivers_learned_unicast_to_one_member_and_floods_the_unknown() {
    let s = service("bus-switch");
    let opts = creating(Policy::Switch, 4096, 1 << 16);
    let mut m: Vec<BusMember> = (0..3)
        .map(|_| BusMember::join_unix(&s.sock, "lan", &opts).unwrap())
        .collect();
    m[0].publish_to(b"\x0a", b"\x0b", b"who has b").unwrap();
    for i in [1, 2] {
        let (from, seq, p) = next_message(&mut m[i]);
        assert_eq!((from, seq, &p[..]), (m[0].id(), 1, &b"who has b"[..]));
    }
    m[1].publish_to(b"\x0b", b"\x0a", b"i am b").unwrap();
    assert_eq!(next_message(&mut m[0]).2, b"i am b");
    m[2].publish_to(b"\x0c", b"\x0b", b"to b").unwrap();
    let (from, _, p) = next_message(&mut m[1]);
    assert_eq!((from, &p[..]), (m[2].id(), &b"to b"[..]));
    for x in m.iter_mut() {
        assert_quiet(x);
    }
    // The policy's fields are checked before sending, with the service's code.
    match m[0].publish(b"no addresses") {
        Err(BusError::Local { code, wire, .. }) => assert_eq!((code, wire), (ErrorCode::Fields, 3)),
        other => panic!("{other:?}"),
    }
    match m[0].publish_to(&[1; 17], b"\x0b", b"x") {
        Err(BusError::Local { code, .. }) => assert_eq!(code, ErrorCode::Malformed),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_topic_bus_delivers_only_to_matching_subscribers() {
    let s = service("bus-topic");
    let mut p =
        BusMember::join_unix(&s.sock, "sensors", &creating(Policy::Topic, 4096, 1 << 16)).unwrap();
    let mut temp = BusMember::join_unix(&s.sock, "sensors", &joining(RECEIVE)).unwrap();
    let mut hum = BusMember::join_unix(&s.sock, "sensors", &joining(RECEIVE)).unwrap();
    temp.subscribe(b"temp/").unwrap();
    hum.subscribe(b"hum/").unwrap();
    for (t, body) in [
        (&b"temp/k1"[..], &b"21.5"[..]),
        (b"hum/k1", b"40"),
        (b"wind/k1", b"3"),
    ] {
        p.publish_topic(t, body).unwrap();
    }
    match temp.recv_timeout(STEP).unwrap() {
        Some(BusEvent::Message(m)) => {
            assert_eq!(
                (m.fields, m.payload, m.seq),
                (Fields::Topic(b"temp/k1"), &b"21.5"[..], 1)
            )
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(next_message(&mut hum).2, b"40");
    assert_quiet(&mut temp);
    assert_quiet(&mut hum);
    // Unsubscribed: nothing more.
    temp.unsubscribe(b"temp/").unwrap();
    p.publish_topic(b"temp/k2", b"22").unwrap();
    assert_quiet(&mut temp);
    // A receive-only member may not publish: told before anything is sent.
    match temp.publish_topic(b"temp/k1", b"x") {
        Err(BusError::Local { code, wire, .. }) => {
            assert_eq!((code, wire), (ErrorCode::NotPermitted, 1))
        }
        other => panic!("{other:?}"),
    }
    // The service's own ERROR reaches the caller typed: a publisher may not subscribe.
    let mut w = BusMember::join_unix(
        &s.sock,
        "sensors",
        &joining(Want {
            publish: true,
            receive: false,
        }),
    )
    .unwrap();
    match w.subscribe(b"x") {
        Err(BusError::Request { code, wire, .. }) => {
            assert_eq!((code, wire), (ErrorCode::NotPermitted, 1))
        }
        other => panic!("{other:?}"),
    }
    // And a refusal: no such bus, with its wire code.
    match BusMember::join_unix(&s.sock, "nope", &joining(Want::BOTH)) {
        Err(BusError::Refused { code, wire, text }) => {
            assert_eq!((code, wire), (RefuseCode::NoSuchBus, 3));
            assert!(text.contains("nope"), "{text}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn the_socket_polls_readable_and_the_try_calls_never_wait() {
    let s = service("bus-poll");
    let mut a = BusMember::join_unix(&s.sock, "p", &creating(Policy::Hub, 1024, 1 << 16)).unwrap();
    let mut b = BusMember::join_unix(&s.sock, "p", &joining(Want::BOTH)).unwrap();
    let start = Instant::now();
    assert!(b.try_recv().unwrap().is_none());
    assert!(
        start.elapsed() < Duration::from_millis(250),
        "try_recv waited"
    );
    let readable = |m: &BusMember, ms: u16| {
        let mut pfd = [PollFd::new(m.poll_fd().unwrap(), PollFlags::POLLIN)];
        poll(&mut pfd, PollTimeout::from(ms)).unwrap() == 1
    };
    assert!(!readable(&b, 50), "nothing to read yet");
    assert!(a.try_publish(Fields::None, b"ping").unwrap());
    assert!(readable(&b, 5000));
    match b.try_recv().unwrap() {
        Some(BusEvent::Message(m)) => {
            assert_eq!((m.sender, m.seq, m.payload), (a.id(), 1, &b"ping"[..]))
        }
        other => panic!("{other:?}"),
    }
    assert!(b.try_recv().unwrap().is_none());
    assert!(!readable(&b, 50));
    assert_eq!((a.stats().published, b.stats().received), (1, 1));
}

#[test]
fn a_stalled_member_is_told_its_losses_and_the_others_get_everything() {
    const N: u64 = 3000;
    let s = service("bus-stall");
    let mut p =
        BusMember::join_unix(&s.sock, "feed", &creating(Policy::Hub, 1024, 64 << 10)).unwrap();
    let mut fast = BusMember::join_unix(&s.sock, "feed", &joining(RECEIVE)).unwrap();
    let mut slow = BusMember::join_unix(&s.sock, "feed", &joining(RECEIVE)).unwrap();
    let mut fast_check = OrderCheck::new();
    let mut buf = Vec::new();
    for i in 0..N {
        pattern_message(i, 64, &mut buf);
        p.publish(&buf).unwrap();
        while let Some(ev) = fast.try_recv().unwrap() {
            match ev {
                BusEvent::Message(m) => fast_check.message(&m),
                other => panic!("{other:?}"),
            }
        }
    }
    while !fast_check.complete(N, 1) {
        match fast.recv_timeout(STEP).unwrap() {
            Some(BusEvent::Message(m)) => fast_check.message(&m),
            other => panic!("{other:?}"),
        }
    }
    let fs = fast_check.summary(Some(N));
    assert_eq!(
        (fs.received, fs.out_of_order, fs.bad, fs.lost),
        (N, 0, 0, 0)
    );
    // The stalled member reads at last: what its socket and queue held. Then one more
    // message, which brings the LOSS still owed in front of it.
    let mut check = OrderCheck::new();
    let on_event = |check: &mut OrderCheck, ev: BusEvent<'_>| match ev {
        BusEvent::Message(m) => check.message(&m),
        BusEvent::Loss { messages, bytes } => {
            assert!(
                bytes >= messages * 64,
                "{messages} messages of {bytes} bytes"
            );
            check.reported_loss(messages)
        }
        other => panic!("{other:?}"),
    };
    while let Some(ev) = slow.recv_timeout(Duration::from_millis(300)).unwrap() {
        on_event(&mut check, ev);
    }
    let before = check.summary(None);
    assert!(before.received < N, "the stalled member's bound held");
    pattern_message(N, 64, &mut buf);
    p.publish(&buf).unwrap();
    while !check.complete(N + 1, 1) {
        let ev = slow.recv_timeout(STEP).unwrap().expect("message N");
        on_event(&mut check, ev);
    }
    let ss = check.summary(Some(N + 1));
    eprintln!(
        "stalled member: {} received, {} lost ({} reported)",
        ss.received, ss.lost, ss.loss_reported
    );
    assert!(ss.lost > 0, "the stalled member lost messages");
    assert_eq!((ss.out_of_order, ss.bad), (0, 0));
    assert_eq!(ss.lost, ss.loss_reported, "every gap was reported by LOSS");
    assert_eq!(ss.received + ss.lost, N + 1);
    assert_eq!(slow.stats().lost_messages, ss.lost);
    assert!(
        slow.stats().batches > 0,
        "the stalled member caught up in batches"
    );
    assert_eq!(fast.stats().received, N);
}

/// A member that fell behind is in the middle of a BATCH when it changes a subscription:
/// the wait for the answer keeps the rest of the batch (and what else arrives), and the
/// member then gets every message once and in order.
#[test]
fn a_subscription_change_in_the_middle_of_a_batch_loses_nothing() {
    // Fewer than the library stashes while it waits for an answer (MAX_STASHED_FRAMES),
    // more than the member's socket holds, so the rest queues and comes in batches.
    const N: u64 = 900;
    let s = service("bus-batch-sub");
    let mut p =
        BusMember::join_unix(&s.sock, "t", &creating(Policy::Topic, 1024, 4 << 20)).unwrap();
    let mut m = BusMember::join_unix(&s.sock, "t", &joining(RECEIVE)).unwrap();
    m.subscribe(b"k").unwrap();
    let mut buf = Vec::new();
    for i in 0..N {
        pattern_message(i, 64, &mut buf);
        p.publish_topic(b"k1", &buf).unwrap();
    }
    let mut check = OrderCheck::new();
    let mut got = 0;
    while m.stats().batches == 0 {
        match m.recv_timeout(STEP).unwrap().expect("a message") {
            BusEvent::Message(msg) => check.message(&msg),
            other => panic!("{other:?}"),
        }
        got += 1;
        assert!(got <= N, "no batch came");
    }
    // One message of the batch handed out; the rest waits in the member's buffer.
    m.subscribe(b"z").unwrap();
    while !check.complete(N, 1) {
        match m.recv_timeout(STEP).unwrap().expect("the rest") {
            BusEvent::Message(msg) => check.message(&msg),
            other => panic!("{other:?}"),
        }
    }
    let sum = check.summary(Some(N));
    assert_eq!(
        (sum.received, sum.out_of_order, sum.bad, sum.lost),
        (N, 0, 0, 0)
    );
    assert!(m.try_recv().unwrap().is_none(), "nothing twice");
}

#[test]
fn a_member_whose_connection_broke_rejoins_with_its_subscription_and_learns_its_loss() {
    let s = service("bus-rejoin");
    // 100-byte payloads on a topic "k1": 116-byte frames, 2048 bytes hold 17.
    let mut p = BusMember::join_unix(&s.sock, "s", &creating(Policy::Topic, 512, 2048)).unwrap();
    let mut m = BusMember::join_unix(&s.sock, "s", &joining(Want::BOTH)).unwrap();
    let (id, token) = (m.id(), m.token());
    m.subscribe(b"k").unwrap();
    // The connection breaks under the member (as when its device goes away).
    shutdown(m.poll_fd().unwrap().as_raw_fd(), Shutdown::Both).unwrap();
    match m.recv_timeout(STEP) {
        Err(BusError::Disconnected(_)) => {}
        other => panic!("{other:?}"),
    }
    assert!(!m.is_connected());
    assert!(matches!(
        m.publish_topic(b"k1", b"x"),
        Err(BusError::Disconnected(_))
    ));
    std::thread::sleep(Duration::from_millis(200)); // the service parks it
    for i in 0..40u8 {
        p.publish_topic(b"k1", &[i; 100]).unwrap();
    }
    std::thread::sleep(Duration::from_millis(100));
    let lost = m.rejoin().unwrap();
    assert_eq!((m.id(), m.token()), (id, token));
    assert_eq!(lost, 40 - 17, "lost while away");
    assert_eq!(m.stats().rejoins, 1);
    assert_eq!(m.stats().lost_messages, 23);
    for i in 0..17u8 {
        let (_, seq, payload) = next_message(&mut m);
        assert_eq!(
            (seq, payload),
            (u64::from(i) + 1, vec![i; 100]),
            "the first 17 waited"
        );
    }
    // Still subscribed to "k" without subscribing again; not to anything else.
    p.publish_topic(b"x", b"not for m").unwrap();
    p.publish_topic(b"k2", b"for m").unwrap();
    let (_, seq, payload) = next_message(&mut m);
    assert_eq!((seq, &payload[..]), (42, &b"for m"[..]));
    assert_quiet(&mut m);
    // A member that left cannot come back.
    let mut gone = BusMember::join_unix(&s.sock, "s", &joining(RECEIVE)).unwrap();
    let fd = gone.poll_fd().unwrap().as_raw_fd();
    let mut leave = Vec::new();
    MemberFrame::Leave.encode(&mut leave);
    send(fd, &leave, MsgFlags::empty()).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    match gone.rejoin() {
        Err(BusError::Refused { code, .. }) => assert_eq!(code, RefuseCode::UnknownToken),
        other => panic!("{other:?}"),
    }
}

// ---- a fake service that breaks the protocol -------------------------------------------

/// What a case must fail with.
type Expect = fn(&BusError) -> bool;

fn encode(f: &ServiceFrame<'_>) -> Vec<u8> {
    let mut v = Vec::new();
    f.encode(&mut v);
    v
}

fn joined(policy: Policy, granted: Want, max_message: u32) -> Joined {
    Joined {
        member: MemberId(5),
        policy,
        slow: SlowPolicy::Drop,
        granted,
        max_message,
        queue_bytes: 1 << 16,
        token: Token([7; 16]),
        lost: 0,
    }
}

/// Joins a fake service that reads the JOIN and answers with `frames`, then holds the
/// connection open until the member has read them.
fn join_fake(want: Want, frames: Vec<Vec<u8>>) -> (Result<BusMember, BusError>, OwnedFd) {
    let (ours, theirs) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .unwrap();
    let t = std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        let n = recv(theirs.as_raw_fd(), &mut buf, MsgFlags::empty()).unwrap();
        assert!(matches!(
            MemberFrame::decode(&buf[..n]),
            Ok(MemberFrame::Join { .. })
        ));
        for f in &frames {
            send(theirs.as_raw_fd(), f, MsgFlags::empty()).unwrap();
        }
        theirs
    });
    let r = BusMember::join_over(ours, None, "fake", &joining(want));
    let theirs = t.join().unwrap();
    (r, theirs)
}

/// A member that joined the fake, then reads until the first error.
fn first_error(policy: Policy, frames: &[Vec<u8>]) -> (BusError, u64) {
    let mut all = vec![encode(&ServiceFrame::Joined(joined(
        policy,
        Want::BOTH,
        64,
    )))];
    all.extend(frames.iter().cloned());
    let (m, _theirs) = join_fake(Want::BOTH, all);
    let mut m = m.unwrap();
    if policy == Policy::Topic {
        // Not waiting for an answer: the fake sends none.
        m.send_subscribe(true, b"t").unwrap();
    }
    let mut good = 0;
    loop {
        match m.recv_timeout(STEP) {
            Ok(Some(_)) => good += 1,
            Ok(None) => panic!("no error after {good} events"),
            Err(e) => {
                assert!(!m.is_connected(), "{e:?} left the connection up");
                assert!(matches!(m.try_recv(), Err(BusError::Disconnected(_))));
                return (e, good);
            }
        }
    }
}

fn message(sender: u32, seq: u64, fields: Fields<'_>, payload: &[u8]) -> Vec<u8> {
    encode(&ServiceFrame::Message {
        sender: MemberId(sender),
        seq,
        fields,
        payload,
    })
}

#[test]
fn malformed_service_frames_are_rejected_and_never_reach_the_caller() {
    let ok = message(1, 1, Fields::None, b"fine");
    // Each case: one good message (it must arrive), then the bad frame.
    let cases: Vec<(&str, Policy, Vec<u8>, Expect)> = vec![
        ("garbage", Policy::Hub, vec![0xde, 0xad, 0xbe, 0xef], |e| {
            matches!(e, BusError::Protocol(Violation::Decode(_)))
        }),
        ("empty-ish header", Policy::Hub, vec![1], |e| {
            matches!(e, BusError::Protocol(Violation::Decode(_)))
        }),
        (
            "member kind",
            Policy::Hub,
            encode_member(&MemberFrame::Leave),
            |e| matches!(e, BusError::Protocol(Violation::Decode(_))),
        ),
        ("truncated message", Policy::Hub, ok[..10].to_vec(), |e| {
            matches!(e, BusError::Protocol(Violation::Decode(_)))
        }),
        (
            "topic on a hub",
            Policy::Hub,
            message(1, 2, Fields::Topic(b"t"), b"x"),
            |e| matches!(e, BusError::Protocol(Violation::BadMessage(_))),
        ),
        (
            "over max_message",
            Policy::Hub,
            message(1, 2, Fields::None, &[0; 65]),
            |e| matches!(e, BusError::Protocol(Violation::BadMessage(_))),
        ),
        (
            "longer than any frame",
            Policy::Hub,
            message(1, 2, Fields::None, &[0; 1 << 16]),
            |e| matches!(e, BusError::Protocol(Violation::TooLong { .. })),
        ),
        (
            "own message",
            Policy::Hub,
            message(5, 2, Fields::None, b"x"),
            |e| matches!(e, BusError::Protocol(Violation::BadMessage(_))),
        ),
        (
            "seq 0",
            Policy::Hub,
            message(1, 0, Fields::None, b"x"),
            |e| matches!(e, BusError::Protocol(Violation::BadMessage(_))),
        ),
        (
            "loss of nothing",
            Policy::Hub,
            encode(&ServiceFrame::Loss {
                messages: 0,
                bytes: 0,
            }),
            |e| matches!(e, BusError::Protocol(Violation::EmptyLoss)),
        ),
        (
            "joined again",
            Policy::Hub,
            encode(&ServiceFrame::Joined(joined(Policy::Hub, Want::BOTH, 64))),
            |e| {
                matches!(
                    e,
                    BusError::Protocol(Violation::Unexpected { kind: "JOINED", .. })
                )
            },
        ),
        (
            "refused after joined",
            Policy::Hub,
            encode(&ServiceFrame::Refused {
                code: RefuseCode::Denied,
                text: "",
            }),
            |e| {
                matches!(
                    e,
                    BusError::Protocol(Violation::Unexpected {
                        kind: "REFUSED",
                        ..
                    })
                )
            },
        ),
        (
            "subscribed on a hub",
            Policy::Hub,
            encode(&ServiceFrame::Subscribed {
                subscribe: true,
                prefix: b"t",
            }),
            |e| {
                matches!(
                    e,
                    BusError::Protocol(Violation::Unexpected {
                        kind: "SUBSCRIBED",
                        ..
                    })
                )
            },
        ),
        (
            "subscribed to what was not asked",
            Policy::Topic,
            encode(&ServiceFrame::Subscribed {
                subscribe: true,
                prefix: b"other",
            }),
            |e| matches!(e, BusError::Protocol(Violation::Unsolicited { .. })),
        ),
    ];
    let ok_topic = message(1, 1, Fields::Topic(b"t/1"), b"fine");
    for (name, policy, bad, expect) in cases {
        let good = if policy == Policy::Topic {
            &ok_topic
        } else {
            &ok
        };
        let (e, seen) = first_error(policy, &[good.clone(), bad]);
        assert!(expect(&e), "{name}: got {e:?}");
        assert_eq!(seen, 1, "{name}: the good message came, nothing after it");
    }
}

fn encode_member(f: &MemberFrame<'_>) -> Vec<u8> {
    let mut v = Vec::new();
    f.encode(&mut v);
    v
}

#[test]
fn bad_answers_to_join_are_refused_typed() {
    let bad_joined = |j: Joined| vec![encode(&ServiceFrame::Joined(j))];
    let mut reserved = encode(&ServiceFrame::Joined(joined(Policy::Hub, Want::BOTH, 64)));
    reserved[11] = 1;
    let receive_only = RECEIVE;
    let cases: Vec<(&str, Want, Vec<Vec<u8>>, Expect)> = vec![
        ("reserved byte", Want::BOTH, vec![reserved], |e| {
            matches!(e, BusError::Protocol(Violation::Decode(_)))
        }),
        (
            "granted more than asked",
            receive_only,
            bad_joined(joined(Policy::Hub, Want::BOTH, 64)),
            |e| matches!(e, BusError::Protocol(Violation::BadJoined(_))),
        ),
        (
            "max_message over the limit",
            Want::BOTH,
            bad_joined(joined(Policy::Hub, Want::BOTH, (1 << 20) + 1)),
            |e| matches!(e, BusError::Protocol(Violation::BadJoined(_))),
        ),
        (
            "max_message 0",
            Want::BOTH,
            bad_joined(joined(Policy::Hub, Want::BOTH, 0)),
            |e| matches!(e, BusError::Protocol(Violation::BadJoined(_))),
        ),
        (
            "lost on a first join",
            Want::BOTH,
            bad_joined(Joined {
                lost: 3,
                ..joined(Policy::Hub, Want::BOTH, 64)
            }),
            |e| matches!(e, BusError::Protocol(Violation::BadJoined(_))),
        ),
        (
            "a message first",
            Want::BOTH,
            vec![message(1, 1, Fields::None, b"x")],
            |e| {
                matches!(
                    e,
                    BusError::Protocol(Violation::Unexpected {
                        kind: "MESSAGE",
                        ..
                    })
                )
            },
        ),
        (
            "refused",
            Want::BOTH,
            vec![encode(&ServiceFrame::Refused {
                code: RefuseCode::Denied,
                text: "policy: no",
            })],
            |e| matches!(e, BusError::Refused { code: RefuseCode::Denied, wire: 4, text } if text == "policy: no"),
        ),
        ("closed", Want::BOTH, vec![], |e| {
            matches!(e, BusError::Disconnected(_))
        }),
    ];
    for (name, want, frames, expect) in cases {
        let closes = frames.is_empty();
        let (r, theirs) = if closes {
            // The fake reads the JOIN and closes.
            let (ours, theirs) = socketpair(
                AddressFamily::Unix,
                SockType::SeqPacket,
                None,
                SockFlag::SOCK_CLOEXEC,
            )
            .unwrap();
            let t = std::thread::spawn(move || {
                let mut buf = [0u8; 512];
                recv(theirs.as_raw_fd(), &mut buf, MsgFlags::empty()).unwrap();
                drop(theirs);
            });
            let r = BusMember::join_over(ours, None, "fake", &joining(want));
            t.join().unwrap();
            (r, None)
        } else {
            let (r, t) = join_fake(want, frames);
            (r, Some(t))
        };
        match r {
            Err(e) => assert!(expect(&e), "{name}: got {e:?}"),
            Ok(_) => panic!("{name}: joined"),
        }
        drop(theirs);
    }
}

// ---- the CLI ---------------------------------------------------------------------------

fn domsock() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_domsock"));
    c.stdin(Stdio::null()).stderr(Stdio::inherit());
    c
}

/// Starts `domsock bus ...` and waits for its `DS-READY` (or JSON `ready`) line.
fn start_ready(args: &[&str]) -> (std::process::Child, BufReader<std::process::ChildStdout>) {
    let mut child = domsock().args(args).stdout(Stdio::piped()).spawn().unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert!(
        line.starts_with("DS-READY") || line.contains("\"ready\""),
        "{args:?}: {line}"
    );
    (child, out)
}

/// `key=value` of a result line.
fn field<'a>(line: &'a str, key: &str) -> &'a str {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
        .unwrap_or_else(|| panic!("no {key} in {line}"))
}

fn rest_of(out: BufReader<std::process::ChildStdout>) -> Vec<String> {
    out.lines().map(|l| l.unwrap()).collect()
}

#[test]
fn cli_two_publishers_and_a_checking_subscriber() {
    const N: &str = "2000";
    let s = service("bus-cli");
    let sock = s.sock.to_str().unwrap();
    let (mut sub, out) = start_ready(&[
        "bus",
        "sub",
        "feed",
        "--unix",
        sock,
        "--create",
        "hub",
        "--queue-bytes",
        "4M",
        "--count",
        N,
        "--senders",
        "2",
        "--idle-ms",
        "10000",
    ]);
    let pubs: Vec<_> = (0..2)
        .map(|_| {
            domsock()
                .args([
                    "bus", "pub", "feed", "--unix", sock, "--count", N, "--size", "100",
                ])
                .stdout(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for p in pubs {
        let o = p.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&o.stdout);
        assert!(o.status.success(), "{text}");
        let last = text.lines().last().unwrap();
        assert_eq!(field(last, "sent"), N, "{last}");
        assert_eq!(field(last, "bytes"), "200000", "{last}");
    }
    let lines = rest_of(out);
    assert!(sub.wait().unwrap().success(), "{lines:?}");
    let result = lines
        .iter()
        .find(|l| l.starts_with("DS-RESULT"))
        .expect("a result line");
    eprintln!("{result}");
    for (k, v) in [
        ("received", "4000"),
        ("senders", "2"),
        ("out_of_order", "0"),
        ("bad", "0"),
        ("lost", "0"),
    ] {
        assert_eq!(field(result, k), v, "{result}");
    }
}

#[test]
fn cli_topics_json_and_errors() {
    let s = service("bus-cli-topic");
    let sock = s.sock.to_str().unwrap();
    let (mut sub, out) = start_ready(&[
        "bus",
        "sub",
        "sensors",
        "--unix",
        sock,
        "--create",
        "topic",
        "--topic",
        "temp/",
        "--messages",
        "2",
        "--json",
    ]);
    for (topic, msg) in [
        ("hum/k1", "40"),
        ("temp/k1", "21.5 C"),
        ("temp/k2", "\u{e9}"),
    ] {
        let st = domsock()
            .args([
                "bus", "pub", "sensors", "--unix", sock, "--topic", topic, msg,
            ])
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(st.success());
    }
    let lines = rest_of(out);
    assert!(sub.wait().unwrap().success(), "{lines:?}");
    let events: Vec<serde_json::Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let msgs: Vec<_> = events.iter().filter(|e| e["event"] == "message").collect();
    assert_eq!(msgs.len(), 2, "{lines:?}");
    assert_eq!(
        (&msgs[0]["topic"], &msgs[0]["data"], &msgs[0]["seq"]),
        (&"temp/k1".into(), &"21.5 C".into(), &1.into())
    );
    assert_eq!(
        (&msgs[1]["topic"], &msgs[1]["data"]),
        (&"temp/k2".into(), &"\u{e9}".into())
    );
    assert_eq!(events.last().unwrap()["event"], "result");
    // Stdin lines, one message each, to a text-mode subscriber.
    let (mut sub, out) = start_ready(&[
        "bus",
        "sub",
        "sensors",
        "--unix",
        sock,
        "--topic",
        "log",
        "--messages",
        "3",
    ]);
    let mut p = domsock()
        .args(["bus", "pub", "sensors", "--unix", sock, "--topic", "log/a"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = p.stdin.take().unwrap();
        stdin.write_all(b"one\ntwo words\n\\x\n").unwrap();
    }
    assert!(p.wait().unwrap().success());
    let lines = rest_of(out);
    assert!(sub.wait().unwrap().success(), "{lines:?}");
    let data: Vec<&str> = lines
        .iter()
        .filter(|l| l.starts_with("DS-MSG"))
        .map(|l| l.split_once(" data=").unwrap().1)
        .collect();
    assert_eq!(data, ["one", "two words", "\\\\x"]);
    assert!(
        lines
            .iter()
            .all(|l| !l.starts_with("DS-MSG") || l.contains(" topic=log/a ")),
        "{lines:?}"
    );
    // `join` on a switch bus prints a broadcast with its addresses.
    let (mut j, out) = start_ready(&[
        "bus",
        "join",
        "lan",
        "--unix",
        sock,
        "--create",
        "switch",
        "--messages",
        "1",
    ]);
    let st = domsock()
        .args([
            "bus", "pub", "lan", "--unix", sock, "--to", "ff:ff", "--addr", "0a", "hello",
        ])
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
    let lines = rest_of(out);
    assert!(j.wait().unwrap().success(), "{lines:?}");
    let msg = lines
        .iter()
        .find(|l| l.starts_with("DS-MSG"))
        .expect("the broadcast");
    assert!(
        msg.ends_with(" seq=1 src=0a dst=ffff len=5 data=hello"),
        "{msg}"
    );
    // `sub --addr` announces its address on a switch, so unicast to it reaches it alone.
    let mut other = BusMember::join_unix(&s.sock, "lan", &joining(Want::BOTH)).unwrap();
    let (mut sub, out) = start_ready(&[
        "bus",
        "sub",
        "lan",
        "--unix",
        sock,
        "--addr",
        "0b",
        "--messages",
        "1",
    ]);
    match other.recv_timeout(STEP).unwrap() {
        Some(BusEvent::Message(m)) => assert_eq!(
            (m.fields, m.payload),
            (
                Fields::Addressed {
                    src: b"\x0b",
                    dst: b"\xff"
                },
                &b""[..]
            )
        ),
        ev => panic!("the announcement: {ev:?}"),
    }
    let st = domsock()
        .args([
            "bus", "pub", "lan", "--unix", sock, "--to", "0b", "--addr", "0a", "for b",
        ])
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
    let lines = rest_of(out);
    assert!(sub.wait().unwrap().success(), "{lines:?}");
    let msg = lines
        .iter()
        .find(|l| l.starts_with("DS-MSG"))
        .expect("the unicast");
    assert!(msg.ends_with(" src=0a dst=0b len=5 data=for b"), "{msg}");
    assert_quiet(&mut other);
    // No such bus: a clear error with the wire code, exit status 1.
    let o = domsock()
        .args(["bus", "pub", "nope", "--unix", sock, "x"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(1), "{text}");
    assert!(
        text.contains("DS-ERROR") && text.contains("NoSuchBus (code 3)"),
        "{text}"
    );
    // A hub bus has no topics.
    let o = domsock()
        .args([
            "bus", "pub", "sensors", "--unix", sock, "--create", "hub", "x",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("Mismatch"), "{text}");
}

#[test]
fn cli_without_a_service_fails_clearly() {
    let o = domsock()
        .args([
            "bus",
            "sub",
            "x",
            "--unix",
            "/nonexistent/red.sock",
            "--rejoin-ms",
            "100",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(1), "{text}");
    assert!(
        text.contains("cannot reach the bus service at unix /nonexistent/red.sock"),
        "{text}"
    );
}

// ---- a relay that breaks a member's connection, as a lost device does -------------------

/// Relays one seqpacket connection at a time from `<dir>/relay.sock` to the service, and
/// can cut it and hold back new ones (the member's device is away).
struct Relay {
    path: PathBuf,
    accepting: Arc<AtomicBool>,
    cut: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    /// Frames relayed from the service to the member, over all connections.
    to_member: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Relay {
    fn start(path: PathBuf, target: PathBuf) -> Relay {
        let fd = nix::sys::socket::socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            None,
        )
        .unwrap();
        nix::sys::socket::bind(
            fd.as_raw_fd(),
            &nix::sys::socket::UnixAddr::new(&path).unwrap(),
        )
        .unwrap();
        nix::sys::socket::listen(&fd, nix::sys::socket::Backlog::new(8).unwrap()).unwrap();
        // std accepts a seqpacket connection as a UnixStream (boundaries kept).
        let listener = std::os::unix::net::UnixListener::from(fd);
        let accepting = Arc::new(AtomicBool::new(true));
        let cut = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let to_member = Arc::new(AtomicU64::new(0));
        let (a, c, s, n) = (
            accepting.clone(),
            cut.clone(),
            stop.clone(),
            to_member.clone(),
        );
        let thread = std::thread::spawn(move || {
            let mut buf = vec![0u8; 1 << 21];
            while !s.load(Ordering::SeqCst) {
                if !a.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                }
                let member = match listener.accept() {
                    Ok((m, _)) => OwnedFd::from(m),
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(5));
                        continue;
                    }
                };
                let service = UnixBusDialer {
                    path: target.clone(),
                }
                .dial(STEP)
                .unwrap();
                c.store(false, Ordering::SeqCst);
                'conn: while !s.load(Ordering::SeqCst) && !c.load(Ordering::SeqCst) {
                    let mut pfd = [
                        PollFd::new(member.as_fd(), PollFlags::POLLIN),
                        PollFd::new(service.as_fd(), PollFlags::POLLIN),
                    ];
                    if poll(&mut pfd, PollTimeout::from(10u16)).unwrap() == 0 {
                        continue;
                    }
                    let ready: Vec<bool> = pfd
                        .iter()
                        .map(|p| p.revents().is_some_and(|r| !r.is_empty()))
                        .collect();
                    for (i, (from, to)) in [(&member, &service), (&service, &member)]
                        .into_iter()
                        .enumerate()
                    {
                        if !ready[i] {
                            continue;
                        }
                        match recv(from.as_raw_fd(), &mut buf, MsgFlags::empty()) {
                            Ok(0) | Err(_) => break 'conn,
                            Ok(len) => {
                                if send(to.as_raw_fd(), &buf[..len], MsgFlags::MSG_NOSIGNAL)
                                    .is_err()
                                {
                                    break 'conn;
                                }
                                if i == 1 {
                                    // A BATCH carries many frames: count what it holds, so
                                    // that the count does not depend on the service's pace.
                                    let frames = match ServiceFrame::decode(&buf[..len]) {
                                        Ok(ServiceFrame::Batch(b)) => b.len() as u64,
                                        _ => 1,
                                    };
                                    n.fetch_add(frames, Ordering::SeqCst);
                                }
                            }
                        }
                    }
                }
            }
        });
        Relay {
            path,
            accepting,
            cut,
            stop,
            to_member,
            thread: Some(thread),
        }
    }

    /// Cuts the connection and holds back new ones (they wait in the backlog).
    fn cut_and_hold(&self) {
        self.accepting.store(false, Ordering::SeqCst);
        self.cut.store(true, Ordering::SeqCst);
    }

    fn resume(&self) {
        self.accepting.store(true, Ordering::SeqCst);
    }

    fn wait_relayed(&self, frames: u64) {
        let deadline = Instant::now() + STEP;
        while self.to_member.load(Ordering::SeqCst) < frames {
            assert!(
                Instant::now() < deadline,
                "relayed {:?} of {frames}",
                self.to_member
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn cli_subscriber_rejoins_after_its_connection_breaks_and_counts_the_loss() {
    let s = service("bus-cli-rejoin");
    let relay = Relay::start(s.sock.with_file_name("relay.sock"), s.sock.clone());
    let via = relay.path.to_str().unwrap();
    // 64-byte payloads: 80-byte frames; a 4 KiB queue holds 51 of them while away.
    let (mut sub, mut out) = start_ready(&[
        "bus",
        "sub",
        "feed",
        "--unix",
        via,
        "--create",
        "hub",
        "--max-message",
        "1K",
        "--queue-bytes",
        "4K",
        "--count",
        "1100",
        "--rejoin-ms",
        "10000",
        "--max-lost",
        "1100",
    ]);
    let mut p = BusMember::join_unix(
        &s.sock,
        "feed",
        &joining(Want {
            publish: true,
            receive: false,
        }),
    )
    .unwrap();
    let mut buf = Vec::new();
    let mut publish = |range: std::ops::Range<u64>| {
        for i in range {
            pattern_message(i, 64, &mut buf);
            p.publish(&buf).unwrap();
        }
    };
    publish(0..300);
    relay.wait_relayed(1 + 300); // JOINED and the 300 are with the member
    relay.cut_and_hold();
    std::thread::sleep(Duration::from_millis(300)); // the service parks the member
    publish(300..1000);
    relay.resume();
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert!(line.starts_with("DS-REJOINED"), "{line}");
    let told: u64 = field(&line, "lost").parse().unwrap();
    publish(1000..1100);
    let lines = rest_of(out);
    assert!(sub.wait().unwrap().success(), "{lines:?}");
    let result = lines
        .iter()
        .find(|l| l.starts_with("DS-RESULT"))
        .expect("a result line");
    eprintln!("{line}{result}");
    assert!(told > 0, "the member lost messages while away");
    let n = |k| field(result, k).parse::<u64>().unwrap();
    assert_eq!((n("out_of_order"), n("bad"), n("rejoins")), (0, 0, 1));
    assert_eq!(
        n("lost"),
        told,
        "every missing message was told at the rejoin"
    );
    assert_eq!(n("loss_reported"), told);
    assert_eq!(n("received") + told, 1100);
    assert_eq!(
        n("received"),
        300 + 51 + 100,
        "the queue's 51 waited for it"
    );
}
