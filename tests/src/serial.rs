//! The guest's serial console as a growing list of lines, and the `DS-*` marker lines in it.
//!
//! Marker lines (written by the guest's `/init` and the `domsock` program) look like
//! `DS-RESULT cmd=send bytes=268435456 xxh3=0123456789abcdef ms=1234.5`; a `msg=` field runs
//! to the end of the line. Kernel messages may share the console, so a marker is recognised
//! anywhere in a line.

use std::collections::BTreeMap;
use std::sync::{Condvar, Mutex};
use std::time::Instant;

/// One parsed `DS-*` line.
#[derive(Debug, Clone)]
pub struct DsLine {
    /// `DS-RESULT`, `DS-READY`, `DS-DONE`, ...
    pub kind: String,
    /// `key=value` fields.
    pub fields: BTreeMap<String, String>,
    /// The whole line as printed.
    pub raw: String,
}

impl DsLine {
    /// Parses the marker in `line`, if there is one.
    pub fn parse(line: &str) -> Option<Self> {
        let start = line.find("DS-")?;
        let text = &line[start..];
        let mut words = text.splitn(2, char::is_whitespace);
        let kind = words.next()?.to_owned();
        if kind.len() <= 3
            || !kind[3..]
                .chars()
                .all(|c| c.is_ascii_uppercase() || c == '-')
        {
            return None;
        }
        let mut fields = BTreeMap::new();
        let mut rest = words.next().unwrap_or("").trim_start();
        while !rest.is_empty() {
            if let Some(msg) = rest.strip_prefix("msg=") {
                fields.insert("msg".to_owned(), msg.to_owned());
                break;
            }
            let (word, tail) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
            if let Some((k, v)) = word.split_once('=') {
                fields.insert(k.to_owned(), v.to_owned());
            }
            rest = tail.trim_start();
        }
        Some(Self {
            kind,
            fields,
            raw: text.to_owned(),
        })
    }

    /// A field's text.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.fields.get(key).map(String::as_str)
    }

    /// A field that must be there.
    ///
    /// # Panics
    /// If it is not.
    pub fn str(&self, key: &str) -> &str {
        self.get(key)
            .unwrap_or_else(|| panic!("no {key}= in guest line {:?}", self.raw))
    }

    /// An integer field that must be there.
    ///
    /// # Panics
    /// If it is missing or not an integer.
    pub fn u64(&self, key: &str) -> u64 {
        let v = self.str(key);
        v.parse()
            .unwrap_or_else(|_| panic!("{key}={v} is not an integer in {:?}", self.raw))
    }

    /// A decimal field that must be there.
    ///
    /// # Panics
    /// If it is missing or not a number.
    pub fn f64(&self, key: &str) -> f64 {
        let v = self.str(key);
        v.parse()
            .unwrap_or_else(|_| panic!("{key}={v} is not a number in {:?}", self.raw))
    }

    /// True if this is `kind` with `cmd=<cmd>` (any command when `cmd` is `None`).
    pub fn is(&self, kind: &str, cmd: Option<&str>) -> bool {
        self.kind == kind && cmd.is_none_or(|c| self.get("cmd") == Some(c))
    }
}

#[derive(Debug, Default)]
struct Lines {
    lines: Vec<String>,
    closed: bool,
}

/// Why a wait on the console ended without a match.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitEnd {
    /// The deadline passed.
    Timeout,
    /// The console closed (QEMU exited).
    Closed,
}

/// Lines received so far from a guest console; filled by a reader thread.
#[derive(Debug, Default)]
pub struct Console {
    lines: Mutex<Lines>,
    grew: Condvar,
}

impl Console {
    /// Appends a line (without its line ending).
    pub fn push(&self, line: String) {
        let mut l = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        l.lines.push(line);
        self.grew.notify_all();
    }

    /// Marks the console closed: no more lines will come.
    pub fn close(&self) {
        let mut l = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        l.closed = true;
        self.grew.notify_all();
    }

    /// Waits until a line at index `from` or later matches; returns its index and text.
    pub fn wait_match(
        &self,
        from: usize,
        deadline: Instant,
        mut matches: impl FnMut(&str) -> bool,
    ) -> Result<(usize, String), WaitEnd> {
        let mut next = from;
        let mut l = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            while next < l.lines.len() {
                if matches(&l.lines[next]) {
                    return Ok((next, l.lines[next].clone()));
                }
                next += 1;
            }
            if l.closed {
                return Err(WaitEnd::Closed);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(WaitEnd::Timeout);
            }
            l = self
                .grew
                .wait_timeout(l, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// The last `n` lines, for failure messages.
    pub fn tail(&self, n: usize) -> String {
        let l = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        let start = l.lines.len().saturating_sub(n);
        l.lines[start..].join("\n")
    }

    /// A copy of every line so far.
    pub fn lines(&self) -> Vec<String> {
        self.lines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .lines
            .clone()
    }

    /// Number of lines so far.
    pub fn len(&self) -> usize {
        self.lines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .lines
            .len()
    }

    /// True if no line arrived yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_fields_and_message() {
        let l = DsLine::parse("[    1.0] x DS-RESULT cmd=send bytes=12 xxh3=00ff").unwrap();
        assert!(l.is("DS-RESULT", Some("send")));
        assert_eq!(l.u64("bytes"), 12);
        assert_eq!(l.str("xxh3"), "00ff");
        let e =
            DsLine::parse("DS-ERROR cmd=recv msg=recv after 0 bytes: ECONNRESET (x=y)").unwrap();
        assert_eq!(e.str("msg"), "recv after 0 bytes: ECONNRESET (x=y)");
        assert!(DsLine::parse("no marker here").is_none());
        assert!(DsLine::parse("DS-").is_none());
    }
}
