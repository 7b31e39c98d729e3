//! Body of the session state-machine fuzz target: one session, both directions, between a
//! model of the guest library and a model of domsockd's session service
//! (`host-backend/src/engine/session.rs`), over vsock connections that the device loses
//! at arbitrary points.
//!
//! The models own the bookkeeping the real sides do and call the real protocol pieces for
//! the rest: every handshake frame crosses as bytes through [`Frame`], proofs are
//! [`ResumeClaim`]s, both replay buffers are [`ReplayBuffer`]s and the daemon maps the
//! guest's `fwd_cnt` with a [`CounterExtender`]. What is modelled:
//!
//! - **guest**: the library writes the app's bytes within the vsock credit and records
//!   each write with [`ReplayBuffer::record_evicting`] into a log of the `window` OPENED
//!   announced; it reads the daemon's bytes out of the kernel's receive buffer (its
//!   `fwd_cnt` counts them, the handshake answer included) and counts the data it read.
//!   It writes nothing of the app's until the answer to its OPEN or RESUME is in, and after
//!   a resume it first resends its log from the daemon's count.
//! - **daemon**: the guest's bytes go to an outbox that the host process drains; bytes of
//!   an earlier connection still there at a resume are *carried*, and the advertised
//!   `buf_alloc` is the window less what is carried. Host bytes are read within the guest's
//!   credit and the replay buffer's room and recorded in it; every guest packet's
//!   `fwd_cnt` acknowledges it. When the device goes the session parks: the outbox keeps
//!   draining and host bytes are read into the replay buffer up to its bound. RESUME is
//!   checked (session, proof against the current or the previous nonce, count in range),
//!   answered with RESUMED and the replay tail, and the nonces rotate; the previous nonce
//!   is voided once the guest's `fwd_cnt` shows it read the RESUMED.
//! - **transport**: per connection two FIFO packet queues carrying data and credit
//!   headers, with counters that may start anywhere (near `u32::MAX` to cross the wrap;
//!   the daemon's `fwd_cnt` arithmetic is taken relative to the connection's start, which is
//!   what the real code's is with counters starting at 0). A device loss drops both queues
//!   and the guest kernel's unread bytes. A stale credit header may be applied again at
//!   either end (the guest's pool holds only headers from after the handshake answer: vsock
//!   delivers in order, so the guest never sees the window from before a resume shrank it
//!   once it has the answer).
//!
//! Not modelled: shutdown and close, the park timeout, seqpacket sessions, listeners, the
//! daemon's TX batching, and breaks only the guest sees (see `Daemon::resume`).

use crate::session::proof::ResumeClaim;
use crate::session::replay::ReplayBuffer;
use crate::session::wire::{Closed, Frame, Refusal, MAX_FRAME_LEN};
use crate::session::{CounterExtender, Nonce, Secret, SessionId, Tag};
use domsock_proto::{Cid, Port, SocketType};
use std::collections::VecDeque;
use std::num::Wrapping;
use std::ops::ControlFlow;

const ID: SessionId = SessionId([0x5e; 16]);
const SECRET: [u8; 32] = [0xa7; 32];
const TARGET: Port = Port(5000);
/// Caps on what the app and the host process write, so that the final drain stays short
/// even with one-byte windows.
const MAX_APP_BYTES: u64 = 4096;
/// Rounds without progress after which the final drain calls the session stuck.
const STUCK_ROUNDS: u32 = 3;

/// The app's byte at a session offset (and the host's, with another salt): distinct enough
/// that a skipped or repeated run of bytes shows.
fn pattern(offset: u64, salt: u64) -> u8 {
    let x = (offset ^ salt).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    ((x ^ (x >> 29)).wrapping_mul(0xbf58_476d_1ce4_e5b9) >> 56) as u8
}
const GUEST_SALT: u64 = 0x6775_6573_7400_0000;
const HOST_SALT: u64 = 0x686f_7374_0000_0000;

/// Buffer sizes: small ones (below and around a frame's length) and a spread.
fn size(b: u8) -> u32 {
    if b & 0x80 == 0 {
        [1, 2, 3, 39, 40, 41, 88, 256][usize::from(b & 7)]
    } else {
        1 + u32::from(b & 0x7f) * 8
    }
}

/// The events, by op code: the app writes up to `arg + 1` bytes; the host process writes
/// `arg + 1` bytes; the daemon sends (or, parked, reads) up to `arg + 1` bytes; the
/// transport delivers `arg % 4 + 1` packets toward the daemon or the guest; the host or the
/// library reads up to `arg + 1` bytes; a credit update from the guest or the daemon; a
/// stale header again at the daemon or the guest; the device goes; the library resumes;
/// a forged RESUME of kind `arg % 8`.
const APP_WRITE: u8 = 0;
const HOST_WRITE: u8 = 1;
const DAEMON_SEND: u8 = 2;
const TO_DAEMON: u8 = 3;
const TO_GUEST: u8 = 4;
const HOST_READ: u8 = 5;
const GUEST_READ: u8 = 6;
const GUEST_CREDIT: u8 = 7;
const DAEMON_CREDIT: u8 = 8;
const STALE_AT_DAEMON: u8 = 9;
const STALE_AT_GUEST: u8 = 10;
const DEVICE_LOSS: u8 = 11;
const RESUME: u8 = 12;
const FORGE: u8 = 13;
const OPS: u8 = 14;

#[derive(Debug, Clone, Copy)]
struct Config {
    /// The daemon's `buf_alloc` (the window OPENED announces).
    window: u32,
    /// The daemon's replay bound (host -> guest).
    replay_bytes: usize,
    /// The guest kernel's `buf_alloc`.
    guest_buf: u32,
    /// How connection counters start.
    counters: u8,
}

impl Config {
    /// Counter starts of connection `n`: (guest -> daemon, daemon -> guest).
    fn starts(&self, n: u32) -> (u32, u32) {
        let near_wrap = u32::MAX - (u32::from(self.counters >> 2) + n * 37);
        match self.counters & 3 {
            0 => (0, 0),
            1 => (near_wrap, near_wrap.wrapping_sub(11)),
            2 => (near_wrap, 0),
            _ => {
                let x = u64::from(self.counters) << 32 | u64::from(n);
                let r = x.wrapping_mul(0x9e37_79b9_7f4a_7c15);
                ((r >> 32) as u32, r as u32)
            }
        }
    }
}

/// The credit fields a packet carries: its sender's receive side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Hdr {
    buf_alloc: u32,
    fwd_cnt: u32,
}

#[derive(Debug)]
struct Packet {
    hdr: Hdr,
    data: Vec<u8>,
}

/// One end's credit state of one connection (virtio-vsock 5.10.6.3), counters wrapping.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Credit {
    buf_alloc: u32,
    rx: Wrapping<u32>,
    fwd: Wrapping<u32>,
    tx: Wrapping<u32>,
    peer_buf_alloc: u32,
    peer_fwd: Wrapping<u32>,
}

impl Credit {
    fn new(buf_alloc: u32, rx_start: u32, peer_buf_alloc: u32, tx_start: u32) -> Self {
        Self {
            buf_alloc,
            rx: Wrapping(rx_start),
            fwd: Wrapping(rx_start),
            tx: Wrapping(tx_start),
            peer_buf_alloc,
            peer_fwd: Wrapping(tx_start),
        }
    }

    fn send_credit(&self) -> usize {
        self.peer_buf_alloc
            .saturating_sub((self.tx - self.peer_fwd).0) as usize
    }

    fn unconsumed(&self) -> u32 {
        (self.rx - self.fwd).0
    }

    fn hdr(&self) -> Hdr {
        Hdr {
            buf_alloc: self.buf_alloc,
            fwd_cnt: self.fwd.0,
        }
    }

    fn update(&mut self, h: Hdr) {
        self.peer_buf_alloc = h.buf_alloc;
        self.peer_fwd = Wrapping(h.fwd_cnt);
    }

    /// Builds a packet with `data`, which the caller fitted into the credit.
    fn packet(&mut self, data: Vec<u8>) -> Packet {
        assert!(data.len() <= self.send_credit(), "sent beyond the credit");
        self.tx += data.len() as u32;
        Packet {
            hdr: self.hdr(),
            data,
        }
    }

    fn receive(&mut self, p: &Packet, who: &str) {
        self.update(p.hdr);
        let free = self.buf_alloc.saturating_sub(self.unconsumed());
        assert!(
            p.data.len() <= free as usize,
            "credit violation toward the {who}: {} bytes, {free} free",
            p.data.len()
        );
        self.rx += p.data.len() as u32;
    }
}

#[derive(Debug)]
struct GuestSession {
    id: SessionId,
    secret: Secret,
    /// The nonce its next RESUME proves.
    nonce: Nonce,
    log: ReplayBuffer,
}

#[derive(Debug)]
struct Guest {
    session: Option<GuestSession>,
    /// Daemon data the library has read over the session (all checked against the host's
    /// bytes).
    read: u64,
    /// Every RESUME it sent, with the server nonce it proved.
    resumes: Vec<Frame>,
}

#[derive(Debug)]
struct GuestConn {
    credit: Credit,
    /// Received by the kernel, not yet read by the library.
    rx: VecDeque<u8>,
    /// Handshake bytes not yet written (OPEN or RESUME).
    hello: VecDeque<u8>,
    /// The daemon's answer so far; `None` once it is complete.
    answer: Option<Vec<u8>>,
    /// Offset up to which the log has been written on this connection.
    written: u64,
    /// Daemon headers received after the answer, for stale replays.
    seen: Vec<Hdr>,
}

#[derive(Debug, Clone)]
struct Link {
    nonce: Nonce,
    prev_nonce: Option<Nonce>,
    to_guest: ReplayBuffer,
    acked: CounterExtender,
    greeting_len: u32,
    received: u64,
    carried: usize,
}

impl Link {
    /// `SessionLink::ack`, with the guest's `fwd_cnt` relative to the connection's start.
    fn ack(&mut self, fwd_cnt: u32, start: u32) {
        let before = self.acked.offset();
        let now = self.acked.advance(fwd_cnt);
        if now != before || fwd_cnt.wrapping_sub(start) >= self.greeting_len {
            self.prev_nonce = None;
        }
        self.to_guest.ack(now);
    }
}

#[derive(Debug)]
struct DaemonConn {
    credit: Credit,
    /// The guest's first frame so far; `None` once the session is on this connection.
    hello: Option<Vec<u8>>,
    inbox: VecDeque<u8>,
    /// Where this connection's daemon -> guest counters started.
    d2g_start: u32,
    /// Guest headers received, for stale replays.
    seen: Vec<Hdr>,
}

#[derive(Debug)]
struct Daemon {
    /// Its `buf_alloc` and the window OPENED announces.
    window: u32,
    replay_bytes: usize,
    link: Option<Link>,
    /// Guest bytes accepted, not yet written to the host (oldest first).
    outbox: VecDeque<u8>,
    /// Written to the host so far (all checked against the app's bytes).
    host_out: u64,
    /// What the host process wrote into its socket.
    host_written: u64,
    /// Every nonce issued, oldest first.
    nonces: Vec<Nonce>,
}

/// One connection: both ends and what is in flight between them.
#[derive(Debug)]
struct Conn {
    guest: GuestConn,
    daemon: DaemonConn,
    to_daemon: VecDeque<Packet>,
    to_guest: VecDeque<Packet>,
}

#[derive(Debug)]
struct Model {
    cfg: Config,
    guest: Guest,
    daemon: Daemon,
    conn: Option<Conn>,
    /// Connections so far.
    conns: u32,
}

/// Everything a refused RESUME must leave as it was.
#[derive(Debug, PartialEq, Eq)]
struct DaemonState {
    nonce: Option<Nonce>,
    prev_nonce: Option<Nonce>,
    replay: (u64, u64, Vec<u8>),
    acked: Option<CounterExtender>,
    greeting_len: Option<u32>,
    received: Option<u64>,
    carried: Option<usize>,
    outbox: Vec<u8>,
    attached: bool,
}

impl Daemon {
    fn state(&self, conn: Option<&Conn>) -> DaemonState {
        let l = self.link.as_ref();
        DaemonState {
            nonce: l.map(|l| l.nonce),
            prev_nonce: l.and_then(|l| l.prev_nonce),
            replay: l.map_or((0, 0, Vec::new()), |l| {
                let (a, b) = l.to_guest.slices_from(l.to_guest.start());
                (l.to_guest.start(), l.to_guest.end(), [a, b].concat())
            }),
            acked: l.map(|l| l.acked),
            greeting_len: l.map(|l| l.greeting_len),
            received: l.map(|l| l.received),
            carried: l.map(|l| l.carried),
            outbox: self.outbox.iter().copied().collect(),
            attached: conn.is_some_and(|c| c.daemon.hello.is_none()),
        }
    }

    fn fresh_nonce(&mut self) -> Nonce {
        let mut n = [0xd5; 16];
        n[..8].copy_from_slice(&(self.nonces.len() as u64).to_le_bytes());
        let n = Nonce(n);
        self.nonces.push(n);
        n
    }

    /// The checks of `resume_session`, in its order: the session, the proof against the
    /// current or the previous nonce, the count. Returns the nonce that verified.
    fn check_resume(
        &self,
        id: SessionId,
        mut claim: ResumeClaim,
        proof: &Tag,
    ) -> Result<Nonce, Refusal> {
        let link = match &self.link {
            Some(link) if id == ID => link,
            _ => return Err(Refusal::UnknownSession),
        };
        let secret = Secret(SECRET);
        let verified = [Some(link.nonce), link.prev_nonce]
            .into_iter()
            .flatten()
            .find(|&n| {
                claim.server_nonce = n;
                claim.verify(&secret, proof)
            })
            .ok_or(Refusal::BadProof)?;
        if claim.received < link.to_guest.start() || claim.received > link.to_guest.end() {
            return Err(Refusal::OutOfRange);
        }
        Ok(verified)
    }

    /// A RESUME frame on connection `conn`: resumes the session there or says why not.
    ///
    /// A valid RESUME for a session still live on another connection (the guest saw its
    /// transport break first) makes domsockd park that connection's session and resume it
    /// here; in the model a genuine RESUME only follows a device loss, so the session is
    /// always parked by then, and forged ones are checked like domsockd's, before anything
    /// is touched.
    fn resume(&mut self, frame: Frame, conn: &mut DaemonConn) -> Result<(), Refusal> {
        let Frame::Resume {
            id,
            client_nonce,
            received,
            closed,
            proof,
        } = frame
        else {
            unreachable!("callers pass a RESUME");
        };
        let claim = ResumeClaim {
            id,
            server_nonce: Nonce([0; 16]),
            client_nonce,
            received,
            closed,
        };
        let verified = self.check_resume(id, claim, &proof)?;
        let carried = self.outbox.len();
        let next = self.fresh_nonce();
        let window = self.window;
        let link = self.link.as_mut().expect("checked");
        // The nonce the guest holds if it never reads this RESUMED is the one it proved.
        // (Keeping the one that was current refused the owner after two resumes whose
        // RESUMED it did not read: `fuzz/regressions/session_machine/`.)
        link.prev_nonce = Some(verified);
        link.nonce = next;
        link.carried = carried;
        let resumed = Frame::Resumed {
            received: link.received,
            closed: Closed::default(),
            next_nonce: next,
        }
        .encode();
        link.greeting_len = resumed.len() as u32;
        link.acked = CounterExtender::new(
            claim.received,
            conn.d2g_start.wrapping_add(link.greeting_len),
        );
        let (a, b) = link
            .to_guest
            .resume_from(claim.received)
            .expect("range checked");
        conn.inbox = resumed.into_iter().chain(a.iter().copied()).collect();
        conn.inbox.extend(b);
        if carried > 0 {
            conn.credit.buf_alloc = window.saturating_sub(carried as u32);
        }
        conn.hello = None;
        Ok(())
    }
}

impl Daemon {
    /// An OPEN: the session starts on `conn` and OPENED goes first.
    fn open(&mut self, conn: &mut DaemonConn) {
        let nonce = self.fresh_nonce();
        let opened = Frame::Opened {
            id: ID,
            secret: Secret(SECRET),
            next_nonce: nonce,
            window: self.window,
            park_timeout_ms: crate::session::DEFAULT_PARK_TIMEOUT_MS,
        }
        .encode();
        let greeting_len = opened.len() as u32;
        self.link = Some(Link {
            nonce,
            prev_nonce: None,
            to_guest: ReplayBuffer::new(self.replay_bytes),
            acked: CounterExtender::new(0, conn.d2g_start.wrapping_add(greeting_len)),
            greeting_len,
            received: 0,
            carried: 0,
        });
        conn.inbox = opened.into();
        conn.hello = None;
    }

    /// A packet from the guest on the session's connection (`endpoint.handle`, `deliver`,
    /// `after_change`).
    fn receive(&mut self, conn: &mut DaemonConn, p: Packet) {
        conn.credit.receive(&p, "daemon");
        conn.seen.push(p.hdr);
        if let Some(mut hello) = conn.hello.take() {
            // Handshake bytes are consumed as they arrive.
            conn.credit.fwd += p.data.len() as u32;
            hello.extend_from_slice(&p.data);
            match Frame::decode(&hello) {
                Ok(None) if hello.len() < MAX_FRAME_LEN => conn.hello = Some(hello),
                Ok(Some((frame, used))) if used == hello.len() => match frame {
                    Frame::Open {
                        cid,
                        port,
                        socket_type,
                    } => {
                        assert_eq!(
                            (cid, port, socket_type),
                            (Cid::HOST, TARGET, SocketType::Stream)
                        );
                        self.open(conn);
                    }
                    resume @ Frame::Resume { .. } => {
                        if let Err(why) = self.resume(resume, conn) {
                            panic!("the guest's own RESUME was refused: {}", why.name());
                        }
                    }
                    other => panic!("the guest opened with {other:?}"),
                },
                other => panic!("the guest's handshake is malformed: {other:?}"),
            }
        } else {
            let link = self
                .link
                .as_mut()
                .expect("the session is on this connection");
            link.received += p.data.len() as u64;
            self.outbox.extend(p.data);
        }
        if conn.hello.is_none() {
            let link = self
                .link
                .as_mut()
                .expect("the session is on this connection");
            link.ack(conn.credit.peer_fwd.0, conn.d2g_start);
        }
    }

    fn host_available(&self, link: &Link) -> usize {
        (self.host_written - link.to_guest.end()) as usize
    }
}

impl Model {
    fn new(cfg: Config) -> Self {
        let mut m = Model {
            cfg,
            guest: Guest {
                session: None,
                read: 0,
                resumes: Vec::new(),
            },
            daemon: Daemon {
                window: cfg.window,
                replay_bytes: cfg.replay_bytes,
                link: None,
                outbox: VecDeque::new(),
                host_out: 0,
                host_written: 0,
                nonces: Vec::new(),
            },
            conn: None,
            conns: 0,
        };
        let open = Frame::Open {
            cid: Cid::HOST,
            port: TARGET,
            socket_type: SocketType::Stream,
        };
        m.connect(open.encode());
        m
    }

    /// A new vsock connection to the session port whose first bytes are `hello`.
    fn connect(&mut self, hello: Vec<u8>) {
        let (g2d, d2g) = self.cfg.starts(self.conns);
        self.conns += 1;
        let cfg = self.cfg;
        self.conn = Some(Conn {
            guest: GuestConn {
                // The RESPONSE told the guest the daemon's full window.
                credit: Credit::new(cfg.guest_buf, d2g, cfg.window, g2d),
                rx: VecDeque::new(),
                hello: hello.into(),
                answer: Some(Vec::new()),
                written: 0,
                seen: Vec::new(),
            },
            daemon: DaemonConn {
                credit: Credit::new(cfg.window, g2d, cfg.guest_buf, d2g),
                hello: Some(Vec::new()),
                inbox: VecDeque::new(),
                d2g_start: d2g,
                seen: Vec::new(),
            },
            to_daemon: VecDeque::new(),
            to_guest: VecDeque::new(),
        });
    }

    /// The library writes: its handshake, then its resend, then (with `app`) new bytes of
    /// the app, one packet within the credit.
    fn guest_write(&mut self, n: usize, app: bool) {
        let Some(c) = &mut self.conn else {
            return;
        };
        let g = &mut c.guest;
        let budget = n.min(g.credit.send_credit());
        let data: Vec<u8> = if !g.hello.is_empty() {
            let k = budget.min(g.hello.len());
            g.hello.drain(..k).collect()
        } else if g.answer.is_some() {
            return;
        } else {
            let s = self.guest.session.as_mut().expect("answered");
            let data: Vec<u8> = if g.written < s.log.end() {
                assert!(
                    g.written >= s.log.start(),
                    "the resend from {} needs bytes the guest's log dropped (it keeps {}..{})",
                    g.written,
                    s.log.start(),
                    s.log.end()
                );
                let (a, b) = s.log.slices_from(g.written);
                a.iter().chain(b).copied().take(budget).collect()
            } else if app {
                let end = s.log.end();
                let k = (budget as u64).min(MAX_APP_BYTES - end);
                let bytes: Vec<u8> = (end..end + k).map(|o| pattern(o, GUEST_SALT)).collect();
                s.log.record_evicting(&bytes);
                bytes
            } else {
                Vec::new()
            };
            g.written += data.len() as u64;
            data
        };
        if !data.is_empty() {
            let p = g.credit.packet(data);
            c.to_daemon.push_back(p);
        }
    }

    /// The daemon moves host bytes: its inbox or new host bytes to the guest while the
    /// session is on a connection, host bytes into the replay buffer while it is parked.
    fn daemon_send(&mut self, n: usize) {
        let d = &mut self.daemon;
        let Some(link) = &d.link else {
            return;
        };
        let avail = d.host_available(link);
        let link = d.link.as_mut().expect("checked");
        let host_bytes = |link: &mut ReplayBuffer, k: usize| {
            let end = link.end();
            let bytes: Vec<u8> = (end..end + k as u64)
                .map(|o| pattern(o, HOST_SALT))
                .collect();
            assert_eq!(link.record(&bytes), k, "reads are bounded by the room");
            bytes
        };
        match &mut self.conn {
            Some(c) if c.daemon.hello.is_none() => {
                let dc = &mut c.daemon;
                let budget = n.min(dc.credit.send_credit());
                let data: Vec<u8> = if !dc.inbox.is_empty() {
                    let k = budget.min(dc.inbox.len());
                    dc.inbox.drain(..k).collect()
                } else {
                    let k = budget.min(link.to_guest.room()).min(avail);
                    host_bytes(&mut link.to_guest, k)
                };
                if !data.is_empty() {
                    let p = dc.credit.packet(data);
                    c.to_guest.push_back(p);
                }
            }
            _ => {
                let k = n.min(link.to_guest.room()).min(avail);
                host_bytes(&mut link.to_guest, k);
            }
        }
    }

    /// The host process reads from its socket: the daemon writes outbox bytes to it.
    fn daemon_flush(&mut self, n: usize) {
        let d = &mut self.daemon;
        let k = n.min(d.outbox.len());
        for b in d.outbox.drain(..k) {
            assert_eq!(
                b,
                pattern(d.host_out, GUEST_SALT),
                "the host got a wrong byte at offset {}",
                d.host_out
            );
            d.host_out += 1;
        }
        let Some(c) = &mut self.conn else {
            return;
        };
        let (Some(link), None) = (&mut d.link, &c.daemon.hello) else {
            return; // parked: the outbox just drains
        };
        // `split_flushed`: carried bytes go first.
        let old = k.min(link.carried);
        link.carried -= old;
        c.daemon.credit.fwd += (k - old) as u32;
        if old > 0 {
            let buf_alloc = d.window.saturating_sub(link.carried as u32);
            if c.daemon.credit.buf_alloc != buf_alloc {
                c.daemon.credit.buf_alloc = buf_alloc;
                // `set_buf_alloc` queues a CREDIT_UPDATE.
                let p = c.daemon.credit.packet(Vec::new());
                c.to_guest.push_back(p);
            }
        }
    }

    fn deliver_to_daemon(&mut self, n: usize) {
        for _ in 0..n {
            let Some(c) = &mut self.conn else {
                return;
            };
            let Some(p) = c.to_daemon.pop_front() else {
                return;
            };
            self.daemon.receive(&mut c.daemon, p);
        }
    }

    fn deliver_to_guest(&mut self, n: usize) {
        let Some(c) = &mut self.conn else {
            return;
        };
        for _ in 0..n {
            let Some(p) = c.to_guest.pop_front() else {
                return;
            };
            let g = &mut c.guest;
            g.credit.receive(&p, "guest");
            if g.answer.is_none() {
                g.seen.push(p.hdr);
            }
            g.rx.extend(p.data);
        }
    }

    /// The library reads from the kernel: the daemon's answer first, then data.
    fn guest_read(&mut self, n: usize) {
        let Some(c) = &mut self.conn else {
            return;
        };
        let g = &mut c.guest;
        let k = n.min(g.rx.len());
        if k == 0 {
            return;
        }
        let mut bytes: Vec<u8> = g.rx.drain(..k).collect();
        g.credit.fwd += k as u32;
        if let Some(mut answer) = g.answer.take() {
            answer.extend_from_slice(&bytes);
            match Frame::decode(&answer) {
                Ok(None) => {
                    g.answer = Some(answer);
                    return;
                }
                Ok(Some((frame, used))) => {
                    self.guest.answered(frame, g, self.cfg.window);
                    bytes = answer.split_off(used);
                }
                Err(e) => panic!("the daemon's answer does not decode: {e}"),
            }
        }
        for b in bytes {
            assert_eq!(
                b,
                pattern(self.guest.read, HOST_SALT),
                "the guest got a wrong byte at offset {}",
                self.guest.read
            );
            self.guest.read += 1;
        }
    }

    fn guest_credit(&mut self) {
        if let Some(c) = &mut self.conn {
            let p = c.guest.credit.packet(Vec::new());
            c.to_daemon.push_back(p);
        }
    }

    fn daemon_credit(&mut self) {
        if let Some(c) = &mut self.conn {
            let p = c.daemon.credit.packet(Vec::new());
            c.to_guest.push_back(p);
        }
    }

    /// A guest header seen earlier arrives again at the daemon.
    fn stale_to_daemon(&mut self, i: u8) {
        let Some(c) = &mut self.conn else {
            return;
        };
        let dc = &mut c.daemon;
        if dc.seen.is_empty() {
            return;
        }
        let h = dc.seen[dc.seen.len() - 1 - usize::from(i) % dc.seen.len()];
        dc.credit.update(h);
        if let (Some(link), None) = (&mut self.daemon.link, &dc.hello) {
            link.ack(h.fwd_cnt, dc.d2g_start);
        }
    }

    /// A daemon header seen earlier (after the answer) arrives again at the guest.
    fn stale_to_guest(&mut self, i: u8) {
        let Some(c) = &mut self.conn else {
            return;
        };
        let g = &mut c.guest;
        if !g.seen.is_empty() {
            let h = g.seen[g.seen.len() - 1 - usize::from(i) % g.seen.len()];
            g.credit.update(h);
        }
    }

    /// The device goes: everything in flight and unread in the guest kernel is lost, the
    /// daemon parks the session. Breaks when the guest never got its OPENED (the library
    /// reports the open failed; the daemon's session waits for its timeout).
    fn device_loss(&mut self) -> ControlFlow<()> {
        let Some(c) = self.conn.take() else {
            return ControlFlow::Continue(());
        };
        if let (Some(link), None) = (&mut self.daemon.link, &c.daemon.hello) {
            // `park_conn` acknowledges with the last `fwd_cnt` it saw.
            link.ack(c.daemon.credit.peer_fwd.0, c.daemon.d2g_start);
        }
        if self.guest.session.is_none() {
            return ControlFlow::Break(());
        }
        ControlFlow::Continue(())
    }

    /// The library reconnects and sends RESUME (when it has a session and no connection).
    fn resume(&mut self, client: u8) {
        let Some(s) = &self.guest.session else {
            return;
        };
        if self.conn.is_some() {
            return;
        }
        let mut client_nonce = [client; 16];
        client_nonce[..4].copy_from_slice(&self.conns.to_le_bytes());
        let claim = ResumeClaim {
            id: s.id,
            server_nonce: s.nonce,
            client_nonce: Nonce(client_nonce),
            received: self.guest.read,
            closed: Closed::default(),
        };
        let frame = Frame::Resume {
            id: s.id,
            client_nonce: claim.client_nonce,
            received: claim.received,
            closed: claim.closed,
            proof: claim.prove(&s.secret),
        };
        self.guest.resumes.push(frame.clone());
        self.connect(frame.encode());
    }

    /// Another connection of the guest's domain sends a RESUME for the session that must
    /// not succeed: refused for the right reason, and nothing changes.
    fn forge(&mut self, arg: u8) {
        let d = &self.daemon;
        let x = arg >> 3;
        let (received, nonce, prev, issued) = match &d.link {
            Some(l) => (
                self.guest.read,
                l.nonce,
                l.prev_nonce,
                (l.to_guest.start(), l.to_guest.end()),
            ),
            None => (0, Nonce([0; 16]), None, (0, 0)),
        };
        let secret = Secret(SECRET);
        let mut claim = ResumeClaim {
            id: ID,
            server_nonce: nonce,
            client_nonce: Nonce([0xf0 ^ x; 16]),
            received,
            closed: Closed::default(),
        };
        let mut proof = claim.prove(&secret);
        let mut on_wire = claim;
        let old_nonce = |n: &Nonce| *n != nonce && Some(*n) != prev;
        let expect = match arg & 7 {
            0 => {
                let mut other = SECRET;
                other[usize::from(x) % 32] ^= 1 << (x % 8);
                proof = claim.prove(&Secret(other));
                Refusal::BadProof
            }
            1 => {
                on_wire.received ^= 1 << x;
                Refusal::BadProof
            }
            2 => {
                on_wire.closed = Closed {
                    send: x % 3 != 1,
                    rcv: x % 3 != 0,
                };
                Refusal::BadProof
            }
            3 => {
                on_wire.client_nonce.0[usize::from(x) % 16] ^= 1;
                Refusal::BadProof
            }
            4 => {
                on_wire.id.0[usize::from(x) % 16] ^= 1 << (x % 8);
                Refusal::UnknownSession
            }
            5 => {
                proof.0[usize::from(x) % 32] ^= 1 << (x % 8);
                Refusal::BadProof
            }
            6 => {
                // An old nonce: a RESUME the guest sent before, or a proof over one.
                let replays: Vec<&Frame> = self
                    .guest
                    .resumes
                    .iter()
                    .filter(|f| {
                        !self.proves_with(f, nonce) && prev.is_none_or(|p| !self.proves_with(f, p))
                    })
                    .collect();
                if x & 1 == 0 && !replays.is_empty() {
                    let f = replays[usize::from(x >> 1) % replays.len()].clone();
                    return self.refused(f, Refusal::BadProof);
                }
                let old: Vec<Nonce> = d.nonces.iter().copied().filter(old_nonce).collect();
                if old.is_empty() {
                    return;
                }
                claim.server_nonce = old[usize::from(x) % old.len()];
                proof = claim.prove(&secret);
                on_wire = claim;
                Refusal::BadProof
            }
            _ => {
                // The owner's proof over a count the daemon cannot serve.
                let (start, end) = issued;
                claim.received = if x & 1 == 1 && start > 0 {
                    start - 1 - u64::from(x >> 1) % start
                } else {
                    end + 1 + u64::from(x >> 1)
                };
                proof = claim.prove(&secret);
                on_wire = claim;
                Refusal::OutOfRange
            }
        };
        let expect = if d.link.is_some() {
            expect
        } else {
            Refusal::UnknownSession
        };
        let frame = Frame::Resume {
            id: on_wire.id,
            client_nonce: on_wire.client_nonce,
            received: on_wire.received,
            closed: on_wire.closed,
            proof,
        };
        self.refused(frame, expect);
    }

    /// Whether RESUME `f` proves its claim over `nonce`.
    fn proves_with(&self, f: &Frame, nonce: Nonce) -> bool {
        let Frame::Resume {
            id,
            client_nonce,
            received,
            closed,
            proof,
        } = *f
        else {
            return false;
        };
        let claim = ResumeClaim {
            id,
            server_nonce: nonce,
            client_nonce,
            received,
            closed,
        };
        claim.verify(&Secret(SECRET), &proof)
    }

    /// Hands `frame` to the daemon on a connection of its own and checks it is refused
    /// with `expect`, changing nothing.
    fn refused(&mut self, frame: Frame, expect: Refusal) {
        let before = self.daemon.state(self.conn.as_ref());
        let bytes = frame.encode();
        let Ok(Some((frame, _))) = Frame::decode(&bytes) else {
            panic!("a RESUME does not decode");
        };
        let mut other = DaemonConn {
            credit: Credit::new(self.cfg.window, 0, self.cfg.guest_buf, 0),
            hello: Some(Vec::new()),
            inbox: VecDeque::new(),
            d2g_start: 0,
            seen: Vec::new(),
        };
        match self.daemon.resume(frame.clone(), &mut other) {
            Ok(()) => panic!("a forged RESUME was accepted: {frame:?}"),
            Err(why) => assert_eq!(why, expect, "{frame:?}"),
        }
        assert_eq!(
            self.daemon.state(self.conn.as_ref()),
            before,
            "a refused RESUME changed the session"
        );
    }

    /// One event: two bytes of the input, the op (its value modulo [`OPS`]) and its
    /// argument.
    fn step(&mut self, op: u8, arg: u8) -> ControlFlow<()> {
        let n = 1 + usize::from(arg);
        match op % OPS {
            APP_WRITE => self.guest_write(n, true),
            HOST_WRITE => {
                self.daemon.host_written = (self.daemon.host_written + n as u64).min(MAX_APP_BYTES)
            }
            DAEMON_SEND => self.daemon_send(n),
            TO_DAEMON => self.deliver_to_daemon(1 + usize::from(arg % 4)),
            TO_GUEST => self.deliver_to_guest(1 + usize::from(arg % 4)),
            HOST_READ => self.daemon_flush(n),
            GUEST_READ => self.guest_read(n),
            GUEST_CREDIT => self.guest_credit(),
            DAEMON_CREDIT => self.daemon_credit(),
            STALE_AT_DAEMON => self.stale_to_daemon(arg),
            STALE_AT_GUEST => self.stale_to_guest(arg),
            DEVICE_LOSS => return self.device_loss(),
            RESUME => self.resume(arg),
            FORGE..=u8::MAX => self.forge(arg),
        }
        ControlFlow::Continue(())
    }

    /// The invariants that hold after every event.
    fn check(&self) {
        let d = &self.daemon;
        assert!(
            d.outbox.len() <= self.cfg.window as usize,
            "the daemon holds {} guest bytes, its window is {}",
            d.outbox.len(),
            self.cfg.window
        );
        let Some(link) = &d.link else {
            return;
        };
        let r = &link.to_guest;
        assert!(r.len() <= self.cfg.replay_bytes, "replay beyond its bound");
        let read = self.guest.read;
        assert!(
            r.start() <= read && read <= r.end(),
            "the daemon's replay buffer {}..{} does not cover the guest's count {read}",
            r.start(),
            r.end()
        );
        assert!(
            link.acked.offset() <= read,
            "the daemon takes {} bytes as consumed, the guest read {read}",
            link.acked.offset()
        );
        if let Some(s) = &self.guest.session {
            assert!(s.log.len() <= s.log.capacity());
            assert!(
                s.log.start() <= link.received && link.received <= s.log.end(),
                "the guest's log {}..{} does not cover the daemon's count {}",
                s.log.start(),
                s.log.end(),
                link.received
            );
        }
        if let Some(c) = &self.conn {
            if c.daemon.hello.is_none() {
                assert_eq!(
                    c.daemon.credit.unconsumed() as usize + link.carried,
                    d.outbox.len(),
                    "outbox bookkeeping"
                );
            }
        }
    }

    fn done(&self) -> bool {
        let (Some(s), Some(c)) = (&self.guest.session, &self.conn) else {
            return false;
        };
        c.guest.answer.is_none()
            && c.guest.written == s.log.end()
            && self.daemon.host_out == s.log.end()
            && self.guest.read == self.daemon.host_written
    }

    fn progress(&self) -> impl PartialEq + std::fmt::Debug {
        let c = self.conn.as_ref();
        (
            (
                self.daemon.host_out,
                self.guest.read,
                self.daemon.outbox.len(),
            ),
            self.daemon
                .link
                .as_ref()
                .map(|l| (l.to_guest.start(), l.to_guest.end())),
            c.map(|c| {
                (
                    c.guest.hello.len(),
                    c.guest.answer.as_ref().map(Vec::len),
                    c.guest.written,
                    c.guest.rx.len(),
                    c.daemon.inbox.len(),
                    c.to_daemon.len(),
                    c.to_guest.len(),
                )
            }),
            self.conns,
        )
    }

    /// No more losses, writes or forgeries: everything in flight gets through.
    fn drain(&mut self) {
        let mut idle = 0;
        let mut round = 0u8;
        while !self.done() {
            let before = self.progress();
            if self.conn.is_none() {
                self.resume(round);
                round = round.wrapping_add(1);
            }
            loop {
                let p = self.progress();
                self.guest_write(usize::MAX, false);
                self.daemon_send(usize::MAX);
                self.deliver_to_daemon(usize::MAX);
                self.deliver_to_guest(usize::MAX);
                self.guest_read(usize::MAX);
                self.daemon_flush(usize::MAX);
                self.check();
                if self.progress() == p {
                    break;
                }
            }
            self.guest_credit();
            self.daemon_credit();
            self.deliver_to_daemon(usize::MAX);
            self.deliver_to_guest(usize::MAX);
            self.check();
            if self.progress() == before {
                idle += 1;
                assert!(idle < STUCK_ROUNDS, "the session is stuck: {self:#?}");
            } else {
                idle = 0;
            }
        }
    }
}

impl Guest {
    /// The daemon's answer to the handshake on `conn` is complete.
    fn answered(&mut self, frame: Frame, conn: &mut GuestConn, window: u32) {
        match frame {
            Frame::Opened {
                id,
                secret,
                next_nonce,
                window: announced,
                ..
            } => {
                assert!(self.session.is_none(), "a second OPENED");
                assert_eq!(announced, window, "OPENED announces another window");
                self.session = Some(GuestSession {
                    id,
                    secret,
                    nonce: next_nonce,
                    log: ReplayBuffer::new(announced as usize),
                });
                conn.written = 0;
            }
            Frame::Resumed {
                received,
                closed,
                next_nonce,
            } => {
                let s = self.session.as_mut().expect("resumed without a session");
                assert_eq!(closed, Closed::default());
                assert!(
                    received <= s.log.end(),
                    "the daemon claims {received} bytes, the app wrote {}",
                    s.log.end()
                );
                assert!(
                    received >= s.log.start(),
                    "the resume needs the guest's bytes from {received}, its log keeps {}..",
                    s.log.start()
                );
                conn.written = received;
                s.nonce = next_nonce;
            }
            Frame::Refused { reason, .. } => panic!("the session was refused: {}", reason.name()),
            other => panic!("the daemon answered {other:?}"),
        }
    }
}

/// Session protocol, both directions, under device loss.
///
/// Input: four bytes of configuration (the daemon's window, its replay bound, the guest
/// kernel's buffer, how each connection's 32-bit counters start: at 0, just below the wrap,
/// or anywhere), then two bytes per event: the app writes (within the credit; the library
/// resends first after a resume), the host process writes, the daemon sends or (parked)
/// reads into its replay buffer, the transport delivers packets either way, the host or
/// the library reads, either end sends a credit update or sees a stale one again, the
/// device goes, the library resumes, or a forged RESUME arrives (another secret, a
/// changed field or tag, an unknown id, an old nonce or a recorded RESUME, the owner's
/// proof over a count out of range).
///
/// Invariants, after every event:
/// - **nothing twice, nothing skipped**: what the host got is a prefix of what the app
///   wrote and what the app got a prefix of what the host wrote, byte for byte;
/// - **bounds**: the daemon's replay buffer within its bound, its outbox (carried bytes
///   included) within its window, the guest's log within the window OPENED announced, no
///   packet beyond the receiver's credit;
/// - **a resume never needs dropped bytes**: the daemon's replay buffer always holds
///   everything after the guest's count, the guest's log everything after the daemon's,
///   the daemon never takes more as consumed than the guest read, and the guest's own
///   RESUME is never refused;
/// - **forgeries change nothing**: each is refused for its reason, and the session's
///   nonces, counts, replay buffer and outbox are as before.
///
/// After the events, with no more losses: everything gets through (a session that makes
/// no progress is a failure), and each side's output equals the other's input.
pub fn session_machine(data: &[u8]) {
    let [window, replay, guest_buf, counters, events @ ..] = data else {
        return;
    };
    let cfg = Config {
        window: size(*window),
        replay_bytes: size(*replay) as usize,
        guest_buf: size(*guest_buf),
        counters: *counters,
    };
    let mut m = Model::new(cfg);
    for ev in events.chunks(2) {
        let flow = m.step(ev[0], ev.get(1).copied().unwrap_or(0));
        m.check();
        if flow.is_break() {
            return;
        }
    }
    m.drain();
}

#[cfg(test)]
mod tests {
    //! Scenarios the fuzzer reaches but does not keep (they add no coverage), each guarding
    //! one protocol rule: break the rule in the model and its test fails.
    use super::*;

    /// The OPEN handshake, all the way to the library reading OPENED.
    const OPENED: [(u8, u8); 5] = [
        (APP_WRITE, 255),
        (TO_DAEMON, 3),
        (DAEMON_SEND, 255),
        (TO_GUEST, 3),
        (GUEST_READ, 255),
    ];
    /// A resume whose RESUME the daemon processes, RESUMED not sent.
    const RESUME_PROCESSED: [(u8, u8); 4] = [
        (DEVICE_LOSS, 0),
        (RESUME, 0),
        (APP_WRITE, 255),
        (TO_DAEMON, 3),
    ];
    /// Windows, replay bound and guest buffer of 256 bytes; counters from 0.
    const CONFIG: [u8; 4] = [7, 7, 7, 0];

    fn run(config: [u8; 4], events: &[&[(u8, u8)]]) {
        let mut input = config.to_vec();
        for &(op, arg) in events.iter().copied().flatten() {
            input.extend([op, arg]);
        }
        session_machine(&input);
    }

    #[test]
    fn an_outbox_carried_into_a_resume_shrinks_the_window() {
        // 256 bytes wait in the outbox across the loss; the guest may send only what is
        // left of the window until they reach the host.
        run(
            CONFIG,
            &[
                &OPENED,
                &[(APP_WRITE, 255), (TO_DAEMON, 3)],
                &RESUME_PROCESSED,
                &[(DAEMON_SEND, 255), (TO_GUEST, 3), (GUEST_READ, 255)],
                &[(APP_WRITE, 255), (TO_DAEMON, 3)],
            ],
        );
    }

    #[test]
    fn a_partly_read_resumed_keeps_the_previous_nonce() {
        // The library read 20 of RESUMED's 40 bytes and said so; it still holds the old
        // nonce, and the next resume must be accepted with it.
        run(
            CONFIG,
            &[
                &OPENED,
                &RESUME_PROCESSED,
                &[(DAEMON_SEND, 255), (TO_GUEST, 3), (GUEST_READ, 19)],
                &[(GUEST_CREDIT, 0), (TO_DAEMON, 3), (DEVICE_LOSS, 0)],
            ],
        );
    }

    #[test]
    fn the_owner_resumes_after_missing_two_resumed_frames() {
        // The fuzzer's finding against domsockd's nonce rotation (the same input is in
        // fuzz/regressions/session_machine/).
        run(
            CONFIG,
            &[
                &OPENED,
                &RESUME_PROCESSED,
                &RESUME_PROCESSED,
                &[(DEVICE_LOSS, 0)],
            ],
        );
    }

    #[test]
    fn forgeries_of_every_kind_are_refused_parked_and_live() {
        let forged: Vec<(u8, u8)> = (0..=255).map(|a| (FORGE, a)).collect();
        run(
            [7, 7, 7, 1],
            &[
                &forged,
                &OPENED,
                &[(HOST_WRITE, 99), (DAEMON_SEND, 50)],
                &forged,
                &[(DEVICE_LOSS, 0)],
                &forged,
                &RESUME_PROCESSED,
                &RESUME_PROCESSED,
                &forged,
                &[(DAEMON_SEND, 255), (TO_GUEST, 3), (GUEST_READ, 255)],
                &[(GUEST_CREDIT, 0), (TO_DAEMON, 3)],
                &forged,
            ],
        );
    }
}
