//! meter-sync: a store-and-forward sync daemon for meter gateways.
//!
//! # Layout
//!
//! Dependencies point one way: `commands` → `daemon` → `cycle` → `upload` /
//! `download` → `lock` → `db` → `tls` → `config` → `error`; `report` is a leaf
//! every layer may use. Modules are private: what the binary needs is re-exported
//! below, so the compiler reports whatever nothing uses.
//!
//! - `cli`: the commands and their help text.
//! - `config`: every variable in one list, validated in one pass into a `Config`.
//! - `error`: the error type, with side (local, central) and transient/permanent.
//! - `db`: connecting (socket or TCP, TLS), timeouts on every round trip, backoff.
//! - `tls`: libpq's sslmode semantics on the compiled-in TLS library.
//! - `migrate`: embedded, checksummed migrations.
//! - `lock`: the cycle lock; `LockedLocal` is the only way to a locked local connection.
//! - `upload`: readings local → central, batch by batch, exactly once.
//! - `download`: meters and tenants central → local with field-level change logs.
//! - `report`: `Phase::ALL`, `PhaseOutcome`, `CycleReport`.
//! - `cycle`: one cycle of the three phases, each isolated, each in `sync_logs`.
//! - `heartbeat`: this gateway's row in central's `gateway_status` after every cycle.
//! - `daemon`: the run loop.
//! - `commands`: what each command does.
//! - `shutdown`: the shutdown signal every wait races against.
//! - `notify`: systemd READY / WATCHDOG / STATUS / STOPPING.
//! - `logging`: syslog or stderr (sd-daemon priorities on the journal), one line per record.
//! - `metrics`: the Prometheus textfile written after every cycle.
//! - `retention`: `sync_logs` older than `SYNC_LOGS_RETAIN_DAYS` pruned in small batches.
//! - `status`: the `status` command.
//! - `utc`: calendar dates in UTC for log stamps and `status` (a leaf).

#![forbid(unsafe_code)]

mod cli;
mod commands;
mod config;
mod cycle;
mod daemon;
mod db;
mod download;
mod error;
mod heartbeat;
mod lock;
mod logging;
mod metrics;
mod migrate;
mod notify;
mod report;
mod retention;
mod shutdown;
mod status;
mod tls;
mod upload;
mod utc;

pub use cli::{parse as parse_args, Command, HELP};
pub use commands::execute;
pub use config::{Config, ConfigError, ALL_VARS};
pub use error::{Error, Kind};
pub use logging::{init as init_logging, print_error, repeat_error};
pub use tls::{check_files, BACKEND as TLS_BACKEND};
