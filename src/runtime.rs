//! The one tokio runtime a process shares: the CLI, the C ABI and the Python module all run
//! their clients and servers on it, so a process never ends up with competing thread pools.

use std::sync::OnceLock;

use tokio::runtime::Runtime;

static RUNTIME: OnceLock<Runtime> = OnceLock::new();

/// The shared multi-threaded runtime, created on first use.
pub fn runtime() -> &'static Runtime {
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .thread_name("trustwire-rt")
            .enable_all()
            .build()
            .expect("cannot start the tokio runtime (out of threads or file descriptors?)")
    })
}

static WATCHING_FORKS: OnceLock<()> = OnceLock::new();
/// Set in a child forked after [`watch_forks`] was first called.
static FORKED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn forked_child() {
    FORKED.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// Starts noting forks (`pthread_atfork`), once per process: from then on [`forked`] says
/// whether this process is a child forked since. Anything that must not touch the parent's
/// sockets or threads from a child asks it.
pub fn watch_forks() {
    WATCHING_FORKS.get_or_init(|| {
        // SAFETY: registers a handler that only stores to an atomic, which is
        // async-signal-safe as a fork handler in the child must be.
        unsafe { libc::pthread_atfork(None, None, Some(forked_child)) };
    });
}

/// Whether this process was forked after [`watch_forks`] was first called.
pub fn forked() -> bool {
    FORKED.load(std::sync::atomic::Ordering::Relaxed)
}
