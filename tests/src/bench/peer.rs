//! The peer backend, vhost-device-vsock 0.3.0, installed from the crate registry into the
//! project's cache when missing. It is only ever run with its Unix-socket backend
//! (`--vm guest-cid=N,socket=...,uds-path=...`).

use crate::artifacts;
use std::io;
use std::path::PathBuf;
use std::process::Command;

/// The version compared against.
pub const PEER_VERSION: &str = "0.3.0";

/// Where `cargo install --root` puts it.
pub fn peer_root() -> PathBuf {
    artifacts::workspace_root().join(".cache/peer")
}

/// The peer binary, installing it first if needed (takes ~2-3 minutes once).
pub fn ensure_peer() -> io::Result<PathBuf> {
    let bin = peer_root().join("bin/vhost-device-vsock");
    if bin.is_file() && installed_version().as_deref() == Some(PEER_VERSION) {
        return Ok(bin);
    }
    eprintln!(
        "installing vhost-device-vsock {PEER_VERSION} into {} ...",
        peer_root().display()
    );
    let status = Command::new("cargo")
        .args([
            "install",
            "vhost-device-vsock",
            "--version",
            PEER_VERSION,
            "--root",
        ])
        .arg(peer_root())
        .status()?;
    if !status.success() || !bin.is_file() {
        return Err(io::Error::other(format!(
            "cargo install vhost-device-vsock {PEER_VERSION} failed ({status})"
        )));
    }
    Ok(bin)
}

fn installed_version() -> Option<String> {
    // cargo install records installed packages in <root>/.crates.toml.
    let text = std::fs::read_to_string(peer_root().join(".crates.toml")).ok()?;
    let line = text.lines().find(|l| l.contains("vhost-device-vsock "))?;
    let version = line.split_whitespace().nth(1)?;
    Some(version.to_owned())
}
