//! Protocol rules that every I/O layer applies the same way (domsockd's engine and the
//! user-space guest driver alike), written once.
//!
//! What it does not do: I/O, or keep state; the endpoint's state machine holds the state
//! these rules read.

use crate::endpoint::{DropReason, State};
use crate::packet::{Op, Shutdown};

/// Whether the end that sees `peer` shut both ways on a connection in `state`, with
/// nothing the peer sent still waiting to reach the local application (`delivered`),
/// must now end the connection with an RST. The side that learns last of a full close
/// answers with RST at once, as Linux does; until the peer's data is delivered, it waits.
pub fn closes_with_rst(state: State, peer: Shutdown, delivered: bool) -> bool {
    state == State::Established && peer.is_both() && delivered
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
