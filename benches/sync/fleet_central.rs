//! Section `central` of benches/sync.rs: a fleet through PgBouncer into a small,
//! partitioned central (issue 13 item 2). Run by hand: `bench/run central`.
//!
//! N gateway daemons (`once` each, all started at once, each with its own local
//! database and backlog) → one PgBouncer (transaction pooling, pool of P) → one
//! central with `max_connections = 30` whose `meter_readings` is partitioned by
//! month and kept by pg_partman (partitions made ahead). Reported: exactly once,
//! errors (must be 0), readings/s at central, server connections used (PgBouncer's
//! pool and central's backends, sampled), how long clients waited for a server,
//! peak RSS per daemon, rows per partition (the default partition must stay empty).
//!
//! Knobs: BENCH_CENTRAL_GATEWAYS (200), BENCH_CENTRAL_BACKLOG (500 readings each),
//! BENCH_CENTRAL_POOL (10), BENCH_CENTRAL_SPREAD_S (20: the starts are spread over
//! this window; 0 starts all at once); BENCH_QUICK=1 shrinks to 20 × 200 over 2 s.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::support::pgbouncer::{PgBouncer, Settings};
use crate::support::readings::{per_partition, PARTITIONED_READINGS};
use crate::support::{self, Client, Cluster, Role, Sandbox};
use crate::{group, median, mib, progress, spawn_once, verdict, wait_all};

/// Central's `meter_readings` ([`PARTITIONED_READINGS`]) partitioned by month by
/// pg_partman.
const PARTMAN: &str = "
CREATE SCHEMA partman;
CREATE EXTENSION pg_partman SCHEMA partman;
SELECT partman.create_parent('public.meter_readings', 'timestamp', 'native', 'monthly',
                             p_premake := 6, p_start_partition := '2025-12-01');
";

fn num(name: &str, full: usize, quick: usize) -> usize {
    match std::env::var(name) {
        Ok(v) => v
            .replace(['_', ','], "")
            .parse()
            .unwrap_or_else(|_| crate::fail(&format!("{name}: {v:?} is not a number"))),
        Err(_) if std::env::var("BENCH_QUICK").is_ok_and(|v| v == "1") => quick,
        Err(_) => full,
    }
}

/// What the sampler saw at its peak.
#[derive(Default, Clone, Copy)]
struct Peak {
    /// PgBouncer's server connections for the fleet database (active + idle + used).
    pool_servers: u64,
    /// Clients PgBouncer kept waiting for a server at once.
    clients_waiting: u64,
    /// Longest wait of a client for a server, as PgBouncer reports it (s).
    max_wait_s: u64,
    /// Backends on central, all databases, as pg_stat_activity counts client backends.
    central_backends: i64,
}

pub fn central(_k: &crate::Knobs) -> String {
    let n = num("BENCH_CENTRAL_GATEWAYS", 200, 20);
    let backlog = num("BENCH_CENTRAL_BACKLOG", 500, 200);
    let pool = num("BENCH_CENTRAL_POOL", 10, 10) as u32;
    let spread = Duration::from_secs(num("BENCH_CENTRAL_SPREAD_S", 20, 2) as u64);
    progress(&format!(
        "central: {n} gateways × {backlog} readings through PgBouncer (pool {pool}) into a partitioned central"
    ));

    // Central: small on purpose.
    let central: &'static Cluster = Box::leak(Box::new(Cluster::start(Role::Central)));
    central.set_and_reload("max_connections", "30");
    central.stop();
    central.restart();
    let db = "fleet";
    central.create_db(db);
    let mut c = central.connect(db);
    c.batch_execute(PARTITIONED_READINGS).unwrap();
    c.batch_execute(PARTMAN).unwrap();

    let pb = PgBouncer::start(
        central,
        &Settings {
            default_pool_size: pool,
            // Stock is 100; every gateway holds one client connection.
            max_client_conn: (n + 50) as u32,
            ..Settings::default()
        },
    );

    // Gateways: one migrated template, copied.
    let (local, _) = support::shared();
    let template = format!("fleetc{}_tpl", std::process::id());
    local.create_db(&template);
    let mut s = Sandbox::on(local, central, &template, db);
    s.set("LOG_LEVEL", "info")
        .set("UPLOAD_TIME_BUDGET_SECONDS", 86_400)
        .unset("MAX_CONNECTION_RETRIES")
        .unset("DB_CONNECTION_TIMEOUT_MS");
    // The operator migrates central directly, then the gateways go through PgBouncer.
    s.migrate();
    s.set("POSTGRES_CLIENT_PORT", pb.port);
    seed(&mut central.connect(db));
    let gateways: Vec<String> = (0..n).map(|i| format!("{template}_gw{i}")).collect();
    for (i, g) in gateways.iter().enumerate() {
        crate::create_from_template(local, &template, g);
        readings(&mut local.connect(g), i, backlog);
    }
    local.admin().batch_execute("CHECKPOINT").unwrap();
    central.admin().batch_execute("CHECKPOINT").unwrap();

    // Sample PgBouncer's pool and central's backends while the fleet runs.
    let stop = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(Mutex::new(Peak::default()));
    let sampler = {
        let (stop, peak) = (stop.clone(), peak.clone());
        let pb_dir = pb.dir.clone();
        let pb_port = pb.port;
        let mut admin = central.admin();
        std::thread::spawn(move || {
            let console = Console {
                dir: pb_dir,
                port: pb_port,
            };
            while !stop.load(Ordering::Relaxed) {
                let (servers, waiting, wait_s) = console.pool(db);
                let backends: i64 = admin
                    .query_one(
                        "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'",
                        &[],
                    )
                    .map(|r| r.get(0))
                    .unwrap_or(0);
                let mut p = peak.lock().unwrap();
                p.pool_servers = p.pool_servers.max(servers);
                p.clients_waiting = p.clients_waiting.max(waiting);
                p.max_wait_s = p.max_wait_s.max(wait_s);
                p.central_backends = p.central_backends.max(backends);
                drop(p);
                std::thread::sleep(Duration::from_millis(200));
            }
        })
    };

    // Starts spread over a window, as a fleet's cycles are (each gateway's clock
    // and interval are its own): all at once, 200 TLS handshakes and SCRAM
    // exchanges queue in PgBouncer's single thread (see docs/central.md).
    let t0 = Instant::now();
    let children: Vec<_> = gateways
        .iter()
        .enumerate()
        .map(|(i, g)| {
            let at = spread.mul_f64(i as f64 / n as f64);
            if let Some(wait) = at.checked_sub(t0.elapsed()) {
                std::thread::sleep(wait);
            }
            let mut env = s.env.clone();
            env.insert("POSTGRES_SYNC_DB".into(), g.clone());
            spawn_once(&s, &env, &format!("central-{i}"))
        })
        .collect();
    let done = wait_all(children);
    let wall = t0.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    sampler.join().unwrap();
    let peak = *peak.lock().unwrap();

    // Exactly once, errors, memory.
    let total = (n * backlog) as i64;
    let mut c = central.connect(db);
    let (rows, distinct): (i64, i64) = {
        let r = c
            .query_one(
                "SELECT count(*), count(DISTINCT (reading_uid, \"timestamp\")) FROM meter_readings",
                &[],
            )
            .unwrap();
        (r.get(0), r.get(1))
    };
    let parts = per_partition(&mut c);
    let in_default: i64 = parts
        .iter()
        .filter(|(p, _)| p.ends_with("_default"))
        .map(|(_, k)| k)
        .sum();
    let mut errors = 0;
    let mut failed_phases = 0;
    let mut first_error = String::new();
    let mut rss: Vec<f64> = Vec::new();
    for (r, g) in done.iter().zip(&gateways) {
        let log = r.log_text();
        let mut l = local.connect(g);
        let left: i64 = l
            .query_one("SELECT count(*) FROM meter_readings", &[])
            .unwrap()
            .get(0);
        let failed: i64 = l
            .query_one("SELECT count(*) FROM sync_logs WHERE NOT success", &[])
            .unwrap()
            .get(0);
        failed_phases += failed;
        if r.code != Some(0) || left != 0 || failed > 0 || log.contains(" ERROR ") {
            errors += 1;
            if first_error.is_empty() {
                first_error = format!(
                    "{g}: exit {:?}, {left} left, {failed} failed phases: {}",
                    r.code,
                    r.first_error()
                );
            }
        }
        rss.push(r.maxrss_kib as f64);
    }
    let exact = rows == total && distinct == total;
    progress(&format!(
        "central: {rows} of {total} rows in {wall:.1} s, {errors} gateways with errors"
    ));

    let mut o = String::new();
    let _ = writeln!(
        o,
        "### Central for a fleet: {n} gateways × {} readings → PgBouncer (transaction mode, pool {pool}) → central (max_connections 30, monthly pg_partman partitions), starts spread over {} s\n",
        group(backlog),
        spread.as_secs()
    );
    let _ = writeln!(o, "| figure | value |");
    let _ = writeln!(o, "|---|---:|");
    let _ = writeln!(
        o,
        "| readings/s at central (all readings / first start to last exit) | {} |",
        group((total as f64 / wall) as usize)
    );
    let _ = writeln!(o, "| wall time, all gateways | {wall:.1} s |");
    let _ = writeln!(
        o,
        "| central rows / distinct keys / expected | {} / {} / {} {} |",
        group(rows as usize),
        group(distinct as usize),
        group(total as usize),
        verdict(exact)
    );
    let _ = writeln!(
        o,
        "| gateways with errors / failed phases (must be 0) | {errors} / {failed_phases} |"
    );
    let _ = writeln!(
        o,
        "| peak server connections in PgBouncer's pool | {} (of {pool}) |",
        peak.pool_servers
    );
    let _ = writeln!(
        o,
        "| peak client backends on central (incl. the sampler's) | {} (of 30) |",
        peak.central_backends
    );
    let _ = writeln!(
        o,
        "| peak clients waiting for a server / longest wait | {} / {} s |",
        peak.clients_waiting, peak.max_wait_s
    );
    let _ = writeln!(
        o,
        "| peak RSS per daemon: median / largest | {} / {} |",
        mib(median(&rss) as u64),
        mib(rss.iter().cloned().fold(0.0, f64::max) as u64)
    );
    let _ = writeln!(
        o,
        "| rows per partition | {} |",
        parts
            .iter()
            .map(|(p, k)| format!("{p}: {}", group(*k as usize)))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let _ = writeln!(
        o,
        "| rows in the default partition (must be 0) | {in_default} |"
    );
    if !first_error.is_empty() {
        let _ = writeln!(o, "\nFirst error: `{first_error}`");
    }
    let _ = writeln!(o);
    drop(pb);
    o
}

/// PgBouncer's admin console from the sampler thread.
struct Console {
    dir: std::path::PathBuf,
    port: u16,
}

impl Console {
    /// (server connections, clients waiting, longest wait in s) for `db`.
    fn pool(&self, db: &str) -> (u64, u64, u64) {
        let mut cfg = postgres::Config::new();
        cfg.host_path(&self.dir)
            .port(self.port)
            .user("postgres")
            .password(support::CENTRAL_PASSWORD)
            .dbname("pgbouncer");
        let Ok(mut c) = cfg.connect(postgres::NoTls) else {
            return (0, 0, 0);
        };
        let Ok(msgs) = c.simple_query("SHOW POOLS") else {
            return (0, 0, 0);
        };
        let mut cols: Vec<String> = Vec::new();
        for m in msgs {
            match m {
                postgres::SimpleQueryMessage::RowDescription(d) => {
                    cols = d.iter().map(|c| c.name().to_string()).collect();
                }
                postgres::SimpleQueryMessage::Row(r) if r.get(0) == Some(db) => {
                    let get = |name: &str| -> u64 {
                        cols.iter()
                            .position(|c| c == name)
                            .and_then(|i| r.get(i))
                            .and_then(|v| v.parse().ok())
                            .unwrap_or(0)
                    };
                    let servers = ["sv_active", "sv_idle", "sv_used", "sv_tested", "sv_login"]
                        .iter()
                        .map(|c| get(c))
                        .sum();
                    return (servers, get("cl_waiting"), get("maxwait"));
                }
                _ => {}
            }
        }
        (0, 0, 0)
    }
}

/// 200 meters and a few tenants, so the download phases have something to do.
fn seed(c: &mut Client) {
    c.batch_execute(
        "INSERT INTO meters (meter_id, name, location_id, meter_type, unit, configuration, updated_at)
         SELECT 'meter-' || g, 'Meter ' || g, 'loc-' || (g % 20), 'electricity', 'kWh',
                jsonb_build_object('ct', g), now()
         FROM generate_series(0, 199) g;
         INSERT INTO tenant (tenant_id, name, configuration, updated_at)
         SELECT 'tenant-' || g, 'Tenant ' || g, '{}', now() FROM generate_series(1, 5) g;",
    )
    .unwrap();
}

/// `n` readings of gateway `gw`, spread over three months (January to March 2026),
/// so that they land in three partitions.
fn readings(c: &mut Client, gw: usize, n: usize) {
    c.execute(
        "INSERT INTO meter_readings (meter_id, \"timestamp\", value, unit, metadata)
         SELECT 'meter-' || (g % 200),
                timestamptz '2026-01-01 00:00:00+00'
                    + make_interval(secs => (g::float8 * 7776000 / $1::bigint) + $2::int),
                (g * 1.5)::numeric, 'kWh',
                CASE WHEN g % 10 = 0 THEN jsonb_build_object('seq', g, 'gw', $2::int) END
         FROM generate_series(1, $1::bigint) g",
        &[&(n as i64), &(gw as i32)],
    )
    .unwrap();
}
