//! Graceful shutdown: a signal every listener and connection watches, and a count of the
//! connections still open so the process can exit as soon as the last one finishes.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

#[derive(Debug)]
pub struct Drain {
    signal: watch::Sender<bool>,
    active: Arc<AtomicUsize>,
}

/// Held by every connection and tunnel: while any exists, the drain waits.
#[derive(Debug)]
pub struct Guard(Arc<AtomicUsize>);

impl Drop for Guard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A connection's view of the drain signal.
#[derive(Debug, Clone)]
pub struct Watch(watch::Receiver<bool>);

impl Watch {
    /// Resolves once draining has started (at once if it already has).
    pub async fn signaled(&mut self) {
        // An error means the sender is gone, i.e. the process is exiting: also a drain.
        let _ = self.0.wait_for(|draining| *draining).await;
    }
}

impl Default for Drain {
    fn default() -> Self {
        Self {
            signal: watch::channel(false).0,
            active: Arc::new(AtomicUsize::new(0)),
        }
    }
}

impl Drain {
    pub fn guard(&self) -> Guard {
        self.active.fetch_add(1, Ordering::AcqRel);
        Guard(self.active.clone())
    }

    pub fn watch(&self) -> Watch {
        Watch(self.signal.subscribe())
    }

    pub fn start(&self) {
        self.signal.send_replace(true);
    }

    pub fn is_draining(&self) -> bool {
        *self.signal.borrow()
    }

    pub fn active(&self) -> usize {
        self.active.load(Ordering::Acquire)
    }

    /// Waits until no connection is left or `limit` has passed; true when none is left.
    /// Polling every 20 ms keeps the data path free of any wake-up bookkeeping, and shutdown
    /// happens once.
    pub async fn wait_idle(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while self.active() > 0 {
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_drain_waits_for_guards_and_gives_up_at_the_limit() {
        let drain = Drain::default();
        let mut watch = drain.watch();
        let guard = drain.guard();
        assert!(!drain.is_draining());
        drain.start();
        watch.signaled().await;
        assert!(!drain.wait_idle(Duration::from_millis(50)).await);
        drop(guard);
        assert!(drain.wait_idle(Duration::from_millis(50)).await);
    }
}
