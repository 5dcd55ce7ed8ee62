//! Waiting on the shared tokio runtime from Python without holding the GIL.

use std::future::Future;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::OnceLock;
use std::time::Duration;

use pyo3::prelude::*;
use trustwire::runtime::runtime;
use trustwire::Error;

use crate::errors::{base_error, to_pyerr, transport_error};

/// How often a blocked call wakes up to let Python handle signals (Ctrl-C).
const SIGNAL_CHECK: Duration = Duration::from_millis(100);

static RUNTIME_PID: OnceLock<u32> = OnceLock::new();

/// The shared runtime, refusing use in a forked child: its worker threads exist only in the
/// parent, so anything waiting on them in the child would hang forever.
pub fn checked_runtime(py: Python<'_>) -> PyResult<&'static tokio::runtime::Runtime> {
    let pid = *RUNTIME_PID.get_or_init(std::process::id);
    if pid != std::process::id() {
        return Err(base_error(
            py,
            "trustwire cannot be used in a process forked after it started (its runtime threads \
             stay in the parent); use the 'spawn' or 'forkserver' multiprocessing start method, \
             or fork before using trustwire",
        ));
    }
    Ok(runtime())
}

/// Runs `fut` and waits for it with the GIL released, waking every 100 ms to run Python's
/// signal handlers; a KeyboardInterrupt drops (cancels) the operation.
pub fn block_on<T, F>(py: Python<'_>, fut: F) -> PyResult<T>
where
    T: Send + 'static,
    F: Future<Output = Result<T, Error>> + Send + 'static,
{
    let rt = checked_runtime(py)?;
    if tokio::runtime::Handle::try_current().is_ok() {
        // A Python handler calling out from one of the runtime's blocking threads, where the
        // runtime cannot be entered again: run the operation as a task and wait for it.
        return block_on_task(py, rt, fut);
    }
    // Polling the operation on this thread saves a task hop per call; its I/O still runs on
    // the runtime's workers.
    let mut fut = Box::pin(fut);
    loop {
        // The timer must be made inside the runtime (block_on enters it).
        let polled = py.allow_threads(|| rt.block_on(async { tokio::time::timeout(SIGNAL_CHECK, &mut fut).await }));
        match polled {
            Ok(result) => return result.map_err(|e| to_pyerr(py, e)),
            Err(_elapsed) => py.check_signals()?,
        }
    }
}

fn block_on_task<T, F>(py: Python<'_>, rt: &tokio::runtime::Runtime, fut: F) -> PyResult<T>
where
    T: Send + 'static,
    F: Future<Output = Result<T, Error>> + Send + 'static,
{
    let (tx, rx) = mpsc::sync_channel(1);
    // Only this thread receives; the mutex just makes the receiver shareable with allow_threads.
    let rx = std::sync::Mutex::new(rx);
    let task = rt.spawn(async move {
        let _ = tx.send(fut.await);
    });
    loop {
        match py.allow_threads(|| rx.lock().unwrap_or_else(|p| p.into_inner()).recv_timeout(SIGNAL_CHECK)) {
            Ok(result) => return result.map_err(|e| to_pyerr(py, e)),
            Err(RecvTimeoutError::Timeout) => {
                if let Err(e) = py.check_signals() {
                    task.abort();
                    return Err(e);
                }
            }
            Err(RecvTimeoutError::Disconnected) => {
                return Err(transport_error(py, "the runtime dropped the operation (is the process exiting?)"))
            }
        }
    }
}
