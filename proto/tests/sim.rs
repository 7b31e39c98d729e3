//! Simulated-time protocol tests of the public `Endpoint` API: two endpoints in memory (see
//! `harness`), applications that read at a controlled pace, no sleeping.

mod harness;

use domsock_proto::credit::CreditViolation;
use domsock_proto::packet::{HeaderBuilder, SEQ_EOM, SHUTDOWN_F_SEND};
use domsock_proto::{
    Cid, ConnError, ConnKey, DropReason, Endpoint, EndpointConfig, Header, Incoming, Op, Port,
    Shutdown, SocketType, State, Timeout, VsockAddr,
};
use harness::{flip, pattern, AcceptPolicy, End, Event, Rng, SideId, Sim};
use std::time::Duration;

use SideId::{Guest, Host};

const MIB: usize = 1 << 20;
const SERVICE: Port = Port(1024);

fn default_sim() -> Sim {
    Sim::new(EndpointConfig::default(), EndpointConfig::default())
}

/// Compares big buffers without printing them.
fn assert_bytes_eq(got: &[u8], want: &[u8], what: &str) {
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!("{what}: first difference at byte {i}");
    }
    assert_eq!(got.len(), want.len(), "{what}: length");
}

fn assert_no_violations(sim: &Sim) {
    for id in [Host, Guest] {
        let stats = sim.side(id).stats();
        assert_eq!(stats.credit_violations, 0, "{id:?}: {stats:?}");
        assert_eq!(stats.protocol_violations, 0, "{id:?}: {stats:?}");
        assert_eq!(stats.unknown_connection, 0, "{id:?}: {stats:?}");
    }
}

fn has_event(sim: &Sim, id: SideId, event: Event) -> bool {
    sim.side(id).events.contains(&event)
}

/// A hand-made packet from the host on `host_key` (as a misbehaving peer would send it).
fn forged(host_key: ConnKey, socket_type: SocketType, op: Op, len: u32, flags: u32) -> Header {
    HeaderBuilder::new(host_key.local, host_key.peer, op)
        .socket_type(socket_type)
        .len(len)
        .flags(flags)
        .credit(EndpointConfig::default().buf_alloc_bytes, 0)
        .build()
}

// 1. Credit exhaustion and recovery.

#[test]
fn credit_exhaustion_and_recovery_with_1mib_messages() {
    let mut sim = default_sim();
    let buf_alloc = sim.side(Guest).ep.config().buf_alloc_bytes;
    let (hkey, gkey) = sim.connect_established(Host, SERVICE, SocketType::Stream);
    // The connect timer was cancelled by the RESPONSE.
    assert_eq!(sim.side(Host).ep.poll_timeout(), None);
    assert_eq!(sim.side(Guest).ep.poll_timeout(), None);
    let reader = sim.flow_mut(Guest, gkey);
    reader.read_size = 4096;
    reader.reads_per_step = 1;

    let messages: Vec<Vec<u8>> = (0..4).map(|i| pattern(i, MIB)).collect();
    for m in &messages {
        sim.write(Host, hkey, m.clone(), false);
    }
    sim.run();

    let sender = sim.flow(Host, hkey);
    let receiver = sim.flow(Guest, gkey);
    assert_bytes_eq(&receiver.received, &messages.concat(), "stream bytes");
    assert_eq!(receiver.reads, (4 * MIB / 4096) as u64);

    // The window was used to the last byte, never beyond (the harness checks in-flight <=
    // buf_alloc after every step), and the sender sat at exactly zero credit.
    assert_eq!(sender.max_in_flight, buf_alloc);
    assert!(sender.zero_credit_stalls > 0);
    // Every time it was unblocked, a CREDIT_UPDATE had arrived (traffic is one-way, so no
    // other packet could have carried the guest's fwd_cnt).
    assert!(sender.resumes > 0);
    assert_eq!(sender.resumes_after_credit, sender.resumes);

    // Updates are elided: roughly one per half buffer consumed, not one per read.
    let updates = sim.side(Guest).sent(Op::CreditUpdate);
    assert_eq!(sender.credit_events, updates);
    let window_refills = (4 * MIB as u64 - u64::from(buf_alloc)) / u64::from(buf_alloc);
    assert!(
        updates >= window_refills,
        "{updates} updates cannot move 4 MiB"
    );
    assert!(
        updates * 16 <= receiver.reads,
        "{updates} CREDIT_UPDATEs for {} reads: not elided",
        receiver.reads
    );
    assert_eq!(sim.side(Guest).sent(Op::Rst), 0);
    assert_no_violations(&sim);
}

#[test]
fn credit_request_is_answered_even_when_an_update_would_be_elided() {
    let mut sim = default_sim();
    let (hkey, gkey) = sim.connect_established(Host, SERVICE, SocketType::Stream);
    sim.write(Host, hkey, pattern(1, 1000), false);
    sim.run();
    assert_eq!(sim.flow(Guest, gkey).read_total, 1000);
    // 1000 bytes consumed is far from half the buffer: no update was sent.
    assert_eq!(sim.side(Guest).sent(Op::CreditUpdate), 0);
    assert_eq!(
        sim.side(Host).ep.get(&hkey).unwrap().credit().in_flight(),
        1000
    );

    sim.side_mut(Host).ep.request_credit(&hkey);
    sim.run();
    assert_eq!(sim.side(Host).sent(Op::CreditRequest), 1);
    assert_eq!(sim.side(Guest).sent(Op::CreditUpdate), 1);
    assert_eq!(
        sim.side(Host).ep.get(&hkey).unwrap().credit().in_flight(),
        0
    );
    assert_no_violations(&sim);
}

// 2. Half close in each direction, full close, close timeout.

#[test]
fn half_close_each_direction_then_full_close() {
    let mut sim = default_sim();
    let buf_alloc = sim.side(Host).ep.config().buf_alloc_bytes as usize;

    // Connection 1: the host shuts SEND; the guest keeps sending (more than one window, so
    // credit must keep flowing on a half-closed connection).
    let (h1, g1) = sim.connect_established(Host, SERVICE, SocketType::Stream);
    sim.shutdown(Host, h1, Shutdown::SEND);
    sim.run();
    assert!(has_event(
        &sim,
        Guest,
        Event::Incoming(Incoming::PeerShutdown(g1, Shutdown::SEND))
    ));
    assert_eq!(sim.side(Host).ep.send_credit(&h1), 0);
    assert!(matches!(
        sim.side_mut(Host).ep.send_rw(&h1, 1, false, false),
        Err(ConnError::CannotSend {
            can_send: false,
            ..
        })
    ));
    let to_host = pattern(10, 3 * buf_alloc + 17);
    sim.write(Guest, g1, to_host.clone(), false);
    sim.run();
    assert_bytes_eq(
        &sim.flow(Host, h1).received,
        &to_host,
        "guest->host after host SHUT_WR",
    );

    // Connection 2: the reverse.
    let (h2, g2) = sim.connect_established(Host, Port(1025), SocketType::Stream);
    sim.shutdown(Guest, g2, Shutdown::SEND);
    sim.run();
    assert!(has_event(
        &sim,
        Host,
        Event::Incoming(Incoming::PeerShutdown(h2, Shutdown::SEND))
    ));
    assert_eq!(sim.side(Guest).ep.send_credit(&g2), 0);
    let to_guest = pattern(11, 3 * buf_alloc + 5);
    sim.write(Host, h2, to_guest.clone(), false);
    sim.run();
    assert_bytes_eq(
        &sim.flow(Guest, g2).received,
        &to_guest,
        "host->guest after guest SHUT_WR",
    );

    // Full close of connection 1, started by the host: the guest (an application that
    // closes on EOF) sees both directions shut and ends it with RST.
    sim.shutdown(Guest, g1, Shutdown::SEND);
    sim.run();
    sim.side_mut(Guest).close_on_peer_close = true;
    sim.side_mut(Host).close_on_peer_close = true;
    sim.shutdown(Host, h1, Shutdown::BOTH);
    assert_eq!(sim.side(Host).ep.get(&h1).unwrap().state(), State::Closing);
    sim.run();
    assert_eq!(sim.flow(Host, h1).end, Some(End::Closed));
    assert_eq!(sim.flow(Guest, g1).end, Some(End::LocalClose));
    assert!(has_event(&sim, Host, Event::Incoming(Incoming::Closed(h1))));
    assert_eq!(sim.side(Guest).sent(Op::Rst), 1);

    // Full close of connection 2, started by the guest.
    sim.shutdown(Guest, g2, Shutdown::BOTH);
    sim.run();
    assert_eq!(sim.flow(Guest, g2).end, Some(End::Closed));
    assert_eq!(sim.flow(Host, h2).end, Some(End::LocalClose));
    assert_eq!(sim.side(Host).sent(Op::Rst), 1);

    for id in [Host, Guest] {
        assert!(sim.side(id).ep.is_empty(), "{id:?} table not empty");
        assert_eq!(sim.side(id).ep.poll_timeout(), None, "{id:?} timer left");
        assert_eq!(sim.side(id).stats().close_timeouts, 0);
    }
    assert_no_violations(&sim);
}

#[test]
fn simultaneous_full_close() {
    let mut sim = default_sim();
    let (hkey, gkey) = sim.connect_established(Host, SERVICE, SocketType::Stream);
    sim.shutdown(Host, hkey, Shutdown::BOTH);
    sim.shutdown(Guest, gkey, Shutdown::BOTH);
    sim.run();
    // Each side sees the other's SHUTDOWN while closing, acknowledges with RST and is done;
    // the RSTs then meet unknown keys and die without replies.
    assert_eq!(sim.flow(Host, hkey).end, Some(End::Closed));
    assert_eq!(sim.flow(Guest, gkey).end, Some(End::Closed));
    assert_eq!(sim.side(Host).sent(Op::Rst), 1);
    assert_eq!(sim.side(Guest).sent(Op::Rst), 1);
    assert!(sim.side(Host).ep.is_empty() && sim.side(Guest).ep.is_empty());
    assert_no_violations(&sim);
}

#[test]
fn close_times_out_when_the_peer_application_never_closes() {
    let mut sim = default_sim();
    let close_timeout = sim.side(Host).ep.config().close_timeout;
    let (hkey, gkey) = sim.connect_established(Host, SERVICE, SocketType::Stream);

    let closed_at = sim.now();
    sim.shutdown(Host, hkey, Shutdown::BOTH);
    sim.run();
    // The guest endpoint learned of the close, but its application never closes.
    assert_eq!(sim.flow(Guest, gkey).peer_shutdown, Shutdown::BOTH);
    assert_eq!(
        sim.side(Host).ep.get(&hkey).unwrap().state(),
        State::Closing
    );
    let deadline = closed_at + close_timeout;
    assert_eq!(sim.side(Host).ep.poll_timeout(), Some(deadline));

    // Just before the deadline nothing happens.
    sim.advance(deadline - sim.now() - Duration::from_millis(1));
    assert!(sim.side(Host).ep.get(&hkey).is_some());
    assert_eq!(sim.advance_to_next_timeout(), Some(deadline));
    assert!(has_event(&sim, Host, Event::Timeout(Timeout::Close(hkey))));
    assert_eq!(sim.flow(Host, hkey).end, Some(End::CloseTimeout));
    assert_eq!(sim.side(Host).stats().close_timeouts, 1);
    assert!(sim.side(Host).ep.is_empty());

    // The timed-out side sends RST, which ends the guest's half of the connection.
    sim.run();
    assert_eq!(sim.side(Host).sent(Op::Rst), 1);
    assert_eq!(sim.flow(Guest, gkey).end, Some(End::Reset));
    assert!(sim.side(Guest).ep.is_empty());
    assert_no_violations(&sim);
}

#[test]
fn close_times_out_when_the_peer_is_unreachable() {
    let mut sim = default_sim();
    let close_timeout = sim.side(Host).ep.config().close_timeout;
    let (hkey, gkey) = sim.connect_established(Host, SERVICE, SocketType::Stream);

    sim.set_link(Host, false);
    let closed_at = sim.now();
    sim.shutdown(Host, hkey, Shutdown::BOTH);
    sim.run();
    assert_eq!(
        sim.advance_to_next_timeout(),
        Some(closed_at + close_timeout)
    );
    assert_eq!(sim.flow(Host, hkey).end, Some(End::CloseTimeout));
    sim.run();
    assert_eq!(sim.side(Host).sent(Op::Rst), 1);
    assert_eq!(sim.lost[0], 2, "SHUTDOWN and RST lost");
    assert!(sim.side(Host).ep.is_empty());

    // The guest still believes in the connection; its next packet meets an unknown key on
    // the host and is answered with RST.
    sim.set_link(Host, true);
    assert!(sim.flow(Guest, gkey).end.is_none());
    sim.write(Guest, gkey, b"anyone there?".to_vec(), false);
    sim.run();
    assert_eq!(sim.side(Host).stats().unknown_connection, 1);
    assert_eq!(sim.flow(Guest, gkey).end, Some(End::Reset));
    assert!(sim.side(Guest).ep.is_empty());
}

#[test]
fn data_racing_a_close_is_discarded_without_violations() {
    let mut sim = default_sim();
    sim.side_mut(Guest).close_on_peer_close = true;

    // SHUT_RD: data already on the wire is accounted and dropped; no more may be sent.
    let (h1, g1) = sim.connect_established(Host, SERVICE, SocketType::Stream);
    sim.write(Guest, g1, pattern(1, 100_000), false);
    sim.shutdown(Host, h1, Shutdown::RCV);
    sim.run();
    assert_eq!(sim.flow(Guest, g1).peer_shutdown, Shutdown::RCV);
    assert_eq!(sim.side(Guest).ep.send_credit(&g1), 0);
    assert_eq!(
        sim.flow(Guest, g1).sent_packets,
        2,
        "sent before the SHUTDOWN arrived"
    );
    assert!(sim.flow(Host, h1).received.is_empty());
    let receive_shut = Event::Incoming(Incoming::Dropped(DropReason::ReceiveShut));
    assert_eq!(sim.side(Host).count_events(|e| *e == receive_shut), 2);
    assert_eq!(sim.side(Host).ep.get(&h1).unwrap().credit().unconsumed(), 0);

    // Full close while the peer's data is in flight.
    let (h2, g2) = sim.connect_established(Host, Port(1025), SocketType::Stream);
    sim.write(Guest, g2, pattern(2, 100_000), false);
    sim.shutdown(Host, h2, Shutdown::BOTH);
    sim.run();
    assert_eq!(sim.side(Host).count_events(|e| *e == receive_shut), 4);
    assert_eq!(sim.flow(Host, h2).end, Some(End::Closed));
    assert_eq!(sim.flow(Guest, g2).end, Some(End::LocalClose));
    assert_eq!(sim.side(Host).ep.len(), 1);
    assert_eq!(sim.side(Guest).ep.len(), 1);
    assert_no_violations(&sim);
}

// 3. Unknown connections.

#[test]
fn unknown_connection_is_answered_with_rst() {
    let mut ep = Endpoint::new(EndpointConfig::default());
    let host_key = ConnKey {
        local: VsockAddr::new(Cid::HOST, Port(5000)),
        peer: VsockAddr::new(Cid(3), SERVICE),
    };
    let cases = [
        (SocketType::Stream, Op::Rw, 100, 0),
        (SocketType::Stream, Op::Shutdown, 0, SHUTDOWN_F_SEND),
        (SocketType::Stream, Op::CreditRequest, 0, 0),
        (SocketType::Stream, Op::CreditUpdate, 0, 0),
        (SocketType::Stream, Op::Response, 0, 0),
        (SocketType::SeqPacket, Op::Rw, 7, SEQ_EOM),
    ];
    for (n, (socket_type, op, len, flags)) in cases.into_iter().enumerate() {
        let hdr = forged(host_key, socket_type, op, len, flags);
        assert_eq!(
            ep.handle(&hdr),
            Incoming::Dropped(DropReason::UnknownConnection)
        );
        let rst = ep.poll_transmit().expect("an RST reply");
        assert_eq!(rst.op(), Op::Rst);
        assert_eq!(
            (rst.src(), rst.dst()),
            (hdr.dst(), hdr.src()),
            "addresses swapped"
        );
        assert_eq!(rst.socket_type(), socket_type);
        assert_eq!((rst.len(), rst.flags()), (0, 0));
        assert_eq!(ep.poll_transmit(), None);
        assert!(ep.is_empty());
        assert_eq!(ep.stats().unknown_connection, n as u64 + 1);
    }

    // An RST to an unknown key is not answered (no RST ping-pong) and not counted.
    let rst = forged(host_key, SocketType::Stream, Op::Rst, 0, 0);
    assert_eq!(
        ep.handle(&rst),
        Incoming::Dropped(DropReason::UnknownConnection)
    );
    assert_eq!(ep.poll_transmit(), None);
    assert_eq!(ep.stats().unknown_connection, cases.len() as u64);
}

#[test]
fn unknown_connection_rst_ends_in_one_round_trip() {
    let mut sim = default_sim();
    let host_key = ConnKey {
        local: VsockAddr::new(Cid::HOST, Port(5000)),
        peer: VsockAddr::new(Cid(3), SERVICE),
    };
    sim.inject(
        Host,
        forged(host_key, SocketType::Stream, Op::Rw, 3, 0),
        vec![1, 2, 3],
    );
    sim.inject(
        Host,
        forged(host_key, SocketType::Stream, Op::CreditRequest, 0, 0),
        vec![],
    );
    sim.run();
    assert_eq!(sim.side(Guest).sent(Op::Rst), 2);
    assert_eq!(sim.side(Guest).stats().unknown_connection, 2);
    // The host has no such connection either: the RSTs are dropped silently.
    assert_eq!(sim.side(Host).sent_ops.values().sum::<u64>(), 0);
    assert_eq!(sim.side(Host).stats().unknown_connection, 0);
    assert_eq!(
        sim.side(Host).count_events(
            |e| *e == Event::Incoming(Incoming::Dropped(DropReason::UnknownConnection))
        ),
        2
    );
}

#[test]
fn rst_replies_are_bounded() {
    let config = EndpointConfig {
        max_queued_rsts: 4,
        ..EndpointConfig::default()
    };
    let mut ep = Endpoint::new(config);
    for port in 0..10 {
        let key = ConnKey {
            local: VsockAddr::new(Cid::HOST, Port(6000 + port)),
            peer: VsockAddr::new(Cid(3), SERVICE),
        };
        ep.handle(&forged(key, SocketType::Stream, Op::CreditUpdate, 0, 0));
    }
    let replies = std::iter::from_fn(|| ep.poll_transmit()).count();
    assert_eq!(replies, 4);
    assert_eq!(ep.stats().rst_queue_overflow, 6);
    assert_eq!(ep.stats().unknown_connection, 10);
}

// 4. Port reuse.

#[test]
fn port_reuse_after_rst() {
    let mut sim = default_sim();
    sim.side_mut(Guest).listen(SERVICE, AcceptPolicy::Accept);
    let port = Port(5000);

    let exchange = |sim: &mut Sim, hkey: ConnKey, seed: u64| {
        let gkey = flip(hkey);
        let (up, down) = (pattern(seed, 70_000), pattern(seed + 100, 50_000));
        sim.write(Host, hkey, up.clone(), false);
        sim.write(Guest, gkey, down.clone(), false);
        sim.run();
        assert_bytes_eq(&sim.flow(Guest, gkey).received, &up, "host->guest");
        assert_bytes_eq(&sim.flow(Host, hkey).received, &down, "guest->host");
    };

    // Round 1: the host resets.
    let k1 = sim
        .connect(Host, Some(port), SERVICE, SocketType::Stream)
        .unwrap();
    sim.run();
    exchange(&mut sim, k1, 1);
    assert_eq!(
        sim.connect(Host, Some(port), SERVICE, SocketType::Stream),
        Err(ConnError::InUse(k1))
    );
    sim.reset(Host, k1);
    sim.run();
    assert_eq!(sim.flow(Guest, flip(k1)).end, Some(End::Reset));

    // Round 2: same local port, same peer; this time the guest resets.
    let k2 = sim
        .connect(Host, Some(port), SERVICE, SocketType::Stream)
        .unwrap();
    assert_eq!(k2, k1);
    sim.run();
    exchange(&mut sim, k2, 2);
    sim.reset(Guest, flip(k2));
    sim.run();
    assert_eq!(sim.flow(Host, k2).end, Some(End::Reset));

    // Round 3: reset and reconnect before anything reached the wire; the RST goes out first,
    // so the guest sees the old connection die, then the new request.
    let k3 = sim
        .connect(Host, Some(port), SERVICE, SocketType::Stream)
        .unwrap();
    sim.run();
    sim.reset(Host, k3);
    let k4 = sim
        .connect(Host, Some(port), SERVICE, SocketType::Stream)
        .unwrap();
    let events_before = sim.side(Guest).events.len();
    sim.run();
    assert_eq!(
        sim.side(Guest).events[events_before..],
        [
            Event::Incoming(Incoming::Reset(flip(k3))),
            Event::Incoming(Incoming::Request(forged_request(
                k4,
                sim.side(Host).ep.config().buf_alloc_bytes
            ))),
            Event::Accepted(flip(k4)),
        ]
    );
    exchange(&mut sim, k4, 3);
    assert_eq!(sim.side(Guest).old_flows.len(), 3);
    assert_eq!(sim.side(Guest).ep.len(), 1);
    assert_no_violations(&sim);
}

/// The REQUEST a fresh `connect` on `key` sends.
fn forged_request(key: ConnKey, buf_alloc: u32) -> Header {
    Header::control(key, SocketType::Stream, Op::Request, 0).with_credit(buf_alloc, 0)
}

// 5. Seqpacket boundaries.

/// Sends `sizes` as seqpacket messages from the guest (4 KiB packets, like a Linux guest)
/// while the host application reads `read_size` bytes at a time, and checks boundaries.
fn seqpacket_boundaries(buf_alloc: u32, sizes: &[usize], read_size: usize, exact_split: bool) {
    let config = EndpointConfig {
        buf_alloc_bytes: buf_alloc,
        ..EndpointConfig::default()
    };
    let mut sim = Sim::new(config.clone(), config);
    sim.side_mut(Guest).max_packet = 4096;
    let (gkey, hkey) = sim.connect_established(Guest, SERVICE, SocketType::SeqPacket);
    let reader = sim.flow_mut(Host, hkey);
    reader.read_size = read_size;
    reader.reads_per_step = 8;

    let messages: Vec<(Vec<u8>, bool)> = sizes
        .iter()
        .enumerate()
        .map(|(i, &len)| (pattern(100 + i as u64, len), i % 2 == 1))
        .collect();
    for (data, eor) in &messages {
        sim.write(Guest, gkey, data.clone(), *eor);
    }
    sim.run();

    let flow = sim.flow(Host, hkey);
    assert_eq!(flow.messages.len(), messages.len());
    for (i, (got, (want, eor))) in flow.messages.iter().zip(&messages).enumerate() {
        assert_eq!(got.len, want.len(), "message {i} length");
        assert_bytes_eq(&got.data, want, &format!("message {i}"));
        assert_eq!(got.eor, *eor, "message {i} EOR");
    }
    // Reads were partial, and an end of message was reported once per message.
    let min_reads: usize = sizes.iter().map(|s| s.div_ceil(read_size).max(1)).sum();
    assert!(flow.reads >= min_reads as u64);
    assert_eq!(flow.eom_reads, messages.len() as u64);

    // On the wire: only the last packet of each message carries EOM (and EOR, if set).
    let mut packets = flow.rx_packets.iter();
    for (i, (want, eor)) in messages.iter().enumerate() {
        let mut total = 0;
        let mut count = 0;
        loop {
            let p = packets
                .next()
                .unwrap_or_else(|| panic!("message {i} truncated"));
            total += p.len as usize;
            count += 1;
            if p.eom {
                assert_eq!(p.eor, *eor, "message {i} EOR flag");
                break;
            }
            assert!(!p.eor, "EOR without EOM in message {i}");
        }
        assert_eq!(total, want.len(), "message {i}: EOM not at its end");
        if exact_split {
            assert_eq!(
                count,
                want.len().div_ceil(4096).max(1),
                "message {i} packets"
            );
        }
    }
    assert!(packets.next().is_none());
    assert_no_violations(&sim);
}

#[test]
fn seqpacket_boundaries_across_partial_reads() {
    let sizes = [1, 4095, 4096, 4097, 65536, MIB];
    seqpacket_boundaries(2 * MIB as u32, &sizes, 1000, true);
}

#[test]
fn seqpacket_messages_larger_than_the_credit_window() {
    // Messages span several credit windows; the reader consumes partial messages.
    let sizes = [1, 4095, 4096, 4097, 65536, 200_000, 3];
    seqpacket_boundaries(16 * 1024, &sizes, 777, false);
}

#[test]
fn seqpacket_whole_message_consumer_does_not_stall() {
    // A consumer that can only take whole messages holds a partial message while it waits
    // for the rest: the credit it frees by taking the previous message must reach the sender
    // even when that is less than half the buffer, or both sides wait forever.
    let mut sim = default_sim();
    let buf_alloc = sim.side(Host).ep.config().buf_alloc_bytes as usize;
    let (gkey, hkey) = sim.connect_established(Guest, SERVICE, SocketType::SeqPacket);
    sim.flow_mut(Host, hkey).whole_messages = true;
    let sizes = [
        100_000,
        200_000,
        10_000,
        buf_alloc - 4096,
        buf_alloc,
        1,
        buf_alloc / 2 + 1,
    ];
    let messages: Vec<Vec<u8>> = sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| pattern(i as u64, n))
        .collect();
    for m in &messages {
        sim.write(Guest, gkey, m.clone(), false);
    }
    sim.run();
    let flow = sim.flow(Host, hkey);
    assert_eq!(
        flow.messages.len(),
        messages.len(),
        "stalled: {} bytes unread",
        flow.unread
    );
    for (i, (got, want)) in flow.messages.iter().zip(&messages).enumerate() {
        assert_bytes_eq(&got.data, want, &format!("message {i}"));
    }
    assert_eq!(flow.reads, messages.len() as u64);
    assert_no_violations(&sim);
}

// 6. Connect refused, connect timeout.

#[test]
fn connect_refused() {
    let mut sim = default_sim();
    let key = sim
        .connect(Host, None, Port(7777), SocketType::Stream)
        .unwrap();
    assert_eq!(sim.side(Host).ep.send_credit(&key), 0);
    sim.run();
    assert!(has_event(&sim, Host, Event::Incoming(Incoming::Reset(key))));
    assert_eq!(sim.flow(Host, key).end, Some(End::Reset));
    assert!(!sim.flow(Host, key).established);
    assert!(sim.side(Host).ep.is_empty());
    assert_eq!(
        sim.side(Host).ep.poll_timeout(),
        None,
        "connect timer not cancelled"
    );
    assert_eq!(sim.side(Guest).sent(Op::Rst), 1);
    assert!(sim.side(Guest).ep.is_empty());
    assert_no_violations(&sim);
}

#[test]
fn connect_timeout() {
    let mut sim = default_sim();
    let connect_timeout = sim.side(Host).ep.config().connect_timeout;
    sim.side_mut(Guest).listen(Port(7777), AcceptPolicy::Ignore);
    let started = sim.now();
    let key = sim
        .connect(Host, None, Port(7777), SocketType::Stream)
        .unwrap();
    sim.run();
    assert_eq!(
        sim.side(Guest)
            .count_events(|e| matches!(e, Event::Incoming(Incoming::Request(_)))),
        1
    );
    assert_eq!(
        sim.side(Host).ep.get(&key).unwrap().state(),
        State::Connecting
    );
    let deadline = started + connect_timeout;
    assert_eq!(sim.side(Host).ep.poll_timeout(), Some(deadline));

    sim.advance(deadline - sim.now() - Duration::from_millis(1));
    assert!(sim.side(Host).ep.get(&key).is_some());
    assert_eq!(sim.advance_to_next_timeout(), Some(deadline));
    assert!(has_event(&sim, Host, Event::Timeout(Timeout::Connect(key))));
    assert_eq!(sim.flow(Host, key).end, Some(End::ConnectTimeout));
    assert!(sim.side(Host).ep.is_empty());
    assert_eq!(sim.side(Host).ep.poll_timeout(), None);
    assert_eq!(sim.side(Host).stats().connect_timeouts, 1);

    // The host tells the guest it gave up; the guest has nothing to reset and stays quiet.
    sim.run();
    assert_eq!(sim.side(Host).sent(Op::Rst), 1);
    assert_eq!(sim.side(Guest).sent_ops.values().sum::<u64>(), 0);

    // A RESPONSE arriving after the timeout meets an unknown key and is answered with RST.
    let late = Header::control(flip(key), SocketType::Stream, Op::Response, 0).with_credit(4096, 0);
    sim.inject(Guest, late, vec![]);
    sim.run();
    assert_eq!(sim.side(Host).sent(Op::Rst), 2);
    assert_eq!(sim.side(Host).stats().unknown_connection, 1);
}

// 7. Protocol violations.

#[test]
fn protocol_violations_reset_only_the_offending_connection() {
    let mut sim = default_sim();
    sim.set_chaos(7, 60);
    let buf_alloc = sim.side(Guest).ep.config().buf_alloc_bytes;
    let (bh, bg) = sim.connect_established(Host, Port(2000), SocketType::Stream);
    let mut bystander_up = Vec::new();
    let mut bystander_down = Vec::new();
    let mut keep_bystander_busy = |sim: &mut Sim, seed: u64| {
        let (up, down) = (pattern(seed, 150_000), pattern(seed + 1, 90_000));
        sim.write(Host, bh, up.clone(), false);
        sim.write(Guest, bg, down.clone(), false);
        bystander_up.extend(up);
        bystander_down.extend(down);
    };

    // Data beyond the credit the guest gave.
    let (vh, vg) = sim.connect_established(Host, SERVICE, SocketType::Stream);
    sim.flow_mut(Guest, vg).reads_per_step = 0;
    sim.write(Host, vh, pattern(1, buf_alloc as usize), false);
    keep_bystander_busy(&mut sim, 10);
    sim.run();
    assert_eq!(
        sim.side(Guest).ep.get(&vg).unwrap().credit().unconsumed(),
        buf_alloc
    );
    assert_eq!(sim.side(Host).ep.send_credit(&vh), 0);
    sim.inject(
        Host,
        forged(vh, SocketType::Stream, Op::Rw, 1, 0),
        vec![0xAA],
    );
    keep_bystander_busy(&mut sim, 20);
    sim.run();
    let violation = CreditViolation { len: 1, free: 0 };
    assert_eq!(
        sim.flow(Guest, vg).end,
        Some(End::Violation(DropReason::CreditViolation(violation)))
    );
    assert_eq!(sim.side(Guest).stats().credit_violations, 1);
    assert_eq!(sim.flow(Host, vh).end, Some(End::Reset));

    // Data after the peer's SHUTDOWN(SEND).
    let (vh, vg) = sim.connect_established(Host, SERVICE, SocketType::Stream);
    sim.shutdown(Host, vh, Shutdown::SEND);
    keep_bystander_busy(&mut sim, 30);
    sim.run();
    assert_eq!(sim.flow(Guest, vg).peer_shutdown, Shutdown::SEND);
    sim.inject(
        Host,
        forged(vh, SocketType::Stream, Op::Rw, 10, 0),
        vec![0; 10],
    );
    sim.run();
    assert_eq!(
        sim.flow(Guest, vg).end,
        Some(End::Violation(DropReason::ProtocolViolation))
    );
    assert_eq!(sim.side(Guest).stats().protocol_violations, 1);
    assert_eq!(sim.flow(Host, vh).end, Some(End::Reset));

    // A packet whose socket type differs from the connection's.
    let (vh, vg) = sim.connect_established(Host, SERVICE, SocketType::Stream);
    keep_bystander_busy(&mut sim, 40);
    sim.inject(
        Host,
        forged(vh, SocketType::SeqPacket, Op::Rw, 5, SEQ_EOM),
        vec![0; 5],
    );
    sim.run();
    assert_eq!(
        sim.flow(Guest, vg).end,
        Some(End::Violation(DropReason::TypeMismatch))
    );
    assert_eq!(sim.side(Guest).stats().protocol_violations, 2);
    assert_eq!(sim.flow(Host, vh).end, Some(End::Reset));

    // A RESPONSE on an established connection, and a REQUEST on a live key.
    for op in [Op::Response, Op::Request] {
        let (vh, vg) = sim.connect_established(Host, SERVICE, SocketType::Stream);
        keep_bystander_busy(&mut sim, 50 + op.to_wire() as u64);
        sim.inject(Host, forged(vh, SocketType::Stream, op, 0, 0), vec![]);
        sim.run();
        assert_eq!(
            sim.flow(Guest, vg).end,
            Some(End::Violation(DropReason::ProtocolViolation))
        );
        assert_eq!(sim.flow(Host, vh).end, Some(End::Reset));
    }
    assert_eq!(sim.side(Guest).stats().protocol_violations, 4);

    // The bystander never noticed.
    for (id, key) in [(Host, bh), (Guest, bg)] {
        assert_eq!(
            sim.side(id).ep.get(&key).unwrap().state(),
            State::Established
        );
        assert!(sim.flow(id, key).end.is_none());
    }
    assert_bytes_eq(
        &sim.flow(Guest, bg).received,
        &bystander_up,
        "bystander host->guest",
    );
    assert_bytes_eq(
        &sim.flow(Host, bh).received,
        &bystander_down,
        "bystander guest->host",
    );
    assert_eq!(sim.side(Host).ep.len(), 1);
    assert_eq!(sim.side(Guest).ep.len(), 1);
    assert_eq!(sim.side(Host).stats().protocol_violations, 0);
    assert_eq!(sim.side(Host).stats().credit_violations, 0);
}

// 8. Many connections.

#[test]
fn many_concurrent_connections_within_the_table_bound() {
    let guest_config = EndpointConfig {
        max_connections: 300,
        ..EndpointConfig::default()
    };
    let mut sim = Sim::new(EndpointConfig::default(), guest_config);
    sim.set_chaos(0xC0FFEE, 50);
    sim.side_mut(Guest).listen(SERVICE, AcceptPolicy::Accept);
    sim.side_mut(Host).listen(Port(9), AcceptPolicy::Accept);

    let keys: Vec<ConnKey> = (0..310)
        .map(|_| {
            sim.connect(Host, None, SERVICE, SocketType::Stream)
                .unwrap()
        })
        .collect();
    let ports: std::collections::HashSet<Port> = keys.iter().map(|k| k.local.port).collect();
    assert_eq!(ports.len(), keys.len(), "ephemeral ports must be distinct");
    sim.run();

    let connected: Vec<ConnKey> = keys
        .iter()
        .copied()
        .filter(|k| sim.flow(Host, *k).established)
        .collect();
    let refused = keys
        .iter()
        .filter(|k| sim.flow(Host, **k).end == Some(End::Reset))
        .count();
    assert_eq!(connected.len(), 300);
    assert_eq!(refused, 10);
    // The endpoint itself turned the extra REQUESTs away with RST; none reached `accept`.
    let guest = sim.side(Guest);
    assert_eq!(
        guest.count_events(|e| matches!(e, Event::Incoming(Incoming::Request(_)))),
        300
    );
    assert_eq!(
        guest.count_events(|e| matches!(e, Event::AcceptFailed(_))),
        0
    );
    assert_eq!(
        guest.count_events(|e| *e == Event::Incoming(Incoming::Dropped(DropReason::NoAction))),
        10
    );
    assert_eq!(guest.sent(Op::Rst), 10);
    assert_eq!(sim.side(Guest).ep.len(), 300);
    assert_eq!(sim.side(Host).ep.len(), 300);
    // The guest's own table is full too.
    assert_eq!(
        sim.connect(Guest, None, Port(9), SocketType::Stream),
        Err(ConnError::TableFull { max: 300 })
    );

    let sizes = |i: usize| (1000 + i * 37 % 5000, 500 + i * 53 % 3000);
    for (i, &k) in connected.iter().enumerate() {
        let (up, down) = sizes(i);
        sim.write(Host, k, pattern(i as u64, up), false);
        sim.write(Guest, flip(k), pattern(1_000_000 + i as u64, down), false);
    }
    sim.run();
    for (i, &k) in connected.iter().enumerate() {
        let (up, down) = sizes(i);
        assert_bytes_eq(
            &sim.flow(Guest, flip(k)).received,
            &pattern(i as u64, up),
            "up",
        );
        assert_bytes_eq(
            &sim.flow(Host, k).received,
            &pattern(1_000_000 + i as u64, down),
            "down",
        );
    }

    sim.side_mut(Guest).close_on_peer_close = true;
    for &k in &connected {
        sim.shutdown(Host, k, Shutdown::BOTH);
    }
    sim.run();
    assert!(connected
        .iter()
        .all(|k| sim.flow(Host, *k).end == Some(End::Closed)));
    assert!(sim.side(Host).ep.is_empty());
    assert!(sim.side(Guest).ep.is_empty());
    assert_no_violations(&sim);
}

// 9. Free-running counters wrap.

#[test]
fn counters_wrap_past_4_gib() {
    const TOTAL: u64 = 5 << 30;
    let mut sim = default_sim();
    let buf_alloc = sim.side(Guest).ep.config().buf_alloc_bytes;
    let (hkey, gkey) = sim.connect_established(Host, SERVICE, SocketType::Stream);
    let reader = sim.flow_mut(Guest, gkey);
    reader.read_size = 64 * 1024;
    reader.reads_per_step = 4;
    // Payload modelled as lengths only; each packet still carries its stream offset, which
    // the receiver checks, so order and completeness are verified.
    for _ in 0..TOTAL / MIB as u64 {
        sim.write_len(Host, hkey, MIB);
    }
    sim.run();

    let sender = sim.flow(Host, hkey);
    let receiver = sim.flow(Guest, gkey);
    assert_eq!(sender.sent_bytes, TOTAL);
    assert_eq!(receiver.rx_total, TOTAL);
    assert_eq!(receiver.read_total, TOTAL);
    assert_eq!(sender.max_in_flight, buf_alloc);
    let guest_conn = sim.side(Guest).ep.get(&gkey).unwrap();
    assert_eq!(
        u64::from(guest_conn.credit().fwd_cnt()),
        TOTAL % (1 << 32),
        "fwd_cnt wrapped"
    );
    assert_eq!(guest_conn.credit().unconsumed(), 0);

    // After an explicit credit request the sender sees the whole window again.
    sim.side_mut(Host).ep.request_credit(&hkey);
    sim.run();
    assert_eq!(
        sim.side(Host).ep.get(&hkey).unwrap().credit().in_flight(),
        0
    );
    assert_eq!(sim.side(Host).ep.send_credit(&hkey), buf_alloc);
    assert_no_violations(&sim);
}

// Randomized: many connections of both types in both directions, random pacing, delayed and
// reordered delivery across connections, some resets mid-transfer, then closes.

/// `DOMSOCK_SOAK_SEEDS=1000 cargo test --release -p domsock-proto chaos_soak` runs longer.
#[test]
fn chaos_soak() {
    let seeds = std::env::var("DOMSOCK_SOAK_SEEDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(6);
    for seed in 0..seeds {
        chaos_soak_one(seed);
    }
}

fn chaos_soak_one(seed: u64) {
    let mut rng = Rng::new(seed);
    let mut config = || EndpointConfig {
        buf_alloc_bytes: 16 * 1024 + rng.below(64 * 1024) as u32,
        ..EndpointConfig::default()
    };
    let (host_config, guest_config) = (config(), config());
    let mut sim = Sim::new(host_config, guest_config);
    sim.set_chaos(seed, 30 + rng.below(70));
    for id in [Host, Guest] {
        let side = sim.side_mut(id);
        side.listen(SERVICE, AcceptPolicy::Accept);
        side.close_on_peer_close = true;
        side.max_packet = if rng.chance(50) { 4096 } else { 64 * 1024 };
    }

    let mut conns = Vec::new();
    for _ in 0..40 {
        let from = if rng.chance(50) { Host } else { Guest };
        let socket_type = if rng.chance(50) {
            SocketType::Stream
        } else {
            SocketType::SeqPacket
        };
        let key = sim.connect(from, None, SERVICE, socket_type).unwrap();
        conns.push((from, key, socket_type));
    }
    sim.run();

    // (side, key, messages written) for both ends of every connection.
    let mut written = Vec::new();
    for &(from, key, socket_type) in &conns {
        assert!(
            sim.flow(from, key).established,
            "seed {seed}: {key} not established"
        );
        for (id, k) in [(from, key), (from.other(), flip(key))] {
            let reader_buf_alloc = u64::from(sim.side(id.other()).ep.config().buf_alloc_bytes);
            let reader = sim.flow_mut(id.other(), flip(k));
            reader.read_size = 512 + rng.below(20_000) as usize;
            reader.reads_per_step = 1 + rng.below(4) as usize;
            // A whole-message reader can only take messages that fit its buffer.
            reader.whole_messages = socket_type == SocketType::SeqPacket && rng.chance(50);
            let max_len = if reader.whole_messages {
                reader_buf_alloc
            } else {
                50_000
            };
            let mut msgs = Vec::new();
            for _ in 0..rng.below(5) {
                let data = pattern(rng.next_u64(), 1 + rng.below(max_len) as usize);
                let eor = rng.chance(50);
                sim.write(id, k, data.clone(), eor);
                msgs.push((data, eor));
            }
            written.push((id, k, msgs));
        }
    }
    // Readers stall now and then, like a forwarder whose output is blocked.
    let mut paused = Vec::new();
    for _ in 0..rng.below(300) {
        if rng.chance(10) {
            let (from, key, _) = conns[rng.below(conns.len() as u64) as usize];
            let (id, k) = if rng.chance(50) {
                (from, key)
            } else {
                (from.other(), flip(key))
            };
            if sim.flow(id, k).end.is_none() && sim.flow(id, k).reads_per_step > 0 {
                let reader = sim.flow_mut(id, k);
                paused.push((id, k, reader.reads_per_step));
                reader.reads_per_step = 0;
            }
        }
        if rng.chance(10) && !paused.is_empty() {
            let (id, k, reads) = paused.swap_remove(rng.below(paused.len() as u64) as usize);
            sim.flow_mut(id, k).reads_per_step = reads;
        }
        sim.step();
    }
    for (id, k, reads) in paused {
        sim.flow_mut(id, k).reads_per_step = reads;
    }
    let mut doomed: Vec<(SideId, ConnKey)> = Vec::new();
    for &(from, key, _) in &conns {
        if rng.chance(12) {
            doomed.push(if rng.chance(50) {
                (from, key)
            } else {
                (from.other(), flip(key))
            });
        }
    }
    for &(id, key) in &doomed {
        sim.reset(id, key);
    }
    sim.run();

    let is_doomed = |id: SideId, key: ConnKey| {
        doomed
            .iter()
            .any(|&(d, k)| (d, k) == (id, key) || (d.other(), flip(k)) == (id, key))
    };
    for (id, key, msgs) in &written {
        let (id, key) = (*id, *key);
        let (reader, rkey) = (id.other(), flip(key));
        if is_doomed(id, key) {
            assert!(
                sim.flow(id, key).end.is_some(),
                "seed {seed}: {key} survived its reset"
            );
            assert!(sim.flow(reader, rkey).end.is_some());
            continue;
        }
        let flow = sim.flow(reader, rkey);
        match flow.socket_type {
            SocketType::Stream => {
                let want: Vec<u8> = msgs.iter().flat_map(|(d, _)| d.iter().copied()).collect();
                assert_bytes_eq(&flow.received, &want, &format!("seed {seed} {rkey}"));
            }
            SocketType::SeqPacket => {
                assert_eq!(flow.messages.len(), msgs.len(), "seed {seed} {rkey}");
                for (got, (data, eor)) in flow.messages.iter().zip(msgs) {
                    assert_bytes_eq(&got.data, data, &format!("seed {seed} {rkey}"));
                    assert_eq!(got.eor, *eor);
                }
            }
        }
    }

    // Close the survivors: a random side, sometimes half-closing first.
    for &(from, key, _) in &conns {
        if is_doomed(from, key) {
            continue;
        }
        let (id, k) = if rng.chance(50) {
            (from, key)
        } else {
            (from.other(), flip(key))
        };
        if rng.chance(30) {
            sim.shutdown(id, k, Shutdown::SEND);
            sim.shutdown(id.other(), flip(k), Shutdown::SEND);
        }
        sim.shutdown(id, k, Shutdown::BOTH);
    }
    sim.run();
    for id in [Host, Guest] {
        let side = sim.side(id);
        assert!(
            side.ep.is_empty(),
            "seed {seed}: {id:?} still has connections"
        );
        assert_eq!(side.ep.poll_timeout(), None);
        assert_eq!(side.stats().credit_violations, 0, "seed {seed}");
        assert_eq!(side.stats().protocol_violations, 0, "seed {seed}");
        assert_eq!(side.stats().close_timeouts, 0, "seed {seed}");
    }
}
