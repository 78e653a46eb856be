//! The inbound rate limit (`--inbound-rate-limit`): token buckets, each holding one second's
//! worth, over the pod's inbound HTTP requests, in all and optionally per client IP address.
//! Made only with the flag: without it, nothing here exists and no request pays for it.

use std::fmt;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use governor::clock::Clock;
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, NotUntil, Quota};
use prometheus_client::metrics::counter::Counter;
use remora_init::rate_limit::InboundRateLimit;

/// The most client addresses whose buckets are kept. Past it (more clients than this within
/// about a second), every client's bucket starts full again; the total still holds.
const MAX_CLIENTS: usize = 16_384;

/// Every this many requests, the clients whose buckets are full again are forgotten: a full
/// bucket is what a new client gets anyway. So the map holds at most this many more than
/// [`MAX_CLIENTS`].
const PRUNE_EVERY: u32 = 1024;

/// The pod's inbound limit, shared by every worker.
pub struct RateLimit {
    setting: InboundRateLimit,
    total: DefaultDirectRateLimiter,
    per_client: Option<PerClient>,
    /// `remora_proxy_rate_limited_total`.
    limited: Counter,
}

/// A bucket per client address, pruned as it grows.
struct PerClient {
    quota: Quota,
    /// Swapped for an empty one when more than [`MAX_CLIENTS`] are recent at once.
    buckets: ArcSwap<DefaultKeyedRateLimiter<IpAddr>>,
    checks: AtomicU32,
}

/// One inbound connection's hold on the limit: the limit and its client's address.
#[derive(Debug, Clone, Copy)]
pub struct ClientLimit {
    limit: &'static RateLimit,
    client: IpAddr,
}

impl ClientLimit {
    pub fn new(limit: &'static RateLimit, client: IpAddr) -> Self {
        Self { limit, client }
    }

    /// Takes a token for one request of this connection (see [`RateLimit::check`]).
    pub fn check(&self) -> Result<(), Limited> {
        self.limit.check(self.client)
    }
}

/// A request over the limit, and how long its client should wait before the next one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limited {
    /// Whole seconds, at least 1: what `Retry-After` says.
    pub retry_after_secs: u64,
}

impl RateLimit {
    pub fn new(setting: InboundRateLimit, limited: Counter) -> Self {
        let per_client = setting.per_client.map(|rate| {
            let quota = Quota::per_second(rate);
            PerClient {
                quota,
                buckets: ArcSwap::from_pointee(DefaultKeyedRateLimiter::hashmap(quota)),
                checks: AtomicU32::new(0),
            }
        });
        Self {
            setting,
            total: DefaultDirectRateLimiter::direct(Quota::per_second(setting.total)),
            per_client,
            limited,
        }
    }

    /// Whether requests are held per client too (their address is then needed).
    pub fn per_client(&self) -> bool {
        self.per_client.is_some()
    }

    /// Takes a token for one request of `client`, or says how long to wait. A client over its
    /// own share is refused before it takes from the total, so that it cannot use up the others'.
    pub fn check(&self, client: IpAddr) -> Result<(), Limited> {
        if let Some(per_client) = &self.per_client {
            let buckets = per_client.buckets.load();
            let result = buckets.check_key(&client);
            per_client.prune(&buckets);
            if let Err(not_until) = result {
                return Err(self.refuse(&not_until, buckets.clock()));
            }
        }
        self.total
            .check()
            .map_err(|not_until| self.refuse(&not_until, self.total.clock()))
    }

    fn refuse<C: Clock>(&self, not_until: &NotUntil<C::Instant>, clock: &C) -> Limited {
        self.limited.inc();
        let wait = not_until.wait_time_from(clock.now());
        Limited {
            retry_after_secs: retry_after_secs(wait),
        }
    }
}

impl PerClient {
    /// Forgets the clients whose buckets are full again, every [`PRUNE_EVERY`] requests; when
    /// more than [`MAX_CLIENTS`] are recent still, forgets them all.
    fn prune(&self, buckets: &DefaultKeyedRateLimiter<IpAddr>) {
        if self.checks.fetch_add(1, Ordering::Relaxed) % PRUNE_EVERY != PRUNE_EVERY - 1 {
            return;
        }
        let before = buckets.len();
        buckets.retain_recent();
        let after = buckets.len();
        if after > MAX_CLIENTS {
            self.buckets
                .store(Arc::new(DefaultKeyedRateLimiter::hashmap(self.quota)));
        } else if after.saturating_mul(4) < before {
            buckets.shrink_to_fit();
        }
    }

    #[cfg(test)]
    fn clients(&self) -> usize {
        self.buckets.load().len()
    }
}

/// `Retry-After` in whole seconds: rounded up, and at least 1 (0 would invite a retry at once).
fn retry_after_secs(wait: Duration) -> u64 {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    secs.max(1)
}

impl fmt::Debug for RateLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimit")
            .field("setting", &self.setting.to_string())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn limit(text: &str) -> (RateLimit, Counter) {
        let counter = Counter::default();
        (
            RateLimit::new(text.parse().unwrap(), counter.clone()),
            counter,
        )
    }

    fn client(n: u32) -> IpAddr {
        IpAddr::V4(Ipv4Addr::from(0xc612_0000 + n))
    }

    #[test]
    fn a_burst_of_one_seconds_worth_then_refused_with_retry_after() {
        let (limit, counter) = limit("50/s");
        // A test slower than 20 ms per request would earn tokens back as it goes: count, not
        // assume.
        let allowed = (0..200).filter(|_| limit.check(client(1)).is_ok()).count();
        assert!((50..60).contains(&allowed), "{allowed} allowed");
        assert_eq!(counter.get(), 200 - allowed as u64);
        assert_eq!(
            limit.check(client(1)),
            Err(Limited {
                retry_after_secs: 1
            })
        );
    }

    #[test]
    fn each_client_is_held_to_its_share_and_cannot_use_up_the_others() {
        let (limit, _) = limit("100/s,10/s per-client");
        let greedy = (0..100).filter(|_| limit.check(client(1)).is_ok()).count();
        assert!((10..15).contains(&greedy), "{greedy}");
        // The greedy client's refusals took nothing from the total: others get their share.
        for other in 2..=8 {
            let allowed = (0..10)
                .filter(|_| limit.check(client(other)).is_ok())
                .count();
            assert_eq!(allowed, 10, "client {other}");
        }
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds_at_least_one() {
        for (wait, secs) in [
            (Duration::ZERO, 1),
            (Duration::from_millis(10), 1),
            (Duration::from_secs(1), 1),
            (Duration::from_millis(1001), 2),
            (Duration::from_secs(3), 3),
        ] {
            assert_eq!(retry_after_secs(wait), secs, "{wait:?}");
        }
    }

    #[test]
    fn the_client_map_stays_bounded() {
        let (limit, _) = limit("1000000/s,1/s per-client");
        let per_client = limit.per_client.as_ref().unwrap();
        // Each address spends its one token, so none is full again within the test: pruning
        // cannot forget them, and the map is emptied instead.
        let many = MAX_CLIENTS as u32 + 2 * PRUNE_EVERY;
        let mut most = 0;
        for n in 0..many {
            let _ = limit.check(client(n));
            most = most.max(per_client.clients());
        }
        assert!(
            most <= MAX_CLIENTS + PRUNE_EVERY as usize,
            "{most} clients held"
        );
        assert!(per_client.clients() < MAX_CLIENTS, "not emptied");
    }
}
