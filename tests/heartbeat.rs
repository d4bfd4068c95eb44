//! SPEC §8 `gateway_status` and issue 13 item 6: after every cycle a gateway
//! upserts its row in central's `gateway_status`; a heartbeat that fails never
//! fails a cycle and is logged once; with the row-level security recipe of
//! deploy/central/gateway-status-rls.sql a gateway cannot touch another's row.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use support::{issue, temp_dir, wait_until, Client, Sandbox};

/// A name no other test of this process uses (roles are cluster-wide).
fn unique(tag: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "{tag}_{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    )
}

const ROLE_PASSWORD: &str = "gw-r0le-Pa55";

/// A least-privilege central role for one gateway: log in, upload, download, and
/// (like every table of the sandbox's central database) heartbeat.
fn central_role(s: &Sandbox, name: &str) {
    s.central_cluster()
        .admin()
        .batch_execute(&format!(
            "CREATE ROLE \"{name}\" LOGIN PASSWORD '{ROLE_PASSWORD}'"
        ))
        .unwrap();
    s.central()
        .batch_execute(&format!(
            "GRANT SELECT, INSERT, UPDATE ON ALL TABLES IN SCHEMA public TO \"{name}\";
             GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO \"{name}\";"
        ))
        .unwrap();
}

/// Makes the sandbox's gateway log in to central as `role`.
fn log_in_as(s: &mut Sandbox, role: &str) {
    s.set("POSTGRES_CLIENT_USER", role)
        .set("POSTGRES_CLIENT_PASSWORD", ROLE_PASSWORD);
}

/// One gateway_status row, every column.
#[derive(Debug)]
struct StatusRow {
    version: Option<String>,
    last_cycle_at: Option<SystemTime>,
    last_cycle_ok: Option<bool>,
    last_error: Option<String>,
    queue_size: Option<i64>,
    oldest_pending_at: Option<SystemTime>,
    quarantined: Option<i64>,
    cert_expires_at: Option<SystemTime>,
    bytes_up: Option<i64>,
    bytes_down: Option<i64>,
    updated_at: Option<SystemTime>,
}

fn status_row(c: &mut Client, gateway: &str) -> Option<StatusRow> {
    let rows = c
        .query(
            "SELECT version, last_cycle_at, last_cycle_ok, last_error, queue_size, oldest_pending_at, \
                    quarantined, cert_expires_at, bytes_up, bytes_down, updated_at \
             FROM gateway_status WHERE gateway_id = $1",
            &[&gateway],
        )
        .unwrap();
    rows.first().map(|r| StatusRow {
        version: r.get(0),
        last_cycle_at: r.get(1),
        last_cycle_ok: r.get(2),
        last_error: r.get(3),
        queue_size: r.get(4),
        oldest_pending_at: r.get(5),
        quarantined: r.get(6),
        cert_expires_at: r.get(7),
        bytes_up: r.get(8),
        bytes_down: r.get(9),
        updated_at: r.get(10),
    })
}

/// notAfter of a PEM certificate as the openssl CLI reads it, parsed by PostgreSQL.
fn openssl_not_after(cert: &Path, c: &mut Client) -> SystemTime {
    let out = Command::new("openssl")
        .args(["x509", "-noout", "-enddate", "-in"])
        .arg(cert)
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let date = text.trim().strip_prefix("notAfter=").unwrap().to_string();
    // "Jan  1 00:00:00 2027 GMT", read as UTC.
    c.batch_execute("SET TimeZone = 'UTC'").unwrap();
    c.query_one(
        "SELECT to_timestamp($1, 'Mon DD HH24:MI:SS YYYY')",
        &[&date.trim_end_matches(" GMT").to_string()],
    )
    .unwrap()
    .get(0)
}

/// A client certificate for the `postgres` role signed by the central cluster's CA.
fn client_cert(s: &Sandbox) -> (PathBuf, PathBuf) {
    let certs = s.central_cluster().certs.as_ref().unwrap();
    let ca = (certs.ca.clone(), certs.dir.join("ca.key"));
    issue(&temp_dir("gw-cert"), "gateway", &ca, "postgres", "", 45)
}

fn central_now(c: &mut Client) -> SystemTime {
    c.query_one("SELECT now()", &[]).unwrap().get(0)
}

fn ts(c: &mut Client, text: &str) -> SystemTime {
    c.query_one("SELECT $1::text::timestamptz", &[&text])
        .unwrap()
        .get(0)
}

#[test]
fn after_once_the_gateway_row_holds_every_column() {
    let mut s = Sandbox::new();
    let id = unique("gw-every-column");
    let metrics = s.dir.join("meter-sync.prom");
    s.set("METER_SYNC_GATEWAY_ID", &id)
        .set("METRICS_TEXTFILE", metrics.display());
    let (cert, key) = client_cert(&s);
    s.set("POSTGRES_CLIENT_SSLCERT", cert.display())
        .set("POSTGRES_CLIENT_SSLKEY", key.display());
    // Central rejects one reading (quarantined locally); 30 go through.
    s.central()
        .batch_execute("ALTER TABLE meter_readings ADD CONSTRAINT sane CHECK (value < 1000000)")
        .unwrap();
    s.insert_readings(30);
    s.local()
        .execute(
            "INSERT INTO meter_readings (meter_id, \"timestamp\", value, unit) \
             VALUES ('meter-x', '2026-02-01 00:00:00+00', 5000000, 'kWh')",
            &[],
        )
        .unwrap();

    let before = SystemTime::now() - Duration::from_secs(1);
    s.run(&["once"]).assert_ok();
    let after = SystemTime::now() + Duration::from_secs(1);

    let mut c = s.central();
    let row = status_row(&mut c, &id).expect("a gateway_status row after once");
    assert_eq!(row.version.as_deref(), Some(env!("CARGO_PKG_VERSION")));
    assert_eq!(row.last_cycle_ok, Some(true), "{row:?}");
    assert_eq!(row.last_error, None);
    let at = row.last_cycle_at.unwrap();
    assert!(before <= at && at <= after, "{row:?}");
    assert_eq!(row.queue_size, Some(0));
    assert_eq!(row.oldest_pending_at, None);
    assert_eq!(row.quarantined, Some(1));
    assert_eq!(row.cert_expires_at, Some(openssl_not_after(&cert, &mut c)));
    // 30 readings went up inside TLS records; the answers and the downloads came down.
    assert!(row.bytes_up.unwrap() > 30 * 40, "{row:?}");
    assert!(row.bytes_down.unwrap() > 0, "{row:?}");
    let lag = central_now(&mut c)
        .duration_since(row.updated_at.unwrap())
        .unwrap();
    assert!(lag < Duration::from_secs(60), "{row:?}");
    assert_eq!(s.central_count("gateway_status"), 1);

    // A cycle whose upload fails (central refuses every insert, transiently):
    // the row says so, names the phase, and counts the 10 readings left waiting.
    c.batch_execute(
        "CREATE FUNCTION busy() RETURNS trigger LANGUAGE plpgsql AS \
           $$BEGIN RAISE EXCEPTION 'central is busy' USING ERRCODE = 'serialization_failure'; END$$;
         CREATE TRIGGER busy BEFORE INSERT ON meter_readings FOR EACH STATEMENT EXECUTE FUNCTION busy();",
    )
    .unwrap();
    support::insert_readings(&mut s.local(), 10, 1000);
    s.run(&["once"]).assert_code(1);
    let row = status_row(&mut c, &id).unwrap();
    assert_eq!(row.last_cycle_ok, Some(false), "{row:?}");
    let err = row.last_error.clone().unwrap_or_default();
    assert!(
        err.starts_with("upload: ") && err.contains("central is busy"),
        "{row:?}"
    );
    assert_eq!(row.queue_size, Some(10), "{row:?}");
    // The first of insert_readings(10, offset 1000): 1001 s after 2026-01-01.
    assert_eq!(
        row.oldest_pending_at,
        Some(ts(&mut c, "2026-01-01 00:16:41+00")),
        "{row:?}"
    );
    assert_eq!(row.quarantined, Some(1));

    // The same age is in `status --json` and the metrics file.
    let r = s.run(&["status", "--json"]);
    r.assert_ok();
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(
        v["oldest_pending_at"].as_str(),
        Some("2026-01-01T00:16:41.000Z"),
        "{}",
        r.stdout
    );
    let age = v["oldest_pending_age_seconds"].as_i64().unwrap();
    let expected = SystemTime::now()
        .duration_since(row.oldest_pending_at.unwrap())
        .unwrap()
        .as_secs() as i64;
    assert!((age - expected).abs() < 120, "{age} vs {expected}");
    let text = std::fs::read_to_string(&metrics).unwrap();
    let line = text
        .lines()
        .find(|l| l.starts_with("meter_sync_oldest_pending_age_seconds "))
        .unwrap_or_else(|| panic!("no oldest_pending_age in:\n{text}"));
    let m: f64 = line.split(' ').nth(1).unwrap().parse().unwrap();
    assert!((m as i64 - expected).abs() < 120, "{line}");
}

fn count(text: &str, needle: &str) -> usize {
    text.matches(needle).count()
}

#[test]
fn a_failing_heartbeat_never_fails_a_cycle_and_is_logged_once() {
    let mut s = Sandbox::new();
    let role = unique("gw_revoked");
    central_role(&s, &role);
    log_in_as(&mut s, &role);
    s.set("METER_SYNC_GATEWAY_ID", &role);
    let mut admin = s.central();
    admin
        .batch_execute(&format!(
            "REVOKE INSERT, UPDATE ON gateway_status FROM \"{role}\""
        ))
        .unwrap();

    // `once`: the cycle succeeds (exit 0) and the readings arrive.
    s.insert_readings(20);
    let r = s.run(&["once"]);
    r.assert_ok();
    assert_eq!(count(&r.all(), "heartbeat failed"), 1, "{}", r.all());
    assert!(r.all().contains("permission denied"), "{}", r.all());
    assert_eq!(s.central_count("meter_readings"), 20);

    // `run`: several cycles, one warning.
    let d = s.spawn(&["run"]);
    assert!(
        wait_until(Duration::from_secs(60), || count(
            &d.log_text(),
            "cycle finished"
        ) >= 4),
        "{}",
        d.log_text()
    );
    let log = d.log_text();
    assert_eq!(count(&log, "heartbeat failed"), 1, "{log}");
    assert_eq!(count(&log, " ERROR "), 0, "{log}");
    let failed: i64 = s
        .local()
        .query_one("SELECT count(*) FROM sync_logs WHERE NOT success", &[])
        .unwrap()
        .get(0);
    assert_eq!(failed, 0, "{log}");

    // The privilege back: the next heartbeat arrives, and says so once.
    admin
        .batch_execute(&format!(
            "GRANT INSERT, UPDATE ON gateway_status TO \"{role}\""
        ))
        .unwrap();
    d.wait_log(
        "heartbeat: delivered to central's gateway_status again",
        Duration::from_secs(30),
    );
    assert!(status_row(&mut admin, &role).is_some());

    // A central without the table (not migrated to this release): one warning.
    admin.batch_execute("DROP TABLE gateway_status").unwrap();
    let seen = count(&d.log_text(), "cycle finished");
    assert!(
        wait_until(Duration::from_secs(60), || count(
            &d.log_text(),
            "cycle finished"
        ) >= seen + 3),
        "{}",
        d.log_text()
    );
    let log = d.log_text();
    assert_eq!(
        count(
            &log,
            "heartbeat skipped: central has no gateway_status table"
        ),
        1,
        "{log}"
    );
    assert_eq!(count(&log, " ERROR "), 0, "{log}");
}

#[test]
fn with_the_rls_recipe_a_gateway_cannot_touch_another_gateways_row() {
    let mut s = Sandbox::new();
    let recipe = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/central/gateway-status-rls.sql"),
    )
    .unwrap();
    let mut admin = s.central();
    admin.batch_execute(&recipe).unwrap();
    // Applying it twice is harmless.
    admin.batch_execute(&recipe).unwrap();
    let (a, b) = (unique("gw_a"), unique("gw_b"));
    for g in [&a, &b] {
        central_role(&s, g);
        admin
            .batch_execute(&format!("GRANT meter_sync_gateway TO \"{g}\""))
            .unwrap();
        // What central_role granted on gateway_status goes: the recipe's group
        // role is the only way in.
        admin
            .batch_execute(&format!("REVOKE ALL ON gateway_status FROM \"{g}\""))
            .unwrap();
    }

    // Each gateway writes its own row.
    for g in [&a, &b] {
        log_in_as(&mut s, g);
        s.set("METER_SYNC_GATEWAY_ID", g);
        let r = s.run(&["once"]);
        r.assert_ok();
        assert!(!r.all().contains("heartbeat failed"), "{}", r.all());
        assert!(status_row(&mut admin, g).is_some(), "{g}: no row");
    }
    let b_before = status_row(&mut admin, &b).unwrap();

    // Gateway a claiming b's id: its heartbeat is refused, its cycle is not, and
    // b's row is as b left it.
    log_in_as(&mut s, &a);
    s.set("METER_SYNC_GATEWAY_ID", &b);
    let r = s.run(&["once"]);
    r.assert_ok();
    assert!(
        r.all().contains("heartbeat failed") && r.all().contains("row-level security"),
        "{}",
        r.all()
    );
    let b_after = status_row(&mut admin, &b).unwrap();
    assert_eq!(b_after.updated_at, b_before.updated_at);
    assert_eq!(b_after.last_cycle_at, b_before.last_cycle_at);

    // Nor by hand: a sees only its own row, and cannot change, delete or add b's.
    let mut as_a = s.central_as(&a);
    let visible: Vec<String> = as_a
        .query("SELECT gateway_id FROM gateway_status", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(visible, vec![a.clone()]);
    let n = as_a
        .execute(
            "UPDATE gateway_status SET last_error = 'forged' WHERE gateway_id = $1",
            &[&b],
        )
        .unwrap();
    assert_eq!(n, 0);
    let e = as_a
        .execute("DELETE FROM gateway_status WHERE gateway_id = $1", &[&b])
        .unwrap_err();
    assert_eq!(e.code().map(|c| c.code()), Some("42501"), "{e}");
    let e = as_a
        .execute(
            "INSERT INTO gateway_status (gateway_id, last_error) VALUES ($1, 'forged') \
             ON CONFLICT (gateway_id) DO UPDATE SET last_error = EXCLUDED.last_error",
            &[&b],
        )
        .unwrap_err();
    assert_eq!(e.code().map(|c| c.code()), Some("42501"), "{e}");
    // Nor can it claim an id no gateway has used yet (which would lock that
    // gateway out of its own row).
    let c = unique("gw_c");
    let e = as_a
        .execute("INSERT INTO gateway_status (gateway_id) VALUES ($1)", &[&c])
        .unwrap_err();
    assert_eq!(e.code().map(|c| c.code()), Some("42501"), "{e}");
    // Changing its own row into b's is refused as well.
    let e = as_a
        .execute(
            "UPDATE gateway_status SET gateway_id = $1 WHERE gateway_id = $2",
            &[&b, &a],
        )
        .unwrap_err();
    assert_eq!(e.code().map(|c| c.code()), Some("42501"), "{e}");
    let b_final = status_row(&mut admin, &b).unwrap();
    assert_eq!(b_final.last_error, None);
    assert_eq!(b_final.updated_at, b_before.updated_at);

    // A monitor sees every row.
    let monitor = unique("fleet_monitor");
    admin
        .batch_execute(&format!(
            "CREATE ROLE \"{monitor}\" LOGIN IN ROLE meter_sync_monitor"
        ))
        .unwrap();
    let n: i64 = s
        .central_as(&monitor)
        .query_one("SELECT count(*) FROM gateway_status", &[])
        .unwrap()
        .get(0);
    assert_eq!(n, 2);
}

/// P22 for the heartbeat: through PgBouncer in transaction mode with its stock
/// settings (pool of 2), every `once` delivers its heartbeat. (A single gateway
/// keeps landing on the same server connection, so this does not catch a named
/// statement by itself; the 3-gateway P22 test in tests/central.rs adds the
/// concurrency, and the upsert uses `execute_typed` by construction.)
#[test]
fn the_heartbeat_goes_through_pgbouncer_in_transaction_mode() {
    use support::pgbouncer::{PgBouncer, Settings};
    let mut s = Sandbox::new();
    let pb = PgBouncer::start(s.central_cluster(), &Settings::default());
    let id = unique("gw-bouncer");
    s.set("POSTGRES_CLIENT_PORT", pb.port)
        .set("METER_SYNC_GATEWAY_ID", &id);
    let mut c = s.central();
    let mut last = None;
    for run in 0..3 {
        s.insert_readings(5);
        let r = s.run(&["once"]);
        r.assert_ok();
        assert!(!r.all().contains("heartbeat"), "run {run}:\n{}", r.all());
        let row = status_row(&mut c, &id).unwrap_or_else(|| panic!("run {run}: no row"));
        assert!(row.updated_at > last, "run {run}: {row:?}");
        assert_eq!(row.last_cycle_ok, Some(true), "run {run}: {row:?}");
        last = row.updated_at;
    }
}

/// A heartbeat that waits on central (a maintenance lock on `gateway_status`) is
/// cancelled by central itself, just before the gateway would give up on the
/// connection: its statement carries `statement_timeout` like every other central
/// transaction. Without it the gateway timed out, dropped the connection and
/// reconnected next cycle while the old backend went on waiting on the lock (it
/// does not notice the client gone): one more stranded central session per gateway
/// per cycle, which a fleet turns into `max_connections` within minutes.
#[test]
fn a_heartbeat_stuck_on_a_lock_strands_no_central_sessions() {
    let mut s = Sandbox::new();
    s.set("DB_QUERY_TIMEOUT_MS", 2000);
    s.set("SYNC_INTERVAL_SECONDS", 1);
    let mut d = s.spawn(&["run"]);
    d.wait_log("cycle finished", Duration::from_secs(30));
    let mut c = s.central();
    let db = s.central_db.clone();
    let mut maintenance = c.transaction().unwrap();
    maintenance
        .batch_execute("LOCK TABLE gateway_status IN ACCESS EXCLUSIVE MODE")
        .unwrap();
    let mut probe = s.central();
    let waiting = |probe: &mut Client| -> i64 {
        probe
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 \
                 AND application_name = 'meter-sync' AND wait_event_type = 'Lock'",
                &[&db],
            )
            .unwrap()
            .get(0)
    };
    let mut most = 0;
    let t = std::time::Instant::now();
    while t.elapsed() < Duration::from_secs(12) {
        most = most.max(waiting(&mut probe));
        std::thread::sleep(Duration::from_millis(200));
    }
    maintenance.rollback().unwrap();
    assert!(
        most <= 1,
        "{most} central sessions of this gateway waited on the lock at once:\n{}",
        d.log_text()
    );
    assert!(
        d.log_text().contains("heartbeat failed"),
        "{}",
        d.log_text()
    );
    assert!(d.child.as_mut().unwrap().try_wait().unwrap().is_none());
}
