//! `domsockd` entry point: parse, validate, serve every configured VM.

use clap::Parser;
use domsock_host::admin;
use domsock_host::config::{Args, Config};
use domsock_host::port::DomainPort;
use domsock_host::router::{self, Router};
use domsock_host::server::VmServer;
use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use tracing::{error, info, warn};

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let args = Args::parse();
    let config = match Config::try_from(args.clone()) {
        Ok(c) => c,
        Err(e) => {
            error!("{}", error_chain(&e));
            return ExitCode::from(2);
        }
    };
    let policy = match config.compile_policy() {
        Ok(p) => p,
        Err(e) => {
            error!("{}", error_chain(&e));
            return ExitCode::from(2);
        }
    };
    let mut servers = Vec::new();
    let backlog_total = Arc::new(AtomicUsize::new(0));
    for vm in &config.vms {
        match VmServer::bind(vm, config.queue_size, config.busy_poll, &backlog_total) {
            Ok(s) => {
                s.shared().park_timeout_ms.store(
                    config.session_park_timeout.as_millis() as u64,
                    std::sync::atomic::Ordering::Relaxed,
                );
                servers.push((vm.display_name(), s))
            }
            Err(e) => {
                error!("{}", error_chain(&e));
                return ExitCode::from(1);
            }
        }
    }
    let domains: Vec<(_, Arc<dyn DomainPort>)> = servers
        .iter()
        .map(|(_, s)| (s.shared(), s.port() as Arc<dyn DomainPort>))
        .collect();
    let router = Arc::new(Router::new(domains, policy, config.listeners.clone()));
    let namespaces: Vec<String> = config.vms.iter().map(|v| v.namespace()).collect();
    let admin_socket = config.admin_socket.clone();
    let bus_dir = config.bus_dir.clone();
    let tunnel_section = config.tunnel.clone();
    let sockets: Vec<_> = config
        .vms
        .iter()
        .flat_map(|v| [v.socket.clone(), v.uds_path.clone()])
        .chain(admin_socket.clone())
        .chain(bus_dir.iter().flat_map(|d| {
            namespaces
                .iter()
                .map(move |ns| d.join(format!("{ns}.sock")))
        }))
        .collect();
    let fault_injection = args.fault_injection;
    // The bus thread runs before the engines exist, so that every engine's service table
    // answers guests at the bus port.
    let bus_hub = domsock_host::bus::BusHub::new();
    bus_hub.reload(router.policy());
    if let Err(e) = spawn_signal_thread(router.clone(), bus_hub.clone(), args, config, sockets) {
        error!("cannot set up signal handling: {e}");
        return ExitCode::from(1);
    }
    let mut spaces = namespaces.clone();
    spaces.sort();
    spaces.dedup();
    // After the signal thread: the bus thread inherits the blocked signal mask.
    match domsock_host::bus::unix::start(bus_hub.clone(), bus_dir.as_deref(), &spaces) {
        Ok(s) => {
            if let Some(dir) = &bus_dir {
                info!(dir = %dir.display(), namespaces = s.sockets.len(), "bus sockets listening");
            }
            router.set_bus_door(s.door.clone());
        }
        Err(e) => {
            error!("cannot start the bus service: {e}");
            return ExitCode::from(1);
        }
    }
    let mut engines = Vec::new();
    for (_, s) in &servers {
        match s.engine(router.clone()) {
            Ok(e) => engines.push(e),
            Err(e) => {
                error!(vm = %s.shared().name, "cannot create the data plane: {e}");
                return ExitCode::from(1);
            }
        }
    }
    let vms: Vec<domsock_host::relay::ServedVm> = servers
        .iter()
        .zip(&engines)
        .zip(&namespaces)
        .map(
            |(((_, s), plane), namespace)| domsock_host::relay::ServedVm {
                shared: s.shared(),
                namespace: namespace.clone(),
                plane: plane.clone(),
            },
        )
        .collect();
    let tunnel = match &tunnel_section {
        None => None,
        Some(t) => match start_tunnel(t, vms.clone(), fault_injection) {
            Ok(tunnel) => Some(tunnel),
            Err(e) => {
                error!("cannot start the tunnel: {}", error_chain(e.as_ref()));
                return ExitCode::from(1);
            }
        },
    };
    if let Some(path) = &admin_socket {
        if let Err(e) = admin::spawn(path, vms, tunnel.clone(), Some(bus_hub.clone())) {
            error!(path = %path.display(), "cannot start the admin service: {e}");
            return ExitCode::from(1);
        }
    }
    let handles: Vec<_> = servers
        .into_iter()
        .zip(engines)
        .map(|((name, s), plane)| {
            std::thread::Builder::new()
                .name(format!("vm-{name}"))
                .spawn(move || s.run(plane))
                .expect("spawning a VM thread")
        })
        .collect();
    for h in handles {
        let _ = h.join();
    }
    ExitCode::SUCCESS
}

/// Starts the tunnel with the session relay service as its acceptor: peers may open
/// channels only for the sessions of domains being adopted here.
fn start_tunnel(
    t: &domsock_host::config::TunnelSection,
    vms: Vec<domsock_host::relay::ServedVm>,
    fault_injection: bool,
) -> Result<admin::AdminTunnel, Box<dyn std::error::Error>> {
    let cfg = t.runtime_config()?;
    let relay = domsock_host::relay::RelayService::new(t.host.clone(), vms);
    if fault_injection {
        relay.allow_fault_injection();
    }
    let service = Arc::new(domsock_host::tunnel::TunnelService::start(
        cfg,
        relay.clone(),
    )?);
    relay.set_tunnel(service.clone());
    info!(host = %t.host, listen = %service.local_addr(), peers = t.peers.len(), "tunnel listening");
    Ok(admin::AdminTunnel {
        service,
        relay,
        host: t.host.clone(),
        peers: t.peers.keys().cloned().collect(),
    })
}

/// Blocks SIGUSR1/SIGHUP/SIGTERM/SIGINT in every thread (the mask is inherited by threads
/// spawned later) and handles them on one thread with `sigwait`: SIGUSR1 logs every VM's
/// counters; SIGHUP reloads the access policy; SIGTERM/SIGINT log the counters, remove our
/// socket files and exit.
fn spawn_signal_thread(
    router: Arc<Router>,
    bus: Arc<domsock_host::bus::BusHub>,
    args: Args,
    config: Config,
    sockets: Vec<std::path::PathBuf>,
) -> nix::Result<()> {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    for sig in [
        Signal::SIGUSR1,
        Signal::SIGHUP,
        Signal::SIGTERM,
        Signal::SIGINT,
    ] {
        set.add(sig);
    }
    set.thread_block()?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || loop {
            let Ok(sig) = set.wait() else { continue };
            if sig == Signal::SIGHUP {
                reload(&router, &bus, &args, &config);
                continue;
            }
            for vm in router.vms() {
                info!(vm = %vm.name, cid = %vm.cid, stats = %vm.stats, "counters");
            }
            info!(stats = %bus.stats, "bus counters");
            router::log_summary(&router);
            if sig != Signal::SIGUSR1 {
                for p in &sockets {
                    let _ = std::fs::remove_file(p);
                }
                info!(signal = %sig, "exiting");
                std::process::exit(0);
            }
        })
        .map_err(|_| nix::Error::EAGAIN)?;
    Ok(())
}

/// Re-reads the configuration and swaps in its policy (rules and groups). The VMs
/// themselves (CIDs, names, namespaces, sockets) need a restart to change; a file that
/// changes them, or does not parse, leaves the running policy in place.
fn reload(router: &Router, bus: &domsock_host::bus::BusHub, args: &Args, running: &Config) {
    let fresh = match Config::try_from(args.clone()) {
        Ok(c) => c,
        Err(e) => {
            warn!(
                "policy reload failed, keeping the running policy: {}",
                error_chain(&e)
            );
            return;
        }
    };
    let identity = |c: &Config| {
        c.vms
            .iter()
            .map(|v| (v.guest_cid, v.display_name(), v.namespace()))
            .collect::<Vec<_>>()
    };
    if identity(&fresh) != identity(running) {
        warn!("policy reload: the set of VMs changed, which needs a restart; keeping the running policy");
        return;
    }
    match fresh.compile_policy() {
        Ok(policy) => {
            let reset = router.reload(policy);
            let removed = bus.reload(router.policy());
            info!(reset, bus_members_removed = removed, "policy reloaded");
        }
        Err(e) => warn!(
            "policy reload failed, keeping the running policy: {}",
            error_chain(&e)
        ),
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
