//! meter-sync: a store-and-forward sync daemon for meter gateways.
//!
//! # Layout
//!
//! - [`cli`]: the commands and their help text.
//! - [`config`]: environment variables, validated into a [`config::Config`].
//! - [`error`]: the error type, with side (local, central) and transient/permanent.
//! - [`db`]: connecting (socket or TCP, TLS), timeouts on every round trip, backoff.
//! - [`tls`]: libpq's sslmode semantics on native-tls.
//! - [`migrate`]: embedded, checksummed migrations.
//! - [`upload`]: readings local → central, batch by batch, exactly once.
//! - [`download`]: meters and tenants central → local with field-level change logs.
//! - [`cycle`]: one cycle of the three phases, each isolated, each in `sync_logs`.
//! - [`daemon`]: the run loop.
//! - [`shutdown`]: the shutdown signal every wait races against.
//! - [`notify`]: systemd READY / WATCHDOG / STATUS / STOPPING.
//! - [`logging`]: syslog or stderr.
//! - [`metrics`]: the Prometheus textfile written after every cycle.
//! - [`status`]: the `status` command.

#![forbid(unsafe_code)]

pub mod cli;
pub mod config;
pub mod cycle;
pub mod daemon;
pub mod db;
pub mod download;
pub mod error;
pub mod logging;
pub mod metrics;
pub mod migrate;
pub mod notify;
pub mod shutdown;
pub mod status;
pub mod tls;
pub mod upload;
