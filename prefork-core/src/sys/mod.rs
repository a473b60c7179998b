//! The only modules with `unsafe` (the crate root denies it everywhere
//! else). Each function wraps one OS facility, split by resource; every
//! `unsafe` block says why it is sound.
//!
//! * [`signals`]: dispositions, the self-pipe handler, the worker's flags;
//! * [`process`]: fork, _exit, inherited descriptors;
//! * [`shm`]: memory shared with the workers, and the contract
//!   ([`ZeroValidAtomic`]) that makes viewing it as atomics sound;
//! * [`sockopt`]: TCP socket options socket2 does not wrap.

pub mod process;
pub mod shm;
pub mod signals;
pub mod sockopt;

pub use process::{
    adopt_fd, drop_capability_bounding_set, exit_now, fork, set_inheritable, thread_count, Forked,
};
pub use shm::{page_size, CacheLine, SharedMap, ZeroValidAtomic};
pub use signals::{
    install_master_handlers, request_worker_quit, reset_signals_for_exec, reset_signals_for_worker,
    set_last_words, take_worker_reopen, unblock_all_signals, worker_quit_requested,
};
pub use sockopt::{drop_new_connections, set_tcp_defer_accept, tcp_accept_queue, tcp_defer_accept};
