//! The `remora.discovery.v1.Discovery` service: one index for all streams, a snapshot per stream.
//!
//! The index is rebuilt once per change of the objects, off the async workers, and published to
//! every stream through one `tokio::sync::watch`. A stream is a future polled by the connection
//! that carries it — no task of its own — so a client that goes away drops it with its
//! connection or its reset, and nothing is left behind. On each new index a stream computes its
//! snapshot (a hash lookup, a few small strings and its route table, resolved once per index for
//! all the streams of one target and client namespace) and writes it only if it differs from
//! the last one it wrote.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use futures_util::Stream;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use remora_api::discovery::discovery_server::{Discovery, DiscoveryServer};
use remora_api::discovery::{self as pb, snapshot::Kind};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tonic::{Request, Response, Status};

use crate::index::{Index, Target};
use crate::metrics::Metrics;
use crate::routes::{self, Resolved, Tables};
use crate::watch::Snapshot as Objects;

/// From TCP accept to a finished TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// HTTP/2 pings on a connection: a proxy whose node vanished (no FIN, no RST) is noticed within
/// interval + timeout and its streams dropped.
const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// Streams one connection may hold: a proxy opens one per target it talks to, over one
/// connection; far more than a pod's targets, well under what would hurt the server.
const MAX_STREAMS_PER_CONNECTION: u32 = 10_000;
/// How long to wait before accepting again after `accept` fails (e.g. out of file descriptors).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// One index, built from one reading of the sources.
#[derive(Debug)]
pub struct Published {
    pub index: Index,
    /// Counts the indexes published, from 0 for the first.
    pub generation: u64,
    /// The route tables of this index, resolved as streams ask for them.
    pub tables: Tables,
}

/// Which streams still have to see the newest index, for `remora_control_push_duration_seconds`.
#[derive(Debug, Default)]
struct Rounds {
    /// Open streams.
    watches: usize,
    /// The newest index published.
    generation: u64,
    /// Streams open when it was published that have not yet written (or skipped) their snapshot.
    remaining: usize,
    /// When the change behind it was seen; `None` once every stream had it (or there was none).
    seen: Option<Instant>,
}

/// The index every stream reads, and the bookkeeping of who has seen which.
#[derive(Debug)]
pub struct Hub {
    published: watch::Sender<Arc<Published>>,
    // Registration and publication take this lock so a stream counts in exactly the rounds
    // published after it subscribed.
    rounds: Mutex<Rounds>,
    metrics: Arc<Metrics>,
}

impl Hub {
    /// Builds the index from what `source` holds now, then rebuilds it on each change of
    /// `source` until `source` closes. Must be called inside a tokio runtime.
    pub async fn start(
        mut source: watch::Receiver<Arc<Objects>>,
        metrics: Arc<Metrics>,
    ) -> Arc<Hub> {
        let first = source.borrow_and_update().clone();
        let index = build(first, None, &metrics).await;
        let (published, _) = watch::channel(Arc::new(Published {
            index,
            generation: 0,
            tables: Tables::default(),
        }));
        let hub = Arc::new(Hub {
            published,
            rounds: Mutex::new(Rounds::default()),
            metrics,
        });
        let indexer = Arc::clone(&hub);
        tokio::spawn(async move {
            while source.changed().await.is_ok() {
                let seen = Instant::now();
                let objects = source.borrow_and_update().clone();
                // From the index published last: only the Services that changed are computed.
                let index = build(objects, Some(indexer.current()), &indexer.metrics).await;
                let previous = indexer.publish(index, seen);
                // Freeing a large index takes milliseconds: not on the workers the streams
                // need now.
                tokio::task::spawn_blocking(move || drop(previous));
            }
        });
        hub
    }

    fn rounds(&self) -> std::sync::MutexGuard<'_, Rounds> {
        self.rounds.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Publishes a new index; returns the previous one, to be dropped outside the lock.
    fn publish(&self, index: Index, seen: Instant) -> Arc<Published> {
        let mut rounds = self.rounds();
        rounds.generation += 1;
        // A stream that had not yet caught up with the last change gets it with this one: the
        // older change is the one still waiting.
        if rounds.remaining == 0 || rounds.seen.is_none() {
            rounds.seen = Some(seen);
        }
        rounds.remaining = rounds.watches;
        if rounds.remaining == 0 {
            rounds.seen = None;
        }
        let generation = rounds.generation;
        let tables = Tables::after(&self.published.borrow().tables);
        self.published.send_replace(Arc::new(Published {
            index,
            generation,
            tables,
        }))
    }

    /// The newest index.
    pub fn current(&self) -> Arc<Published> {
        self.published.borrow().clone()
    }

    /// A stream opens: its receiver, marked as having seen the current index.
    fn join(&self) -> watch::Receiver<Arc<Published>> {
        let mut rounds = self.rounds();
        rounds.watches += 1;
        self.metrics.watch_opened();
        self.published.subscribe()
    }

    /// A stream has written (or found unchanged) its snapshot of index `generation`.
    fn caught_up(&self, generation: u64) {
        let mut rounds = self.rounds();
        if generation == rounds.generation {
            self.one_less(&mut rounds);
        }
    }

    /// A stream closes, having caught up to `generation`.
    fn leave(&self, generation: u64) {
        let mut rounds = self.rounds();
        rounds.watches -= 1;
        self.metrics.watch_closed();
        if generation < rounds.generation {
            self.one_less(&mut rounds);
        }
    }

    fn one_less(&self, rounds: &mut Rounds) {
        if rounds.remaining == 0 {
            return;
        }
        rounds.remaining -= 1;
        if rounds.remaining == 0 {
            if let Some(seen) = rounds.seen.take() {
                self.metrics.pushed(seen.elapsed());
            }
        }
    }
}

/// Builds an index on a blocking thread, from `previous` when there is one: a whole build of
/// 10,000 Services takes tens of milliseconds, an update after one change a few.
async fn build(
    objects: Arc<Objects>,
    previous: Option<Arc<Published>>,
    metrics: &Metrics,
) -> Index {
    metrics.set_objects(&objects.objects);
    let started = Instant::now();
    let built = tokio::task::spawn_blocking(move || match previous {
        Some(previous) => previous.index.update(&objects.objects),
        None => Index::build(&objects.objects),
    })
    .await;
    match built {
        Ok(index) => {
            tracing::info!(
                targets = index.len(),
                took_ms = started.elapsed().as_secs_f64() * 1e3,
                "index built"
            );
            index
        }
        // Index::build does not panic on any input it is given; were it to, serving nothing
        // would be worse than the panic's message and an empty index.
        Err(error) => {
            tracing::error!(%error, "building the index failed; serving an empty one");
            Index::default()
        }
    }
}

/// Parses a `WatchRequest.target`: `IP:port`, an IPv6 address in brackets.
pub fn parse_target(text: &str) -> Result<SocketAddr, Status> {
    text.parse().map_err(|_| {
        Status::invalid_argument(format!(
            "target {text:?} is not an IP address and port (expected e.g. 10.96.0.10:80 or [fd00::10]:80)"
        ))
    })
}

/// The snapshot a client in namespace `client_namespace` gets for `target`, its route table
/// resolved on the spot (a stream shares one resolution with the others: [`Tables`]).
pub fn snapshot_for(index: &Index, target: SocketAddr, client_namespace: &str) -> pb::Snapshot {
    let view = match index.lookup(target) {
        None => View::Passthrough(index.pod_identity(target).cloned()),
        Some(found) => View::Service {
            resolved: Arc::new(routes::resolve(
                index,
                &found.service,
                found.port,
                client_namespace,
            )),
            service: service(found),
        },
    };
    view.snapshot()
}

/// What a stream answers from one published index, before it is written out.
#[derive(Debug, Clone)]
enum View {
    /// With the identity of the meshed pod whose own address the target is.
    Passthrough(Option<Arc<str>>),
    Service {
        /// Without its routes and route table, which `resolved` holds.
        service: Box<pb::Service>,
        resolved: Arc<Resolved>,
    },
}

impl View {
    fn of(published: &Published, target: SocketAddr, client_namespace: &str) -> Self {
        match published.index.lookup(target) {
            None => View::Passthrough(published.index.pod_identity(target).cloned()),
            Some(found) => View::Service {
                resolved: published.tables.get(
                    &published.index,
                    &found.service,
                    found.port,
                    client_namespace,
                ),
                service: service(found),
            },
        }
    }

    fn snapshot(&self) -> pb::Snapshot {
        let kind = match self {
            View::Passthrough(identity) => Kind::Passthrough(pb::Passthrough {
                identity: identity.as_deref().unwrap_or_default().to_string(),
            }),
            View::Service { service, resolved } => Kind::Service(pb::Service {
                routes: resolved.routes.clone(),
                route_table: Some(resolved.table.clone()),
                ..(**service).clone()
            }),
        };
        pb::Snapshot { kind: Some(kind) }
    }
}

/// Equal when they write the same snapshot; a table shared by both is not compared field by
/// field.
impl PartialEq for View {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (View::Passthrough(identity), View::Passthrough(other)) => identity == other,
            (
                View::Service { service, resolved },
                View::Service {
                    service: other_service,
                    resolved: other_resolved,
                },
            ) => {
                service == other_service
                    && (Arc::ptr_eq(resolved, other_resolved) || resolved == other_resolved)
            }
            _ => false,
        }
    }
}

/// A Service target's own part of a snapshot: all but its routes.
fn service(target: &Target) -> Box<pb::Service> {
    Box::new(pb::Service {
        namespace: target.service.namespace.clone(),
        name: target.service.name.clone(),
        port: u32::from(target.port),
        port_name: target.port_name.clone().unwrap_or_default(),
        app_protocol: target.app_protocol.clone().unwrap_or_default(),
        endpoints: target.endpoints.iter().map(routes::endpoint).collect(),
        routes: Vec::new(),
        route_table: None,
        policy: Some((*target.policy).clone()),
    })
}

/// The Discovery gRPC service.
#[derive(Debug, Clone)]
pub struct DiscoveryService {
    hub: Arc<Hub>,
}

impl DiscoveryService {
    pub fn new(hub: Arc<Hub>) -> Self {
        Self { hub }
    }
}

/// One open Watch: what it watches and what it last wrote. Dropping it closes the stream.
struct WatchState {
    hub: Arc<Hub>,
    published: watch::Receiver<Arc<Published>>,
    target: SocketAddr,
    namespace: String,
    /// The snapshot to write before waiting for changes: the first one.
    first: Option<pb::Snapshot>,
    last: View,
    /// The newest index this stream has answered for.
    generation: u64,
    /// A snapshot of this generation was handed to the connection; it has been taken when the
    /// stream is polled again.
    handed_over: Option<u64>,
}

impl Drop for WatchState {
    fn drop(&mut self) {
        let generation = match self.handed_over {
            // Handed over but never taken: not written.
            Some(_) => self.generation.saturating_sub(1),
            None => self.generation,
        };
        self.hub.leave(generation);
    }
}

impl WatchState {
    /// The next snapshot to write; `None` when the index will never change again.
    async fn next(&mut self) -> Option<pb::Snapshot> {
        if let Some(first) = self.first.take() {
            self.hub.metrics.snapshot_sent();
            return Some(first);
        }
        if let Some(generation) = self.handed_over.take() {
            self.hub.caught_up(generation);
        }
        loop {
            self.published.changed().await.ok()?;
            let published = self.published.borrow_and_update().clone();
            let view = View::of(&published, self.target, &self.namespace);
            self.generation = published.generation;
            if view != self.last {
                let snapshot = view.snapshot();
                self.last = view;
                self.handed_over = Some(published.generation);
                self.hub.metrics.snapshot_sent();
                return Some(snapshot);
            }
            self.hub.caught_up(published.generation);
        }
    }
}

type SnapshotStream = Pin<Box<dyn Stream<Item = Result<pb::Snapshot, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl Discovery for DiscoveryService {
    type WatchStream = SnapshotStream;

    async fn watch(
        &self,
        request: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let request = request.into_inner();
        let target = parse_target(&request.target)?;
        let published = self.hub.join();
        let current = published.borrow().clone();
        let first = View::of(&current, target, &request.namespace);
        tracing::debug!(
            target = %target, namespace = request.namespace, pod = request.pod,
            "watch opened"
        );
        let state = WatchState {
            hub: Arc::clone(&self.hub),
            published,
            target,
            namespace: request.namespace,
            first: Some(first.snapshot()),
            last: first,
            generation: current.generation,
            handed_over: None,
        };
        let stream = futures_util::stream::unfold(state, |mut state| async move {
            let snapshot = state.next().await?;
            Some((Ok(snapshot), state))
        });
        Ok(Response::new(Box::pin(stream)))
    }
}

/// Serves the Discovery service on `listener` (over TLS when `tls` is given) until `shutdown`
/// completes. Each connection gets its own task; a peer that is slow to handshake or sends
/// garbage only ever costs its own.
pub async fn serve(
    listener: TcpListener,
    hub: Arc<Hub>,
    tls: Option<TlsAcceptor>,
    shutdown: impl Future<Output = ()>,
) {
    serve_routes(listener, routes(hub), tls, shutdown).await;
}

/// The gRPC services on one port: Discovery; the caller adds others (remora-control's
/// Identity) with `add_service`.
pub fn routes(hub: Arc<Hub>) -> tonic::service::Routes {
    tonic::service::Routes::new(DiscoveryServer::new(DiscoveryService::new(hub)))
}

/// [`serve`] with the services given.
pub async fn serve_routes(
    listener: TcpListener,
    routes: tonic::service::Routes,
    tls: Option<TlsAcceptor>,
    shutdown: impl Future<Output = ()>,
) {
    let routes = routes.prepare();
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    let _ = tcp.set_nodelay(true);
                    let routes = routes.clone();
                    let tls = tls.clone();
                    connections.spawn(async move {
                        match tls {
                            None => connection(tcp, peer, routes).await,
                            Some(acceptor) => {
                                let handshake = tokio::time::timeout(
                                    TLS_HANDSHAKE_TIMEOUT,
                                    acceptor.accept(tcp),
                                );
                                match handshake.await {
                                    Ok(Ok(stream)) => connection(stream, peer, routes).await,
                                    Ok(Err(error)) => {
                                        tracing::debug!(%peer, %error, "TLS handshake failed");
                                    }
                                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                                }
                            }
                        }
                    });
                }
                Err(error) => {
                    tracing::warn!(%error, "accepting a connection");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
            // Reap finished connection tasks so the set only holds open ones.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    // Dropping the set aborts the open connections and with them their streams.
}

async fn connection<IO>(io: IO, peer: SocketAddr, routes: tonic::service::Routes)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .keep_alive_interval(KEEP_ALIVE_INTERVAL)
        .keep_alive_timeout(KEEP_ALIVE_TIMEOUT)
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION);
    let served = builder
        .serve_connection(TokioIo::new(io), TowerToHyperService::new(routes))
        .await;
    if let Err(error) = served {
        tracing::debug!(%peer, %error, "connection closed with an error");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_ip_and_port_with_v6_in_brackets() {
        // (case, text, expected; None = InvalidArgument)
        let cases: [(&str, &str, Option<&str>); 8] = [
            ("v4", "10.96.0.10:80", Some("10.96.0.10:80")),
            ("v6 in brackets", "[fd00::10]:8080", Some("[fd00::10]:8080")),
            (
                "v4-mapped v6",
                "[::ffff:10.0.0.1]:80",
                Some("[::ffff:10.0.0.1]:80"),
            ),
            ("no port", "10.96.0.10", None),
            ("v6 without brackets", "fd00::10:80", None),
            ("a name", "web.shop.svc:80", None),
            ("port out of range", "10.96.0.10:65536", None),
            ("empty", "", None),
        ];
        for (case, text, expected) in cases {
            match (parse_target(text), expected) {
                (Ok(addr), Some(expected)) => assert_eq!(addr.to_string(), expected, "{case}"),
                (Err(status), None) => {
                    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{case}");
                    assert!(status.message().contains(&format!("{text:?}")), "{case}");
                }
                (got, _) => panic!("{case}: {got:?}"),
            }
        }
    }
}
