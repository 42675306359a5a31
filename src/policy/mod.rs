//! Tenant policies at run time: what the fleet lets each tenant spend, and how a worker shares
//! its job slots between tenants.
//!
//! - [`budget`]: spend per UTC day and month, budget held for jobs in flight (reservations),
//!   spent budgets, warning thresholds (no I/O).
//! - [`rate`]: requests and tokens per UTC minute, and whether a job may start (no I/O).
//! - [`slots`]: jobs in flight per tenant, by worker (no I/O).
//! - [`ledger`]: the shared counters in a JetStream KV bucket, each worker's copy of them,
//!   and the charges jobs add when they end.
//! - [`fair`]: weighted fair share of a worker's job slots across tenants (the pull loop in
//!   `crate::queue` parks pulled jobs there).
//!
//! Who may send which jobs (`refuse`, `task_types`) is decided when a job is decoded
//! (`crate::job`); budgets are checked when a job starts, reserved before each provider call
//! and settled when it ends (`crate::worker`).

pub(crate) mod budget;
pub(crate) mod fair;
pub(crate) mod ledger;
pub(crate) mod rate;
pub(crate) mod slots;

pub(crate) use budget::Cost;
pub(crate) use ledger::{Ledger, Reserved};
