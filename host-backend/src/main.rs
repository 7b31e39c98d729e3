//! `domsockd` entry point: parse, validate, serve every configured VM.

use clap::Parser;
use domsock_host::config::{Args, Config};
use domsock_host::server::VmServer;
use std::io::IsTerminal;
use std::process::ExitCode;
use tracing::{error, info};

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let config = match Config::try_from(Args::parse()) {
        Ok(c) => c,
        Err(e) => {
            error!("{}", error_chain(&e));
            return ExitCode::from(2);
        }
    };
    let mut servers = Vec::new();
    for vm in &config.vms {
        match VmServer::bind(vm, config.queue_size, config.busy_poll) {
            Ok(s) => servers.push((vm.display_name(), s)),
            Err(e) => {
                error!("{}", error_chain(&e));
                return ExitCode::from(1);
            }
        }
    }
    let vms: Vec<_> = servers.iter().map(|(_, s)| s.shared()).collect();
    let sockets: Vec<_> = config
        .vms
        .iter()
        .flat_map(|v| [v.socket.clone(), v.uds_path.clone()])
        .collect();
    if let Err(e) = spawn_signal_thread(vms, sockets) {
        error!("cannot set up signal handling: {e}");
        return ExitCode::from(1);
    }
    let handles: Vec<_> = servers
        .into_iter()
        .map(|(name, s)| {
            std::thread::Builder::new()
                .name(format!("vm-{name}"))
                .spawn(move || s.run())
                .expect("spawning a VM thread")
        })
        .collect();
    for h in handles {
        let _ = h.join();
    }
    ExitCode::SUCCESS
}

/// Blocks SIGUSR1/SIGTERM/SIGINT in every thread (the mask is inherited by threads spawned
/// later) and handles them on one thread with `sigwait`: SIGUSR1 logs every VM's counters;
/// SIGTERM/SIGINT log them, remove our socket files and exit.
fn spawn_signal_thread(
    vms: Vec<std::sync::Arc<domsock_host::dataplane::VmShared>>,
    sockets: Vec<std::path::PathBuf>,
) -> nix::Result<()> {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    for sig in [Signal::SIGUSR1, Signal::SIGTERM, Signal::SIGINT] {
        set.add(sig);
    }
    set.thread_block()?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || loop {
            let Ok(sig) = set.wait() else { continue };
            for vm in &vms {
                info!(vm = %vm.name, cid = %vm.cid, stats = %vm.stats, "counters");
            }
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
