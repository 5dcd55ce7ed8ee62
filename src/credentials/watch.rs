//! Reload triggers: directory watches (notify), a polling fallback and a timer. They all feed
//! one task that waits for the writes to settle and then performs one validated load, so a
//! burst of events (a `..data` symlink swap touches several entries) becomes a single load.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::Notify;

use super::CredentialStore;
use crate::error::Error;

/// Starts the triggers of `store`. They stop by themselves once the store is dropped.
pub(super) fn start(store: &CredentialStore) -> Result<(), Error> {
    let options = store.options().clone();
    let changed = Arc::new(Notify::new());
    let watcher = if options.watch {
        // Watch directories, not files: an atomic rename or a symlink swap replaces the file,
        // and a watch on the old inode would never fire again.
        let dirs: BTreeSet<PathBuf> = store
            .sources()
            .paths()
            .into_iter()
            .filter_map(|p| if p.is_dir() { Some(p) } else { p.parent().map(|d| d.to_path_buf()) })
            .map(|d| if d.as_os_str().is_empty() { PathBuf::from(".") } else { d })
            .collect();
        let tx = changed.clone();
        let mut w = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            if let Ok(ev) = res {
                if !matches!(ev.kind, notify::EventKind::Access(_)) {
                    tx.notify_one();
                }
            }
        })
        .map_err(|e| Error::config(format!("cannot watch credential files: {e}")))?;
        for d in &dirs {
            if let Err(e) = w.watch(d, RecursiveMode::NonRecursive) {
                tracing::warn!(dir = %d.display(), "cannot watch ({e}); relying on polling");
            }
        }
        Some(w)
    } else {
        None
    };
    let weak = store.downgrade();
    let handle = tokio::runtime::Handle::try_current().unwrap_or_else(|_| crate::runtime::runtime().handle().clone());
    handle.spawn(async move {
        let _watcher = watcher;
        let tick = |d: Option<Duration>| {
            let mut i = tokio::time::interval(d.unwrap_or(Duration::from_secs(3600)));
            i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            i
        };
        let mut poll = tick(options.poll_interval);
        let mut timer = tick(options.reload_interval);
        // The first tick of an interval fires at once.
        poll.tick().await;
        timer.tick().await;
        loop {
            let after_change = tokio::select! {
                _ = changed.notified() => true,
                _ = poll.tick(), if options.poll_interval.is_some() => false,
                _ = timer.tick(), if options.reload_interval.is_some() => false,
                // Stop promptly once the store is gone even when no trigger is configured to fire.
                _ = tokio::time::sleep(Duration::from_secs(5)) => {
                    if weak.strong_count() == 0 { return; }
                    continue;
                }
            };
            if after_change {
                tokio::time::sleep(options.settle).await;
            }
            let Some(store) = CredentialStore::upgrade(&weak) else { return };
            // After a change, a failure may be a write still in progress (a half-written
            // file): settle and retry quietly; only the last attempt's failure is reported.
            let mut attempts_left = if after_change { options.retries } else { 0 };
            while store.load_now(false, attempts_left == 0).is_err() && attempts_left > 0 {
                attempts_left -= 1;
                tokio::time::sleep(options.settle).await;
            }
            store.check_expiry();
        }
    });
    Ok(())
}
