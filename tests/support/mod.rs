//! Test support: real PostgreSQL clusters, a test CA, the real `meter-sync`
//! binary, and helpers named like the spec. Each module owns one of these; this
//! file only names them and re-exports what the test files use, so that a test
//! says `use support::{Sandbox, Cluster}` without knowing where they live.
//!
//! - [`host`]: scratch directories, free ports, commands that must succeed, polling.
//! - [`certs`]: the test CA and the certificates it signs (openssl CLI).
//! - [`clock`]: a wall clock that is wrong or jumps (libfaketime) for the local
//!   server and the binary.
//! - [`cluster`]: PostgreSQL servers from one initdb'd template, the shared pair,
//!   crashes and restarts, reapers.
//! - [`sandbox`]: a test's own databases and the binary run against them.
//! - [`readings`]: collector-style inserts and readings compared column by column as text.
//! - [`proxy`]: the TCP fault proxy; [`notify`]: what systemd would receive;
//!   [`pgbouncer`] and [`replica`]: PgBouncer in front of central, streaming
//!   standbys (issue 13a); [`nspawn`]: booted systemd containers (issue 15b).

// Each test binary uses only a part of this; the rest is dead code to it.
#![allow(dead_code)]

pub mod certs;
pub mod clock;
pub mod cluster;
pub mod host;
pub mod notify;
pub mod nspawn;
pub mod pgbouncer;
pub mod proxy;
pub mod readings;
pub mod replica;
pub mod sandbox;

// The names the test files use; each test binary uses some of them.
#[allow(unused_imports)]
pub use self::{
    certs::{issue, make_ca, Certs},
    cluster::{chown_to_server, shared, Cluster, Role, CENTRAL_PASSWORD},
    host::{free_port, heavy_lock, temp_dir, wait_until},
    readings::insert_readings,
    sandbox::{bin, Daemon, Run, Sandbox},
};
#[allow(unused_imports)]
pub use postgres::Client;
