//! `domsock forge-resume` (part of the `domsock` binary): plays a hostile guest program
//! against domsockd's session port from inside a real guest, to show that no forged
//! RESUME is accepted and that the session it names carries on unharmed.
//!
//! Each attempt is one fresh connection to the session port (host CID 2, port 1022) that
//! sends raw bytes, not the library's handshake, and reads what comes back:
//! - `wrong-proof`: a well-formed RESUME for the session `--id` names, with a random proof
//!   (from the session's own domain: `bad-proof`; from any other: `unknown-session`). It
//!   claims `--received` bytes (default 0): given what the victim really received, only the
//!   proof is wrong, so a daemon that skipped the proof check would accept it;
//! - `random-id`: a RESUME for an id nobody has (`unknown-session`);
//! - `replay`: opens a session of its own to host port `--port` (an echo service), breaks
//!   its connection, lets the library resume it once (capturing the exact RESUME bytes it
//!   sent), then sends those bytes again (`bad-proof`: the daemon's nonce moved on). The
//!   session must still echo afterwards, with exactly one resume;
//! - `bad-magic`, `bad-version`, `unknown-kind`, `reserved-bits`, `server-frame` (an
//!   OPENED sent by the guest), `oversized` (a preamble claiming a 65535-byte body, then
//!   4 KiB): all `malformed`;
//! - `truncated`: the first 40 bytes of a RESUME, then `shutdown(SHUT_WR)`: the daemon has
//!   nothing to answer (outcome `none` after `--quiet-ms`, or the connection ends).
//!
//! Each prints `DS-FORGE attempt=<name> sent_bytes=<n> sent=<first 16 bytes in hex>
//! outcome=<refused|accepted|rst|close|none|error|bad-answer> [reason=<refusal>]
//! [answer=<frame>] [errno=<name>] ms=<ms>`, and the command ends with `DS-RESULT
//! cmd=forge-resume attempts=.. refused=.. accepted=.. ...`. Any answer other than REFUSED
//! (RESUMED above all) counts as accepted and makes the command fail, as does an answer
//! that is not a frame. Which reason each attempt must get is the caller's to check: it
//! depends on the domain the command runs in.
//!
//! Guests only: it opens AF_VSOCK sockets.

use std::io;
use std::net::Shutdown;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use domsock_guest::pattern::PatternStream;
use domsock_guest::session::{Dialer, SessionStream, Transport, VsockDialer};
use domsock_guest::vsock::{self, SockType, VsockAddr, VsockSocket, VMADDR_CID_HOST};
use domsock_migration::session::wire::{Closed, Frame, MAX_FRAME_LEN, PREAMBLE_LEN};
use domsock_migration::session::{Nonce, Secret, SessionId, Tag, SESSION_PORT};

use crate::{millis, session_options, CmdResult, Failure, Opts};

/// Every attempt, in the order they run.
const ATTEMPTS: &[&str] = &[
    "wrong-proof",
    "random-id",
    "replay",
    "bad-magic",
    "bad-version",
    "unknown-kind",
    "reserved-bits",
    "server-frame",
    "oversized",
    "truncated",
];
/// Attempts that need `--id`.
const NEED_ID: &[&str] = &["wrong-proof"];
/// Attempts that need `--port`.
const NEED_PORT: &[&str] = &["replay"];
/// How long an attempt waits for an answer that may never come, by default.
const QUIET_MS: u64 = 1000;
/// Bytes of one echo round trip on the command's own session.
const ECHO_BYTES: usize = 4096;
/// How many bytes of a truncated RESUME are sent.
const TRUNCATED_BYTES: usize = 40;
/// Junk sent after the oversized preamble.
const OVERSIZED_TAIL_BYTES: usize = 4096;
/// Where the reserved bytes of a RESUME body start (after id, nonce, received, shutdown).
const RESUME_RESERVED_AT: usize = PREAMBLE_LEN + 16 + 16 + 8 + 1;

/// What came back on one attempt's connection.
#[derive(Debug)]
enum Outcome {
    Refused(&'static str),
    /// Any frame but REFUSED.
    Accepted(&'static str),
    Rst,
    Close,
    /// Nothing within the quiet time.
    Silent,
    Error(String),
    BadAnswer(String),
}

impl Outcome {
    fn fields(&self) -> String {
        match self {
            Outcome::Refused(reason) => format!("outcome=refused reason={reason}"),
            Outcome::Accepted(frame) => format!("outcome=accepted answer={frame}"),
            Outcome::Rst => "outcome=rst".into(),
            Outcome::Close => "outcome=close".into(),
            Outcome::Silent => "outcome=none".into(),
            Outcome::Error(errno) => format!("outcome=error errno={errno}"),
            Outcome::BadAnswer(why) => format!("outcome=bad-answer why={}", why.replace(' ', "-")),
        }
    }
}

fn errno_of(e: &io::Error) -> String {
    e.raw_os_error()
        .map_or_else(|| e.to_string().replace(' ', "-"), vsock::errno_name)
}

fn random<const N: usize>() -> Result<[u8; N], Failure> {
    let mut b = [0u8; N];
    vsock::nonce_bytes(&mut b).map_err(|e| Failure::io("getrandom", &e))?;
    Ok(b)
}

/// A RESUME for `id` claiming `received`, whose nonce and proof are random.
fn forged_resume(id: SessionId, received: u64) -> Result<Vec<u8>, Failure> {
    Ok(Frame::Resume {
        id,
        client_nonce: Nonce(random()?),
        received,
        closed: Closed::default(),
        proof: Tag(random()?),
    }
    .encode())
}

/// The bytes of attempt `name` (any but `replay`) naming session `named` (its RESUMEs
/// claiming `received`), and whether the write side is shut after them.
fn forged_bytes(name: &str, named: SessionId, received: u64) -> Result<(Vec<u8>, bool), Failure> {
    let mut resume = forged_resume(named, received)?;
    let bytes = match name {
        "wrong-proof" => resume,
        "random-id" => forged_resume(SessionId(random()?), received)?,
        "bad-magic" => b"not a session frame, just garbage "
            .iter()
            .copied()
            .cycle()
            .take(MAX_FRAME_LEN)
            .collect(),
        "bad-version" => {
            resume[4] = 9;
            resume
        }
        "unknown-kind" => {
            resume[5] = 42;
            resume
        }
        "reserved-bits" => {
            resume[RESUME_RESERVED_AT] = 1;
            resume
        }
        "server-frame" => Frame::Opened {
            id: named,
            secret: Secret(random()?),
            next_nonce: Nonce(random()?),
            window: 256 << 10,
            park_timeout_ms: 60_000,
        }
        .encode(),
        "oversized" => {
            let mut big = resume[..PREAMBLE_LEN].to_vec();
            big[6..8].copy_from_slice(&u16::MAX.to_le_bytes());
            big.extend(std::iter::repeat_n(0xa5, OVERSIZED_TAIL_BYTES));
            big
        }
        "truncated" => {
            resume.truncate(TRUNCATED_BYTES);
            return Ok((resume, true));
        }
        other => return Err(Failure(format!("no bytes for attempt {other:?}"))),
    };
    Ok((bytes, false))
}

/// Reads one answer frame, waiting at most `quiet` for each piece of it.
fn read_answer(sock: &VsockSocket, quiet: Duration) -> Outcome {
    if let Err(e) = sock.set_read_timeout(quiet) {
        return Outcome::Error(errno_of(&e));
    }
    let mut buf = [0u8; MAX_FRAME_LEN];
    let mut have = 0;
    loop {
        match Transport::read(sock, &mut buf[have..]) {
            Ok(0) if have == 0 => return Outcome::Close,
            Ok(0) => return Outcome::BadAnswer(format!("EOF after {have} bytes")),
            Ok(n) => {
                have += n;
                match Frame::decode(&buf[..have]) {
                    Ok(Some((Frame::Refused { reason, .. }, _))) => {
                        return Outcome::Refused(reason.name())
                    }
                    Ok(Some((frame, _))) => return Outcome::Accepted(frame.name()),
                    Ok(None) if have < buf.len() => {}
                    Ok(None) => return Outcome::BadAnswer("no frame".into()),
                    Err(e) => return Outcome::BadAnswer(e.to_string()),
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && have == 0 => return Outcome::Silent,
            Err(e) if e.raw_os_error() == Some(libc::ECONNRESET) && have == 0 => {
                return Outcome::Rst
            }
            Err(e) => return Outcome::Error(errno_of(&e)),
        }
    }
}

/// One attempt: a fresh connection to the session port, `bytes` sent (then `SHUT_WR` if
/// `half_close`), the answer read and reported.
fn attempt(
    name: &str,
    bytes: &[u8],
    half_close: bool,
    timeout: Duration,
    quiet: Duration,
) -> Result<Outcome, Failure> {
    let start = Instant::now();
    let addr = VsockAddr::new(VMADDR_CID_HOST, SESSION_PORT.0);
    let sock = VsockSocket::connect(SockType::Stream, addr, timeout)
        .map_err(|e| Failure::io(&format!("{name}: connect {addr}"), &e))?;
    sock.set_write_timeout(timeout)
        .map_err(|e| Failure::io("SO_SNDTIMEO", &e))?;
    // A send the daemon cut short (it refuses at the preamble) still leaves its answer to
    // read.
    let sent = sock
        .send_all(bytes)
        .and_then(|()| match half_close {
            true => sock.shutdown(Shutdown::Write),
            false => Ok(()),
        })
        .err()
        .map(|e| format!(" send_errno={}", errno_of(&e)))
        .unwrap_or_default();
    let outcome = read_answer(&sock, quiet);
    let head: String = bytes.iter().take(16).map(|b| format!("{b:02x}")).collect();
    println!(
        "DS-FORGE attempt={name} sent_bytes={} sent={head}{sent} {} ms={:.1}",
        bytes.len(),
        outcome.fields(),
        millis(start.elapsed())
    );
    Ok(outcome)
}

/// What the command's own session's dialer saw: the first bytes written on each connection
/// (its handshake frame), and a switch that breaks the connection at the next write.
#[derive(Debug, Default)]
struct Tap {
    greetings: Mutex<Vec<Vec<u8>>>,
    break_next_write: AtomicBool,
}

impl Tap {
    fn greetings(&self) -> Vec<Vec<u8>> {
        self.greetings
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

#[derive(Debug)]
struct TapDialer {
    inner: VsockDialer,
    tap: Arc<Tap>,
}

impl Dialer for TapDialer {
    fn dial(&mut self, timeout: Duration) -> io::Result<Box<dyn Transport>> {
        let inner = self.inner.dial(timeout)?;
        let mut greetings = self
            .tap
            .greetings
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        greetings.push(Vec::new());
        Ok(Box::new(TapTransport {
            inner,
            tap: self.tap.clone(),
            index: greetings.len() - 1,
        }))
    }
}

#[derive(Debug)]
struct TapTransport {
    inner: Box<dyn Transport>,
    tap: Arc<Tap>,
    index: usize,
}

impl Transport for TapTransport {
    fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buf)
    }

    fn write(&self, buf: &[u8]) -> io::Result<usize> {
        if self.tap.break_next_write.swap(false, Ordering::SeqCst) {
            // What a device that went away looks like to the library: the daemon hears a
            // SHUTDOWN of both directions and parks the session.
            let _ = self.inner.shutdown(Shutdown::Both);
            return Err(io::Error::from_raw_os_error(libc::ECONNRESET));
        }
        let n = self.inner.write(buf)?;
        let mut greetings = self
            .tap
            .greetings
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let g = &mut greetings[self.index];
        let take = n.min(MAX_FRAME_LEN - g.len());
        g.extend_from_slice(&buf[..take]);
        Ok(n)
    }

    fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        self.inner.shutdown(how)
    }

    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.inner.set_read_timeout(timeout)
    }

    fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.inner.set_write_timeout(timeout)
    }
}

fn own_failure(s: &SessionStream, round: u64, what: &str, e: &io::Error) -> Failure {
    let why = s.failure().map_or_else(String::new, |f| format!(" ({f})"));
    Failure::io(&format!("own session, round {round}: {what}{why}"), e)
}

/// One echo round trip of `ECHO_BYTES` on the own session.
fn echo(s: &SessionStream, round: u64) -> CmdResult {
    let msg = echo_send(s, round)?;
    echo_recv(s, round, &msg)
}

/// The sending half of round `round`: returns what was sent.
fn echo_send(s: &SessionStream, round: u64) -> Result<Vec<u8>, Failure> {
    let msg = PatternStream::new(900 + round).take(ECHO_BYTES);
    s.send_all(&msg)
        .map_err(|e| own_failure(s, round, "send", &e))?;
    Ok(msg)
}

/// The receiving half of round `round`, which sent `msg`.
fn echo_recv(s: &SessionStream, round: u64, msg: &[u8]) -> CmdResult {
    let explain = |what: &str, e: &io::Error| own_failure(s, round, what, e);
    let mut back = vec![0u8; msg.len()];
    let mut got = 0;
    while got < back.len() {
        match s.recv(&mut back[got..]) {
            Ok(0) => return Err(Failure(format!("own session, round {round}: EOF"))),
            Ok(n) => got += n,
            Err(e) => return Err(explain("recv", &e)),
        }
    }
    if back != msg {
        return Err(Failure(format!("own session, round {round}: echo differs")));
    }
    Ok(())
}

/// `replay`: captures a real RESUME of our own session and sends it again.
fn replay(port: u32, timeout: Duration, quiet: Duration) -> Result<(Outcome, String), Failure> {
    let tap = Arc::new(Tap::default());
    let dialer = TapDialer {
        inner: VsockDialer::host(),
        tap: tap.clone(),
    };
    let s = SessionStream::connect_with(
        Box::new(dialer),
        VMADDR_CID_HOST,
        port,
        session_options(timeout),
    )
    .map_err(|e| Failure::io(&format!("own session to 2:{port}"), &e))?;
    let id = s.session_id();
    echo(&s, 0)?;
    tap.break_next_write.store(true, Ordering::SeqCst);
    // The write that breaks resumes the session, through a second connection, and then
    // goes out on it.
    let sent = echo_send(&s, 1)?;
    let greetings = tap.greetings();
    let captured = match greetings.get(1).map(|g| (Frame::decode(g), g)) {
        Some((Ok(Some((Frame::Resume { id: named, .. }, used))), g))
            if named == id && used == g.len() =>
        {
            g.clone()
        }
        _ => {
            return Err(Failure(format!(
                "own session: no RESUME captured on the second connection ({} connections)",
                greetings.len()
            )))
        }
    };
    // That write told the daemon we read its RESUMED (its `fwd_cnt`, in the same queue
    // ahead of the replay), so the nonce the captured proof was made for is void now (see
    // `prev_nonce` in domsockd). The captured count, though, is still one the daemon can
    // resume from (we have read nothing since): only the proof stands between the replay
    // and the session.
    let outcome = attempt("replay", &captured, false, timeout, quiet)?;
    // Unharmed: it still echoes, and it was resumed once, by us.
    echo_recv(&s, 1, &sent)?;
    echo(&s, 2)?;
    let resumes = s.stats().resumes;
    s.shutdown(Shutdown::Write)
        .map_err(|e| Failure::io("own session: shutdown(SHUT_WR)", &e))?;
    let mut buf = [0u8; 64];
    match s.recv(&mut buf) {
        Ok(0) => {}
        Ok(n) => return Err(Failure(format!("own session: {n} bytes after the echoes"))),
        Err(e) => return Err(Failure::io("own session: reading EOF", &e)),
    }
    if resumes != 1 {
        return Err(Failure(format!(
            "own session: {resumes} resumes, expected exactly the one we caused"
        )));
    }
    Ok((
        outcome,
        format!(" own_session={} own_resumes={resumes}", id.hex()),
    ))
}

/// The session id from `--id HEX` or `--id-file PATH` (a file holding it).
fn session_id_arg(o: &mut Opts) -> Result<Option<SessionId>, Failure> {
    let text = match (o.take_str("id"), o.take_str("id-file")) {
        (Some(_), Some(_)) => return Err(Failure("give --id or --id-file, not both".into())),
        (Some(hex), None) => hex,
        (None, Some(path)) => std::fs::read_to_string(&path)
            .map_err(|e| Failure::io(&format!("--id-file {path}"), &e))?,
        (None, None) => return Ok(None),
    };
    SessionId::from_hex(text.trim())
        .map(Some)
        .ok_or_else(|| Failure(format!("session id {:?} is not 32 hex digits", text.trim())))
}

pub(crate) fn cmd_forge_resume(mut o: Opts, timeout: Duration) -> CmdResult {
    let id = session_id_arg(&mut o)?;
    let port = o.size("port")?.map(u32::try_from).transpose();
    let port = port.map_err(|_| Failure("--port does not fit in 32 bits".into()))?;
    let quiet = Duration::from_millis(o.size_or("quiet-ms", QUIET_MS)?);
    let received = o.size_or("received", 0)?;
    let chosen: Vec<String> = match o.take_str("attempts") {
        Some(list) => list.split(',').map(str::to_owned).collect(),
        None => ATTEMPTS
            .iter()
            .filter(|a| id.is_some() || !NEED_ID.contains(a))
            .filter(|a| port.is_some() || !NEED_PORT.contains(a))
            .map(|a| (*a).to_owned())
            .collect(),
    };
    o.finish()?;
    for a in &chosen {
        if !ATTEMPTS.contains(&a.as_str()) {
            return Err(Failure(format!(
                "--attempts: unknown {a:?} (known: {})",
                ATTEMPTS.join(",")
            )));
        }
        if NEED_ID.contains(&a.as_str()) && id.is_none() {
            return Err(Failure(format!("attempt {a} needs --id or --id-file")));
        }
        if NEED_PORT.contains(&a.as_str()) && port.is_none() {
            return Err(Failure(format!("attempt {a} needs --port (a host echo)")));
        }
    }
    // Attempts that name a session name the victim if there is one.
    let named = match id {
        Some(id) => id,
        None => SessionId(random()?),
    };
    let start = Instant::now();
    let mut outcomes = Vec::new();
    let mut own = String::new();
    for a in &chosen {
        let outcome = match a.as_str() {
            "replay" => {
                let (outcome, fields) = replay(port.expect("checked"), timeout, quiet)?;
                own = fields;
                outcome
            }
            other => {
                let (bytes, half_close) = forged_bytes(other, named, received)?;
                attempt(a, &bytes, half_close, timeout, quiet)?
            }
        };
        outcomes.push((a.clone(), outcome));
    }
    let count = |f: &dyn Fn(&Outcome) -> bool| outcomes.iter().filter(|(_, o)| f(o)).count();
    let refused = count(&|o| matches!(o, Outcome::Refused(_)));
    let accepted = count(&|o| matches!(o, Outcome::Accepted(_)));
    let bad = count(&|o| matches!(o, Outcome::BadAnswer(_)));
    println!(
        "DS-RESULT cmd=forge-resume attempts={} refused={refused} accepted={accepted} \
         bad_answers={bad} other={} named={}{own} ms={:.1}",
        outcomes.len(),
        outcomes.len() - refused - accepted - bad,
        named.hex(),
        millis(start.elapsed())
    );
    if accepted > 0 || bad > 0 {
        let which: Vec<&str> = outcomes
            .iter()
            .filter(|(_, o)| matches!(o, Outcome::Accepted(_) | Outcome::BadAnswer(_)))
            .map(|(a, _)| a.as_str())
            .collect();
        return Err(Failure(format!(
            "the daemon accepted (or answered nonsense to) {}",
            which.join(",")
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use domsock_migration::session::wire::WireError;

    /// Each forgery is wrong in exactly the way its name says, as the daemon's own decoder
    /// sees it (the VM test then checks what the daemon answers).
    #[test]
    fn each_forgery_breaks_the_rule_it_is_named_after() {
        let victim = SessionId([7; 16]);
        let decode = |name: &str| {
            let (bytes, half_close) = forged_bytes(name, victim, 4096).expect("bytes");
            (Frame::decode(&bytes), bytes, half_close)
        };
        for name in ["wrong-proof", "random-id"] {
            let (frame, bytes, _) = decode(name);
            let Ok(Some((Frame::Resume { id, .. }, used))) = frame else {
                panic!("{name}: {frame:?}");
            };
            assert_eq!(used, bytes.len(), "{name}: one whole frame");
            assert_eq!(id == victim, name == "wrong-proof", "{name} names {id}");
        }
        assert!(matches!(decode("bad-magic").0, Err(WireError::BadMagic(_))));
        assert_eq!(
            decode("bad-version").0,
            Err(WireError::UnsupportedVersion(9))
        );
        assert_eq!(decode("unknown-kind").0, Err(WireError::UnknownKind(42)));
        assert_eq!(decode("reserved-bits").0, Err(WireError::Reserved));
        assert!(matches!(
            decode("server-frame").0,
            Ok(Some((Frame::Opened { id, .. }, _))) if id == victim
        ));
        assert!(matches!(
            decode("oversized").0,
            Err(WireError::BadLength { len: u16::MAX, .. })
        ));
        let (frame, bytes, half_close) = decode("truncated");
        assert_eq!(frame, Ok(None), "a truncated frame is only incomplete");
        assert_eq!(bytes.len(), TRUNCATED_BYTES);
        assert!(half_close);
        assert!(ATTEMPTS
            .iter()
            .filter(|a| **a != "replay")
            .all(|a| forged_bytes(a, victim, 0).is_ok()));
    }
}
