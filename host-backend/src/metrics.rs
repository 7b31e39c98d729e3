//! Per-VM counters. Every failure kind has its own counter so an operator can tell a
//! misbehaving guest from a misconfigured host.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! counters {
    ($($(#[$doc:meta])* $name:ident),* $(,)?) => {
        /// Counters of one VM; monotonically increasing for the daemon's lifetime.
        #[derive(Debug, Default)]
        pub struct VmStats {
            $($(#[$doc])* pub $name: AtomicU64,)*
        }

        impl VmStats {
            /// Name/value pairs, for logs and metrics export.
            pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
                vec![$((stringify!($name), self.$name.load(Ordering::Relaxed)),)*]
            }
        }
    };
}

counters! {
    /// Packets taken from the TX queue.
    tx_packets,
    /// Payload bytes taken from the TX queue.
    tx_bytes,
    /// Packets put on the RX queue.
    rx_packets,
    /// Payload bytes put on the RX queue.
    rx_bytes,
    /// Descriptor chains that were malformed (bad direction, out of range, too short).
    malformed_chains,
    /// Headers with an unknown type/op or inconsistent length.
    bad_headers,
    /// Packets whose src_cid was not this VM's CID.
    spoofed_packets,
    /// Packets to a CID this VM cannot reach.
    unroutable_packets,
    /// Guest connection requests refused (no host listener, or the peer guest is down or
    /// has too many connections).
    refused_connections,
    /// Guest connection requests accepted.
    accepted_connections,
    /// Host-initiated connections started.
    host_connects,
    /// Host handshakes rejected (malformed, too long, timed out, too many).
    bad_handshakes,
    /// Connections reset because the guest broke credit or protocol rules.
    protocol_resets,
    /// Connections reset because of a host socket error.
    host_errors,
    /// RSTs sent for unknown connections.
    unknown_connection_rsts,
    /// Device stops (guest reset, reboot, unplug, QEMU disconnect).
    device_stops,
    /// Fresh devices initialised on a frontend connection that had one before (QEMU
    /// `device_del`, then `device_add` on the same chardev).
    device_replugs,
    /// Sessions opened through the session port.
    sessions_opened,
    /// Sessions whose guest transport broke and whose host end was parked.
    sessions_parked,
    /// Parked sessions resumed by their guest.
    sessions_resumed,
    /// Parked sessions closed because their guest did not come back in time.
    sessions_expired,
    /// OPENs and RESUMEs refused (any reason; a bad proof is also counted below).
    session_refusals,
    /// RESUMEs whose proof did not verify (wrong secret, replayed handshake).
    session_bad_proofs,
    /// Bytes sent to a guest again after a resume (from the replay buffer).
    session_replayed_bytes,
    /// Session-port connections reset because their first frame did not arrive in time.
    session_greeting_timeouts,
    /// Parked sessions handed to another engine of this domain (its guest moved).
    sessions_exported,
    /// Parked sessions taken over from another engine of this domain.
    sessions_imported,
    /// Connections whose unsent guest data was flushed after their device stopped.
    lingered_connections,
    /// Guest data lost because a lingering connection's host end did not take it in time.
    lingered_bytes_lost,
    /// Connection requests refused by the access policy (counted on the sender).
    denied_connections,
    /// Guest-to-guest connections admitted (counted on the client).
    g2g_connects,
    /// Guest-to-guest packets relayed (counted on the sender).
    g2g_packets,
    /// Guest-to-guest payload bytes relayed (counted on the sender).
    g2g_bytes,
    /// Guest-to-guest payload copied to the backlog because this VM's RX ring was full.
    g2g_fallback_bytes,
    /// Guest-to-guest credit updates not forwarded because a later packet of the same TX
    /// batch, connection and direction superseded them (counted on the sender).
    g2g_credit_updates_merged,
    /// Guest connections handed to an all-guests host listener.
    listener_connections,
    /// Control-service requests answered.
    control_requests,
    /// Host-initiated connections the guest never answered (connect timeout).
    connect_timeouts,
    /// Full closes the guest never acknowledged with RST (close timeout; RST sent).
    close_timeouts,
    /// Host connections that sent no `CONNECT` line in time.
    handshake_timeouts,
    /// Busy-poll rounds that found work (an event handled without a wake-up; only with
    /// `--busy-poll-us`).
    busy_poll_hits,
}

impl VmStats {
    /// Adds one.
    pub fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }
    /// Adds `n`.
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }
}

impl fmt::Display for VmStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (k, v)) in self.snapshot().into_iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            write!(f, "{k}={v}")?;
        }
        Ok(())
    }
}
