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
    c.batch_execute("SET TimeZone = 'UTC'").unwrap();
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
