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
