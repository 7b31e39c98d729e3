//! Protocol rules that every I/O layer applies the same way (domsockd's engine and the
//! user-space guest driver alike), written once.
//!
//! What it does not do: I/O, or keep state; the endpoint's state machine holds the state
//! these rules read.

use crate::credit::Credit;
use crate::endpoint::{DropReason, State};
use crate::packet::{Op, Shutdown};

/// Whether the end that sees `peer` shut both ways on a connection in `state`, with
/// nothing the peer sent still waiting to reach the local application (`delivered`),
/// must now end the connection with an RST. The side that learns last of a full close
/// answers with RST at once, as Linux does; until the peer's data is delivered, it waits.
pub fn closes_with_rst(state: State, peer: Shutdown, delivered: bool) -> bool {
    state == State::Established && peer.is_both() && delivered
}

/// The largest seqpacket message that can ever reach the peer of a connection with `credit`
/// whole: the receive buffer it last advertised (or what is already in flight, if it shrank
/// the buffer below that). A message leaves and arrives in one piece, so a larger one can
/// never be delivered: the guest driver refuses to send it, domsockd resets the connection
/// rather than hold it for ever.
pub fn largest_message(credit: &Credit) -> u32 {
    // Cannot overflow: `peer_credit` is what is left of the buffer after `in_flight`.
    credit.peer_credit() + credit.in_flight()
}

/// What a dropped packet means for the counters and the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropClass {
    /// The peer broke a rule; its connection was reset (`protocol_resets`). The text says
    /// which rule.
    Violation(&'static str),
    /// A packet for no connection, answered with an RST (`unknown_connection_rsts`).
    AnsweredUnknown,
    /// Nothing to count (an RST for no connection, data after our receive shutdown,
    /// a packet needing no action).
    Quiet,
}

impl DropReason {
    /// How a packet with operation `op` dropped for this reason is counted.
    pub fn class(&self, op: Op) -> DropClass {
        match self {
            DropReason::TypeMismatch => DropClass::Violation("socket type mismatch"),
            DropReason::CreditViolation(_) => DropClass::Violation("credit overrun"),
            DropReason::ProtocolViolation => {
                DropClass::Violation("packet not allowed in this state")
            }
            // An RST for an unknown connection is not answered, so not counted.
            DropReason::UnknownConnection if op != Op::Rst => DropClass::AnsweredUnknown,
            DropReason::UnknownConnection | DropReason::ReceiveShut | DropReason::NoAction => {
                DropClass::Quiet
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_close_waits_for_delivery() {
        assert!(closes_with_rst(State::Established, Shutdown::BOTH, true));
        assert!(!closes_with_rst(State::Established, Shutdown::BOTH, false));
        assert!(!closes_with_rst(State::Established, Shutdown::SEND, true));
        assert!(!closes_with_rst(State::Closing, Shutdown::BOTH, true));
    }

    #[test]
    fn largest_message_is_the_peer_buffer() {
        let mut c = Credit::new(1000, 4096, 0);
        assert_eq!(largest_message(&c), 4096);
        c.on_send(1000);
        assert_eq!(
            largest_message(&c),
            4096,
            "in flight or not, the buffer holds it"
        );
        // The peer shrank its buffer below what is in flight.
        c.update_peer(512, 0);
        assert_eq!(largest_message(&c), 1000);
        c.update_peer(u32::MAX, 0);
        assert_eq!(largest_message(&c), u32::MAX);
    }

    #[test]
    fn drop_classes() {
        use DropReason::*;
        assert_eq!(UnknownConnection.class(Op::Rw), DropClass::AnsweredUnknown);
        assert_eq!(UnknownConnection.class(Op::Rst), DropClass::Quiet);
        assert!(matches!(
            TypeMismatch.class(Op::Rw),
            DropClass::Violation(_)
        ));
        assert!(matches!(
            ProtocolViolation.class(Op::Rw),
            DropClass::Violation(_)
        ));
        assert_eq!(ReceiveShut.class(Op::Rw), DropClass::Quiet);
        assert_eq!(NoAction.class(Op::CreditUpdate), DropClass::Quiet);
    }
}
