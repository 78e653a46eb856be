//! `remora-proxy`: the remora sidecar. Accepts the pod's redirected connections and carries them
//! to their original destinations, measuring what passes.
#![forbid(unsafe_code)]

mod admin;
mod config;
mod connect;
mod detect;
mod drain;
mod http;
mod listen;
mod metrics;
mod opaque;
mod orig_dst;

use std::io::IsTerminal;
use std::sync::atomic::Ordering;

use anyhow::Context as _;
use clap::Parser;
use tokio::signal::unix::{signal, SignalKind};
use tracing::{info, warn};
use tracing_subscriber::EnvFilter;

use crate::config::{Args, LogFormat};
use crate::listen::{Context, Proxy};
use crate::metrics::{Direction, Metrics};

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    init_logging(&args)?;
    let workers = config::worker_threads(args.workers);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        // Nothing here blocks (no DNS, no files on the data path): a tiny blocking pool.
        .max_blocking_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(run(args, workers))
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

async fn run(args: Args, workers: usize) -> anyhow::Result<()> {
    let proxy: &'static Proxy = Box::leak(Box::new(Proxy {
        connect_timeout: args.connect_timeout,
        opaque_ports: args.opaque_ports.clone(),
        proxy_ports: [args.outbound_listen.port(), args.inbound_listen.port()],
        access_log: args.access_log,
        metrics: Metrics::new(),
        pool: Default::default(),
        drain: Default::default(),
        ready: Default::default(),
    }));

    let admin = listen::bind_all(&args.admin_addrs(), "admin")?;
    let outbound = listen::bind_all(&args.outbound_addrs(), "outbound")?;
    let inbound = listen::bind_all(&args.inbound_addrs(), "inbound")?;
    for listener in admin {
        tokio::spawn(admin::serve(listener, proxy));
    }
    let mut accepting = Vec::new();
    for (listeners, direction) in [
        (outbound, Direction::Outbound),
        (inbound, Direction::Inbound),
    ] {
        for listener in listeners {
            let cx = Context::new(proxy, direction);
            accepting.push(tokio::spawn(listen::accept_loop(listener, cx)));
        }
    }
    tokio::spawn(proxy.pool.sweep_forever());
    proxy.ready.store(true, Ordering::Release);
    info!(
        outbound = %args.outbound_listen,
        inbound = %args.inbound_listen,
        admin = %args.admin_listen,
        opaque_ports = %args.opaque_ports,
        workers,
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
    for task in accepting {
        let _ = task.await;
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
