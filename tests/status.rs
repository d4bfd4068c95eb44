//! R12 `status` / `status --json` against real databases, the metrics textfile
//! in Prometheus text format, and syslog lines on a real datagram socket (P16).

mod support;

use std::collections::BTreeSet;
use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::proxy::Proxy;
use support::{wait_until, Sandbox};

fn json(s: &Sandbox) -> (Option<i32>, Value) {
    let r = s.run(&["status", "--json"]);
    let v: Value = serde_json::from_str(&r.stdout).unwrap_or_else(|e| {
        panic!(
            "status --json is not JSON ({e}):\n{}\n{}",
            r.stdout, r.stderr
        )
    });
    (r.code, v)
}

/// Puts known numbers into the local database: readings waiting and
/// quarantined, meters, tenants, and sync_logs with a failed cycle after a
/// successful one.
fn seed(s: &Sandbox) {
    s.insert_readings(7);
    let mut c = s.local();
    c.batch_execute(
        "UPDATE meter_readings SET sync_error = 'central: value out of range' WHERE id IN (SELECT id FROM meter_readings ORDER BY id LIMIT 2);
         INSERT INTO meters (meter_id, name, meter_type, unit) VALUES ('m1', 'one', 'electricity', 'kWh'), ('m2', 'two', 'water', 'm3'), ('m3', 'three', 'gas', 'm3');
         INSERT INTO tenant (tenant_id, name) VALUES ('t1', 'Tenant One');
         INSERT INTO sync_logs (sync_type, success, records_processed, error_message, duration_ms, \"timestamp\") VALUES
           ('upload', true, 100, NULL, 40, '2026-01-01 10:00:00+00'),
           ('meters', true, 3, NULL, 5, '2026-01-01 10:00:01+00'),
           ('tenant', true, 1, NULL, 6, '2026-01-01 10:00:02+00'),
           ('upload', true, 25, NULL, 10, '2026-01-01 10:01:00+00'),
           ('meters', false, 0, 'central: connection lost', 7, '2026-01-01 10:01:01+00'),
           ('tenant', true, 0, NULL, 2, '2026-01-01 10:01:02+00');",
    )
    .unwrap();
}

#[test]
fn r12_status_json_matches_the_databases() {
    let s = Sandbox::new();
    seed(&s);
    let (code, v) = json(&s);
    assert_eq!(code, Some(0), "{v}");
    assert_eq!(v["running"], false);
    assert_eq!(v["daemon_pid"], Value::Null);
    assert_eq!(v["local"]["reachable"], true);
    assert_eq!(v["central"]["reachable"], true);
    assert_eq!(v["central"]["error"], Value::Null);
    assert_eq!(v["queue_size"], 5);
    assert_eq!(v["quarantined"], 2);
    assert_eq!(v["readings_synced"], 125);
    assert_eq!(v["meters"], 3);
    assert_eq!(v["tenants"], 1);
    let lc = &v["last_successful_cycle"];
    assert_eq!(lc["finished_at"], "2026-01-01T10:00:02.000Z", "{v}");
    assert_eq!(lc["upload_records"], 100);
    assert_eq!(lc["meters_records"], 3);
    assert_eq!(lc["tenant_records"], 1);
    assert_eq!(lc["duration_ms"], 51);
    let m = &v["phases"]["meters"];
    assert_eq!(m["last_run_ok"], false);
    assert_eq!(m["last_error"], "central: connection lost");
    assert_eq!(m["last_success_at"], "2026-01-01T10:00:01.000Z");
    assert_eq!(v["phases"]["upload"]["last_run_records"], 25);
    assert_eq!(
        v["phases"]["tenant"]["last_run_at"],
        "2026-01-01T10:01:02.000Z"
    );

    // The human form says the same.
    let text = s.run(&["status"]);
    text.assert_ok();
    for needle in [
        "not running",
        "5 reading(s) waiting, 2 quarantined",
        "125 reading(s) uploaded",
        "3 meter(s), 1 tenant(s)",
        "2026-01-01T10:00:02.000Z",
        "FAILED: central: connection lost",
    ] {
        assert!(
            text.stdout.contains(needle),
            "{needle:?} missing:\n{}",
            text.stdout
        );
    }
}

#[test]
fn r12_status_running_iff_a_daemon_holds_the_lock() {
    let s = Sandbox::new();
    let mut d = s.spawn(&["run"]);
    d.wait_log("holding the cycle lock", Duration::from_secs(15));
    let (code, v) = json(&s);
    assert_eq!(code, Some(0));
    assert_eq!(v["running"], true, "{v}");
    assert_eq!(v["daemon_pid"], d.pid(), "{v}");
    assert!(s
        .run(&["status"])
        .stdout
        .contains(&format!("running (meter-sync pid {})", d.pid())));
    d.kill9();
    assert!(wait_until(Duration::from_secs(5), || json(&s).1["running"] == false));
}

/// Central away is a state, not a failure: exit 0 and say so, quickly even when
/// the link is silent. Local away: exit 1.
#[test]
fn r12_status_with_a_database_away() {
    let mut s = Sandbox::new();
    let proxy = Proxy::start(
        format!("127.0.0.1:{}", s.central_cluster().port)
            .parse()
            .unwrap(),
    );
    proxy.blackhole();
    s.set("POSTGRES_CLIENT_PORT", proxy.port());
    s.set("DB_CONNECTION_TIMEOUT_MS", 1000);
    s.set("MAX_CONNECTION_RETRIES", 5);
    let t0 = Instant::now();
    let (code, v) = json(&s);
    let took = t0.elapsed();
    assert_eq!(code, Some(0), "{v}");
    assert_eq!(v["central"]["reachable"], false);
    assert!(
        v["central"]["error"].as_str().unwrap().contains("central"),
        "{v}"
    );
    assert_eq!(v["local"]["reachable"], true);
    // One attempt of DB_CONNECTION_TIMEOUT_MS, not MAX_CONNECTION_RETRIES with backoff.
    assert!(took < Duration::from_millis(2500), "status took {took:?}");
    assert!(!v.to_string().contains(support::CENTRAL_PASSWORD));

    s.set("POSTGRES_SYNC_PORT", support::free_port());
    let (code, v) = json(&s);
    assert_eq!(code, Some(1), "{v}");
    assert_eq!(v["local"]["reachable"], false);
    assert_eq!(v["running"], Value::Null);
}

/// A gateway without a battery-backed clock that ran ahead (a bad RTC, an image's
/// future build date) and was then set right by NTP leaves `sync_logs` rows
/// stamped in the future. The last run of each phase is the last one written:
/// ordered by `timestamp`, the future rows hid every run since, and a phase
/// failing now was shown "ok" until the clock caught up with them (years).
#[test]
fn status_shows_the_last_run_written_after_the_clock_was_set_back() {
    let mut s = Sandbox::new();
    s.local()
        .batch_execute(
            "INSERT INTO sync_logs (sync_type, success, records_processed, duration_ms, \"timestamp\")
             SELECT t, true, 1, 2, now() + interval '3 years'
             FROM unnest(ARRAY['upload', 'meters', 'tenant']) t",
        )
        .unwrap();
    // Then the clock is right again, and every phase fails: central is away.
    s.set("POSTGRES_CLIENT_PORT", support::free_port());
    s.set("MAX_CONNECTION_RETRIES", 1);
    s.run(&["once"]).assert_code(1);
    let (code, v) = json(&s);
    assert_eq!(code, Some(0), "{v}");
    for p in ["upload", "meters", "tenant"] {
        let phase = &v["phases"][p];
        assert_eq!(phase["last_run_ok"], false, "{p}: {v}");
        assert!(
            phase["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("central")),
            "{p}: {v}"
        );
    }
    let text = s.run(&["status"]).stdout;
    assert_eq!(text.matches(" FAILED: ").count(), 3, "{text}");
}

/// A meter whose clock was reset stamps its readings before 1970 (the gateway
/// uploads them as written). The metrics file gave the oldest waiting one's
/// timestamp as 0 (1970-01-01) while `status` said 1969: a Unix time before the
/// epoch is negative.
#[test]
fn the_oldest_pending_timestamp_before_1970_is_negative_in_the_metrics_file() {
    let mut s = Sandbox::new();
    s.local()
        .batch_execute(
            "INSERT INTO meter_readings (meter_id, \"timestamp\", value, unit)
             VALUES ('apollo', '1969-07-20 20:17:40+00', 1, 'kWh')",
        )
        .unwrap();
    let file = s.dir.join("meter-sync.prom");
    s.set("METRICS_TEXTFILE", file.display())
        .set("POSTGRES_CLIENT_PORT", support::free_port())
        .set("MAX_CONNECTION_RETRIES", 1);
    s.run(&["once"]).assert_code(1);
    let samples = parse_prometheus(&std::fs::read_to_string(&file).unwrap());
    let ts = samples
        .iter()
        .find(|(n, _)| n == "meter_sync_oldest_pending_timestamp_seconds")
        .map(|(_, v)| *v);
    assert_eq!(ts, Some(-14_182_940.0), "{samples:?}");
    let (_, v) = json(&s);
    assert_eq!(v["oldest_pending_at"], "1969-07-20T20:17:40.000Z", "{v}");
}

/// A local database that answers but is not migrated: `status --json` used to print
/// nothing (exit 1), so a monitoring probe got no JSON at all. The JSON is printed,
/// the local side not usable, with the reason.
#[test]
fn r12_status_of_an_unmigrated_local_database_still_prints_its_json() {
    let s = Sandbox::empty();
    let (code, v) = json(&s);
    assert_eq!(code, Some(1), "{v}");
    assert_eq!(v["local"]["reachable"], false, "{v}");
    assert!(
        v["local"]["error"]
            .as_str()
            .unwrap()
            .contains("meter_readings"),
        "{v}"
    );
    assert_eq!(v["queue_size"], Value::Null);
    let r = s.run(&["status"]);
    r.assert_code(1);
    assert!(r.stdout.contains("local:"), "{}", r.all());
}

/// Rows of `meter_readings` read by sequential scans so far, once every session of
/// the daemon has ended (a backend hands its counters over as it exits).
fn readings_seq_read(c: &mut support::Client) -> i64 {
    assert!(wait_until(Duration::from_secs(10), || {
        c.query_one(
            "SELECT count(*) = 0 FROM pg_stat_activity
             WHERE application_name LIKE 'meter-sync%' AND datname = current_database()",
            &[],
        )
        .unwrap()
        .get(0)
    }));
    c.batch_execute("SELECT pg_stat_clear_snapshot()").unwrap();
    c.query_one(
        "SELECT coalesce(seq_tup_read, 0) FROM pg_stat_user_tables WHERE relname = 'meter_readings'",
        &[],
    )
    .unwrap()
    .get(0)
}

/// The queue's counts (each cycle's start line, the heartbeat and metrics after it,
/// `status`) go through the partial indexes and never read the readings retained
/// for the resend window (UPLOAD_RETAIN_HOURS). Before, each count was one scan of
/// the whole table, retained readings included: three a cycle, a day's readings
/// each on a busy gateway (60,000 rows read per count here).
#[test]
fn counting_the_queue_never_reads_the_retained_readings() {
    let mut s = Sandbox::new();
    s.set("UPLOAD_RETAIN_HOURS", 24);
    seed(&s);
    let mut c = s.local();
    c.batch_execute(
        "INSERT INTO meter_readings (meter_id, \"timestamp\", value, unit, is_synchronized, synced_at)
         SELECT 'retained', timestamptz '2025-06-01 00:00:00+00' + g * interval '1 second', g, 'kWh', true, now()
         FROM generate_series(1, 60000) g",
    )
    .unwrap();
    // As autovacuum leaves a gateway's table.
    c.batch_execute("VACUUM ANALYZE meter_readings").unwrap();
    let before = readings_seq_read(&mut c);
    let (code, v) = json(&s);
    assert_eq!(code, Some(0), "{v}");
    assert_eq!(
        (&v["queue_size"], &v["quarantined"]),
        (&5.into(), &2.into())
    );
    let after_status = readings_seq_read(&mut c);
    assert!(
        after_status - before < 1000,
        "status read {} rows of meter_readings sequentially",
        after_status - before
    );
    let run = s.run(&["once"]);
    run.assert_ok();
    assert!(
        run.stderr.contains("5 reading(s) waiting, 2 quarantined"),
        "{}",
        run.stderr
    );
    let after_once = readings_seq_read(&mut c);
    assert!(
        after_once - after_status < 1000,
        "a cycle read {} rows of meter_readings sequentially",
        after_once - after_status
    );
    let rq = s.run(&["requeue", "--all"]);
    rq.assert_ok();
    assert!(rq.stdout.contains("requeued 2"), "{}", rq.all());
    let after_requeue = readings_seq_read(&mut c);
    assert!(
        after_requeue - after_once < 1000,
        "requeue read {} rows of meter_readings sequentially",
        after_requeue - after_once
    );
    assert_eq!(s.local_count("meter_readings WHERE is_synchronized"), 60005);
}

/// Checks the text exposition format line by line: HELP/TYPE before samples,
/// valid names, label syntax, float values, no duplicate series. Returns the
/// samples as (series, value).
fn parse_prometheus(text: &str) -> Vec<(String, f64)> {
    let name_ok = |n: &str| {
        !n.is_empty()
            && n.chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
            && n.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    };
    assert!(text.ends_with('\n'), "no final newline");
    let mut typed: BTreeSet<String> = BTreeSet::new();
    let mut series = BTreeSet::new();
    let mut out = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            let (kw, name, val) = (
                parts.next().unwrap(),
                parts.next().unwrap(),
                parts.next().unwrap_or(""),
            );
            assert!(name_ok(name), "bad name in {line:?}");
            if kw == "TYPE" {
                assert!(
                    ["counter", "gauge", "histogram", "summary", "untyped"].contains(&val),
                    "{line:?}"
                );
                assert!(typed.insert(name.to_string()), "TYPE twice for {name}");
            }
            continue;
        }
        let (series_part, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("{line:?}"));
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line:?}"));
        let (name, labels) = match series_part.split_once('{') {
            Some((n, l)) => (
                n,
                Some(l.strip_suffix('}').unwrap_or_else(|| panic!("{line:?}"))),
            ),
            None => (series_part, None),
        };
        assert!(name_ok(name), "bad metric name in {line:?}");
        assert!(typed.contains(name), "sample before its TYPE: {line:?}");
        if let Some(l) = labels {
            for pair in l.split(',') {
                let (k, v) = pair.split_once('=').unwrap_or_else(|| panic!("{line:?}"));
                assert!(
                    name_ok(k) && v.starts_with('"') && v.ends_with('"'),
                    "{line:?}"
                );
            }
        }
        assert!(
            series.insert(series_part.to_string()),
            "duplicate series {series_part}"
        );
        out.push((series_part.to_string(), value));
    }
    out
}

/// The metrics file after every cycle: valid text format, numbers that match the
/// database, and each write a new file renamed into place (a reader never sees
/// it half written).
#[test]
fn metrics_textfile_is_prometheus_text_and_replaced_atomically() {
    use std::os::unix::fs::MetadataExt;
    let mut s = Sandbox::new();
    seed(&s);
    let path = s.dir.join("meter_sync.prom");
    s.set("METRICS_TEXTFILE", path.display());
    let mut d = s.spawn(&["run"]);
    assert!(
        wait_until(Duration::from_secs(15), || path.exists()),
        "{}",
        d.log_text()
    );
    let first_inode = std::fs::metadata(&path).unwrap().ino();
    let mut inodes = BTreeSet::from([first_inode]);
    // Read continuously for a few cycles; every read must parse whole.
    let deadline = Instant::now() + Duration::from_secs(4);
    while Instant::now() < deadline {
        let text = std::fs::read_to_string(&path).unwrap();
        parse_prometheus(&text);
        inodes.insert(std::fs::metadata(&path).unwrap().ino());
    }
    assert!(
        inodes.len() >= 2,
        "the file was rewritten in place, not replaced"
    );
    d.signal(15);
    assert_eq!(d.wait_exit(Duration::from_secs(10)), Some(Some(0)));
    let text = std::fs::read_to_string(&path).unwrap();
    let samples = parse_prometheus(&text);
    let get = |k: &str| samples.iter().find(|(n, _)| n == k).map(|(_, v)| *v);
    // Whatever the phases did, the queue now is what the database says.
    let pending: i64 = s
        .local()
        .query_one(
            "SELECT count(*) FROM meter_readings WHERE sync_error IS NULL",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(
        get("meter_sync_queue_readings"),
        Some(pending as f64),
        "{text}"
    );
    assert_eq!(get("meter_sync_quarantined_readings"), Some(2.0), "{text}");
    assert!(get("meter_sync_cycles_total").unwrap() >= 2.0, "{text}");
    assert!(
        get("meter_sync_readings_uploaded_total").is_some(),
        "{text}"
    );
    for phase in ["upload", "meters", "tenant"] {
        assert!(
            get(&format!(
                "meter_sync_phase_last_duration_seconds{{phase=\"{phase}\"}}"
            ))
            .is_some(),
            "{text}"
        );
    }
    // Phases that failed are counted as errors; ones that succeeded have a timestamp.
    let ok: Vec<(String, bool)> = s
        .local()
        .query(
            "SELECT DISTINCT ON (sync_type) sync_type::text, success FROM sync_logs \
             WHERE \"timestamp\" > now() - interval '1 hour' ORDER BY sync_type, id DESC",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    for (phase, success) in ok {
        let flag = get(&format!(
            "meter_sync_phase_last_success{{phase=\"{phase}\"}}"
        ));
        assert_eq!(flag, Some(f64::from(u8::from(success))), "{phase}: {text}");
        let ts = get(&format!(
            "meter_sync_phase_last_success_timestamp_seconds{{phase=\"{phase}\"}}"
        ));
        if success {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs_f64();
            assert!(ts.is_some_and(|t| now - t < 60.0), "{phase}: {text}");
        } else {
            assert!(
                get(&format!(
                    "meter_sync_phase_errors_total{{phase=\"{phase}\"}}"
                ))
                .unwrap()
                    >= 1.0
            );
        }
    }
    let leftovers: Vec<_> = std::fs::read_dir(&s.dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left behind");
}

/// P16: syslog lines on a socket the test binds: facility daemon (PRI 24 +
/// severity), ident `meter-sync[pid]:`, one datagram per line, RFC 3164 header.
#[test]
fn p16_syslog_facility_daemon_and_ident() {
    let mut s = Sandbox::new();
    let path = s.dir.join("log.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    s.set("LOG_TARGET", "syslog");
    s.set("LOG_SYSLOG_SOCKET", path.display());
    // A central that is away gives warnings and errors as well as info lines.
    s.set("POSTGRES_CLIENT_PORT", support::free_port());
    let mut child = s
        .command(&["once"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut lines = Vec::new();
    let mut buf = vec![0u8; 65536];
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        match sock.recv(&mut buf) {
            Ok(n) => lines.push(String::from_utf8_lossy(&buf[..n]).into_owned()),
            Err(_) if child.try_wait().unwrap().is_some() => break,
            Err(_) => {}
        }
    }
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(1));
    assert!(lines.len() >= 3, "{lines:?}");
    let mut severities = BTreeSet::new();
    for l in &lines {
        let rest = l
            .strip_prefix('<')
            .unwrap_or_else(|| panic!("no PRI: {l:?}"));
        let (pri, rest) = rest.split_once('>').unwrap();
        let pri: u8 = pri.parse().unwrap();
        assert_eq!(pri / 8, 3, "facility is not daemon: {l:?}");
        severities.insert(pri % 8);
        // "Mmm dd hh:mm:ss meter-sync[pid]: message"
        let months = [
            "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
        ];
        assert!(months.contains(&&rest[..3]), "{l:?}");
        assert_eq!(&rest[3..4], " ");
        assert!(
            rest.as_bytes()[9] == b':' && rest.as_bytes()[12] == b':',
            "{l:?}"
        );
        assert_eq!(
            &rest[16..16 + format!("meter-sync[{pid}]: ").len()],
            format!("meter-sync[{pid}]: "),
            "{l:?}"
        );
        assert!(!l.contains('\n'), "one line per datagram: {l:?}");
        assert!(!l.contains(support::CENTRAL_PASSWORD));
    }
    // info (6), warning (4) and error (3) all map to their syslog severities.
    assert!(
        severities.is_superset(&BTreeSet::from([3, 4, 6])),
        "{severities:?}: {lines:?}"
    );
}

/// The rows of the markdown table in `section` of docs/operating.md whose header
/// starts with `header`: each row's cells.
fn doc_table(section: &str, header: &str) -> Vec<Vec<String>> {
    let doc = std::fs::read_to_string(support::host::repo("docs/operating.md")).unwrap();
    let part = doc
        .split(&format!("\n## {section}\n"))
        .nth(1)
        .unwrap_or_else(|| panic!("docs/operating.md has no section {section}"));
    let part = part.split("\n## ").next().unwrap();
    let mut lines = part.lines().skip_while(|l| !l.starts_with(header));
    lines
        .next()
        .unwrap_or_else(|| panic!("no table {header:?} in {section}"));
    lines
        .skip(1)
        .take_while(|l| l.starts_with('|'))
        .map(|l| {
            l.trim_matches('|')
                .split(" | ")
                .map(|c| c.trim().to_string())
                .collect()
        })
        .collect()
}

/// The `code` spans of a cell, `{…}` and labels dropped.
fn names_in(cell: &str) -> Vec<String> {
    cell.split('`')
        .skip(1)
        .step_by(2)
        .map(|n| n.split('{').next().unwrap().to_string())
        .collect()
}

/// docs/operating.md's metrics table and `status --json` field table name exactly
/// what the binary writes, with the documented metric types.
#[test]
fn the_documented_metrics_and_status_fields_are_the_ones_written() {
    let mut s = Sandbox::new();
    seed(&s);
    let path = s.dir.join("meter-sync.prom");
    s.set("METRICS_TEXTFILE", path.display());
    s.run(&["once"]);
    let text = std::fs::read_to_string(&path).unwrap();
    let written: BTreeSet<(String, String)> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .map(|l| {
            let (n, t) = l.split_once(' ').unwrap();
            (n.to_string(), t.to_string())
        })
        .collect();
    let documented: BTreeSet<(String, String)> = doc_table("Metrics", "| metric |")
        .iter()
        .flat_map(|row| names_in(&row[0]).into_iter().map(|n| (n, row[1].clone())))
        .collect();
    assert_eq!(
        documented, written,
        "docs/operating.md's metrics table vs the file:\n{text}"
    );

    let (_, v) = json(&s);
    let rows = doc_table("Status", "| JSON field |");
    let top: BTreeSet<String> = rows
        .iter()
        .flat_map(|row| names_in(&row[0]))
        .map(|n| n.split('.').next().unwrap().to_string())
        .collect();
    let keys: BTreeSet<String> = v.as_object().unwrap().keys().cloned().collect();
    assert_eq!(
        top, keys,
        "docs/operating.md's JSON fields vs status --json: {v}"
    );
    // The documented members of the nested objects.
    for (row, value) in [
        ("last_successful_cycle", &v["last_successful_cycle"]),
        ("phases.upload", &v["phases"]["upload"]),
        ("local", &v["local"]),
    ] {
        let cell = &rows
            .iter()
            .find(|r| names_in(&r[0]).iter().any(|n| n == row))
            .unwrap()[1];
        // Quoted names, not the quoted example values after a colon.
        let parts: Vec<&str> = cell.split('"').collect();
        let members: BTreeSet<String> = (1..parts.len())
            .step_by(2)
            .filter(|&i| !parts[i - 1].trim_end().ends_with(':'))
            .map(|i| parts[i].to_string())
            .collect();
        let keys: BTreeSet<String> = value
            .as_object()
            .unwrap_or_else(|| panic!("{row} is not an object: {v}"))
            .keys()
            .cloned()
            .collect();
        assert_eq!(
            members, keys,
            "{row}: docs/operating.md vs status --json: {v}"
        );
    }
}
