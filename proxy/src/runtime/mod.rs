//! How a socket reaches a worker thread, and what each worker runs on: listeners, the spread of
//! connections over workers, the drain, the allocator and the scheduling policy. Nothing here
//! knows a protocol.

pub mod alloc;
pub mod drain;
pub mod listen;
pub mod sched;
pub mod workers;
