//! What bounds policy retries: a budget per Service per worker over a sliding 10 s window
//! (retries ≤ percent of requests + floor per second × 10 s), and the exponential backoff with
//! full jitter between tries (25 ms base, 250 ms cap, as Envoy's).
//!
//! The budget lives in the worker's state for its target, under the lock a request takes anyway
//! to be balanced: a request adds one to a plain counter, and only a retry reads the window.
//! Per worker, so nothing crosses cores: each worker's share of requests is its own, and each
//! holds a W-th of the floor (rounded up), so W workers together allow the floor the policy
//! names, not W of them.

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

    /// Whether one more retry fits the budget of `policy`, this worker being one of `workers`
    /// that share its floor; if so it is counted.
    pub fn withdraw(&mut self, now: Instant, policy: &RetryPolicy, workers: usize) -> bool {
        self.slot(now);
        let (requests, retries) = self.slots.iter().fold((0u64, 0u64), |(q, r), slot| {
            (q + u64::from(slot.0), r + u64::from(slot.1))
        });
        let floor = (u64::from(policy.budget_floor_per_second) * WINDOW.as_secs())
            .div_ceil(workers.max(1) as u64);
        let allowed = requests * u64::from(policy.budget_percent) / 100 + floor;
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
            .filter(|_| budget.withdraw(start, &policy, 1))
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
        while budget.withdraw(start, &policy, 1) {}
        // 5 s on: the same requests and retries are still in the window.
        let later = start + Duration::from_secs(5);
        assert!(!budget.withdraw(later, &policy, 1));
        // 11 s on, fresh requests: the old retries have left the window.
        let after = start + Duration::from_secs(11);
        for _ in 0..10 {
            budget.deposit(after);
        }
        let allowed = (0..100)
            .filter(|_| budget.withdraw(after, &policy, 1))
            .count();
        assert_eq!(allowed, 5);
    }

    #[test]
    fn the_floor_lets_a_quiet_service_retry() {
        let start = Instant::now();
        let mut budget = Budget::new(start);
        let mut policy = defaults().retry;
        policy.budget_floor_per_second = 1;
        let allowed = (0..100)
            .filter(|_| budget.withdraw(start, &policy, 1))
            .count();
        assert_eq!(allowed, 10);
    }

    #[test]
    fn workers_share_the_floor_and_keep_their_own_share_of_requests() {
        let start = Instant::now();
        let allowed = |floor: u32, requests: usize, workers: usize| {
            let mut policy = defaults().retry; // 20 %
            policy.budget_floor_per_second = floor;
            let mut budget = Budget::new(start);
            for _ in 0..requests {
                budget.deposit(start);
            }
            (0..1000)
                .filter(|_| budget.withdraw(start, &policy, workers))
                .count()
        };
        // A floor of 10/s is 100 retries a window.
        assert_eq!(allowed(10, 0, 1), 100);
        assert_eq!(
            allowed(10, 0, 2),
            50,
            "two workers hold the floor between them"
        );
        assert_eq!(
            allowed(10, 0, 3),
            34,
            "rounded up: never less than the floor in all"
        );
        assert_eq!(allowed(10, 500, 2), 100 + 50);
        assert_eq!(allowed(0, 500, 4), 100);
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
