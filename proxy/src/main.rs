//! `remora-proxy`: the remora sidecar. Accepts the pod's redirected connections and carries them
//! to their original destinations, measuring what passes.
#![deny(unsafe_code)]

use std::io::IsTerminal;
use std::sync::atomic::Ordering;

use anyhow::Context as _;
use clap::Parser;
use tokio::signal::unix::{signal, SignalKind};
use tracing::{info, warn};
use tracing_subscriber::EnvFilter;

use remora_proxy::client;
use remora_proxy::client::connect::Keepalive;
use remora_proxy::config::{self, Args, H2Mode, LogFormat, SchedPolicy};
use remora_proxy::discover::Discovery;
use remora_proxy::metrics::{self, Metrics};
use remora_proxy::proxy::Proxy;
use remora_proxy::rate_limit::RateLimit;
use remora_proxy::runtime::workers::Workers;
use remora_proxy::runtime::{alloc, listen, sched};
use remora_proxy::{admin, identity, inbound, outbound, serve};

#[global_allocator]
static ALLOCATOR: alloc::Allocator = alloc::Allocator;

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    init_logging(&args)?;
    // Before any thread starts: the workers inherit the main thread's policy.
    if args.sched_policy == SchedPolicy::Batch {
        sched::use_batch().context("--sched-policy batch: setting SCHED_BATCH")?;
    }
    let workers = config::worker_threads(args.workers);
    let (placement, inboxes) = Workers::new(workers);
    // The admin thread's runtime also runs the control plane's watches: made first, so the
    // discovery client's channel starts on it.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the admin runtime")?;
    let metrics = Metrics::new();
    // A control plane that can't be used is loud in the log but never stops the pod: every
    // connection then goes to its original destination, as without --control (fail open).
    let control = args
        .control_config(|name| std::env::var(name).ok())
        .unwrap_or_else(|error| {
            tracing::error!(%error, "not using the control plane: every connection goes to its original destination");
            None
        });
    let discovery = match control {
        Some(control) => {
            let _entered = runtime.enter();
            info!(control = %control.addr, tls = control.trust_anchors.is_some(), namespace = %control.namespace, pod = %control.pod, "control plane");
            if control.namespace.is_empty() || control.pod.is_empty() {
                warn!("POD_NAMESPACE or POD_NAME is not set: the control plane cannot apply per-namespace routes to this pod");
            }
            match Discovery::new(control, runtime.handle().clone(), metrics.control.clone()) {
                Ok(discovery) => Some(discovery),
                Err(error) => {
                    tracing::error!(%error, "not using the control plane: every connection goes to its original destination");
                    None
                }
            }
        }
        None => None,
    };
    let inbound_rate_limit = args
        .inbound_rate_limit
        .map(|setting| RateLimit::new(setting, metrics.rate_limited.clone()));
    let proxy: &'static Proxy = Box::leak(Box::new(Proxy {
        connect_timeout: args.connect_timeout,
        keepalive: Keepalive::after(args.tcp_keepalive),
        opaque_ports: args.opaque_ports.clone(),
        proxy_ports: [args.outbound_listen.port(), args.inbound_listen.port()],
        access_log: args.access_log,
        h2_relay: args.h2_mode == H2Mode::Relay,
        metrics,
        server_first: Default::default(),
        drain: Default::default(),
        workers: placement,
        ready: Default::default(),
        discovery,
        inbound_rate_limit,
        identity: Default::default(),
        inbound_mtls: remora_proxy::inbound_mtls::Mtls {
            mode: args.inbound_mtls,
            allow_from: args.allow_from.clone(),
            probes: args.inbound_probes.clone(),
        },
    }));
    // The workload certificate comes over the control plane's channel; without one, or without
    // the token, the proxy has no identity and talks plaintext with every peer.
    match &proxy.discovery {
        Some(discovery) => {
            identity::start(
                discovery,
                &args.identity_token,
                args.identity_wait,
                &proxy.identity,
                proxy.metrics.identity_expiration.clone(),
                runtime.handle(),
            );
        }
        None => info!("no control plane: no workload identity, plaintext with every peer"),
    }

    // Thread per core: each worker is a single-threaded runtime with its own listener sockets
    // (SO_REUSEPORT), so a connection, its upstream connection and every wake-up between them
    // stay on one thread. A work-stealing runtime spent more time waking its other thread than
    // proxying.
    let mut worker_listeners = Vec::with_capacity(workers);
    for worker in 0..workers {
        let mut listeners = Vec::new();
        for (addrs, what, cx, keepalive) in [
            (
                args.outbound_addrs(),
                "outbound",
                outbound::context(proxy),
                outbound::listener_keepalive(proxy),
            ),
            (
                args.inbound_addrs(),
                "inbound",
                inbound::context(proxy),
                inbound::listener_keepalive(proxy),
            ),
        ] {
            for listener in listen::bind_all(&addrs, what, true, keepalive, worker == 0)? {
                listeners.push((listener, cx));
            }
        }
        worker_listeners.push(listeners);
    }
    let admin = listen::bind_all(&args.admin_addrs(), "admin", false, None, true)?;
    let mut accepting = Vec::with_capacity(workers);
    for (worker, (listeners, inbox)) in worker_listeners.into_iter().zip(inboxes).enumerate() {
        // Sockets and timers only: signals are the main thread's, and no worker runs a child
        // process, so each park skips the signal and child-reaping drivers.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .context("starting a worker runtime")?;
        let (closed_tx, closed_rx) = tokio::sync::oneshot::channel::<()>();
        accepting.push(closed_rx);
        std::thread::Builder::new()
            .name(format!("remora-worker-{worker}"))
            .spawn(move || {
                metrics::use_shard(worker);
                runtime.block_on(async move {
                    tokio::spawn(client::sweep_forever());
                    if proxy.discovery.is_some() {
                        tokio::spawn(outbound::sweep_forever());
                    }
                    tokio::spawn(listen::inbox_loop(inbox, serve::start));
                    let loops: Vec<_> = listeners
                        .into_iter()
                        .map(|(listener, cx)| {
                            tokio::spawn(listen::accept_loop(listener, cx, worker, serve::start))
                        })
                        .collect();
                    for accept_loop in loops {
                        let _ = accept_loop.await;
                    }
                    let _ = closed_tx.send(());
                    // Keep driving this thread's connections until the process exits.
                    std::future::pending::<()>().await
                })
            })
            .context("starting a worker thread")?;
    }

    runtime.block_on(run(args, workers, proxy, admin, accepting))
}

fn init_logging(args: &Args) -> anyhow::Result<()> {
    let mut directives = args.log_level.clone();
    if args.access_log {
        directives.push_str(",remora_proxy::access=info");
    }
    let filter = EnvFilter::try_new(&directives).with_context(|| {
        format!(
            "--log-level {:?}: expected error, warn, info, debug or trace",
            args.log_level
        )
    })?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match args.log_format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init(),
        LogFormat::Plain => builder.init(),
    }
    Ok(())
}

/// The admin listener, signals and the drain, on the main thread.
async fn run(
    args: Args,
    workers: usize,
    proxy: &'static Proxy,
    admin: Vec<std::net::TcpListener>,
    accepting: Vec<tokio::sync::oneshot::Receiver<()>>,
) -> anyhow::Result<()> {
    for listener in admin {
        let listener = tokio::net::TcpListener::from_std(listener)
            .context("registering the admin listener")?;
        tokio::spawn(admin::serve(listener, proxy));
    }
    proxy.ready.store(true, Ordering::Release);
    info!(
        outbound = %args.outbound_listen,
        inbound = %args.inbound_listen,
        admin = %args.admin_listen,
        opaque_ports = %args.opaque_ports,
        workers,
        sched_policy = ?args.sched_policy,
        h2_mode = ?args.h2_mode,
        version = env!("CARGO_PKG_VERSION"),
        "remora-proxy ready"
    );

    let mut terminate =
        signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    tokio::select! {
        _ = terminate.recv() => {}
        _ = interrupt.recv() => {}
    }

    proxy.drain.start();
    for closed in accepting {
        let _ = closed.await;
    }
    info!(
        open = proxy.drain.active(),
        limit = ?args.drain_timeout,
        "draining: listeners closed, /ready fails; waiting for open connections"
    );
    if proxy.drain.wait_idle(args.drain_timeout).await {
        info!("drained; exiting");
    } else {
        warn!(
            open = proxy.drain.active(),
            "drain timeout reached; exiting with connections still open"
        );
    }
    Ok(())
}
