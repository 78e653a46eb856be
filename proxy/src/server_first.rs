//! What detection learns about destinations, process-wide: which ones speak first, so that their
//! later connections skip the detection wait (see `serve::detect`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant as StdInstant};

use arc_swap::ArcSwap;

/// How long a destination stays known as server-first. A verdict runs out rather than being
/// extended by use, and is then learned again: one connection to the destination waits out
/// detection (`serve::detect::DETECT_TIMEOUT`) once more. That re-check bounds a wrong verdict
/// that no client corrects (see [`ServerFirst::forget`]): a destination whose clients are slow
/// to speak, or a port that has begun to carry a client-first protocol, is carried as opaque
/// TCP, intact but without per-request metrics, for at most this long. Five minutes costs a
/// database client one 100 ms wait per destination in 300 s (0.03 % of the time), yet a changed
/// destination is measured again within minutes, not only after a restart.
pub const SERVER_FIRST_TTL: Duration = Duration::from_secs(5 * 60);

/// How many server-first destinations are remembered per direction; when full, the one learned
/// longest ago goes. A pod talks to a few databases and mail servers, not hundreds; the bound
/// keeps an app that dials many silent destinations from growing the proxy (at most about
/// 25 KiB per direction).
pub const SERVER_FIRST_CAPACITY: usize = 256;

/// The destinations known at one moment to speak first, each with when it was learned. A value:
/// [`ServerFirst`] replaces it whole on each change, and every function takes the time, so the
/// rules are tested without a clock.
#[derive(Debug, Default, Clone)]
pub struct SilentDestinations {
    learned: HashMap<SocketAddr, StdInstant>,
}

impl SilentDestinations {
    /// Whether `destination` is known to speak first; `now` is only read for a destination
    /// that is held, so a lookup in an empty set costs no clock read and no hash.
    pub fn knows(&self, destination: &SocketAddr, now: impl FnOnce() -> StdInstant) -> bool {
        match self.learned.get(destination) {
            Some(&learned) => now().saturating_duration_since(learned) < SERVER_FIRST_TTL,
            None => false,
        }
    }

    /// These destinations and `destination`, learned at `now`; those expired by `now` are left
    /// out, and the one learned longest ago too if the set would grow past
    /// [`SERVER_FIRST_CAPACITY`].
    pub fn with(&self, destination: SocketAddr, now: StdInstant) -> Self {
        let mut learned: HashMap<SocketAddr, StdInstant> = self
            .learned
            .iter()
            .filter(|(_, &at)| now.saturating_duration_since(at) < SERVER_FIRST_TTL)
            .map(|(&destination, &at)| (destination, at))
            .collect();
        if learned.len() >= SERVER_FIRST_CAPACITY && !learned.contains_key(&destination) {
            let oldest = learned.iter().min_by_key(|(_, &at)| at).map(|(&d, _)| d);
            if let Some(oldest) = oldest {
                learned.remove(&oldest);
            }
        }
        learned.insert(destination, now);
        Self { learned }
    }

    /// These destinations without `destination`.
    pub fn without(&self, destination: &SocketAddr) -> Self {
        let mut learned = self.learned.clone();
        learned.remove(destination);
        Self { learned }
    }

    pub fn contains(&self, destination: &SocketAddr) -> bool {
        self.learned.contains_key(destination)
    }

    /// The ports held, as [`port_bit`]s.
    fn port_bits(&self) -> u64 {
        self.learned.keys().fold(0, |bits, d| bits | port_bit(d))
    }

    /// How many destinations are held, expired ones included until the next change.
    pub fn len(&self) -> usize {
        self.learned.len()
    }

    pub fn is_empty(&self) -> bool {
        self.learned.is_empty()
    }
}

/// The server-first destinations of one direction, shared by every worker: a lookup loads the
/// current [`SilentDestinations`] without a lock (every worker learns from any connection, so
/// only the first connection to a destination waits, whichever worker serves the next), and
/// learning copies the set, which happens only after a connection has already waited out
/// detection (`serve::detect::DETECT_TIMEOUT`).
#[derive(Debug, Default)]
pub struct ServerFirst {
    current: ArcSwap<SilentDestinations>,
    /// A hint for [`ServerFirst::may_hold`]: the [`port_bit`]s of the destinations held.
    ports: AtomicU64,
}

/// A destination's bit in [`ServerFirst`]'s port hint: its port modulo 64, so a pod's HTTP
/// ports rarely share a bit with its server-first ones.
fn port_bit(destination: &SocketAddr) -> u64 {
    1 << (destination.port() % 64)
}

impl ServerFirst {
    /// See [`SilentDestinations::knows`].
    pub fn knows(&self, destination: &SocketAddr, now: impl FnOnce() -> StdInstant) -> bool {
        self.current.load().knows(destination, now)
    }

    /// Remembers that `destination`'s client sent nothing first, at `now`. Returns by how much
    /// the number of destinations held changed (a gauge's step; 0 or negative when expired or
    /// evicted entries went).
    pub fn learn(&self, destination: SocketAddr, now: StdInstant) -> i64 {
        let mut held = 0;
        let before = self.current.rcu(|current| {
            let next = current.with(destination, now);
            held = next.len();
            next
        });
        self.ports
            .fetch_or(port_bit(&destination), Ordering::Relaxed);
        // The set is bounded by SERVER_FIRST_CAPACITY, far inside i64.
        held as i64 - before.len() as i64
    }

    /// Whether `destination` may be held: one relaxed load and a bit test, so that every
    /// connection whose client spoke first can ask it. False means surely not held (but for a
    /// destination learned at this very moment).
    pub fn may_hold(&self, destination: &SocketAddr) -> bool {
        self.ports.load(Ordering::Relaxed) & port_bit(destination) != 0
    }

    /// Drops `destination`, whose client has just spoken first: evidence that it is not
    /// server-first after all (a client-first protocol whose first connection was slow to speak,
    /// say), so its next connections are detected again instead of carried unmeasured until
    /// the verdict expires. Returns the gauge's step, as [`ServerFirst::learn`] does. Copies the
    /// set only when it holds `destination`, which a correct verdict never makes happen.
    pub fn forget(&self, destination: &SocketAddr) -> i64 {
        if !self.current.load().contains(destination) {
            return 0;
        }
        let mut held = 0;
        let before = self.current.rcu(|current| {
            let next = current.without(destination);
            held = next.len();
            next
        });
        // A learn racing with this may lose its bit until the next change; its verdict then
        // only waits for expiry instead of being corrected sooner.
        self.ports
            .store(self.current.load().port_bits(), Ordering::Relaxed);
        held as i64 - before.len() as i64
    }

    pub fn len(&self) -> usize {
        self.current.load().len()
    }

    pub fn is_empty(&self) -> bool {
        self.current.load().is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn destination(port: u16) -> SocketAddr {
        SocketAddr::from(([198, 18, 0, 2], port))
    }

    #[test]
    fn a_server_first_destination_is_known_until_its_verdict_expires() {
        let start = StdInstant::now();
        let set = SilentDestinations::default();
        let at = |secs| start + Duration::from_secs(secs);
        assert!(!set.knows(&destination(3307), || start));
        let set = set.with(destination(3307), start);
        assert!(set.knows(&destination(3307), || start));
        assert!(!set.knows(&destination(3308), || start));
        let ttl = SERVER_FIRST_TTL.as_secs();
        assert!(set.knows(&destination(3307), || at(ttl - 1)));
        assert!(!set.knows(&destination(3307), || at(ttl)));
        // Expired entries go with the next change.
        let set = set.with(destination(3308), at(ttl));
        assert_eq!(set.len(), 1);
        assert!(set.knows(&destination(3308), || at(ttl)));
        // Learning again restarts the time; knowing does not.
        let set = set.with(destination(3308), at(ttl + 100));
        assert!(set.knows(&destination(3308), || at(2 * ttl + 99)));
    }

    #[test]
    fn a_full_set_drops_expired_destinations_then_the_one_learned_longest_ago() {
        let start = StdInstant::now();
        let at = |secs| start + Duration::from_secs(secs);
        let mut set = SilentDestinations::default();
        for i in 0..SERVER_FIRST_CAPACITY {
            set = set.with(destination(10_000 + i as u16), at(i as u64));
        }
        assert_eq!(set.len(), SERVER_FIRST_CAPACITY);
        // Full: the newcomer displaces the oldest (learned at `start`), no one else.
        let now = at(SERVER_FIRST_CAPACITY as u64);
        let set = set.with(destination(9_999), now);
        assert_eq!(set.len(), SERVER_FIRST_CAPACITY);
        assert!(set.knows(&destination(9_999), || now));
        assert!(!set.knows(&destination(10_000), || now));
        assert!(set.knows(&destination(10_001), || now));
        // Learning one already held again replaces it rather than evicting another.
        let set = set.with(destination(10_001), now);
        assert_eq!(set.len(), SERVER_FIRST_CAPACITY);
        assert!(set.knows(&destination(10_002), || now));
        // When entries have expired, they make the room and the live ones stay.
        let later = at(SERVER_FIRST_TTL.as_secs() + 9);
        let set = set.with(destination(9_998), later);
        assert!(set.len() < SERVER_FIRST_CAPACITY);
        assert!(set.knows(&destination(9_998), || later));
        assert!(set.knows(&destination(9_999), || later));
    }

    #[test]
    fn learning_reports_how_the_number_held_changed() {
        let start = StdInstant::now();
        let shared = ServerFirst::default();
        assert!(shared.is_empty());
        assert_eq!(shared.learn(destination(3307), start), 1);
        assert_eq!(shared.learn(destination(3307), start), 0);
        assert_eq!(shared.learn(destination(3308), start), 1);
        assert!(shared.knows(&destination(3308), || start));
        // Both expired: one in, two out.
        let later = start + SERVER_FIRST_TTL;
        assert_eq!(shared.learn(destination(3309), later), -1);
        assert_eq!(shared.len(), 1);
    }

    #[test]
    fn a_destination_whose_client_spoke_first_is_forgotten_and_others_pay_no_lookup() {
        let now = StdInstant::now();
        let shared = ServerFirst::default();
        assert!(!shared.may_hold(&destination(3307)));
        shared.learn(destination(3307), now);
        shared.learn(destination(25), now);
        assert!(shared.may_hold(&destination(3307)));
        // 8080 and 3307 fall on different bits: an HTTP client of 8080 skips the lookup.
        assert!(!shared.may_hold(&destination(8080)));
        // 3307 + 64 shares 3307's bit: it may ask, and finds nothing to forget.
        assert!(shared.may_hold(&destination(3371)));
        assert_eq!(shared.forget(&destination(3371)), 0);
        assert_eq!(shared.len(), 2);
        assert_eq!(shared.forget(&destination(3307)), -1);
        assert!(!shared.knows(&destination(3307), || now));
        assert!(!shared.may_hold(&destination(3307)));
        assert!(shared.knows(&destination(25), || now) && shared.may_hold(&destination(25)));
        assert_eq!(shared.forget(&destination(3307)), 0);
    }
}
