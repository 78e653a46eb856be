//! `remora-injector serve`: the HTTPS admission webhook (axum routes on hyper, rustls).
//!
//! Each accepted connection gets its own task with its own deadlines, so a peer that is slow to
//! handshake, slow to send headers or simply idle never holds up another.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt as _;

use crate::certs::{self, CertError, ManageCertsArgs};
use crate::config::{Config, ConfigArgs, ConfigError};
use crate::metrics::{self, Metrics, ReviewResult};
use crate::review::{self, Outcome, WebhookPath};
use crate::tls::{self, CertReloader, CertResolver, TlsArgs, TlsError};
use crate::trust::TrustAnchors;
use crate::trust_reload::AnchorsReloader;

/// The largest request body accepted; the API server never sends anything near it.
pub const MAX_BODY_BYTES: usize = 8 * 1024 * 1024;

/// How long to wait before accepting again after `accept` fails (e.g. out of file descriptors),
/// so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// The flags of `remora-injector serve`.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// Address and port of the HTTPS listener.
    #[arg(
        long,
        env = "REMORA_LISTEN",
        value_name = "ADDR:PORT",
        default_value = "0.0.0.0:8443"
    )]
    pub listen: SocketAddr,

    #[command(flatten)]
    pub tls: TlsArgs,

    #[command(flatten)]
    pub config: ConfigArgs,

    #[command(flatten)]
    pub certs: ManageCertsArgs,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Certs(#[from] CertError),
    #[error("binding the webhook listener on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("installing the SIGTERM handler: {0}")]
    Signal(std::io::Error),
}

/// The deadlines that bound what one connection can hold.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// From TCP accept to a finished TLS handshake.
    pub tls_handshake: Duration,
    /// For an HTTP/1 request's headers, counted from when the connection starts waiting for
    /// them — so it also closes an HTTP/1 keep-alive connection idle this long.
    pub header_read: Duration,
    /// A connection with no request in flight for this long is closed gracefully (HTTP/2 ones
    /// especially, which have no header timeout).
    pub idle: Duration,
    /// For one request from its headers to the response, body included, so a client that
    /// trickles a body gets 408 instead of holding its connection open.
    pub request: Duration,
    /// On shutdown, how long open connections get to finish their requests.
    pub drain: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            tls_handshake: Duration::from_secs(10),
            header_read: Duration::from_secs(10),
            idle: Duration::from_secs(90),
            request: Duration::from_secs(10),
            drain: Duration::from_secs(10),
        }
    }
}

/// What the handlers share.
#[derive(Debug)]
struct AppState {
    /// Swapped whole when the trust anchors file changes.
    config: Arc<ArcSwap<Config>>,
    metrics: Arc<Metrics>,
    certs: Arc<CertResolver>,
    draining: AtomicBool,
}

/// The webhook, ready to run on a bound listener.
#[derive(Clone)]
pub struct Server {
    state: Arc<AppState>,
    router: Router,
    acceptor: TlsAcceptor,
    timeouts: Timeouts,
}

impl Server {
    /// A server that answers with `config` and presents whatever certificate `certs` holds at
    /// each handshake.
    pub fn new(
        config: Config,
        certs: Arc<CertResolver>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, TlsError> {
        let acceptor = TlsAcceptor::from(Arc::new(tls::server_config(certs.clone(), tls::ALPN)?));
        let state = Arc::new(AppState {
            config: Arc::new(ArcSwap::from_pointee(config)),
            metrics,
            certs,
            draining: AtomicBool::new(false),
        });
        let router = Router::new()
            .route("/inject", post(inject))
            .route("/inject/opt-in", post(inject_opt_in))
            .route("/healthz", get(healthz))
            .route("/readyz", get(readyz))
            .route("/metrics", get(metrics_text))
            .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
            .with_state(state.clone());
        Ok(Self {
            state,
            router,
            acceptor,
            timeouts: Timeouts::default(),
        })
    }

    /// The configuration the server answers with: whatever is stored here is used from the
    /// next review on.
    pub fn config(&self) -> Arc<ArcSwap<Config>> {
        self.state.config.clone()
    }

    pub fn with_timeouts(mut self, timeouts: Timeouts) -> Self {
        self.timeouts = timeouts;
        self
    }

    /// Serves connections from `listener` until `shutdown` completes, then stops accepting,
    /// reports not ready, and gives open connections up to [`Timeouts::drain`] to finish.
    pub async fn run(self, listener: TcpListener, shutdown: impl Future<Output = ()>) {
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut connections = JoinSet::new();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                accepted = listener.accept() => match accepted {
                    Ok((tcp, peer)) => {
                        connections.spawn(self.clone().connection(tcp, peer, stop_rx.clone()));
                    }
                    Err(error) => {
                        tracing::warn!(%error, "accepting a connection");
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                    }
                },
                // Reap finished connection tasks so the set only holds open ones.
                Some(joined) = connections.join_next(), if !connections.is_empty() => {
                    log_panic(joined);
                }
            }
        }
        self.state.draining.store(true, Ordering::SeqCst);
        drop(listener);
        // Nobody may be listening any more; that is fine.
        let _ = stop_tx.send(true);
        tracing::info!(
            open = connections.len(),
            "shutting down; draining connections"
        );
        let drained = tokio::time::timeout(self.timeouts.drain, async {
            while let Some(joined) = connections.join_next().await {
                log_panic(joined);
            }
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                open = connections.len(),
                "connections still open after the drain timeout; closing them"
            );
            connections.abort_all();
        }
    }

    /// One connection: TLS handshake under a deadline, then HTTP/1.1 or HTTP/2 until the peer
    /// closes, it idles out, or the server shuts down.
    async fn connection(self, tcp: TcpStream, peer: SocketAddr, mut stop: watch::Receiver<bool>) {
        // Responses are small and written whole; don't let Nagle hold them back.
        let _ = tcp.set_nodelay(true);
        let tls = tokio::select! {
            handshake = tokio::time::timeout(self.timeouts.tls_handshake, self.acceptor.accept(tcp)) => {
                match handshake {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(error)) => {
                        tracing::debug!(%peer, %error, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "TLS handshake timed out");
                        return;
                    }
                }
            }
            _ = stop.changed() => return,
        };

        let activity = Arc::new(Activity::new());
        let router = self.router.clone();
        let tracked = activity.clone();
        let request_timeout = self.timeouts.request;
        let service = hyper::service::service_fn(move |request| {
            let router = router.clone();
            let guard = tracked.begin();
            async move {
                let response = tokio::time::timeout(request_timeout, router.oneshot(request))
                    .await
                    .unwrap_or_else(|_| {
                        Ok((
                            StatusCode::REQUEST_TIMEOUT,
                            format!("request not received within {request_timeout:?}\n"),
                        )
                            .into_response())
                    });
                drop(guard);
                response
            }
        });

        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(self.timeouts.header_read)
            .keep_alive(true);
        builder.http2().timer(TokioTimer::new());
        let conn = builder.serve_connection(TokioIo::new(tls), service);
        tokio::pin!(conn);

        let mut ticker = tokio::time::interval(self.timeouts.idle.min(Duration::from_secs(1)));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut closing_since: Option<Instant> = None;
        loop {
            tokio::select! {
                result = conn.as_mut() => {
                    if let Err(error) = result {
                        tracing::debug!(%peer, %error, "connection ended with an error");
                    }
                    return;
                }
                _ = stop.changed(), if closing_since.is_none() => {
                    conn.as_mut().graceful_shutdown();
                    closing_since = Some(Instant::now());
                }
                _ = ticker.tick() => match closing_since {
                    None if activity.idle_for() >= self.timeouts.idle => {
                        tracing::debug!(%peer, "closing an idle connection");
                        conn.as_mut().graceful_shutdown();
                        closing_since = Some(Instant::now());
                    }
                    // A peer that will not let a graceful close finish is dropped.
                    Some(since) if since.elapsed() >= self.timeouts.drain => return,
                    _ => {}
                },
            }
        }
    }
}

fn log_panic(joined: Result<(), tokio::task::JoinError>) {
    if let Err(error) = joined {
        if error.is_panic() {
            tracing::error!(%error, "a connection task panicked");
        }
    }
}

/// Requests in flight on one connection and when the last one ended, for the idle timeout.
#[derive(Debug)]
struct Activity {
    origin: Instant,
    in_flight: AtomicUsize,
    last_millis: AtomicU64,
}

struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Activity {
    fn new() -> Self {
        Self {
            origin: Instant::now(),
            in_flight: AtomicUsize::new(0),
            last_millis: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let millis = u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_millis.store(millis, Ordering::SeqCst);
    }

    fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        self.touch();
        InFlight(self.clone())
    }

    fn idle_for(&self) -> Duration {
        if self.in_flight.load(Ordering::SeqCst) > 0 {
            return Duration::ZERO;
        }
        let last = Duration::from_millis(self.last_millis.load(Ordering::SeqCst));
        self.origin.elapsed().saturating_sub(last)
    }
}

async fn inject(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    answer_review(state, WebhookPath::Inject, body).await
}

async fn inject_opt_in(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    answer_review(state, WebhookPath::OptIn, body).await
}

/// Bodies up to this size are reviewed inline on the async worker; larger ones on the blocking
/// pool. Measured (release): a 200-container pod (35 KB) reviews in about 0.4 ms, cheaper than
/// the hop; a 7.5 MiB one takes about 110 ms, which would stall every connection on that worker.
const INLINE_REVIEW_BYTES: usize = 256 * 1024;

async fn answer_review(
    state: Arc<AppState>,
    path: WebhookPath,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let started = Instant::now();
    let body = match body {
        Ok(body) => body,
        Err(rejection) => {
            state.metrics.record(ReviewResult::Error, started.elapsed());
            tracing::warn!(status = %rejection.status(), error = %rejection.body_text(), "rejected a request body");
            return rejection.into_response();
        }
    };
    let config = state.config.load_full();
    let reviewed = if body.len() <= INLINE_REVIEW_BYTES {
        review::review(&body, path, &config)
    } else {
        let body = body.clone();
        match tokio::task::spawn_blocking(move || review::review(&body, path, &config)).await {
            Ok(reviewed) => reviewed,
            Err(error) => {
                // Only a panic in the review gets here; answer rather than drop the connection.
                tracing::error!(%error, "the review task failed");
                state.metrics.record(ReviewResult::Error, started.elapsed());
                return (StatusCode::INTERNAL_SERVER_ERROR, "review failed\n").into_response();
            }
        }
    };
    match reviewed {
        Ok(reviewed) => {
            let result = ReviewResult::from(reviewed.outcome);
            state.metrics.record(result, started.elapsed());
            log_review(path, &reviewed, started.elapsed());
            axum::Json(reviewed.response).into_response()
        }
        Err(error) => {
            state.metrics.record(ReviewResult::Error, started.elapsed());
            tracing::warn!(%error, bytes = body.len(), "rejected a request that is not an AdmissionReview");
            (StatusCode::BAD_REQUEST, error.to_string()).into_response()
        }
    }
}

/// One line per decision: injections, denials and surprising skips (those with a warning) at
/// info, routine skips (opted out, not opted in, reinvocations) at debug.
fn log_review(path: WebhookPath, reviewed: &review::Reviewed, elapsed: Duration) {
    let response = &reviewed.response["response"];
    let warnings: Vec<&str> = response["warnings"]
        .as_array()
        .map(|warnings| warnings.iter().filter_map(|w| w.as_str()).collect())
        .unwrap_or_default();
    let (path, pod) = (path.as_str(), reviewed.pod.as_str());
    let elapsed_us = elapsed.as_micros() as u64;
    match reviewed.outcome {
        Outcome::Injected => {
            tracing::info!(path, pod, ?warnings, elapsed_us, "injected")
        }
        Outcome::Denied => {
            let message = response["status"]["message"].as_str().unwrap_or_default();
            tracing::info!(path, pod, message, elapsed_us, "denied")
        }
        Outcome::Skipped => {
            let reason = reviewed.skip_reason.unwrap_or_default();
            if warnings.is_empty() {
                tracing::debug!(path, pod, reason, elapsed_us, "skipped")
            } else {
                tracing::info!(path, pod, reason, ?warnings, elapsed_us, "skipped")
            }
        }
    }
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    if state.draining.load(Ordering::SeqCst) {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response()
    } else if !state.certs.is_loaded() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "no TLS certificate loaded yet\n",
        )
            .into_response()
    } else {
        "ready\n".into_response()
    }
}

async fn metrics_text(State(state): State<Arc<AppState>>) -> Response {
    (
        [(header::CONTENT_TYPE, metrics::CONTENT_TYPE)],
        state.metrics.encode(),
    )
        .into_response()
}

/// Resolves on SIGTERM (what the kubelet sends) or SIGINT.
fn shutdown_signal() -> Result<impl Future<Output = ()>, ServeError> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate = signal(SignalKind::terminate()).map_err(ServeError::Signal)?;
    let mut interrupt = signal(SignalKind::interrupt()).map_err(ServeError::Signal)?;
    Ok(async move {
        tokio::select! {
            _ = terminate.recv() => tracing::info!("SIGTERM received"),
            _ = interrupt.recv() => tracing::info!("SIGINT received"),
        }
    })
}

/// Says at startup what injected proxies will be told about the control plane.
fn log_control_plane(config: &Config, trust_anchors_file: Option<&std::path::Path>) {
    match (
        &config.control_addr,
        &config.trust_anchors,
        trust_anchors_file,
    ) {
        (Some(control), Some(anchors), Some(file)) => tracing::info!(
            %control,
            trust_anchors = %file.display(),
            certificates = anchors.count(),
            "injected proxies get --control and REMORA_TRUST_ANCHORS"
        ),
        (Some(control), _, _) => tracing::warn!(
            %control,
            "injected proxies get --control but no trust anchors (--trust-anchors): they cannot \
             verify remora-control and forward to original destinations"
        ),
        (None, _, _) => tracing::info!(
            "no --control-addr: injected proxies forward to original destinations only"
        ),
    }
}

/// `remora-injector serve`: loads the configuration, starts watching the certificate files,
/// binds the listener and serves until SIGTERM or SIGINT.
pub async fn serve(args: ServeArgs) -> Result<(), ServeError> {
    let (mut config, trust_anchors_file) = args.config.resolve()?;
    // --manage-certs: the files are written from the Secret before anything below reads them,
    // the CA bundle (ca.crt, which --trust-anchors may name) included.
    let _cert_manager = certs::start_if_enabled(&args.certs, &args.tls.cert, &args.tls.key).await?;
    if let Some(path) = &trust_anchors_file {
        config.trust_anchors = Some(TrustAnchors::read(path).map_err(ConfigError::from)?);
    }
    log_control_plane(&config, trust_anchors_file.as_deref());
    let metrics = Arc::new(Metrics::new());
    let certs = Arc::new(CertResolver::default());
    let mut reloader =
        CertReloader::new(args.tls.files(), certs.clone()).with_observer(metrics.reload_observer());
    // The first load is synchronous so a good certificate is served from the first connection;
    // a missing one is logged and waited for (readiness says so).
    reloader.poll_and_log(true);
    tokio::spawn(reloader.run(tls::RELOAD_INTERVAL));

    let server = Server::new(config, certs, metrics)?;
    if let Some(path) = trust_anchors_file {
        let mut anchors = AnchorsReloader::new(path, server.config());
        // The first look only records the content just read.
        anchors.poll_and_log();
        tokio::spawn(anchors.run(tls::RELOAD_INTERVAL));
    }
    let shutdown = shutdown_signal()?;
    let listener = TcpListener::bind(args.listen)
        .await
        .map_err(|source| ServeError::Bind {
            addr: args.listen,
            source,
        })?;
    // The bound address, not the flag: with port 0 this says which port was chosen.
    let addr = listener.local_addr().unwrap_or(args.listen);
    tracing::info!(%addr, "serving the admission webhook over HTTPS");
    server.run(listener, shutdown).await;
    tracing::info!("stopped");
    Ok(())
}
