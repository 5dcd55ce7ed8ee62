//! Where the command's text goes. stdout is often a pipe whose reader stops early
//! (`trustwire probe … | head -4`): `println!` panics when that reader is gone, so every line
//! goes through here instead. A closed stdout ends the output quietly and the command still
//! finishes with its own exit status; any other write failure (a full disk) is reported once
//! and makes the exit status 1. stderr carries diagnostics; when it is closed they are lost,
//! never a panic.

use std::fmt;
use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

/// Set once a write to stdout failed: nothing more is written there.
static STDOUT_DONE: AtomicBool = AtomicBool::new(false);
/// A stdout failure other than a closed pipe, for the exit status.
static STDOUT_ERROR: Mutex<Option<String>> = Mutex::new(None);

/// One line on stdout.
macro_rules! say {
    ($($arg:tt)*) => { $crate::cli::output::stdout_line(format_args!($($arg)*)) };
}

/// One line on stderr.
macro_rules! note {
    ($($arg:tt)*) => { $crate::cli::output::stderr_line(format_args!($($arg)*)) };
}

pub(crate) fn stdout_line(args: fmt::Arguments<'_>) {
    write_stdout(|out| writeln!(out, "{args}"));
}

/// Raw bytes on stdout (a response payload).
pub(crate) fn stdout_bytes(bytes: &[u8]) {
    write_stdout(|out| out.write_all(bytes));
}

fn write_stdout(write: impl FnOnce(&mut io::StdoutLock<'static>) -> io::Result<()>) {
    if STDOUT_DONE.load(Ordering::Relaxed) {
        return;
    }
    let mut out = io::stdout().lock();
    // Flushed here rather than at exit, where std drops a failure silently.
    if let Err(e) = write(&mut out).and_then(|()| out.flush()) {
        STDOUT_DONE.store(true, Ordering::Relaxed);
        if e.kind() != io::ErrorKind::BrokenPipe {
            *STDOUT_ERROR.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
        }
    }
}

pub(crate) fn stderr_line(args: fmt::Arguments<'_>) {
    let _ = writeln!(io::stderr().lock(), "{args}");
}

/// Why stdout could not be written, when that was not the reader closing the pipe.
pub(crate) fn stdout_error() -> Option<String> {
    STDOUT_ERROR.lock().unwrap_or_else(|p| p.into_inner()).clone()
}
