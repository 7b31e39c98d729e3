//! The basic stream cases against vhost-device-vsock 0.3.0, the peer backend, when it is
//! installed (`.cache/peer/bin/vhost-device-vsock` or `$DOMSOCK_PEER_BACKEND`; tests never
//! install it, `scripts/test.sh` does). Without it each case fails under CI (`CI=true`) and
//! elsewhere prints `SKIPPED: ...` and is listed in `target/test-skips.txt`
//! (`support::require`).
//!
//! Known gaps of 0.3.0, which these tests work around or accept: no seqpacket, a connect to
//! a port nobody listens on times out instead of being refused, and a host half-close
//! (`shutdown(SHUT_WR)`) reaches the guest as a full close, so the guest cannot answer.

mod support;

use domsock_guest::uvirtio::{Cid, EndpointConfig, GuestConfig, SockError, SocketType};
use std::time::{Duration, Instant};
use support::*;

fn peer(tag: &str, cids: &[u64]) -> Option<Backend> {
    peer_backend().map(|bin| Backend::spawn(&bin, tag, cids))
}

#[test]
fn peer_negotiation() {
    let Some(b) = peer("p-nego", &[3]) else {
        return;
    };
    let g = b.guest(0, GuestConfig::default());
    let n = g.negotiated();
    assert_eq!(g.cid(), Cid(3));
    assert!(n.cid_from_device);
    assert!(n.event_idx);
    assert!(!n.seqpacket, "0.3.0 has no seqpacket: {n:?}");
    let mut g = g;
    assert!(matches!(
        g.start_connect(host(1), SocketType::SeqPacket),
        Err(SockError::SeqpacketUnsupported)
    ));
}

#[test]
fn peer_streams_both_ways() {
    let Some(b) = peer("p-stream", &[3]) else {
        return;
    };
    let mut g = b.guest(0, GuestConfig::default());
    let t = stream_to_host(&mut g, &b.vm(0).uds, 5000, 64 << 20, 64 * 1024);
    eprintln!(
        "peer guest->host 64 MiB in 64 KiB writes: {:.1} MB/s",
        mbps(64 << 20, t)
    );
    stream_to_host(&mut g, &b.vm(0).uds, 5001, 3 << 20, 12_345);
    let t = stream_from_host_with(&mut g, &b.vm(0).uds, 6000, 32 << 20, 64 * 1024, false);
    eprintln!(
        "peer host->guest 32 MiB in 64 KiB writes: {:.1} MB/s",
        mbps(32 << 20, t)
    );
}

#[test]
fn peer_with_linux_6_1_rx_buffers() {
    let Some(b) = peer("p-layout", &[3]) else {
        return;
    };
    let cfg = GuestConfig {
        rx_layout: domsock_guest::uvirtio::RxLayout::LINUX_6_1,
        ..GuestConfig::default()
    };
    let mut g = b.guest(0, cfg);
    stream_to_host(&mut g, &b.vm(0).uds, 5100, 4 << 20, 40_000);
    stream_from_host_with(&mut g, &b.vm(0).uds, 6100, 4 << 20, 40_000, false);
}

#[test]
fn peer_closed_port_times_out() {
    let Some(b) = peer("p-closed", &[3]) else {
        return;
    };
    let cfg = GuestConfig {
        endpoint: EndpointConfig {
            connect_timeout: Duration::from_millis(300),
            ..EndpointConfig::default()
        },
        ..GuestConfig::default()
    };
    let mut g = b.guest(0, cfg);
    let start = Instant::now();
    let e = g
        .connect_timeout(host(9999), SocketType::Stream, STEP_TIMEOUT)
        .unwrap_err();
    eprintln!(
        "peer: connect to a closed port: {e} after {:?}",
        start.elapsed()
    );
    assert!(
        matches!(e, SockError::ConnectTimedOut(_) | SockError::Refused(_)),
        "{}",
        chain(&e)
    );
}

#[test]
fn throughput_report_peer() {
    let Some(b) = peer("p-tput", &[3]) else {
        return;
    };
    let mut g = b.guest(0, GuestConfig::default());
    report_throughput("vhost-device-vsock", &mut g, &b.vm(0).uds, 5500, false);
}
