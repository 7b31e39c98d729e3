//! The session port over the engine: a guest (the user-space driver of `support/mod.rs`,
//! speaking raw vsock packets) opens a session to a real host Unix socket, loses its
//! device mid-stream in both directions, comes back and resumes; every byte arrives once,
//! in order, and the host socket never sees a break. Also: forged and replayed RESUMEs
//! are refused and counted and leave the session unharmed; a parked session expires at
//! its timeout (simulated time) with the host end closed.

mod support;

use domsock_migration::session::proof::ResumeClaim;
use domsock_migration::session::wire::{Closed, Frame, Refusal};
use domsock_migration::session::{Nonce, Secret, SessionId, DEFAULT_PARK_TIMEOUT_MS};
use domsock_proto::Cid;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};
use support::*;

const SESSION_PORT: u32 = 1022;
const TARGET: u32 = 5000;

/// What the guest library keeps of a session.
struct Client {
    id: SessionId,
    secret: Secret,
    nonce: Nonce,
    window: u32,
}

/// Reads one whole frame from `conn` (consuming it: `fwd_cnt` moves and is told); bytes
/// that came after it in the same packets are kept in `conn_extra` for the caller.
fn read_frame_and(g: &mut TestGuest, conn: &mut GuestConn) -> (Frame, Vec<u8>) {
    read_frame_ops(g, conn, &mut Vec::new())
}

/// Like [`read_frame_and`], also collecting the ops of non-data packets that came.
fn read_frame_ops(g: &mut TestGuest, conn: &mut GuestConn, ops: &mut Vec<u16>) -> (Frame, Vec<u8>) {
    let mut buf = Vec::new();
    let c = *conn;
    let mut result = None;
    g.pump_until("a session frame", |g| {
        for p in g.take_rx_of(&c) {
            if p.hdr.op == OP_RW {
                buf.extend_from_slice(&p.payload);
            } else {
                ops.push(p.hdr.op);
            }
        }
        if let Some((f, used)) = Frame::decode(&buf).expect("a valid frame") {
            result = Some((f, buf[used..].to_vec()));
        }
        result.is_some()
    });
    conn.fwd_cnt = conn.fwd_cnt.wrapping_add(buf.len() as u32);
    g.send_ctl(conn, OP_CREDIT_UPDATE, 0);
    result.unwrap()
}

fn read_frame(g: &mut TestGuest, conn: &mut GuestConn) -> Frame {
    let (f, rest) = read_frame_and(g, conn);
    assert!(rest.is_empty(), "data after {f:?}");
    f
}

fn open(g: &mut TestGuest, guest_port: u32) -> (GuestConn, Client) {
    let mut conn = GuestConn {
        buf_alloc: 256 * 1024,
        ..GuestConn::stream(guest_port, SESSION_PORT)
    };
    g.connect(&conn);
    let open = Frame::Open {
        cid: Cid::HOST,
        port: domsock_proto::Port(TARGET),
        socket_type: domsock_proto::SocketType::Stream,
    };
    g.send_rw(&conn, &open.encode());
    match read_frame(g, &mut conn) {
        Frame::Opened {
            id,
            secret,
            next_nonce,
            window,
            park_timeout_ms,
        } => {
            assert_eq!(park_timeout_ms, DEFAULT_PARK_TIMEOUT_MS);
            (
                conn,
                Client {
                    id,
                    secret,
                    nonce: next_nonce,
                    window,
                },
            )
        }
        other => panic!("expected OPENED, got {other:?}"),
    }
}

fn resume_frame(c: &Client, received: u64, client_nonce: u8) -> Frame {
    let claim = ResumeClaim {
        id: c.id,
        server_nonce: c.nonce,
        client_nonce: Nonce([client_nonce; 16]),
        received,
        closed: Closed::default(),
    };
    Frame::Resume {
        id: c.id,
        client_nonce: claim.client_nonce,
        received,
        closed: claim.closed,
        proof: claim.prove(&c.secret),
    }
}

/// Sends a RESUME on a new connection from `guest_port` and returns its answer.
fn try_resume(g: &mut TestGuest, guest_port: u32, frame: &Frame) -> (GuestConn, Frame) {
    let (conn, answer, rest) = resume_with_data(g, guest_port, frame);
    assert!(rest.is_empty(), "data after {answer:?}");
    (conn, answer)
}

/// Like [`try_resume`], also returning replayed bytes that arrived with the answer.
fn resume_with_data(
    g: &mut TestGuest,
    guest_port: u32,
    frame: &Frame,
) -> (GuestConn, Frame, Vec<u8>) {
    let mut conn = GuestConn {
        buf_alloc: 256 * 1024,
        ..GuestConn::stream(guest_port, SESSION_PORT)
    };
    g.connect(&conn);
    g.send_rw(&conn, &frame.encode());
    let (answer, rest) = read_frame_and(g, &mut conn);
    (conn, answer, rest)
}

fn send_all(g: &mut TestGuest, conn: &GuestConn, data: &[u8]) {
    for chunk in data.chunks(4096) {
        g.send_rw(conn, chunk);
        g.pump();
    }
}

fn host_read_exact(h: &mut UnixStream, n: usize) -> Vec<u8> {
    read_n(h, n)
}

fn nothing_to_read(h: &mut UnixStream) -> bool {
    h.set_nonblocking(true).unwrap();
    let mut b = [0u8; 1];
    let r = match h.read(&mut b) {
        Err(e) => e.kind() == std::io::ErrorKind::WouldBlock,
        Ok(_) => false,
    };
    h.set_nonblocking(false).unwrap();
    r
}

#[test]
fn a_session_survives_device_stops_in_both_directions() {
    let mut g = TestGuest::new("s-survive");
    let listener = g.listen_stream(TARGET);
    let (mut conn, mut client) = open(&mut g, 40_000);
    let mut host = accept(&listener);
    assert_eq!(g.stat("sessions_opened"), 1);
    let to_guest = pattern(1, 300 * 1024);
    let to_host = pattern(2, 300 * 1024);
    let mut guest_got = Vec::new();
    let mut host_got = Vec::new();
    let mut host_sent = 0usize;
    let mut guest_sent = 0usize;
    let mut guest_received = 0u64;
    for round in 0..3u32 {
        // The host writes 40 KiB; the guest application reads 24 KiB of it (fwd_cnt
        // told), and 16 KiB reach its kernel but are lost with the device.
        host.write_all(&to_guest[host_sent..host_sent + 24 * 1024])
            .unwrap();
        let got = g.recv_stream(&mut conn, 24 * 1024, true);
        guest_got.extend_from_slice(&got);
        guest_received += got.len() as u64;
        host.write_all(&to_guest[host_sent + 24 * 1024..host_sent + 40 * 1024])
            .unwrap();
        host_sent += 40 * 1024;
        g.settle();
        let lost: usize = g.take_rx_of(&conn).iter().map(|p| p.payload.len()).sum();
        assert_eq!(
            lost,
            16 * 1024,
            "round {round}: bytes that reach the guest kernel only"
        );
        // The guest sends 48 KiB the daemon accepts, and 8 KiB more are lost in flight
        // (written by the app, never on the ring).
        send_all(&mut g, &conn, &to_host[guest_sent..guest_sent + 48 * 1024]);
        let guest_wrote = guest_sent + 56 * 1024;
        host_got.extend(host_read_exact(&mut host, 48 * 1024));
        // Device gone.
        g.plane.stop();
        assert_eq!(g.plane.parked_sessions(), 1, "round {round}");
        assert_eq!(g.stat("sessions_parked"), u64::from(round) + 1);
        // The host keeps writing while the guest is away: accepted, not lost.
        host.write_all(&to_guest[host_sent..host_sent + 8 * 1024])
            .unwrap();
        host_sent += 8 * 1024;
        g.settle();
        assert!(
            nothing_to_read(&mut host),
            "host saw EOF or data while parked"
        );
        // Back: resume from a new port with what the application has read.
        let (mut c2, answer, first) = resume_with_data(
            &mut g,
            41_000 + round,
            &resume_frame(&client, guest_received, 7),
        );
        let Frame::Resumed {
            received,
            next_nonce,
            ..
        } = answer
        else {
            panic!("expected RESUMED, got {answer:?}");
        };
        assert_eq!(received, (guest_sent + 48 * 1024) as u64, "daemon's count");
        client.nonce = next_nonce;
        // The daemon replays from the guest's count: everything the host wrote since.
        let mut replay = first;
        let rest = host_sent - guest_received as usize - replay.len();
        replay.extend(g.recv_stream(&mut c2, rest, true));
        guest_got.extend_from_slice(&replay);
        guest_received += replay.len() as u64;
        // The guest replays from the daemon's count.
        send_all(&mut g, &c2, &to_host[received as usize..guest_wrote]);
        host_got.extend(host_read_exact(&mut host, guest_wrote - received as usize));
        guest_sent = guest_wrote;
        conn = c2;
        assert!(client.window >= 56 * 1024);
    }
    assert_eq!(guest_got, &to_guest[..host_sent], "guest stream");
    assert_eq!(host_got, &to_host[..guest_sent], "host stream");
    assert_eq!(g.stat("sessions_resumed"), 3);
    assert_eq!(g.stat("session_refusals"), 0);
    assert!(g.stat("session_replayed_bytes") >= 3 * 24 * 1024);
    assert_eq!(g.plane.parked_sessions(), 0);
}

#[test]
fn forged_resumes_are_refused_and_leave_the_session_unharmed() {
    let mut g = TestGuest::new("s-forged");
    let listener = g.listen_stream(TARGET);
    let (_conn, mut client) = open(&mut g, 40_000);
    let mut host = accept(&listener);
    g.plane.stop();
    let mut port = 42_000;
    let mut refused = |g: &mut TestGuest, frame: &Frame| -> Refusal {
        port += 1;
        match try_resume(g, port, frame).1 {
            Frame::Refused { reason, .. } => reason,
            other => panic!("expected REFUSED, got {other:?}"),
        }
    };
    let wrong_secret = Client {
        secret: Secret([0xaa; 32]),
        ..Client { ..clone(&client) }
    };
    assert_eq!(
        refused(&mut g, &resume_frame(&wrong_secret, 0, 1)),
        Refusal::BadProof
    );
    let mut other_id = clone(&client);
    other_id.id.0[0] ^= 1;
    assert_eq!(
        refused(&mut g, &resume_frame(&other_id, 0, 1)),
        Refusal::UnknownSession
    );
    let mut stale_nonce = clone(&client);
    stale_nonce.nonce.0[0] ^= 1;
    assert_eq!(
        refused(&mut g, &resume_frame(&stale_nonce, 0, 1)),
        Refusal::BadProof
    );
    assert_eq!(
        refused(&mut g, &resume_frame(&client, 1, 1)),
        Refusal::OutOfRange
    );
    assert_eq!(g.stat("session_bad_proofs"), 2);
    assert_eq!(g.stat("session_refusals"), 4);
    // Garbage instead of a frame.
    let garbage = GuestConn::stream(43_000, SESSION_PORT);
    g.connect(&garbage);
    g.send_rw(&garbage, b"GET / HTTP/1.1\r\n\r\n");
    g.settle();
    assert_eq!(g.stat("session_refusals"), 5);
    // The session is unharmed: the real owner resumes.
    assert_eq!(g.plane.parked_sessions(), 1);
    let good = resume_frame(&client, 0, 2);
    let (c2, answer) = try_resume(&mut g, 44_000, &good);
    let Frame::Resumed { next_nonce, .. } = answer else {
        panic!("expected RESUMED, got {answer:?}");
    };
    g.send_rw(&c2, b"still here");
    g.pump();
    assert_eq!(read_n(&mut host, 10), b"still here");
    // Replaying the handshake that just worked fails: its nonce is spent once the guest
    // has read the answer.
    g.plane.stop();
    assert_eq!(refused(&mut g, &good), Refusal::BadProof);
    client.nonce = next_nonce;
    let (_c3, answer) = try_resume(&mut g, 45_000, &resume_frame(&client, 0, 3));
    assert!(matches!(answer, Frame::Resumed { .. }), "{answer:?}");
}

fn clone(c: &Client) -> Client {
    Client {
        id: c.id,
        secret: c.secret.clone(),
        nonce: c.nonce,
        window: c.window,
    }
}

#[test]
fn a_parked_session_expires_at_its_timeout_and_says_so() {
    let mut g = TestGuest::new("s-expire");
    let listener = g.listen_stream(TARGET);
    let (_conn, client) = open(&mut g, 40_000);
    let mut host = accept(&listener);
    let t0 = Instant::now();
    g.plane.stop();
    g.pump_at(t0);
    let timeout = Duration::from_millis(u64::from(DEFAULT_PARK_TIMEOUT_MS));
    g.pump_at(t0 + timeout - Duration::from_millis(1));
    assert_eq!(g.plane.parked_sessions(), 1, "expired early");
    assert!(nothing_to_read(&mut host));
    g.pump_at(t0 + timeout + Duration::from_millis(1));
    assert_eq!(g.plane.parked_sessions(), 0);
    assert_eq!(g.stat("sessions_expired"), 1);
    assert!(reads_eof(&mut host), "host end not closed");
    let (_c, answer) = try_resume(&mut g, 41_000, &resume_frame(&client, 0, 1));
    assert_eq!(
        answer,
        Frame::Refused {
            reason: Refusal::Expired,
            errno: 0
        }
    );
}

#[test]
fn raw_connections_still_end_with_their_device() {
    let mut g = TestGuest::new("s-raw");
    let listener = g.listen_stream(TARGET);
    let conn = GuestConn::stream(40_000, TARGET);
    g.connect(&conn);
    let mut host = accept(&listener);
    g.send_rw(&conn, b"raw");
    g.pump();
    assert_eq!(read_n(&mut host, 3), b"raw");
    g.plane.stop();
    assert!(reads_eof(&mut host));
    assert_eq!(g.plane.parked_sessions(), 0);
}

#[test]
fn opening_a_session_to_a_closed_port_is_refused_with_its_errno() {
    let mut g = TestGuest::new("s-closed");
    let mut conn = GuestConn::stream(40_000, SESSION_PORT);
    g.connect(&conn);
    let open = Frame::Open {
        cid: Cid::HOST,
        port: domsock_proto::Port(5999),
        socket_type: domsock_proto::SocketType::Stream,
    };
    g.send_rw(&conn, &open.encode());
    let mut ops = Vec::new();
    match read_frame_ops(&mut g, &mut conn, &mut ops).0 {
        Frame::Refused {
            reason: Refusal::TargetRefused,
            errno,
        } => assert!(
            errno == libc::ENOENT as u32 || errno == libc::ECONNREFUSED as u32,
            "{errno}"
        ),
        other => panic!("expected REFUSED, got {other:?}"),
    }
    // And the connection then ends (SHUTDOWN from the device).
    g.settle();
    ops.extend(g.take_rx_of(&conn).iter().map(|p| p.hdr.op));
    assert!(
        ops.contains(&OP_SHUTDOWN) || ops.contains(&OP_RST),
        "{ops:?}"
    );
    assert_eq!(g.stat("session_refusals"), 1);
}

/// Registers guest port `port` as a session listener; returns the keepalive connection.
fn register(g: &mut TestGuest, guest_port: u32, port: u32) -> GuestConn {
    let mut conn = GuestConn::stream(guest_port, SESSION_PORT);
    g.connect(&conn);
    let listen = Frame::Listen {
        port: domsock_proto::Port(port),
        socket_type: domsock_proto::SocketType::Stream,
    };
    g.send_rw(&conn, &listen.encode());
    assert_eq!(
        read_frame(g, &mut conn),
        Frame::Listening {
            port: domsock_proto::Port(port)
        }
    );
    conn
}

/// A host connection to the guest's session listener on `port` that writes `first`: the
/// guest reads OFFERED and then exactly `first`. Returns both ends and what OFFERED gave
/// (id, secret, next nonce, window).
fn host_connects_offered(
    g: &mut TestGuest,
    port: u32,
    first: &[u8],
) -> (UnixStream, GuestConn, (SessionId, Secret, Nonce, u32)) {
    let (mut host, mut conn) = host_connects(g, port);
    host.write_all(first).unwrap();
    let (offered, rest) = read_frame_and(g, &mut conn);
    let Frame::Offered {
        id,
        secret,
        next_nonce,
        window,
        ..
    } = offered
    else {
        panic!("expected OFFERED, got {offered:?}");
    };
    let mut got = rest;
    let more = first.len() - got.len();
    got.extend(g.recv_stream(&mut conn, more, true));
    assert_eq!(got, first);
    (host, conn, (id, secret, next_nonce, window))
}

/// The host connects to guest port `port`; the guest accepts. Returns the host stream
/// (after its `OK` line) and the guest's connection.
fn host_connects(g: &mut TestGuest, port: u32) -> (UnixStream, GuestConn) {
    let mut host = g.host_connect(port);
    let mut req = None;
    g.pump_until("REQUEST from the host", |g| {
        req = g
            .take_rx()
            .into_iter()
            .find(|p| p.hdr.op == OP_REQUEST)
            .map(|p| p.hdr);
        req.is_some()
    });
    let req = req.unwrap();
    let conn = GuestConn {
        buf_alloc: 256 * 1024,
        ..GuestConn::stream(port, req.src_port)
    };
    g.send_ctl(&conn, OP_RESPONSE, 0);
    g.pump();
    assert_eq!(
        read_n(&mut host, format!("OK {port}\n").len()),
        format!("OK {port}\n").as_bytes()
    );
    (host, conn)
}

#[test]
fn a_session_the_guest_accepted_survives_a_device_stop() {
    let mut g = TestGuest::new("s-accept");
    let _keepalive = register(&mut g, 39_000, 6000);
    assert_eq!(g.plane.session_listeners(), 1);
    let (mut host, conn, (id, secret, next_nonce, window)) =
        host_connects_offered(&mut g, 6000, b"hello guest");
    g.send_rw(&conn, b"hello host");
    g.pump();
    assert_eq!(read_n(&mut host, 10), b"hello host");
    g.plane.stop();
    assert_eq!(g.plane.parked_sessions(), 1);
    assert_eq!(
        g.plane.session_listeners(),
        1,
        "a registration outlives the device"
    );
    host.write_all(b" while away").unwrap();
    let client = Client {
        id,
        secret,
        nonce: next_nonce,
        window,
    };
    let (mut c2, answer, mut data) =
        resume_with_data(&mut g, 41_000, &resume_frame(&client, 11, 1));
    let Frame::Resumed { received, .. } = answer else {
        panic!("expected RESUMED, got {answer:?}");
    };
    assert_eq!(received, 10);
    let more = 11 - data.len();
    data.extend(g.recv_stream(&mut c2, more, true));
    assert_eq!(data, b" while away");
    g.send_rw(&c2, b" and back");
    g.pump();
    assert_eq!(read_n(&mut host, 9), b" and back");
    // Unregistered ports stay raw: no OFFERED in front of the host's bytes.
    let (mut raw_host, mut raw) = host_connects(&mut g, 6001);
    raw_host.write_all(b"raw").unwrap();
    assert_eq!(g.recv_stream(&mut raw, 3, true), b"raw");
}

#[test]
fn an_orphaned_registration_is_forgotten_after_the_park_timeout() {
    let mut g = TestGuest::new("s-orphan");
    let keepalive = register(&mut g, 39_000, 6000);
    let t0 = Instant::now();
    g.plane.stop();
    g.pump_at(t0);
    let timeout = Duration::from_millis(u64::from(DEFAULT_PARK_TIMEOUT_MS));
    g.pump_at(t0 + timeout - Duration::from_millis(1));
    assert_eq!(g.plane.session_listeners(), 1);
    g.pump_at(t0 + timeout + Duration::from_millis(1));
    assert_eq!(g.plane.session_listeners(), 0);
    // A registration whose connection the guest closes ends at once.
    let k2 = register(&mut g, 39_001, 6002);
    assert_eq!(g.plane.session_listeners(), 1);
    g.send_ctl(&k2, OP_RST, 0);
    g.pump();
    assert_eq!(g.plane.session_listeners(), 0);
    let _ = keepalive;
}

/// Sends one whole message on a seqpacket `conn` (one packet, EOM).
fn send_msg(g: &mut TestGuest, conn: &GuestConn, msg: &[u8]) {
    g.send(conn.hdr(OP_RW, msg.len() as u32, SEQ_EOM), msg);
}

/// Receives `n` whole messages on a seqpacket `conn` (telling the credit it consumed).
fn recv_msgs(g: &mut TestGuest, conn: &mut GuestConn, n: usize) -> Vec<Vec<u8>> {
    let mut msgs = Vec::new();
    let mut cur = Vec::new();
    let c = *conn;
    let mut fwd = conn.fwd_cnt;
    g.pump_until(&format!("{n} messages"), |g| {
        for p in g.take_rx_of(&c) {
            // The end of a refused connection, and the update a seqpacket receiver sends
            // when it emptied its queue of the guest's messages (as Linux does).
            if p.hdr.op == OP_SHUTDOWN || p.hdr.op == OP_CREDIT_UPDATE {
                continue;
            }
            assert_eq!(p.hdr.op, OP_RW, "unexpected {:?}", p.hdr);
            fwd = fwd.wrapping_add(p.hdr.len);
            cur.extend_from_slice(&p.payload);
            if p.hdr.flags & SEQ_EOM != 0 {
                msgs.push(std::mem::take(&mut cur));
            }
        }
        msgs.len() >= n
    });
    conn.fwd_cnt = fwd;
    g.send_ctl(conn, OP_CREDIT_UPDATE, 0);
    assert_eq!(msgs.len(), n, "more messages than expected");
    msgs
}

/// Opens a seqpacket session to `TARGET` from guest port 40000 with `buf_alloc`; returns
/// the connection and the daemon's answer (one whole message).
fn open_seqpacket(g: &mut TestGuest, buf_alloc: u32) -> (GuestConn, Frame) {
    let mut conn = GuestConn {
        buf_alloc,
        ..GuestConn::seqpacket(40_000, SESSION_PORT)
    };
    g.connect(&conn);
    let open = Frame::Open {
        cid: Cid::HOST,
        port: domsock_proto::Port(TARGET),
        socket_type: domsock_proto::SocketType::SeqPacket,
    };
    send_msg(g, &conn, &open.encode());
    let answer = recv_msgs(g, &mut conn, 1).remove(0);
    match Frame::decode(&answer) {
        Ok(Some((f, used))) if used == answer.len() => (conn, f),
        other => panic!("not one session frame: {other:?}"),
    }
}

#[test]
fn a_seqpacket_session_keeps_every_message_whole_and_once() {
    let mut g = TestGuest::new("s-seq");
    let listener = g.listen_seqpacket(TARGET);
    let (mut conn, opened) = open_seqpacket(&mut g, 256 * 1024);
    let Frame::Opened {
        id,
        secret,
        next_nonce,
        window,
        ..
    } = opened
    else {
        panic!("expected OPENED, got {opened:?}");
    };
    let host = accept(&listener);
    let msg = |i: u32| pattern(100 + i, 100 + (i as usize * 37) % 3000);
    // Host -> guest: 6 messages, the guest consumes 4, 2 reach its kernel and are lost.
    let host_send = |i: u32| {
        nix::sys::socket::send(
            std::os::fd::AsRawFd::as_raw_fd(&host),
            &msg(i),
            nix::sys::socket::MsgFlags::empty(),
        )
        .unwrap();
    };
    (0..4).for_each(host_send);
    let got = recv_msgs(&mut g, &mut conn, 4);
    (4..6).for_each(host_send);
    g.settle();
    let lost = g.take_rx_of(&conn);
    assert!(lost.iter().filter(|p| p.hdr.flags & SEQ_EOM != 0).count() == 2);
    // Guest -> host: 3 messages the daemon takes, then half of a fourth.
    for i in 0..3 {
        send_msg(&mut g, &conn, &msg(50 + i));
    }
    let half = msg(53);
    g.send(conn.hdr(OP_RW, 10, 0), &half[..10]);
    g.pump();
    g.plane.stop();
    // A message the host sends while the guest is away is kept too.
    host_send(6);
    g.settle();
    let client = Client {
        id,
        secret,
        nonce: next_nonce,
        window,
    };
    let mut c2 = GuestConn {
        buf_alloc: 256 * 1024,
        ..GuestConn::seqpacket(41_000, SESSION_PORT)
    };
    g.connect(&c2);
    send_msg(&mut g, &c2, &resume_frame(&client, 4, 1).encode());
    // RESUMED is a message of its own, then the 3 messages the guest lacks.
    let mut replay = recv_msgs(&mut g, &mut c2, 4);
    let answer = replay.remove(0);
    let Some((Frame::Resumed { received, .. }, _)) = Frame::decode(&answer).unwrap() else {
        panic!("expected RESUMED, got {answer:?}");
    };
    assert_eq!(
        received, 3,
        "messages the daemon took, the cut one not counted"
    );
    let all: Vec<Vec<u8>> = got.into_iter().chain(replay).collect();
    assert_eq!(all, (0..7).map(msg).collect::<Vec<_>>(), "guest messages");
    send_msg(&mut g, &c2, &msg(53));
    g.pump();
    for i in 50..54 {
        let (n, m) = recv_message(&host, 8192);
        assert_eq!(n, msg(i).len(), "host message {i} whole");
        assert_eq!(m, msg(i));
    }
    // Out of range: more messages than were ever sent.
    g.plane.stop();
    let (_c, answer) = {
        let mut c3 = GuestConn {
            buf_alloc: 256 * 1024,
            ..GuestConn::seqpacket(42_000, SESSION_PORT)
        };
        g.connect(&c3);
        send_msg(&mut g, &c3, &resume_frame(&client, 99, 2).encode());
        let a = recv_msgs(&mut g, &mut c3, 1);
        (c3, Frame::decode(&a[0]).unwrap().unwrap().0)
    };
    assert!(
        matches!(
            answer,
            Frame::Refused {
                reason: Refusal::BadProof | Refusal::OutOfRange,
                ..
            }
        ),
        "{answer:?}"
    );
}

#[test]
fn a_guest_that_abandons_its_connection_parks_the_session_a_finished_one_ends() {
    let mut g = TestGuest::new("s-abandon");
    let listener = g.listen_stream(TARGET);
    let (conn, client) = open(&mut g, 40_000);
    let mut host = accept(&listener);
    // The client gives up on a live connection (SHUT_RDWR): parked, not closed.
    g.send_ctl(&conn, OP_SHUTDOWN, SHUTDOWN_RCV | SHUTDOWN_SEND);
    g.settle();
    assert_eq!(g.plane.parked_sessions(), 1);
    assert!(
        nothing_to_read(&mut host),
        "the host end must not see the abandonment"
    );
    let (mut c2, answer) = try_resume(&mut g, 41_000, &resume_frame(&client, 0, 1));
    assert!(matches!(answer, Frame::Resumed { .. }), "{answer:?}");
    // A graceful end: the guest shuts its write side (the host reads EOF), the host
    // answers and closes, the guest reads it all and closes: the session is over.
    g.send_ctl(&c2, OP_SHUTDOWN, SHUTDOWN_SEND);
    g.pump();
    assert!(reads_eof(&mut host));
    host.write_all(b"bye").unwrap();
    drop(host);
    let mut got = Vec::new();
    let mut saw_shutdown = false;
    let c = c2;
    g.pump_until("bye and the host's EOF", |g| {
        for p in g.take_rx_of(&c) {
            match p.hdr.op {
                OP_RW => got.extend_from_slice(&p.payload),
                OP_SHUTDOWN => saw_shutdown = true,
                op => panic!("unexpected op {op}"),
            }
        }
        saw_shutdown
    });
    assert_eq!(got, b"bye");
    c2.fwd_cnt = c2.fwd_cnt.wrapping_add(3);
    g.send_ctl(&c2, OP_SHUTDOWN, SHUTDOWN_RCV | SHUTDOWN_SEND);
    g.settle();
    assert_eq!(g.plane.parked_sessions(), 0);
    assert_eq!(g.plane.connections(), 0, "{:?}", g.stats());
}

#[test]
fn resumeds_lost_with_their_connections_do_not_lock_the_owner_out() {
    let mut g = TestGuest::new("s-lost-resumed");
    let listener = g.listen_stream(TARGET);
    let (_conn, client) = open(&mut g, 40_000);
    let _host = accept(&listener);
    g.plane.stop();
    for round in 0..3u32 {
        // RESUME accepted, but its answer never reaches the library (the device goes
        // before it is read: the guest never acknowledges it).
        let c = GuestConn {
            buf_alloc: 256 * 1024,
            ..GuestConn::stream(41_000 + round, SESSION_PORT)
        };
        g.connect(&c);
        g.send_rw(&c, &resume_frame(&client, 0, round as u8).encode());
        g.settle();
        let _unread = g.take_rx_of(&c);
        g.plane.stop();
    }
    assert_eq!(g.stat("sessions_resumed"), 3);
    // The library still holds the nonce of OPENED: it must still work.
    let (_c, answer) = try_resume(&mut g, 42_000, &resume_frame(&client, 0, 9));
    assert!(matches!(answer, Frame::Resumed { .. }), "{answer:?}");
}

#[test]
fn a_refused_resume_leaves_a_live_connection_alone() {
    let mut g = TestGuest::new("s-live-forged");
    let listener = g.listen_stream(TARGET);
    let (conn, client) = open(&mut g, 40_000);
    let mut host = accept(&listener);
    let forged = Client {
        secret: Secret([7; 32]),
        ..clone(&client)
    };
    let (_c, answer) = try_resume(&mut g, 41_000, &resume_frame(&forged, 0, 1));
    assert!(
        matches!(
            answer,
            Frame::Refused {
                reason: Refusal::BadProof,
                ..
            }
        ),
        "{answer:?}"
    );
    assert_eq!(
        g.stat("sessions_parked"),
        0,
        "the live connection was not touched"
    );
    g.send_rw(&conn, b"still live");
    g.pump();
    assert_eq!(read_n(&mut host, 10), b"still live");
}

#[test]
fn payload_in_the_batch_that_abandons_the_connection_is_kept() {
    let mut g = TestGuest::new("s-abandon-batch");
    let listener = g.listen_stream(TARGET);
    let (conn, client) = open(&mut g, 40_000);
    let mut host = accept(&listener);
    // One TX batch: data, then the guest gives up on the connection.
    g.send_rw(&conn, b"last words");
    g.send_ctl(&conn, OP_SHUTDOWN, SHUTDOWN_RCV | SHUTDOWN_SEND);
    g.pump();
    assert_eq!(g.plane.parked_sessions(), 1);
    assert_eq!(
        read_n(&mut host, 10),
        b"last words",
        "accepted bytes reach the host"
    );
    let (_c, answer) = try_resume(&mut g, 41_000, &resume_frame(&client, 0, 1));
    let Frame::Resumed { received, .. } = answer else {
        panic!("expected RESUMED, got {answer:?}");
    };
    assert_eq!(received, 10, "the daemon counts what it accepted");
}

#[test]
fn a_guest_that_half_closed_and_went_needs_no_resume() {
    let mut g = TestGuest::new("s-done");
    let listener = g.listen_stream(TARGET);
    let (conn, _client) = open(&mut g, 40_000);
    let mut host = accept(&listener);
    // More than the host socket takes at once: the rest waits in the outbox.
    let data = pattern(9, 200 * 1024);
    send_all(&mut g, &conn, &data);
    g.send_ctl(&conn, OP_SHUTDOWN, SHUTDOWN_SEND);
    g.pump();
    g.send_ctl(&conn, OP_RST, 0);
    g.pump();
    assert_eq!(g.plane.parked_sessions(), 0, "nothing to resume");
    let mut got = Vec::new();
    host.read_to_end(&mut got).unwrap();
    assert_eq!(got, data, "everything the guest sent, then EOF");
}

/// A guest migrated to another host: its parked session is exported from the first
/// engine (snapshot bytes plus its host end), validated on the way in, and imported into
/// the second, where the guest resumes it. Nothing is lost or repeated either way, the
/// host end never notices, and the first engine no longer knows the session.
#[test]
fn a_parked_session_moves_to_another_engine_and_resumes_there() {
    use domsock_host::engine::ExportedSession;
    use domsock_migration::session::snapshot::SessionSnapshot;
    let mut a = TestGuest::new("s-move-a");
    let listener = a.listen_stream(TARGET);
    let (mut conn, mut client) = open(&mut a, 40_000);
    let mut host = accept(&listener);
    let to_guest = pattern(3, 100 * 1024);
    let to_host = pattern(4, 100 * 1024);
    // As in the device-stop test: the guest app reads 24 KiB of 40 KiB, and of 56 KiB it
    // wrote, 48 KiB reached the daemon.
    host.write_all(&to_guest[..24 * 1024]).unwrap();
    let mut guest_got = a.recv_stream(&mut conn, 24 * 1024, true);
    host.write_all(&to_guest[24 * 1024..40 * 1024]).unwrap();
    a.settle();
    send_all(&mut a, &conn, &to_host[..48 * 1024]);
    let mut host_got = host_read_exact(&mut host, 48 * 1024);
    a.plane.stop();
    // Written while parked on A.
    host.write_all(&to_guest[40 * 1024..48 * 1024]).unwrap();
    a.settle();

    let exported = a.plane.export_parked(client.id).expect("parked on A");
    assert_eq!(a.plane.parked_sessions(), 0);
    assert_eq!(a.stat("sessions_exported"), 1);
    let bytes = exported.snapshot.encode();
    // The bytes cross hosts: the importer decodes (validates) them itself.
    let snapshot = SessionSnapshot::decode(&bytes, 256 * 1024).expect("valid snapshot");
    assert_eq!(snapshot.received, 48 * 1024);
    assert_eq!(
        snapshot.tail_start,
        24 * 1024,
        "what the guest acknowledged"
    );
    assert_eq!(snapshot.tail, &to_guest[24 * 1024..48 * 1024]);

    let mut b = TestGuest::new("s-move-b");
    let moved = ExportedSession {
        snapshot,
        ..exported
    };
    b.plane.import_parked(moved).expect("imported on B");
    assert_eq!(b.plane.parked_sessions(), 1);
    assert_eq!(b.stat("sessions_imported"), 1);
    // Written while parked on B: B's engine reads the host end now.
    host.write_all(&to_guest[48 * 1024..56 * 1024]).unwrap();
    b.settle();
    assert!(nothing_to_read(&mut host), "host saw EOF or data");

    // A does not know the session any more; B does.
    let (_, answer) = try_resume(&mut a, 41_000, &resume_frame(&client, 24 * 1024, 8));
    assert!(
        matches!(
            answer,
            Frame::Refused {
                reason: Refusal::UnknownSession,
                ..
            }
        ),
        "{answer:?}"
    );
    let (mut c2, answer, first) =
        resume_with_data(&mut b, 41_001, &resume_frame(&client, 24 * 1024, 9));
    let Frame::Resumed {
        received,
        next_nonce,
        ..
    } = answer
    else {
        panic!("expected RESUMED on B, got {answer:?}");
    };
    client.nonce = next_nonce;
    assert_eq!(received, 48 * 1024);
    let mut replay = first;
    let rest = 56 * 1024 - 24 * 1024 - replay.len();
    replay.extend(b.recv_stream(&mut c2, rest, true));
    guest_got.extend(replay);
    // The guest sends what B lacks, then more, and the host writes more.
    send_all(&mut b, &c2, &to_host[48 * 1024..]);
    host_got.extend(host_read_exact(&mut host, 52 * 1024));
    host.write_all(&to_guest[56 * 1024..]).unwrap();
    guest_got.extend(b.recv_stream(&mut c2, 44 * 1024, true));
    assert!(guest_got == to_guest, "host->guest across the move");
    assert!(host_got == to_host, "guest->host across the move");
    assert_eq!(b.stat("sessions_resumed"), 1);

    // The same session cannot be imported twice.
    let twin = ExportedSession {
        snapshot: SessionSnapshot::decode(&bytes, 256 * 1024).unwrap(),
        target: (Cid::HOST, domsock_proto::Port(TARGET)),
        host: domsock_host::host::HostSocket::pair(domsock_proto::SocketType::Stream)
            .unwrap()
            .0,
        out_stream: Vec::new(),
        out_msgs: Vec::new(),
        accepted: false,
    };
    assert_eq!(
        b.plane.import_parked(twin),
        Err(domsock_host::engine::ImportError::Exists(client.id))
    );
}

/// A guest that sends half a frame to the session port and then says nothing does not
/// keep the connection: it is reset at the greeting timeout (simulated time) and counted;
/// a complete greeting in time is answered as usual.
#[test]
fn a_greeting_never_completed_is_reset_at_its_timeout() {
    let mut g = TestGuest::new("s-greeting");
    let before = Instant::now();
    let conn = GuestConn {
        buf_alloc: 256 * 1024,
        ..GuestConn::stream(40_000, SESSION_PORT)
    };
    g.connect(&conn);
    let client = Client {
        id: SessionId([9; 16]),
        secret: Secret([9; 32]),
        nonce: Nonce([9; 16]),
        window: 0,
    };
    let resume = resume_frame(&client, 0, 1).encode();
    g.send_rw(&conn, &resume[..40]);
    g.settle();
    let after = Instant::now();
    g.pump_at(before + Duration::from_millis(4_900));
    assert!(
        !g.take_rx_of(&conn).iter().any(|p| p.hdr.op == OP_RST),
        "reset before the timeout"
    );
    assert_eq!(g.stat("session_greeting_timeouts"), 0);
    g.pump_at(after + Duration::from_millis(5_100));
    assert!(
        g.take_rx_of(&conn).iter().any(|p| p.hdr.op == OP_RST),
        "no reset at the timeout"
    );
    assert_eq!(g.stat("session_greeting_timeouts"), 1);
    assert_eq!(g.plane.connections(), 0);
    // A whole greeting later is answered (here: an unknown session).
    let (_c, answer) = try_resume(&mut g, 40_001, &resume_frame(&client, 0, 2));
    assert!(
        matches!(
            answer,
            Frame::Refused {
                reason: Refusal::UnknownSession,
                ..
            }
        ),
        "{answer:?}"
    );
}

/// A seqpacket session whose replay buffer is full of messages the guest consumed but did
/// not acknowledge (its buffer is large, so its kernel sends no credit update of its own)
/// asks the guest for a credit update instead of waiting forever, and then goes on.
#[test]
fn a_full_replay_buffer_asks_the_guest_for_credit() {
    const OP_CREDIT_REQUEST: u16 = 7;
    let mut g = TestGuest::new("s-seq-credit");
    let listener = g.listen_seqpacket(TARGET);
    let (conn, opened) = open_seqpacket(&mut g, 4 << 20);
    assert!(matches!(opened, Frame::Opened { .. }), "{opened:?}");
    let host = accept(&listener);
    let msg = |i: u32| pattern(200 + i, 60 * 1024);
    // More than the socket buffer holds: a writer thread blocks as a host process would.
    let writer = std::thread::spawn(move || {
        for i in 0..6 {
            nix::sys::socket::send(
                std::os::fd::AsRawFd::as_raw_fd(&host),
                &msg(i),
                nix::sys::socket::MsgFlags::empty(),
            )
            .unwrap();
        }
        host
    });
    // The guest takes what comes and says nothing until asked.
    let mut got: Vec<Vec<u8>> = Vec::new();
    let mut cur = Vec::new();
    let mut asked = 0;
    let c = conn;
    let mut fwd = conn.fwd_cnt;
    g.pump_until("six messages", |g| {
        for p in g.take_rx_of(&c) {
            if p.hdr.op == OP_CREDIT_REQUEST {
                asked += 1;
                let answer = GuestConn { fwd_cnt: fwd, ..c };
                g.send_ctl(&answer, OP_CREDIT_UPDATE, 0);
                continue;
            }
            assert_eq!(p.hdr.op, OP_RW, "unexpected {:?}", p.hdr);
            fwd = fwd.wrapping_add(p.hdr.len);
            cur.extend_from_slice(&p.payload);
            if p.hdr.flags & SEQ_EOM != 0 {
                got.push(std::mem::take(&mut cur));
            }
        }
        got.len() >= 6
    });
    for (i, m) in got.iter().enumerate() {
        assert!(*m == msg(i as u32), "message {i}");
    }
    assert!(asked >= 1, "the daemon never asked for credit");
    drop(writer.join().unwrap());
}

/// The same for a stream session: a guest with a large buffer that never acknowledges
/// on its own is asked, and gets everything (without the engine spinning meanwhile).
#[test]
fn a_full_stream_replay_buffer_asks_the_guest_for_credit() {
    const OP_CREDIT_REQUEST: u16 = 7;
    let mut g = TestGuest::new("s-stream-credit");
    let listener = g.listen_stream(TARGET);
    let (conn, _client) = open(&mut g, 40_000);
    let conn = GuestConn {
        buf_alloc: 4 << 20,
        ..conn
    };
    g.send_ctl(&conn, OP_CREDIT_UPDATE, 0);
    let mut host = accept(&listener);
    let data = pattern(9, 600 * 1024);
    let sent = data.clone();
    let writer = std::thread::spawn(move || {
        host.write_all(&sent).unwrap();
        host
    });
    let (mut got, mut asked, mut fwd) = (Vec::new(), 0, conn.fwd_cnt);
    g.pump_until("600 KiB", |g| {
        for p in g.take_rx_of(&conn) {
            if p.hdr.op == OP_CREDIT_REQUEST {
                asked += 1;
                g.send_ctl(
                    &GuestConn {
                        fwd_cnt: fwd,
                        ..conn
                    },
                    OP_CREDIT_UPDATE,
                    0,
                );
                continue;
            }
            assert_eq!(p.hdr.op, OP_RW, "unexpected {:?}", p.hdr);
            fwd = fwd.wrapping_add(p.hdr.len);
            got.extend_from_slice(&p.payload);
        }
        got.len() >= data.len()
    });
    assert!(got == data, "host->guest bytes");
    assert!(
        asked >= 2,
        "asked {asked} times for 600 KiB through a 256 KiB replay buffer"
    );
    drop(writer.join().unwrap());
}

/// `swap_session_host`, the sibling pair join's engine operation: a live session gets a
/// new host end with host bytes in front (the guest reads them first, then the new end's);
/// what the guest sends goes to the new end; the old end comes back with what the engine
/// had not read. Parked, the bytes in front join the replay: the guest's RESUME gets them.
#[test]
fn a_session_gets_a_new_host_end_with_in_flight_bytes_in_front() {
    use domsock_host::host::HostSocket;
    let mut g = TestGuest::new("s-swap");
    let _keepalive = register(&mut g, 39_000, 6000);
    let (mut host, mut conn, (id, secret, next_nonce, window)) =
        host_connects_offered(&mut g, 6000, b"old");

    host.write_all(b"unread").unwrap();
    let (mut new_host, engine_end) = UnixStream::pair().unwrap();
    let swapped = g
        .plane
        .swap_session_host(
            id,
            HostSocket::from_stream(engine_end).unwrap(),
            b" in flight",
        )
        .unwrap();
    assert!(!swapped.write_shut);
    new_host.write_all(b" new").unwrap();
    g.pump();
    assert_eq!(g.recv_stream(&mut conn, 14, true), b" in flight new");
    g.send_rw(&conn, b"to new");
    g.pump();
    assert_eq!(read_n(&mut new_host, 6), b"to new");
    assert!(nothing_to_read(&mut host), "nothing goes to the old end");
    let mut old = swapped.old;
    let mut buf = [0u8; 16];
    let n = old.read(&mut buf).unwrap();
    assert_eq!(
        &buf[..n],
        b"unread",
        "the old end keeps what the engine did not read"
    );

    // Parked: the bytes in front are replayed at the resume, before the new end's.
    g.plane.stop();
    assert_eq!(g.plane.parked_sessions(), 1);
    let (mut parked_host, engine_end) = UnixStream::pair().unwrap();
    g.plane
        .swap_session_host(id, HostSocket::from_stream(engine_end).unwrap(), b" parked")
        .unwrap();
    parked_host.write_all(b" after").unwrap();
    g.pump();
    let client = Client {
        id,
        secret,
        nonce: next_nonce,
        window,
    };
    let (mut c2, answer, mut data) =
        resume_with_data(&mut g, 41_000, &resume_frame(&client, 17, 1));
    assert!(
        matches!(answer, Frame::Resumed { received: 6, .. }),
        "{answer:?}"
    );
    let more = 13 - data.len();
    data.extend(g.recv_stream(&mut c2, more, true));
    assert_eq!(data, b" parked after");
    assert!(matches!(
        g.plane.swap_session_host(
            SessionId([0; 16]),
            HostSocket::from_stream(UnixStream::pair().unwrap().0).unwrap(),
            b""
        ),
        Err(domsock_host::engine::SwapError::NotFound(_))
    ));
}
