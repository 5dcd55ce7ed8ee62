//! Waiting on the shared tokio runtime from Python without holding the GIL.

use std::future::Future;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::Duration;

use pyo3::prelude::*;
use trustwire::runtime::runtime;
use trustwire::Error;

use crate::errors::{base_error, to_pyerr, transport_error};

/// How often a blocked call wakes up to let Python handle signals (Ctrl-C).
const SIGNAL_CHECK: Duration = Duration::from_millis(100);

/// The shared runtime, refusing use in a forked child: its worker threads exist only in the
/// parent, so anything waiting on them in the child would hang forever. (A fork handler says
/// so, rather than comparing process ids on every call: getpid is a system call.)
pub fn checked_runtime(py: Python<'_>) -> PyResult<&'static tokio::runtime::Runtime> {
    trustwire::runtime::watch_forks();
    if forked() {
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
        // A hook calling out from one of the runtime's threads, where the runtime cannot be
        // entered again: run the operation as a task and wait for it.
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

/// Whether this process is a child forked after trustwire was first used.
pub fn forked() -> bool {
    trustwire::runtime::forked()
}

/// A Python thread state made for a thread Python did not start, kept for the thread's
/// lifetime and freed when it exits.
struct Kept(std::cell::Cell<bool>);

impl Drop for Kept {
    fn drop(&mut self) {
        if !self.0.get() || forked() || crate::pool::exiting() {
            return;
        }
        // SAFETY: this thread made its state with PyGILState_Ensure and let go of the GIL with
        // PyEval_SaveThread (in `keep_thread_state`), and holds no GIL now. Taking it once more and
        // releasing twice brings the state's count back to zero, which deletes it. pyo3's
        // PyGILState_Ensure parks the thread instead of unwinding if the interpreter is
        // already finalizing.
        unsafe {
            if pyo3::ffi::Py_IsInitialized() == 0 {
                return;
            }
            pyo3::ffi::PyGILState_Ensure();
            pyo3::ffi::PyGILState_Release(pyo3::ffi::PyGILState_STATE::PyGILState_LOCKED);
            pyo3::ffi::PyGILState_Release(pyo3::ffi::PyGILState_STATE::PyGILState_UNLOCKED);
        }
    }
}

thread_local! {
    static KEPT: Kept = const { Kept(std::cell::Cell::new(false)) };
}

/// Gives a thread Python did not start a Python thread state that it keeps for its lifetime
/// (freed when the thread exits), where `with_gil` alone would make one and free it on every
/// call (in CPython: a frame stack mapped and unmapped, a system call for the thread id). A
/// thread Python already knows is left as it is.
pub fn keep_thread_state() {
    let _ = KEPT.try_with(|kept| {
        // SAFETY: only while the interpreter runs and is not exiting, and only on a thread with
        // no Python thread state, which therefore does not hold the GIL: PyGILState_Ensure
        // makes the state and takes the GIL, PyEval_SaveThread releases the GIL and leaves the
        // state's count at one, so later Ensure/Release pairs (pyo3's with_gil) reuse it.
        unsafe {
            if kept.0.get()
                || forked()
                || crate::pool::exiting()
                || pyo3::ffi::Py_IsInitialized() == 0
                || !pyo3::ffi::PyGILState_GetThisThreadState().is_null()
            {
                return;
            }
            pyo3::ffi::PyGILState_Ensure();
            pyo3::ffi::PyEval_SaveThread();
        }
        kept.0.set(true);
    });
}

/// `Python::with_gil` for code that runs on the runtime's own threads (hooks), keeping the
/// thread's Python thread state between calls ([`keep_thread_state`]).
pub fn with_gil_kept<R>(f: impl for<'py> FnOnce(Python<'py>) -> R) -> R {
    keep_thread_state();
    Python::with_gil(f)
}
