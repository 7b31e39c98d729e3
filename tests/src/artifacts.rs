//! Locations of everything the VM tests run: guest kernels and initramfs images (made by
//! `tests/vm/setup.sh`), QEMU, and the backend binary; and the policy when they are missing.
//!
//! Environment:
//! - `DOMSOCK_SKIP_VM=1`: skip every VM test (each says `SKIPPED` and is listed in
//!   `target/test-skips.txt`, see [`crate::skip`]; under CI they fail instead).
//! - `DOMSOCK_BACKEND`: backend binary (default `<workspace>/target/release/domsockd`).
//! - `DOMSOCK_QEMU`: QEMU binary (default `qemu-system-x86_64` from `PATH`).
//! - `DOMSOCK_ACCEL`: QEMU accelerator (default `tcg`; KVM does not work on the CI hosts).
//! - `DOMSOCK_QEMU_CPU`: QEMU CPU model (default `qemu64`, see [`qemu_cpu`]).
//!
//! The 6.1 kernel is required: without it the tests fail and say to run the setup script. The
//! 6.12 kernel is optional outside CI: its variants are skipped ([`crate::skip`]) when it is
//! missing; under CI (`CI=true`) they fail.

use std::path::{Path, PathBuf};

/// The kernel series every VM test runs on.
pub const REQUIRED_KERNEL: &str = "6.1";

/// A guest kernel and the initramfs built for it.
#[derive(Debug, Clone)]
pub struct Kernel {
    /// Series name: `6.1` or `6.12`.
    pub name: &'static str,
    /// Kernel image.
    pub vmlinuz: PathBuf,
    /// Initramfs with busybox, the vsock modules, `/init` and the `domsock` program.
    pub initramfs: PathBuf,
}

/// The workspace root (parent of this crate).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests crate has a parent directory")
        .to_path_buf()
}

/// Where VM artifacts live: `<workspace>/.cache/vm`.
pub fn vm_cache() -> PathBuf {
    workspace_root().join(".cache").join("vm")
}

/// Where test logs go: `<workspace>/target/vm-tests`.
pub fn log_root() -> PathBuf {
    workspace_root().join("target").join("vm-tests")
}

/// True when `DOMSOCK_SKIP_VM=1`.
pub fn vm_tests_skipped() -> bool {
    std::env::var("DOMSOCK_SKIP_VM").is_ok_and(|v| v == "1")
}

fn setup_hint() -> String {
    format!(
        "run `sudo {}/tests/vm/setup.sh` first (or set DOMSOCK_SKIP_VM=1 to skip the VM tests)",
        workspace_root().display()
    )
}

/// The kernel `name` if the tests should run on it; `None` when they are skipped (recorded
/// through [`crate::skip::skip`]).
///
/// # Panics
/// When the required kernel's artifacts or QEMU are missing and `DOMSOCK_SKIP_VM` is not set,
/// and under CI when the test would be skipped: a missing setup must not look like a pass.
pub fn kernel(name: &'static str) -> Option<Kernel> {
    if vm_tests_skipped() {
        crate::skip::skip(&format!(
            "DOMSOCK_SKIP_VM=1: VM test on kernel {name} not run"
        ));
        return None;
    }
    let cache = vm_cache();
    let k = Kernel {
        name,
        vmlinuz: cache.join(format!("kernel-{name}")).join("vmlinuz"),
        initramfs: cache.join(format!("initramfs-{name}.cpio.gz")),
    };
    let missing: Vec<String> = [&k.vmlinuz, &k.initramfs]
        .iter()
        .filter(|p| !p.exists())
        .map(|p| p.display().to_string())
        .collect();
    if !missing.is_empty() {
        if name == REQUIRED_KERNEL {
            panic!(
                "VM test artifacts missing: {}; {}",
                missing.join(", "),
                setup_hint()
            );
        }
        crate::skip::skip(&format!(
            "kernel {name} not set up ({} missing; tests/vm/setup.sh fetches it)",
            missing.join(", ")
        ));
        return None;
    }
    let qemu = qemu_binary();
    if which(&qemu).is_none() {
        panic!("QEMU binary {} not found; {}", qemu.display(), setup_hint());
    }
    warn_if_stale(&k);
    Some(k)
}

/// The backend binary to test.
///
/// # Panics
/// When it does not exist, with a hint how to build it.
pub fn backend_binary() -> PathBuf {
    let path = match std::env::var_os("DOMSOCK_BACKEND") {
        Some(p) => PathBuf::from(p),
        None => workspace_root()
            .join("target")
            .join("release")
            .join("domsockd"),
    };
    if !path.is_file() {
        panic!(
            "backend binary {} not found: build it with `cargo build --release -p domsock-host`, \
             or point DOMSOCK_BACKEND at another vhost-user vsock backend",
            path.display()
        );
    }
    path
}

/// QEMU binary (`DOMSOCK_QEMU` or `qemu-system-x86_64`).
pub fn qemu_binary() -> PathBuf {
    std::env::var_os("DOMSOCK_QEMU")
        .map_or_else(|| PathBuf::from("qemu-system-x86_64"), PathBuf::from)
}

/// QEMU accelerator (`DOMSOCK_ACCEL` or `tcg`).
pub fn accel() -> String {
    std::env::var("DOMSOCK_ACCEL").unwrap_or_else(|_| "tcg".to_owned())
}

/// QEMU CPU model (`DOMSOCK_QEMU_CPU` or `qemu64`, QEMU's default for `-machine pc`).
///
/// QEMU 7.2's TCG (Debian 12) crashes the 6.12 guest kernel early in boot in a third to a
/// half of boots (a #DB after SLUB's `cmpxchg16b`, or a GPF on `iretq` in `sync_core`);
/// `qemu64,-cx16` avoided the first but not the second. The setup script therefore installs
/// QEMU 10 from bookworm-backports, which boots 6.12 reliably with the default model.
pub fn qemu_cpu() -> String {
    std::env::var("DOMSOCK_QEMU_CPU").unwrap_or_else(|_| "qemu64".to_owned())
}

fn which(bin: &Path) -> Option<PathBuf> {
    if bin.components().count() > 1 {
        return bin.is_file().then(|| bin.to_path_buf());
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(bin))
        .find(|p| p.is_file())
}

/// The initramfs embeds the guest program; warn when the program was rebuilt after it.
fn warn_if_stale(k: &Kernel) {
    let guest_bin = workspace_root().join("target/guest/x86_64-unknown-linux-gnu/release/domsock");
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    // The guest program's, the shim's and the C test program's sources all end up in it.
    let root = workspace_root();
    let dirs = [
        root.join("guest-driver").join("src"),
        root.join("guest-driver").join("shim").join("src"),
        root.join("tests").join("vm").join("c"),
    ];
    let newest_src = dirs
        .iter()
        .flat_map(|d| std::fs::read_dir(d).into_iter().flatten())
        .filter_map(|e| e.ok())
        .filter_map(|e| modified(&e.path()))
        .chain(modified(&guest_bin))
        .max();
    if let (Some(src_time), Some(initrd_time)) = (newest_src, modified(&k.initramfs)) {
        if src_time > initrd_time {
            crate::report::line(
                &format!("kernel {}", k.name),
                "WARNING: guest program, shim or C test sources are newer than the initramfs; re-run tests/vm/setup.sh",
            );
        }
    }
}
