//! Sessions whose guest runs on another host than their host end: the runtime of the
//! session relay protocol ([`domsock_migration::relay`], which has the sequence diagram)
//! over the tunnel.
//!
//! Two kinds of relay, one thread each, both moving bytes between one socket and one
//! tunnel channel in relay frames:
//! - a **home relay** holds a session's host end (a host process's socket, or the socket
//!   pair into a sibling guest's engine) while the session's guest runs elsewhere. It
//!   starts when this host exports a session it is home of, and it is the only party that
//!   acts on a HANDOFF: back home (the session is imported here with its host end: the
//!   route is the local ring path again) or on to another host (a new direct channel
//!   there; the old one ends).
//! - a **guest relay** carries a session imported here from another host: the session
//!   lives in the domain's engine like any parked session, with one end of a socket pair
//!   as its host end; the relay joins the other end to the channel. When this host
//!   exports the domain, the relay takes the session out of the engine again with every
//!   byte in flight and hands it off to the home.
//!
//! A peer may open a relay channel only for a domain configured here in the same
//! namespace, while an `adopt` of it is in force ([`ADOPTION_WINDOW_MS`]); anything else
//! is refused and counted. A relayed session cannot reach anything: it carries bytes
//! between the guest, which must prove its secret to resume it, and the host end its home
//! host opened under its own policy.
//!
//! Errors end the one session: a channel that breaks or times out closes the socket on
//! each side, so the host process reads EOF (or a reset) and the guest's session is
//! refused or reset like one whose host end closed.
//!
//! **Joining a sibling pair.** A session between two guests made here (the dialer's
//! session and the acceptor's, one socket pair between them: [`crate::router::SiblingPair`])
//! has one home relay per half once both guests ran elsewhere. When both home relays go
//! to the same host, this host asks that host to join them (a join request channel:
//! [`JoinOpen`]); that host, if both halves are guest relays from here and its policy
//! still allows the dialer to reach the acceptor on the port, swaps
//! both engines' host ends to placeholders at once, sends what the engines had written
//! into the old pairs and then END on each channel, and takes what the home forwards up
//! to its END (held, bounded by [`JOIN_MAX_HELD_BYTES`]). The home needs only half-close:
//! a home relay that reads END writes what it has and shuts its socket end's write side;
//! the partner half's relay then reads EOF and answers with END. When both halves held
//! everything, the joining host gives both engines a fresh local pair, each with what was
//! in flight towards its guest (and what the other engine wrote into its placeholder
//! meanwhile) in front. Both channels close, the home's relays end and the pair's home is
//! the joining host. The sequence diagram is in [`domsock_migration::relay`].
//!
//! A join that fails half-way (a channel breaks, [`JOIN_TIMEOUT_MS`] passes, a half
//! would hold more than its bound) ends both sessions like a relay failure: each guest's
//! connection is reset and its RESUME refused `Expired` (expired while its placeholder is
//! still held, so the engine never reads the placeholder's close as an end of stream),
//! the home's host ends close, and `join_failed` counts the pair once. An export of
//! either guest waits for a running join (its handoff request is answered after it) and
//! then exports the joined session from here. A refused join request counts
//! `join_refused`; the pair stays relayed. Joined halves get each other as targets
//! ([`crate::engine::DataPlane::set_session_target`]), so this host's reloads recheck
//! them like a pair made here. Fault injection for tests: [`RelayService::hold_joins`].
//!
//! **Policy at reloads.** A home relay answers for its session's target: when the
//! router's policy generation moves (a SIGHUP reload), it checks the target again as the
//! engine's `recheck_policy` does a local session; a target no longer allowed ends the
//! session on both ends (the channel is aborted, so the guest side expires it) and counts
//! `policy_resets`. The relay metadata names the target ([`RelayTarget`]) so that the
//! joining host can check the halves name each other.
//!
//! **Tails.** A home that sends a session away cuts a stream snapshot's tail to the
//! replay buffer and sends the rest as DATA after it (`trim_tail`): a session that came
//! home with every relay buffer's bytes in its tail leaves with them in the path, so its
//! next homecoming carries no more.
//!
//! What it does not do: survive a domsockd restart, or join a pair whose policy at the
//! joining host forbids it (it stays relayed, logged).

use crate::engine::ExportedSession;
use crate::host::HostSocket;
use crate::server::device::lock_plane;
use crate::tunables::{
    ADOPTION_WINDOW_MS, JOIN_MAX_HELD_BYTES, JOIN_TIMEOUT_MS, MAX_RELAYED_SESSIONS,
    RELAY_CHANNEL_MAX_WINDOW_BYTES, RELAY_MAX_TAIL_BYTES, RELAY_SEND_BUFFER, RELAY_STEP_TIMEOUT_MS,
    SESSION_REPLAY_BYTES,
};
use crate::tunnel::{
    Acceptor, BrokenReason, ChannelEnd, ChannelKind, ChannelState, Refusal, RefusalCode,
    TunnelService,
};
use crate::vm::VmShared;
use domsock_migration::relay::{
    self, data_payloads, extend_tail, Frame, JoinOpen, PairRole, RelayOpen, RelayTarget,
    FRAME_HEADER_LEN, MAX_DATA,
};
use domsock_migration::session::snapshot::SessionSnapshot;
use domsock_migration::session::SessionId;
use domsock_migration::tunnel::CloseReason;
use domsock_proto::{Cid, Port, SocketType};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use std::collections::{HashMap, VecDeque};
use std::io::{self, ErrorKind, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};
use tracing::{debug, info, warn};

/// One VM this daemon serves, as the admin and relay services see it.
#[derive(Debug, Clone)]
pub struct ServedVm {
    /// Its shared state (name, CID, counters, frontend flag).
    pub shared: Arc<VmShared>,
    /// Its namespace.
    pub namespace: String,
    /// Its engine.
    pub plane: Arc<Mutex<crate::engine::DataPlane>>,
}

/// Counters of the relay service (admin `status` reports them).
#[derive(Debug, Default)]
pub struct RelayStats {
    /// Sessions this host exported as their home (a home relay started).
    pub exported_home: AtomicU64,
    /// Sessions imported here from a peer (a guest relay started).
    pub imported: AtomicU64,
    /// Handoffs this host sent as a guest side (the guest moved on).
    pub handed_off: AtomicU64,
    /// Sessions that came back home (the route is local again).
    pub returned_home: AtomicU64,
    /// Sessions re-rooted from one guest host to another by their home.
    pub rerooted: AtomicU64,
    /// Handoffs that failed, whose session went back to the host that sent it.
    pub sent_back: AtomicU64,
    /// Relay channels refused (no adoption, wrong namespace, bad metadata, ...).
    pub refused: AtomicU64,
    /// Relays that ended with an error (channel broken or timed out, socket failed).
    pub failed: AtomicU64,
    /// Sibling pairs joined here (both halves local again; counted once per pair).
    pub joined: AtomicU64,
    /// Joins that started here and failed (both sessions ended; counted once per pair).
    pub join_failed: AtomicU64,
    /// Join requests refused here: the pair is not relayed here from the requester, a
    /// half is busy, or the policy here does not let the dialer reach the acceptor (the
    /// pair stays relayed).
    pub join_refused: AtomicU64,
    /// Relayed sessions this host (their home) ended at a policy reload that no longer
    /// allows their target.
    pub policy_resets: AtomicU64,
}

fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// What one relay is, for `status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayInfo {
    /// The session.
    pub session: SessionId,
    /// Its domain.
    pub vm: String,
    /// `home` (its host end is here) or `guest` (its guest runs here).
    pub role: &'static str,
    /// The host at the other end of the channel.
    pub peer: String,
}

type Reply = mpsc::Sender<Result<(), String>>;

/// The answer to a handoff request whose session was joined meanwhile: it is local here
/// now, and the export takes it from the engine instead.
const JOINED_HERE: &str = "joined here";

/// The handle of one home relay.
struct HomeCtl {
    info: Mutex<RelayInfo>,
    /// The partner half's home relay read END and shut the peer of this relay's socket:
    /// the EOF read next is the join's, answered with END (not a shutdown of the channel).
    end_on_eof: Arc<AtomicBool>,
    /// The session is the acceptor half of a sibling pair ([`ExportedSession::accepted`]):
    /// it comes home as one.
    accepted: bool,
    wake: UnixStream,
    wake_rx: UnixStream,
}

impl HomeCtl {
    fn new(info: RelayInfo, accepted: bool) -> io::Result<Self> {
        let (wake, wake_rx) = UnixStream::pair()?;
        wake.set_nonblocking(true)?;
        wake_rx.set_nonblocking(true)?;
        Ok(Self {
            info: Mutex::new(info),
            end_on_eof: Arc::new(AtomicBool::new(false)),
            accepted,
            wake,
            wake_rx,
        })
    }

    fn wake(&self) {
        let _ = (&self.wake).write(&[1]);
    }

    fn clear(&self) {
        let mut b = [0u8; 64];
        while matches!((&self.wake_rx).read(&mut b), Ok(n) if n > 0) {}
    }
}

/// Where a guest relay's half of a join stands (see the module doc).
#[derive(Debug, Default)]
enum JoinState {
    #[default]
    Idle,
    /// Both engines feed placeholders: the relay thread takes these and drains its half.
    Started {
        old: HostSocket,
        placeholder: HostSocket,
        write_shut: bool,
        since: Instant,
        partner: SessionId,
        role: PairRole,
        port: u32,
    },
    /// The relay thread is draining.
    Draining,
    /// Everything towards this half's guest is held.
    Ready {
        held: Vec<u8>,
        placeholder: HostSocket,
    },
    /// Both engines have their new pair.
    Done,
    /// The join failed; both sessions end.
    Failed(String),
}
/// The handle of one guest relay.
struct GuestCtl {
    info: RelayInfo,
    /// The session's target, as its home named it (`None` from a version-2 home).
    target: Option<RelayTarget>,
    /// A handoff asked for: the destination and where to answer.
    request: Mutex<Option<(String, Reply)>>,
    /// A handoff was sent: a channel bringing the session back is accepted.
    handing: AtomicBool,
    /// Its half of a join.
    join: Mutex<JoinState>,
    /// Written to wake the relay thread; it reads `wake_rx`.
    wake: UnixStream,
    wake_rx: UnixStream,
}

impl GuestCtl {
    fn wake(&self) {
        let _ = (&self.wake).write(&[1]);
    }

    fn clear(&self) {
        let mut b = [0u8; 64];
        while matches!((&self.wake_rx).read(&mut b), Ok(n) if n > 0) {}
    }
}

/// The relay service of one host.
pub struct RelayService {
    host: String,
    me: Weak<RelayService>,
    tunnel: OnceLock<Arc<TunnelService>>,
    vms: Vec<ServedVm>,
    adoptions: Mutex<HashMap<String, Instant>>,
    homes: Mutex<HashMap<SessionId, Arc<HomeCtl>>>,
    guests: Mutex<HashMap<SessionId, Arc<GuestCtl>>>,
    /// Held while JOINs are matched and while a join's last step runs (one at a time).
    join_match: Mutex<()>,
    /// Fault injection for tests (admin `hold-joins`): a join that starts here waits this
    /// long on its placeholders before it drains. 0 in normal operation.
    join_hold_ms: AtomicU64,
    /// `hold-joins` is accepted (domsockd `--fault-injection`).
    fault_injection: AtomicBool,
    /// Counters.
    pub stats: RelayStats,
}

impl std::fmt::Debug for RelayService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayService")
            .field("host", &self.host)
            .finish_non_exhaustive()
    }
}

fn step_timeout() -> Duration {
    Duration::from_millis(RELAY_STEP_TIMEOUT_MS)
}

impl RelayService {
    /// A relay service for host `host` serving `vms`; give it its tunnel with
    /// [`RelayService::set_tunnel`] (the tunnel takes this service as its acceptor).
    pub fn new(host: String, vms: Vec<ServedVm>) -> Arc<Self> {
        Arc::new_cyclic(|me| Self {
            host,
            me: me.clone(),
            tunnel: OnceLock::new(),
            vms,
            adoptions: Mutex::new(HashMap::new()),
            homes: Mutex::new(HashMap::new()),
            guests: Mutex::new(HashMap::new()),
            join_match: Mutex::new(()),
            join_hold_ms: AtomicU64::new(0),
            fault_injection: AtomicBool::new(false),
            stats: RelayStats::default(),
        })
    }

    /// The tunnel service sessions travel in.
    pub fn set_tunnel(&self, t: Arc<TunnelService>) {
        let _ = self.tunnel.set(t);
    }

    /// Fault injection for tests: every join that starts here from now on holds both
    /// engines on their placeholders `ms` before it drains (at most half of
    /// [`JOIN_TIMEOUT_MS`]), so a test can cut the tunnel, kill the home, move a half or
    /// half-close a stream while the join runs. 0 turns it off. Refused unless
    /// [`RelayService::allow_fault_injection`] was called.
    pub fn hold_joins(&self, ms: u64) -> Result<(), String> {
        if !self.fault_injection.load(Ordering::Relaxed) {
            return Err("fault injection is off (domsockd --fault-injection turns it on)".into());
        }
        if ms > JOIN_TIMEOUT_MS / 2 {
            return Err(format!("at most {} ms", JOIN_TIMEOUT_MS / 2));
        }
        self.join_hold_ms.store(ms, Ordering::Relaxed);
        warn!(ms, "fault injection: joins hold on their placeholders");
        Ok(())
    }

    /// Accepts fault-injection requests from now on (tests only).
    pub fn allow_fault_injection(&self) {
        self.fault_injection.store(true, Ordering::Relaxed);
        warn!("fault injection enabled: for tests only");
    }

    /// This host's name.
    pub fn host(&self) -> &str {
        &self.host
    }

    fn vm(&self, name: &str) -> Option<&ServedVm> {
        self.vms.iter().find(|v| v.shared.name == name)
    }

    fn tunnel(&self) -> Result<&Arc<TunnelService>, String> {
        self.tunnel
            .get()
            .ok_or_else(|| "no tunnel is configured on this host".to_owned())
    }

    /// The domain `vm` is about to arrive: peers may bring its sessions for a while.
    pub fn adopt(&self, vm: &str) -> Result<(), String> {
        if self.vm(vm).is_none() {
            return Err(format!("no VM named {vm:?}"));
        }
        self.adoptions.lock().unwrap().insert(
            vm.to_owned(),
            Instant::now() + Duration::from_millis(ADOPTION_WINDOW_MS),
        );
        Ok(())
    }

    fn adopted(&self, vm: &str) -> bool {
        let mut a = self.adoptions.lock().unwrap();
        a.retain(|_, until| *until > Instant::now());
        a.contains_key(vm)
    }

    /// Every relay running here.
    pub fn relays(&self) -> Vec<RelayInfo> {
        let mut out: Vec<RelayInfo> = self
            .homes
            .lock()
            .unwrap()
            .values()
            .map(|h| h.info.lock().unwrap().clone())
            .collect();
        out.extend(self.guests.lock().unwrap().values().map(|g| g.info.clone()));
        out.sort_by(|a, b| (a.vm.as_str(), a.session).cmp(&(b.vm.as_str(), b.session)));
        out
    }

    fn relayed(&self) -> usize {
        self.homes.lock().unwrap().len() + self.guests.lock().unwrap().len()
    }

    /// Moves every parked session of `vm` to host `to` (the domain's guest went there):
    /// sessions this host is home of get a home relay, sessions that came here through a
    /// relay are handed off to their home. Returns how many moved; on the first failure
    /// the session that failed stays here, parked, and the error says why.
    pub fn export(&self, vm_name: &str, to: &str) -> Result<u64, String> {
        let vm = self
            .vm(vm_name)
            .ok_or_else(|| format!("no VM named {vm_name:?}"))?
            .clone();
        if to == self.host {
            return Err(format!("{to} is this host"));
        }
        let ids = lock_plane(&vm.plane).parked_session_ids();
        let mut moved = 0;
        for id in ids {
            let guest = self.guests.lock().unwrap().get(&id).cloned();
            match guest {
                Some(ctl) => match self.hand_off(&ctl, to) {
                    // Joined while the export waited: the session is this host's now.
                    Err(why) if why == JOINED_HERE => self.export_home(&vm, id, to)?,
                    r => r?,
                },
                None => self.export_home(&vm, id, to)?,
            }
            moved += 1;
        }
        Ok(moved)
    }

    /// Asks the guest relay of a session imported here to hand it off.
    fn hand_off(&self, ctl: &GuestCtl, to: &str) -> Result<(), String> {
        let (tx, rx) = mpsc::channel();
        *ctl.request.lock().unwrap() = Some((to.to_owned(), tx));
        ctl.wake();
        rx.recv_timeout(step_timeout() * 3)
            .map_err(|_| format!("session {}: no answer to its handoff", ctl.info.session))?
    }

    /// Starts the home relay of a session parked here whose guest went to `to`: the
    /// session leaves once `to` has imported it.
    fn export_home(&self, vm: &ServedVm, id: SessionId, to: &str) -> Result<(), String> {
        if self.relayed() >= MAX_RELAYED_SESSIONS {
            return Err("too many relayed sessions on this host".into());
        }
        let Some(s) = lock_plane(&vm.plane).export_parked(id) else {
            return Err(format!("session {id} is not parked here"));
        };
        let (away, beyond) = trim_tail(&s.snapshot);
        let ch = match self.open_relay(vm, &away, s.target, to) {
            Ok(ch) => ch,
            Err(why) => {
                self.take_back(vm, s);
                return Err(format!("session {id}: {why}"));
            }
        };
        let me = self.me.upgrade().expect("the service outlives its calls");
        let info = RelayInfo {
            session: id,
            vm: vm.shared.name.clone(),
            role: "home",
            peer: to.to_owned(),
        };
        let ctl = Arc::new(
            HomeCtl::new(info.clone(), s.accepted)
                .map_err(|e| format!("cannot make a relay: {e}"))?,
        );
        self.homes.lock().unwrap().insert(id, ctl.clone());
        inc(&self.stats.exported_home);
        info!(vm = %vm.shared.name, session = %id, peer = %to, "session relayed: home relay running");
        let vm2 = vm.clone();
        std::thread::Builder::new()
            .name(format!("relay-home-{}", &id.hex()[..8]))
            .spawn(move || me.run_home(vm2, ctl, s, ch, beyond))
            .map_err(|e| format!("cannot start a relay thread: {e}"))?;
        self.maybe_join(vm, id);
        Ok(())
    }

    /// Session `id`'s home relay now goes to a new host: if it is half of a sibling pair
    /// made here whose other half's home relay goes to the same host, both channels get
    /// a join request (that host joins the pair, or keeps it relayed if its policy says
    /// no). The request is sent by a thread of its own (a channel open, bounded).
    fn maybe_join(&self, vm: &ServedVm, id: SessionId) {
        let Some(pair) = lock_plane(&vm.plane).router().pair_of(id) else {
            return;
        };
        let homes = self.homes.lock().unwrap();
        let (Some(d), Some(a)) = (homes.get(&pair.dialer), homes.get(&pair.acceptor)) else {
            return;
        };
        let (pd, pa) = (
            d.info.lock().unwrap().peer.clone(),
            a.info.lock().unwrap().peer.clone(),
        );
        if pd != pa {
            return;
        }
        drop(homes);
        let Ok(tunnel) = self.tunnel().cloned() else {
            return;
        };
        let req = JoinOpen {
            dialer: pair.dialer,
            acceptor: pair.acceptor,
            port: pair.port.0,
        };
        info!(dialer = %pair.dialer, acceptor = %pair.acceptor, peer = %pd, "both halves of a sibling pair run on one host: join requested");
        let spawned = std::thread::Builder::new()
            .name("relay-join-req".into())
            .spawn(move || {
                let ch = match tunnel.open(&pd, &req.encode(), ChannelKind::Stream) {
                    Ok(ch) => ch,
                    Err(e) => {
                        warn!(peer = %pd, error = %e, "join request not sent; the pair stays relayed");
                        return;
                    }
                };
                // The answer is one byte (1: the join runs, 0: the pair stays relayed) or
                // a refusal; then this side closes the channel.
                let deadline = Instant::now() + step_timeout();
                while Instant::now() < deadline {
                    let mut b = [0u8; 1];
                    match ch.read(&mut b) {
                        Ok(1) => {
                            debug!(peer = %pd, joined = b[0] == 1, "join request answered");
                            return;
                        }
                        Ok(_) => return,
                        Err(e) if wouldblock(&e) => {}
                        Err(_) => {
                            if let ChannelState::Refused(r) = ch.state() {
                                warn!(peer = %pd, refusal = ?r, "join refused; the pair stays relayed");
                            }
                            return;
                        }
                    }
                    if let ChannelState::Refused(r) = ch.state() {
                        warn!(peer = %pd, refusal = ?r, "join refused; the pair stays relayed");
                        return;
                    }
                    let mut fds = [PollFd::new(ch.as_fd(), PollFlags::POLLIN)];
                    let _ = poll(&mut fds, PollTimeout::from(20u16));
                    ch.clear_wakeup();
                }
            });
        if spawned.is_err() {
            warn!("cannot start a join request thread");
        }
    }

    /// Opens a relay channel to `to` for `snapshot`'s session and waits until `to` has
    /// imported it.
    fn open_relay(
        &self,
        vm: &ServedVm,
        snapshot: &SessionSnapshot,
        target: (Cid, Port),
        to: &str,
    ) -> Result<ChannelEnd, String> {
        let open = RelayOpen {
            session: snapshot.id,
            socket_type: snapshot.socket_type,
            domain: vm.shared.name.clone(),
            namespace: vm.namespace.clone(),
            target: self.target_name(vm, snapshot.id, target),
        };
        let ch = self
            .tunnel()?
            .open(to, &open.encode(), ChannelKind::Stream)
            .map_err(|e| format!("cannot open a channel to {to}: {e}"))?;
        let mut frame = Vec::new();
        Frame::Snapshot(snapshot.clone()).encode(&mut frame);
        await_import(&ch, &frame).map_err(|why| format!("{to}: {why}"))?;
        Ok(ch)
    }

    /// Session `id`'s target by the names the policy matches on (`None` if it names no
    /// domain served here).
    fn target_name(
        &self,
        vm: &ServedVm,
        id: SessionId,
        target: (Cid, Port),
    ) -> Option<RelayTarget> {
        let (cid, port) = target;
        if target == crate::engine::RELAYED_TARGET {
            return None;
        }
        if cid == Cid::HOST {
            return Some(RelayTarget::HostPort(port.0));
        }
        let domain = self
            .vms
            .iter()
            .find(|v| v.shared.cid == cid)?
            .shared
            .name
            .clone();
        let accepted = lock_plane(&vm.plane)
            .router()
            .pair_of(id)
            .is_some_and(|p| p.acceptor == id);
        Some(if accepted {
            RelayTarget::Accepted {
                domain,
                port: port.0,
            }
        } else {
            RelayTarget::Dialed {
                domain,
                port: port.0,
            }
        })
    }

    /// Whether this host's policy (as reloaded last) still lets session `id` of `vm`
    /// reach `target`: the check `recheck_policy` makes for a local session.
    fn still_allowed(
        &self,
        vm: &ServedVm,
        id: SessionId,
        target: (Cid, Port),
        ty: SocketType,
    ) -> bool {
        let (cid, port) = target;
        if target == crate::engine::RELAYED_TARGET {
            return true;
        }
        let router = lock_plane(&vm.plane).router();
        let me = vm.shared.cid;
        if cid == Cid::HOST {
            return router.check_host(me, port, ty).is_allowed();
        }
        let accepted = router.pair_of(id).is_some_and(|p| p.acceptor == id);
        if accepted {
            router.check_between(cid, me, port, ty).is_allowed()
        } else {
            router.check_between(me, cid, port, ty).is_allowed()
        }
    }

    /// Puts a session that could not leave back into its engine, parked.
    fn take_back(&self, vm: &ServedVm, s: ExportedSession) {
        let id = s.snapshot.id;
        if let Err(e) = lock_plane(&vm.plane).import_parked(s) {
            warn!(vm = %vm.shared.name, session = %id, error = %e, "a session that could not move is lost");
        }
    }
}

/// One session's bytes between a socket and a relay channel, in relay frames.
struct Pipe {
    ch: ChannelEnd,
    sock: HostSocket,
    ty: SocketType,
    /// Framed bytes for the channel (DATA and control frames): `out[out_pos..out_end]`.
    out: Vec<u8>,
    out_pos: usize,
    out_end: usize,
    /// The socket reached EOF.
    sock_eof: bool,
    /// The channel's write side was shut after the socket's EOF.
    chan_shut: bool,
    /// Channel bytes read, not yet parsed: `rx[rx_pos..rx_end]`. The buffer keeps its
    /// length (it only grows, for a frame larger than it), so a read never zeroes it first.
    rx: Vec<u8>,
    rx_pos: usize,
    rx_end: usize,
    /// Channel offset after the last whole frame parsed.
    parsed: u64,
    /// Payloads from the channel (or taken over with the session) not yet taken by the
    /// socket, oldest first; the first from `in_pos`.
    inbound: VecDeque<Vec<u8>>,
    in_pos: usize,
    /// The channel reached its end (the peer shut its write side).
    chan_eof: bool,
    /// The socket's write side was shut after the channel's end.
    sock_shut: bool,
    /// Do not read the socket (a handoff is in progress, or not yet imported).
    hold_sock: bool,
    /// Do not read the channel (a handoff was sent: what follows stays in the home's
    /// replay for the session's next host).
    hold_rx: bool,
    /// A join runs: payloads from the channel are held here instead of written to the
    /// socket (bounded by [`JOIN_MAX_HELD_BYTES`]).
    divert: Option<Vec<u8>>,
    /// The socket's EOF is answered with END instead of a shutdown of the channel.
    end_on_eof: Arc<AtomicBool>,
    /// END was framed for the channel.
    end_sent: bool,
    buf: Vec<u8>,
}

/// What one read from a relay channel asks for at least (more when a frame is larger).
const RX_READ_BYTES: usize = 128 * 1024;

/// A control frame [`Pipe::step`] parsed.
enum Ctrl {
    Snapshot(SessionSnapshot),
    Imported,
    Handoff {
        to: String,
        taken: u64,
        pending: Vec<u8>,
        snapshot: SessionSnapshot,
    },
    Failed(String),
    End,
}

fn wouldblock(e: &io::Error) -> bool {
    matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted)
}

fn closed_normally(st: ChannelState) -> bool {
    matches!(
        st,
        ChannelState::Broken(BrokenReason::PeerClosed(CloseReason::Normal))
    )
}

fn invalid(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(ErrorKind::InvalidData, e.to_string())
}

/// Reads one chunk or whole message from `sock` into `buf`: `Ok(None)` when nothing is
/// there, `Ok(Some(0))` at EOF.
fn read_one(sock: &mut HostSocket, ty: SocketType, buf: &mut [u8]) -> io::Result<Option<usize>> {
    let r = if ty == SocketType::SeqPacket {
        match sock.peek_message_len() {
            Ok(len) if len > buf.len() => {
                return Err(io::Error::new(
                    ErrorKind::InvalidData,
                    "message larger than a relay frame",
                ))
            }
            Ok(0) => sock.read(&mut buf[..1]),
            Ok(len) => sock.read(&mut buf[..len]),
            Err(e) => Err(e),
        }
    } else {
        sock.read(buf)
    };
    match r {
        Ok(n) => Ok(Some(n)),
        Err(e) if wouldblock(&e) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Reads one DATA frame's payload from `sock` into `buf` behind room for its header,
/// and writes the header: `Some(n)` (the frame is `buf[..FRAME_HEADER_LEN + n]`),
/// `Some(0)` at EOF, `None` when nothing is there. `buf` may come in any length (it is
/// the pipe's former `out`: shorter after a control frame, longer after a switch started
/// a channel with everything the old one carried); a read takes at most one frame's
/// payload, [`MAX_DATA`] (reading into all of a longer buffer made DATA frames the peer
/// rightly refused, ending the session).
fn read_data_frame(
    sock: &mut HostSocket,
    ty: SocketType,
    buf: &mut Vec<u8>,
) -> io::Result<Option<usize>> {
    if buf.len() < FRAME_HEADER_LEN + MAX_DATA {
        buf.resize(FRAME_HEADER_LEN + MAX_DATA, 0);
    }
    let r = read_one(
        sock,
        ty,
        &mut buf[FRAME_HEADER_LEN..FRAME_HEADER_LEN + MAX_DATA],
    )?;
    if let Some(n) = r.filter(|&n| n > 0) {
        buf[..FRAME_HEADER_LEN].copy_from_slice(&Frame::data_header(n));
    }
    Ok(r)
}

/// Reads everything `sock` still holds (nobody serves its other end any more): payloads
/// in order, and whether EOF was read.
fn drain_sock(sock: &mut HostSocket, ty: SocketType) -> io::Result<(Vec<Vec<u8>>, bool)> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; MAX_DATA];
    loop {
        match read_one(sock, ty, &mut buf)? {
            Some(0) => return Ok((out, true)),
            Some(n) => out.push(buf[..n].to_vec()),
            None => return Ok((out, false)),
        }
    }
}

impl Pipe {
    fn new(ch: ChannelEnd, sock: HostSocket, ty: SocketType) -> Self {
        ch.set_max_window(RELAY_CHANNEL_MAX_WINDOW_BYTES);
        Self {
            ch,
            sock,
            ty,
            out: Vec::new(),
            out_pos: 0,
            out_end: 0,
            sock_eof: false,
            chan_shut: false,
            rx: vec![0; RX_READ_BYTES],
            rx_pos: 0,
            rx_end: 0,
            parsed: 0,
            inbound: VecDeque::new(),
            in_pos: 0,
            chan_eof: false,
            sock_shut: false,
            hold_sock: false,
            hold_rx: false,
            divert: None,
            end_on_eof: Arc::new(AtomicBool::new(false)),
            end_sent: false,
            buf: vec![0; FRAME_HEADER_LEN + MAX_DATA],
        }
    }

    fn push(&mut self, f: &Frame<'_>) {
        if self.flushed() {
            self.out.clear();
            self.out_pos = 0;
        } else {
            self.out.truncate(self.out_end);
        }
        f.encode(&mut self.out);
        self.out_end = self.out.len();
    }

    /// Starts the channel's bytes over with `bytes` (framed already).
    fn set_out(&mut self, bytes: Vec<u8>) {
        self.out_end = bytes.len();
        self.out = bytes;
        self.out_pos = 0;
    }

    fn out_pending(&self) -> &[u8] {
        &self.out[self.out_pos..self.out_end]
    }

    /// Everything framed was written to the channel.
    fn flushed(&self) -> bool {
        self.out_pos == self.out_end
    }

    /// Payloads not yet taken by the socket, in order (taken out of the pipe).
    fn take_inbound(&mut self) -> Vec<Vec<u8>> {
        let mut v: Vec<Vec<u8>> = self.inbound.drain(..).collect();
        if let Some(first) = v.first_mut() {
            first.drain(..self.in_pos);
            if first.is_empty() {
                v.remove(0);
            }
        }
        self.in_pos = 0;
        v
    }

    /// Writes queued payloads to the socket until it would block; whether any went.
    fn write_inbound(&mut self) -> io::Result<bool> {
        let mut moved = false;
        while let Some(front) = self.inbound.front() {
            if let Some(held) = &mut self.divert {
                if held.len() >= JOIN_MAX_HELD_BYTES {
                    break;
                }
                held.extend_from_slice(&front[self.in_pos..]);
                self.inbound.pop_front();
                self.in_pos = 0;
                moved = true;
                continue;
            }
            match self.sock.write(&front[self.in_pos..]) {
                Ok(n) => {
                    moved = true;
                    self.in_pos += n;
                    if self.ty == SocketType::SeqPacket || self.in_pos == front.len() {
                        self.inbound.pop_front();
                        self.in_pos = 0;
                    }
                }
                Err(e) if wouldblock(&e) => break,
                Err(e) => return Err(e),
            }
        }
        Ok(moved)
    }

    /// Moves what can move now; returns whether anything did, and a control frame if one
    /// was parsed (parsing stops after it, so the caller acts on it first).
    fn step(&mut self, max_tail: usize) -> io::Result<(bool, Option<Ctrl>)> {
        let mut moved = self.write_inbound()?;
        let mut ctrl = None;
        // Channel -> frames, one DATA payload queued at a time (backpressure).
        while self.inbound.is_empty() && !self.hold_rx && ctrl.is_none() {
            let avail = &self.rx[self.rx_pos..self.rx_end];
            match relay::parse_header(avail, max_tail).map_err(invalid)? {
                Some(h) if avail.len() >= h.frame_len() => {
                    let payload = &avail[FRAME_HEADER_LEN..h.frame_len()];
                    match relay::decode(h, payload, max_tail).map_err(invalid)? {
                        // Straight from the channel's bytes into the socket when nothing
                        // waits before it; only what the socket does not take is copied.
                        Frame::Data(d) if self.divert.is_none() => {
                            let n = match self.sock.write(d) {
                                Ok(n) => n,
                                Err(e) if wouldblock(&e) => 0,
                                Err(e) => return Err(e),
                            };
                            let done = n == d.len() || (n > 0 && self.ty == SocketType::SeqPacket);
                            if !done {
                                self.inbound.push_back(d[n..].to_vec());
                            }
                        }
                        Frame::Data(d) => self.inbound.push_back(d.to_vec()),
                        Frame::Snapshot(s) => ctrl = Some(Ctrl::Snapshot(s)),
                        Frame::Imported => ctrl = Some(Ctrl::Imported),
                        Frame::Failed(w) => ctrl = Some(Ctrl::Failed(w)),
                        Frame::End => ctrl = Some(Ctrl::End),
                        Frame::Handoff {
                            to,
                            taken,
                            pending,
                            snapshot,
                        } => {
                            ctrl = Some(Ctrl::Handoff {
                                to,
                                taken,
                                pending,
                                snapshot,
                            })
                        }
                    }
                    self.rx_pos += h.frame_len();
                    self.parsed += h.frame_len() as u64;
                    moved = true;
                    moved |= self.write_inbound()?;
                }
                h => {
                    // Only the part of a frame read so far moves to the front.
                    if self.rx_pos > 0 {
                        self.rx.copy_within(self.rx_pos..self.rx_end, 0);
                        self.rx_end -= self.rx_pos;
                        self.rx_pos = 0;
                    }
                    // The frame is incomplete, so `need` > what is there: room >= 1. A read
                    // takes at most `RX_READ_BYTES` (or the frame) ahead, even when the
                    // buffer grew for a large frame: what is read ahead leaves the channel's
                    // window and would travel in a handoff's bounded `pending`.
                    let need = h.map_or(FRAME_HEADER_LEN, |h| h.frame_len());
                    let limit = need.max(RX_READ_BYTES);
                    if self.rx.len() < limit {
                        self.rx.resize(limit, 0);
                    }
                    let r = self.ch.read(&mut self.rx[self.rx_end..limit]);
                    if let Ok(n) = r {
                        self.rx_end += n;
                    }
                    match r {
                        Ok(0) => {
                            if !self.chan_eof {
                                self.chan_eof = true;
                                moved = true;
                            }
                            break;
                        }
                        Ok(_) => moved = true,
                        Err(e) if wouldblock(&e) => break,
                        Err(e) => return Err(e),
                    }
                }
            }
        }
        if self.chan_eof && !self.sock_shut && self.inbound.is_empty() && self.rx_pos == self.rx_end
        {
            self.sock.shutdown(std::net::Shutdown::Write);
            self.sock_shut = true;
        }
        // Socket -> channel, one chunk or message framed at a time.
        if self.flushed() && !self.sock_eof && !self.hold_sock {
            // Read behind room for the header, then swap the frame in as `out`: no copy.
            match read_data_frame(&mut self.sock, self.ty, &mut self.buf)? {
                Some(0) => {
                    self.sock_eof = true;
                    moved = true;
                }
                Some(n) => {
                    std::mem::swap(&mut self.out, &mut self.buf);
                    self.out_pos = 0;
                    self.out_end = FRAME_HEADER_LEN + n;
                    moved = true;
                }
                None => {}
            }
        }
        moved |= self.flush()?;
        if self.sock_eof && self.flushed() && !self.chan_shut && !self.hold_sock {
            if self.end_on_eof.load(Ordering::Acquire) {
                // A join: this side's data ends here, the stream does not.
                if !self.end_sent {
                    self.push(&Frame::End);
                    self.end_sent = true;
                    moved = true;
                    self.flush()?;
                }
                self.chan_shut = self.flushed();
            } else {
                self.ch.shutdown(std::net::Shutdown::Write)?;
                self.chan_shut = true;
            }
        }
        Ok((moved, ctrl))
    }

    /// Writes pending frames to the channel; whether any byte went.
    fn flush(&mut self) -> io::Result<bool> {
        let mut moved = false;
        while !self.flushed() {
            match self.ch.write(&self.out[self.out_pos..self.out_end]) {
                Ok(n) => {
                    self.out_pos += n;
                    moved = true;
                }
                Err(e) if wouldblock(&e) => break,
                Err(e) => return Err(e),
            }
        }
        Ok(moved)
    }

    /// Both directions ended.
    fn finished(&self) -> bool {
        self.chan_eof && self.sock_shut && self.sock_eof && self.chan_shut
    }

    /// The channel is gone: closed, reset, timed out or refused.
    fn channel_gone(&self) -> Option<ChannelState> {
        let st = self.ch.state();
        matches!(
            st,
            ChannelState::TimedOut | ChannelState::Broken(_) | ChannelState::Refused(_)
        )
        .then_some(st)
    }

    /// The channel is gone, and if it was closed normally, everything that came before
    /// the close was delivered to the socket.
    fn channel_dead(&self) -> Option<ChannelState> {
        let st = self.channel_gone()?;
        let delivered = self.chan_eof && self.inbound.is_empty() && self.rx_pos == self.rx_end;
        (!closed_normally(st) || delivered).then_some(st)
    }

    /// An error that only says the other side closed after its end of stream: the
    /// session ended normally (a host end closed after EOF, a guest that closed).
    fn normal_end(&self, e: &io::Error) -> bool {
        let closed = matches!(
            self.ch.state(),
            ChannelState::Broken(BrokenReason::PeerClosed(CloseReason::Normal))
        );
        (self.chan_eof || self.sock_eof || closed)
            && matches!(
                e.kind(),
                ErrorKind::BrokenPipe | ErrorKind::ConnectionReset | ErrorKind::NotConnected
            )
    }

    /// Waits for the channel or the socket (or `extra`), at most `ms`.
    fn wait(&self, extra: Option<&UnixStream>, ms: u16) {
        let mut sock_ev = PollFlags::empty();
        if !self.sock_eof && self.flushed() && !self.hold_sock {
            sock_ev |= PollFlags::POLLIN;
        }
        if !self.inbound.is_empty() && self.divert.is_none() {
            sock_ev |= PollFlags::POLLOUT;
        }
        let mut fds = vec![
            PollFd::new(self.ch.as_fd(), PollFlags::POLLIN),
            PollFd::new(self.sock.as_fd(), sock_ev),
        ];
        if let Some(e) = extra {
            fds.push(PollFd::new(e.as_fd(), PollFlags::POLLIN));
        }
        let _ = poll(&mut fds, PollTimeout::from(ms));
        self.ch.clear_wakeup();
    }

    /// Starts over on a new channel (the session's guest moved; `old` is dropped by the
    /// caller). What was framed for the old channel is in the snapshot the new one
    /// started with.
    fn switch(&mut self, new: ChannelEnd, first: Vec<u8>) -> ChannelEnd {
        new.set_max_window(RELAY_CHANNEL_MAX_WINDOW_BYTES);
        let old = std::mem::replace(&mut self.ch, new);
        self.set_out(first);
        self.rx_pos = 0;
        self.rx_end = 0;
        self.parsed = 0;
        self.chan_eof = false;
        self.chan_shut = false;
        self.sock_shut = false;
        old
    }
}

/// What a home relay did with a HANDOFF.
enum Rerouted {
    /// The session is back in this host's engine with its host end.
    Home,
    /// The relay goes on with a new channel.
    Moved,
    /// Nowhere could take it: the session ends.
    Lost(String),
}

impl RelayService {
    /// A home relay: `s` is the session as it left this engine (its guest's host has
    /// imported it); `ch` goes to that host.
    fn run_home(
        self: Arc<Self>,
        vm: ServedVm,
        ctl: Arc<HomeCtl>,
        s: ExportedSession,
        ch: ChannelEnd,
        beyond: Vec<u8>,
    ) {
        let id = s.snapshot.id;
        let target = s.target;
        let ty = s.snapshot.socket_type;
        let mut pipe = Pipe::new(ch, s.host, ty);
        // The tail beyond the replay buffer follows the snapshot as DATA, before anything
        // read from the host end now (`trim_tail`).
        pipe.set_out(beyond);
        pipe.end_on_eof = ctl.end_on_eof.clone();
        pipe.sock_eof = s.snapshot.host_done;
        // Guest bytes the engine had accepted and not yet written go first.
        if !s.out_stream.is_empty() {
            pipe.inbound.push_back(s.out_stream);
        }
        pipe.inbound.extend(s.out_msgs);
        let router = lock_plane(&vm.plane).router();
        let mut generation = router.generation();
        let outcome: Result<(), String> = loop {
            ctl.clear();
            if router.generation() != generation {
                // A policy reload here: the home answers for the session's target, as
                // the engine does for a local session (`recheck_policy`).
                generation = router.generation();
                if !self.still_allowed(&vm, id, target, ty) {
                    inc(&self.stats.policy_resets);
                    warn!(vm = %vm.shared.name, session = %id, target = ?self.target_name(&vm, id, target), "relayed session reset: its target is no longer allowed by the reloaded policy");
                    break Err("no longer allowed by the reloaded policy".into());
                }
            }
            let (moved, ctrl) = match pipe.step(RELAY_MAX_TAIL_BYTES) {
                Ok(x) => x,
                Err(e) if pipe.normal_end(&e) => break Ok(()),
                Err(e) => break Err(e.to_string()),
            };
            match ctrl {
                Some(Ctrl::Handoff {
                    to,
                    taken,
                    pending,
                    snapshot,
                }) if snapshot.id == id && snapshot.socket_type == ty => {
                    match self.reroute(&vm, &mut pipe, &ctl, target, to, taken, pending, snapshot) {
                        Rerouted::Home => {
                            self.homes.lock().unwrap().remove(&id);
                            return;
                        }
                        Rerouted::Moved => {
                            self.maybe_join(&vm, id);
                            continue;
                        }
                        Rerouted::Lost(why) => break Err(why),
                    }
                }
                Some(Ctrl::End) => {
                    // The joining host sent everything this half's guest wrote: once it
                    // is written, the socket's write side shuts, and the partner half's
                    // relay answers the EOF it reads with END.
                    let partner = lock_plane(&vm.plane).router().pair_of(id).map(|p| {
                        if p.dialer == id {
                            p.acceptor
                        } else {
                            p.dialer
                        }
                    });
                    let partner = partner.and_then(|p| self.homes.lock().unwrap().get(&p).cloned());
                    match partner {
                        Some(p) => {
                            p.end_on_eof.store(true, Ordering::Release);
                            p.wake();
                            pipe.chan_eof = true;
                        }
                        None => {
                            break Err("END for a session that is no sibling pair half here".into())
                        }
                    }
                }
                Some(Ctrl::Failed(w)) => break Err(format!("the guest side failed: {w}")),
                Some(_) => break Err("unexpected relay frame from the guest side".into()),
                None => {}
            }
            if pipe.finished() {
                break Ok(());
            }
            if !moved {
                if let Some(st) = pipe.channel_dead() {
                    break if closed_normally(st) {
                        Ok(())
                    } else {
                        Err(format!("channel {st:?}"))
                    };
                }
                pipe.wait(Some(&ctl.wake_rx), 100);
            }
        };
        if outcome.is_ok() {
            // What was written last (the end of the stream) reaches the guest side
            // before the channel closes.
            linger(&pipe.ch);
        }
        self.homes.lock().unwrap().remove(&id);
        lock_plane(&vm.plane).router().forget_pair(id);
        match outcome {
            Ok(()) if pipe.end_sent => {
                info!(vm = %vm.shared.name, session = %id, "sibling pair joined elsewhere: home relay done")
            }
            Ok(()) => info!(vm = %vm.shared.name, session = %id, "relayed session ended"),
            Err(why) => {
                inc(&self.stats.failed);
                warn!(vm = %vm.shared.name, session = %id, %why, "relay failed; session's host end closed");
                // The guest side learns it was lost, not handed on (a handoff it sent
                // fails, a running session expires).
                pipe.ch.abort();
            }
        }
    }

    /// Acts on a HANDOFF: the session comes home, or moves to the host its guest went
    /// to on a direct channel; failing both, it goes back to the host that sent it.
    #[allow(clippy::too_many_arguments)]
    fn reroute(
        &self,
        vm: &ServedVm,
        pipe: &mut Pipe,
        ctl: &HomeCtl,
        target: (Cid, Port),
        to: String,
        taken: u64,
        pending: Vec<u8>,
        next: SessionSnapshot,
    ) -> Rerouted {
        let id = next.id;
        // Every host->guest byte the session's engine did not take, as DATA frames: what
        // the guest side held beyond its engine (ending with a frame it read in part),
        // what is still in this channel's replay, and what was not written to it yet.
        let Some(unread) = pipe.ch.unacked_from(taken) else {
            return Rerouted::Lost(format!("handoff at offset {taken}, outside the channel"));
        };
        let mut rest = pending;
        rest.extend_from_slice(&unread);
        rest.extend_from_slice(pipe.out_pending());
        let sender = ctl.info.lock().unwrap().peer.clone();
        let failure = if to == self.host {
            // Home: the engine takes them all in the tail (the host end is local now).
            let mut home = next.clone();
            for p in data_payloads(&rest) {
                extend_tail(&mut home, p);
            }
            home.host_done |= pipe.sock_eof;
            match self.come_home(vm, pipe, home, target, ctl.accepted) {
                Ok(()) => {
                    inc(&self.stats.returned_home);
                    info!(vm = %vm.shared.name, session = %id, from = %sender, "session came home: local path again");
                    return Rerouted::Home;
                }
                Err(why) => why,
            }
        } else {
            match self.open_relay(vm, &next, target, &to) {
                Ok(new) => {
                    // They follow the snapshot as DATA on the new channel: the tail stays
                    // what the engine had.
                    drop(pipe.switch(new, rest.clone()));
                    ctl.info.lock().unwrap().peer = to.clone();
                    inc(&self.stats.rerooted);
                    info!(vm = %vm.shared.name, session = %id, from = %sender, to = %to, "session re-rooted: direct channel to its guest's new host");
                    return Rerouted::Moved;
                }
                Err(why) => why,
            }
        };
        warn!(vm = %vm.shared.name, session = %id, to = %to, why = %failure, "session cannot move on; sending it back to {sender}");
        match self.open_relay(vm, &next, target, &sender) {
            Ok(new) => {
                drop(pipe.switch(new, rest));
                inc(&self.stats.sent_back);
                Rerouted::Moved
            }
            Err(why) => Rerouted::Lost(format!("{failure}; and back to {sender}: {why}")),
        }
    }

    /// A session comes back to its home: it joins this host's engine with its host end.
    fn come_home(
        &self,
        vm: &ServedVm,
        pipe: &mut Pipe,
        snapshot: SessionSnapshot,
        target: (Cid, Port),
        accepted: bool,
    ) -> Result<(), String> {
        if !self.adopted(&vm.shared.name) {
            return Err(format!(
                "{} is not adopted on {}",
                vm.shared.name, self.host
            ));
        }
        // Guest bytes not written to the host end yet stay in front.
        let pending = pipe.take_inbound();
        let (out_stream, out_msgs) = match pipe.ty {
            SocketType::Stream => (pending.concat(), Vec::new()),
            SocketType::SeqPacket => (Vec::new(), pending.clone()),
        };
        let (dummy, _) = HostSocket::pair(pipe.ty).map_err(|e| e.to_string())?;
        let host = std::mem::replace(&mut pipe.sock, dummy);
        let s = ExportedSession {
            snapshot,
            target,
            host,
            out_stream,
            out_msgs,
            accepted,
        };
        match lock_plane(&vm.plane).try_import_parked(s) {
            Ok(()) => Ok(()),
            Err((e, back)) => {
                pipe.sock = back.host;
                pipe.inbound = pending.into();
                Err(e.to_string())
            }
        }
    }

    fn refuse(&self, why: String) -> Result<(), Refusal> {
        inc(&self.stats.refused);
        warn!(reason = %why, "relay channel refused");
        Err(Refusal {
            code: RefusalCode::Policy,
            text: why,
        })
    }

    /// A guest relay: the session arrives as the channel's first frame.
    fn run_guest(self: Arc<Self>, vm: ServedVm, open: RelayOpen, ch: ChannelEnd) {
        let id = open.session;
        let peer = ch.peer().to_owned();
        let Ok((wake, wake_rx)) = UnixStream::pair() else {
            return;
        };
        if wake.set_nonblocking(true).is_err() || wake_rx.set_nonblocking(true).is_err() {
            return;
        }
        let ctl = Arc::new(GuestCtl {
            info: RelayInfo {
                session: id,
                vm: vm.shared.name.clone(),
                role: "guest",
                peer: peer.clone(),
            },
            target: open.target.clone(),
            request: Mutex::new(None),
            handing: AtomicBool::new(false),
            join: Mutex::new(JoinState::Idle),
            wake,
            wake_rx,
        });
        let ty = open.socket_type;
        let Ok((s1, s2)) = relay_pair(ty) else {
            return;
        };
        let mut pipe = Pipe::new(ch, s2, ty);
        pipe.hold_sock = true;
        let deadline = Instant::now() + step_timeout();
        let refused = |pipe: &mut Pipe, why: String| {
            warn!(vm = %vm.shared.name, session = %id, home = %peer, %why, "relayed session refused");
            inc(&self.stats.refused);
            pipe.push(&Frame::Failed(why));
            let _ = pipe.flush();
        };
        let snapshot = loop {
            match pipe.step(RELAY_MAX_TAIL_BYTES) {
                Ok((_, Some(Ctrl::Snapshot(s)))) if s.id == id && s.socket_type == ty => break s,
                Ok((_, Some(_))) => {
                    refused(&mut pipe, "expected the session's snapshot".into());
                    return linger_close(pipe.ch);
                }
                Ok((false, None)) if Instant::now() > deadline => return,
                Ok((false, None)) => pipe.wait(None, 50),
                Ok((true, None)) => {}
                Err(e) => {
                    refused(&mut pipe, format!("snapshot: {e}"));
                    return linger_close(pipe.ch);
                }
            }
        };
        let s = ExportedSession {
            snapshot,
            // The session's target is its home's business; here it is only a label.
            target: crate::engine::RELAYED_TARGET,
            host: s1,
            out_stream: Vec::new(),
            out_msgs: Vec::new(),
            // Only the home checks a relayed session's policy (joined halves are given
            // theirs when the join ends).
            accepted: false,
        };
        let previous = self.guests.lock().unwrap().insert(id, ctl.clone());
        if let Err(e) = lock_plane(&vm.plane).import_parked(s) {
            let mut g = self.guests.lock().unwrap();
            match previous {
                Some(p) => g.insert(id, p),
                None => g.remove(&id),
            };
            drop(g);
            refused(&mut pipe, format!("import: {e}"));
            return linger_close(pipe.ch);
        }
        pipe.push(&Frame::Imported);
        pipe.hold_sock = false;
        inc(&self.stats.imported);
        info!(vm = %vm.shared.name, session = %id, home = %peer, "session imported through the tunnel");
        let outcome = self.guest_loop(&vm, &ctl, &mut pipe);
        {
            let mut g = self.guests.lock().unwrap();
            if g.get(&id).is_some_and(|c| Arc::ptr_eq(c, &ctl)) {
                g.remove(&id);
            }
        }
        match outcome {
            Ok(GuestEnd::HandedOff) => {
                info!(vm = %vm.shared.name, session = %id, "session handed off")
            }
            Ok(GuestEnd::Ended) => {
                info!(vm = %vm.shared.name, session = %id, "relayed session ended")
            }
            Ok(GuestEnd::Joined) => {
                info!(vm = %vm.shared.name, session = %id, "sibling pair joined: session local here")
            }
            Err(why) => {
                inc(&self.stats.failed);
                warn!(vm = %vm.shared.name, session = %id, %why, "relay failed; session ended");
                // The guest learns it as an expired session (a reset, then RESUME refused
                // `Expired`), not as an end of stream it could take for the host's.
                lock_plane(&vm.plane).expire_session(id);
            }
        }
    }

    /// Relays until the session ends, was handed off or was joined with its sibling.
    fn guest_loop(
        &self,
        vm: &ServedVm,
        ctl: &Arc<GuestCtl>,
        pipe: &mut Pipe,
    ) -> Result<GuestEnd, String> {
        let id = ctl.info.session;
        let mut handing: Option<(Reply, Instant)> = None;
        let mut joining: Option<Joining> = None;
        let outcome = loop {
            if joining.is_none() {
                if let Some(j) = self.join_started(ctl, pipe) {
                    joining = Some(j);
                }
            }
            if let Some(j) = &mut joining {
                match self.join_step(vm, ctl, pipe, j) {
                    Ok(false) => {}
                    Ok(true) => break Ok(GuestEnd::Joined),
                    Err(why) => {
                        // Expired while the placeholder is still held: were it dropped
                        // first, the engine would read its EOF and end the guest's stream
                        // as if the partner had closed it (found by
                        // a_join_whose_home_dies_half_way_ends_both_sessions_cleanly).
                        lock_plane(&vm.plane).expire_session(id);
                        *ctl.join.lock().unwrap() = JoinState::Failed(why.clone());
                        if let Some(p) = &j.partner {
                            p.wake();
                        }
                        // Both halves' relays end here; the pair counts once.
                        if j.role == PairRole::Dialer {
                            inc(&self.stats.join_failed);
                        }
                        break Err(format!("join failed: {why}"));
                    }
                }
                continue;
            }
            if handing.is_none() {
                let req = ctl.request.lock().unwrap().take();
                if let Some((to, reply)) = req {
                    ctl.clear();
                    match self.start_handoff(vm, id, pipe, &to) {
                        Ok(()) => {
                            ctl.handing.store(true, Ordering::Release);
                            inc(&self.stats.handed_off);
                            handing = Some((reply, Instant::now()));
                        }
                        Err(why) => {
                            let _ = reply.send(Err(why));
                        }
                    }
                }
            }
            let (moved, ctrl) = match pipe.step(RELAY_MAX_TAIL_BYTES) {
                Ok(x) => x,
                Err(e) if handing.is_none() && pipe.normal_end(&e) => break Ok(GuestEnd::Ended),
                Err(e) if handing.is_some() => {
                    // While a handoff is answered, a failing write (the home closed) is
                    // the answer, seen below.
                    debug!(error = %e, "relay step during a handoff");
                    (false, None)
                }
                Err(e) => break Err(e.to_string()),
            };
            if ctrl.is_some() {
                break Err("unexpected relay frame from the home".into());
            }
            if let Some((_, since)) = &handing {
                // The home closes the channel once the session lives on elsewhere; if it
                // could not move, the home first sent it back here on a new channel.
                if let Some(st) = pipe.channel_gone() {
                    let (reply, _) = handing.take().expect("checked");
                    let back = self
                        .guests
                        .lock()
                        .unwrap()
                        .get(&id)
                        .is_some_and(|c| !Arc::ptr_eq(c, ctl));
                    let _ = reply.send(if back {
                        Err(format!("session {id} could not move on and is back here"))
                    } else if !closed_normally(st) {
                        Err(format!("session {id} was lost by its home: channel {st:?}"))
                    } else {
                        Ok(())
                    });
                    break if closed_normally(st) || back {
                        Ok(GuestEnd::HandedOff)
                    } else {
                        Err(format!("handoff lost: channel {st:?}"))
                    };
                }
                if since.elapsed() > step_timeout() * 2 {
                    let (reply, _) = handing.take().expect("checked");
                    let _ = reply.send(Err("the home did not answer the handoff".into()));
                    break Err("handoff unanswered".into());
                }
            } else if pipe.finished() {
                linger(&pipe.ch);
                break Ok(GuestEnd::Ended);
            } else if !moved {
                match pipe.channel_dead() {
                    Some(st) if closed_normally(st) => break Ok(GuestEnd::Ended),
                    Some(st) => break Err(format!("channel {st:?}")),
                    None => {}
                }
            }
            if !moved {
                pipe.wait(Some(&ctl.wake_rx), if handing.is_some() { 20 } else { 100 });
            }
        };
        // A handoff asked for while a join ran is answered now: a joined session is
        // exported from here by the caller; otherwise the session is gone.
        if let Some((_, reply)) = ctl.request.lock().unwrap().take() {
            let _ = reply.send(Err(match &outcome {
                Ok(GuestEnd::Joined) => JOINED_HERE.to_owned(),
                _ => format!("session {id} ended before its handoff"),
            }));
        }
        outcome
    }

    /// A join request from the home `peer`: both halves must be guest relays from it
    /// here. Starts the join (both engines at once), or says why the pair stays relayed.
    fn join_request(&self, peer: &str, req: JoinOpen) -> Result<(), String> {
        let _m = self.join_match.lock().unwrap();
        let (d, a) = {
            let g = self.guests.lock().unwrap();
            (g.get(&req.dialer).cloned(), g.get(&req.acceptor).cloned())
        };
        let (Some(d), Some(a)) = (d, a) else {
            return Err("a half of the pair is not relayed here".into());
        };
        if d.info.peer != peer || a.info.peer != peer {
            return Err(format!("the pair's home is not {peer}"));
        }
        // Where the home named the targets, they must name each other on the port.
        let names_other = |c: &GuestCtl, other: &GuestCtl, dialer: bool| match &c.target {
            None => true,
            Some(RelayTarget::Dialed { domain, port }) => {
                dialer && *domain == other.info.vm && *port == req.port
            }
            Some(RelayTarget::Accepted { domain, port }) => {
                !dialer && *domain == other.info.vm && *port == req.port
            }
            Some(RelayTarget::HostPort(_)) => false,
        };
        if !names_other(&d, &a, true) || !names_other(&a, &d, false) {
            return Err("the halves' targets do not name each other".into());
        }
        for c in [&d, &a] {
            if c.handing.load(Ordering::Acquire)
                || !matches!(*c.join.lock().unwrap(), JoinState::Idle)
            {
                return Err(format!(
                    "session {} is busy (handoff or join)",
                    c.info.session
                ));
            }
        }
        self.start_join(&d, &a, req.port)?;
        info!(dialer = %req.dialer, acceptor = %req.acceptor, port = req.port, home = %peer, "joining a sibling pair: both engines on placeholders");
        Ok(())
    }

    /// Checks the policy here and swaps both sessions' host ends to placeholders under
    /// both engines' locks (so neither feeds its old path after the other stopped).
    fn start_join(&self, dialer: &GuestCtl, acceptor: &GuestCtl, port: u32) -> Result<(), String> {
        let (Some(dv), Some(av)) = (self.vm(&dialer.info.vm), self.vm(&acceptor.info.vm)) else {
            return Err("a domain of the pair is not here".into());
        };
        if Arc::ptr_eq(&dv.plane, &av.plane) {
            return Err("both halves in one domain".into());
        }
        if dv.namespace != av.namespace {
            return Err("the domains are in different namespaces here".into());
        }
        // Fixed lock order: by domain name.
        let dialer_first = dv.shared.name < av.shared.name;
        let (first, second) = if dialer_first { (dv, av) } else { (av, dv) };
        let mut p1 = lock_plane(&first.plane);
        let mut p2 = lock_plane(&second.plane);
        let (pd, pa) = if dialer_first {
            (&mut p1, &mut p2)
        } else {
            (&mut p2, &mut p1)
        };
        if !pd.may_reach_sibling(av.shared.cid, Port(port)) {
            return Err(format!(
                "the policy here does not allow {} -> {} on port {port}",
                dv.shared.name, av.shared.name
            ));
        }
        let (qd, qd_peer) = placeholder().map_err(|e| e.to_string())?;
        let (qa, qa_peer) = placeholder().map_err(|e| e.to_string())?;
        let sd = pd
            .swap_session_host(dialer.info.session, qd, &[])
            .map_err(|e| e.to_string())?;
        let sa = match pa.swap_session_host(acceptor.info.session, qa, &[]) {
            Ok(s) => s,
            Err(e) => {
                // Undo the first swap: the old end is whole (the engine only stopped
                // reading it).
                if pd
                    .swap_session_host(dialer.info.session, sd.old, &[])
                    .is_err()
                {
                    warn!(session = %dialer.info.session, "cannot undo a join's first swap");
                }
                return Err(e.to_string());
            }
        };
        let now = Instant::now();
        *dialer.join.lock().unwrap() = JoinState::Started {
            old: sd.old,
            placeholder: qd_peer,
            write_shut: sd.write_shut,
            since: now,
            partner: acceptor.info.session,
            role: PairRole::Dialer,
            port,
        };
        *acceptor.join.lock().unwrap() = JoinState::Started {
            old: sa.old,
            placeholder: qa_peer,
            write_shut: sa.write_shut,
            since: now,
            partner: dialer.info.session,
            role: PairRole::Acceptor,
            port,
        };
        dialer.wake();
        acceptor.wake();
        Ok(())
    }

    /// The join of this relay's session started: stop feeding the old pair, take what the
    /// engine had not read from it, and let the socket run to its EOF.
    fn join_started(&self, ctl: &GuestCtl, pipe: &mut Pipe) -> Option<Joining> {
        let mut st = ctl.join.lock().unwrap();
        if !matches!(&*st, JoinState::Started { .. }) {
            return None;
        }
        let JoinState::Started {
            mut old,
            placeholder,
            write_shut,
            since,
            partner,
            role,
            port,
        } = std::mem::replace(&mut *st, JoinState::Draining)
        else {
            unreachable!("checked");
        };
        drop(st);
        ctl.clear();
        // Towards the guest, in order: what the engine had not read from its old end,
        // what the relay had not written to it yet, then the channel up to the home's END.
        let mut held = Vec::new();
        let mut fail = None;
        match drain_sock(&mut old, SocketType::Stream) {
            Ok((chunks, _)) => {
                for c in chunks {
                    held.extend_from_slice(&c);
                }
            }
            Err(e) => fail = Some(format!("old host end: {e}")),
        }
        for p in pipe.take_inbound() {
            held.extend_from_slice(&p);
        }
        // The relay's end reads what the engine wrote, then EOF.
        drop(old);
        pipe.divert = Some(held);
        // A guest that had half-closed: its EOF is real, the channel carries it as such.
        pipe.end_on_eof.store(!write_shut, Ordering::Release);
        let partner_ctl = self.guests.lock().unwrap().get(&partner).cloned();
        let hold = Duration::from_millis(self.join_hold_ms.load(Ordering::Relaxed));
        Some(Joining {
            placeholder: Some(placeholder),
            since,
            hold_until: since + hold,
            home_done: false,
            partner: partner_ctl,
            partner_id: partner,
            role,
            port,
            fail,
        })
    }

    /// One step of a join in progress; `Ok(true)` once both engines have the new pair.
    fn join_step(
        &self,
        vm: &ServedVm,
        ctl: &Arc<GuestCtl>,
        pipe: &mut Pipe,
        j: &mut Joining,
    ) -> Result<bool, String> {
        if let Some(why) = j.fail.take() {
            return Err(why);
        }
        match &*ctl.join.lock().unwrap() {
            JoinState::Done => return Ok(true),
            JoinState::Failed(why) => return Err(why.clone()),
            _ => {}
        }
        if j.partner
            .as_ref()
            .is_some_and(|p| matches!(&*p.join.lock().unwrap(), JoinState::Failed(_)))
        {
            return Err("the partner half failed".into());
        }
        if j.since.elapsed() > Duration::from_millis(JOIN_TIMEOUT_MS) {
            return Err(format!("not done within {JOIN_TIMEOUT_MS} ms"));
        }
        if Instant::now() < j.hold_until {
            pipe.wait(Some(&ctl.wake_rx), 20);
            ctl.clear();
            return Ok(false);
        }
        let (moved, ctrl) = match pipe.step(RELAY_MAX_TAIL_BYTES) {
            Ok(x) => x,
            Err(e) => return Err(e.to_string()),
        };
        match ctrl {
            None => {}
            Some(Ctrl::End) => j.home_done = true,
            Some(_) => return Err("unexpected relay frame from the home during a join".into()),
        }
        if pipe.chan_eof && pipe.inbound.is_empty() && pipe.rx_pos == pipe.rx_end {
            // The stream towards this guest ended for real before the join's END.
            j.home_done = true;
        }
        let own_done = pipe.sock_eof && pipe.chan_shut;
        if j.home_done && own_done && j.placeholder.is_some() {
            let held = pipe.divert.take().unwrap_or_default();
            let placeholder = j.placeholder.take().expect("checked");
            return self.join_ready(vm, ctl, j, held, placeholder);
        }
        if !j.home_done && !moved {
            if let Some(st) = pipe.channel_gone() {
                return Err(format!("channel {st:?} before the home's END"));
            }
        }
        if !moved {
            pipe.wait(Some(&ctl.wake_rx), 20);
        }
        Ok(false)
    }

    /// This half holds everything towards its guest: if the partner's does too, give both
    /// engines their new local pair (under both locks), else wait for the partner to.
    fn join_ready(
        &self,
        vm: &ServedVm,
        ctl: &Arc<GuestCtl>,
        j: &Joining,
        held: Vec<u8>,
        placeholder: HostSocket,
    ) -> Result<bool, String> {
        let id = ctl.info.session;
        let since = j.since;
        let _m = self.join_match.lock().unwrap();
        let partner = self
            .guests
            .lock()
            .unwrap()
            .get(&j.partner_id)
            .filter(|g| matches!(&*g.join.lock().unwrap(), JoinState::Ready { .. }))
            .cloned();
        let Some(other) = partner else {
            *ctl.join.lock().unwrap() = JoinState::Ready { held, placeholder };
            return Ok(false);
        };
        let Some(ov) = self.vm(&other.info.vm).cloned() else {
            return Err("the partner's domain is not here".into());
        };
        let JoinState::Ready {
            held: other_held,
            placeholder: mut other_placeholder,
            ..
        } = std::mem::replace(&mut *other.join.lock().unwrap(), JoinState::Draining)
        else {
            unreachable!("checked");
        };
        let mut placeholder = placeholder;
        let me_first = vm.shared.name < ov.shared.name;
        let (first, second) = if me_first { (vm, &ov) } else { (&ov, vm) };
        let mut p1 = lock_plane(&first.plane);
        let mut p2 = lock_plane(&second.plane);
        let (pm, po) = if me_first {
            (&mut p1, &mut p2)
        } else {
            (&mut p2, &mut p1)
        };
        // What each engine wrote into its placeholder since the first swap goes to the
        // other guest, after what the home forwarded.
        let mine_wrote = drain_all(&mut placeholder)?;
        let other_wrote = drain_all(&mut other_placeholder)?;
        let (nm, no) = HostSocket::pair(SocketType::Stream).map_err(|e| e.to_string())?;
        let no = socket_from(no, SocketType::Stream);
        let mut to_me = held;
        to_me.extend_from_slice(&other_wrote);
        let mut to_other = other_held;
        to_other.extend_from_slice(&mine_wrote);
        let (prefix_me, prefix_other) = (to_me.len(), to_other.len());
        let placeholders = (mine_wrote.len(), other_wrote.len());
        let r = pm
            .swap_session_host(id, nm, &to_me)
            .and_then(|_| po.swap_session_host(other.info.session, no, &to_other));
        if let Err(e) = r {
            *other.join.lock().unwrap() = JoinState::Failed(e.to_string());
            other.wake();
            return Err(e.to_string());
        }
        // Local now: their targets are each other, checked at this host's reloads like a
        // pair made here (no longer the relayed label).
        let port = Port(j.port);
        let (mine_accepted, other_accepted) =
            (j.role == PairRole::Acceptor, j.role == PairRole::Dialer);
        pm.set_session_target(id, (ov.shared.cid, port), mine_accepted);
        po.set_session_target(other.info.session, (vm.shared.cid, port), other_accepted);
        // The pair lives here now.
        let router = pm.router();
        drop(p1);
        drop(p2);
        let (dialer, acceptor) = match j.role {
            PairRole::Dialer => (id, other.info.session),
            PairRole::Acceptor => (other.info.session, id),
        };
        router.note_pair(crate::router::SiblingPair {
            dialer,
            acceptor,
            port: Port(j.port),
        });
        *other.join.lock().unwrap() = JoinState::Done;
        *ctl.join.lock().unwrap() = JoinState::Done;
        other.wake();
        inc(&self.stats.joined);
        info!(session = %id, partner = %other.info.session, join_ms = since.elapsed().as_secs_f64() * 1e3, prefix_here = prefix_me, prefix_partner = prefix_other, placeholder_here = placeholders.0, placeholder_partner = placeholders.1, "sibling pair joined: local pair again");
        Ok(true)
    }

    /// Takes the session out of the engine with every byte in flight and sends HANDOFF.
    fn start_handoff(
        &self,
        vm: &ServedVm,
        id: SessionId,
        pipe: &mut Pipe,
        to: &str,
    ) -> Result<(), String> {
        let Some(s) = lock_plane(&vm.plane).export_parked(id) else {
            return Err(format!("session {id} is not parked here"));
        };
        let ty = pipe.ty;
        let mut snapshot = s.snapshot;
        let mut s1 = s.host;
        pipe.hold_sock = true;
        // Guest -> host, in order: what the engine wrote into the pair, then what it had
        // not written yet (frames not yet sent are ahead of both in `out`).
        let (written, _) = drain_sock(&mut pipe.sock, ty).map_err(|e| e.to_string())?;
        let stream_rest = (!s.out_stream.is_empty()).then_some(s.out_stream);
        for p in written.into_iter().chain(stream_rest).chain(s.out_msgs) {
            if ty == SocketType::Stream {
                for chunk in p.chunks(64 * 1024) {
                    pipe.push(&Frame::Data(chunk));
                }
            } else {
                pipe.push(&Frame::Data(&p));
            }
        }
        // Host -> guest beyond the engine's replay go back to the home, framed, in order:
        // what the pair held, what the pipe had not written to it, and what it read from
        // the channel and had not parsed (whole frames, then one read in part). The
        // snapshot's tail stays what the engine had, however often the guest moves.
        let (unread, eof) = drain_sock(&mut s1, ty).map_err(|e| e.to_string())?;
        let mut pending = Vec::new();
        for p in unread.iter().chain(pipe.take_inbound().iter()) {
            if ty == SocketType::Stream {
                for chunk in p.chunks(MAX_DATA) {
                    Frame::Data(chunk).encode(&mut pending);
                }
            } else {
                Frame::Data(p).encode(&mut pending);
            }
        }
        let read_ahead = &pipe.rx[pipe.rx_pos..pipe.rx_end];
        let taken = pipe.parsed + read_ahead.len() as u64;
        pending.extend_from_slice(read_ahead);
        pipe.rx_pos = 0;
        pipe.rx_end = 0;
        if pending.len() > relay::MAX_PENDING {
            return Err(format!(
                "{} bytes in flight exceed the relay bound",
                pending.len()
            ));
        }
        // EOF read from the pair comes right after the tail only if nothing is pending;
        // otherwise the home's channel says it again after the pending bytes.
        snapshot.host_done |= eof && pending.is_empty();
        pipe.hold_rx = true;
        pipe.push(&Frame::Handoff {
            to: to.to_owned(),
            taken,
            pending,
            snapshot,
        });
        // The engine no longer holds the pair.
        let (dummy, _) = HostSocket::pair(ty).map_err(|e| e.to_string())?;
        pipe.sock = dummy;
        let _ = pipe.flush();
        Ok(())
    }
}

/// How a guest relay ended.
enum GuestEnd {
    /// The session ended.
    Ended,
    /// It was handed off to its home.
    HandedOff,
    /// It was joined with its sibling here (local now).
    Joined,
}

/// A guest relay's half of a join, while it drains.
struct Joining {
    /// The peer of the placeholder the engine writes into (taken at the last step).
    placeholder: Option<HostSocket>,
    since: Instant,
    /// Fault injection ([`RelayService::hold_joins`]): nothing drains before this.
    hold_until: Instant,
    /// The home's END (or a real end of stream) was read.
    home_done: bool,
    /// The partner half's relay, when known.
    partner: Option<Arc<GuestCtl>>,
    partner_id: SessionId,
    role: PairRole,
    port: u32,
    /// Why the join cannot go on (found while it started).
    fail: Option<String>,
}

/// The snapshot a home sends away: a stream session's tail cut to the engine's replay
/// buffer ([`SESSION_REPLAY_BYTES`]), and the rest of it framed as DATA, to follow the
/// snapshot on the channel (the EOF, if the host end had ended, after them). A session
/// that came home with a long tail (every relay buffer's bytes, up to
/// [`RELAY_MAX_TAIL_BYTES`]) and goes away again so sends that tail through the path
/// instead of in the snapshot: the path's buffers then hold those bytes, not as many new
/// ones again, so its next homecoming brings no more than the first (before this, a
/// guest reading nothing outgrew the bound at its third homecoming and was rolled back).
/// Seqpacket tails are sent whole (message boundaries; sibling pairs are streams).
fn trim_tail(s: &SessionSnapshot) -> (SessionSnapshot, Vec<u8>) {
    let mut away = s.clone();
    let mut beyond = Vec::new();
    if s.socket_type != SocketType::Stream || s.tail.len() <= SESSION_REPLAY_BYTES {
        return (away, beyond);
    }
    let rest = away.tail.split_off(SESSION_REPLAY_BYTES);
    for c in rest.chunks(MAX_DATA) {
        Frame::Data(c).encode(&mut beyond);
    }
    away.host_done = false;
    (away, beyond)
}

/// A placeholder host end: the engine reads nothing from it and writes into its peer
/// (kept small: it is read whole under the engines' locks).
fn placeholder() -> io::Result<(HostSocket, HostSocket)> {
    let (peer, engine_end) = HostSocket::pair(SocketType::Stream)?;
    let _ = nix::sys::socket::setsockopt(
        &engine_end,
        nix::sys::socket::sockopt::SndBuf,
        &RELAY_SEND_BUFFER,
    );
    Ok((socket_from(engine_end, SocketType::Stream), peer))
}

/// Everything a placeholder's peer holds (nobody writes to it any more).
fn drain_all(sock: &mut HostSocket) -> Result<Vec<u8>, String> {
    let (chunks, _) = drain_sock(sock, SocketType::Stream).map_err(|e| e.to_string())?;
    Ok(chunks.concat())
}

/// Writes nothing more and closes `ch` once what was written was acknowledged (bounded).
fn linger_close(ch: ChannelEnd) {
    linger(&ch);
}

/// Waits until what was written to `ch` was acknowledged (bounded by the step timeout).
fn linger(ch: &ChannelEnd) {
    let deadline = Instant::now() + step_timeout();
    while Instant::now() < deadline {
        let c = ch.counters();
        if c.acked >= c.sent
            || !matches!(
                ch.state(),
                ChannelState::Open | ChannelState::PeerShutdown { .. }
            )
        {
            break;
        }
        let mut fds = [PollFd::new(ch.as_fd(), PollFlags::POLLIN)];
        let _ = poll(&mut fds, PollTimeout::from(20u16));
        ch.clear_wakeup();
    }
}

/// Sends a SNAPSHOT frame on a new channel and waits for IMPORTED (bounded).
fn await_import(ch: &ChannelEnd, snapshot_frame: &[u8]) -> Result<(), String> {
    let deadline = Instant::now() + step_timeout();
    let mut bytes = snapshot_frame;
    let mut rx = Vec::new();
    loop {
        if Instant::now() > deadline {
            return Err("no answer to the import".into());
        }
        while !bytes.is_empty() {
            match ch.write(bytes) {
                Ok(n) => bytes = &bytes[n..],
                Err(e) if wouldblock(&e) => break,
                Err(e) => return Err(e.to_string()),
            }
        }
        // Only the answer is read: anything after it is the session's.
        let need = match relay::parse_header(&rx, 0).map_err(|e| e.to_string())? {
            Some(h) => h.frame_len(),
            None => FRAME_HEADER_LEN,
        };
        let want = need.saturating_sub(rx.len());
        if want > 0 {
            let mut buf = vec![0u8; want];
            match ch.read(&mut buf) {
                Ok(0) => return Err("channel ended before the import".into()),
                Ok(n) => rx.extend_from_slice(&buf[..n]),
                Err(e) if wouldblock(&e) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
        if let Some(h) = relay::parse_header(&rx, 0).map_err(|e| e.to_string())? {
            if rx.len() >= h.frame_len() {
                return match relay::decode(h, &rx[FRAME_HEADER_LEN..h.frame_len()], 0) {
                    Ok(Frame::Imported) => Ok(()),
                    Ok(Frame::Failed(w)) => Err(format!("import refused: {w}")),
                    _ => Err("unexpected answer to the import".into()),
                };
            }
        }
        let mut fds = [PollFd::new(ch.as_fd(), PollFlags::POLLIN)];
        let _ = poll(&mut fds, PollTimeout::from(20u16));
        ch.clear_wakeup();
    }
}

/// The socket pair between an engine (first) and a guest relay (second). The relay's
/// send buffer is kept small: what it holds when the session is handed off travels in the
/// snapshot's tail.
fn relay_pair(ty: SocketType) -> io::Result<(HostSocket, HostSocket)> {
    let (ours, theirs) = HostSocket::pair(ty)?;
    let _ = nix::sys::socket::setsockopt(
        &theirs,
        nix::sys::socket::sockopt::SndBuf,
        &RELAY_SEND_BUFFER,
    );
    Ok((ours, socket_from(theirs, ty)))
}

fn socket_from(fd: std::os::fd::OwnedFd, ty: SocketType) -> HostSocket {
    let _ = nix::fcntl::fcntl(
        &fd,
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
    );
    match ty {
        SocketType::Stream => HostSocket::Stream(UnixStream::from(fd)),
        SocketType::SeqPacket => HostSocket::SeqPacket(fd),
    }
}

impl Acceptor for RelayService {
    fn on_open(&self, peer: &str, metadata: &[u8], kind: ChannelKind) -> Result<(), Refusal> {
        if let Ok(req) = JoinOpen::decode(metadata) {
            // Checked again when it runs; here only whether it may run at all.
            let g = self.guests.lock().unwrap();
            let ours = [req.dialer, req.acceptor]
                .iter()
                .all(|id| g.get(id).is_some_and(|c| c.info.peer == peer));
            drop(g);
            if !ours {
                inc(&self.stats.join_refused);
                warn!(%peer, dialer = %req.dialer, acceptor = %req.acceptor, "join request for sessions not relayed here from that host; refused");
                return Err(Refusal {
                    code: RefusalCode::Policy,
                    text: "no such relayed pair here".into(),
                });
            }
            return Ok(());
        }
        let open = match RelayOpen::decode(metadata) {
            Ok(o) => o,
            Err(e) => return self.refuse(format!("{peer}: {e}")),
        };
        if kind != ChannelKind::Stream {
            return self.refuse(format!("{peer}: relay channels are streams"));
        }
        let Some(vm) = self.vm(&open.domain) else {
            return self.refuse(format!("{peer}: no domain {:?} here", open.domain));
        };
        // A session handed off from here may come back (its next host could not take
        // it): that is no adoption, but the answer to our handoff.
        let returning = match self.guests.lock().unwrap().get(&open.session) {
            Some(c) if c.handing.load(Ordering::Acquire) => true,
            Some(_) => {
                return self.refuse(format!("{peer}: session {} is already here", open.session))
            }
            None => false,
        };
        if !returning && !self.adopted(&open.domain) {
            return self.refuse(format!(
                "{peer}: domain {:?} is not being adopted here",
                open.domain
            ));
        }
        if vm.namespace != open.namespace {
            return self.refuse(format!(
                "{peer}: domain {:?} is in namespace {:?} here, not {:?}",
                open.domain, vm.namespace, open.namespace
            ));
        }
        if self.relayed() >= MAX_RELAYED_SESSIONS {
            return self.refuse(format!("{peer}: too many relayed sessions"));
        }
        Ok(())
    }

    fn accepted(&self, end: ChannelEnd, metadata: Vec<u8>) {
        if let Ok(req) = JoinOpen::decode(&metadata) {
            let Some(me) = self.me.upgrade() else { return };
            let spawned = std::thread::Builder::new()
                .name("relay-join".into())
                .spawn(move || {
                    let peer = end.peer().to_owned();
                    let answer = match me.join_request(&peer, req) {
                        Ok(()) => 1u8,
                        Err(why) => {
                            inc(&me.stats.join_refused);
                            warn!(dialer = %req.dialer, acceptor = %req.acceptor, %why, "sibling pair not joined; it stays relayed");
                            0
                        }
                    };
                    let _ = end.write(&[answer]);
                    linger(&end);
                    // The requester closes the channel once it read the answer.
                    let deadline = Instant::now() + step_timeout();
                    while Instant::now() < deadline
                        && matches!(end.state(), ChannelState::Open | ChannelState::PeerShutdown { .. })
                    {
                        let mut fds = [PollFd::new(end.as_fd(), PollFlags::POLLIN)];
                        let _ = poll(&mut fds, PollTimeout::from(20u16));
                        end.clear_wakeup();
                    }
                });
            if spawned.is_err() {
                warn!("cannot start a join thread");
            }
            return;
        }
        let Ok(open) = RelayOpen::decode(&metadata) else {
            return;
        };
        let Some(vm) = self.vm(&open.domain).cloned() else {
            return;
        };
        let Some(me) = self.me.upgrade() else { return };
        let spawned = std::thread::Builder::new()
            .name(format!("relay-guest-{}", &open.session.hex()[..8]))
            .spawn(move || me.run_guest(vm, open, end));
        if spawned.is_err() {
            warn!("cannot start a relay thread");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::net::UnixStream;

    /// Everything a host end had queued, read frame by frame the way a pipe reads it
    /// after a switch left it a buffer longer than one frame.
    #[test]
    fn a_data_frame_never_exceeds_max_data_whatever_the_buffer() {
        let (mut ours, theirs) = HostSocket::pair(SocketType::Stream).unwrap();
        let mut theirs = UnixStream::from(theirs);
        theirs.set_nonblocking(true).unwrap();
        let sent: Vec<u8> = (0..3 * MAX_DATA).map(|i| (i * 7 % 251) as u8).collect();
        // More queued than one frame holds, so that one read could take more.
        use nix::sys::socket::{setsockopt, sockopt};
        let room = 4 * MAX_DATA;
        if setsockopt(&theirs, sockopt::SndBufForce, &room).is_err() {
            setsockopt(&theirs, sockopt::SndBuf, &room).unwrap();
        }
        let mut at = 0;
        while at < sent.len() {
            let end = sent.len().min(at + 64 * 1024);
            match theirs.write(&sent[at..end]) {
                Ok(n) => at += n,
                Err(_) => break,
            }
        }
        assert!(at > MAX_DATA, "only {at} bytes queue on this machine");
        let mut buf = vec![0u8; 4 * MAX_DATA];
        let mut got = Vec::new();
        for _ in 0..10_000 {
            if at < sent.len() {
                if let Ok(n) = theirs.write(&sent[at..]) {
                    at += n;
                }
            }
            match read_data_frame(&mut ours, SocketType::Stream, &mut buf).unwrap() {
                Some(0) => break,
                Some(n) => {
                    assert!(n <= MAX_DATA, "a {n}-byte DATA frame");
                    let h = relay::parse_header(&buf[..FRAME_HEADER_LEN], 0)
                        .unwrap()
                        .unwrap();
                    let f = relay::decode(h, &buf[FRAME_HEADER_LEN..h.frame_len()], 0).unwrap();
                    let Frame::Data(d) = f else {
                        panic!("not DATA")
                    };
                    got.extend_from_slice(d);
                }
                None if at == sent.len() && got.len() == sent.len() => break,
                None => {}
            }
        }
        assert!(
            got == sent,
            "{} of {} bytes, in order",
            got.len(),
            sent.len()
        );
    }

    /// A seqpacket message larger than a frame is an error, not an oversized frame.
    #[test]
    fn a_message_larger_than_a_frame_is_refused_at_the_socket() {
        let (mut ours, theirs) = HostSocket::pair(SocketType::SeqPacket).unwrap();
        let big = vec![1u8; MAX_DATA + 1];
        // A Unix seqpacket message must fit the sender's buffer.
        nix::sys::socket::setsockopt(&theirs, nix::sys::socket::sockopt::SndBuf, &(4 * MAX_DATA))
            .unwrap();
        nix::sys::socket::send(
            std::os::fd::AsRawFd::as_raw_fd(&theirs),
            &big,
            nix::sys::socket::MsgFlags::empty(),
        )
        .unwrap();
        let mut buf = vec![0u8; 4 * MAX_DATA];
        let e = read_data_frame(&mut ours, SocketType::SeqPacket, &mut buf).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidData);
    }
}
