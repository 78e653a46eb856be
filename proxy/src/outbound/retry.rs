//! What bounds policy retries: a budget per Service per worker over a sliding 10 s window
//! (retries ≤ percent of requests + floor per second × 10 s), and the exponential backoff with
//! full jitter between tries (25 ms base, 250 ms cap, as Envoy's).
//!
//! The budget lives in the worker's state for its target, under the lock a request takes anyway
//! to be balanced: a request adds one to a plain counter, and only a retry reads the window.
//! Per worker, so nothing crosses cores: with W workers the process allows W floors.

use std::time::{Duration, Instant};

use crate::outbound::policy::RetryPolicy;
use crate::outbound::routes::random;

/// The budget's window.
pub const WINDOW: Duration = Duration::from_secs(10);
/// The window in slots of one second each.
const SLOTS: usize = 10;
/// The first backoff's ceiling, doubled for each retry after it.
pub const BACKOFF_BASE: Duration = Duration::from_millis(25);
/// The highest backoff ceiling.
pub const BACKOFF_CAP: Duration = Duration::from_millis(250);

/// Requests and retries over the last [`WINDOW`], in one-second slots.
#[derive(Debug)]
pub struct Budget {
    epoch: Instant,
    /// The second (since `epoch`) the newest slot counts.
    second: u64,
    /// (requests, retries) per second, the slot of second `s` at `s % SLOTS`.
    slots: [(u32, u32); SLOTS],
}

impl Default for Budget {
    fn default() -> Self {
        Self::new(Instant::now())
    }
}

impl Budget {
    pub fn new(epoch: Instant) -> Self {
        Self {
            epoch,
            second: 0,
            slots: [(0, 0); SLOTS],
        }
    }

    /// The slot of `now`, after clearing those that fell out of the window.
    fn slot(&mut self, now: Instant) -> &mut (u32, u32) {
        let second = now.saturating_duration_since(self.epoch).as_secs();
        if second > self.second {
            let stale = (second - self.second).min(SLOTS as u64);
            for passed in 1..=stale {
                self.slots[((self.second + passed) % SLOTS as u64) as usize] = (0, 0);
            }
            self.second = second;
        }
        &mut self.slots[(self.second % SLOTS as u64) as usize]
    }

    /// One request started.
    pub fn deposit(&mut self, now: Instant) {
        let slot = self.slot(now);
        slot.0 = slot.0.saturating_add(1);
    }

    /// Whether one more retry fits the budget of `policy`; if so it is counted.
    pub fn withdraw(&mut self, now: Instant, policy: &RetryPolicy) -> bool {
        self.slot(now);
        let (requests, retries) = self.slots.iter().fold((0u64, 0u64), |(q, r), slot| {
            (q + u64::from(slot.0), r + u64::from(slot.1))
        });
        let allowed = requests * u64::from(policy.budget_percent) / 100
            + u64::from(policy.budget_floor_per_second) * WINDOW.as_secs();
        if retries >= allowed {
            return false;
        }
        let slot = self.slot(now);
        slot.1 = slot.1.saturating_add(1);
        true
    }
}

/// The wait before retry number `retry` (1 for the first): a uniform draw up to
/// `min(cap, base × 2^(retry-1))` ("full jitter").
pub fn backoff(retry: u32) -> Duration {
    let ceiling = BACKOFF_BASE
        .saturating_mul(1 << retry.saturating_sub(1).min(16))
        .min(BACKOFF_CAP);
    let nanos = ceiling.as_nanos() as u64;
    Duration::from_nanos(random() % nanos.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbound::policy::defaults;

    #[test]
    fn retries_stay_within_the_share_plus_the_floor() {
        let start = Instant::now();
        let mut budget = Budget::new(start);
        let policy = defaults().retry; // 20 %, 10/s
        for _ in 0..1000 {
            budget.deposit(start);
        }
        let allowed = (0..1000)
            .filter(|_| budget.withdraw(start, &policy))
            .count();
        assert_eq!(allowed, 200 + 100);
    }

    #[test]
    fn the_window_slides() {
        let start = Instant::now();
        let mut budget = Budget::new(start);
        let mut policy = defaults().retry;
        policy.budget_floor_per_second = 0;
        policy.budget_percent = 50;
        for _ in 0..100 {
            budget.deposit(start);
        }
        while budget.withdraw(start, &policy) {}
        // 5 s on: the same requests and retries are still in the window.
        let later = start + Duration::from_secs(5);
        assert!(!budget.withdraw(later, &policy));
        // 11 s on, fresh requests: the old retries have left the window.
        let after = start + Duration::from_secs(11);
        for _ in 0..10 {
            budget.deposit(after);
        }
        let allowed = (0..100).filter(|_| budget.withdraw(after, &policy)).count();
        assert_eq!(allowed, 5);
    }

    #[test]
    fn the_floor_lets_a_quiet_service_retry() {
        let start = Instant::now();
        let mut budget = Budget::new(start);
        let mut policy = defaults().retry;
        policy.budget_floor_per_second = 1;
        let allowed = (0..100).filter(|_| budget.withdraw(start, &policy)).count();
        assert_eq!(allowed, 10);
    }

    #[test]
    fn backoff_is_jittered_under_a_doubling_cap() {
        for retry in 1..=8 {
            let ceiling = (BACKOFF_BASE * (1 << (retry - 1))).min(BACKOFF_CAP);
            let draws: Vec<Duration> = (0..200).map(|_| backoff(retry)).collect();
            assert!(draws.iter().all(|d| *d < ceiling), "retry {retry}");
            let distinct: std::collections::HashSet<_> = draws.iter().collect();
            assert!(distinct.len() > 100, "retry {retry}: not jittered");
        }
    }
}
