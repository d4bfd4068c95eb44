//! Central as a fleet runs it: behind PgBouncer in transaction pooling mode (P22),
//! with a synchronous standby (durability), and failing over to a promoted
//! standby (P23).

mod support;

use std::time::Duration;

use support::pgbouncer::{PgBouncer, Settings};
use support::readings::count_and_distinct;
use support::{shared, wait_until, Client, Cluster, Daemon, Sandbox};

/// Every column of every central reading, as text, sorted by uid: the central
/// `id` (its own sequence) and `sync_error` aside.
fn central_readings(c: &mut Client) -> Vec<Vec<Option<String>>> {
    rows_as_text(
        c,
        "SELECT reading_uid::text, meter_id::text, \"timestamp\"::text, value::text, unit::text, \
                metadata::text, created_at::text, sync_attempts::text \
         FROM meter_readings ORDER BY reading_uid",
    )
}

fn rows_as_text(c: &mut Client, sql: &str) -> Vec<Vec<Option<String>>> {
    c.batch_execute("SET TimeZone = 'UTC'; SET DateStyle = 'ISO'")
        .unwrap();
    c.query(sql, &[])
        .unwrap()
        .iter()
        .map(|r| {
            (0..r.len())
                .map(|i| r.get::<_, Option<String>>(i))
                .collect()
        })
        .collect()
}

/// Inserts `n` readings as the collector would and returns them, every column as
/// central should end up with it (read back in the same statement, so a daemon
/// already running cannot upload them before we look).
fn collect(c: &mut Client, n: usize, offset: i64) -> Vec<Vec<Option<String>>> {
    c.batch_execute("SET TimeZone = 'UTC'; SET DateStyle = 'ISO'")
        .unwrap();
    c.query(
        "INSERT INTO meter_readings (meter_id, \"timestamp\", value, unit, metadata)
         SELECT 'meter-' || (g % 50), timestamptz '2026-01-01 00:00:00+00' + make_interval(secs => (g + $2::bigint)::float8),
                (g * 1.25 + 0.001)::numeric, 'kWh',
                CASE WHEN g % 7 = 0 THEN jsonb_build_object('seq', g, 'note', 'ü \"q\"') END
         FROM generate_series(1, $1::bigint) g
         RETURNING reading_uid::text, meter_id::text, \"timestamp\"::text, value::text, unit::text,
                   metadata::text, created_at::text, sync_attempts::text",
        &[&(n as i64), &offset],
    )
    .unwrap()
    .iter()
    .map(|r| (0..r.len()).map(|i| r.get::<_, Option<String>>(i)).collect())
    .collect()
}

fn seed_meters_and_tenants(c: &mut Client) {
    c.batch_execute(
        "INSERT INTO meters (meter_id, name, location_id, meter_type, unit, configuration, updated_at)
         SELECT 'meter-' || g, 'Meter ' || g, 'loc-' || (g % 5), 'electricity', 'kWh',
                jsonb_build_object('ct', g), timestamptz '2026-01-01 00:00:00+00' + g * interval '1 min'
         FROM generate_series(0, 49) g;
         INSERT INTO tenant (tenant_id, name, configuration, metadata, updated_at)
         SELECT 'tenant-' || g, 'Tenant ' || g, '{\"tariff\": \"A\"}', NULL, timestamptz '2026-02-01 00:00:00+00'
         FROM generate_series(1, 5) g;",
    )
    .unwrap();
}

const METERS: &str = "SELECT meter_id::text, name::text, location_id::text, meter_type::text, \
     unit::text, configuration::text, updated_at::text FROM meters ORDER BY meter_id";
const TENANTS: &str = "SELECT tenant_id::text, name::text, configuration::text, metadata::text, \
     updated_at::text FROM tenant ORDER BY tenant_id";

fn pending(s: &Sandbox) -> i64 {
    s.local_count("meter_readings WHERE NOT is_synchronized AND sync_error IS NULL")
}

/// Lines of a daemon log at level ERROR (any phase that failed logs one).
fn error_lines(log: &str) -> Vec<&str> {
    log.lines().filter(|l| l.contains("ERROR")).collect()
}

/// A gateway's own local database on the shared local cluster, syncing with the
/// central database `central_db` on `central`, through `port`.
fn gateway(central: &'static Cluster, central_db: &str, port: u16, tag: &str) -> Sandbox {
    let (local, _) = shared();
    let name = format!("gw{}_{tag}", std::process::id());
    local.create_db(&name);
    let mut s = Sandbox::on(local, central, &name, central_db);
    // Connecting through PgBouncer includes waiting for one of its two server
    // connections (the read-write check runs a query): the production default,
    // not the suite's 3 s meant for unreachable hosts.
    s.set("POSTGRES_CLIENT_PORT", port)
        .set("METER_SYNC_GATEWAY_ID", &name)
        .unset("DB_CONNECTION_TIMEOUT_MS")
        .unset("MAX_CONNECTION_RETRIES");
    s
}

fn stop(d: &mut Daemon) {
    d.signal(libc::SIGTERM);
    assert!(
        d.wait_exit(Duration::from_secs(30)).is_some(),
        "daemon did not stop:\n{}",
        d.log_text()
    );
}

/// Waits until central (`c`) holds at least `n` readings: the drain is under way.
fn wait_for_the_drain(c: &mut Client, n: i64, d: &Daemon) {
    let mid = wait_until(Duration::from_secs(60), || {
        c.query_one("SELECT count(*) FROM meter_readings", &[])
            .map(|r| r.get::<_, i64>(0) >= n)
            .unwrap_or(false)
    });
    assert!(mid, "the drain never started:\n{}", d.log_text());
}

/// After a fault mid-drain (`what`): the same daemon process drains the rest
/// `within` the bound, quarantining nothing. Stops it and returns its log.
fn drained_by_the_same_process(
    s: &Sandbox,
    d: &mut Daemon,
    within: Duration,
    what: &str,
) -> String {
    let drained = wait_until(within, || pending(s) == 0);
    let still_running = d.wait_exit(Duration::from_millis(10)).is_none();
    stop(d);
    let log = d.log_text();
    assert!(drained, "{} left after {what}:\n{log}", pending(s));
    assert!(still_running, "the daemon exited:\n{log}");
    assert_eq!(
        s.local_count("meter_readings WHERE sync_error IS NOT NULL"),
        0,
        "readings were quarantined:\n{log}"
    );
    log
}

#[test]
fn p22_three_gateways_sync_through_pgbouncer_in_transaction_mode() {
    three_gateways_through_pgbouncer("p22", &Settings::default());
}

/// The same with PgBouncer handing out its two server connections in turn
/// (`server_round_robin`, both opened from the start): consecutive transactions of
/// one gateway land on different backends, so anything that outlives its
/// transaction (a named prepared statement, a session `SET`) fails every time
/// instead of only when the pool happens to be contended.
#[test]
fn p22_every_transaction_may_meet_another_backend() {
    three_gateways_through_pgbouncer(
        "p22rr",
        &Settings {
            extra: "server_round_robin = 1\nmin_pool_size = 2\n".into(),
            ..Settings::default()
        },
    );
}

fn three_gateways_through_pgbouncer(tag: &str, settings: &Settings) {
    let (_, central) = shared();
    let db = format!("{tag}_{}", std::process::id());
    central.create_db(&db);
    {
        // A database whose defaults differ from ours: what the daemon needs, it
        // must set itself, per transaction.
        let mut a = central.admin();
        a.batch_execute(&format!(
            "ALTER DATABASE \"{db}\" SET TimeZone = 'America/New_York'; \
             ALTER DATABASE \"{db}\" SET DateStyle = 'SQL, DMY'"
        ))
        .unwrap();
    }
    let pb = PgBouncer::start(central, settings);
    let gws: Vec<Sandbox> = ["a", "b", "c"]
        .iter()
        .map(|t| gateway(central, &db, pb.port, &format!("{tag}{t}")))
        .collect();
    // Schema changes through PgBouncer too (the remote one is idempotent).
    for g in &gws {
        g.migrate();
    }
    seed_meters_and_tenants(&mut central.connect(&db));

    // Readings arrive at different times: a's before its daemon starts, b's
    // while the daemons run, c's in waves.
    let mut expected = collect(&mut gws[0].local(), 1500, 0);
    let mut daemons: Vec<Daemon> = gws.iter().map(|g| g.spawn(&["run"])).collect();
    std::thread::sleep(Duration::from_millis(700));
    expected.extend(collect(&mut gws[1].local(), 1200, 10_000));
    for wave in 0..3 {
        expected.extend(collect(&mut gws[2].local(), 400, 20_000 + wave * 1000));
        std::thread::sleep(Duration::from_millis(600));
    }
    expected.extend(collect(&mut gws[0].local(), 300, 30_000));
    let total = expected.len() as i64;

    let mut c = central.connect(&db);
    let meters = rows_as_text(&mut c, METERS);
    let tenants = rows_as_text(&mut c, TENANTS);
    let done = wait_until(Duration::from_secs(60), || {
        gws.iter().all(|g| pending(g) == 0)
            && gws.iter().all(|g| {
                rows_as_text(&mut g.local(), METERS) == meters
                    && rows_as_text(&mut g.local(), TENANTS) == tenants
            })
    });
    // One more full cycle each after everything arrived, so sync_logs has rows
    // written after the last upload.
    std::thread::sleep(Duration::from_millis(1500));
    for d in &mut daemons {
        stop(d);
    }
    let logs: Vec<String> = daemons.iter().map(|d| d.log_text()).collect();
    assert!(
        done,
        "not in line within 60 s: pending {:?}\n{}",
        gws.iter().map(pending).collect::<Vec<_>>(),
        logs.join("\n----\n")
    );

    // Every reading exactly once, every column equal.
    expected.sort();
    let got = central_readings(&mut c);
    assert_eq!(
        got.len() as i64,
        total,
        "central holds {} of {total}",
        got.len()
    );
    assert!(
        got == expected,
        "central's readings differ from the collected ones"
    );

    // No failed phase, no ERROR line.
    for (g, log) in gws.iter().zip(&logs) {
        let mut l = g.local();
        let failed: i64 = l
            .query_one("SELECT count(*) FROM sync_logs WHERE NOT success", &[])
            .unwrap()
            .get(0);
        let phases: i64 = l
            .query_one("SELECT count(*) FROM sync_logs", &[])
            .unwrap()
            .get(0);
        assert!(phases >= 6, "only {phases} phases ran:\n{log}");
        assert_eq!(failed, 0, "{failed} of {phases} phases failed:\n{log}");
        assert!(error_lines(log).is_empty(), "ERROR lines:\n{log}");
        // With the default UPLOAD_METHOD=auto: PgBouncer 1.18 cannot carry batches
        // pipelined behind a COPY, so the daemon must have seen the pooler.
        assert!(
            log.contains("central answers through a connection pooler"),
            "the pooler was not detected:\n{log}"
        );
        // The heartbeat's upsert went through PgBouncer as well (issue 13 item 6).
        assert_eq!(heartbeat_warnings(log), 0, "{log}");
        let id = &g.local_db;
        let row = c
            .query_opt(
                "SELECT last_cycle_ok, queue_size FROM gateway_status WHERE gateway_id = $1",
                &[id],
            )
            .unwrap();
        let row = row.unwrap_or_else(|| panic!("no gateway_status row for {id}:\n{log}"));
        assert_eq!(row.get::<_, Option<bool>>(0), Some(true), "{id}");
        assert_eq!(row.get::<_, Option<i64>>(1), Some(0), "{id}");
    }
    // And it all went through PgBouncer, in transactions on its pool of two.
    let pools = pb.admin_query("SHOW POOLS");
    assert!(
        pools.iter().any(|r| r[0] == db),
        "PgBouncer never saw {db}: {pools:?}"
    );
    let stats = pb.admin_query("SHOW STATS");
    let xacts: u64 = stats
        .iter()
        .find(|r| r[0] == db)
        .map(|r| r[1].parse().unwrap())
        .unwrap_or(0);
    assert!(xacts > 50, "only {xacts} transactions through PgBouncer");
    let bouncer_log = pb.log_text();
    assert!(
        !bouncer_log.contains("unsupported startup parameter"),
        "{bouncer_log}"
    );
}

/// A sandbox whose central takes `per_batch` per insert statement (a statement
/// trigger), reached through `pb`, with a backlog of `n` readings in batches of 20
/// and the pipeline at its default depth: a drain that lasts a while.
fn draining_through(pb: &PgBouncer, per_batch: &str, n: usize) -> Sandbox {
    let mut s = Sandbox::new();
    s.central()
        .batch_execute(&format!(
            "CREATE FUNCTION slow_ingest() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN PERFORM pg_sleep({per_batch}); RETURN NULL; END $$;
             CREATE TRIGGER slow_ingest AFTER INSERT ON meter_readings
                 FOR EACH STATEMENT EXECUTE FUNCTION slow_ingest();"
        ))
        .unwrap();
    s.set("POSTGRES_CLIENT_PORT", pb.port)
        .set("BATCH_SIZE", 20)
        .set("UPLOAD_PIPELINE_DEPTH", 8);
    support::insert_readings(&mut s.local(), n, 0);
    s
}

/// The operator's `PAUSE` on PgBouncer's console (the usual first step of central
/// maintenance) in the middle of a gateway's drain takes effect within seconds,
/// not once the drain is over: PgBouncer hands a server connection back only
/// when nothing more is pipelined behind a transaction, so the drain lets its
/// pipeline run dry every 2 s. While a `PAUSE` waits, every other client of the
/// pool waits with it. A `RESUME` before `DB_QUERY_TIMEOUT_MS` costs nothing: the
/// drain goes on at full batch size, nothing fails, every reading arrives once.
#[test]
fn p22_a_pause_on_pgbouncer_mid_drain_takes_effect_within_seconds() {
    let (_, central) = shared();
    let pb = PgBouncer::start(central, &Settings::default());
    let total = 4000;
    let mut s = draining_through(&pb, "0.05", total);
    s.set("DB_QUERY_TIMEOUT_MS", 5000);
    let mut d = s.spawn(&["run"]);
    assert!(
        wait_until(Duration::from_secs(30), || s
            .central_count("meter_readings")
            > 200),
        "{}",
        d.log_text()
    );
    let t = std::time::Instant::now();
    pb.admin_query("PAUSE");
    let took = t.elapsed();
    let queued = pending(&s);
    std::thread::sleep(Duration::from_secs(1));
    pb.admin_query("RESUME");
    assert!(
        queued > 0 && took < Duration::from_secs(6),
        "PAUSE took {took:?} and found {queued} reading(s) still queued (it waited for the drain):\n{}",
        d.log_text()
    );
    assert!(
        wait_until(Duration::from_secs(60), || pending(&s) == 0),
        "{}",
        d.log_text()
    );
    stop(&mut d);
    let log = d.log_text();
    assert_eq!(
        count_and_distinct(&mut s.central()),
        (total as i64, total as i64),
        "{log}"
    );
    assert!(error_lines(&log).is_empty(), "{log}");
    assert!(!log.contains("halved"), "{log}");
}

/// A `PAUSE` held three times `DB_QUERY_TIMEOUT_MS` mid-drain (P18, P5): the
/// batch waiting for a server is given up after the timeout (the batches behind
/// it with it), the batch size is halved once and said once, the watchdog is fed
/// throughout, cycles during the `PAUSE` fail cleanly, and after `RESUME` the
/// drain goes on, grows back to `BATCH_SIZE`, and every reading arrives once,
/// none quarantined; the heartbeat reports the gateway healthy again. The
/// halving was said once per batch in flight: eight identical warnings.
#[test]
fn p18_a_pause_longer_than_the_query_timeout_mid_drain_is_survived() {
    use support::notify::Notifications;
    let (_, central) = shared();
    let pb = PgBouncer::start(central, &Settings::default());
    let total = 3000;
    let mut s = draining_through(&pb, "0.03", total);
    let n = Notifications::bind(&s.dir);
    s.set("DB_QUERY_TIMEOUT_MS", 2000)
        .set("NOTIFY_SOCKET", n.path.display())
        .set("WATCHDOG_USEC", 2_000_000);
    let mut d = s.spawn(&["run"]);
    assert!(
        wait_until(Duration::from_secs(30), || s
            .central_count("meter_readings")
            > 200),
        "{}",
        d.log_text()
    );
    let from = std::time::Instant::now();
    pb.admin_query("PAUSE");
    std::thread::sleep(Duration::from_secs(6));
    pb.admin_query("RESUME");
    assert!(
        wait_until(Duration::from_secs(60), || pending(&s) == 0),
        "{}",
        d.log_text()
    );
    let mut c = s.central();
    let healthy = wait_until(Duration::from_secs(20), || {
        c.query_one(
            "SELECT count(*) FROM gateway_status WHERE last_cycle_ok AND queue_size = 0",
            &[],
        )
        .unwrap()
        .get::<_, i64>(0)
            == 1
    });
    let to = std::time::Instant::now();
    stop(&mut d);
    let log = d.log_text();
    assert!(healthy, "{log}");
    assert_eq!(
        count_and_distinct(&mut c),
        (total as i64, total as i64),
        "{log}"
    );
    assert_eq!(
        s.local_count("meter_readings WHERE sync_error IS NOT NULL"),
        0,
        "{log}"
    );
    assert!(
        log.contains("no answer within 2000 ms"),
        "the PAUSE was not met:\n{log}"
    );
    assert_eq!(log.matches("because of its size").count(), 1, "{log}");
    assert!(log.contains("batch size back up to 20"), "{log}");
    let gap = n.max_watchdog_gap(from, to);
    assert!(
        gap <= Duration::from_millis(1000),
        "watchdog silent for {gap:?}:\n{log}"
    );
}

/// PgBouncer sends every error of its own as 08P01. The operator's `KILL` of the
/// database on its console mid-drain ("database removed") is not about the
/// batch's size (P24): the phase fails, the batches stay at full size, the next
/// cycle after `RESUME` goes on, every reading arrives once. It was read as a
/// size failure: "a batch of 20 failed because of its size (… database removed
/// …)", batch size halved (so were "query_wait_timeout" and "server conn
/// crashed?", unit-tested in src/upload/pace.rs).
#[test]
fn p24_pgbouncers_kill_mid_drain_is_not_taken_for_a_batch_too_large() {
    let (_, central) = shared();
    // The server connection KILL closed counts as a failed login to PgBouncer,
    // which then waits `server_login_retry` (15 s) before it opens another; the
    // gateway's connects, bounded by its query timeout of 3 s here, would fail
    // meanwhile (with the default of 30 s they wait it out).
    let pb = PgBouncer::start(
        central,
        &Settings {
            extra: "server_login_retry = 1\n".into(),
            ..Settings::default()
        },
    );
    let total = 2000;
    let mut s = draining_through(&pb, "0.03", total);
    s.set("DB_QUERY_TIMEOUT_MS", 3000);
    let mut d = s.spawn(&["run"]);
    assert!(
        wait_until(Duration::from_secs(30), || s
            .central_count("meter_readings")
            > 200),
        "{}",
        d.log_text()
    );
    let db = &s.central_db;
    pb.admin_query(&format!("KILL \"{db}\""));
    std::thread::sleep(Duration::from_millis(500));
    // Until RESUME, PgBouncer 1.18 holds new clients of a killed database.
    pb.admin_query(&format!("RESUME \"{db}\""));
    assert!(
        wait_until(Duration::from_secs(60), || pending(&s) == 0),
        "{}",
        d.log_text()
    );
    stop(&mut d);
    let log = d.log_text();
    assert!(
        log.contains("database removed"),
        "the KILL was not met mid-drain:\n{log}"
    );
    assert!(
        !log.contains("because of its size") && !log.contains("halved"),
        "{log}"
    );
    assert_eq!(
        count_and_distinct(&mut s.central()),
        (total as i64, total as i64),
        "{log}"
    );
}

/// Durability: an upload is acknowledged (and its readings deleted on the
/// gateway) only once central's synchronous standbys have it, whatever central's
/// default `synchronous_commit`. Here central names a synchronous standby that is
/// not connected, and its default is `off` (the test clusters' setting), so a
/// commit that did not ask for `synchronous_commit = on` would return at once.
#[test]
fn durability_an_upload_is_acknowledged_only_once_the_synchronous_standby_has_it() {
    let central: &'static Cluster = Box::leak(Box::new(Cluster::start(support::Role::Central)));
    let (local, _) = shared();
    let name = format!("dur{}", std::process::id());
    local.create_db(&name);
    central.create_db(&name);
    let mut s = Sandbox::on(local, central, &name, &name);
    s.migrate();
    central.set_and_reload("synchronous_standby_names", "standby_a");
    // Our statement timeout (a little under this) must not cut the commit's wait
    // short: PostgreSQL would then report the commit as done.
    s.set("DB_QUERY_TIMEOUT_MS", 2000)
        .set("MAX_QUERY_RETRIES", 0);
    s.insert_readings(300);

    let first = s.run(&["once"]);
    assert_eq!(
        pending(&s),
        300,
        "readings deleted while on one machine only:\n{}",
        first.all()
    );
    let (ok, err): (bool, Option<String>) = {
        let r = s
            .local()
            .query_one(
                "SELECT success, error_message FROM sync_logs WHERE sync_type = 'upload' \
                 ORDER BY id DESC LIMIT 1",
                &[],
            )
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert!(!ok, "upload reported success:\n{}", first.all());
    assert!(
        err.as_deref().unwrap_or("").contains("no answer within"),
        "{err:?}"
    );
    // A commit that waits for a standby says so, and is not taken for a batch
    // too large (before, each such cycle halved the batches, down to one reading).
    let log = first.all();
    assert!(log.contains("its COMMIT was not"), "{log}");
    assert!(
        !log.contains("because of its size") && !log.contains("halved"),
        "{log}"
    );

    // The standby "arrives" (here: central stops asking for one): the waiting
    // commits complete, and the next cycle finds the readings there already.
    central.set_and_reload("synchronous_standby_names", "");
    s.run(&["once"]).assert_ok();
    assert_eq!(pending(&s), 0);
    assert_eq!(count_and_distinct(&mut s.central()), (300, 300));
}

/// Applies `sql` and records it in the bookkeeping table as `meter-sync migrate`
/// would have: a central exactly as an earlier release left it.
fn migrate_central_by_hand(c: &mut Client, version: i32, name: &str, sql: &str) {
    // FNV-1a 64, as src/migrate.rs checksums.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in sql.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    c.batch_execute(sql).unwrap();
    c.batch_execute(
        "CREATE TABLE IF NOT EXISTS meter_sync_migrations (
             version integer PRIMARY KEY, name text NOT NULL, checksum text NOT NULL,
             applied_at timestamptz NOT NULL DEFAULT now())",
    )
    .unwrap();
    c.execute(
        "INSERT INTO meter_sync_migrations (version, name, checksum) VALUES ($1, $2, $3)",
        &[&version, &name, &format!("{h:016x}")],
    )
    .unwrap();
}

/// Lines of a log that warn about the fleet heartbeat (its table missing).
fn heartbeat_warnings(log: &str) -> usize {
    log.lines()
        .filter(|l| l.contains("WARN") && (l.contains("gateway_status") || l.contains("heartbeat")))
        .count()
}

/// A fleet upgrades its gateways over weeks, and central's migrations are the
/// operator's to apply: until then, this release runs against a central with the
/// first release's schema only, and must not fail its cycles for it.
#[test]
fn mixed_versions_this_release_against_a_central_not_yet_migrated() {
    let s = Sandbox::empty();
    let mut c = s.central();
    migrate_central_by_hand(
        &mut c,
        1,
        "0001_initial.sql",
        include_str!("../migrations/remote/0001_initial.sql"),
    );
    // A gateway's role migrates its own database only.
    s.run(&["migrate", "local"]).assert_ok();
    seed_meters_and_tenants(&mut c);
    let mut expected = collect(&mut s.local(), 700, 0);
    let meters = rows_as_text(&mut c, METERS);
    let tenants = rows_as_text(&mut c, TENANTS);

    let mut d = s.spawn(&["run"]);
    let done = wait_until(Duration::from_secs(30), || {
        pending(&s) == 0
            && rows_as_text(&mut s.local(), METERS) == meters
            && rows_as_text(&mut s.local(), TENANTS) == tenants
    });
    // A few more cycles: a warning repeated every cycle would show.
    let cycles = |s: &Sandbox| s.local_count("sync_logs WHERE sync_type = 'tenant'");
    let seen = cycles(&s);
    wait_until(Duration::from_secs(20), || cycles(&s) >= seen + 3);
    stop(&mut d);
    let log = d.log_text();
    assert!(done, "not in line within 30 s:\n{log}");
    expected.sort();
    assert!(
        central_readings(&mut c) == expected,
        "central's readings differ"
    );
    assert_eq!(
        s.local_count("sync_logs WHERE NOT success"),
        0,
        "a phase failed:\n{log}"
    );
    assert!(error_lines(&log).is_empty(), "ERROR lines:\n{log}");
    // The heartbeat has nowhere to go: skipped, with one warning for the whole run.
    assert_eq!(
        heartbeat_warnings(&log),
        1,
        "the heartbeat should warn exactly once:\n{log}"
    );
    // And it did not migrate central behind the operator's back.
    let v: i32 = c
        .query_one("SELECT max(version) FROM meter_sync_migrations", &[])
        .unwrap()
        .get(0);
    assert_eq!(v, 1);
}

/// The previous release, built from git history: METER_SYNC_OLD_RELEASE=1 builds
/// 518b60f (the main this release started from), or name another commit.
fn old_release_binary() -> std::path::PathBuf {
    let commit = match std::env::var("METER_SYNC_OLD_RELEASE").as_deref() {
        Ok("1") => "518b60f".to_string(),
        Ok(c) if !c.is_empty() => c.to_string(),
        _ => panic!("set METER_SYNC_OLD_RELEASE=1 (or a commit) to run this test"),
    };
    let repo = env!("CARGO_MANIFEST_DIR");
    // Kept between runs (the build takes minutes); its own target directory, so
    // this tree's build is not disturbed.
    let root = std::path::Path::new(repo).join("target/old-release");
    let src = root.join(format!("src-{commit}"));
    if !src.join("Cargo.toml").exists() {
        std::fs::create_dir_all(&src).unwrap();
        // `git archive` rather than `git worktree add`: no bookkeeping left in the
        // repository, nothing to prune.
        let st = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!(
                "git -C '{repo}' archive '{commit}' | tar -x -C '{}'",
                src.display()
            ))
            .status()
            .unwrap();
        assert!(st.success(), "git archive {commit}");
    }
    let mut build = std::process::Command::new("nice");
    build
        .args(["cargo", "build", "--locked", "--bin", "meter-sync"])
        .current_dir(&src)
        .env("CARGO_TARGET_DIR", root.join("target"));
    // The OpenSSL this tree's build already compiled (vendored) serves the old
    // tree too: compiling it again takes most of the build's time.
    if let Some(ssl) = vendored_openssl(std::path::Path::new(repo)) {
        build
            .env("OPENSSL_NO_VENDOR", "1")
            .env("OPENSSL_STATIC", "1")
            .env("OPENSSL_DIR", ssl);
    }
    let st = build.status().unwrap();
    assert!(st.success(), "building {commit} failed");
    root.join("target/debug/meter-sync")
}

/// `target/debug/build/openssl-sys-*/out/openssl-build/install` of this tree, if built.
fn vendored_openssl(repo: &std::path::Path) -> Option<std::path::PathBuf> {
    std::fs::read_dir(repo.join("target/debug/build"))
        .ok()?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("openssl-sys-"))
        .map(|e| e.path().join("out/openssl-build/install"))
        .find(|p| p.join("lib/libssl.a").exists() || p.join("lib64/libssl.a").exists())
}

#[test]
#[ignore = "builds the previous release from git history (minutes): METER_SYNC_OLD_RELEASE=1 cargo test --test central -- --ignored mixed"]
fn mixed_versions_the_previous_release_against_a_central_migrated_by_this_one() {
    let old = old_release_binary();
    let s = Sandbox::empty();
    // The operator migrated central with this release...
    s.run(&["migrate", "remote"]).assert_ok();
    let run_old = |args: &[&str]| -> support::Run {
        let out = s.program(&old).args(args).output().unwrap();
        support::Run::from(out)
    };
    // ...while this gateway still runs the previous one, on its own schema.
    run_old(&["migrate", "local"]).assert_ok();
    let mut c = s.central();
    seed_meters_and_tenants(&mut c);
    let mut expected = collect(&mut s.local(), 900, 0);
    let first = run_old(&["once"]);
    first.assert_ok();
    expected.extend(collect(&mut s.local(), 100, 5000));
    let second = run_old(&["once"]);
    second.assert_ok();
    let log = format!("{}{}", first.all(), second.all());
    assert_eq!(pending(&s), 0, "{log}");
    expected.sort();
    assert!(
        central_readings(&mut c) == expected,
        "central's readings differ:\n{log}"
    );
    assert_eq!(
        rows_as_text(&mut s.local(), METERS),
        rows_as_text(&mut c, METERS)
    );
    assert_eq!(
        rows_as_text(&mut s.local(), TENANTS),
        rows_as_text(&mut c, TENANTS)
    );
    assert!(error_lines(&log).is_empty(), "ERROR lines:\n{log}");
}

/// Failover (P23): both hosts listed, the primary crashes mid-drain, the standby
/// (synchronous, so every acknowledged batch is on it) is promoted. The same
/// daemon process drains the rest into the new primary: every reading exactly
/// once, nothing quarantined.
#[test]
fn p23_the_same_process_drains_to_the_promoted_standby_after_the_primary_crashes() {
    let _heavy = support::heavy_lock();
    let primary: &'static Cluster = Box::leak(Box::new(Cluster::start_with(
        support::Role::Central,
        support::replica::REPLICATING_CENTRAL_HBA,
    )));
    let (local, _) = shared();
    let name = format!("fo{}", std::process::id());
    local.create_db(&name);
    primary.create_db(&name);
    let mut s = Sandbox::on(local, primary, &name, &name);
    s.migrate();
    let standby: &'static Cluster = Box::leak(Box::new(primary.standby("standby_a")));
    // Acknowledged = on both machines (the recipe in docs/central.md).
    primary.set_and_reload("synchronous_standby_names", "standby_a");
    primary.wait_replayed("standby_a");
    s.set("POSTGRES_CLIENT_HOST", "localhost,localhost")
        .set(
            "POSTGRES_CLIENT_PORT",
            format!("{},{}", primary.port, standby.port),
        )
        .set("BATCH_SIZE", 50)
        .set("UPLOAD_PIPELINE_DEPTH", 1)
        .set("MAX_CONNECTION_RETRIES", 3)
        .set("DB_QUERY_TIMEOUT_MS", 5000);
    let mut expected = collect(&mut s.local(), 20_000, 0);
    let total = expected.len() as i64;

    let mut d = s.spawn(&["run"]);
    wait_for_the_drain(&mut primary.connect(&name), 1000, &d);
    primary.crash();
    let left_at_crash = pending(&s);
    assert!(
        left_at_crash > 0,
        "the drain ended before the crash; make it longer"
    );
    // A while without a writable host (the standby refuses: read-only), then it
    // is promoted.
    std::thread::sleep(Duration::from_millis(1500));
    standby.promote();
    let log = drained_by_the_same_process(&s, &mut d, Duration::from_secs(90), "the failover");
    expected.sort();
    let got = central_readings(&mut standby.connect(&name));
    assert_eq!(got.len() as i64, total, "{log}");
    assert!(
        got == expected,
        "the new primary's readings differ from the collected ones"
    );
}

/// P23: a session whose server turns read-only under it (SQLSTATE 25006, as when
/// a primary is demoted, or PgBouncer is pointed at a standby) is dropped, and the
/// reconnect finds the host that accepts writes, rather than the session failing
/// cycle after cycle. Two writable servers with the same schema (a standby
/// promoted at once); the first then turns read-only.
#[test]
fn p23_a_session_that_meets_a_read_only_server_is_dropped_and_the_writable_host_found() {
    let a: &'static Cluster = Box::leak(Box::new(Cluster::start_with(
        support::Role::Central,
        support::replica::REPLICATING_CENTRAL_HBA,
    )));
    let (local, _) = shared();
    let name = format!("ro{}", std::process::id());
    local.create_db(&name);
    a.create_db(&name);
    let mut s = Sandbox::on(local, a, &name, &name);
    s.migrate();
    let b: &'static Cluster = Box::leak(Box::new(a.standby("b")));
    b.promote();
    s.set("POSTGRES_CLIENT_HOST", "localhost,localhost")
        .set("POSTGRES_CLIENT_PORT", format!("{},{}", a.port, b.port));
    let mut expected = collect(&mut s.local(), 300, 0);
    let mut d = s.spawn(&["run"]);
    assert!(wait_until(Duration::from_secs(30), || pending(&s) == 0));
    let on_a = a
        .connect(&name)
        .query_one("SELECT count(*) FROM meter_readings", &[])
        .unwrap()
        .get::<_, i64>(0);
    assert_eq!(on_a, 300, "the first writable host is the first listed");

    // a turns read-only: its sessions see it at their next statement.
    a.set_and_reload("default_transaction_read_only", "on");
    expected.extend(collect(&mut s.local(), 300, 10_000));
    let drained = wait_until(Duration::from_secs(30), || pending(&s) == 0);
    stop(&mut d);
    let log = d.log_text();
    assert!(drained, "{} still queued:\n{log}", pending(&s));
    let read_only_failures = log.lines().filter(|l| l.contains("25006")).count();
    assert!(
        read_only_failures <= 1,
        "25006 {read_only_failures} times:\n{log}"
    );
    assert_eq!(
        s.local_count("meter_readings WHERE sync_error IS NOT NULL"),
        0
    );
    let mut all = central_readings(&mut a.connect(&name));
    let on_b = central_readings(&mut b.connect(&name));
    // b is a copy of a: it holds what a had when promoted (nothing yet) plus what
    // went to b; every reading is on exactly one of them.
    all.extend(on_b.iter().cloned());
    all.sort();
    expected.sort();
    assert_eq!(on_b.len(), 300, "{log}");
    assert!(
        all == expected,
        "readings lost or duplicated across the two hosts"
    );
}

/// Central's postmaster is SIGKILLed (the OOM killer, a host reset) while eight
/// batches are in flight, and restarts after crash recovery. The same daemon
/// process drains the rest once central is back: every reading exactly once and as
/// written, nothing quarantined, and the log says what happened once per cycle (no
/// batch retried on the dead connection, no warning per batch in flight).
#[test]
fn a_central_crash_mid_drain_is_survived_by_the_same_process() {
    let _heavy = support::heavy_lock();
    let central: &'static Cluster = Box::leak(Box::new(Cluster::start(support::Role::Central)));
    let (local, _) = shared();
    let name = format!("crash{}", std::process::id());
    local.create_db(&name);
    central.create_db(&name);
    let mut s = Sandbox::on(local, central, &name, &name);
    s.migrate();
    // About 5 ms per batch on central, so that the drain is mid-way when it dies.
    central
        .connect(&name)
        .batch_execute(
            "CREATE FUNCTION slow() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN PERFORM pg_sleep(0.005); RETURN NULL; END $$;
             CREATE TRIGGER slow BEFORE INSERT ON meter_readings
                 FOR EACH STATEMENT EXECUTE FUNCTION slow();",
        )
        .unwrap();
    s.set("BATCH_SIZE", 10)
        .set("UPLOAD_PIPELINE_DEPTH", 8)
        .set("MAX_CONNECTION_RETRIES", 3);
    let mut expected = collect(&mut s.local(), 5000, 0);

    let mut d = s.spawn(&["run"]);
    wait_for_the_drain(&mut central.connect(&name), 500, &d);
    central.kill_postmaster();
    assert!(
        pending(&s) > 0,
        "the drain ended before the crash; make it longer"
    );
    std::thread::sleep(Duration::from_millis(500));
    central.start_after_crash();
    let log = drained_by_the_same_process(&s, &mut d, Duration::from_secs(60), "the crash");
    expected.sort();
    assert!(
        central_readings(&mut central.connect(&name)) == expected,
        "central's readings differ from the collected ones:\n{log}"
    );
    assert!(!log.contains("retry 1/"), "{log}");
    let failed = log.matches("upload phase failed").count();
    let batch_lines = log.lines().filter(|l| l.contains("batch of")).count();
    assert!(
        failed >= 1 && batch_lines <= failed,
        "{batch_lines} lines about batches for {failed} failed upload(s):\n{log}"
    );
}
