//! Every line braid prints goes through here, so a closed pipe ends a
//! command quietly instead of panicking (`println!` panics on a write
//! error; Rust starts programs with SIGPIPE ignored, so a write to a pipe
//! whose reader has gone fails with `BrokenPipe`). clippy's
//! `disallowed-macros` (coordinator/cli/clippy.toml) keeps `println!` and
//! friends out of this crate.
//!
//! - Standard output closed (`braid logs ID | head -1`): what the reader
//!   wanted is printed, so the command ends there with status 0.
//! - Standard error closed: progress and diagnostics are dropped from then
//!   on; `braid build`, whose watcher has gone, cancels its build as
//!   Ctrl-C would (`stderr_gone`).

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};

static STDERR_GONE: AtomicBool = AtomicBool::new(false);

/// Writes to standard output; a closed pipe ends the process with status 0.
pub fn stdout(args: std::fmt::Arguments<'_>) {
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_fmt(args).and_then(|()| out.flush())
        && e.kind() == std::io::ErrorKind::BrokenPipe
    {
        std::process::exit(0);
    }
}

/// Writes to standard output, saying whether it could (for output that
/// must not end the command: `braid build` still writes its files).
pub fn try_stdout(args: std::fmt::Arguments<'_>) -> bool {
    let mut out = std::io::stdout().lock();
    out.write_fmt(args).and_then(|()| out.flush()).is_ok()
}

/// Writes to standard error; once a write fails with a closed pipe,
/// nothing more is written there.
pub fn stderr(args: std::fmt::Arguments<'_>) {
    if STDERR_GONE.load(Ordering::Relaxed) {
        return;
    }
    let mut err = std::io::stderr().lock();
    if let Err(e) = err.write_fmt(args).and_then(|()| err.flush())
        && e.kind() == std::io::ErrorKind::BrokenPipe
    {
        STDERR_GONE.store(true, Ordering::Relaxed);
    }
}

/// Whether standard error's reader has gone.
pub fn stderr_gone() -> bool {
    STDERR_GONE.load(Ordering::Relaxed)
}

/// `println!` that never panics (see the module).
macro_rules! outln {
    () => { $crate::out::stdout(format_args!("\n")) };
    ($($arg:tt)*) => { $crate::out::stdout(format_args!("{}\n", format_args!($($arg)*))) };
}

/// `print!` that never panics.
macro_rules! out {
    ($($arg:tt)*) => { $crate::out::stdout(format_args!($($arg)*)) };
}

/// `eprintln!` that never panics.
macro_rules! errln {
    () => { $crate::out::stderr(format_args!("\n")) };
    ($($arg:tt)*) => { $crate::out::stderr(format_args!("{}\n", format_args!($($arg)*))) };
}

/// `eprint!` that never panics.
macro_rules! err {
    ($($arg:tt)*) => { $crate::out::stderr(format_args!($($arg)*)) };
}
