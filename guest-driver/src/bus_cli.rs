//! `domsock bus join|pub|sub NAME` (part of the `domsock` binary): a member of a bus of
//! domsockd's bus service, from a guest (AF_VSOCK to the host at port 1021) or, with
//! `--unix PATH`, from a host process (the Unix socket `<bus-dir>/<namespace>.sock`).
//! The library is [`domsock_guest::bus`].
//!
//! - `join NAME`: joins (publish and receive) and prints every event until `--for-ms`,
//!   `--messages` or the end of the connection;
//! - `pub NAME [--topic T | --to ADDR [--addr SRC]] [MESSAGE]`: publishes MESSAGE, or each
//!   line of stdin, or with `--count N [--size 64]` N checked pattern messages
//!   ([`domsock_guest::bus::pattern`]), then leaves;
//! - `sub NAME [--topic PREFIX]...`: joins to receive, subscribes (topic buses; no
//!   `--topic` on a topic bus subscribes to every topic) and prints each message on a line.
//!   With `--count N [--senders K]` it checks pattern messages instead: per-sender order
//!   and checksums, and ends once K senders each reached N (or after `--idle-ms` without
//!   an event) with a summary line (its `elapsed_ms` and `msgs_per_s` run from the first
//!   message received to the last).
//!
//! Output lines (text): `DS-READY cmd=bus-<cmd> bus= member= policy= granted= max_message=
//! queue_bytes=` once joined and subscribed; `DS-MSG sender= seq= [topic=|src= dst=] len=
//! data=` (the payload with bytes outside printable ASCII as `\xNN`); `DS-LOSS messages=
//! bytes=`; `DS-BUS-ERROR code= wire= text=`; `DS-REJOINED lost= took_ms=`; `DS-RESULT
//! cmd=bus-<cmd> ...` at the end. `--json`: one JSON object per line instead, with `event`
//! one of `ready`, `message`, `loss`, `error`, `rejoined`, `result`. Failures are
//! `DS-ERROR` lines (exit status 1), as for every command.
//!
//! Without `--unix` it opens an AF_VSOCK socket: guests only.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::io::BufRead;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use domsock_guest::bus::pattern::{pattern_message, OrderCheck, OrderSummary};
use domsock_guest::bus::{BusError, BusEvent, BusMember, JoinOptions};
use domsock_proto::bus::wire::{
    CreateParams, Fields, Policy, SlowPolicy, Want, DEFAULT_MAX_MESSAGE_BYTES, MAX_ADDR_BYTES,
};
use serde_json::json;

use crate::{millis, CmdResult, Failure, Opts, DEFAULT_TIMEOUT_MS};

/// Value-less options of the bus commands.
const BUS_FLAGS: &[&str] = &["json"];
/// Default size of a pattern message.
const DEFAULT_PATTERN_BYTES: u64 = 64;
/// Default wait of a checking `sub` for the next event before it gives up.
const DEFAULT_IDLE_MS: u64 = 10_000;
/// How long `join` and `sub` wait in one receive before checking their own deadline.
const RECV_SLICE_MS: u64 = 200;

const USAGE: &str = bus_usage!();

/// The words after `bus`.
struct BusArgs {
    cmd: String,
    name: String,
    message: Option<String>,
    topics: Vec<String>,
    flags: BTreeSet<String>,
    opts: Opts,
}

impl BusArgs {
    fn parse(args: &[String]) -> Result<Self, Failure> {
        let usage = || Failure(format!("usage:\n{USAGE}"));
        let (cmd, rest) = args.split_first().ok_or_else(usage)?;
        if !matches!(cmd.as_str(), "join" | "pub" | "sub") {
            return Err(Failure(format!(
                "unknown bus command {cmd:?}\nusage:\n{USAGE}"
            )));
        }
        let mut positional = Vec::new();
        let mut topics = Vec::new();
        let mut flags = BTreeSet::new();
        let mut pairs = Vec::new();
        let mut it = rest.iter();
        while let Some(a) = it.next() {
            let Some(name) = a.strip_prefix("--") else {
                positional.push(a.clone());
                continue;
            };
            if BUS_FLAGS.contains(&name) {
                flags.insert(name.to_owned());
                continue;
            }
            let value = it
                .next()
                .ok_or_else(|| Failure(format!("--{name} needs a value")))?;
            if name == "topic" {
                topics.push(value.clone());
            } else {
                pairs.push(a.clone());
                pairs.push(value.clone());
            }
        }
        let mut positional = positional.into_iter();
        let name = positional
            .next()
            .ok_or_else(|| Failure(format!("bus {cmd}: NAME is required\nusage:\n{USAGE}")))?;
        let message = positional.next();
        if message.is_some() && cmd != "pub" {
            return Err(Failure(format!("bus {cmd} takes one word, the bus NAME")));
        }
        if let Some(extra) = positional.next() {
            return Err(Failure(format!(
                "unexpected {extra:?}: quote a MESSAGE of several words"
            )));
        }
        if cmd == "pub" && topics.len() > 1 {
            return Err(Failure("bus pub takes one --topic".into()));
        }
        Ok(Self {
            cmd: cmd.clone(),
            name,
            message,
            topics,
            flags,
            opts: Opts::parse(&pairs)?,
        })
    }
}

/// A bus error with its causes, for a `DS-ERROR` line.
fn failure(context: &str, e: &BusError) -> Failure {
    let mut msg = format!("{context}: {e}");
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        let _ = write!(msg, ": {c}");
        cause = c.source();
    }
    Failure(msg)
}

fn parse_policy(s: &str) -> Result<Policy, Failure> {
    match s {
        "hub" => Ok(Policy::Hub),
        "switch" => Ok(Policy::Switch),
        "topic" => Ok(Policy::Topic),
        _ => Err(Failure(format!("--create {s:?}: hub, switch or topic"))),
    }
}

/// `0a0b`, `aa:bb:cc`: 1 to 16 bytes.
fn parse_addr(s: &str) -> Result<Vec<u8>, Failure> {
    let hex: String = s.chars().filter(|&c| c != ':').collect();
    let bad = || Failure(format!("address {s:?}: 1-{MAX_ADDR_BYTES} bytes in hex"));
    if hex.is_empty() || hex.len() % 2 != 0 || hex.len() > 2 * MAX_ADDR_BYTES {
        return Err(bad());
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2).ok_or_else(bad)?, 16).map_err(|_| bad()))
        .collect()
}

fn hex(b: &[u8]) -> String {
    b.iter().fold(String::new(), |mut s, x| {
        let _ = write!(s, "{x:02x}");
        s
    })
}

/// Printable ASCII as is, `\` as `\\`, other bytes (and spaces, unless `spaces`) as
/// `\xNN`: one line, every byte recoverable.
fn escape_with(b: &[u8], spaces: bool) -> String {
    let mut s = String::with_capacity(b.len());
    for &c in b {
        match c {
            b'\\' => s.push_str("\\\\"),
            b' ' if spaces => s.push(' '),
            0x21..=0x7e => s.push(char::from(c)),
            _ => {
                let _ = write!(s, "\\x{c:02x}");
            }
        }
    }
    s
}

/// [`escape_with`] for a `key=value` token (spaces escaped).
fn escape(b: &[u8]) -> String {
    escape_with(b, false)
}

/// What the member was given on the command line.
struct MemberArgs {
    unix: Option<PathBuf>,
    json: bool,
    rejoin: Duration,
    join: JoinOptions,
}

fn member_args(a: &mut BusArgs, default_want: Want) -> Result<MemberArgs, Failure> {
    let o = &mut a.opts;
    let timeout = Duration::from_millis(o.size_or("timeout-ms", DEFAULT_TIMEOUT_MS)?);
    let want = match o.take_str("want").as_deref() {
        None => default_want,
        Some("publish") => Want {
            publish: true,
            receive: false,
        },
        Some("receive") => Want {
            publish: false,
            receive: true,
        },
        Some("both") => Want::BOTH,
        Some(w) => return Err(Failure(format!("--want {w:?}: publish, receive or both"))),
    };
    let create = match o.take_str("create") {
        None => {
            for k in ["max-message", "queue-bytes", "slow"] {
                if o.take_str(k).is_some() {
                    return Err(Failure(format!("--{k} needs --create")));
                }
            }
            None
        }
        Some(p) => {
            let policy = parse_policy(&p)?;
            let max_message =
                u32::try_from(o.size_or("max-message", u64::from(DEFAULT_MAX_MESSAGE_BYTES))?)
                    .map_err(|_| Failure("--max-message too large".into()))?;
            let queue_bytes = u32::try_from(o.size_or(
                "queue-bytes",
                u64::from(domsock_guest::bus::DEFAULT_QUEUE_BYTES),
            )?)
            .map_err(|_| Failure("--queue-bytes too large".into()))?;
            let slow = match o.take_str("slow").as_deref() {
                None | Some("drop") => SlowPolicy::Drop,
                Some("disconnect") => SlowPolicy::Disconnect,
                Some(s) => return Err(Failure(format!("--slow {s:?}: drop or disconnect"))),
            };
            Some(CreateParams {
                policy,
                slow,
                max_message,
                queue_bytes,
            })
        }
    };
    Ok(MemberArgs {
        unix: o.take_str("unix").map(PathBuf::from),
        json: a.flags.contains("json"),
        rejoin: Duration::from_millis(o.size_or("rejoin-ms", 0)?),
        join: JoinOptions {
            want,
            create,
            timeout,
        },
    })
}

fn join(name: &str, m: &MemberArgs) -> Result<BusMember, Failure> {
    let r = match &m.unix {
        Some(path) => BusMember::join_unix(path, name, &m.join),
        None => BusMember::join_guest(name, &m.join),
    };
    r.map_err(|e| failure(&format!("join {name}"), &e))
}

fn granted(w: Want) -> &'static str {
    match (w.publish, w.receive) {
        (true, true) => "publish,receive",
        (true, false) => "publish",
        (false, true) => "receive",
        (false, false) => "none",
    }
}

fn print_ready(cmd: &str, member: &BusMember, json: bool) {
    let j = member.joined();
    if json {
        println!(
            "{}",
            json!({"event": "ready", "cmd": format!("bus-{cmd}"), "bus": member.bus().as_str(),
                "member": j.member.0, "policy": j.policy.to_string(), "granted": granted(j.granted),
                "max_message": j.max_message, "queue_bytes": j.queue_bytes})
        );
    } else {
        println!(
            "DS-READY cmd=bus-{cmd} bus={} member={} policy={} granted={} max_message={} queue_bytes={}",
            member.bus(),
            j.member.0,
            j.policy,
            granted(j.granted),
            j.max_message,
            j.queue_bytes
        );
    }
}

/// Bytes as a JSON string if they are UTF-8, else their hex under `<key>_hex`.
fn json_bytes(obj: &mut serde_json::Map<String, serde_json::Value>, key: &str, b: &[u8]) {
    match std::str::from_utf8(b) {
        Ok(s) => obj.insert(key.into(), s.into()),
        Err(_) => obj.insert(format!("{key}_hex"), hex(b).into()),
    };
}

fn print_event(ev: &BusEvent<'_>, json: bool) {
    match ev {
        BusEvent::Message(m) => {
            if json {
                let mut o = serde_json::Map::new();
                o.insert("event".into(), "message".into());
                o.insert("sender".into(), m.sender.0.into());
                o.insert("seq".into(), m.seq.into());
                match m.fields {
                    Fields::None => {}
                    Fields::Topic(t) => json_bytes(&mut o, "topic", t),
                    Fields::Addressed { src, dst } => {
                        o.insert("src".into(), hex(src).into());
                        o.insert("dst".into(), hex(dst).into());
                    }
                }
                o.insert("len".into(), m.payload.len().into());
                json_bytes(&mut o, "data", m.payload);
                println!("{}", serde_json::Value::Object(o));
            } else {
                let fields = match m.fields {
                    Fields::None => String::new(),
                    Fields::Topic(t) => format!(" topic={}", escape(t)),
                    Fields::Addressed { src, dst } => format!(" src={} dst={}", hex(src), hex(dst)),
                };
                println!(
                    "DS-MSG sender={} seq={}{fields} len={} data={}",
                    m.sender.0,
                    m.seq,
                    m.payload.len(),
                    escape_with(m.payload, true)
                );
            }
        }
        BusEvent::Loss { messages, bytes } => {
            if json {
                println!(
                    "{}",
                    json!({"event": "loss", "messages": messages, "bytes": bytes})
                );
            } else {
                println!("DS-LOSS messages={messages} bytes={bytes}");
            }
        }
        BusEvent::Error { code, wire, text } => {
            if json {
                println!(
                    "{}",
                    json!({"event": "error", "code": format!("{code:?}"), "wire": wire, "text": text})
                );
            } else {
                println!("DS-BUS-ERROR code={code:?} wire={wire} text={text}");
            }
        }
        BusEvent::Subscribed { subscribe, prefix } => {
            if json {
                println!(
                    "{}",
                    json!({"event": "subscribed", "subscribe": subscribe, "prefix": escape(prefix)})
                );
            } else {
                println!(
                    "DS-SUBSCRIBED subscribe={subscribe} prefix={}",
                    escape(prefix)
                );
            }
        }
    }
}

/// Entry point: `args` are the words after `bus`.
pub fn cmd_bus(args: &[String]) -> CmdResult {
    let mut a = BusArgs::parse(args)?;
    match a.cmd.as_str() {
        "pub" => cmd_pub(a),
        "sub" => {
            let m = member_args(
                &mut a,
                Want {
                    publish: false,
                    receive: true,
                },
            )?;
            cmd_listen(a, m)
        }
        _ => {
            let m = member_args(&mut a, Want::BOTH)?;
            cmd_listen(a, m)
        }
    }
}

fn cmd_pub(mut a: BusArgs) -> CmdResult {
    let m = member_args(
        &mut a,
        Want {
            publish: true,
            receive: false,
        },
    )?;
    let o = &mut a.opts;
    let to = o.take_str("to").map(|s| parse_addr(&s)).transpose()?;
    let src = o.take_str("addr").map(|s| parse_addr(&s)).transpose()?;
    let count = o.size("count")?;
    let size = o.usize_or("size", DEFAULT_PATTERN_BYTES as usize)?;
    let topic = a.topics.pop();
    if to.is_some() && topic.is_some() {
        return Err(Failure("give --topic or --to, not both".into()));
    }
    if count.is_some() && a.message.is_some() {
        return Err(Failure("give MESSAGE or --count, not both".into()));
    }
    std::mem::replace(&mut a.opts, Opts::parse(&[])?).finish()?;
    let mut member = join(&a.name, &m)?;
    // A switch bus needs a source address: by default the member's number.
    let src = src.unwrap_or_else(|| member.id().0.to_be_bytes().to_vec());
    print_ready("pub", &member, m.json);
    let start = Instant::now();
    let mut sent = 0u64;
    let mut bytes = 0u64;
    let mut rejoins = 0u64;
    let mut buf = Vec::new();
    let mut lines = std::io::stdin().lock().lines();
    loop {
        let payload: &[u8] = match (count, &a.message) {
            (Some(n), _) if sent >= n => break,
            (Some(_), _) => {
                pattern_message(sent, size, &mut buf);
                &buf
            }
            (None, Some(msg)) if sent == 0 => msg.as_bytes(),
            (None, Some(_)) => break,
            (None, None) => match lines.next() {
                None => break,
                Some(l) => {
                    buf = l.map_err(|e| Failure::io("stdin", &e))?.into_bytes();
                    &buf
                }
            },
        };
        let f = match (&topic, &to) {
            (Some(t), _) => Fields::Topic(t.as_bytes()),
            (None, Some(dst)) => Fields::Addressed { src: &src, dst },
            (None, None) => Fields::None,
        };
        match member.publish_with(f, payload) {
            Ok(()) => {}
            Err(BusError::Disconnected(_)) if !m.rejoin.is_zero() => {
                // The message is not known to have gone: send it again after the rejoin.
                rejoin(&mut member, m.rejoin, m.json)?;
                rejoins += 1;
                member
                    .publish_with(f, payload)
                    .map_err(|e| failure("publish", &e))?;
            }
            Err(e) => return Err(failure("publish", &e)),
        }
        sent += 1;
        bytes += payload.len() as u64;
    }
    let took = start.elapsed();
    let member_id = member.id().0;
    member.leave().map_err(|e| failure("leave", &e))?;
    let rate = sent as f64 / took.as_secs_f64().max(1e-9);
    if m.json {
        println!(
            "{}",
            json!({"event": "result", "cmd": "bus-pub", "bus": a.name, "member": member_id,
                "sent": sent, "bytes": bytes, "rejoins": rejoins,
                "elapsed_ms": millis(took), "msgs_per_s": rate.round()})
        );
    } else {
        println!(
            "DS-RESULT cmd=bus-pub bus={} member={member_id} sent={sent} bytes={bytes} rejoins={rejoins} elapsed_ms={:.1} msgs_per_s={:.0}",
            a.name,
            millis(took),
            rate
        );
    }
    Ok(())
}

/// Rejoins after the connection ended, printing how it went.
fn rejoin(member: &mut BusMember, within: Duration, json: bool) -> CmdResult {
    let start = Instant::now();
    let lost = member
        .rejoin_within(within)
        .map_err(|e| failure("rejoin", &e))?;
    let took = millis(start.elapsed());
    if json {
        println!(
            "{}",
            json!({"event": "rejoined", "lost": lost, "took_ms": took})
        );
    } else {
        println!("DS-REJOINED lost={lost} took_ms={took:.1}");
    }
    Ok(())
}

/// `join` and `sub`: receive and print (or check) until done.
fn cmd_listen(mut a: BusArgs, m: MemberArgs) -> CmdResult {
    let o = &mut a.opts;
    let for_ms = o.size("for-ms")?.map(Duration::from_millis);
    let max_messages = o.size("messages")?;
    let count = o.size("count")?;
    let senders = o.usize_or("senders", 1)?;
    let max_lost = o.size_or("max-lost", 0)?;
    let stall = Duration::from_millis(o.size_or("stall-ms", 0)?);
    let idle = o
        .size("idle-ms")?
        .or(count.map(|_| DEFAULT_IDLE_MS))
        .map(Duration::from_millis);
    let announce = o.take_str("addr").map(|s| parse_addr(&s)).transpose()?;
    std::mem::replace(&mut a.opts, Opts::parse(&[])?).finish()?;
    let mut m = m;
    if announce.is_some() {
        m.join.want.publish = true;
    }
    let mut member = join(&a.name, &m)?;
    let policy = member.joined().policy;
    if policy == Policy::Topic {
        let prefixes: Vec<&[u8]> = if a.topics.is_empty() && a.cmd == "sub" {
            vec![b""]
        } else {
            a.topics.iter().map(|t| t.as_bytes()).collect()
        };
        for p in prefixes {
            member
                .subscribe(p)
                .map_err(|e| failure(&format!("subscribe {:?}", escape(p)), &e))?;
        }
    } else if !a.topics.is_empty() {
        return Err(Failure(format!(
            "--topic on a {policy} bus: only topic buses have topics"
        )));
    }
    if let Some(src) = &announce {
        // A switch learns a member's address from what it publishes.
        member
            .publish_to(src, &[0xFF], b"")
            .map_err(|e| failure("announce", &e))?;
    }
    print_ready(&a.cmd, &member, m.json);
    if !stall.is_zero() {
        std::thread::sleep(stall);
    }
    let start = Instant::now();
    // The rate counts from the first message to the last.
    let mut first: Option<Instant> = None;
    let mut last = start;
    let mut check = OrderCheck::new();
    let mut messages = 0u64;
    let mut last_event = Instant::now();
    let mut rejoins = 0u64;
    loop {
        if count.is_some_and(|n| check.complete(n, senders))
            || max_messages.is_some_and(|n| messages >= n)
            || for_ms.is_some_and(|t| start.elapsed() >= t)
            || idle.is_some_and(|t| last_event.elapsed() >= t)
        {
            break;
        }
        match member.recv_timeout(Duration::from_millis(RECV_SLICE_MS)) {
            Ok(None) => continue,
            Ok(Some(ev)) => {
                last_event = Instant::now();
                match (&ev, count) {
                    (BusEvent::Message(msg), Some(_)) => check.message(msg),
                    (BusEvent::Loss { messages, .. }, Some(_)) => {
                        check.reported_loss(*messages);
                        print_event(&ev, m.json);
                    }
                    _ => print_event(&ev, m.json),
                }
                if matches!(ev, BusEvent::Message(_)) {
                    messages += 1;
                    first.get_or_insert(last_event);
                    last = last_event;
                }
            }
            Err(BusError::Disconnected(_)) if !m.rejoin.is_zero() => {
                let before = member.stats().lost_messages;
                rejoin(&mut member, m.rejoin, m.json)?;
                check.reported_loss(member.stats().lost_messages - before);
                rejoins += 1;
                last_event = Instant::now();
            }
            Err(BusError::Disconnected(_)) if count.is_none() && a.cmd == "join" => break,
            Err(e) => return Err(failure("receive", &e)),
        }
    }
    let took = first.map_or(Duration::ZERO, |f| last - f);
    let stats = member.stats();
    let member_id = member.id().0;
    let _ = member.leave();
    let s: OrderSummary = check.summary(count);
    let rate = messages as f64 / took.as_secs_f64().max(1e-9);
    let cmd = format!("bus-{}", a.cmd);
    if m.json {
        let mut v = json!({"event": "result", "cmd": cmd, "bus": a.name, "member": member_id,
            "messages": messages, "lost_reported": stats.lost_messages, "rejoins": rejoins,
            "elapsed_ms": millis(took), "msgs_per_s": rate.round()});
        if count.is_some() {
            v["received"] = s.received.into();
            v["senders"] = s.senders.into();
            v["out_of_order"] = s.out_of_order.into();
            v["bad"] = s.bad.into();
            v["lost"] = s.lost.into();
            v["loss_reported"] = s.loss_reported.into();
        }
        println!("{v}");
    } else if count.is_some() {
        println!(
            "DS-RESULT cmd={cmd} bus={} member={member_id} received={} senders={} out_of_order={} bad={} lost={} loss_reported={} rejoins={rejoins} elapsed_ms={:.1} msgs_per_s={rate:.0}",
            a.name,
            s.received,
            s.senders,
            s.out_of_order,
            s.bad,
            s.lost,
            s.loss_reported,
            millis(took)
        );
    } else {
        println!(
            "DS-RESULT cmd={cmd} bus={} member={member_id} messages={messages} lost_reported={} rejoins={rejoins} elapsed_ms={:.1}",
            a.name,
            stats.lost_messages,
            millis(took)
        );
    }
    if let Some(n) = count {
        let mut wrong = Vec::new();
        if s.senders < senders {
            wrong.push(format!("{} of {senders} senders", s.senders));
        }
        if s.out_of_order > 0 {
            wrong.push(format!("{} out of order", s.out_of_order));
        }
        if s.bad > 0 {
            wrong.push(format!("{} bad", s.bad));
        }
        if s.lost > max_lost {
            wrong.push(format!(
                "{} of {} lost (at most {max_lost} allowed)",
                s.lost,
                n * senders as u64
            ));
        }
        if !wrong.is_empty() {
            return Err(Failure(format!("check failed: {}", wrong.join(", "))));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn bus_args_take_a_name_a_message_and_repeated_topics() {
        let a = BusArgs::parse(&words(&[
            "sub", "s", "--topic", "a/", "--json", "--topic", "b/", "--unix", "/x",
        ]))
        .unwrap();
        assert_eq!((a.cmd.as_str(), a.name.as_str()), ("sub", "s"));
        assert_eq!(a.topics, ["a/", "b/"]);
        assert!(a.flags.contains("json"));
        let a = BusArgs::parse(&words(&["pub", "s", "hello world", "--to", "0a"])).unwrap();
        assert_eq!(a.message.as_deref(), Some("hello world"));
        assert!(BusArgs::parse(&words(&["sub", "s", "extra"])).is_err());
        assert!(BusArgs::parse(&words(&["pub", "s", "a", "b"])).is_err());
        assert!(BusArgs::parse(&words(&["pub"])).is_err());
        assert!(BusArgs::parse(&words(&["nope", "s"])).is_err());
        assert!(BusArgs::parse(&words(&["pub", "s", "--topic", "a", "--topic", "b"])).is_err());
    }

    #[test]
    fn addresses_are_hex_and_payloads_print_on_one_line() {
        assert_eq!(parse_addr("0a0B").unwrap(), [0x0a, 0x0b]);
        assert_eq!(parse_addr("aa:bb:cc").unwrap(), [0xaa, 0xbb, 0xcc]);
        assert!(parse_addr("").is_err());
        assert!(parse_addr("abc").is_err());
        assert!(parse_addr("zz").is_err());
        assert!(parse_addr(&"00".repeat(17)).is_err());
        assert_eq!(escape(b"a b\\\n\xff"), "a\\x20b\\\\\\x0a\\xff");
        assert_eq!(escape_with(b"a b", true), "a b");
    }
}
