//! Bus sockets with real guests: three QEMU guests (their kernel's AF_VSOCK seqpacket to
//! domsockd's bus port, through the guest CLI `domsock bus`) and one host process (the
//! library over the namespace's Unix bus socket) on one hub bus.

use domsock_guest::bus::pattern::{pattern_message, OrderCheck};
use domsock_guest::bus::{BusEvent, BusMember, JoinOptions};
use domsock_proto::bus::wire::Want as Grant;

use super::*;

/// Messages each publisher sends.
const BUS_MESSAGES: u64 = 3_000;
/// Their size.
const BUS_MESSAGE_BYTES: usize = 256;
/// Publishers: the three guests and the host process.
const BUS_SENDERS: usize = 4;

/// Three guests and one host process on a hub bus declared in the config: each guest runs
/// a checking subscriber (`domsock bus sub --count N --senders 4`) and, once every member
/// is in, a publisher of N checksummed, numbered messages; the host process publishes N
/// and receives. Every subscriber gets every publisher's N messages exactly once, in
/// per-sender order, none lost (the bus's queues are large enough), and the host process
/// gets the three guests' (a hub does not send a member its own). The bus's counters in
/// domsockd's log say the same.
pub(super) fn bus_hub_three_guests_and_a_host(c: Case) {
    let specs = [c.spec(3), c.spec(4), c.spec(5)];
    let names = ["a", "b", "c"];
    let bus_dir = c.log_dir.join("bus");
    std::fs::create_dir_all(&bus_dir).expect("bus dir");
    let mut toml = String::new();
    for (spec, name) in specs.iter().zip(names) {
        toml.push_str(&format!(
            "[[vm]]\nguest-cid = {}\nsocket = {:?}\nuds-path = {:?}\nname = {name:?}\n\n",
            spec.cid,
            spec.socket.display().to_string(),
            spec.uds.display().to_string(),
        ));
    }
    toml.push_str(
        "[[bus]]\nname = \"vmbus\"\npolicy = \"hub\"\nqueue-bytes = 4194304\n\
         publish = [\"a\", \"b\", \"c\"]\n",
    );
    let config = c.log_dir.join("domsockd.toml");
    std::fs::write(&config, &toml).expect("write config");
    let backend = Backend::spawn_config(
        &config,
        &["--bus-dir".to_owned(), bus_dir.display().to_string()],
        &specs,
        &c.log_dir,
    );
    let long = format!("--timeout-ms {LONG_GUEST_TIMEOUT_MS}");
    let mut vms = Vec::new();
    for (spec, name) in specs.iter().zip(names) {
        let cfg = c
            .vm(name, spec)
            .cmd(&format!(
                "bg bus sub vmbus --count {BUS_MESSAGES} --senders {BUS_SENDERS} --idle-ms 120000"
            ))
            .cmd(&format!("recv --port {GATE_PORT} {long}"))
            .cmd(&format!(
                "bus pub vmbus --count {BUS_MESSAGES} --size {BUS_MESSAGE_BYTES}"
            ));
        vms.push(c.boot(&cfg, spec));
    }
    for vm in &vms {
        expect_all(
            vm,
            STEP_TIMEOUT,
            &[
                Want {
                    what: "DS-READY cmd=bus-sub".into(),
                    test: Box::new(|l| l.is("DS-READY", Some("bus-sub"))),
                },
                want_ready(GATE_PORT),
            ],
        );
    }
    let opts = JoinOptions {
        want: Grant::BOTH,
        ..JoinOptions::default()
    };
    let mut host = BusMember::join_unix(&bus_dir.join("default.sock"), "vmbus", &opts)
        .unwrap_or_else(|e| panic!("host process joins: {e}\n{}", backend.log_tail()));
    for spec in &specs {
        release_gate(spec);
    }
    // Publish and receive at once: the host's queue on the bus is bounded, so it must
    // keep reading while it publishes.
    let t = Instant::now();
    let mut check = OrderCheck::new();
    let mut sent = 0u64;
    let mut payload = Vec::new();
    let want = BUS_MESSAGES * 3;
    while check.summary(None).received < want || sent < BUS_MESSAGES {
        if sent < BUS_MESSAGES {
            pattern_message(sent, BUS_MESSAGE_BYTES, &mut payload);
            match host.try_publish(domsock_proto::bus::wire::Fields::None, &payload) {
                Ok(true) => sent += 1,
                Ok(false) => {}
                Err(e) => panic!("host publish {sent}: {e}"),
            }
        }
        match host.recv_timeout(Duration::from_millis(if sent < BUS_MESSAGES {
            0
        } else {
            200
        })) {
            Ok(Some(BusEvent::Message(m))) => {
                if domsock_guest::bus::pattern::check_pattern_message(m.payload).is_none() {
                    c.report(&format!(
                        "bad message from {:?} seq {} len {}: {:02x?}",
                        m.sender,
                        m.seq,
                        m.payload.len(),
                        &m.payload[..m.payload.len().min(24)]
                    ));
                }
                check.message(&m)
            }
            Ok(Some(BusEvent::Loss { messages, .. })) => check.reported_loss(messages),
            Ok(Some(other)) => panic!("host process got {other:?}"),
            Ok(None) => {}
            Err(e) => panic!("host receive: {e}"),
        }
        assert!(
            t.elapsed() < BIG_TRANSFER_TIMEOUT,
            "host process: {:?} of {want} after {} s",
            check.summary(None),
            t.elapsed().as_secs()
        );
    }
    let host_sum = check.summary(Some(BUS_MESSAGES));
    c.report(&format!(
        "host process: sent {sent}, received {} from {} guests in {} ({host_sum:?})",
        host_sum.received,
        host_sum.senders,
        report::ms(t.elapsed())
    ));
    assert_eq!(host_sum.received, want, "{host_sum:?}");
    assert_eq!(host_sum.senders, 3, "{host_sum:?}");
    assert_eq!(
        (host_sum.out_of_order, host_sum.bad, host_sum.lost),
        (0, 0, 0),
        "{host_sum:?}"
    );
    for (vm, name) in vms.iter().zip(names) {
        let [sub, publ] = expect_all(
            vm,
            BIG_TRANSFER_TIMEOUT,
            &[want_result("bus-sub"), want_result("bus-pub")],
        )
        .try_into()
        .expect("two lines");
        c.report(&format!(
            "{name}: sub received={} senders={} out_of_order={} bad={} lost={} in {} ms; pub sent={} at {} msg/s",
            sub.u64("received"),
            sub.u64("senders"),
            sub.u64("out_of_order"),
            sub.u64("bad"),
            sub.u64("lost"),
            sub.str("elapsed_ms"),
            publ.u64("sent"),
            publ.str("msgs_per_s"),
        ));
        assert_eq!(
            sub.u64("received"),
            BUS_MESSAGES * BUS_SENDERS as u64,
            "{name}"
        );
        assert_eq!(sub.u64("senders"), BUS_SENDERS as u64, "{name}");
        assert_eq!(
            (sub.u64("out_of_order"), sub.u64("bad"), sub.u64("lost")),
            (0, 0, 0),
            "{name}"
        );
        assert_eq!(publ.u64("sent"), BUS_MESSAGES, "{name}");
    }
    drop(host);
    for vm in &mut vms {
        finish(vm);
    }
}
