//! This worker's idle upstream HTTP/1 connections, by [`Endpoint`], and their sweep.

use std::cell::RefCell;
use std::collections::HashMap;
use std::time::{Duration, Instant};

use foldhash::fast::RandomState;

use super::h1::Conn;
use super::Endpoint;

/// How long an idle upstream HTTP/1 connection stays in the shared pool. Below the idle
/// timeouts of common servers (nginx 75 s, Go 90 s; Node.js 5 s is covered by the retry of
/// requests that a closing connection never took).
const POOL_IDLE: Duration = Duration::from_secs(4);
/// Idle upstream connections kept per endpoint.
const POOL_PER_ENDPOINT: usize = 32;

thread_local! {
    /// This worker thread's idle upstream HTTP/1 connections by endpoint. Each worker is a
    /// single-threaded runtime whose connections never leave it, so a per-worker pool needs no
    /// lock and every connection it hands out is driven by the same thread. Touched when a
    /// client connection needs its first upstream connection and when it closes, and per
    /// request when a Service's requests are balanced over its endpoints (the connection to the
    /// last one goes back; the one to the next comes out).
    static POOL: RefCell<HashMap<Endpoint, Vec<Idle>, RandomState>> = RefCell::new(HashMap::default());
}

/// An upstream connection waiting in the pool, and since when.
type Idle = (Conn, Instant);

/// A usable pooled connection to `endpoint`, if this worker has one.
pub fn checkout(endpoint: &Endpoint) -> Option<Conn> {
    POOL.with_borrow_mut(|idle| {
        // An emptied list stays for the next checkin (the sweep drops it): a balanced client
        // connection moves between endpoints request by request, through here.
        let list = idle.get_mut(endpoint)?;
        while let Some((conn, since)) = list.pop() {
            if since.elapsed() < POOL_IDLE && conn.is_usable() {
                return Some(conn);
            }
        }
        None
    })
}

/// Keeps `conn`, a connection to `endpoint`, for the next request to it, if still usable.
pub fn checkin(endpoint: &Endpoint, mut conn: Conn) {
    if !conn.is_usable() {
        return;
    }
    conn.shrink();
    // `try_with`: a connection dropped while the thread exits finds the pool already gone.
    let _ = POOL.try_with(|idle| {
        let mut idle = idle.borrow_mut();
        // The key is cloned only for an endpoint with no list yet.
        let Some(list) = idle.get_mut(endpoint) else {
            idle.insert(endpoint.clone(), vec![(conn, Instant::now())]);
            return;
        };
        if list.len() < POOL_PER_ENDPOINT {
            list.push((conn, Instant::now()));
        }
    });
}

/// Drops this worker's expired and closed pooled connections every [`POOL_IDLE`], so idle
/// sockets do not linger. Runs on each worker thread.
pub async fn sweep_forever() {
    let mut tick = tokio::time::interval(POOL_IDLE);
    loop {
        tick.tick().await;
        POOL.with_borrow_mut(|idle| {
            idle.retain(|_, list| {
                list.retain(|(conn, since)| since.elapsed() < POOL_IDLE && conn.is_usable());
                !list.is_empty()
            });
        });
        super::h2::sweep_shared();
    }
}
