//! Per-request load balancing over one Service port's ready endpoints: the power of two choices
//! over peak-EWMA latency × outstanding requests (Linkerd's defaults: 30 ms for an endpoint not
//! yet measured, 10 s decay), per worker thread, so no state crosses cores.
//!
//! **How an idle endpoint's estimate ages.** Two random endpoints are compared and the cheaper
//! one takes the request. Under a strictly sequential client nothing is ever outstanding, so the
//! cost is the latency estimate alone, and the endpoint with the highest estimate loses every
//! comparison it is drawn into: it never gets a new sample, and its estimate, made perhaps of one
//! slow first request, keeps it out for ever (linkerd2#14086). Here an endpoint with nothing
//! outstanding has its estimate halved for every [`AGE_PICKS`] × (endpoints) picks that passed it
//! by; the halving is kept when the endpoint is next drawn, so one good sample then brings it
//! back. Counting picks rather than seconds makes the ageing independent of how fast the
//! endpoints are: among equally fast endpoints, one with an unlucky estimate is back within a few
//! dozen requests, and an endpoint 50× slower than the rest is still probed only about once per
//! `AGE_PICKS × n × log2(50)` requests (about 34 with three endpoints).
//!
//! **And a busy one.** Under concurrent load the same peak holds an endpoint back for the whole
//! decay: one answer slowed by a scheduling hiccup made an endpoint look ten times slower for
//! seconds, and equally fast endpoints then shared the load 43/11/46 % instead of evenly. So an
//! endpoint with requests outstanding ages the same way, but never below its latest answer's
//! latency: a peak that its later answers no longer show fades within a few dozen picks, while an
//! endpoint that is really slow stays as slow as it answers. An endpoint that stops answering is
//! held to its last answer and its outstanding requests count against it, so it is given only a
//! few more requests than the others hold, as under least-requests balancing.
//!
//! A failed connect counts as a [`FAILURE_PENALTY`] sample, so a dead endpoint drops out of the
//! choice at once and is probed again only as the ageing brings it back.
//!
//! **Failure accrual** (SPEC `remora.io/failure-accrual`): an endpoint whose answers are gateway
//! errors (502, 503, 504) or whose connects fail that many times in a row is ejected: no request
//! is balanced to it until its backoff (1 s doubling to 60 s, jittered) has passed; then the
//! first request goes to it as a probe, whose success brings it back and whose failure ejects it
//! again for longer. Never more than the policy's share of the endpoints is ejected at once
//! (rounded down, so one endpoint alone never is). While none is ejected a pick reads one
//! counter more than without accrual.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;

use crate::outbound::routes::random;

/// The latency assumed for an endpoint that has not answered yet.
pub const DEFAULT_RTT: Duration = Duration::from_millis(30);
/// How fast older samples lose weight against newer ones.
pub const DECAY: Duration = Duration::from_secs(10);
/// An idle endpoint's estimate halves every `AGE_PICKS` × (number of endpoints) picks without it:
/// with 2, a fivefold estimate (a cold first request) catches up within about 5 n picks.
pub const AGE_PICKS: u64 = 2;
/// `updated_ns` of an endpoint not measured yet.
const UNMEASURED: u64 = u64::MAX;

/// The sample a failed connect counts as.
pub const FAILURE_PENALTY: Duration = Duration::from_secs(1);
/// An ejected endpoint's first backoff, doubled for each ejection in a row up to the cap.
pub const EJECTION_BACKOFF: (Duration, Duration) =
    (Duration::from_secs(1), Duration::from_secs(60));

/// A balancer's failure accrual, shared with its endpoints so that a request's outcome can
/// eject one. Atomics only so that a [`Pick`] can be sent with a request's future.
#[derive(Debug)]
struct Accrual {
    /// Gateway errors or connect failures in a row that eject an endpoint; 0 = off.
    consecutive: AtomicU32,
    /// The most endpoints ejected at once, in percent.
    max_percent: AtomicU32,
    /// Endpoints in the balancer now, and those of them ejected.
    endpoints: AtomicU32,
    ejected: AtomicU32,
    /// `endpoint_ejections_total` of the balancer's Service.
    counter: OnceLock<Counter>,
}

impl Default for Accrual {
    fn default() -> Self {
        Self {
            consecutive: AtomicU32::new(0),
            max_percent: AtomicU32::new(0),
            endpoints: AtomicU32::new(0),
            ejected: AtomicU32::new(0),
            counter: OnceLock::new(),
        }
    }
}

/// The backoff of an endpoint's ejection number `ejections` (0 for the first) in a row: the
/// doubling ceiling, less up to half of it at random.
fn ejection_backoff(ejections: u32) -> Duration {
    let ceiling = EJECTION_BACKOFF
        .0
        .saturating_mul(1 << ejections.min(16))
        .min(EJECTION_BACKOFF.1);
    let half = ceiling.as_nanos() as u64 / 2;
    ceiling - Duration::from_nanos(random() % half.max(1))
}

/// One endpoint and what the worker knows of its load. Atomics only so that a [`Pick`] can be
/// sent with a request's future; one worker thread reads and writes them (relaxed).
#[derive(Debug)]
pub struct Endpoint {
    pub addr: SocketAddr,
    /// The identity it must present, for a meshed pod (see [`crate::client::Endpoint`]).
    pub identity: Option<Arc<str>>,
    /// Peak-EWMA latency, in nanoseconds (an f64's bits).
    rtt_ns: AtomicU64,
    /// When `rtt_ns` was last updated, in nanoseconds since the balancer's epoch; [`UNMEASURED`]
    /// before the first answer.
    updated_ns: AtomicU64,
    /// Requests (or connections) sent and not yet answered (closed).
    pending: AtomicU32,
    /// The latest answer's latency, in nanoseconds (an f64's bits): how far a busy endpoint's
    /// estimate may age.
    last_ns: AtomicU64,
    /// The balancer's picks up to which this endpoint's estimate has been aged: the last one
    /// that chose it, or the one before it was last drawn.
    aged_through: AtomicU64,
    /// Gateway errors or connect failures in a row.
    failures: AtomicU32,
    /// While ejected, when (nanoseconds since the balancer's epoch) its probe may go; else 0.
    ejected_until_ns: AtomicU64,
    /// Ejections in a row (the backoff's exponent); 0 once a probe succeeded.
    ejections: AtomicU32,
    /// A probe request is on its way to it.
    probing: AtomicBool,
    accrual: Arc<Accrual>,
}

impl Endpoint {
    fn new(endpoint: crate::client::Endpoint, picks: u64, accrual: Arc<Accrual>) -> Self {
        Self {
            addr: endpoint.addr,
            identity: endpoint.identity,
            rtt_ns: AtomicU64::new((DEFAULT_RTT.as_nanos() as f64).to_bits()),
            updated_ns: AtomicU64::new(UNMEASURED),
            pending: AtomicU32::new(0),
            last_ns: AtomicU64::new(0f64.to_bits()),
            aged_through: AtomicU64::new(picks),
            failures: AtomicU32::new(0),
            ejected_until_ns: AtomicU64::new(0),
            ejections: AtomicU32::new(0),
            probing: AtomicBool::new(false),
            accrual,
        }
    }

    /// Whether it is ejected now (its probe included).
    pub fn is_ejected(&self) -> bool {
        self.ejected_until_ns.load(Relaxed) != 0
    }

    /// A request it took was answered without a gateway error: the failures in a row end, and
    /// a probe's success brings it back.
    fn succeeded(&self) {
        if self.failures.load(Relaxed) != 0 {
            self.failures.store(0, Relaxed);
        }
        if self.probing.swap(false, Relaxed) {
            self.ejected_until_ns.store(0, Relaxed);
            self.ejections.store(0, Relaxed);
            self.accrual.ejected.fetch_sub(1, Relaxed);
        }
    }

    /// A gateway error or a failed connect at `now_ns`: ejects it after enough in a row (while
    /// the share allows), or again, for longer, when it was its probe.
    fn failed(&self, now_ns: u64) {
        let accrual = &self.accrual;
        if self.probing.swap(false, Relaxed) {
            self.eject(now_ns);
            return;
        }
        let consecutive = accrual.consecutive.load(Relaxed);
        let failures = self.failures.fetch_add(1, Relaxed) + 1;
        if consecutive == 0 || failures < consecutive || self.is_ejected() {
            return;
        }
        let endpoints = accrual.endpoints.load(Relaxed);
        let allowed = endpoints * accrual.max_percent.load(Relaxed) / 100;
        if endpoints < 2 || accrual.ejected.load(Relaxed) >= allowed {
            return;
        }
        accrual.ejected.fetch_add(1, Relaxed);
        self.eject(now_ns);
    }

    fn eject(&self, now_ns: u64) {
        let ejections = self.ejections.fetch_add(1, Relaxed);
        let until = now_ns + ejection_backoff(ejections).as_nanos() as u64;
        self.ejected_until_ns.store(until.max(1), Relaxed);
        self.failures.store(0, Relaxed);
        if let Some(counter) = self.accrual.counter.get() {
            counter.inc();
        }
    }

    fn rtt(&self) -> f64 {
        f64::from_bits(self.rtt_ns.load(Relaxed))
    }

    /// Requests outstanding (HTTP) or connections open (opaque TCP).
    pub fn pending(&self) -> u32 {
        self.pending.load(Relaxed)
    }

    /// The estimate at pick number `picks`, aged for the earlier picks that passed it by, and
    /// stored: see the module doc.
    fn aged_rtt(&self, picks: u64, endpoints: usize) -> f64 {
        let rtt = self.rtt();
        let before = picks - 1;
        let skipped = before.saturating_sub(self.aged_through.swap(before, Relaxed));
        if skipped == 0 {
            return rtt;
        }
        let period = (AGE_PICKS * endpoints as u64).max(1) as f64;
        let mut aged = rtt * (-(skipped as f64) / period).exp2();
        if self.pending() > 0 {
            aged = aged
                .max(f64::from_bits(self.last_ns.load(Relaxed)))
                .min(rtt);
        }
        self.rtt_ns.store(aged.to_bits(), Relaxed);
        aged
    }

    /// Folds one latency sample into the estimate: a higher sample replaces it at once (peak),
    /// a lower one is averaged in by how long it has been since the last ([`DECAY`]). The first
    /// sample replaces [`DEFAULT_RTT`] outright: that is a guess, not a measurement to average
    /// with (averaged, it would linger for most of [`DECAY`]).
    fn observe(&self, sample: Duration, now_ns: u64) {
        let sample = sample.as_nanos() as f64;
        self.last_ns.store(sample.to_bits(), Relaxed);
        let rtt = self.rtt();
        let next = if sample >= rtt || self.updated_ns.load(Relaxed) == UNMEASURED {
            sample
        } else {
            let elapsed = now_ns.saturating_sub(self.updated_ns.load(Relaxed)) as f64;
            let weight = (-elapsed / DECAY.as_nanos() as f64).exp();
            rtt * weight + sample * (1.0 - weight)
        };
        self.rtt_ns.store(next.to_bits(), Relaxed);
        self.updated_ns.store(now_ns, Relaxed);
    }
}

/// One worker's balancer for one Service port.
#[derive(Debug)]
pub struct Balancer {
    endpoints: Vec<Arc<Endpoint>>,
    picks: u64,
    rng: u64,
    epoch: Instant,
    accrual: Arc<Accrual>,
}

impl Default for Balancer {
    fn default() -> Self {
        Self::new()
    }
}

impl Balancer {
    pub fn new() -> Self {
        // Seeded per balancer so that workers and targets don't draw in step.
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        Self::with_seed(seed)
    }

    pub fn with_seed(seed: u64) -> Self {
        Self {
            endpoints: Vec::new(),
            picks: 0,
            rng: seed | 1,
            epoch: Instant::now(),
            accrual: Arc::default(),
        }
    }

    /// Failure accrual as the Service's policy says: `consecutive` failures in a row eject
    /// (0 = off), at most `max_percent` of the endpoints at once; ejections are counted in
    /// `counter` (the first one given stays).
    pub fn set_accrual(&mut self, consecutive: u32, max_percent: u32, counter: &Counter) {
        self.accrual.consecutive.store(consecutive, Relaxed);
        self.accrual.max_percent.store(max_percent, Relaxed);
        let _ = self.accrual.counter.set(counter.clone());
    }

    /// Endpoints ejected now.
    pub fn ejected(&self) -> u32 {
        self.accrual.ejected.load(Relaxed)
    }

    /// The endpoints now ready, in any order. An endpoint that stays keeps what was learned of
    /// it (and its requests in flight finish where they are); a new one starts at [`DEFAULT_RTT`].
    /// An endpoint whose identity changed is a new one.
    pub fn update<E: Into<crate::client::Endpoint>>(
        &mut self,
        endpoints: impl IntoIterator<Item = E>,
    ) {
        let mut next: Vec<Arc<Endpoint>> = endpoints
            .into_iter()
            .map(|endpoint| {
                let endpoint = endpoint.into();
                self.endpoints
                    .iter()
                    .find(|e| e.addr == endpoint.addr && e.identity == endpoint.identity)
                    .cloned()
                    .unwrap_or_else(|| {
                        Arc::new(Endpoint::new(
                            endpoint,
                            self.picks,
                            Arc::clone(&self.accrual),
                        ))
                    })
            })
            .collect();
        next.sort_by_key(|e| e.addr);
        next.dedup_by_key(|e| e.addr);
        self.endpoints = next;
        // A removed endpoint that was ejected no longer counts against the share.
        let ejected = self.endpoints.iter().filter(|e| e.is_ejected()).count();
        self.accrual
            .endpoints
            .store(self.endpoints.len() as u32, Relaxed);
        self.accrual.ejected.store(ejected as u32, Relaxed);
    }

    pub fn len(&self) -> usize {
        self.endpoints.len()
    }

    pub fn is_empty(&self) -> bool {
        self.endpoints.is_empty()
    }

    pub fn addrs(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        self.endpoints.iter().map(|e| e.addr)
    }

    fn next_random(&mut self) -> u64 {
        // xorshift64*: plenty for choosing among endpoints.
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Chooses the endpoint for one request, skipping those in `tried` (whose connect failed for
    /// this request). `None` when no endpoint is left.
    pub fn pick(&mut self, tried: &[SocketAddr]) -> Option<Pick> {
        self.pick_at(tried, Instant::now())
    }

    /// [`Balancer::pick`] at a given time (tests drive a virtual clock).
    pub fn pick_at(&mut self, tried: &[SocketAddr], now: Instant) -> Option<Pick> {
        if self.accrual.ejected.load(Relaxed) == 0 {
            return self.pick_among(tried, now);
        }
        // Some endpoint is ejected: its probe goes first once its backoff has passed; else it
        // is skipped like one already tried (unless nothing else is left).
        let now_ns = now.saturating_duration_since(self.epoch).as_nanos() as u64;
        let probe = self.endpoints.iter().find(|e| {
            let until = e.ejected_until_ns.load(Relaxed);
            until != 0
                && now_ns >= until
                && !tried.contains(&e.addr)
                && !e.probing.swap(true, Relaxed)
        });
        if let Some(probe) = probe.cloned() {
            self.picks += 1;
            probe.aged_through.store(self.picks, Relaxed);
            probe.pending.fetch_add(1, Relaxed);
            return Some(Pick {
                endpoint: probe,
                sent: now,
                epoch: self.epoch,
                open: true,
                probe: true,
            });
        }
        let mut skipped = tried.to_vec();
        skipped.extend(
            self.endpoints
                .iter()
                .filter(|e| e.is_ejected() && !tried.contains(&e.addr))
                .map(|e| e.addr),
        );
        if skipped.len() >= self.endpoints.len() {
            return self.pick_among(tried, now);
        }
        self.pick_among(&skipped, now)
    }

    /// P2C among the endpoints not in `tried`.
    fn pick_among(&mut self, tried: &[SocketAddr], now: Instant) -> Option<Pick> {
        self.picks += 1;
        let picks = self.picks;
        let count = self.endpoints.len();
        let candidates = self
            .endpoints
            .iter()
            .filter(|e| !tried.contains(&e.addr))
            .count();
        let chosen = match candidates {
            0 => return None,
            1 => self
                .endpoints
                .iter()
                .find(|e| !tried.contains(&e.addr))
                .cloned()?,
            _ => {
                let a = self.draw(tried, None);
                let b = self.draw(tried, Some(a));
                let cost = |e: &Endpoint| e.aged_rtt(picks, count) * f64::from(e.pending() + 1);
                let (a, b) = (&self.endpoints[a], &self.endpoints[b]);
                if cost(b) < cost(a) {
                    b.clone()
                } else {
                    a.clone()
                }
            }
        };
        chosen.aged_through.store(picks, Relaxed);
        chosen.pending.fetch_add(1, Relaxed);
        Some(Pick {
            endpoint: chosen,
            sent: now,
            epoch: self.epoch,
            open: true,
            probe: false,
        })
    }

    /// A random index of an endpoint not in `tried` and not `other`; the caller made sure one exists.
    fn draw(&mut self, tried: &[SocketAddr], other: Option<usize>) -> usize {
        let count = self.endpoints.len() as u64;
        loop {
            let i = (self.next_random() % count) as usize;
            if Some(i) != other && !tried.contains(&self.endpoints[i].addr) {
                return i;
            }
        }
    }

    /// Chooses the endpoint for one opaque TCP connection: the fewest open (ties broken at
    /// random), skipping those in `tried`.
    pub fn pick_connection(&mut self, tried: &[SocketAddr]) -> Option<Pick> {
        let start = if self.endpoints.is_empty() {
            0
        } else {
            (self.next_random() % self.endpoints.len() as u64) as usize
        };
        let count = self.endpoints.len();
        let chosen = (0..count)
            .map(|i| &self.endpoints[(start + i) % count])
            .filter(|e| !tried.contains(&e.addr))
            .min_by_key(|e| e.pending())?
            .clone();
        chosen.pending.fetch_add(1, Relaxed);
        Some(Pick {
            endpoint: chosen,
            sent: Instant::now(),
            epoch: self.epoch,
            open: true,
            probe: false,
        })
    }
}

/// One request (or connection) on its way to an endpoint; outstanding until it is answered or
/// dropped.
#[derive(Debug)]
pub struct Pick {
    endpoint: Arc<Endpoint>,
    sent: Instant,
    epoch: Instant,
    open: bool,
    /// The probe of an ejected endpoint: if it ends without an outcome, the next request
    /// probes instead.
    probe: bool,
}

impl Pick {
    pub fn addr(&self) -> SocketAddr {
        self.endpoint.addr
    }

    /// The endpoint to send to: its address and the identity it must present.
    pub fn endpoint(&self) -> crate::client::Endpoint {
        crate::client::Endpoint {
            addr: self.endpoint.addr,
            identity: self.endpoint.identity.clone(),
        }
    }

    /// The response head arrived: its latency is a sample, and the request is no longer
    /// outstanding.
    pub fn answered(self) {
        self.answered_at(Instant::now());
    }

    /// [`Pick::answered`] at a given time (tests drive a virtual clock).
    pub fn answered_at(self, now: Instant) {
        self.responded_at(200, now);
    }

    /// The response head arrived with `status`: as [`Pick::answered`], and a gateway error
    /// (502, 503, 504) counts toward the endpoint's failure accrual.
    pub fn responded(self, status: u16) {
        self.responded_at(status, Instant::now());
    }

    /// [`Pick::responded`] at a given time (tests drive a virtual clock).
    pub fn responded_at(mut self, status: u16, now: Instant) {
        let now_ns = now.saturating_duration_since(self.epoch).as_nanos() as u64;
        self.endpoint
            .observe(now.saturating_duration_since(self.sent), now_ns);
        if matches!(status, 502..=504) {
            self.endpoint.failed(now_ns);
        } else {
            self.endpoint.succeeded();
        }
        self.probe = false;
        self.close();
    }

    /// The connect failed: the endpoint is penalised so that other requests avoid it, and the
    /// failure counts toward its failure accrual.
    pub fn failed(self) {
        self.failed_at(Instant::now());
    }

    /// [`Pick::failed`] at a given time (tests drive a virtual clock).
    pub fn failed_at(mut self, now: Instant) {
        let now_ns = now.saturating_duration_since(self.epoch).as_nanos() as u64;
        self.endpoint.observe(FAILURE_PENALTY, now_ns);
        self.endpoint.failed(now_ns);
        self.probe = false;
        self.close();
    }

    fn close(&mut self) {
        if std::mem::take(&mut self.open) {
            self.endpoint.pending.fetch_sub(1, Relaxed);
        }
        if std::mem::take(&mut self.probe) {
            // Ended without an outcome (cancelled, reset): the next request probes.
            self.endpoint.probing.store(false, Relaxed);
        }
    }
}

impl Drop for Pick {
    fn drop(&mut self) {
        self.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(n: u8) -> Vec<SocketAddr> {
        (1..=n)
            .map(|i| SocketAddr::from(([198, 18, 1, i], 8080)))
            .collect()
    }

    /// A strictly sequential client on a virtual clock: each request answered after
    /// `latency(endpoint, i)` before the next is sent. Returns requests per endpoint.
    fn sequential(
        balancer: &mut Balancer,
        requests: usize,
        latency: impl Fn(usize, usize) -> Duration,
    ) -> Vec<usize> {
        let endpoints: Vec<SocketAddr> = balancer.addrs().collect();
        let mut counts = vec![0; endpoints.len()];
        let mut now = Instant::now();
        for i in 0..requests {
            let pick = balancer.pick_at(&[], now).unwrap();
            let index = endpoints.iter().position(|a| *a == pick.addr()).unwrap();
            counts[index] += 1;
            now += latency(index, i);
            pick.answered_at(now);
        }
        counts
    }

    /// `in_flight` requests always outstanding, answered in order of completion time.
    fn concurrent(
        balancer: &mut Balancer,
        requests: usize,
        in_flight: usize,
        latency: impl Fn(usize, usize) -> Duration,
    ) -> Vec<usize> {
        let endpoints: Vec<SocketAddr> = balancer.addrs().collect();
        let mut counts = vec![0; endpoints.len()];
        let start = Instant::now();
        let mut now = start;
        let mut outstanding: Vec<(Instant, Pick)> = Vec::new();
        for i in 0..requests {
            if outstanding.len() == in_flight {
                let first = (0..outstanding.len())
                    .min_by_key(|&k| outstanding[k].0)
                    .unwrap();
                let (done, pick) = outstanding.swap_remove(first);
                now = now.max(done);
                pick.answered_at(now);
            }
            let pick = balancer.pick_at(&[], now).unwrap();
            let index = endpoints.iter().position(|a| *a == pick.addr()).unwrap();
            counts[index] += 1;
            outstanding.push((now + latency(index, i), pick));
        }
        counts
    }

    /// Jitter of ±20 % around `base`, deterministic per request.
    fn jittered(base: Duration, i: usize) -> Duration {
        let wobble = (i.wrapping_mul(2_654_435_761) % 41) as u32; // 0..=40
        base * (80 + wobble) / 100
    }

    fn share(counts: &[usize]) -> Vec<f64> {
        let total: usize = counts.iter().sum();
        counts
            .iter()
            .map(|&c| c as f64 * 100.0 / total as f64)
            .collect()
    }

    /// Each of three endpoints got a third of the requests, within five points.
    fn assert_even(seed: u64, counts: &[usize]) {
        for share in share(counts) {
            assert!(
                (share - 100.0 / 3.0).abs() <= 5.0,
                "seed {seed}: {counts:?}"
            );
        }
    }

    #[test]
    fn equally_fast_endpoints_share_concurrent_load_within_five_points() {
        for seed in 1..=20 {
            let mut balancer = Balancer::with_seed(seed);
            balancer.update(addrs(3));
            let counts = concurrent(&mut balancer, 500, 10, |_, i| {
                jittered(Duration::from_millis(1), i)
            });
            assert_even(seed, &counts);
        }
    }

    #[test]
    fn a_passing_peak_does_not_hold_a_busy_endpoint_back() {
        for seed in 1..=20 {
            let mut balancer = Balancer::with_seed(seed);
            balancer.update(addrs(3));
            // Endpoint 1's 5th request meets a 10 ms hiccup; otherwise all answer alike.
            let served = std::cell::Cell::new(0);
            let counts = concurrent(&mut balancer, 500, 10, |endpoint, i| {
                if endpoint == 1 {
                    served.set(served.get() + 1);
                    if served.get() == 5 {
                        return Duration::from_millis(10);
                    }
                }
                jittered(Duration::from_millis(1), i)
            });
            assert_even(seed, &counts);
        }
    }

    #[test]
    fn an_endpoint_that_stops_answering_gets_only_a_few_requests() {
        for seed in 1..=20 {
            let mut balancer = Balancer::with_seed(seed);
            balancer.update(addrs(3));
            // Endpoint 0 answers its first 3 requests, then holds every one for an hour.
            let served = std::cell::Cell::new(0);
            let counts = concurrent(&mut balancer, 500, 10, |endpoint, i| {
                if endpoint == 0 {
                    served.set(served.get() + 1);
                    if served.get() > 3 {
                        return Duration::from_secs(3600);
                    }
                }
                jittered(Duration::from_millis(1), i)
            });
            assert!(counts[0] <= 3 + 5, "seed {seed}: {counts:?}");
        }
    }

    #[test]
    fn a_sequential_client_starves_no_equally_fast_endpoint() {
        for seed in 1..=20 {
            let mut balancer = Balancer::with_seed(seed);
            balancer.update(addrs(3));
            // The first request to each endpoint is slow (a cold connection), as in practice:
            // without ageing, the endpoint whose slow first answer came last would never be
            // chosen again.
            let counts = sequential(&mut balancer, 500, |_, i| {
                if i < 3 {
                    Duration::from_millis(20)
                } else {
                    jittered(Duration::from_micros(300), i)
                }
            });
            for share in share(&counts) {
                assert!(share >= 10.0, "seed {seed}: {counts:?}");
            }
        }
    }

    #[test]
    fn a_cold_first_answer_keeps_an_endpoint_out_only_briefly() {
        for seed in 1..=20 {
            let mut balancer = Balancer::with_seed(seed);
            balancer.update(addrs(2));
            // Each endpoint's first answer is 7x its usual one (the connect and a cold app).
            let first = [std::cell::Cell::new(true), std::cell::Cell::new(true)];
            let counts = sequential(&mut balancer, 40, |endpoint, i| {
                if first[endpoint].replace(false) {
                    Duration::from_millis(2)
                } else {
                    jittered(Duration::from_micros(300), i)
                }
            });
            for share in share(&counts) {
                assert!(share >= 25.0, "seed {seed}: {counts:?}");
            }
        }
    }

    #[test]
    fn an_endpoint_fifty_milliseconds_slower_gets_under_ten_percent() {
        for seed in 1..=20 {
            for in_flight in [1, 10] {
                let mut balancer = Balancer::with_seed(seed);
                balancer.update(addrs(3));
                let latency = |endpoint: usize, i: usize| {
                    let base = jittered(Duration::from_millis(1), i);
                    if endpoint == 2 {
                        base + Duration::from_millis(50)
                    } else {
                        base
                    }
                };
                let counts = concurrent(&mut balancer, 500, in_flight, latency);
                assert!(
                    share(&counts)[2] < 10.0,
                    "seed {seed}, {in_flight} in flight: {counts:?}"
                );
            }
        }
    }

    #[test]
    fn a_failed_connect_moves_the_request_and_keeps_others_away() {
        let mut balancer = Balancer::with_seed(7);
        balancer.update(addrs(3));
        let dead = addrs(3)[0];
        let mut now = Instant::now();
        let mut to_dead = 0;
        for _ in 0..100 {
            let mut tried = Vec::new();
            let pick = loop {
                let pick = balancer.pick_at(&tried, now).unwrap();
                if pick.addr() != dead {
                    break pick;
                }
                to_dead += 1;
                tried.push(pick.addr());
                pick.failed();
            };
            now += Duration::from_millis(1);
            pick.answered_at(now);
        }
        // Drawn again only as the ageing brings it back: a few probes in a hundred requests.
        assert!(
            to_dead <= 5,
            "{to_dead} requests tried the dead endpoint first"
        );
        // Every endpoint tried: nothing left.
        let all = addrs(3);
        assert!(balancer.pick(&all).is_none());
    }

    #[test]
    fn an_update_keeps_what_was_learned_and_in_flight_requests_finish() {
        let mut balancer = Balancer::with_seed(3);
        balancer.update(addrs(2));
        let pick = balancer.pick(&[]).unwrap();
        let kept = pick.addr();
        balancer.update([kept]);
        assert_eq!(balancer.len(), 1);
        assert_eq!(
            balancer.endpoints[0].pending(),
            1,
            "the request in flight still counts"
        );
        pick.answered();
        assert_eq!(balancer.endpoints[0].pending(), 0);
        balancer.update(Vec::<SocketAddr>::new());
        assert!(balancer.pick(&[]).is_none(), "no endpoint: no pick");
    }

    #[test]
    fn connections_go_to_the_endpoint_with_fewest_open() {
        let mut balancer = Balancer::with_seed(5);
        balancer.update(addrs(3));
        let open: Vec<Pick> = (0..30)
            .map(|_| balancer.pick_connection(&[]).unwrap())
            .collect();
        for addr in addrs(3) {
            assert_eq!(open.iter().filter(|p| p.addr() == addr).count(), 10);
        }
    }

    /// A balancer over `n` endpoints with failure accrual `consecutive`, `max_percent`.
    fn accruing(n: u8, consecutive: u32, max_percent: u32) -> (Balancer, Counter) {
        let mut balancer = Balancer::with_seed(11);
        balancer.update(addrs(n));
        let counter = Counter::default();
        balancer.set_accrual(consecutive, max_percent, &counter);
        (balancer, counter)
    }

    /// Sequential requests every 10 ms from `*now` for `span`: the bad endpoints answer 502,
    /// the others 200. Returns the requests each endpoint got.
    fn run(
        balancer: &mut Balancer,
        bad: &[SocketAddr],
        now: &mut Instant,
        span: Duration,
    ) -> Vec<usize> {
        let endpoints: Vec<SocketAddr> = balancer.addrs().collect();
        let mut counts = vec![0; endpoints.len()];
        let end = *now + span;
        while *now < end {
            let pick = balancer.pick_at(&[], *now).unwrap();
            counts[endpoints.iter().position(|a| *a == pick.addr()).unwrap()] += 1;
            *now += Duration::from_millis(10);
            let status = if bad.contains(&pick.addr()) { 502 } else { 200 };
            pick.responded_at(status, *now);
        }
        counts
    }

    #[test]
    fn consecutive_gateway_errors_eject_until_a_probe_brings_the_endpoint_back() {
        let (mut balancer, counter) = accruing(3, 5, 50);
        let bad = addrs(3)[0];
        let mut now = Instant::now();
        // Five gateway errors in a row from it: ejected.
        let mut failures = 0;
        while failures < 5 {
            assert_eq!(balancer.ejected(), 0);
            let pick = balancer.pick_at(&[addrs(3)[1], addrs(3)[2]], now).unwrap();
            assert_eq!(pick.addr(), bad);
            now += Duration::from_millis(1);
            pick.responded_at(503, now);
            failures += 1;
        }
        assert_eq!((balancer.ejected(), counter.get()), (1, 1));
        // Its backoff (at least half a second) passes without a request to it.
        let counts = run(&mut balancer, &[bad], &mut now, Duration::from_millis(490));
        assert_eq!(counts[0], 0, "{counts:?}");
        // Once the backoff (at most 1 s) has passed, the first request probes it; still
        // failing, it is ejected again, for up to 2 s.
        now += Duration::from_millis(600);
        let probe = balancer.pick_at(&[], now).unwrap();
        assert_eq!(probe.addr(), bad);
        // No second probe while the first is out.
        for _ in 0..20 {
            assert_ne!(balancer.pick_at(&[], now).unwrap().addr(), bad);
        }
        probe.responded_at(502, now);
        assert_eq!((balancer.ejected(), counter.get()), (1, 2));
        let counts = run(&mut balancer, &[bad], &mut now, Duration::from_millis(990));
        assert_eq!(counts[0], 0, "{counts:?}");
        // Recovered: the next probe (by 2 s) brings it back, and it takes requests again.
        now += Duration::from_millis(1100);
        let probe = balancer.pick_at(&[], now).unwrap();
        assert_eq!(probe.addr(), bad);
        probe.responded_at(200, now);
        assert_eq!(balancer.ejected(), 0);
        let counts = run(&mut balancer, &[], &mut now, Duration::from_secs(3));
        assert!(counts[0] > 30, "{counts:?}");
    }

    #[test]
    fn a_probe_that_ends_without_an_answer_leaves_the_next_request_to_probe() {
        let (mut balancer, _) = accruing(2, 1, 50);
        let bad = addrs(2)[0];
        let mut now = Instant::now();
        let pick = balancer.pick_at(&[addrs(2)[1]], now).unwrap();
        pick.failed_at(now);
        assert_eq!(balancer.ejected(), 1);
        now += EJECTION_BACKOFF.0;
        let probe = balancer.pick_at(&[], now).unwrap();
        assert_eq!(probe.addr(), bad);
        drop(probe);
        let probe = balancer.pick_at(&[], now).unwrap();
        assert_eq!(probe.addr(), bad, "the next request probes");
    }

    #[test]
    fn never_more_than_the_share_is_ejected_and_one_endpoint_never_is() {
        for (endpoints, percent, most) in
            [(1, 100, 0), (2, 50, 1), (3, 50, 1), (4, 50, 2), (3, 0, 0)]
        {
            let (mut balancer, _) = accruing(endpoints, 3, percent);
            let all = addrs(endpoints);
            let mut now = Instant::now();
            let counts = run(&mut balancer, &all, &mut now, Duration::from_secs(2));
            assert_eq!(
                balancer.ejected(),
                most,
                "{endpoints} endpoints, {percent}%: {counts:?}"
            );
            // All failing, the ones left in keep taking every request.
            assert_eq!(counts.iter().sum::<usize>(), 200);
        }
    }

    #[test]
    fn without_accrual_nothing_is_ejected() {
        let (mut balancer, counter) = accruing(3, 0, 100);
        let mut now = Instant::now();
        run(&mut balancer, &addrs(3), &mut now, Duration::from_secs(1));
        assert_eq!((balancer.ejected(), counter.get()), (0, 0));
    }
}
