//! The engine under simulated time: [`DataPlane::pump_at`] gets the instant from the test,
//! so timeouts are crossed by moving `now`, not by sleeping. Host sockets are real Unix
//! sockets; the guest is the user-space driver of `support/mod.rs`.
//!
//! Covered: the handshake, connect and close timeouts (each also checked not to fire early),
//! a connection that stays silent for a simulated hour, reordered (stale) credit updates,
//! a stalled host reader, and a device stop with timers pending.
//!
//! [`DataPlane::pump_at`]: domsock_host::engine::DataPlane::pump_at

mod support;

use std::io::{Read, Write};
use std::time::{Duration, Instant};
use support::*;

/// Default timeouts of domsockd's endpoint and handshake (proto `EndpointConfig`,
/// `tunables::HANDSHAKE_TIMEOUT_MS`).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const CLOSE_TIMEOUT: Duration = Duration::from_secs(8);
const HANDSHAKE_TIMEOUT: Duration = Duration::from_millis(5_000);
const MS: Duration = Duration::from_millis(1);

/// The host end sees EOF (or a reset) now, without waiting.
fn closed_now(s: &mut std::os::unix::net::UnixStream) -> bool {
    s.set_nonblocking(true).unwrap();
    let mut b = [0u8; 64];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue, // e.g. an ERROR line before the close
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
            Err(_) => return true,
        }
    }
}

#[test]
fn handshake_timeout_fires_at_five_seconds_not_before() {
    let mut g = TestGuest::new("t-handshake");
    let t0 = Instant::now();
    let mut host = std::os::unix::net::UnixStream::connect(g.dir().join("vs")).unwrap();
    host.write_all(b"CONN").unwrap(); // half a line, never finished
    g.pump_at(t0);
    assert_eq!(g.plane.pending_handshakes(), 1);
    g.pump_at(t0 + HANDSHAKE_TIMEOUT - MS);
    assert_eq!(g.plane.pending_handshakes(), 1, "dropped early");
    assert!(!closed_now(&mut host));
    assert_eq!(g.stat("bad_handshakes"), 0);
    g.pump_at(t0 + HANDSHAKE_TIMEOUT + MS);
    assert_eq!(
        g.plane.pending_handshakes(),
        0,
        "not dropped after the timeout"
    );
    assert!(closed_now(&mut host), "host end not closed");
    assert_eq!(g.stat("bad_handshakes"), 1);
    assert_eq!(g.stat("handshake_timeouts"), 1);
}

#[test]
fn connect_timeout_closes_the_host_end_when_the_guest_never_answers() {
    let mut g = TestGuest::new("t-connect");
    let t0 = Instant::now();
    let mut host = g.host_connect(7000);
    g.pump_at(t0);
    let reqs: Vec<_> = g
        .take_rx()
        .into_iter()
        .filter(|p| p.hdr.op == OP_REQUEST)
        .collect();
    assert_eq!(reqs.len(), 1, "the guest was asked");
    assert_eq!(g.plane.connections(), 1);
    g.pump_at(t0 + CONNECT_TIMEOUT - MS);
    assert_eq!(g.plane.connections(), 1, "timed out early");
    assert!(!closed_now(&mut host));
    g.pump_at(t0 + CONNECT_TIMEOUT + MS);
    assert_eq!(g.plane.connections(), 0, "connect never timed out");
    assert_eq!(g.stat("connect_timeouts"), 1);
    assert!(closed_now(&mut host), "host end not closed");
    // A late RESPONSE is for a connection that is gone: answered with RST.
    let conn = GuestConn::stream(7000, reqs[0].hdr.src_port);
    g.send_ctl(&conn, OP_RESPONSE, 0);
    g.pump_at(t0 + CONNECT_TIMEOUT + 2 * MS);
    assert!(g.take_rx_of(&conn).iter().any(|p| p.hdr.op == OP_RST));
}

#[test]
fn close_timeout_sends_rst_when_the_guest_never_acknowledges() {
    let mut g = TestGuest::new("t-close");
    let listener = g.listen_stream(5000);
    let t0 = Instant::now();
    let conn = GuestConn::stream(40_000, 5000);
    g.send_ctl(&conn, OP_REQUEST, 0);
    g.pump_at(t0);
    assert!(g.take_rx_of(&conn).iter().any(|p| p.hdr.op == OP_RESPONSE));
    let host = accept(&listener);
    drop(host); // the host closes both ways: the device shuts down toward the guest
    let mut shut_at = None;
    for i in 1..=50u32 {
        let t = t0 + MS * i;
        g.pump_at(t);
        if g.take_rx_of(&conn)
            .iter()
            .any(|p| p.hdr.op == OP_SHUTDOWN && p.hdr.flags == SHUTDOWN_RCV | SHUTDOWN_SEND)
        {
            shut_at = Some(t);
            break;
        }
        std::thread::yield_now();
    }
    let shut_at = shut_at.expect("no SHUTDOWN for the guest");
    // The guest never answers with RST.
    g.pump_at(shut_at + CLOSE_TIMEOUT - MS);
    assert!(
        !g.take_rx_of(&conn).iter().any(|p| p.hdr.op == OP_RST),
        "RST before the close timeout"
    );
    assert_eq!(g.plane.connections(), 1);
    g.pump_at(shut_at + CLOSE_TIMEOUT + MS);
    assert_eq!(
        g.take_rx_of(&conn)
            .iter()
            .filter(|p| p.hdr.op == OP_RST)
            .count(),
        1,
        "no RST after the close timeout"
    );
    assert_eq!(g.plane.connections(), 0);
    assert_eq!(g.stat("close_timeouts"), 1);
}

#[test]
fn an_idle_connection_survives_a_simulated_hour_and_a_stalled_reader() {
    let mut g = TestGuest::new("t-idle");
    let listener = g.listen_stream(5001);
    let t0 = Instant::now();
    let conn = GuestConn::stream(40_001, 5001);
    g.send_ctl(&conn, OP_REQUEST, 0);
    g.pump_at(t0);
    g.take_rx_of(&conn);
    let mut host = accept(&listener);
    // The host reader stalls while the guest sends more than the socket takes.
    let data = pattern(7, 600 * 1024);
    let mut sent = 0;
    let mut t = t0;
    while sent < data.len() {
        let n = (data.len() - sent).min(60 * 1024);
        // Keep to the device's credit: it advertises 256 KiB.
        if sent + n > DEVICE_BUF_ALLOC as usize {
            break;
        }
        g.send_rw(&conn, &data[sent..sent + n]);
        sent += n;
        t += MS;
        g.pump_at(t);
    }
    // An hour of silence: nothing times out an established connection.
    g.pump_at(t0 + Duration::from_secs(3600));
    assert_eq!(g.plane.connections(), 1);
    let mut seen = g.take_rx_of(&conn);
    assert!(seen.iter().all(|p| p.hdr.op != OP_RST));
    // The reader wakes up: everything arrives, in order, and the rest follows.
    let mut got = read_n(&mut host, sent);
    let later = t0 + Duration::from_secs(3601);
    g.send_ctl(&conn, OP_CREDIT_REQUEST, 0);
    g.pump_at(later);
    seen.extend(g.take_rx_of(&conn));
    assert!(
        seen.iter().any(|p| p.hdr.fwd_cnt as usize == sent),
        "the guest is told its data was consumed: {seen:?}"
    );
    g.send_rw(&conn, &data[sent..sent + 1000]);
    g.pump_at(later + MS);
    got.extend(read_n(&mut host, 1000));
    assert_eq!(got, data[..sent + 1000]);
    assert!(g.failures_since(&Default::default()).is_empty());
}

#[test]
fn stale_credit_updates_never_open_the_window_beyond_buf_alloc() {
    let mut g = TestGuest::new("t-credit");
    let listener = g.listen_stream(5002);
    let t0 = Instant::now();
    let mut conn = GuestConn::stream(40_002, 5002);
    conn.buf_alloc = 16 * 1024;
    g.send_ctl(&conn, OP_REQUEST, 0);
    g.pump_at(t0);
    g.take_rx_of(&conn);
    let mut host = accept(&listener);
    let data = pattern(11, 200 * 1024);
    host.write_all(&data).unwrap();
    let mut got = Vec::new();
    let mut fwd_updates: Vec<u32> = Vec::new();
    let mut t = t0;
    for round in 0..2000u32 {
        t += MS;
        g.pump_at(t);
        for p in g.take_rx_of(&conn) {
            if p.hdr.op == OP_RW {
                got.extend_from_slice(&p.payload);
            }
        }
        // Never more in flight than the window the guest gave.
        let consumed = got.len() as u32; // the guest consumes at once
        let told = fwd_updates.iter().copied().max().unwrap_or(0);
        assert!(
            got.len() as u32 - told <= conn.buf_alloc,
            "window overrun: {} received, {told} acknowledged",
            got.len()
        );
        if got.len() == data.len() {
            break;
        }
        // Acknowledge, then replay an older acknowledgement (reordered on the way).
        let fresh = GuestConn {
            fwd_cnt: consumed,
            ..conn
        };
        g.send_ctl(&fresh, OP_CREDIT_UPDATE, 0);
        fwd_updates.push(consumed);
        if round % 3 == 2 && fwd_updates.len() > 2 {
            let stale = GuestConn {
                fwd_cnt: fwd_updates[fwd_updates.len() - 3],
                ..conn
            };
            g.send_ctl(&stale, OP_CREDIT_UPDATE, 0);
        }
    }
    assert_eq!(got, data, "data lost or reordered");
}

#[test]
fn device_stop_with_timers_pending_leaves_nothing_behind() {
    let mut g = TestGuest::new("t-stop");
    let t0 = Instant::now();
    let mut pending_connect = g.host_connect(7001);
    let mut half_line = std::os::unix::net::UnixStream::connect(g.dir().join("vs")).unwrap();
    half_line.write_all(b"CONNECT 70").unwrap();
    g.pump_at(t0);
    assert_eq!(g.plane.connections(), 1);
    assert_eq!(g.plane.pending_handshakes(), 1);
    g.plane.stop();
    assert_eq!(g.plane.connections(), 0);
    assert_eq!(g.plane.pending_handshakes(), 0);
    assert!(closed_now(&mut pending_connect));
    assert!(closed_now(&mut half_line));
    // Deadlines that were pending fire into nothing: no RST, no counter.
    let before = g.stats();
    g.take_rx();
    g.pump_at(t0 + CLOSE_TIMEOUT + HANDSHAKE_TIMEOUT);
    assert!(g.take_rx().is_empty());
    assert_eq!(g.stat("bad_handshakes"), before["bad_handshakes"]);
    // And the device works again afterwards.
    let listener = g.listen_stream(5003);
    let conn = GuestConn::stream(40_003, 5003);
    g.send_ctl(&conn, OP_REQUEST, 0);
    g.pump_at(t0 + CLOSE_TIMEOUT + HANDSHAKE_TIMEOUT + MS);
    assert!(g.take_rx_of(&conn).iter().any(|p| p.hdr.op == OP_RESPONSE));
    let _ = accept(&listener);
}
