//! Sans-IO core of domsock.
//!
//! Wire codecs and connection state machines, with no sockets, clocks, threads, guest memory
//! or `unsafe`. Callers move payload bytes and pass time in; this crate decides what may move
//! and which control packets must be sent.
//!
//! - [`packet`]: the virtio-vsock header codec and its validation.
//! - [`config_space`]: the device configuration space (the guest CID).
//! - [`credit`]: credit-based flow control arithmetic.
//! - [`endpoint`]: the connection table and per-connection state machine.
//! - [`hybrid`]: the host-side `CONNECT <port>` handshake parser.
//! - [`hash`]: the keyed hasher of connection tables.
//! - [`relay`]: guest-to-guest relaying decisions (admission, credit watch).
//! - [`control`]: the control service (name resolution) and the all-guests listener
//!   preamble.
//! - [`bus`]: bus sockets: the bus wire format and membership/fan-out decisions.

#![forbid(unsafe_code)]

pub mod addr;
pub mod bus;
pub mod config_space;
pub mod control;
pub mod credit;
pub mod endpoint;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
pub mod hash;
pub mod hybrid;
pub mod packet;
pub mod relay;
pub mod rules;
#[cfg(any(test, feature = "test-utils"))]
pub mod test_utils;

pub use addr::{Cid, ConnKey, Port, VsockAddr};
pub use endpoint::{ConnError, DropReason, Endpoint, EndpointConfig, Incoming, State, Timeout};
pub use packet::{Header, HeaderError, Op, RawHeader, Shutdown, SocketType, HEADER_LEN};
