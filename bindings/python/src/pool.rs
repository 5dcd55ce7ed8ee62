//! The threads that run Python handlers.
//!
//! Each thread keeps its Python thread state for as long as it lives, taking
//! and releasing the GIL around each job. A thread Python has not seen before (one of tokio's
//! blocking pool) makes a thread state every time it takes the GIL and frees it when it lets
//! go: in CPython that is a frame stack mapped and unmapped, and a system call for the thread
//! id, on every call.
//!
//! The pool grows when every thread is busy, up to [`MAX_THREADS`] (so a handler that sleeps
//! or waits on I/O holds only its own thread), and a thread left idle for [`KEEP_ALIVE`]
//! exits.
//!
//! A thread keeps its state with `rt::keep_thread_state` and takes the GIL per job through
//! pyo3's `with_gil`, whose `PyGILState_Ensure` parks the thread if the interpreter is
//! finalizing (rather than unwinding it through Rust frames). Once the interpreter has begun
//! to exit ([`exiting`]), a thread that leaves does not give its state back: the process is
//! about to end, and a state released while Python tears its threads down is a fatal error.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use pyo3::prelude::*;
use tokio::sync::oneshot;

/// As many handlers as may run at once (tokio's blocking pool has the same bound).
pub const MAX_THREADS: usize = 512;
/// How long a thread with nothing to do waits for a job before it exits.
pub const KEEP_ALIVE: Duration = Duration::from_secs(10);

type Job = Box<dyn FnOnce(Python<'_>) + Send>;

static EXITING: AtomicBool = AtomicBool::new(false);

/// Whether the interpreter has begun to exit (its atexit handlers have run).
pub fn exiting() -> bool {
    EXITING.load(Ordering::Relaxed)
}

/// Has `exiting` turn true when the interpreter runs its atexit handlers, before it finalizes.
pub fn watch_exit(py: Python<'_>) -> PyResult<()> {
    let mark = pyo3::types::PyCFunction::new_closure(py, None, None, |_, _| EXITING.store(true, Ordering::Relaxed))?;
    py.import("atexit")?.call_method1("register", (mark,))?;
    Ok(())
}

/// Where an idle thread waits for the job it is handed.
#[derive(Default)]
struct Slot {
    job: Mutex<Option<Job>>,
    filled: Condvar,
}

#[derive(Default)]
struct State {
    /// Jobs no idle thread was there to take.
    jobs: VecDeque<Job>,
    /// Idle threads, the one that went idle last on top: it is handed the next job, so a
    /// quiet server keeps reusing one warm thread and the others time out.
    idle: Vec<Arc<Slot>>,
    threads: usize,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn state() -> &'static Mutex<State> {
    static STATE: OnceLock<Mutex<State>> = OnceLock::new();
    STATE.get_or_init(Mutex::default)
}

fn submit(job: Job) {
    let mut s = lock(state());
    if let Some(slot) = s.idle.pop() {
        drop(s);
        *lock(&slot.job) = Some(job);
        slot.filled.notify_one();
        return;
    }
    s.jobs.push_back(job);
    if s.threads < MAX_THREADS {
        if std::thread::Builder::new().name("trustwire-handler".into()).spawn(work).is_ok() {
            s.threads += 1;
        } else if s.threads == 0 {
            // No thread to run it, now or later: dropping it tells its waiter so.
            s.jobs.pop_back();
        }
    }
    // At the bound, or when no thread can be made, the job waits for a busy thread.
}

fn work() {
    let slot = Arc::new(Slot::default());
    crate::rt::keep_thread_state();
    while let Some(job) = next(&slot) {
        // pyo3 takes the GIL through PyGILState_Ensure, which reuses the kept thread state (and
        // parks the thread, rather than unwinding it, if the interpreter is finalizing).
        Python::with_gil(|py| {
            // A job that panics drops its result's sender, which its waiter sees; the thread
            // stays in the pool.
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(py)));
        });
    }
}

/// The next job, or None when none came for KEEP_ALIVE (the thread then leaves the pool).
fn next(slot: &Arc<Slot>) -> Option<Job> {
    {
        let mut s = lock(state());
        if let Some(job) = s.jobs.pop_front() {
            return Some(job);
        }
        s.idle.push(slot.clone());
    }
    let mut job = lock(&slot.job);
    loop {
        if let Some(job) = job.take() {
            return Some(job);
        }
        let (guard, wait) = slot.filled.wait_timeout(job, KEEP_ALIVE).unwrap_or_else(|p| p.into_inner());
        job = guard;
        if wait.timed_out() && job.is_none() {
            drop(job);
            let mut s = lock(state());
            if let Some(at) = s.idle.iter().position(|idle| Arc::ptr_eq(idle, slot)) {
                s.idle.remove(at);
                s.threads -= 1;
                return None;
            }
            // Taken off the idle list by a submitter that is handing over a job right now.
            drop(s);
            job = lock(&slot.job);
        }
    }
}

/// Runs `f` with the GIL on a handler thread and waits for its result; None if it gave none
/// (`f` panicked, or no thread could be made).
pub async fn run<T, F>(f: F) -> Option<T>
where
    T: Send + 'static,
    F: FnOnce(Python<'_>) -> T + Send + 'static,
{
    let (tx, rx) = oneshot::channel();
    submit(Box::new(move |py| {
        let _ = tx.send(f(py));
    }));
    rx.await.ok()
}

/// Runs `each` with the GIL for everything that arrives on `rx`, on the calling thread (one of
/// trustwire's own, made for this), until every sender is gone. The thread keeps its Python
/// thread state; what is already waiting when it takes the GIL is handled in the same turn, up
/// to 1024 items, so a busy interpreter is asked for the GIL once per batch.
pub fn serve<T: Send>(rx: std::sync::mpsc::Receiver<T>, mut each: impl FnMut(Python<'_>, T)) {
    crate::rt::keep_thread_state();
    while let Ok(first) = rx.recv() {
        Python::with_gil(|py| {
            each(py, first);
            for next in rx.try_iter().take(1024) {
                each(py, next);
            }
        });
    }
}
