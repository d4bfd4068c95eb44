//! SPEC P8–P10: meters and tenants come down from central with field-level change
//! logs; unchanged rows are never written; rows gone centrally are kept; a failing
//! phase does not stop the others; 20,000 meters sync in one cycle.

mod support;

use std::time::Duration;

use support::{Client, Run, Sandbox};

/// Inserts meters on central: (meter_id, name, location_id, meter_type, unit,
/// configuration as JSON text, updated_at as text).
type MeterRow<'a> = (
    &'a str,
    &'a str,
    Option<&'a str>,
    &'a str,
    &'a str,
    Option<&'a str>,
    Option<&'a str>,
);

fn add_meters(c: &mut Client, rows: &[MeterRow]) {
    for (id, name, loc, ty, unit, conf, upd) in rows {
        c.execute(
            "INSERT INTO meters (meter_id, name, location_id, meter_type, unit, configuration, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6::text::jsonb, $7::text::timestamptz)",
            &[id, name, loc, ty, unit, conf, upd],
        )
        .unwrap();
    }
}

fn add_tenant(c: &mut Client, id: &str, name: &str, conf: Option<&str>, meta: Option<&str>) {
    c.execute(
        "INSERT INTO tenant (tenant_id, name, configuration, metadata, updated_at)
         VALUES ($1, $2, $3::text::jsonb, $4::text::jsonb, '2026-02-03 04:05:06.789012+00')",
        &[&id, &name, &conf, &meta],
    )
    .unwrap();
}

/// Three meters exercising NULLs, nested jsonb and microsecond timestamps.
fn three_meters(s: &Sandbox) {
    add_meters(
        &mut s.central(),
        &[
            (
                "m-1",
                "Main hall",
                Some("loc-A"),
                "electricity",
                "kWh",
                Some(r#"{"ct": {"ratio": 200, "phases": [1, 2, 3]}, "poll_s": 15}"#),
                Some("2026-01-02 03:04:05.123456+00"),
            ),
            ("m-2", "Boiler", None, "gas", "m3", None, None),
            (
                "m-3",
                "Roof ☀",
                Some("loc-B"),
                "heat",
                "MWh",
                Some(r#"{"a": 1.50, "tags": ["x", null, true]}"#),
                Some("2025-12-31 23:59:59.999999+00"),
            ),
        ],
    );
}

/// Every downloaded column of a table as text, ordered by key (jsonb::text is the
/// canonical form, timestamptz::text is exact in UTC).
fn dump(c: &mut Client, table: &str) -> Vec<Vec<Option<String>>> {
    let sql = match table {
        "meters" => {
            "SELECT meter_id::text, name::text, location_id::text, meter_type::text, unit::text,
                    configuration::text, updated_at::text FROM meters ORDER BY meter_id"
        }
        "tenant" => {
            "SELECT tenant_id::text, name::text, configuration::text, metadata::text,
                    updated_at::text FROM tenant ORDER BY tenant_id"
        }
        _ => unreachable!(),
    };
    c.batch_execute("SET TimeZone = 'UTC'; SET DateStyle = 'ISO'")
        .unwrap();
    c.query(sql, &[])
        .unwrap()
        .iter()
        .map(|r| (0..r.len()).map(|i| r.get(i)).collect())
        .collect()
}

/// (id, xmin, ctid) of every row: any write to a row changes its xmin and ctid.
fn versions(c: &mut Client, table: &str) -> Vec<(String, String, String)> {
    let key = if table == "meters" {
        "meter_id"
    } else {
        "tenant_id"
    };
    c.query(
        &format!("SELECT {key}::text, xmin::text, ctid::text FROM {table} ORDER BY 1"),
        &[],
    )
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2)))
    .collect()
}

/// The newest sync_logs row of `sync_type`: (success, records, error).
fn last_log(s: &Sandbox, sync_type: &str) -> (bool, i32, Option<String>) {
    let r = s
        .local()
        .query_one(
            "SELECT success, records_processed, error_message FROM sync_logs
             WHERE sync_type = $1 ORDER BY id DESC LIMIT 1",
            &[&sync_type],
        )
        .unwrap();
    (r.get(0), r.get(1), r.get(2))
}

/// Runs one cycle that must succeed in every phase.
fn once(s: &Sandbox) -> Run {
    let run = s.run(&["once"]);
    run.assert_ok();
    for phase in ["upload", "meters", "tenant"] {
        let (ok, _, err) = last_log(s, phase);
        assert!(ok, "{phase} phase failed: {err:?}\n{}", run.stderr);
    }
    run
}

/// The log lines that contain `needle`, without the timestamp and level prefix.
fn lines_with<'a>(log: &'a str, needle: &str) -> Vec<&'a str> {
    log.lines()
        .filter(|l| l.contains(needle))
        .map(|l| l.splitn(3, ' ').nth(2).unwrap_or(l).trim_start())
        .collect()
}

#[test]
fn p8_new_meters_and_tenants_arrive_with_every_column_equal() {
    let s = Sandbox::new();
    three_meters(&s);
    add_tenant(
        &mut s.central(),
        "t-1",
        "Acme",
        Some(r#"{"tariff": {"peak": 0.31}}"#),
        Some(r#"{"contact": "ops@example.com"}"#),
    );
    add_tenant(&mut s.central(), "t-2", "Beta", None, None);
    let run = once(&s);

    assert_eq!(
        dump(&mut s.local(), "meters"),
        dump(&mut s.central(), "meters")
    );
    assert_eq!(
        dump(&mut s.local(), "tenant"),
        dump(&mut s.central(), "tenant")
    );
    let unsynced: i64 = s
        .local()
        .query_one(
            "SELECT (SELECT count(*) FROM meters WHERE synced_at IS NULL)
                  + (SELECT count(*) FROM tenant WHERE synced_at IS NULL)",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(unsynced, 0, "synced_at is set on every written row");

    let log = &run.stderr;
    assert_eq!(
        lines_with(log, "new meter "),
        vec![
            "new meter m-1 (Main hall)",
            "new meter m-2 (Boiler)",
            "new meter m-3 (Roof ☀)"
        ]
    );
    assert_eq!(
        lines_with(log, "new tenant "),
        vec!["new tenant t-1 (Acme)", "new tenant t-2 (Beta)"]
    );
    assert!(
        log.contains("meters: 3 new, 0 updated, 0 unchanged ("),
        "{log}"
    );
    assert!(
        log.contains("tenant: 2 new, 0 updated, 0 unchanged ("),
        "{log}"
    );
    assert_eq!(last_log(&s, "meters"), (true, 3, None));
    assert_eq!(last_log(&s, "tenant"), (true, 2, None));
}

#[test]
fn p8_a_changed_field_is_applied_and_logged_by_name() {
    let s = Sandbox::new();
    three_meters(&s);
    add_tenant(&mut s.central(), "t-1", "Acme", Some(r#"{"a": 1}"#), None);
    once(&s);
    let before = versions(&mut s.local(), "meters");
    let tenant_before = versions(&mut s.local(), "tenant");

    let mut c = s.central();
    c.batch_execute(
        "UPDATE meters SET name = 'Boiler room' WHERE meter_id = 'm-2';
         UPDATE meters SET location_id = NULL, configuration = jsonb_set(configuration, '{tags,0}', '\"y\"')
             WHERE meter_id = 'm-3';
         UPDATE tenant SET metadata = '{\"k\": 2}' WHERE tenant_id = 't-1';",
    )
    .unwrap();
    let run = once(&s);

    assert_eq!(
        dump(&mut s.local(), "meters"),
        dump(&mut s.central(), "meters")
    );
    assert_eq!(
        dump(&mut s.local(), "tenant"),
        dump(&mut s.central(), "tenant")
    );
    let log = &run.stderr;
    assert_eq!(
        lines_with(log, " updated: "),
        vec![
            "meter m-2 updated: name",
            "meter m-3 updated: location_id, configuration",
            "tenant t-1 updated: metadata",
        ],
        "{log}"
    );
    assert!(
        log.contains("meters: 0 new, 2 updated, 1 unchanged ("),
        "{log}"
    );
    assert!(!log.contains("new meter"), "{log}");

    let after = versions(&mut s.local(), "meters");
    assert_eq!(
        after[0], before[0],
        "m-1 did not change and must not be written"
    );
    assert_ne!(after[1].1, before[1].1, "m-2 was rewritten");
    assert_ne!(versions(&mut s.local(), "tenant"), tenant_before);
    assert_eq!(last_log(&s, "meters"), (true, 2, None));
    assert_eq!(last_log(&s, "tenant"), (true, 1, None));
}

#[test]
fn p8_jsonb_equal_by_value_is_not_a_change() {
    let s = Sandbox::new();
    add_meters(
        &mut s.central(),
        &[(
            "m-1",
            "Main",
            None,
            "electricity",
            "kWh",
            Some(r#"{"b": [1, 2], "a": {"y": 1.50, "x": true}}"#),
            None,
        )],
    );
    add_tenant(
        &mut s.central(),
        "t-1",
        "Acme",
        Some(r#"{"p": 2.0, "q": "r"}"#),
        None,
    );
    once(&s);
    let before = (
        versions(&mut s.local(), "meters"),
        versions(&mut s.local(), "tenant"),
    );

    // The same values, other key order, spacing and number spelling: central
    // really rewrites the rows, but their values are equal.
    s.central()
        .batch_execute(
            r#"UPDATE meters SET configuration = '{"a":{"x":true,"y":1.5},   "b":[1,2]}';
               UPDATE tenant SET configuration = '{ "q" : "r", "p" : 2 }';"#,
        )
        .unwrap();
    let run = once(&s);

    let after = (
        versions(&mut s.local(), "meters"),
        versions(&mut s.local(), "tenant"),
    );
    assert_eq!(after, before, "a value-equal jsonb must not be written");
    assert!(!run.stderr.contains(" updated: "), "{}", run.stderr);
    assert!(run.stderr.contains("meters: up to date (1 unchanged)"));
    assert!(run.stderr.contains("tenant: up to date (1 unchanged)"));
}

#[test]
fn p8_an_unchanged_cycle_writes_nothing_locally() {
    let s = Sandbox::new();
    three_meters(&s);
    s.central()
        .batch_execute(
            "INSERT INTO meters (meter_id, name, meter_type, unit, configuration, updated_at)
             SELECT 'g-' || g, 'Gen ' || g, 'water', 'm3', jsonb_build_object('n', g), now()
             FROM generate_series(1, 47) g",
        )
        .unwrap();
    add_tenant(&mut s.central(), "t-1", "Acme", Some("{}"), Some("[]"));
    once(&s);
    let before = (
        versions(&mut s.local(), "meters"),
        versions(&mut s.local(), "tenant"),
    );
    assert_eq!(before.0.len(), 50);

    let run = once(&s);
    let after = (
        versions(&mut s.local(), "meters"),
        versions(&mut s.local(), "tenant"),
    );
    assert_eq!(after, before, "no row may be written when nothing changed");
    let log = &run.stderr;
    // P8: one line says so, the cycle's result line (issue 15: two info lines
    // for an idle cycle).
    let up_to_date = lines_with(log, "up to date");
    assert_eq!(up_to_date.len(), 1, "{log}");
    assert!(
        up_to_date[0].contains("meters: up to date (50 unchanged) (")
            && up_to_date[0].contains("tenant: up to date (1 unchanged) ("),
        "{log}"
    );
    assert!(
        !log.contains("new meter") && !log.contains(" updated: "),
        "{log}"
    );
    assert_eq!(last_log(&s, "meters"), (true, 0, None));
    assert_eq!(last_log(&s, "tenant"), (true, 0, None));
}

#[test]
fn p8_a_meter_deleted_centrally_stays_locally_with_a_warning() {
    let s = Sandbox::new();
    three_meters(&s);
    add_tenant(&mut s.central(), "t-1", "Acme", None, None);
    add_tenant(&mut s.central(), "t-2", "Beta", None, None);
    once(&s);
    let before = versions(&mut s.local(), "meters");

    s.central()
        .batch_execute(
            "DELETE FROM meters WHERE meter_id = 'm-2'; DELETE FROM tenant WHERE tenant_id = 't-1'",
        )
        .unwrap();
    let run = once(&s);

    assert_eq!(
        versions(&mut s.local(), "meters"),
        before,
        "kept, untouched"
    );
    assert_eq!(s.local_count("tenant"), 2);
    let warns: Vec<&str> = run.stderr.lines().filter(|l| l.contains("WARN")).collect();
    assert!(
        warns.iter().any(
            |l| l.contains("1 meters no longer in central, kept locally") && l.ends_with(": m-2")
        ),
        "{}",
        run.stderr
    );
    assert!(
        warns
            .iter()
            .any(|l| l.contains("1 tenants no longer in central") && l.ends_with(": t-1")),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("meters: up to date (2 unchanged)"));
}

#[test]
fn p8_a_failing_table_is_left_as_it_was() {
    let s = Sandbox::new();
    three_meters(&s);
    once(&s);
    let before = dump(&mut s.local(), "meters");

    // A local rule central does not have, checked only at COMMIT: by then the
    // insert of m-4 and the update of m-1 are done, and must still roll back.
    s.local()
        .batch_execute(
            "CREATE FUNCTION no_bad_unit() RETURNS trigger LANGUAGE plpgsql AS
                 $$ BEGIN IF NEW.unit = 'bad' THEN RAISE EXCEPTION 'no_bad_unit: %', NEW.meter_id; END IF;
                    RETURN NULL; END $$;
             CREATE CONSTRAINT TRIGGER no_bad_unit AFTER INSERT OR UPDATE ON meters
                 DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION no_bad_unit();",
        )
        .unwrap();
    let mut c = s.central();
    add_meters(
        &mut c,
        &[
            ("m-4", "Fine", None, "gas", "m3", None, None),
            ("m-5", "Broken", None, "gas", "bad", None, None),
        ],
    );
    c.batch_execute("UPDATE meters SET name = 'Renamed' WHERE meter_id = 'm-1'")
        .unwrap();
    add_tenant(&mut c, "t-1", "Acme", None, None);
    let run = s.run(&["once"]);

    run.assert_code(1);
    assert_eq!(dump(&mut s.local(), "meters"), before, "all or nothing");
    let (ok, records, err) = last_log(&s, "meters");
    assert!(!ok && records == 0, "{err:?}");
    assert!(err.unwrap().contains("no_bad_unit"));
    assert!(
        !run.stderr.contains("new meter m-4"),
        "no line for a rolled-back write"
    );
    assert_eq!(
        last_log(&s, "tenant"),
        (true, 1, None),
        "the next phase still ran"
    );

    // Once the cause is gone, the next cycle catches up.
    s.local()
        .batch_execute("DROP TRIGGER no_bad_unit ON meters")
        .unwrap();
    once(&s);
    assert_eq!(
        dump(&mut s.local(), "meters"),
        dump(&mut s.central(), "meters")
    );
}

#[test]
fn p10_a_missing_central_tenant_table_fails_only_the_tenant_phase() {
    let s = Sandbox::new();
    three_meters(&s);
    s.insert_readings(5);
    s.local()
        .batch_execute("INSERT INTO tenant (tenant_id, name) VALUES ('t-old', 'Kept')")
        .unwrap();
    let tenant_before = dump(&mut s.local(), "tenant");
    s.central().batch_execute("DROP TABLE tenant").unwrap();

    let run = s.run(&["once"]);

    run.assert_code(1);
    assert!(
        run.stderr.contains("tenant phase failed")
            && run.stderr.contains(r#"relation "tenant" does not exist"#),
        "{}",
        run.stderr
    );
    assert_eq!(last_log(&s, "meters"), (true, 3, None));
    assert_eq!(
        dump(&mut s.local(), "meters"),
        dump(&mut s.central(), "meters")
    );
    let (ok, records, err) = last_log(&s, "tenant");
    assert!(!ok && records == 0);
    let err = err.expect("error_message is set");
    assert!(
        err.contains("central") && err.contains(r#"relation "tenant" does not exist"#),
        "{err}"
    );
    assert_eq!(dump(&mut s.local(), "tenant"), tenant_before);

    // The upload phase ran before and was not disturbed.
    let (ok, records, err) = last_log(&s, "upload");
    assert!(ok && records == 5, "upload: {err:?}\n{}", run.stderr);
    assert_eq!(s.central_count("meter_readings"), 5);
    assert_eq!(s.local_count("meter_readings"), 0);
}

/// Runs `once` and returns (stderr, peak RSS in KiB) of exactly that process: the
/// highest VmHWM seen in /proc/<pid>/status while it runs. (wait4's ru_maxrss is no
/// good here: it keeps the RSS the forked child inherited from this big test
/// process before exec.)
fn once_with_peak_rss(s: &Sandbox) -> (String, i64) {
    let log = s.dir.join("rss.log");
    let mut child = s
        .command(&["once"])
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let status = format!("/proc/{}/status", child.id());
    let mut peak = 0i64;
    loop {
        // Read before try_wait: a child not yet reaped is still there to read.
        let text = std::fs::read_to_string(&status).unwrap_or_default();
        if let Some(kib) = text
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<i64>().ok())
        {
            peak = peak.max(kib);
        }
        if child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    (std::fs::read_to_string(&log).unwrap(), peak)
}

/// A configuration of about 1.5 KB per meter, so that a table held in memory would
/// show in the peak RSS (20,000 × 1.5 KB ≈ 30 MB).
const BIG_CONF: &str = "jsonb_build_object('registers', (SELECT jsonb_agg(jsonb_build_object(
        'obis', '1.8.' || r, 'scale', r * 0.001, 'label', 'register number ' || r || ' of ' || g))
        FROM generate_series(1, 25) r), 'serial', md5(g::text))";

#[test]
fn p8_twenty_thousand_meters_sync_in_one_cycle_in_bounded_memory() {
    let _heavy = support::heavy_lock();
    // Baseline: the same binary syncing a handful of meters.
    let small = Sandbox::new();
    small
        .central()
        .batch_execute(&format!(
            "INSERT INTO meters (meter_id, name, meter_type, unit, configuration, updated_at)
             SELECT 'm-' || g, 'Meter ' || g, 'electricity', 'kWh', {BIG_CONF}, now()
             FROM generate_series(1, 10) g"
        ))
        .unwrap();
    let (_, rss_small) = once_with_peak_rss(&small);

    let s = Sandbox::new();
    s.central()
        .batch_execute(&format!(
            "INSERT INTO meters (meter_id, name, meter_type, unit, configuration, updated_at)
             SELECT 'm-' || lpad(g::text, 5, '0'), 'Meter ' || g, 'electricity', 'kWh', {BIG_CONF},
                    timestamptz '2026-01-01 00:00:00+00' + make_interval(secs => g)
             FROM generate_series(1, 20000) g"
        ))
        .unwrap();
    let t = std::time::Instant::now();
    let (log, rss) = once_with_peak_rss(&s);
    let elapsed = t.elapsed();
    let (ok, records, err) = last_log(&s, "meters");
    assert!(ok, "{err:?}\n{log}");
    assert_eq!(records, 20000);
    assert_eq!(
        dump(&mut s.local(), "meters"),
        dump(&mut s.central(), "meters")
    );
    assert_eq!(
        lines_with(&log, "new meter ").len(),
        1000,
        "per-row lines are capped"
    );
    assert!(log.contains("... and 19000 more new meters"), "{log}");
    eprintln!(
        "20,000 meters: first sync {} ms (whole `once`; {}), peak RSS {} KiB; 10 meters: {} KiB",
        elapsed.as_millis(),
        lines_with(&log, "meters: 20000 new").join(""),
        rss,
        rss_small
    );
    // The table is ~30 MB on the wire; holding it would add at least that much.
    assert!(
        rss - rss_small < 12 * 1024,
        "peak RSS grew with the table: {rss} KiB vs {rss_small} KiB"
    );

    // A second cycle with 1,500 changes: capped lines for the updates too.
    s.central()
        .batch_execute(
            "UPDATE meters SET configuration = configuration || '{\"rev\": 2}'
             WHERE meter_id <= 'm-01500'",
        )
        .unwrap();
    let t = std::time::Instant::now();
    let (log, rss2) = once_with_peak_rss(&s);
    let (ok, records, err) = last_log(&s, "meters");
    assert!(ok && records == 1500, "{err:?}\n{log}");
    assert_eq!(lines_with(&log, " updated: configuration").len(), 1000);
    assert!(log.contains("... and 500 more updated meters"), "{log}");
    assert!(log.contains("meters: 0 new, 1500 updated, 18500 unchanged ("));
    eprintln!(
        "20,000 meters, 1,500 changed: {} ms, peak RSS {rss2} KiB",
        t.elapsed().as_millis()
    );
}

/// Synced three meters, then central gained 5,000 big meters (~7.5 MB to stream)
/// and renamed m-1; returns the sandbox routed through a fault proxy, the proxy,
/// and the local meters as they were before the faulty cycle.
fn big_pending_change_behind_proxy() -> (Sandbox, support::proxy::Proxy, Vec<Vec<Option<String>>>) {
    let mut s = Sandbox::new();
    three_meters(&s);
    once(&s);
    let before = dump(&mut s.local(), "meters");
    s.central()
        .batch_execute(&format!(
            "INSERT INTO meters (meter_id, name, meter_type, unit, configuration, updated_at)
             SELECT 'b-' || g, 'Big ' || g, 'electricity', 'kWh', {BIG_CONF}, now()
             FROM generate_series(1, 5000) g;
             UPDATE meters SET name = 'Renamed' WHERE meter_id = 'm-1';"
        ))
        .unwrap();
    let target = format!("127.0.0.1:{}", s.central_cluster().port);
    let proxy = support::proxy::Proxy::start(target.parse().unwrap());
    s.set("POSTGRES_CLIENT_PORT", proxy.port());
    (s, proxy, before)
}

/// Waits until the meters stream is flowing: more central->gateway bytes than the
/// connection set-up and the upload phase could account for.
fn wait_mid_stream(proxy: &support::proxy::Proxy, d: &support::Daemon) {
    assert!(
        support::wait_until(Duration::from_secs(60), || proxy.bytes_forwarded().1
            > 1_000_000),
        "the meters stream never started:\n{}",
        d.log_text()
    );
}

#[test]
fn p8_a_link_cut_mid_stream_leaves_the_local_table_as_it_was() {
    let _heavy = support::heavy_lock();
    let (s, proxy, before) = big_pending_change_behind_proxy();
    let mut d = s.spawn(&["once"]);
    wait_mid_stream(&proxy, &d);
    proxy.cut();
    let code = d.wait_exit(Duration::from_secs(60)).expect("once exits");
    let log = d.log_text();

    assert_eq!(code, Some(1), "{log}");
    let (ok, _, err) = last_log(&s, "meters");
    let err = err.unwrap_or_default();
    assert!(
        !ok && err.starts_with("central: read meters"),
        "the phase must fail (or the cut came after the stream): {err}\n{log}"
    );
    assert_eq!(dump(&mut s.local(), "meters"), before, "all or nothing");
    assert!(
        !log.contains("new meter") && !log.contains(" updated: "),
        "{log}"
    );
    // The tenant phase reconnected through the proxy, which still accepts.
    assert!(last_log(&s, "tenant").0, "{log}");
    assert!(proxy.connections_total() >= 2);

    // The next cycle catches up.
    once(&s);
    assert_eq!(
        dump(&mut s.local(), "meters"),
        dump(&mut s.central(), "meters")
    );
}

#[test]
fn p18_a_link_blackholed_mid_stream_fails_the_phase_within_the_query_timeout() {
    let _heavy = support::heavy_lock();
    let (mut s, proxy, before) = big_pending_change_behind_proxy();
    s.set("DB_QUERY_TIMEOUT_MS", 1500);
    let mut d = s.spawn(&["once"]);
    wait_mid_stream(&proxy, &d);
    proxy.blackhole();
    let t = std::time::Instant::now();
    d.wait_log("meters phase failed", Duration::from_secs(30));
    let waited = t.elapsed();
    proxy.pass();
    let code = d.wait_exit(Duration::from_secs(60)).expect("once exits");
    let log = d.log_text();

    assert_eq!(code, Some(1), "{log}");
    assert!(
        waited < Duration::from_millis(1500 + 2500),
        "gave up after {waited:?}, not within the query timeout:\n{log}"
    );
    let (ok, _, err) = last_log(&s, "meters");
    assert!(
        !ok && err
            .as_deref()
            .unwrap_or("")
            .contains("no answer within 1500 ms"),
        "{err:?}\n{log}"
    );
    assert_eq!(dump(&mut s.local(), "meters"), before, "all or nothing");
    eprintln!("blackholed mid-stream: meters phase failed after {waited:?}");
}

// ---------------------------------------------------------------------------------------
// Changes only (P20, P21): a running daemon, whose first download is a full one and whose
// later ones ask central only for rows stamped past their watermark.
// ---------------------------------------------------------------------------------------

/// How many cycles the daemon has finished.
fn cycles(d: &support::Daemon) -> usize {
    d.log_text().matches("cycle finished:").count()
}

fn wait_cycles(d: &support::Daemon, n: usize) {
    assert!(
        support::wait_until(Duration::from_secs(60), || cycles(d) >= n),
        "cycle {n} never finished:\n{}",
        d.log_text()
    );
}

/// The log of cycle `i` (from 0): its lines up to its "cycle finished" line.
fn cycle_log(d: &support::Daemon, i: usize) -> String {
    let log = d.log_text();
    let mut out = vec![String::new()];
    for l in log.lines() {
        out.last_mut().unwrap().push_str(l);
        out.last_mut().unwrap().push('\n');
        if l.contains("cycle finished:") {
            out.push(String::new());
        }
    }
    out.get(i).cloned().unwrap_or_default()
}

/// Waits for the end of the first cycle that starts after this call (everything
/// committed centrally before the call is visible to it) and returns the log of that
/// cycle and of the one running at the call, if any (its downloads may have started
/// after the commit, too).
fn next_cycle(d: &support::Daemon) -> String {
    let c = cycles(d);
    wait_cycles(d, c + 2);
    cycle_log(d, c) + &cycle_log(d, c + 1)
}

/// A daemon cycling every second on `s`, after its first (full) cycle.
fn running(s: &Sandbox) -> support::Daemon {
    let d = s.spawn(&["run"]);
    wait_cycles(&d, 1);
    let first = cycle_log(&d, 0);
    assert!(
        first.contains("meters: full reconciliation (")
            && first.contains("tenant: full reconciliation ("),
        "the first download of a process is a full one:\n{first}"
    );
    d
}

#[test]
fn p20_a_central_change_arrives_in_the_next_cycle_with_its_fields_named() {
    let s = Sandbox::new();
    three_meters(&s);
    add_tenant(&mut s.central(), "t-1", "Acme", Some(r#"{"a": 1}"#), None);
    let d = running(&s);
    let idle = next_cycle(&d);
    assert!(
        idle.contains("meters: up to date (no changes centrally)")
            && idle.contains("tenant: up to date (no changes centrally)")
            && !idle.contains("full reconciliation"),
        "an idle cycle asks for changes only:\n{idle}"
    );

    s.central()
        .batch_execute(
            "UPDATE meters SET name = 'Boiler room', unit = 'kWh' WHERE meter_id = 'm-2';
             UPDATE tenant SET metadata = '{\"k\": 2}' WHERE tenant_id = 't-1';",
        )
        .unwrap();
    let log = next_cycle(&d);
    assert_eq!(
        lines_with(&log, " updated: "),
        vec![
            "meter m-2 updated: name, unit",
            "tenant t-1 updated: metadata"
        ],
        "{log}"
    );
    assert!(
        log.contains("meters: changes only: 0 new, 1 updated, 0 unchanged ("),
        "only the changed row travelled:\n{log}"
    );
    assert_eq!(
        dump(&mut s.local(), "meters"),
        dump(&mut s.central(), "meters")
    );
    assert_eq!(
        dump(&mut s.local(), "tenant"),
        dump(&mut s.central(), "tenant")
    );

    // A new meter is a change too.
    add_meters(
        &mut s.central(),
        &[("m-4", "Annex", None, "water", "m3", None, None)],
    );
    let log = next_cycle(&d);
    assert_eq!(
        lines_with(&log, "new meter "),
        vec!["new meter m-4 (Annex)"]
    );
    let logged: i64 = s
        .local()
        .query_one(
            "SELECT count(*) FROM sync_logs WHERE sync_type = 'meters' AND success AND records_processed = 1",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(logged, 2, "sync_logs counts the rows written");
}

#[test]
fn p21_a_change_committed_out_of_order_is_not_missed() {
    let s = Sandbox::new();
    three_meters(&s);
    let d = running(&s);

    // T1 changes m-1 first (so its transaction id is the older one) and stays open.
    let mut t1 = s.central();
    t1.batch_execute("BEGIN; UPDATE meters SET name = 'from T1' WHERE meter_id = 'm-1'")
        .unwrap();
    // T2 changes m-2 and commits; the gateway takes it.
    s.central()
        .batch_execute("UPDATE meters SET name = 'from T2' WHERE meter_id = 'm-2'")
        .unwrap();
    let log = next_cycle(&d);
    assert_eq!(
        lines_with(&log, " updated: "),
        vec!["meter m-2 updated: name"],
        "{log}"
    );
    let name = |id: &str| -> String {
        s.local()
            .query_one("SELECT name::text FROM meters WHERE meter_id = $1", &[&id])
            .unwrap()
            .get(0)
    };
    assert_eq!(name("m-1"), "Main hall", "T1 is not committed yet");

    // T1 commits after the gateway has moved on: its change must still arrive.
    t1.batch_execute("COMMIT").unwrap();
    let log = next_cycle(&d);
    assert_eq!(
        lines_with(&log, " updated: "),
        vec!["meter m-1 updated: name"],
        "{log}"
    );
    assert_eq!(name("m-1"), "from T1");
    assert_eq!(
        dump(&mut s.local(), "meters"),
        dump(&mut s.central(), "meters")
    );
}

#[test]
fn p21_a_delete_and_reinsert_in_one_transaction_arrives_as_an_update() {
    let s = Sandbox::new();
    three_meters(&s);
    let d = running(&s);
    s.central()
        .batch_execute(
            "BEGIN;
             DELETE FROM meters WHERE meter_id = 'm-2';
             INSERT INTO meters (meter_id, name, location_id, meter_type, unit)
                 VALUES ('m-2', 'Boiler', 'loc-C', 'heat', 'MWh');
             COMMIT;",
        )
        .unwrap();
    let log = next_cycle(&d);
    assert_eq!(
        lines_with(&log, " updated: "),
        vec!["meter m-2 updated: location_id, meter_type, unit"],
        "{log}"
    );
    assert_eq!(
        dump(&mut s.local(), "meters"),
        dump(&mut s.central(), "meters")
    );
}

#[test]
fn p21_a_jsonb_key_order_change_travels_but_writes_nothing() {
    let s = Sandbox::new();
    add_meters(
        &mut s.central(),
        &[(
            "m-1",
            "Main",
            None,
            "electricity",
            "kWh",
            Some(r#"{"b": [1, 2], "a": {"y": 1.50, "x": true}}"#),
            None,
        )],
    );
    let d = running(&s);
    let before = versions(&mut s.local(), "meters");
    s.central()
        .batch_execute(
            r#"UPDATE meters SET configuration = '{"a":{"x":true,"y":1.5},   "b":[1,2]}'"#,
        )
        .unwrap();
    let log = next_cycle(&d);
    assert!(
        log.contains("meters: changes only: 0 new, 0 updated, 1 unchanged ("),
        "the rewritten row came down and compared equal:\n{log}"
    );
    assert!(!log.contains(" updated: "), "{log}");
    assert_eq!(
        versions(&mut s.local(), "meters"),
        before,
        "no local write (xmin and ctid unchanged)"
    );
}

#[test]
fn p21_full_reconciliation_at_start_and_then_periodically_repairs_what_stamps_cannot_see() {
    let mut s = Sandbox::new();
    three_meters(&s);
    let tamper = |s: &Sandbox| {
        s.local()
            .batch_execute("UPDATE meters SET name = 'edited by hand' WHERE meter_id = 'm-1'")
            .unwrap()
    };
    let mut d = running(&s);
    // A local edit leaves central's stamps alone: changes-only cycles do not see it.
    tamper(&s);
    next_cycle(&d);
    let log = next_cycle(&d);
    assert!(!log.contains("full reconciliation"), "{log}");
    assert_ne!(
        dump(&mut s.local(), "meters"),
        dump(&mut s.central(), "meters")
    );
    // A row deleted centrally is not seen by changes-only cycles either.
    s.central()
        .batch_execute("DELETE FROM meters WHERE meter_id = 'm-3'")
        .unwrap();
    d.kill9();

    // The next start reconciles in full: repairs the edit, keeps m-3 with a warning.
    s.set("DOWNLOAD_FULL_EVERY_SECONDS", 3);
    let d = s.spawn(&["run"]);
    wait_cycles(&d, 1);
    let first = cycle_log(&d, 0);
    assert!(
        first.contains("meters: full reconciliation (first download since start)"),
        "{first}"
    );
    assert_eq!(
        lines_with(&first, " updated: "),
        vec!["meter m-1 updated: name"],
        "{first}"
    );
    assert!(
        first.lines().any(|l| l.contains("WARN")
            && l.contains("1 meters no longer in central, kept locally")
            && l.ends_with(": m-3")),
        "{first}"
    );
    assert_eq!(s.local_count("meters"), 3);

    // And then every DOWNLOAD_FULL_EVERY_SECONDS.
    tamper(&s);
    assert_repaired_by_a_periodic_reconciliation(&s, &d, 0);
}

/// Within 20 s, a periodic full reconciliation (`DOWNLOAD_FULL_EVERY_SECONDS` 3)
/// logged after byte `at` of the daemon's log has put m-1's name back.
fn assert_repaired_by_a_periodic_reconciliation(s: &Sandbox, d: &support::Daemon, at: usize) {
    assert!(
        support::wait_until(Duration::from_secs(20), || {
            d.log_text()[at..].contains("meters: full reconciliation (the last one is 3 s old)")
                && s.local()
                    .query_one("SELECT name::text FROM meters WHERE meter_id = 'm-1'", &[])
                    .unwrap()
                    .get::<_, String>(0)
                    == "Main hall"
        }),
        "no periodic reconciliation repaired the edit:\n{}",
        &d.log_text()[at..]
    );
}

/// The periodic full reconciliation keeps its schedule when the gateway's clock is
/// set back (NTP correcting a clock that ran ahead). It was due when the local
/// `now() - full_at` reached `DOWNLOAD_FULL_EVERY_SECONDS`: a full reconciliation
/// done while the clock was three years ahead left `full_at` in the future, and
/// none came for three years, so a hand edit (or a central delete) was never
/// repaired while the daemon ran.
#[test]
fn p21_the_periodic_full_reconciliation_keeps_its_schedule_when_the_clock_is_set_back() {
    let mut s = Sandbox::new();
    three_meters(&s);
    s.set("DOWNLOAD_FULL_EVERY_SECONDS", 3);
    let d = running(&s);
    // As a full reconciliation left it while the gateway's clock ran ahead.
    s.local()
        .batch_execute("UPDATE download_watermark SET full_at = now() + interval '3 years'")
        .unwrap();
    s.local()
        .batch_execute("UPDATE meters SET name = 'edited by hand' WHERE meter_id = 'm-1'")
        .unwrap();
    let at = d.log_text().len();
    assert_repaired_by_a_periodic_reconciliation(&s, &d, at);
}

#[test]
fn p20_a_central_without_change_tracking_gets_full_downloads_and_one_warning() {
    let s = Sandbox::new();
    three_meters(&s);
    // A central migrated by an older meter-sync: no change_xid column.
    s.central()
        .batch_execute(
            "DROP TRIGGER meters_change_xid ON meters; DROP TRIGGER tenant_change_xid ON tenant;
             DROP FUNCTION meter_sync_stamp_change();
             ALTER TABLE meters DROP COLUMN change_xid; ALTER TABLE tenant DROP COLUMN change_xid;
             DELETE FROM meter_sync_migrations WHERE version = 2",
        )
        .unwrap();
    let d = running(&s);
    s.central()
        .batch_execute("UPDATE meters SET name = 'Renamed' WHERE meter_id = 'm-3'")
        .unwrap();
    let log = next_cycle(&d);
    next_cycle(&d);
    assert_eq!(
        lines_with(&log, " updated: "),
        vec!["meter m-3 updated: name"],
        "{log}"
    );
    assert!(log.contains("meters: full reconciliation ("), "{log}");
    let all = d.log_text();
    assert_eq!(
        all.matches("central: meters has no change tracking")
            .count(),
        1,
        "one warning, not one per cycle:\n{all}"
    );
    assert!(!all.contains("phase failed"), "{all}");
    assert_eq!(
        dump(&mut s.local(), "meters"),
        dump(&mut s.central(), "meters")
    );
}

// ---------------------------------------------------------------------------------------
// Watchdog (P15) during a long download
// ---------------------------------------------------------------------------------------

/// About 1 KB of configuration per meter.
const KB_CONF: &str = "jsonb_build_object('registers', (SELECT jsonb_agg(jsonb_build_object(
        'obis', '1.8.' || r, 'scale', r * 0.001, 'label', 'register number ' || r || ' of ' || g))
        FROM generate_series(1, 16) r), 'serial', md5(g::text))";

fn kb_meters(s: &Sandbox, n: usize) {
    s.central()
        .batch_execute(&format!(
            "INSERT INTO meters (meter_id, name, meter_type, unit, configuration, updated_at)
             SELECT 'm-' || lpad(g::text, 6, '0'), 'Meter ' || g, 'electricity', 'kWh', {KB_CONF}, now()
             FROM generate_series(1, {n}) g;
             INSERT INTO tenant (tenant_id, name, configuration, updated_at)
             SELECT 't-' || g, 'Tenant ' || g, jsonb_build_object('tariff', g), now()
             FROM generate_series(1, 200) g;"
        ))
        .unwrap();
}

#[test]
fn p15_a_first_download_over_a_slow_uplink_keeps_feeding_the_watchdog() {
    let _heavy = support::heavy_lock();
    let mut s = Sandbox::new();
    kb_meters(&s, 2000);
    let target = format!("127.0.0.1:{}", s.central_cluster().port);
    let proxy = support::proxy::Proxy::start(target.parse().unwrap());
    proxy.throttle(96 * 1024);
    s.set("POSTGRES_CLIENT_PORT", proxy.port());
    let n = support::notify::Notifications::bind(&s.dir);
    s.set("NOTIFY_SOCKET", n.path.display());
    s.set("WATCHDOG_USEC", 4_000_000);
    s.set("DB_QUERY_TIMEOUT_MS", 60_000);

    let t = std::time::Instant::now();
    let d = s.spawn(&["run"]);
    assert!(
        support::wait_until(Duration::from_secs(120), || cycles(&d) >= 1),
        "the first cycle never finished:\n{}",
        d.log_text()
    );
    let end = std::time::Instant::now();
    let took = t.elapsed();
    let ready = n.first("READY=1").expect("READY=1 was sent");
    let gap = n.max_watchdog_gap(ready, end);
    let log = cycle_log(&d, 0);
    let (up, down) = proxy.bytes_forwarded();
    eprintln!(
        "first cycle over 96 KiB/s: {took:?}, {down} bytes down, {up} up; longest watchdog silence {gap:?}"
    );
    assert!(
        log.contains("meters: 2000 new, 0 updated, 0 unchanged (")
            && log.contains("tenant: 200 new, 0 updated, 0 unchanged ("),
        "{log}"
    );
    assert!(
        took > Duration::from_secs(10),
        "the link was not slow enough to prove anything: {took:?}"
    );
    assert!(
        gap <= Duration::from_secs(2),
        "watchdog silent for {gap:?}, more than half of WATCHDOG_USEC (4 s)"
    );
}

// ---------------------------------------------------------------------------------------
// Bounds: DOWNLOAD_MAX_ROWS, DOWNLOAD_MAX_BYTES, and one row's size
// ---------------------------------------------------------------------------------------

/// Runs `once` expecting the meters phase to fail with `error` while tenants still
/// sync; the local meters must be as before.
fn assert_meters_refused(s: &Sandbox, run: &Run, error: &str, before: &[Vec<Option<String>>]) {
    run.assert_code(1);
    let (ok, records, err) = last_log(s, "meters");
    assert!(!ok && records == 0, "{err:?}");
    assert_eq!(err.as_deref(), Some(error), "{}", run.stderr);
    let failed: Vec<&str> = run
        .stderr
        .lines()
        .filter(|l| l.contains("meters phase failed"))
        .collect();
    assert_eq!(failed.len(), 1, "{}", run.stderr);
    assert!(failed[0].ends_with(error), "{}", failed[0]);
    assert_eq!(
        dump(&mut s.local(), "meters"),
        before,
        "local meters unchanged"
    );
    assert_eq!(last_log(s, "tenant"), (true, 1, None), "the next phase ran");
}

#[test]
fn p20_over_download_max_rows_the_phase_fails_and_the_table_stays() {
    let mut s = Sandbox::new();
    three_meters(&s);
    once(&s);
    let before = dump(&mut s.local(), "meters");
    add_meters(
        &mut s.central(),
        &[
            ("m-4", "Four", None, "gas", "m3", None, None),
            ("m-5", "Five", None, "gas", "m3", None, None),
        ],
    );
    add_tenant(&mut s.central(), "t-1", "Acme", None, None);
    s.set("DOWNLOAD_MAX_ROWS", 4);
    let run = s.run(&["once"]);
    assert_meters_refused(
        &s,
        &run,
        "meters: 5 rows to download, more than DOWNLOAD_MAX_ROWS (4); the local table is left as it was",
        &before,
    );
    s.set("DOWNLOAD_MAX_ROWS", 5);
    once(&s);
    assert_eq!(s.local_count("meters"), 5);
}

#[test]
fn p20_over_download_max_bytes_the_phase_fails_and_the_table_stays() {
    let mut s = Sandbox::new();
    s.central()
        .batch_execute(&format!(
            "INSERT INTO meters (meter_id, name, meter_type, unit, configuration, updated_at)
             SELECT 'm-' || g, 'Meter ' || g, 'electricity', 'kWh', {BIG_CONF}, now()
             FROM generate_series(1, 100) g"
        ))
        .unwrap();
    add_tenant(&mut s.central(), "t-1", "Acme", None, None);
    let bytes: i64 = s
        .central()
        .query_one(
            "SELECT sum(octet_length(ROW(meter_id::text, name::text, location_id::text, meter_type::text,
                    unit::text, configuration, updated_at)::text)) FROM meters",
            &[],
        )
        .unwrap()
        .get(0);
    s.set("DOWNLOAD_MAX_BYTES", 100_000);
    let run = s.run(&["once"]);
    assert_meters_refused(
        &s,
        &run,
        &format!(
            "meters: {bytes} bytes to download, more than DOWNLOAD_MAX_BYTES (100000); \
             the local table is left as it was"
        ),
        &[],
    );
}

#[test]
fn p20_a_single_oversized_row_is_refused_before_it_is_sent() {
    let _heavy = support::heavy_lock();
    let s = Sandbox::new();
    three_meters(&s);
    once(&s);
    let before = dump(&mut s.local(), "meters");
    let (_, rss_small) = once_with_peak_rss(&s);
    // 20 MB of configuration in one row (it compresses to almost nothing centrally).
    s.central()
        .batch_execute(
            "UPDATE meters SET configuration = jsonb_build_object('blob', repeat('x', 20000000))
             WHERE meter_id = 'm-2'",
        )
        .unwrap();
    add_tenant(&mut s.central(), "t-1", "Acme", None, None);
    let (log, rss) = once_with_peak_rss(&s);
    let (ok, _, err) = last_log(&s, "meters");
    let err = err.unwrap_or_default();
    assert!(
        !ok && err.starts_with("meters: a row of 200000")
            && err.ends_with(
                "bytes, more than the 16777216 bytes one row may have; the local table is left as it was"
            ),
        "{err}\n{log}"
    );
    assert_eq!(dump(&mut s.local(), "meters"), before);
    assert!(last_log(&s, "tenant").0, "{log}");
    eprintln!("oversized row refused: peak RSS {rss} KiB (a cycle without it: {rss_small} KiB)");
    assert!(
        rss - rss_small < 8 * 1024,
        "the 20 MB row was held in memory: {rss} KiB vs {rss_small} KiB"
    );
}

// ---------------------------------------------------------------------------------------
// This gateway's rows only: the row-level security recipe (deploy/central/rls-recipe.sql)
// ---------------------------------------------------------------------------------------

const RLS_RECIPE: &str = include_str!("../deploy/central/rls-recipe.sql");
/// The heartbeat's own recipe (issue 13b), with the same group role.
const STATUS_RLS_RECIPE: &str = include_str!("../deploy/central/gateway-status-rls.sql");
const GATEWAY_PASSWORD: &str = "gw-Pa55word";

/// 2,000 meters and 20 tenants centrally, the recipe applied, and two gateway roles:
/// this sandbox's (50 meters: every 40th, and 2 tenants) and another one's (50 other
/// meters). The daemon logs in as this sandbox's role. Returns (role, other role).
fn rls_sandbox(s: &mut Sandbox) -> (String, String) {
    let role = format!("gw_{}", s.central_db);
    let other = format!("gw_other_{}", s.central_db);
    let mut c = s.central();
    c.batch_execute(
        "INSERT INTO meters (meter_id, name, location_id, meter_type, unit, configuration, updated_at)
         SELECT 'm-' || lpad(g::text, 6, '0'), 'Meter ' || g, 'site-' || (g % 97), 'electricity', 'kWh',
                jsonb_build_object('register', g % 8, 'scale', 0.001), now() - interval '30 days'
         FROM generate_series(1, 2000) g;
         INSERT INTO tenant (tenant_id, name, configuration, updated_at)
         SELECT 't-' || g, 'Tenant ' || g, jsonb_build_object('tariff', g), now()
         FROM generate_series(1, 20) g;",
    )
    .unwrap();
    {
        // The recipes create the cluster-wide group role if it is missing; two tests
        // doing that at the same moment collide on pg_authid's unique index (23505).
        static RECIPES: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _one_at_a_time = RECIPES.lock().unwrap_or_else(|e| e.into_inner());
        c.batch_execute(RLS_RECIPE).unwrap();
        c.batch_execute(STATUS_RLS_RECIPE).unwrap();
    }
    c.batch_execute(&format!(
        "CREATE ROLE {role} LOGIN PASSWORD '{GATEWAY_PASSWORD}' IN ROLE meter_sync_gateway;
         CREATE ROLE {other} LOGIN PASSWORD '{GATEWAY_PASSWORD}' IN ROLE meter_sync_gateway;
         INSERT INTO gateway_meters SELECT '{role}', meter_id FROM meters
             WHERE right(meter_id, 6)::int % 40 = 0;
         INSERT INTO gateway_meters SELECT '{other}', meter_id FROM meters
             WHERE right(meter_id, 6)::int % 40 = 1;
         INSERT INTO gateway_tenants VALUES ('{role}', 't-1'), ('{role}', 't-2'), ('{other}', 't-3');"
    ))
    .unwrap();
    s.set("POSTGRES_CLIENT_USER", &role)
        .set("POSTGRES_CLIENT_PASSWORD", GATEWAY_PASSWORD)
        .set("METER_SYNC_GATEWAY_ID", &role);
    (role, other)
}

/// The central rows assigned to `role`, dumped like [`dump`] (as the superuser).
fn assigned_dump(s: &Sandbox, table: &str, role: &str) -> Vec<Vec<Option<String>>> {
    let (assign, key) = match table {
        "meters" => ("gateway_meters", "meter_id"),
        _ => ("gateway_tenants", "tenant_id"),
    };
    let mut c = s.central();
    dump(&mut c, table)
        .into_iter()
        .filter(|r| {
            let id = r[0].clone().unwrap();
            c.query_one(
                &format!("SELECT count(*) FROM {assign} WHERE gateway_role = $1 AND {key} = $2"),
                &[&role, &id],
            )
            .unwrap()
            .get::<_, i64>(0)
                == 1
        })
        .collect()
}

#[test]
fn p21_rls_a_gateway_holds_exactly_its_meters_gets_later_assignments_and_keeps_unassigned_ones() {
    let mut s = Sandbox::new();
    let (role, _) = rls_sandbox(&mut s);
    once(&s);
    assert_eq!(s.local_count("meters"), 50);
    assert_eq!(
        dump(&mut s.local(), "meters"),
        assigned_dump(&s, "meters", &role)
    );
    assert_eq!(
        dump(&mut s.local(), "tenant"),
        assigned_dump(&s, "tenant", &role)
    );

    // An old, unchanged meter assigned later arrives within 3 cycles.
    let d = running(&s);
    s.central()
        .batch_execute(&format!(
            "INSERT INTO gateway_meters VALUES ('{role}', 'm-000007');
             INSERT INTO gateway_tenants VALUES ('{role}', 't-9');"
        ))
        .unwrap();
    let c = cycles(&d);
    assert!(
        support::wait_until(Duration::from_secs(30), || s.local_count("meters") == 51
            && s.local_count("tenant") == 3),
        "the assigned meter did not arrive:\n{}",
        d.log_text()
    );
    assert!(
        cycles(&d) <= c + 3,
        "took more than 3 cycles: {} -> {}",
        c,
        cycles(&d)
    );
    assert!(d.log_text().contains("new meter m-000007 (Meter 7)"));
    assert!(d.log_text().contains("new tenant t-9 (Tenant 9)"));
    drop(d);
    assert_eq!(
        dump(&mut s.local(), "meters"),
        assigned_dump(&s, "meters", &role)
    );

    // Unassigned: kept locally, and the full reconciliation says why it is missing.
    s.central()
        .batch_execute(&format!(
            "DELETE FROM gateway_meters WHERE gateway_role = '{role}' AND meter_id = 'm-000040'"
        ))
        .unwrap();
    let run = once(&s);
    assert_eq!(s.local_count("meters"), 51);
    assert!(
        run.stderr.lines().any(|l| l.contains("WARN")
            && l.contains(
                "1 meters no longer visible to this gateway (unassigned from it, or deleted centrally), kept locally"
            )
            && l.ends_with(": m-000040")),
        "{}",
        run.stderr
    );
}

#[test]
fn p21_rls_a_gateway_role_has_least_privilege_and_uploads_only_its_own_readings() {
    let mut s = Sandbox::new();
    let (role, other) = rls_sandbox(&mut s);
    let mut gw = s.central_as(&role);

    // It reads its own meters only.
    let n: i64 = gw
        .query_one("SELECT count(*) FROM meters", &[])
        .unwrap()
        .get(0);
    assert_eq!(n, 50);
    let foreign = gw
        .query(
            "SELECT m.meter_id FROM meters m WHERE m.meter_id = 'm-000001'",
            &[],
        )
        .unwrap();
    assert!(foreign.is_empty(), "another gateway's meter is visible");
    let assigned: i64 = gw
        .query_one("SELECT count(*) FROM gateway_meters", &[])
        .unwrap()
        .get(0);
    assert_eq!(assigned, 50, "it sees its own assignments only");

    // It writes neither meters nor tenant.
    for sql in [
        "UPDATE meters SET name = 'x' WHERE meter_id = 'm-000040'",
        "INSERT INTO meters (meter_id, name, meter_type, unit) VALUES ('evil', 'x', 'x', 'x')",
        "DELETE FROM meters",
        "UPDATE tenant SET name = 'x'",
        "INSERT INTO tenant (tenant_id, name) VALUES ('evil', 'x')",
        "INSERT INTO gateway_meters VALUES (current_user, 'm-000001')",
    ] {
        let e = gw.batch_execute(sql).expect_err(sql);
        assert_eq!(
            e.code(),
            Some(&postgres::error::SqlState::INSUFFICIENT_PRIVILEGE),
            "{sql}: {e:?}"
        );
    }
    // Readings for a meter assigned to another gateway are refused by the policy.
    let e = gw
        .batch_execute(
            "INSERT INTO meter_readings (reading_uid, meter_id, \"timestamp\", value, unit)
             VALUES (gen_random_uuid(), 'm-000001', now(), 1, 'kWh')",
        )
        .expect_err("a reading for a foreign meter");
    assert!(
        format!("{e:?}").contains("violates row-level security policy"),
        "{e:?}"
    );
    // Its own meters' readings are accepted.
    gw.batch_execute(
        "INSERT INTO meter_readings (reading_uid, meter_id, \"timestamp\", value, unit)
         VALUES (gen_random_uuid(), 'm-000080', now(), 1, 'kWh')",
    )
    .unwrap();
    // Nor can it read back readings (billing data), not even its own.
    let e = gw
        .query("SELECT value FROM meter_readings", &[])
        .expect_err("readings are not readable");
    assert_eq!(
        e.code(),
        Some(&postgres::error::SqlState::INSUFFICIENT_PRIVILEGE)
    );
    drop(gw);
    assert!(s
        .central_as(&other)
        .query("SELECT 1 FROM meters WHERE meter_id = 'm-000040'", &[])
        .unwrap()
        .is_empty());

    // The daemon, logged in as that role, uploads its readings (ON CONFLICT arbiter,
    // id sequence) and downloads its meters.
    s.local()
        .batch_execute(
            "INSERT INTO meter_readings (meter_id, \"timestamp\", value, unit)
             SELECT 'm-000040', timestamptz '2026-01-01 00:00:00+00' + make_interval(secs => g), g, 'kWh'
             FROM generate_series(1, 30) g",
        )
        .unwrap();
    let run = once(&s);
    assert!(
        !run.stderr.contains("heartbeat failed"),
        "the heartbeat works with these privileges too:\n{}",
        run.stderr
    );
    let beats: i64 = s
        .central()
        .query_one(
            "SELECT count(*) FROM gateway_status WHERE gateway_id = $1",
            &[&role],
        )
        .unwrap()
        .get(0);
    assert_eq!(beats, 1, "{}", run.stderr);
    assert_eq!(s.central_count("meter_readings"), 31);
    assert_eq!(s.local_count("meter_readings"), 0);
    assert_eq!(s.local_count("meters"), 50);
}

/// Tuples central's `meters` has handed out to scans so far (sequential and index).
fn meters_tuples_read(s: &Sandbox) -> i64 {
    let mut c = s.central();
    c.batch_execute("SELECT pg_stat_clear_snapshot()").unwrap();
    c.query_one(
        "SELECT (SELECT seq_tup_read FROM pg_stat_user_tables WHERE relname = 'meters')
              + (SELECT sum(idx_tup_read)::bigint FROM pg_stat_user_indexes WHERE relname = 'meters')",
        &[],
    )
    .unwrap()
    .get(0)
}

/// With row-level security, the idle probe (`change_xid >= watermark`) passes every
/// row any gateway changed since this one's watermark and filters each through the
/// policy; nothing visible means nothing is downloaded, so the watermark used not to
/// move until this gateway's own rows changed or the daily full reconciliation ran.
/// In a fleet the other gateways' changes pile up behind it: with 1,000,000 of them,
/// the probe of a gateway that sees 50 rows took 560 ms and 15,600 buffers on central
/// (EXPLAIN ANALYZE, docs/download.md), twice a cycle for each of 10,000 gateways.
/// An idle probe now also returns its snapshot's xmin, and the next probe starts there.
#[test]
fn p20_rls_the_idle_probe_does_not_rescan_other_gateways_changes_every_cycle() {
    let mut s = Sandbox::new();
    let (role, _) = rls_sandbox(&mut s);
    let d = running(&s);
    wait_cycles(&d, 2);
    // Every meter of the other gateways changes once, none of this one's.
    s.central()
        .execute(
            "UPDATE meters SET name = name || '.' WHERE meter_id NOT IN
                 (SELECT meter_id FROM gateway_meters WHERE gateway_role = $1)",
            &[&role],
        )
        .unwrap();
    let others = 2000 - 50;
    // Reads per idle cycle, over windows of 3 cycles: the first probe after the
    // update passes the 1,950 changed rows; later ones must not (a concurrent test's
    // open transaction may hold the snapshot's xmin back for a while, hence a window
    // that slides until it is past).
    let mut seen = Vec::new();
    let mut cheap = false;
    for _ in 0..8 {
        let (c0, r0) = (cycles(&d), meters_tuples_read(&s));
        wait_cycles(&d, c0 + 3);
        // Statistics reach the view up to a second after the statement.
        std::thread::sleep(Duration::from_millis(1100));
        let (c1, r1) = (cycles(&d), meters_tuples_read(&s));
        let per_cycle = (r1 - r0) / (c1 - c0).max(1) as i64;
        seen.push(per_cycle);
        if per_cycle < 100 {
            cheap = true;
            break;
        }
    }
    assert!(
        cheap,
        "every idle cycle still scans the {others} rows other gateways changed; \
         tuples read per cycle, window by window: {seen:?}"
    );
    eprintln!("tuples read per idle cycle after the other gateways' changes: {seen:?}");
    assert_eq!(s.local_count("meters"), 50);

    // A meter of this gateway that changes after the watermark moved still arrives.
    s.central()
        .batch_execute("UPDATE meters SET name = 'Renamed' WHERE meter_id = 'm-000080'")
        .unwrap();
    assert!(
        support::wait_until(Duration::from_secs(30), || s
            .local()
            .query_one("SELECT name FROM meters WHERE meter_id = 'm-000080'", &[])
            .unwrap()
            .get::<_, String>(0)
            == "Renamed"),
        "{}",
        d.log_text()
    );
}

#[test]
fn p8_staging_never_writes_a_permanent_table_of_the_same_name() {
    let s = Sandbox::new();
    three_meters(&s);
    // A permanent table named like the staging table, found before pg_temp on the
    // search path: an unqualified name would stage into it (and leave rows there).
    s.local()
        .batch_execute(&format!(
            "CREATE TABLE public.tmp_meters (meter_id text PRIMARY KEY, name text, location_id text,
                 meter_type text, unit text, configuration jsonb, updated_at timestamptz);
             ALTER DATABASE \"{}\" SET search_path = public, pg_temp;",
            s.local_db
        ))
        .unwrap();
    once(&s);
    assert_eq!(s.local_count("public.tmp_meters"), 0);
    assert_eq!(
        dump(&mut s.local(), "meters"),
        dump(&mut s.central(), "meters")
    );
}

/// The local watermark of `table` (the xmin of central's snapshot at its last download).
fn watermark(s: &Sandbox, table: &str) -> i64 {
    s.local()
        .query_one(
            "SELECT watermark FROM download_watermark WHERE table_name = $1",
            &[&table],
        )
        .unwrap()
        .get(0)
}

/// Uses up central transaction ids (one per committed transaction) until its
/// counter is past `target`.
fn advance_xids_past(c: &mut Client, target: i64) {
    c.batch_execute(&format!(
        "DO $$ BEGIN WHILE pg_current_xact_id() <= '{target}'::xid8 LOOP COMMIT; END LOOP; END $$"
    ))
    .unwrap();
}

/// P21, P23: central is replaced by a copy of itself made earlier (a restore from a
/// file-level backup; a lagging async standby promoted is the same case with a small
/// gap), and the copy's transaction counter has passed the gateway's watermark by
/// the time the gateway meets it, so "central's counter is behind the watermark"
/// cannot tell. The same running daemon must still notice that central is not the
/// server its watermark came from and reconcile in full: the change made on the copy
/// (stamped with a reused id below the old watermark) arrives, and the change the
/// copy lost goes back to central's value.
#[test]
fn p21_a_central_restored_from_an_earlier_copy_is_reconciled_by_the_same_process() {
    let central: &'static support::Cluster =
        Box::leak(Box::new(support::Cluster::start(support::Role::Central)));
    let (local, _) = support::shared();
    let name = format!("rst{}", std::process::id());
    local.create_db(&name);
    central.create_db(&name);
    let s = Sandbox::on(local, central, &name, &name);
    s.migrate();
    three_meters(&s);

    // The "backup": a file-level copy of central's data directory, taken now.
    let data = central.data.clone();
    let backup = central.root.join("data.backup");
    let copy_dir = |from: &std::path::Path, to: &std::path::Path| {
        let st = std::process::Command::new("cp")
            .arg("-a")
            .arg(from)
            .arg(to)
            .status()
            .unwrap();
        assert!(st.success(), "cp -a {} {}", from.display(), to.display());
    };
    central.stop();
    copy_dir(&data, &backup);
    central.restart();

    // Server A: the daemon reconciles, then applies a change made after the copy,
    // and its watermark moves about 2,000 transaction ids past the copy's counter.
    let d = running(&s);
    let mut a = s.central();
    let copy_counter: i64 = a
        .query_one("SELECT pg_current_xact_id()::text::bigint", &[])
        .unwrap()
        .get(0);
    advance_xids_past(&mut a, copy_counter + 2000);
    a.batch_execute("UPDATE meters SET name = 'renamed on A' WHERE meter_id = 'm-1'")
        .unwrap();
    drop(a);
    let log = next_cycle(&d);
    assert_eq!(
        lines_with(&log, " updated: "),
        vec!["meter m-1 updated: name"],
        "{log}"
    );
    let wm = watermark(&s, "meters");
    assert!(wm > copy_counter + 2000, "watermark {wm}");

    // The gateway is out of touch (paused) while A is replaced by the copy, B. On
    // B a meter is renamed, stamped with an id below the gateway's watermark, and
    // the fleet's traffic then takes B's counter past that watermark.
    d.signal(libc::SIGSTOP);
    central.stop();
    std::fs::rename(&data, central.root.join("data.a")).unwrap();
    std::fs::rename(&backup, &data).unwrap();
    central.restart();
    let mut b = s.central();
    b.batch_execute("UPDATE meters SET name = 'renamed on B' WHERE meter_id = 'm-2'")
        .unwrap();
    let stamp: i64 = b
        .query_one(
            "SELECT change_xid::text::bigint FROM meters WHERE meter_id = 'm-2'",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(stamp < wm, "B's change is stamped {stamp}, below {wm}");
    advance_xids_past(&mut b, wm + 100);
    drop(b);
    d.signal(libc::SIGCONT);

    // Within a couple of cycles (the first may fail on the lost connection), the
    // same process holds exactly B's meters.
    let central_meters = dump(&mut s.central(), "meters");
    let in_line = support::wait_until(Duration::from_secs(30), || {
        dump(&mut s.local(), "meters") == central_meters
    });
    let log = d.log_text();
    assert!(
        in_line,
        "the running daemon never reconciled with the replaced central:\n{log}"
    );
    let mut d = d;
    assert!(
        d.wait_exit(Duration::from_millis(10)).is_none(),
        "the daemon exited:\n{log}"
    );
    assert!(
        log.contains("meters: full reconciliation (central is not the server"),
        "{log}"
    );
}

/// A sandbox on a central cluster of its own (the test stops and restarts it),
/// migrated, with the three meters and one tenant.
fn on_own_central(prefix: &str) -> (&'static support::Cluster, Sandbox) {
    let central: &'static support::Cluster =
        Box::leak(Box::new(support::Cluster::start(support::Role::Central)));
    let (local, _) = support::shared();
    let name = format!("{prefix}{}", std::process::id());
    local.create_db(&name);
    central.create_db(&name);
    let s = Sandbox::on(local, central, &name, &name);
    s.migrate();
    three_meters(&s);
    add_tenant(&mut s.central(), "t-1", "Acme", Some(r#"{"a": 1}"#), None);
    (central, s)
}

/// Stops and restarts `central` under the running daemon `d` and returns the log
/// from the restart on, once the tenant phase has said whether it verified or
/// copied (it runs after the meters phase has committed, so both have answered).
fn restart_central(central: &support::Cluster, d: &support::Daemon) -> String {
    central.stop();
    central.restart();
    let at = d.log_text().len();
    assert!(
        support::wait_until(Duration::from_secs(30), || {
            let log = d.log_text();
            log[at..].contains("tenant: central restarted;")
                || log[at..].contains("tenant: full reconciliation")
        }),
        "{}",
        &d.log_text()[at..]
    );
    d.log_text()[at..].to_string()
}

/// When `table`'s last full reconciliation was, as text.
fn full_at(s: &Sandbox, table: &str) -> String {
    s.local()
        .query_one(
            "SELECT full_at::text FROM download_watermark WHERE table_name = $1",
            &[&table],
        )
        .unwrap()
        .get(0)
}

/// A plain restart of central (a minor upgrade, say) changes its start time, but
/// not a row: the running daemon compares a digest of central's rows with one of
/// its own, finds them equal and takes the new server's watermark without copying
/// the table (a fleet restarting central would otherwise copy every table at once).
/// The daily full reconciliation stays where it was.
#[test]
fn p21_a_plain_central_restart_is_verified_by_digest_without_a_full_copy() {
    let (central, mut s) = on_own_central("rsv");
    // 2,000 meters of about 1.5 KB: a full copy is about 3 MB.
    s.central()
        .batch_execute(&format!(
            "INSERT INTO meters (meter_id, name, meter_type, unit, configuration, updated_at)
             SELECT 'b-' || g, 'Big ' || g, 'electricity', 'kWh', {BIG_CONF}, now()
             FROM generate_series(1, 1997) g"
        ))
        .unwrap();
    let target = format!("127.0.0.1:{}", central.port);
    let proxy = support::proxy::Proxy::start(target.parse().unwrap());
    s.set("POSTGRES_CLIENT_PORT", proxy.port());
    let d = running(&s);
    let first_down = proxy.bytes_forwarded().1;
    assert!(
        first_down > 2_000_000,
        "the first full copy: {first_down} bytes"
    );
    next_cycle(&d);
    let (meters_full_at, tenant_full_at) = (full_at(&s, "meters"), full_at(&s, "tenant"));

    central.stop();
    central.restart();
    let before = proxy.bytes_forwarded().1;
    let at = d.log_text().len();
    let verified = "meters: central restarted; local copy verified identical (2000 rows), \
                    no full copy needed";
    assert!(
        support::wait_until(Duration::from_secs(30), || d.log_text()[at..]
            .contains(verified)
            && d.log_text()[at..].contains(
                "tenant: central restarted; local copy verified identical (1 rows), \
                 no full copy needed"
            )),
        "no verification after the restart:\n{}",
        &d.log_text()[at..]
    );
    // The watermark now belongs to the restarted server: the next cycle is idle.
    let idle = next_cycle(&d);
    assert!(
        idle.contains("meters: up to date (no changes centrally)")
            && idle.contains("tenant: up to date (no changes centrally)"),
        "{idle}"
    );
    let after = &d.log_text()[at..];
    assert!(!after.contains("full reconciliation"), "{after}");
    let down = proxy.bytes_forwarded().1 - before;
    eprintln!("after the restart: {down} bytes from central; the first full copy: {first_down}");
    assert!(
        down < 100_000,
        "{down} bytes from central after the restart (a full copy is {first_down})\n{after}"
    );
    assert_eq!(
        full_at(&s, "meters"),
        meters_full_at,
        "the daily timer stays"
    );
    assert_eq!(
        full_at(&s, "tenant"),
        tenant_full_at,
        "the daily timer stays"
    );
    assert_eq!(
        dump(&mut s.local(), "meters"),
        dump(&mut s.central(), "meters")
    );
}

/// A change the stamps cannot see (made with the change-tracking trigger disabled)
/// and then a central restart: the digests differ, so the restart still means a
/// full reconciliation, which repairs the row.
#[test]
fn p21_a_central_restart_after_an_unstamped_change_is_reconciled_in_full() {
    let (central, s) = on_own_central("rsc");
    let d = running(&s);
    s.central()
        .batch_execute(
            "ALTER TABLE meters DISABLE TRIGGER meters_change_xid;
             UPDATE meters SET name = 'renamed unstamped' WHERE meter_id = 'm-2';
             ALTER TABLE meters ENABLE ALWAYS TRIGGER meters_change_xid;",
        )
        .unwrap();
    let idle = next_cycle(&d);
    assert!(
        idle.contains("meters: up to date (no changes centrally)"),
        "the stamps do not show the change:\n{idle}"
    );
    assert_ne!(
        dump(&mut s.local(), "meters"),
        dump(&mut s.central(), "meters")
    );

    central.stop();
    central.restart();
    let at = d.log_text().len();
    let central_meters = dump(&mut s.central(), "meters");
    assert!(
        support::wait_until(Duration::from_secs(30), || dump(&mut s.local(), "meters")
            == central_meters),
        "the restart did not repair the unstamped change:\n{}",
        &d.log_text()[at..]
    );
    // The tenant phase runs after the meters commit: wait for its line too.
    support::wait_until(Duration::from_secs(10), || {
        d.log_text()[at..].contains("tenant: central restarted;")
            || d.log_text()[at..].contains("tenant: full reconciliation")
    });
    let after = d.log_text()[at..].to_string();
    assert!(
        after.contains("meters: full reconciliation (central is not the server")
            && after.contains("or failed over, and the local copy differs)"),
        "{after}"
    );
    assert!(
        !after.contains("meters: central restarted; local copy verified"),
        "{after}"
    );
    assert_eq!(
        lines_with(&after, " updated: "),
        vec!["meter m-2 updated: name"],
        "{after}"
    );
    // The tenant table did not change: it is verified, not copied.
    assert!(
        after.contains("tenant: central restarted; local copy verified identical (1 rows)"),
        "{after}"
    );
}

/// A non-superuser login role on `s`'s central with what a gateway needs there
/// (SELECT on the downloaded tables, its heartbeat row); the daemon logs in as it.
fn as_gateway_role(s: &mut Sandbox, role: &str) {
    s.central()
        .batch_execute(&format!(
            "CREATE ROLE {role} LOGIN PASSWORD '{GATEWAY_PASSWORD}';
             GRANT SELECT ON meters, tenant TO {role};
             GRANT SELECT, INSERT, UPDATE ON gateway_status TO {role};"
        ))
        .unwrap();
    s.set("POSTGRES_CLIENT_USER", role)
        .set("POSTGRES_CLIENT_PASSWORD", GATEWAY_PASSWORD);
}

/// Central refuses the digest (md5 not executable by the gateway's role, as under
/// FIPS) after a restart: the download copies the table in full once, succeeds,
/// stores the new server's watermark, and the cycles after it are idle again: no
/// failed phase, no full copy every cycle.
#[test]
fn p21_a_central_restart_when_central_refuses_the_digest_is_reconciled_in_full_once() {
    let (central, mut s) = on_own_central("rmd");
    as_gateway_role(&mut s, &format!("gw_md5_{}", std::process::id()));
    let d = running(&s);
    next_cycle(&d);

    s.central()
        .batch_execute("REVOKE EXECUTE ON FUNCTION md5(text) FROM PUBLIC")
        .unwrap();
    central.stop();
    central.restart();
    // A change made after the restart (stamped on the new server) and one with the
    // stamps off: the full copy brings both.
    s.central()
        .batch_execute(
            "UPDATE meters SET name = 'renamed after restart' WHERE meter_id = 'm-1';
             ALTER TABLE meters DISABLE TRIGGER meters_change_xid;
             UPDATE meters SET unit = 'Wh' WHERE meter_id = 'm-2';
             ALTER TABLE meters ENABLE ALWAYS TRIGGER meters_change_xid;",
        )
        .unwrap();
    let at = d.log_text().len();
    let central_meters = dump(&mut s.central(), "meters");
    assert!(
        support::wait_until(Duration::from_secs(30), || dump(&mut s.local(), "meters")
            == central_meters),
        "the restart without a digest was never reconciled:\n{}",
        &d.log_text()[at..]
    );
    // Then: idle cycles, no more full copies, every phase succeeding.
    let idle = next_cycle(&d);
    assert!(
        idle.contains("meters: up to date (no changes centrally)")
            && idle.contains("tenant: up to date (no changes centrally)"),
        "after the full copy the watermark belongs to the restarted server:\n{}",
        &d.log_text()[at..]
    );
    let after = d.log_text()[at..].to_string();
    for table in ["meters", "tenant"] {
        assert_eq!(
            lines_with(&after, &format!("{table}: full reconciliation (")).len(),
            1,
            "{table}: one full copy after the restart:\n{after}"
        );
        assert!(last_log(&s, table).0, "{table} failed:\n{after}");
    }
    assert!(
        after.contains("its digest failed") && after.contains("md5"),
        "the log says why the digest was not used:\n{after}"
    );
    assert!(!after.contains("verified identical"), "{after}");
    assert_eq!(
        lines_with(&after, " updated: "),
        vec!["meter m-1 updated: name", "meter m-2 updated: unit"],
        "{after}"
    );
}

/// Central's gateway role and the local database carry other text-form settings
/// (time zone, date style, interval style, float digits): timestamps still arrive
/// exactly, and after a central restart the two digests are still equal (the
/// restart costs no full copy).
#[test]
fn p21_a_central_restart_with_other_date_and_time_settings_is_still_verified_by_digest() {
    let (central, mut s) = on_own_central("rtz");
    let role = format!("gw_tz_{}", std::process::id());
    as_gateway_role(&mut s, &role);
    s.central()
        .batch_execute(&format!(
            "ALTER ROLE {role} SET TimeZone = 'America/New_York';
             ALTER ROLE {role} SET DateStyle = 'SQL, DMY';
             ALTER ROLE {role} SET IntervalStyle = 'sql_standard';
             ALTER ROLE {role} SET extra_float_digits = -15;"
        ))
        .unwrap();
    s.local()
        .batch_execute(&format!(
            "ALTER DATABASE {db} SET TimeZone = 'Asia/Kolkata';
             ALTER DATABASE {db} SET DateStyle = 'German, YMD';
             ALTER DATABASE {db} SET IntervalStyle = 'postgres_verbose';",
            db = s.local_db
        ))
        .unwrap();
    let d = running(&s);
    for table in ["meters", "tenant"] {
        assert_eq!(
            dump(&mut s.local(), table),
            dump(&mut s.central(), table),
            "{table}"
        );
    }
    next_cycle(&d);

    let after = restart_central(central, &d);
    assert!(
        after.contains("meters: central restarted; local copy verified identical (3 rows)")
            && after.contains("tenant: central restarted; local copy verified identical (1 rows)")
            && !after.contains("full reconciliation"),
        "the settings must not make the digests differ:\n{after}"
    );
}

/// P22 after a central restart: through PgBouncer in transaction pooling mode
/// (every transaction may meet another backend), the restart is verified by digest
/// on the connection the daemon keeps to PgBouncer, and a change made after it
/// arrives in the changes-only cycles that follow.
#[test]
fn p22_a_central_restart_behind_pgbouncer_is_verified_by_digest() {
    if support::pgbouncer::binary().is_none() {
        eprintln!("skipped: pgbouncer is not installed (.ci/setup installs it)");
        return;
    }
    let (central, mut s) = on_own_central("rpb");
    let pb = support::pgbouncer::PgBouncer::start(
        central,
        &support::pgbouncer::Settings {
            extra: "server_round_robin = 1\nmin_pool_size = 2\n".into(),
            ..Default::default()
        },
    );
    s.set("POSTGRES_CLIENT_PORT", pb.port)
        .unset("DB_CONNECTION_TIMEOUT_MS")
        .unset("MAX_CONNECTION_RETRIES");
    let d = running(&s);
    next_cycle(&d);

    central.stop();
    central.restart();
    let at = d.log_text().len();
    assert!(
        support::wait_until(Duration::from_secs(60), || {
            let log = d.log_text();
            log[at..].contains("meters: central restarted; local copy verified identical (3 rows)")
                && log[at..]
                    .contains("tenant: central restarted; local copy verified identical (1 rows)")
        }),
        "no verification through PgBouncer after the restart:\n{}",
        &d.log_text()[at..]
    );
    s.central()
        .batch_execute("UPDATE meters SET name = 'renamed after restart' WHERE meter_id = 'm-3'")
        .unwrap();
    let log = next_cycle(&d);
    assert_eq!(
        lines_with(&log, " updated: "),
        vec!["meter m-3 updated: name"],
        "{log}"
    );
    let after = d.log_text()[at..].to_string();
    assert!(!after.contains("full reconciliation"), "{after}");
    assert_eq!(
        dump(&mut s.local(), "meters"),
        dump(&mut s.central(), "meters")
    );
    drop(pb);
}

/// A meter deleted centrally stays on the gateway (P8): that must not make every
/// later central restart a full copy. The full reconciliation that found it gone
/// remembers it, so a plain restart is still verified by digest; a real difference
/// made after that (a change the stamps cannot see) still means a full copy.
#[test]
fn p21_a_meter_kept_locally_after_its_central_delete_does_not_defeat_the_digest() {
    let (central, s) = on_own_central("rkd");
    once(&s);
    s.central()
        .batch_execute("DELETE FROM meters WHERE meter_id = 'm-2'")
        .unwrap();
    let d = running(&s);
    let first = cycle_log(&d, 0);
    assert!(
        first.contains(
            "1 meters no longer in central, kept locally (the collector may still use them): m-2"
        ),
        "{first}"
    );
    next_cycle(&d);

    let after = restart_central(central, &d);
    assert!(
        after.contains("meters: central restarted; local copy verified identical (2 rows")
            && !after.contains("full reconciliation"),
        "a meter kept locally must not make a restart a full copy:\n{after}"
    );
    assert_eq!(s.local_count("meters"), 3, "m-2 is still kept");

    // A difference the stamps cannot see, then another restart: a full copy.
    s.central()
        .batch_execute(
            "ALTER TABLE meters DISABLE TRIGGER meters_change_xid;
             UPDATE meters SET name = 'renamed unstamped' WHERE meter_id = 'm-3';
             ALTER TABLE meters ENABLE ALWAYS TRIGGER meters_change_xid;",
        )
        .unwrap();
    next_cycle(&d);
    central.stop();
    central.restart();
    let at = d.log_text().len();
    assert!(
        support::wait_until(Duration::from_secs(30), || d.log_text()[at..]
            .contains("meter m-3 updated: name")),
        "the unstamped change was not repaired:\n{}",
        &d.log_text()[at..]
    );
    let after = d.log_text()[at..].to_string();
    assert!(
        after.contains("meters: full reconciliation (central is not the server"),
        "{after}"
    );
}

/// One schema drift between central, the download and the local table: after a
/// first good cycle, `central_sql` runs on central and `local_sql` locally, a meter
/// is renamed centrally, and the next `once` must fail the meters phase alone, with
/// one error line that contains each of `expect`, and leave the local meters as
/// they were; the tenant phase still succeeds.
fn drift_fails_only_meters(central_sql: &str, local_sql: &str, expect: &[&str]) {
    let s = Sandbox::new();
    three_meters(&s);
    once(&s);
    s.central().batch_execute(central_sql).unwrap();
    s.local().batch_execute(local_sql).unwrap();
    let before = versions(&mut s.local(), "meters");
    s.central()
        .batch_execute("UPDATE meters SET unit = 'Wh' WHERE meter_id = 'm-1'")
        .unwrap();
    add_tenant(&mut s.central(), "t-1", "Acme", None, None);
    let run = s.run(&["once"]);
    run.assert_code(1);
    let errors = lines_with(&run.stderr, "ERROR");
    assert_eq!(errors.len(), 1, "{}", run.stderr);
    let (ok, _, err) = last_log(&s, "meters");
    let err = err.unwrap_or_default();
    assert!(!ok, "{}", run.stderr);
    for e in expect {
        assert!(
            errors[0].contains(e) && err.contains(e),
            "the error should name {e:?}:\n{}",
            run.stderr
        );
    }
    assert_eq!(
        versions(&mut s.local(), "meters"),
        before,
        "nothing half-applied"
    );
    assert_eq!(last_log(&s, "tenant"), (true, 1, None), "{}", run.stderr);
}

#[test]
fn p10_schema_drift_an_extra_central_column_is_ignored() {
    let s = Sandbox::new();
    three_meters(&s);
    s.central()
        .batch_execute(
            "ALTER TABLE meters ADD COLUMN firmware text DEFAULT 'v2';
             ALTER TABLE tenant ADD COLUMN billing jsonb DEFAULT '{}'",
        )
        .unwrap();
    add_tenant(&mut s.central(), "t-1", "Acme", None, None);
    once(&s);
    assert_eq!(
        dump(&mut s.local(), "meters"),
        dump(&mut s.central(), "meters")
    );
}

#[test]
fn p10_schema_drift_a_central_column_missing_names_table_and_column() {
    drift_fails_only_meters(
        "ALTER TABLE meters DROP COLUMN location_id",
        "",
        &["central", "meters.location_id"],
    );
}

#[test]
fn p10_schema_drift_a_central_column_of_another_type_names_table_and_column() {
    drift_fails_only_meters(
        "ALTER TABLE meters ALTER COLUMN configuration TYPE bytea
             USING convert_to(configuration::text, 'UTF8')",
        "",
        &["central", "meters.configuration", "bytea", "jsonb"],
    );
}

#[test]
fn p10_schema_drift_a_local_column_of_another_type_names_table_and_column() {
    drift_fails_only_meters(
        "",
        "ALTER TABLE meters ALTER COLUMN configuration TYPE text",
        &["local", "meters.configuration", "text", "jsonb"],
    );
}

#[test]
fn p10_schema_drift_a_local_column_missing_names_table_and_column() {
    drift_fails_only_meters(
        "",
        "ALTER TABLE meters DROP COLUMN location_id",
        &["local", "meters.location_id"],
    );
}

/// Central's `name` is wider than the gateway's (a central whose tables predate
/// the migration): the meter whose name does not fit is named, and so is the column.
#[test]
fn p10_schema_drift_a_central_value_too_long_for_the_local_column_names_the_meter() {
    drift_fails_only_meters(
        &format!(
            "ALTER TABLE meters ALTER COLUMN name TYPE text;
             UPDATE meters SET name = '{}' WHERE meter_id = 'm-3'",
            "é".repeat(300)
        ),
        "",
        &["local", "meters.name", "m-3", "255"],
    );
}

/// Central rewrites a configuration with the same value in another spelling
/// (`1.50` as `1.5`): it travels and compares equal, so the gateway keeps its text
/// (p8_jsonb_equal_by_value_is_not_a_change). The first central restart after it
/// then finds the texts differ and copies in full (writing nothing), but that
/// full copy is the last: later restarts are verified by digest again.
#[test]
fn p21_a_value_equal_jsonb_spelled_otherwise_centrally_costs_at_most_one_full_copy() {
    let (central, s) = on_own_central("rjs");
    let d = running(&s);
    let before = versions(&mut s.local(), "meters");
    s.central()
        .batch_execute(
            r#"UPDATE meters SET configuration = '{"a": 1.5, "tags": ["x", null, true]}'
               WHERE meter_id = 'm-3'"#,
        )
        .unwrap();
    let log = next_cycle(&d);
    assert!(!log.contains(" updated: "), "{log}");
    assert_eq!(versions(&mut s.local(), "meters"), before);

    let restart = || restart_central(central, &d) + &next_cycle(&d);
    let first = restart();
    assert!(
        first.contains("meters: up to date (3 unchanged)"),
        "the full copy wrote nothing:\n{first}"
    );
    let second = restart();
    assert!(
        second.contains("meters: central restarted; local copy verified identical (3 rows)")
            && !second.contains("full reconciliation"),
        "a value-equal jsonb must not make every restart a full copy:\n{second}"
    );
    assert_eq!(versions(&mut s.local(), "meters"), before);
}

/// The gateway's own server refuses md5 to the daemon's role (FIPS, or a
/// hardened local database): the digests are an optimisation, so downloads still
/// succeed, in full.
#[test]
fn p8_downloads_succeed_when_the_local_server_refuses_md5() {
    let mut s = Sandbox::new();
    three_meters(&s);
    add_tenant(&mut s.central(), "t-1", "Acme", None, None);
    let role = format!("gwl_md5_{}", std::process::id());
    s.local()
        .batch_execute(&format!(
            "CREATE ROLE {role} LOGIN;
             GRANT ALL ON ALL TABLES IN SCHEMA public TO {role};
             GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO {role};
             REVOKE EXECUTE ON FUNCTION md5(text) FROM PUBLIC;"
        ))
        .unwrap();
    s.set("POSTGRES_SYNC_USER", &role);
    once(&s);
    assert_eq!(
        dump(&mut s.local(), "meters"),
        dump(&mut s.central(), "meters")
    );
}

/// Values at the edges travel exactly and compare right: SQL NULL and JSON null
/// are different values both ways; names of 252 characters (236 of four bytes), with
/// quotes, backslashes, commas, parentheses, tabs and newlines; a meter deleted and
/// re-created with the same id in another transaction arrives as an update; a
/// tenant whose key changes arrives as a new tenant (the old one is kept). A
/// central restart after all that is still verified by digest.
#[test]
fn p8_edge_values_travel_exactly_and_compare_right() {
    let (central, s) = on_own_central("redg");
    let d = running(&s);
    let odd = format!("{}\"q\" \\b, (p)\t\nend", "🌡".repeat(236));
    let mut c = s.central();
    c.execute(
        "UPDATE meters SET name = $1, configuration = 'null' WHERE meter_id = 'm-2'",
        &[&odd],
    )
    .unwrap();
    c.batch_execute(
        "UPDATE tenant SET metadata = '\"\"', configuration = '{}' WHERE tenant_id = 't-1';
         DELETE FROM meters WHERE meter_id = 'm-3';",
    )
    .unwrap();
    c.batch_execute(
        "INSERT INTO meters (meter_id, name, meter_type, unit, configuration)
         VALUES ('m-3', 'Roof again', 'heat', 'MWh', '[null]')",
    )
    .unwrap();
    let log = next_cycle(&d);
    let mut updated = lines_with(&log, " updated: ");
    updated.sort();
    assert_eq!(
        updated,
        vec![
            "meter m-2 updated: name, configuration",
            "meter m-3 updated: name, location_id, configuration, updated_at",
            "tenant t-1 updated: configuration, metadata",
        ],
        "{log}"
    );
    let json_null: (bool, bool) = {
        let r = s
            .local()
            .query_one(
                "SELECT configuration IS NULL, configuration = 'null'::jsonb FROM meters
                 WHERE meter_id = 'm-2'",
                &[],
            )
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!(json_null, (false, true), "JSON null is not SQL NULL");

    // Back to SQL NULL, and a tenant's key changes.
    c.batch_execute(
        "UPDATE meters SET configuration = NULL WHERE meter_id = 'm-2';
         UPDATE tenant SET tenant_id = 't-9' WHERE tenant_id = 't-1';",
    )
    .unwrap();
    let log = next_cycle(&d);
    assert_eq!(
        lines_with(&log, " updated: "),
        vec!["meter m-2 updated: configuration"],
        "{log}"
    );
    assert!(log.contains("new tenant t-9 (Acme)"), "{log}");
    assert_eq!(
        dump(&mut s.local(), "meters"),
        dump(&mut s.central(), "meters")
    );
    assert_eq!(s.local_count("tenant"), 2, "t-1 is kept, t-9 is new");

    drop(c);
    let after = restart_central(central, &d);
    assert!(
        after.contains("meters: central restarted; local copy verified identical (3 rows)"),
        "{after}"
    );
}

/// P21 with row-level security, as a fleet runs it: a meter unassigned from the
/// gateway is kept locally (the full reconciliation at the daemon's start says
/// so), and a central restart after that is still verified by digest: the
/// unassigned meter does not make every restart a full copy.
#[test]
fn p21_rls_a_restart_after_a_meter_is_unassigned_is_verified_by_digest() {
    let central: &'static support::Cluster =
        Box::leak(Box::new(support::Cluster::start(support::Role::Central)));
    let (local, _) = support::shared();
    let name = format!("rlsr{}", std::process::id());
    local.create_db(&name);
    central.create_db(&name);
    let mut s = Sandbox::on(local, central, &name, &name);
    s.migrate();
    let (role, _) = rls_sandbox(&mut s);
    once(&s);
    assert_eq!(s.local_count("meters"), 50);
    s.central()
        .batch_execute(&format!(
            "DELETE FROM gateway_meters WHERE gateway_role = '{role}' AND meter_id = 'm-000040'"
        ))
        .unwrap();
    let d = running(&s);
    assert!(
        cycle_log(&d, 0).contains("1 meters no longer visible to this gateway"),
        "{}",
        cycle_log(&d, 0)
    );
    next_cycle(&d);

    let after = restart_central(central, &d);
    assert!(
        after.contains(
            "meters: central restarted; local copy verified identical (49 rows, and 1 kept \
             locally that central no longer shows), no full copy needed"
        ) && after.contains("tenant: central restarted; local copy verified identical (2 rows)")
            && !after.contains("full reconciliation"),
        "{after}"
    );
    assert_eq!(s.local_count("meters"), 50);
}
