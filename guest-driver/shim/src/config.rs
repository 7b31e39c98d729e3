//! Which connections the shim turns into sessions: the `DOMSOCK_SHIM` environment variable,
//! read once when the program first creates an `AF_VSOCK` socket.
//!
//! - unset, empty, `on`, `all`: every stream or seqpacket connection to the host (CID 2)
//!   or a sibling guest, and every stream listener;
//! - `off`, `0`, `none`: none (every call passes straight through);
//! - a port list, `5000,5001,6000-6010`: only connections to those ports (host and sibling
//!   targets alike) and listeners on them.
//!
//! A value that does not parse turns the shim off (and says so on stderr once): a typo
//! must not silently change how a program connects.
//! `DOMSOCK_SHIM_LOG=1` makes the shim describe each session step on stderr.

use std::sync::OnceLock;

/// Where sessions are used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Policy {
    /// Every host port.
    All,
    /// No port.
    Off,
    /// Inclusive port ranges.
    Ports(Vec<(u32, u32)>),
}

impl Policy {
    /// Parses a `DOMSOCK_SHIM` value.
    pub(crate) fn parse(value: Option<&str>) -> Result<Policy, String> {
        let v = value.unwrap_or("").trim();
        match v {
            "" | "on" | "all" | "1" => return Ok(Policy::All),
            "off" | "0" | "none" => return Ok(Policy::Off),
            _ => {}
        }
        let mut ranges = Vec::new();
        for part in v.split(',').map(str::trim) {
            let num = |s: &str| {
                s.trim()
                    .parse::<u32>()
                    .map_err(|_| format!("bad port {s:?} in DOMSOCK_SHIM={v:?}"))
            };
            let range = match part.split_once('-') {
                Some((a, b)) => (num(a)?, num(b)?),
                None => (num(part)?, num(part)?),
            };
            if range.0 > range.1 {
                return Err(format!("empty range {part:?} in DOMSOCK_SHIM={v:?}"));
            }
            ranges.push(range);
        }
        Ok(Policy::Ports(ranges))
    }

    /// Whether a connection to (or a listener on) `port` becomes a session.
    pub(crate) fn covers(&self, port: u32) -> bool {
        match self {
            Policy::All => true,
            Policy::Off => false,
            Policy::Ports(r) => r.iter().any(|&(a, b)| (a..=b).contains(&port)),
        }
    }
}

/// The process's settings.
#[derive(Debug)]
pub(crate) struct Config {
    pub(crate) policy: Policy,
    pub(crate) log: bool,
}

/// The settings, read on first use.
pub(crate) fn get() -> &'static Config {
    static CONFIG: OnceLock<Config> = OnceLock::new();
    CONFIG.get_or_init(|| {
        let raw = std::env::var("DOMSOCK_SHIM").ok();
        let policy = Policy::parse(raw.as_deref()).unwrap_or_else(|e| {
            crate::log::always(&format!("{e}; sessions off"));
            Policy::Off
        });
        let log = std::env::var("DOMSOCK_SHIM_LOG").is_ok_and(|v| v == "1");
        Config { policy, log }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_parse_to_policies() {
        assert_eq!(Policy::parse(None), Ok(Policy::All));
        assert_eq!(Policy::parse(Some("on")), Ok(Policy::All));
        assert_eq!(Policy::parse(Some("off")), Ok(Policy::Off));
        assert_eq!(Policy::parse(Some(" 0 ")), Ok(Policy::Off));
        let p = Policy::parse(Some("5000, 6000-6010")).unwrap();
        assert!(p.covers(5000) && p.covers(6000) && p.covers(6010));
        assert!(!p.covers(5001) && !p.covers(6011));
        assert!(!Policy::Off.covers(5000));
        assert!(Policy::parse(Some("50x")).is_err());
        assert!(Policy::parse(Some("7-3")).is_err());
        assert!(Policy::parse(Some("5000,")).is_err());
    }
}
