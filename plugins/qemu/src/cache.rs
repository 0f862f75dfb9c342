//! The monitor channels one connection keeps open, one per domain.
//!
//! Keeping a channel saves a QMP handshake per call; keeping it forever would pin one of the
//! domain's few channels to an idle connection and let QEMU queue every event for a client
//! that never reads. A reaper thread (started with the first cached channel, ending with the
//! connection) therefore closes channels unused for [`IDLE_RELEASE`].

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard, Weak},
    thread,
    time::{Duration, Instant},
};

use crate::monitor::Monitor;

/// A cached channel unused this long is closed.
pub const IDLE_RELEASE: Duration = Duration::from_secs(5);
const REAPER_TICK: Duration = Duration::from_secs(1);

pub type Shared = Arc<Mutex<Monitor>>;

struct Entry {
    monitor: Shared,
    last_used: Instant,
}

#[derive(Default)]
struct Inner {
    entries: HashMap<String, Entry>,
    reaper_started: bool,
}

/// Cached channels by domain name.
#[derive(Default)]
pub struct MonitorCache {
    inner: Arc<Mutex<Inner>>,
}

fn lock(inner: &Mutex<Inner>) -> MutexGuard<'_, Inner> {
    // The map holds no invariant a panicking holder could break.
    inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl MonitorCache {
    /// The cached channel of `name`, marked as used now.
    pub fn get(&self, name: &str) -> Option<Shared> {
        let mut inner = lock(&self.inner);
        let entry = inner.entries.get_mut(name)?;
        entry.last_used = Instant::now();
        Some(Arc::clone(&entry.monitor))
    }

    /// Caches `monitor` unless another thread cached one for `name` first; returns the cached one.
    pub fn insert(&self, name: &str, monitor: Monitor) -> Shared {
        let mut inner = lock(&self.inner);
        if !inner.reaper_started {
            inner.reaper_started = spawn_reaper(Arc::downgrade(&self.inner));
        }
        let entry = inner
            .entries
            .entry(name.to_string())
            .or_insert_with(|| Entry { monitor: Arc::new(Mutex::new(monitor)), last_used: Instant::now() });
        entry.last_used = Instant::now();
        Arc::clone(&entry.monitor)
    }

    pub fn remove(&self, name: &str) -> Option<Shared> {
        lock(&self.inner).entries.remove(name).map(|e| e.monitor)
    }

    /// Removes the cached channel of `name` if it is `monitor` (not a newer one).
    pub fn remove_if(&self, name: &str, monitor: &Shared) {
        let mut inner = lock(&self.inner);
        if inner.entries.get(name).is_some_and(|e| Arc::ptr_eq(&e.monitor, monitor)) {
            inner.entries.remove(name);
        }
    }
}

/// Starts the thread closing idle channels; it ends once the cache is gone.
fn spawn_reaper(cache: Weak<Mutex<Inner>>) -> bool {
    thread::Builder::new()
        .name("capvirt-qemu-idle".into())
        .spawn(move || loop {
            thread::sleep(REAPER_TICK);
            let Some(inner) = cache.upgrade() else { return };
            let idle: Vec<Shared> = {
                let mut inner = lock(&inner);
                let now = Instant::now();
                let expired: Vec<String> = inner
                    .entries
                    .iter()
                    // Only channels no call is using right now.
                    .filter(|(_, e)| {
                        now.duration_since(e.last_used) >= IDLE_RELEASE && Arc::strong_count(&e.monitor) == 1
                    })
                    .map(|(name, _)| name.clone())
                    .collect();
                expired.iter().filter_map(|name| inner.entries.remove(name)).map(|e| e.monitor).collect()
            };
            // Closed outside the map's lock.
            drop(idle);
        })
        .is_ok()
}
