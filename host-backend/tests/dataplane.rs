//! Hermetic tests of [`domsock_host::engine::DataPlane`] against a user-space guest
//! driver (see `support/mod.rs`): real virtqueues in real (anonymous) guest memory, real Unix
//! sockets on the host side in a temporary directory, no QEMU and no AF_VSOCK.
//!
//! Most tests feed the device what a hostile or careless guest could: odd descriptor
//! layouts, malformed chains and headers, spoofed addresses, credit abuse. Each checks what
//! came out (bytes on host sockets, packets in the RX used ring, used-ring lengths, counters)
//! and that a healthy connection on the same VM keeps working afterwards.

mod support;

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use support::*;

// ---- helpers ----------------------------------------------------------------------------

/// An established stream connection and its accepted host end.
fn established(
    g: &mut TestGuest,
    listener: &UnixListener,
    guest_port: u32,
    host_port: u32,
) -> (GuestConn, UnixStream) {
    let conn = GuestConn::stream(guest_port, host_port);
    g.connect(&conn);
    (conn, accept(listener))
}

/// Data both ways over an established connection arrives intact.
fn assert_healthy(g: &mut TestGuest, conn: &mut GuestConn, host: &mut UnixStream, seed: u32) {
    let up = pattern(seed, 1500);
    g.send_rw(conn, &up);
    g.pump();
    assert_eq!(
        read_n(host, up.len()),
        up,
        "guest->host on the healthy connection"
    );
    let down = pattern(seed + 1, 2500);
    host.write_all(&down).unwrap();
    assert_eq!(
        g.recv_stream(conn, down.len(), true),
        down,
        "host->guest on the healthy connection"
    );
}

fn rsts_for(g: &mut TestGuest, conn: &GuestConn) -> usize {
    g.take_rx_of(conn)
        .iter()
        .filter(|p| p.hdr.op == OP_RST)
        .count()
}

// ---- 1. the happy path ----------------------------------------------------------------------

#[test]
fn guest_connect_data_both_ways_and_shutdown() {
    let mut g = TestGuest::new("roundtrip");
    let listener = g.listen_stream(1234);
    let mut conn = GuestConn::stream(50_000, 1234);

    let resp = g.connect(&conn);
    assert_eq!(
        resp,
        Hdr {
            src_cid: HOST_CID,
            dst_cid: GUEST_CID,
            src_port: 1234,
            dst_port: 50_000,
            len: 0,
            type_: TYPE_STREAM,
            op: OP_RESPONSE,
            flags: 0,
            buf_alloc: DEVICE_BUF_ALLOC,
            fwd_cnt: 0,
        }
    );
    assert_eq!(g.stat("accepted_connections"), 1);
    let mut host = accept(&listener);

    // Guest -> host, byte-exact; the TX chain comes back.
    let up = pattern(1, 3000);
    g.send_rw(&conn, &up);
    g.pump();
    assert_eq!(g.tx_outstanding(), 0);
    assert_eq!(read_n(&mut host, up.len()), up);
    assert_eq!(g.stat("tx_bytes"), 3000);

    // Host -> guest: RW packets with the right header, cut to the 4 KiB RX buffers.
    let down = pattern(2, 10_000);
    host.write_all(&down).unwrap();
    let mut got = Vec::new();
    let mut packets = 0;
    g.pump_until("10000 bytes in RX", |g| {
        for p in g.take_rx_of(&conn) {
            assert_eq!(
                p.hdr,
                Hdr {
                    src_cid: HOST_CID,
                    dst_cid: GUEST_CID,
                    src_port: 1234,
                    dst_port: 50_000,
                    len: p.payload.len() as u32,
                    type_: TYPE_STREAM,
                    op: OP_RW,
                    flags: 0,
                    buf_alloc: DEVICE_BUF_ALLOC,
                    // Everything the guest sent went straight into the host socket.
                    fwd_cnt: 3000,
                }
            );
            assert!(p.payload.len() <= 4096);
            got.extend_from_slice(&p.payload);
            packets += 1;
        }
        got.len() >= down.len()
    });
    assert_eq!(got, down);
    assert!(
        packets >= 3,
        "10000 bytes cannot fit in fewer than 3 RX buffers of 4 KiB"
    );
    assert_eq!(g.stat("rx_bytes"), 10_000);
    conn.fwd_cnt = 10_000;

    // SHUTDOWN(SEND) from the guest: the host reads EOF but may still write.
    g.send_ctl(&conn, OP_SHUTDOWN, SHUTDOWN_SEND);
    g.pump();
    assert!(
        reads_eof(&mut host),
        "host should see EOF after the guest's SHUTDOWN(SEND)"
    );
    host.write_all(b"still open").unwrap();
    assert_eq!(g.recv_stream(&mut conn, 10, false), b"still open");

    // Full shutdown: the device, last to know, ends it with RST and closes the host end.
    g.send_ctl(&conn, OP_SHUTDOWN, SHUTDOWN_SEND | SHUTDOWN_RCV);
    let mut rst = 0;
    g.pump_until("RST after full shutdown", |g| {
        rst += rsts_for(g, &conn);
        rst > 0
    });
    assert_eq!(rst, 1);
    host.set_nonblocking(true).unwrap();
    assert!(
        host.write_all(&[0u8; 4096]).is_err(),
        "host end should be closed"
    );
    assert!(
        g.failures_since(&Default::default()).is_empty(),
        "{}",
        g.shared.stats
    );
}

#[test]
fn host_initiated_connection() {
    let mut g = TestGuest::new("hostconn");
    let mut host = g.host_connect(7000);
    // Bytes right behind the CONNECT line belong to the stream.
    host.write_all(b"early").unwrap();
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
    assert_eq!(
        (req.src_cid, req.dst_cid, req.dst_port),
        (HOST_CID, GUEST_CID, 7000)
    );
    assert_eq!(
        (req.type_, req.len, req.buf_alloc),
        (TYPE_STREAM, 0, DEVICE_BUF_ALLOC)
    );
    assert_eq!(g.stat("host_connects"), 1);

    let mut conn = GuestConn::stream(7000, req.src_port);
    g.send_ctl(&conn, OP_RESPONSE, 0);
    g.pump();
    assert_eq!(read_n(&mut host, 8), b"OK 7000\n");
    assert_eq!(g.recv_stream(&mut conn, 5, false), b"early");

    let up = pattern(3, 777);
    g.send_rw(&conn, &up);
    g.pump();
    assert_eq!(read_n(&mut host, up.len()), up);
    assert!(g.failures_since(&Default::default()).is_empty());
}

// ---- 2. refused -----------------------------------------------------------------------------

#[test]
fn request_without_host_listener_is_refused_at_once() {
    let mut g = TestGuest::new("refused");
    let conn = GuestConn::stream(50_001, 4321);
    g.send_ctl(&conn, OP_REQUEST, 0);
    g.pump();
    let rx = g.take_rx();
    assert_eq!(rx.len(), 1, "{rx:?}");
    assert_eq!(
        rx[0].hdr,
        Hdr {
            src_cid: HOST_CID,
            dst_cid: GUEST_CID,
            src_port: 4321,
            dst_port: 50_001,
            len: 0,
            type_: TYPE_STREAM,
            op: OP_RST,
            flags: 0,
            buf_alloc: 0,
            fwd_cnt: 0,
        }
    );
    assert_eq!(g.stat("refused_connections"), 1);
    assert_eq!(g.stat("accepted_connections"), 0);
    assert_eq!(g.tx_outstanding(), 0);
}

// ---- 3. multi-descriptor TX ---------------------------------------------------------------

#[test]
fn tx_payload_and_header_split_across_descriptors() {
    let mut g = TestGuest::new("txsplit");
    let listener = g.listen_stream(1000);
    let (conn, mut host) = established(&mut g, &listener, 50_002, 1000);

    let q = 16 * 1024;
    let cases: Vec<(&str, usize, Vec<usize>)> = vec![
        ("44 + 4 x 16 KiB", 4 * q, vec![44, q, q, q, q]),
        ("header split 20 + 24", 1000, vec![20, 24, 1000]),
        (
            "header and payload share a descriptor",
            1000,
            vec![44 + 100, 900],
        ),
        (
            "header cut mid-field, payload starts in its tail",
            1000,
            vec![7, 47, 990],
        ),
        ("everything in one descriptor", 300, vec![344]),
        ("one byte per descriptor", 50, vec![1; 94]),
        (
            "zero-length descriptors in between",
            500,
            vec![44, 0, 250, 0, 250],
        ),
    ];
    for (i, (name, len, cuts)) in cases.into_iter().enumerate() {
        assert_eq!(
            cuts.iter().sum::<usize>(),
            44 + len,
            "{name}: bad test layout"
        );
        let data = pattern(100 + i as u32, len);
        g.send_split(conn.hdr(OP_RW, len as u32, 0), &data, &cuts);
        g.pump();
        assert_eq!(g.tx_outstanding(), 0, "{name}: TX chain not returned");
        assert_eq!(read_n(&mut host, len), data, "{name}");
    }
    assert!(
        g.failures_since(&Default::default()).is_empty(),
        "{}",
        g.shared.stats
    );
}

// ---- 4. tiny RX buffers ---------------------------------------------------------------------

#[test]
fn host_data_is_cut_to_fit_tiny_rx_buffers() {
    // Payload room 1, 17 and 100; a header split over two descriptors; a header split at
    // descriptor boundaries with the payload in further one-byte descriptors.
    let layouts: &[&[u32]] = &[
        &[45],
        &[44 + 17],
        &[144],
        &[20, 24 + 100],
        &[20, 24, 50],
        &[44, 1, 1, 1, 30],
    ];
    let mut g = TestGuest::with_rx("tinyrx", 12, layouts);
    let listener = g.listen_stream(1001);
    let (mut conn, mut host) = established(&mut g, &listener, 50_003, 1001);

    let down = pattern(7, 5000);
    host.write_all(&down).unwrap();
    let mut got = Vec::new();
    let mut rooms = std::collections::BTreeSet::new();
    g.pump_until("5000 bytes through tiny buffers", |g| {
        for p in g.take_rx_of(&conn) {
            assert_eq!(p.hdr.op, OP_RW);
            assert!(
                p.payload.len() <= p.room,
                "{} bytes in a buffer with room {}",
                p.payload.len(),
                p.room
            );
            assert!(!p.payload.is_empty());
            rooms.insert(p.room);
            got.extend_from_slice(&p.payload);
        }
        got.len() >= down.len()
    });
    assert_eq!(got, down);
    assert_eq!(
        rooms,
        [1, 17, 33, 50, 100].into_iter().collect(),
        "every layout was used"
    );
    assert_eq!(g.stat("malformed_chains"), 0);
    conn.fwd_cnt = down.len() as u32;
    g.send_ctl(&conn, OP_CREDIT_UPDATE, 0);
    g.pump();
}

#[test]
fn batched_host_reads_keep_order_around_a_malformed_rx_chain() {
    // Host data that keeps coming is read into several RX buffers with one readv. A bad
    // chain in the middle of the ring must end a batch without consuming chains out of
    // order or losing bytes, and still be returned empty and counted.
    let mut g = TestGuest::with_rx("rxbatch", 4, &[&[4140]]);
    let listener = g.listen_stream(1010);
    let (mut conn, mut host) = established(&mut g, &listener, 50_010, 1010);
    g.set_rx_refill(0, &[&[4140]]);
    let down = pattern(11, 40_000);
    host.write_all(&down).unwrap();
    let before = g.stats();
    g.post_rx(&[&[4140], &[44 + 1000], &[4140]]);
    g.post_rx_chain(&[Seg::Read(200)]); // device-readable: malformed for RX
    g.post_rx(&[
        &[4140],
        &[20, 24 + 3000],
        &[4140],
        &[4140],
        &[4140],
        &[4140],
    ]);
    let mut got = Vec::new();
    let mut posted_more = false;
    g.pump_until("40000 bytes around a bad RX chain", |g| {
        for p in g.take_rx_of(&conn) {
            assert_eq!(p.hdr.op, OP_RW);
            assert!(p.payload.len() <= p.room);
            got.extend_from_slice(&p.payload);
        }
        if !posted_more && g.rx_outstanding() == 0 {
            posted_more = true;
            g.set_rx_refill(8, &[&[4140], &[44 + 512]]);
        }
        got.len() >= down.len()
    });
    assert_eq!(got.len(), down.len());
    assert!(got == down, "bytes reordered or lost");
    assert_eq!(g.failures_since(&before), [("malformed_chains", 1)]);
    assert_eq!(g.rx_returned_empty.len(), 1);
    conn.fwd_cnt = down.len() as u32;
    g.send_ctl(&conn, OP_CREDIT_UPDATE, 0);
    g.pump();
    assert_healthy(&mut g, &mut conn, &mut host, 4000);
}

#[test]
fn header_only_rx_buffers_do_not_stall_the_device() {
    // A chain of exactly 44 bytes has room for a control packet but no payload. The device
    // must neither spin on it nor stop serving the queue.
    let mut g = TestGuest::with_rx("hdronly", 0, &[&[4140]]);
    let listener = g.listen_stream(1002);
    g.post_rx(&[&[44]]); // for the RESPONSE
    let (mut conn, mut host) = established(&mut g, &listener, 50_004, 1002);

    g.post_rx(&[&[44], &[20, 24], &[44]]);
    host.write_all(b"payload after header-only buffers")
        .unwrap();
    g.settle();
    assert_eq!(
        g.rx_returned_empty.len(),
        3,
        "header-only chains should come back empty"
    );
    assert_eq!(
        g.failures_since(&Default::default()),
        [("malformed_chains", 3)]
    );
    g.set_rx_refill(4, &[&[4140]]);
    let got = g.recv_stream(&mut conn, 33, false);
    assert_eq!(got, b"payload after header-only buffers");
}

// ---- 5. malformed chains and headers --------------------------------------------------------

type BadInput = Box<dyn Fn(&mut TestGuest)>;

#[test]
fn malformed_tx_chains_are_counted_returned_and_harmless() {
    let mut g = TestGuest::new("malformed");
    let listener = g.listen_stream(1003);
    let (mut conn, mut host) = established(&mut g, &listener, 50_005, 1003);
    // A connection nobody has opened: headers below are addressed to it, so a bad header
    // cannot reset the healthy connection by accident.
    let ghost = GuestConn::stream(60_000, 1003);

    let mem_end = 64u64 << 20;
    let cases: Vec<(&str, &str, BadInput)> = vec![
        (
            "payload descriptor outside guest memory",
            "malformed_chains",
            Box::new(move |g: &mut TestGuest| {
                let h = ghost.hdr(OP_RW, 100, 0).encode();
                g.add_tx_chain(
                    &h,
                    &[
                        Seg::Read(44),
                        Seg::Raw {
                            addr: OUTSIDE_MEMORY,
                            len: 100,
                            writable: false,
                        },
                    ],
                );
            }),
        ),
        (
            "header descriptor outside guest memory",
            "malformed_chains",
            Box::new(|g: &mut TestGuest| {
                g.add_tx_chain(
                    &[],
                    &[Seg::Raw {
                        addr: OUTSIDE_MEMORY,
                        len: 44,
                        writable: false,
                    }],
                );
            }),
        ),
        (
            "descriptor straddling the end of guest memory",
            "malformed_chains",
            Box::new(move |g: &mut TestGuest| {
                let h = ghost.hdr(OP_RW, 100, 0).encode();
                g.add_tx_chain(
                    &h,
                    &[
                        Seg::Read(44),
                        Seg::Raw {
                            addr: mem_end - 10,
                            len: 100,
                            writable: false,
                        },
                    ],
                );
            }),
        ),
        (
            "descriptor of length u32::MAX",
            "malformed_chains",
            Box::new(move |g: &mut TestGuest| {
                let h = ghost.hdr(OP_RW, 100, 0).encode();
                g.add_tx_chain(
                    &h,
                    &[
                        Seg::Read(44),
                        Seg::Raw {
                            addr: 0x20_0000,
                            len: u32::MAX,
                            writable: false,
                        },
                    ],
                );
            }),
        ),
        (
            "device-writable descriptor in a TX chain",
            "malformed_chains",
            Box::new(move |g: &mut TestGuest| {
                let h = ghost.hdr(OP_RW, 100, 0).encode();
                g.add_tx_chain(&h, &[Seg::Read(44), Seg::Write(100)]);
            }),
        ),
        (
            "TX chain of only a device-writable descriptor",
            "malformed_chains",
            Box::new(|g: &mut TestGuest| {
                g.add_tx_chain(&[], &[Seg::Write(200)]);
            }),
        ),
        (
            "chain shorter than a header",
            "malformed_chains",
            Box::new(move |g: &mut TestGuest| {
                let h = ghost.hdr(OP_REQUEST, 0, 0).encode();
                g.add_tx_chain(&h[..30], &[Seg::Read(30)]);
            }),
        ),
        (
            "43 bytes over two descriptors",
            "malformed_chains",
            Box::new(move |g: &mut TestGuest| {
                let h = ghost.hdr(OP_REQUEST, 0, 0).encode();
                g.add_tx_chain(&h[..43], &[Seg::Read(20), Seg::Read(23)]);
            }),
        ),
        (
            "only a zero-length descriptor",
            "malformed_chains",
            Box::new(|g: &mut TestGuest| {
                g.add_tx_chain(
                    &[],
                    &[Seg::Raw {
                        addr: 0x20_0000,
                        len: 0,
                        writable: false,
                    }],
                );
            }),
        ),
        (
            "header len larger than the chain's payload",
            "malformed_chains",
            Box::new(move |g: &mut TestGuest| {
                g.send(ghost.hdr(OP_RW, 1000, 0), &[7u8; 10]);
            }),
        ),
        (
            "unknown op",
            "bad_headers",
            Box::new(move |g: &mut TestGuest| {
                g.send(ghost.hdr(99, 0, 0), &[]);
            }),
        ),
        (
            "op 0 (INVALID)",
            "bad_headers",
            Box::new(move |g: &mut TestGuest| {
                g.send(ghost.hdr(0, 0, 0), &[]);
            }),
        ),
        (
            "unknown socket type",
            "bad_headers",
            Box::new(move |g: &mut TestGuest| {
                let mut h = ghost.hdr(OP_REQUEST, 0, 0);
                h.type_ = 7;
                g.send(h, &[]);
            }),
        ),
        (
            "payload over 64 KiB",
            "bad_headers",
            Box::new(move |g: &mut TestGuest| {
                let n = 64 * 1024 + 1;
                g.send(ghost.hdr(OP_RW, n as u32, 0), &vec![1u8; n]);
            }),
        ),
        (
            "control packet with a payload",
            "bad_headers",
            Box::new(move |g: &mut TestGuest| {
                g.send(ghost.hdr(OP_REQUEST, 10, 0), &[0u8; 10]);
            }),
        ),
    ];

    for (i, (name, counter, bad)) in cases.iter().enumerate() {
        let before = g.stats();
        bad(&mut g);
        g.settle();
        assert_eq!(g.tx_outstanding(), 0, "{name}: chain not returned");
        assert_eq!(g.failures_since(&before), [(*counter, 1)], "{name}");
        let stray: Vec<_> = g.take_rx().into_iter().map(|p| p.hdr).collect();
        assert!(stray.is_empty(), "{name}: unexpected RX packets {stray:?}");
        assert_healthy(&mut g, &mut conn, &mut host, 1000 + 10 * i as u32);
    }

    // A descriptor whose `next` points at itself: virtio-queue ends the walk after queue
    // size descriptors; the chain must come back and nothing may hang.
    let h = ghost.hdr(OP_CREDIT_UPDATE, 0, 0).encode();
    g.add_tx_looping(&h);
    g.settle();
    assert_eq!(g.tx_outstanding(), 0, "looping chain not returned");
    g.take_rx();
    assert_healthy(&mut g, &mut conn, &mut host, 5000);
}

#[test]
fn bad_headers_on_a_live_connection_reset_only_that_connection() {
    let mut g = TestGuest::new("badlive");
    let listener = g.listen_stream(1004);
    let (mut good, mut good_host) = established(&mut g, &listener, 50_006, 1004);

    type Corrupt = fn(&GuestConn, &mut TestGuest);
    let cases: &[(&str, &str, Corrupt)] = &[
        ("len beyond the chain", "malformed_chains", |c, g| {
            g.send(c.hdr(OP_RW, 1000, 0), &[1u8; 10]);
        }),
        ("unknown op", "bad_headers", |c, g| {
            g.send(c.hdr(42, 0, 0), &[]);
        }),
        ("payload over 64 KiB", "bad_headers", |c, g| {
            let n = 70_000;
            g.send(c.hdr(OP_RW, n as u32, 0), &vec![1u8; n]);
        }),
    ];
    for (i, (name, counter, corrupt)) in cases.iter().enumerate() {
        let (victim, mut victim_host) = established(&mut g, &listener, 51_000 + i as u32, 1004);
        let before = g.stats();
        corrupt(&victim, &mut g);
        let mut rst = 0;
        g.pump_until("RST for the victim", |g| {
            rst += rsts_for(g, &victim);
            rst > 0
        });
        assert_eq!(g.failures_since(&before), [(*counter, 1)], "{name}");
        assert!(
            reads_eof(&mut victim_host),
            "{name}: victim's host end not closed"
        );
        assert_healthy(&mut g, &mut good, &mut good_host, 2000 + 10 * i as u32);
    }
}

#[test]
fn malformed_rx_chains_are_returned_empty() {
    let mut g = TestGuest::with_rx("badrx", 0, &[&[4140]]);
    let listener = g.listen_stream(1005);
    g.post_rx_chain(&[Seg::Read(200)]); // device-readable
    g.post_rx_chain(&[Seg::Raw {
        addr: OUTSIDE_MEMORY,
        len: 4096,
        writable: true,
    }]);
    g.post_rx_chain(&[Seg::Write(30)]); // shorter than a header
    g.post_rx_chain(&[Seg::Write(20), Seg::Read(100)]); // direction flips mid-chain
    g.post_rx(&[&[4140]]);
    let before = g.stats();
    let conn = GuestConn::stream(50_007, 1005);
    let resp = g.connect(&conn);
    assert_eq!(resp.op, OP_RESPONSE);
    assert_eq!(
        g.rx_returned_empty.len(),
        4,
        "bad RX chains must come back empty"
    );
    assert_eq!(g.failures_since(&before), [("malformed_chains", 4)]);
    let mut host = accept(&listener);
    g.set_rx_refill(8, &[&[4140]]);
    let mut conn = conn;
    assert_healthy(&mut g, &mut conn, &mut host, 3000);
}

// ---- 6. spoofing ----------------------------------------------------------------------------

#[test]
fn spoofed_source_is_dropped_silently() {
    let mut g = TestGuest::new("spoof");
    let listener = g.listen_stream(1006);
    let (mut conn, mut host) = established(&mut g, &listener, 50_008, 1006);

    for (i, src_cid) in [4u64, HOST_CID, 0, 1, u64::MAX].into_iter().enumerate() {
        let before = g.stats();
        // A REQUEST to a listening port and data into the live connection's key.
        let mut req = GuestConn::stream(52_000 + i as u32, 1006).hdr(OP_REQUEST, 0, 0);
        req.src_cid = src_cid;
        g.send(req, &[]);
        let mut rw = conn.hdr(OP_RW, 5, 0);
        rw.src_cid = src_cid;
        g.send(rw, b"spoof");
        g.settle();
        assert_eq!(
            g.failures_since(&before),
            [("spoofed_packets", 2)],
            "src_cid {src_cid}"
        );
        assert!(
            g.take_rx().is_empty(),
            "src_cid {src_cid}: spoofed packets must not be answered"
        );
        assert!(
            try_accept(&listener).is_none(),
            "src_cid {src_cid}: spoofed REQUEST reached the host"
        );
        assert_eq!(g.tx_outstanding(), 0);
    }
    host.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 16];
    assert!(
        host.read(&mut buf).is_err(),
        "spoofed data reached the host"
    );
    host.set_nonblocking(false).unwrap();
    assert_healthy(&mut g, &mut conn, &mut host, 4000);
}

#[test]
fn unroutable_destination_gets_rst() {
    let mut g = TestGuest::new("unroutable");
    let _listener = g.listen_stream(1007);
    for (i, dst_cid) in [5u64, GUEST_CID, 1, 0, u64::MAX].into_iter().enumerate() {
        let before = g.stats();
        let conn = GuestConn::stream(53_000 + i as u32, 1007);
        let mut h = conn.hdr(OP_REQUEST, 0, 0);
        h.dst_cid = dst_cid;
        g.send(h, &[]);
        g.pump();
        assert_eq!(
            g.failures_since(&before),
            [("unroutable_packets", 1)],
            "dst_cid {dst_cid}"
        );
        let rx: Vec<_> = g.take_rx().into_iter().map(|p| p.hdr).collect();
        assert_eq!(
            rx,
            [Hdr {
                src_cid: dst_cid,
                dst_cid: GUEST_CID,
                src_port: 1007,
                dst_port: 53_000 + i as u32,
                len: 0,
                type_: TYPE_STREAM,
                op: OP_RST,
                flags: 0,
                buf_alloc: 0,
                fwd_cnt: 0,
            }],
            "dst_cid {dst_cid}"
        );
        // An RST to nowhere is counted but not answered.
        let mut rst = h;
        rst.op = OP_RST;
        g.send(rst, &[]);
        g.pump();
        assert!(g.take_rx().is_empty());
    }
}

// ---- 7. credit ------------------------------------------------------------------------------

#[test]
fn device_respects_the_guests_credit() {
    // 3000-byte buffers do not divide the 8 KiB credit: the last packet of every window
    // must be cut to the credit, not to the buffer.
    let mut g = TestGuest::with_rx("credit", 32, &[&[44 + 3000]]);
    let listener = g.listen_stream(1008);
    let mut conn = GuestConn::stream(50_009, 1008);
    conn.buf_alloc = 8 * 1024;
    g.connect(&conn);
    let mut host = accept(&listener);

    let total = 64 * 1024;
    let down = pattern(9, total);
    host.write_all(&down).unwrap();

    let mut got = Vec::new();
    let mut rounds = 0;
    while got.len() < total {
        rounds += 1;
        assert!(rounds <= 64, "no progress after {rounds} credit rounds");
        g.settle();
        for p in g.take_rx_of(&conn) {
            assert_eq!(p.hdr.op, OP_RW, "{:?}", p.hdr);
            got.extend_from_slice(&p.payload);
        }
        let in_flight = got.len() as u32 - conn.fwd_cnt;
        assert!(
            in_flight <= conn.buf_alloc,
            "device has {in_flight} bytes in flight, the guest gave it {} of credit",
            conn.buf_alloc
        );
        if got.len() < total {
            assert_eq!(
                in_flight, conn.buf_alloc,
                "device stalled below the credit it has"
            );
        }
        // The guest reads everything and says so.
        conn.fwd_cnt = got.len() as u32;
        g.send_ctl(&conn, OP_CREDIT_UPDATE, 0);
    }
    assert_eq!(got, down);
    assert_eq!(rounds, total / (8 * 1024));
}

#[test]
fn slow_host_reader_backpressures_a_guest_that_keeps_to_its_credit() {
    let mut g = TestGuest::new("backpressure");
    let listener = g.listen_stream(1013);
    let conn = GuestConn::stream(50_014, 1013);
    let resp = g.connect(&conn);
    let mut host = accept(&listener);
    host.set_nonblocking(true).unwrap();

    let total = 2 << 20;
    let data = pattern(13, total);
    let (mut sent, mut dev_fwd) = (0usize, resp.fwd_cnt);
    let mut got = Vec::with_capacity(total);
    let mut buf = vec![0u8; 16 * 1024];
    for round in 0.. {
        assert!(round < 20_000, "stuck at {} of {total} bytes", got.len());
        let credit = (resp.buf_alloc - (sent as u32 - dev_fwd)) as usize;
        let n = credit.min(64 * 1024).min(total - sent);
        if n > 0 {
            g.send_rw(&conn, &data[sent..sent + n]);
            sent += n;
        } else if round % 8 == 0 {
            g.send_ctl(&conn, OP_CREDIT_REQUEST, 0);
        }
        g.pump();
        for p in g.take_rx_of(&conn) {
            assert!(
                matches!(p.hdr.op, OP_CREDIT_UPDATE),
                "unexpected {:?}",
                p.hdr
            );
            dev_fwd = p.hdr.fwd_cnt;
        }
        // The host reads at most 16 KiB per round: far slower than the guest sends.
        match host.read(&mut buf) {
            Ok(k) => got.extend_from_slice(&buf[..k]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("host read: {e}"),
        }
        if got.len() == total {
            break;
        }
    }
    assert!(
        got == data,
        "guest->host stream corrupted under backpressure"
    );
    assert!(
        g.failures_since(&Default::default()).is_empty(),
        "{}",
        g.shared.stats
    );
}

#[test]
fn host_close_reaches_the_guest_after_the_data() {
    let mut g = TestGuest::new("hostclose");
    let listener = g.listen_stream(1014);
    let (conn, mut host) = established(&mut g, &listener, 50_015, 1014);
    let down = pattern(14, 9000);
    host.write_all(&down).unwrap();
    drop(host);
    let mut got = Vec::new();
    let mut shutdown = None;
    g.pump_until("data, then SHUTDOWN", |g| {
        for p in g.take_rx_of(&conn) {
            assert!(shutdown.is_none(), "packet after SHUTDOWN: {:?}", p.hdr);
            match p.hdr.op {
                OP_RW => got.extend_from_slice(&p.payload),
                OP_SHUTDOWN => shutdown = Some(p.hdr.flags),
                _ => panic!("unexpected {:?}", p.hdr),
            }
        }
        shutdown.is_some()
    });
    assert_eq!(got, down);
    assert_ne!(
        shutdown.unwrap() & SHUTDOWN_SEND,
        0,
        "host close must shut the send side"
    );
    // The guest completes the close; the device forgets the connection.
    g.send_ctl(&conn, OP_RST, 0);
    g.settle();
    assert!(g.take_rx().is_empty());
    assert!(
        g.failures_since(&Default::default()).is_empty(),
        "{}",
        g.shared.stats
    );
}

#[test]
fn guest_overrunning_the_devices_credit_is_reset() {
    let mut g = TestGuest::new("overrun");
    let listener = g.listen_stream(1009);
    let conn = GuestConn::stream(50_010, 1009);
    let resp = g.connect(&conn);
    let _host = accept(&listener); // never reads

    // The guest keeps to the letter of the device's credit, learning fwd_cnt from every
    // packet and asking for an update whenever its view says the credit is gone.
    let dev_buf = resp.buf_alloc;
    assert_eq!(dev_buf, DEVICE_BUF_ALLOC);
    let mut dev_fwd = resp.fwd_cnt;
    let mut tx_cnt = 0u32;
    let mut asked = false;
    for round in 0.. {
        assert!(round < 400, "host socket never filled up");
        let credit = dev_buf - (tx_cnt - dev_fwd);
        if credit == 0 {
            if asked {
                break; // credit is exactly zero, per the device's own fresh fwd_cnt
            }
            g.send_ctl(&conn, OP_CREDIT_REQUEST, 0);
            asked = true;
        } else {
            let n = credit.min(64 * 1024);
            g.send_rw(&conn, &pattern(round, n as usize));
            tx_cnt += n;
            asked = false;
        }
        g.settle();
        for p in g.take_rx_of(&conn) {
            assert_ne!(
                p.hdr.op, OP_RST,
                "reset while keeping to the credit (round {round})"
            );
            assert_eq!(p.hdr.buf_alloc, dev_buf);
            dev_fwd = p.hdr.fwd_cnt;
        }
    }
    assert_eq!(g.stat("protocol_resets"), 0);
    assert!(
        tx_cnt >= DEVICE_BUF_ALLOC,
        "guest sent {tx_cnt} bytes, less than the credit"
    );

    // One byte beyond.
    g.send_rw(&conn, b"x");
    let mut rst = 0;
    g.pump_until("RST for the credit violation", |g| {
        rst += rsts_for(g, &conn);
        rst > 0
    });
    assert_eq!(g.stat("protocol_resets"), 1);
}

// ---- 8. seqpacket ---------------------------------------------------------------------------

#[test]
fn seqpacket_messages_keep_their_boundaries() {
    let mut g = TestGuest::new("seqpacket");
    let listener = g.listen_seqpacket(1010);
    let mut conn = GuestConn::seqpacket(50_011, 1010);
    let resp = g.connect(&conn);
    assert_eq!((resp.type_, resp.op), (TYPE_SEQPACKET, OP_RESPONSE));
    let host = accept(&listener);

    // Guest -> host: one message in three packets, EOM only on the last.
    let parts = [pattern(20, 100), pattern(21, 200), pattern(22, 300)];
    for (i, part) in parts.iter().enumerate() {
        let eom = if i == 2 { SEQ_EOM } else { 0 };
        g.send(conn.hdr(OP_RW, part.len() as u32, eom), part);
        g.pump();
    }
    let (len, msg) = recv_message(&host, 4096);
    assert_eq!(len, 600, "the three packets must arrive as one message");
    assert_eq!(msg, parts.concat());
    // And a one-packet message after it.
    g.send(conn.hdr(OP_RW, 5, SEQ_EOM), b"short");
    g.pump();
    assert_eq!(recv_message(&host, 4096), (5, b"short".to_vec()));
    host.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 8];
    assert!(
        (&host).read(&mut buf).is_err(),
        "no further message expected"
    );
    host.set_nonblocking(false).unwrap();

    // Host -> guest: a 10000-byte message becomes several RW packets, EOM on the last only.
    let big = pattern(23, 10_000);
    (&host).write_all(&big).unwrap();
    (&host).write_all(b"tail").unwrap();
    let mut packets = Vec::new();
    g.pump_until("two messages in RX", |g| {
        // The engine also tells the guest when it emptied its queue of the guest's
        // messages (a CREDIT_UPDATE, as Linux sends per seqpacket message): not data.
        packets.extend(
            g.take_rx_of(&conn)
                .into_iter()
                .filter(|p| p.hdr.op != OP_CREDIT_UPDATE),
        );
        packets
            .iter()
            .filter(|p| p.hdr.flags & SEQ_EOM != 0)
            .count()
            >= 2
    });
    let split = packets
        .iter()
        .position(|p| p.hdr.flags & SEQ_EOM != 0)
        .unwrap();
    let (first, second) = packets.split_at(split + 1);
    assert!(
        first.len() >= 3,
        "10000 bytes in 4 KiB buffers need at least three packets"
    );
    for p in first.iter().chain(second) {
        assert_eq!((p.hdr.op, p.hdr.type_), (OP_RW, TYPE_SEQPACKET));
    }
    for p in &first[..first.len() - 1] {
        assert_eq!(p.hdr.flags, 0, "EOM before the end of the message");
    }
    let reassembled: Vec<u8> = first.iter().flat_map(|p| p.payload.clone()).collect();
    assert_eq!(reassembled, big);
    assert_eq!(second.len(), 1);
    assert_eq!(
        (second[0].hdr.flags, second[0].payload.as_slice()),
        (SEQ_EOM, &b"tail"[..])
    );
    conn.fwd_cnt = 10_004;
    g.send_ctl(&conn, OP_CREDIT_UPDATE, 0);
    g.pump();
    assert!(
        g.failures_since(&Default::default()).is_empty(),
        "{}",
        g.shared.stats
    );
}

// ---- 9. device stop -------------------------------------------------------------------------

#[test]
fn stop_closes_host_sockets_and_the_device_restarts() {
    let mut g = TestGuest::new("stop");
    let listener = g.listen_stream(1011);
    let (old, mut old_host) = established(&mut g, &listener, 50_012, 1011);
    let pending = g.host_connect(9999); // a handshake in progress
    g.pump();

    g.plane.stop();
    assert_eq!(g.stat("device_stops"), 1);
    assert!(
        reads_eof(&mut old_host),
        "stop must close the guest connection's host end"
    );
    let mut pending = pending;
    let mut buf = Vec::new();
    pending.read_to_end(&mut buf).unwrap();
    assert!(
        buf.is_empty(),
        "a connection stopped before the guest answered gets no OK"
    );
    g.plane.stop(); // idempotent
    assert_eq!(g.stat("device_stops"), 1);

    // The next pump serves a new connection; the old one is unknown now.
    let (mut conn, mut host) = established(&mut g, &listener, 50_013, 1011);
    assert_healthy(&mut g, &mut conn, &mut host, 6000);
    g.send_rw(&old, b"stale");
    let mut rst = 0;
    g.pump_until("RST for the stale connection", |g| {
        rst += rsts_for(g, &old);
        rst > 0
    });
    assert_eq!(g.stat("unknown_connection_rsts"), 1);
}

// ---- 10. many connections -------------------------------------------------------------------

#[test]
fn two_hundred_concurrent_connections() {
    const N: u32 = 200;
    const BATCH: u32 = 50;
    let mut g = TestGuest::with_rx("many", 128, &[&[4140]]);
    let listener = g.listen_stream(1012);
    let conns: Vec<GuestConn> = (0..N)
        .map(|i| GuestConn::stream(40_000 + i, 1012))
        .collect();

    // Connect in batches so the listener's backlog never overflows.
    let mut hosts = Vec::new();
    for batch in conns.chunks(BATCH as usize) {
        for c in batch {
            g.send_ctl(c, OP_REQUEST, 0);
        }
        let mut responses = 0;
        g.pump_until("a batch of RESPONSEs", |g| {
            for p in g.take_rx() {
                assert_eq!(p.hdr.op, OP_RESPONSE, "{:?}", p.hdr);
                responses += 1;
            }
            responses == batch.len()
        });
        for _ in batch {
            hosts.push(accept(&listener));
        }
    }
    assert_eq!(g.stat("accepted_connections"), u64::from(N));

    // Every connection sends a few KiB tagged with its index, then closes.
    for (i, c) in conns.iter().enumerate() {
        let mut data = (i as u32).to_le_bytes().to_vec();
        data.extend(pattern(i as u32, 2048 + 7 * i));
        g.send_rw(c, &data[..1000]);
        g.send_rw(c, &data[1000..]);
        g.send_ctl(c, OP_SHUTDOWN, SHUTDOWN_SEND | SHUTDOWN_RCV);
        if i % 32 == 31 {
            g.pump();
        }
    }
    g.settle();
    assert_eq!(g.tx_outstanding(), 0);

    let mut seen = vec![false; N as usize];
    for mut h in hosts {
        let mut buf = Vec::new();
        h.read_to_end(&mut buf).unwrap();
        let i = u32::from_le_bytes(buf[..4].try_into().unwrap()) as usize;
        assert!(!seen[i], "connection {i} delivered twice");
        seen[i] = true;
        assert_eq!(&buf[4..], pattern(i as u32, 2048 + 7 * i), "connection {i}");
    }
    assert!(seen.iter().all(|&s| s));
    let rsts = g.take_rx().iter().filter(|p| p.hdr.op == OP_RST).count();
    assert_eq!(
        rsts, N as usize,
        "every fully shut connection ends with an RST"
    );
    assert!(
        g.failures_since(&Default::default()).is_empty(),
        "{}",
        g.shared.stats
    );
}

#[test]
fn device_stop_still_delivers_guest_data_the_host_had_not_taken() {
    // The host does not read. The guest keeps sending as long as the device grants credit:
    // the host socket's buffer fills, then domsockd's outbox (its credit window). The
    // device then stops (QEMU gone, guest powered off): every byte the guest got credit
    // for was accepted, so all of it must still reach the host, followed by EOF.
    let mut g = TestGuest::new("linger");
    let listener = g.listen_stream(1020);
    let conn = GuestConn::stream(50_020, 1020);
    let resp = g.connect(&conn);
    let mut host = accept(&listener);

    let data = pattern(20, 16 << 20);
    let (mut sent, mut dev_fwd, mut idle) = (0usize, resp.fwd_cnt, 0);
    while idle < 4 && sent < data.len() {
        let credit = (resp.buf_alloc - (sent as u32 - dev_fwd)) as usize;
        let n = credit.min(64 * 1024).min(data.len() - sent);
        if n > 0 {
            g.send_rw(&conn, &data[sent..sent + n]);
            sent += n;
            idle = 0;
        } else {
            g.send_ctl(&conn, OP_CREDIT_REQUEST, 0);
            idle += 1;
        }
        g.settle();
        for p in g.take_rx_of(&conn) {
            dev_fwd = p.hdr.fwd_cnt;
        }
    }
    assert!(sent < data.len(), "the host socket never filled up");
    assert!(
        sent as u32 - dev_fwd > 0,
        "nothing waits in the outbox: the test would not exercise the linger"
    );
    g.plane.stop();

    host.set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .unwrap();
    let mut got = Vec::new();
    host.read_to_end(&mut got).expect("host reads to EOF");
    assert!(
        got == data[..sent],
        "got {} of {sent} bytes, or corrupted",
        got.len()
    );
    assert_eq!(g.stat("lingered_connections"), 1);
    assert_eq!(g.stat("lingered_bytes_lost"), 0);
}
