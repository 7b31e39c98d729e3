//! `domsockd` entry point: parse, validate, serve every configured VM.

use clap::Parser;
use domsock_host::config::{Args, Config};
use domsock_host::server::VmServer;
use std::io::IsTerminal;
use std::process::ExitCode;
use tracing::error;

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
        match VmServer::bind(vm, config.queue_size) {
            Ok(s) => servers.push((vm.display_name(), s)),
            Err(e) => {
                error!("{}", error_chain(&e));
                return ExitCode::from(1);
            }
        }
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
