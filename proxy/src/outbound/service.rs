//! Outbound connections to a Service: the worker's view of one target (its balancer and the
//! control plane's latest snapshot) and the per-request choice of an endpoint.
//!
//! Each worker thread keeps its own balancer per target ([`WORKER_TARGETS`]), so the latency
//! estimates and outstanding counts a choice reads are never shared across cores; the snapshot
//! is shared through the discovery's watch, and a worker applies a new one on its next request.
//! When routes apply to the Service, each of their backends gets a balancer of its own the same
//! way ([`ServiceTarget::pick_backend`]), and the request is matched against the routes first
//! ([`ServiceTarget::start`] says which, in the one lock that a request without routes takes).

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use prometheus_client::metrics::counter::Counter;
use tokio::sync::watch;

use crate::metrics::ControlMetrics;

use crate::discover::{Discovery, InUse, Known, Service, Watched, FIRST_SNAPSHOT_WAIT};
use crate::outbound::balance::{Balancer, Pick};
use crate::outbound::policy::Policy;
use crate::outbound::retry::Budget;
use crate::outbound::routes::{BackendKey, Routes};

/// One worker's state for one target, shared by its connections to that target.
#[derive(Debug)]
struct WorkerTarget {
    watched: Arc<Watched>,
    balancer: Arc<Mutex<Applied>>,
}

/// A worker's balancer for one target and the snapshot it was last brought up to date with.
#[derive(Debug)]
pub struct Applied {
    balancer: Balancer,
    /// This worker's reader of the target's snapshots.
    known: watch::Receiver<Known>,
    /// The latest snapshot's routes and policy, as this worker holds them.
    applying: Arc<Applying>,
    /// A balancer per backend of `routes`, in its order: the same per-worker balancing as the
    /// Service's own, kept across snapshots for a backend that stays.
    backends: Vec<(BackendKey, Balancer)>,
    /// `route_requests_total` handles by route and status code, made on first use.
    counters: Vec<(Arc<str>, u16, Counter)>,
    /// This worker's retry budget for the target, across snapshots; routed requests draw on it
    /// too.
    budget: Budget,
    /// Requests of this worker waiting now for the target to have a ready endpoint.
    waiting: u32,
}

/// The route label of requests to a Service without routes.
pub const DEFAULT_ROUTE: &str = "default";
/// The route label of requests that no route matched (404) when the Service has routes.
pub const UNMATCHED_ROUTE: &str = "unmatched";

/// A snapshot's routes and policy as one worker holds them. A request that needs them takes a
/// clone of the worker's `Arc` of this, never of the `Arc`s inside, which every worker shares:
/// the count a clone writes is then on a line of this worker's alone. (Two workers cloning the
/// routes' own `Arc` per request wrote its line, the routes' fields beside the count, from both
/// cores in turn.)
#[derive(Debug)]
pub struct Applying {
    /// `None` when none applies.
    pub routes: Option<Arc<Routes>>,
    pub policy: Arc<Policy>,
}

impl Applying {
    /// The routes of a [`Start::Routed`].
    pub fn routes(&self) -> &Arc<Routes> {
        self.routes.as_ref().expect("a routed start has routes")
    }
}

/// How a request to a Service starts: the endpoint for it when the Service has no routes and
/// its policy asks for nothing more (as one lock and one pick); the policy to send it under
/// (a deadline, retries) when it does; else the routes to match it against, and the policy.
#[derive(Debug)]
pub enum Start {
    Direct(Result<Pick, NoEndpoint>),
    Guarded(Arc<Applying>),
    /// Its [`Applying::routes`] are there.
    Routed(Arc<Applying>),
}

thread_local! {
    /// This worker's targets: one map lookup per connection.
    static WORKER_TARGETS: RefCell<HashMap<SocketAddr, WorkerTarget>> = RefCell::new(HashMap::new());
}

/// What an outbound connection was for when it started.
#[derive(Debug)]
pub enum Resolved {
    /// To the original destination: not a Service, or no snapshot (fail open); with the
    /// identity it must present when the snapshot names it a meshed pod.
    Forward(Option<Arc<str>>),
    Service(ServiceTarget),
}

/// An outbound connection's Service: held for the connection's life.
#[derive(Debug)]
pub struct ServiceTarget {
    balancer: Arc<Mutex<Applied>>,
    /// The snapshot when the connection started: its protocol and names.
    pub service: Arc<Service>,
    metrics: &'static ControlMetrics,
    /// Held, not read: keeps the target's watch from expiring while the connection is open.
    _in_use: InUse,
}

/// One request waiting in a target's queue: leaves it however the wait ends.
struct Waiting<'a>(&'a ServiceTarget);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut applied = self
            .0
            .balancer
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        applied.waiting = applied.waiting.saturating_sub(1);
    }
}

/// Why no endpoint could be chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoEndpoint {
    /// The Service has no ready endpoint (or it no longer is a Service).
    NoneReady,
    /// Every ready endpoint was tried for this request and failed.
    AllFailed,
}

/// What `target` is, waiting for its first snapshot at most [`FIRST_SNAPSHOT_WAIT`].
pub async fn resolve(discovery: &'static Discovery, target: SocketAddr) -> Resolved {
    let (in_use, balancer) = worker_target(discovery, target);
    let mut known = in_use.known().clone();
    if matches!(*known.borrow(), Known::Waiting) {
        // A closed watch (the target expired meanwhile) or the wait running out: fail open.
        let _ = tokio::time::timeout(
            FIRST_SNAPSHOT_WAIT,
            known.wait_for(|known| !matches!(known, Known::Waiting)),
        )
        .await;
    }
    let service = known.borrow().service().cloned();
    match service {
        Some(service) => Resolved::Service(ServiceTarget {
            balancer,
            service,
            metrics: discovery.metrics(),
            _in_use: in_use,
        }),
        None => match &*known.borrow() {
            Known::Passthrough(identity) => Resolved::Forward(identity.clone()),
            _ => Resolved::Forward(None),
        },
    }
}

/// This worker's entry for `target`, made or renewed (after the target expired) from the
/// discovery; counts one more connection using it.
fn worker_target(
    discovery: &'static Discovery,
    target: SocketAddr,
) -> (InUse, Arc<Mutex<Applied>>) {
    WORKER_TARGETS.with_borrow_mut(|targets| {
        if let Some(entry) = targets.get(&target) {
            if entry.watched.known.has_changed().is_ok() {
                if let Some(in_use) = InUse::again(&entry.watched) {
                    return (in_use, Arc::clone(&entry.balancer));
                }
            }
        }
        let in_use = discovery.watch(target);
        let balancer = Arc::new(Mutex::new(Applied {
            balancer: Balancer::new(),
            known: in_use.known().clone(),
            applying: Arc::new(Applying {
                routes: None,
                policy: Arc::new(Policy::default()),
            }),
            backends: Vec::new(),
            counters: Vec::new(),
            budget: Budget::default(),
            waiting: 0,
        }));
        targets.insert(
            target,
            WorkerTarget {
                watched: in_use.watched(),
                balancer: Arc::clone(&balancer),
            },
        );
        (in_use, balancer)
    })
}

/// Drops this worker's entries whose target expired. Called by the worker's periodic sweep.
pub fn sweep() {
    let _ = WORKER_TARGETS.try_with(|targets| {
        targets
            .borrow_mut()
            .retain(|_, entry| entry.watched.known.has_changed().is_ok());
    });
}

impl Applied {
    /// Brings the balancer up to the latest snapshot, if a newer one came.
    fn refresh(&mut self) {
        if !self.known.has_changed().unwrap_or(false) {
            return;
        }
        let known = self.known.borrow_and_update().clone();
        let service = known.service();
        let (endpoints, routes) = match service {
            Some(service) => (service.endpoints.clone(), service.routes.clone()),
            // No longer a Service: nothing to balance over.
            None => (Vec::new(), None),
        };
        self.balancer.update(endpoints);
        if let Some(service) = service {
            self.balancer.set_accrual(
                service.policy.failure_accrual_consecutive,
                service.policy.max_ejection_percent,
                &service.resilience.ejections,
            );
        }
        let mut old = std::mem::take(&mut self.backends);
        if let Some(routes) = &routes {
            for (index, backend) in routes.backends.iter().enumerate() {
                let mut balancer = match old.iter().position(|(key, _)| *key == backend.key) {
                    Some(kept) => old.swap_remove(kept).1,
                    None => Balancer::new(),
                };
                balancer.update(backend.endpoints.iter().cloned());
                // A backend's endpoints accrue failures under the backend Service's own policy.
                let accrual = service.and_then(|service| service.backend_accrual.get(index));
                if let Some((consecutive, max_percent, ejections)) = accrual {
                    balancer.set_accrual(*consecutive, *max_percent, ejections);
                }
                self.backends.push((backend.key.clone(), balancer));
            }
        }
        // Made here, on the worker: its count is this worker's alone (see `Applying`).
        let policy = service.map_or_else(
            || Arc::clone(&self.applying.policy),
            |service| Arc::clone(&service.policy),
        );
        self.applying = Arc::new(Applying { routes, policy });
    }

    /// This worker's balancer for backend `index` of `routes`: by index when `routes` is the
    /// latest, else (a request that started before a new snapshot) by name.
    fn backend(&mut self, routes: &Arc<Routes>, index: usize) -> Option<&mut Balancer> {
        let latest = self
            .applying
            .routes
            .as_ref()
            .is_some_and(|latest| Arc::ptr_eq(latest, routes));
        if latest {
            return self.backends.get_mut(index).map(|(_, balancer)| balancer);
        }
        let key = &routes.backends.get(index)?.key;
        self.backends
            .iter_mut()
            .find(|(have, _)| have == key)
            .map(|(_, balancer)| balancer)
    }
}

impl ServiceTarget {
    /// `namespace/name:port`, for logs.
    pub fn name(&self) -> String {
        format!(
            "{}/{}:{}",
            self.service.namespace, self.service.name, self.service.port
        )
    }

    /// Counts one answered request of `route` in `route_requests_total`.
    pub fn count_request(&self, route: &str, status: u16) {
        let mut applied = self.balancer.lock().unwrap_or_else(PoisonError::into_inner);
        let counters = &mut applied.counters;
        match counters
            .iter()
            .find(|(name, code, _)| *code == status && &**name == route)
        {
            Some((_, _, counter)) => {
                counter.inc();
            }
            None => {
                let counter = self.metrics.route_requests(
                    &self.service.namespace,
                    &self.service.name,
                    route,
                    status,
                );
                counter.inc();
                counters.push((Arc::from(route), status, counter));
            }
        }
    }

    /// Where a request that started at `now` starts: one lock, which also applies a newer
    /// snapshot and counts the request in the retry budget.
    pub fn start(&self, now: Instant) -> Start {
        let mut applied = self.balancer.lock().unwrap_or_else(PoisonError::into_inner);
        applied.refresh();
        applied.budget.deposit(now);
        if applied.applying.routes.is_some() {
            return Start::Routed(Arc::clone(&applied.applying));
        }
        if applied.applying.policy.guards() {
            return Start::Guarded(Arc::clone(&applied.applying));
        }
        let balancer = &mut applied.balancer;
        if balancer.is_empty() {
            return Start::Direct(Err(NoEndpoint::NoneReady));
        }
        Start::Direct(balancer.pick(&[]).ok_or(NoEndpoint::AllFailed))
    }

    /// Whether one more retry fits this worker's budget for the Service (`policy` says how
    /// big it is; `workers` share its floor); counted in `retry_budget_exhausted_total` when it
    /// does not.
    pub fn withdraw_retry(&self, policy: &Policy, workers: usize) -> bool {
        let mut applied = self.balancer.lock().unwrap_or_else(PoisonError::into_inner);
        let allowed = applied
            .budget
            .withdraw(Instant::now(), &policy.retry, workers);
        drop(applied);
        if !allowed {
            self.service.resilience.budget_exhausted.inc();
        }
        allowed
    }

    /// Waits, as the policy's queue allows, for the Service to have a ready endpoint: false at
    /// once when the queue is full (or off), false when the wait runs out (both counted in
    /// `queue_rejections_total`), true when one is ready.
    pub async fn queue(&self) -> bool {
        let (mut known, timeout) = {
            let mut applied = self.balancer.lock().unwrap_or_else(PoisonError::into_inner);
            let policy = &applied.applying.policy;
            let (size, timeout) = (policy.queue_size, policy.queue_timeout);
            if applied.waiting >= size || timeout.is_zero() {
                drop(applied);
                self.service.resilience.queue_rejections.inc();
                return false;
            }
            applied.waiting += 1;
            (applied.known.clone(), timeout)
        };
        let _waiting = Waiting(self);
        let ready = |known: &Known| known.service().is_some_and(|s| !s.endpoints.is_empty());
        let waited = tokio::time::timeout(timeout, known.wait_for(ready)).await;
        let ready = matches!(waited, Ok(Ok(_)));
        if !ready {
            self.service.resilience.queue_rejections.inc();
        }
        ready
    }

    /// The endpoint for a request that found none ready, after waiting in the queue.
    pub async fn pick_queued(&self) -> Result<Pick, NoEndpoint> {
        if !self.queue().await {
            return Err(NoEndpoint::NoneReady);
        }
        self.pick(&[], false)
    }

    /// The endpoint of backend `index` of `routes` for one request, skipping `tried`.
    pub fn pick_backend(
        &self,
        routes: &Arc<Routes>,
        index: usize,
        tried: &[SocketAddr],
    ) -> Result<Pick, NoEndpoint> {
        let mut applied = self.balancer.lock().unwrap_or_else(PoisonError::into_inner);
        applied.refresh();
        let Some(balancer) = applied.backend(routes, index) else {
            return Err(NoEndpoint::NoneReady);
        };
        if balancer.is_empty() {
            return Err(NoEndpoint::NoneReady);
        }
        balancer.pick(tried).ok_or(NoEndpoint::AllFailed)
    }

    /// The endpoint for one request (HTTP) or one connection (`per_connection`, opaque TCP),
    /// skipping `tried`; a newer snapshot is applied first.
    pub fn pick(&self, tried: &[SocketAddr], per_connection: bool) -> Result<Pick, NoEndpoint> {
        let mut applied = self.balancer.lock().unwrap_or_else(PoisonError::into_inner);
        applied.refresh();
        let balancer = &mut applied.balancer;
        if balancer.is_empty() {
            return Err(NoEndpoint::NoneReady);
        }
        let pick = if per_connection {
            balancer.pick_connection(tried)
        } else {
            balancer.pick(tried)
        };
        pick.ok_or(NoEndpoint::AllFailed)
    }
}
