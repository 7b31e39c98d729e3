//! `domsock-certs --out DIR --hosts a,b,c`: a test CA and one certificate/key per host for
//! the domsockd tunnel. For tests and labs only (see `domsock_host::tunnel::certs`).

use clap::Parser;
use std::path::PathBuf;
use std::process::ExitCode;

/// Makes a test CA and host certificates for the domsockd tunnel (tests and labs only).
#[derive(Debug, Parser)]
struct Args {
    /// Directory for ca.pem, ca.key, <host>.pem, <host>.key.
    #[arg(long)]
    out: PathBuf,
    /// Host names, comma-separated (each becomes the DNS SAN of its certificate).
    #[arg(long, value_delimiter = ',', required = true)]
    hosts: Vec<String>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match domsock_host::tunnel::certs::make_test_pki(
        &args.out,
        args.hosts.iter().map(|s| s.as_str()),
    ) {
        Ok(()) => {
            println!(
                "wrote ca.pem, ca.key and {} host certificates to {}",
                args.hosts.len(),
                args.out.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            let mut msg = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                msg.push_str(": ");
                msg.push_str(&s.to_string());
                src = s.source();
            }
            eprintln!("domsock-certs: {msg}");
            ExitCode::FAILURE
        }
    }
}
