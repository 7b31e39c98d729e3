//! Wake-ups for a guest whose vsock device comes back.
//!
//! While a guest has no vsock device (unplugged for a live migration, or not yet plugged
//! at the destination), every `connect` fails at once with `ENODEV`, and a resuming
//! session can only try again after a pause. Pauses that double up to 200 ms mean the
//! first attempt after the device returns comes on average ~100 ms late (measured: the
//! blackout after a migration was 240-530 ms under TCG, against 140-170 ms after a plain
//! replug where the guest never slept long).
//!
//! The kernel announces every driver bind on its uevent netlink multicast group
//! (`NETLINK_KOBJECT_UEVENT`, group 1), which any user may listen to. The virtio vsock
//! transport is usable exactly when its driver is bound to the new device (the probe
//! registers the device before `driver_bound` sends `bind`), so [`DeviceWatch::wait`]
//! sleeps like a pause but returns as soon as that event arrives. Callers keep their
//! backoff: without netlink (another OS, a seccomp sandbox) `wait` is a plain sleep, and
//! a missed or coalesced event costs at most one pause.
//!
//! Open the watch *before* the first failed `connect`, so an event between that failure
//! and the first wait is not missed.
//!
//! Input is the kernel's, but it is parsed as untrusted all the same: only datagrams from
//! the kernel (netlink port id 0) count, at most [`MAX_EVENT_LEN`] bytes each, and a
//! forged or unknown event only ever costs one extra `connect`.
//!
//! What it does not do: tell which device came back (any vsock transport bind wakes every
//! watcher), or replace the backoff.

use std::io;
use std::mem;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

/// Kernel uevents are at most 2048 bytes (`UEVENT_BUFFER_SIZE`); longer ones are not theirs.
pub const MAX_EVENT_LEN: usize = 4096;

/// Drivers whose bind means a vsock transport is back: virtio (KVM/QEMU guests), Hyper-V
/// sockets, VMware VMCI.
const VSOCK_DRIVERS: [&str; 3] = ["vmw_vsock_virtio_transport", "hv_sock", "vmw_vmci"];

/// Whether one uevent datagram (`ACTION@DEVPATH\0KEY=VALUE\0...`) says a vsock transport's
/// driver was bound to a device.
pub fn announces_vsock_device(msg: &[u8]) -> bool {
    if msg.len() > MAX_EVENT_LEN {
        return false;
    }
    let mut fields = msg.split(|&b| b == 0);
    // The summary line; udev's own re-broadcasts start with "libudev" instead and go to
    // another group, which is not joined.
    match fields.next() {
        Some(head) if head.contains(&b'@') => {}
        _ => return false,
    }
    let (mut bind, mut driver) = (false, false);
    for f in fields {
        if f == b"ACTION=bind" {
            bind = true;
        } else if let Some(d) = f.strip_prefix(b"DRIVER=") {
            driver = VSOCK_DRIVERS.iter().any(|v| d == v.as_bytes());
        }
    }
    bind && driver
}

/// A subscription to the kernel's uevents (module doc).
#[derive(Debug)]
pub struct DeviceWatch {
    /// `None`: netlink is not available here; waits are plain sleeps.
    fd: Option<OwnedFd>,
}

/// What a wait ended with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// A vsock transport's driver was bound (or events were lost: one may have been).
    Device,
    /// The time ran out.
    Timeout,
}

impl DeviceWatch {
    /// Subscribes; never fails (without netlink, [`Self::watching`] is false).
    pub fn open() -> Self {
        Self {
            fd: subscribe().ok(),
        }
    }

    /// A watch that only sleeps (tests, or callers that opt out).
    pub fn sleep_only() -> Self {
        Self { fd: None }
    }

    /// Whether device events can wake a wait.
    pub fn watching(&self) -> bool {
        self.fd.is_some()
    }

    /// Sleeps up to `timeout`, returning early when a vsock transport comes back.
    pub fn wait(&self, timeout: Duration) -> Wake {
        let Some(fd) = &self.fd else {
            std::thread::sleep(timeout);
            return Wake::Timeout;
        };
        let deadline = Instant::now() + timeout;
        loop {
            // Events already queued first: one may have come before this wait.
            match drain(fd) {
                Ok(true) => return Wake::Device,
                Ok(false) => {}
                // Lost events (ENOBUFS) may have been ours; other errors end the watch's
                // usefulness for this wait, which then sleeps out its time.
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => return Wake::Device,
                Err(_) => {
                    std::thread::sleep(deadline.saturating_duration_since(Instant::now()));
                    return Wake::Timeout;
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Wake::Timeout;
            }
            let ms = left.as_millis().clamp(1, i32::MAX as u128) as i32;
            let mut pfd = libc::pollfd {
                fd: fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd, its count 1.
            let r = unsafe { libc::poll(&mut pfd, 1, ms) };
            if r < 0 && io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
                std::thread::sleep(deadline.saturating_duration_since(Instant::now()));
                return Wake::Timeout;
            }
        }
    }
}

fn subscribe() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the result is checked before use.
    let raw = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            libc::NETLINK_KOBJECT_UEVENT,
        )
    };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a new descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: all-zero is a valid sockaddr_nl.
    let mut addr: libc::sockaddr_nl = unsafe { mem::zeroed() };
    addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    // Port id 0: the kernel assigns one. Group 1: the kernel's uevents.
    addr.nl_groups = 1;
    // SAFETY: `addr` is a sockaddr_nl of the size given.
    let r = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_nl).cast(),
            size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// Reads every queued event; true if one announced a vsock transport.
fn drain(fd: &OwnedFd) -> io::Result<bool> {
    let mut buf = [0u8; MAX_EVENT_LEN];
    let mut found = false;
    loop {
        // SAFETY: all-zero is a valid sockaddr_nl.
        let mut from: libc::sockaddr_nl = unsafe { mem::zeroed() };
        let mut from_len = size_of::<libc::sockaddr_nl>() as libc::socklen_t;
        // SAFETY: `buf` and `from` are valid for the lengths given; MSG_TRUNC makes the
        // result the datagram's full length, so a longer one is recognised and skipped.
        let n = unsafe {
            libc::recvfrom(
                fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_TRUNC | libc::MSG_DONTWAIT,
                (&mut from as *mut libc::sockaddr_nl).cast(),
                &mut from_len,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EAGAIN) => Ok(found),
                Some(libc::EINTR) => continue,
                _ => Err(e),
            };
        }
        let n = n as usize;
        // Only the kernel speaks on this group (port id 0); a user process that could
        // send here at all (CAP_NET_ADMIN) would only cause an extra connect.
        if n <= buf.len() && from.nl_pid == 0 && announces_vsock_device(&buf[..n]) {
            found = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(fields: &[&str]) -> Vec<u8> {
        let mut v = Vec::new();
        for f in fields {
            v.extend_from_slice(f.as_bytes());
            v.push(0);
        }
        v
    }

    /// The bind event of a Debian 6.1/6.12 guest after `device_add` of a
    /// vhost-user-vsock-pci device (fields as the kernel orders them).
    const BIND: [&str; 7] = [
        "bind@/devices/pci0000:00/0000:00:04.0/virtio2",
        "ACTION=bind",
        "DEVPATH=/devices/pci0000:00/0000:00:04.0/virtio2",
        "SUBSYSTEM=virtio",
        "DRIVER=vmw_vsock_virtio_transport",
        "MODALIAS=virtio:d00000013v00001AF4",
        "SEQNUM=1893",
    ];

    #[test]
    fn a_vsock_transport_bind_is_announced() {
        assert!(announces_vsock_device(&event(&BIND)));
    }

    #[test]
    fn other_events_are_not() {
        // The device's `add` comes before its driver is bound: too early to connect.
        let mut add = BIND;
        add[0] = "add@/devices/pci0000:00/0000:00:04.0/virtio2";
        add[1] = "ACTION=add";
        assert!(!announces_vsock_device(&event(&add)));
        // Another virtio driver's bind.
        let mut net = BIND;
        net[4] = "DRIVER=virtio_net";
        assert!(!announces_vsock_device(&event(&net)));
        // A driver name that only starts like ours.
        let mut longer = BIND;
        longer[4] = "DRIVER=vmw_vsock_virtio_transport_x";
        assert!(!announces_vsock_device(&event(&longer)));
        // The unbind at `device_del`.
        let mut unbind = BIND;
        unbind[0] = "unbind@/devices/pci0000:00/0000:00:04.0/virtio2";
        unbind[1] = "ACTION=unbind";
        assert!(!announces_vsock_device(&event(&unbind)));
    }

    #[test]
    fn malformed_datagrams_are_not() {
        assert!(!announces_vsock_device(b""));
        assert!(!announces_vsock_device(&[0u8; 64]));
        // udev's re-broadcast format (a binary header), even with the right fields after it.
        let mut udev = b"libudev\0\xfe\xed\xca\xfe".to_vec();
        udev.extend(event(&BIND[1..]));
        assert!(!announces_vsock_device(&udev));
        // Longer than any kernel event.
        let mut long = event(&BIND);
        long.resize(MAX_EVENT_LEN + 1, b'x');
        assert!(!announces_vsock_device(&long));
    }

    #[test]
    fn a_watch_without_netlink_sleeps_its_time() {
        let w = DeviceWatch::sleep_only();
        assert!(!w.watching());
        let t = Instant::now();
        assert_eq!(w.wait(Duration::from_millis(20)), Wake::Timeout);
        assert!(t.elapsed() >= Duration::from_millis(20));
    }

    #[test]
    fn a_quiet_watch_times_out() {
        // On a Linux test machine the subscription works; no vsock driver binds here.
        let w = DeviceWatch::open();
        assert!(w.watching());
        let t = Instant::now();
        assert_eq!(w.wait(Duration::from_millis(30)), Wake::Timeout);
        assert!(t.elapsed() >= Duration::from_millis(30));
    }
}
