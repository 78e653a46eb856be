//! Idle upstream connections by [`Endpoint`], kept for the next request to the same endpoint,
//! and their expiry. The store alone: each worker's HTTP/1 pool is one of these in a
//! thread-local of [`super::h1`], which also puts a connection back when its response is done.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use foldhash::fast::RandomState;

use super::Endpoint;

/// How long an idle upstream connection stays in a pool. Below the idle timeouts of common
/// servers (nginx 75 s, Go 90 s; Node.js 5 s is covered by the retry of requests that a closing
/// connection never took).
pub const POOL_IDLE: Duration = Duration::from_secs(4);
/// Idle upstream connections kept per endpoint.
const POOL_PER_ENDPOINT: usize = 32;

/// A connection a pool can keep.
pub trait Reusable {
    /// Whether it can take another request (the server has not closed it, nor sent anything).
    fn is_usable(&self) -> bool;
    /// Drops what it need not hold while idle.
    fn shrink(&mut self);
}

/// Idle connections by endpoint, each with the time it came back.
#[derive(Debug)]
pub struct Pool<C> {
    idle: HashMap<Endpoint, Vec<(C, Instant)>, RandomState>,
}

impl<C> Default for Pool<C> {
    fn default() -> Self {
        Self {
            idle: HashMap::default(),
        }
    }
}

impl<C: Reusable> Pool<C> {
    /// A usable idle connection to `endpoint`, if there is one.
    pub fn checkout(&mut self, endpoint: &Endpoint) -> Option<C> {
        // An emptied list stays for the next checkin (the sweep drops it): a balanced client
        // connection moves between endpoints request by request, through here.
        let list = self.idle.get_mut(endpoint)?;
        while let Some((conn, since)) = list.pop() {
            if since.elapsed() < POOL_IDLE && conn.is_usable() {
                return Some(conn);
            }
        }
        None
    }

    /// Keeps `conn`, a connection to `endpoint`, for the next request to it, if still usable.
    pub fn checkin(&mut self, endpoint: &Endpoint, mut conn: C) {
        if !conn.is_usable() {
            return;
        }
        conn.shrink();
        // The key is cloned only for an endpoint with no list yet.
        let Some(list) = self.idle.get_mut(endpoint) else {
            self.idle
                .insert(endpoint.clone(), vec![(conn, Instant::now())]);
            return;
        };
        if list.len() < POOL_PER_ENDPOINT {
            list.push((conn, Instant::now()));
        }
    }

    /// Drops the expired and closed connections, and the endpoints left with none.
    pub fn sweep(&mut self) {
        self.idle.retain(|_, list| {
            list.retain(|(conn, since)| since.elapsed() < POOL_IDLE && conn.is_usable());
            !list.is_empty()
        });
    }
}
