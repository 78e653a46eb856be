//! Spreading accepted connections evenly over the worker threads.
//!
//! Each worker accepts on listeners of its own (SO_REUSEPORT), and the kernel picks one by a
//! hash of the connection's addresses: 50 connections land 30/20 as easily as 25/25, and a
//! long-lived connection stays where it landed. The busier worker then holds up its share of
//! the clients while the other has time to spare (in the throughput bench, 50 connections
//! spread evenly served 4.6% more requests a second than hashed ones). So a worker that
//! accepts a connection while it serves more than the least busy worker hands it over, and
//! only then: the usual accept costs two atomic loads and an add, and a hand-over a channel
//! send and a wake-up of the other thread (the socket joins a reactor only on the worker that
//! serves it). Envoy offers the same as its `exact_balance` option.
//!
//! No slack is left: a worker allowed to serve two more than the least busy split ten
//! connections 6/4 as often as 5/5, and under h2load's ten the fuller worker ran out of CPU
//! while the other slept (111,152 against 132,885 HTTP/2 requests a second, median of one
//! 6-round run). The price is paid by short-lived connections, which now change hands more
//! often: with a new connection per request (10 at a time) the rate stayed the same but the
//! p99 rose from 1.04 to 1.16 ms (6 rounds), most likely while a handed-over connection waits
//! behind the other worker's queued tasks (not traced).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::mpsc;

/// The connections each worker is serving or about to serve, and each worker's inbox of the
/// connections (`T`: a socket and what goes with it) handed over to it.
pub struct Workers<T> {
    counts: Arc<[AtomicUsize]>,
    inboxes: Vec<mpsc::UnboundedSender<T>>,
}

// By hand: a derived `Debug` would ask the same of every `T`, which a socket hand-over needs not.
impl<T> std::fmt::Debug for Workers<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Workers")
            .field("counts", &self.counts)
            .field("inboxes", &self.inboxes.len())
            .finish()
    }
}

/// Counts one connection against its worker until dropped.
#[derive(Debug)]
pub struct Assigned {
    counts: Arc<[AtomicUsize]>,
    worker: usize,
}

impl Drop for Assigned {
    fn drop(&mut self) {
        self.counts[self.worker].fetch_sub(1, Ordering::Relaxed);
    }
}

impl Assigned {
    /// The worker that serves the connection.
    pub fn worker(&self) -> usize {
        self.worker
    }
}

impl<T> Workers<T> {
    /// How many workers there are (at least one: a proxy without workers serves nothing).
    pub fn count(&self) -> usize {
        self.inboxes.len()
    }

    /// The workers' counts and each worker's inbox of handed-over connections.
    pub fn new(workers: usize) -> (Self, Vec<mpsc::UnboundedReceiver<T>>) {
        let (inboxes, receivers) = (0..workers).map(|_| mpsc::unbounded_channel()).unzip();
        let counts = (0..workers).map(|_| AtomicUsize::new(0)).collect();
        (Self { counts, inboxes }, receivers)
    }

    /// Assigns a connection that `worker` accepted: to `worker`, unless it serves more than the
    /// least busy worker, which then gets it.
    pub fn place(&self, worker: usize) -> Assigned {
        let load = |i: usize| self.counts[i].load(Ordering::Relaxed);
        let mine = load(worker);
        let (lightest, least) = (0..self.counts.len())
            .map(|i| (i, load(i)))
            .min_by_key(|&(_, count)| count)
            .unwrap_or((worker, mine));
        let target = if mine > least { lightest } else { worker };
        self.counts[target].fetch_add(1, Ordering::Relaxed);
        Assigned {
            counts: self.counts.clone(),
            worker: target,
        }
    }

    /// Sends a connection to `worker`'s inbox; gives it back if that worker is gone.
    pub fn hand_over(&self, worker: usize, handoff: T) -> Result<(), T> {
        self.inboxes[worker].send(handoff).map_err(|error| error.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn to(assigned: Assigned) -> (usize, Assigned) {
        (assigned.worker(), assigned)
    }

    #[test]
    fn a_worker_keeps_a_connection_only_while_no_worker_serves_fewer() {
        let (placement, _inboxes) = Workers::<()>::new(3);
        // Every connection accepted by worker 0, as a skewed hash would have it.
        let (workers, held): (Vec<usize>, Vec<Assigned>) =
            (0..9).map(|_| to(placement.place(0))).unzip();
        assert_eq!(workers, [0, 1, 2, 0, 1, 2, 0, 1, 2]);
        let counts: Vec<usize> = (0..3)
            .map(|i| placement.counts[i].load(Ordering::Relaxed))
            .collect();
        assert_eq!(counts, [3, 3, 3]);
        drop(held);
        assert!(placement
            .counts
            .iter()
            .all(|c| c.load(Ordering::Relaxed) == 0));
    }

    #[test]
    fn a_finished_connection_frees_its_place() {
        let (workers, _inboxes) = Workers::<()>::new(2);
        let (_, first) = to(workers.place(0));
        let (second_worker, _second) = to(workers.place(0));
        assert_eq!(second_worker, 1);
        drop(first);
        // Worker 0 serves none again, so worker 1 hands over its next connection.
        let (next, _next) = to(workers.place(1));
        assert_eq!(next, 0);
    }

    #[test]
    fn one_worker_keeps_everything() {
        let (workers, _inboxes) = Workers::<()>::new(1);
        let held: Vec<_> = (0..5).map(|_| to(workers.place(0))).collect();
        assert!(held.iter().all(|(worker, _)| *worker == 0));
    }
}
