//! One-line diagnostics on stderr, written with the next `write` so that they never enter
//! the shim's own wrappers (and never allocate a lock the program could hold).

/// Writes `domsock-shim: <msg>` to stderr.
pub(crate) fn always(msg: &str) {
    let line = format!("domsock-shim[{}]: {msg}\n", std::process::id());
    // SAFETY: a valid buffer of `line.len()` bytes; a short or failed write only loses a
    // diagnostic.
    unsafe {
        crate::next::write(2, line.as_ptr().cast(), line.len());
    }
}

/// Writes the message only with `DOMSOCK_SHIM_LOG=1`.
macro_rules! debug {
    ($($arg:tt)*) => {
        if $crate::config::get().log {
            $crate::log::always(&format!($($arg)*));
        }
    };
}
pub(crate) use debug;
