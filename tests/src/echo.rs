//! An HTTP/1.1 and HTTP/2 (prior knowledge) server that answers every request with its own name:
//! the endpoints behind a Service, so a test (or the demo) can count which one answered.
//!
//! `/sleep/<ms>[/…]` answers after that many milliseconds, on top of the server's own delay.
//! [`Backend`] runs one inside a namespace on a thread of its own and can be killed as a process
//! would be: the listener and every connection closed at once, requests in flight unanswered.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};

use crate::NetNs;

/// What one server has seen.
#[derive(Debug, Default, Clone)]
pub struct Stats {
    /// Requests that reached the handler (including those after a kill, never answered).
    pub received: usize,
    /// Requests whose answer the handler returned.
    pub answered: usize,
    /// Requests in the handler when the server was killed.
    pub in_flight_at_kill: usize,
    /// When each request arrived, in order.
    pub arrivals: Vec<Instant>,
    killed: bool,
}

impl Stats {
    /// Requests received and never answered: the ones a client may have seen fail.
    pub fn unanswered(&self) -> usize {
        self.received - self.answered
    }

    /// Requests that arrived at or after `since`.
    pub fn arrived_since(&self, since: Instant) -> usize {
        self.arrivals.iter().filter(|&&at| at >= since).count()
    }
}

/// One echo server's identity and behaviour.
#[derive(Debug)]
pub struct Echo {
    pub name: String,
    /// Added to every request.
    pub delay: Duration,
    stats: Mutex<Stats>,
}

impl Echo {
    pub fn new(name: impl Into<String>, delay: Duration) -> Arc<Self> {
        Arc::new(Self {
            name: name.into(),
            delay,
            stats: Mutex::new(Stats::default()),
        })
    }

    pub fn stats(&self) -> Stats {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Stats> {
        self.stats.lock().unwrap_or_else(PoisonError::into_inner)
    }

    async fn answer(&self, request: Request<Incoming>) -> Response<Full<Bytes>> {
        let sleep = request
            .uri()
            .path()
            .strip_prefix("/sleep/")
            .and_then(|rest| rest.split('/').next()?.parse().ok())
            .map(Duration::from_millis)
            .unwrap_or_default();
        let killed = {
            let mut stats = self.lock();
            stats.received += 1;
            stats.arrivals.push(Instant::now());
            stats.killed
        };
        if killed {
            // A dead server answers nothing; the runtime going away drops this future.
            std::future::pending::<()>().await;
        }
        let _ = request.into_body().collect().await;
        tokio::time::sleep(self.delay + sleep).await;
        self.lock().answered += 1;
        Response::new(Full::new(Bytes::from(format!("{}\n", self.name))))
    }
}

/// Serves `listener` until the future is dropped; every connection is a task of the runtime.
pub async fn serve(listener: tokio::net::TcpListener, echo: Arc<Echo>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let echo = Arc::clone(&echo);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let echo = Arc::clone(&echo);
                async move { Ok::<_, Infallible>(echo.answer(request).await) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// An echo server running inside a namespace, on its own thread and runtime.
pub struct Backend {
    pub addr: SocketAddr,
    pub echo: Arc<Echo>,
    kill: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Backend {
    /// Binds `addr` inside `ns` (so the port is open when this returns) and serves it.
    pub fn start(ns: &NetNs, addr: SocketAddr, echo: Arc<Echo>) -> Result<Self> {
        let listener = ns
            .run_in(move || std::net::TcpListener::bind(addr))?
            .with_context(|| format!("binding {addr} in {}", ns.name()))?;
        listener.set_nonblocking(true)?;
        let (kill, killed) = tokio::sync::oneshot::channel::<()>();
        let served = Arc::clone(&echo);
        let thread = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            runtime.block_on(async move {
                let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                    return;
                };
                tokio::select! {
                    () = serve(listener, served) => {}
                    _ = killed => {}
                }
            });
            // Dropping the runtime drops every connection task: their sockets close, as a
            // killed process's would.
            drop(runtime);
        });
        Ok(Self {
            addr,
            echo,
            kill: Some(kill),
            thread: Some(thread),
        })
    }

    pub fn name(&self) -> &str {
        &self.echo.name
    }

    pub fn stats(&self) -> Stats {
        self.echo.stats()
    }

    /// Kills the server: from now on nothing is answered, and when this returns its listener
    /// and every connection are closed. Returns its stats at the moment of the kill.
    pub fn kill(&mut self) -> Stats {
        let at_kill = {
            let mut stats = self.echo.lock();
            stats.killed = true;
            stats.in_flight_at_kill = stats.received - stats.answered;
            stats.clone()
        };
        if let Some(kill) = self.kill.take() {
            let _ = kill.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        at_kill
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.kill();
    }
}
