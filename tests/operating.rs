//! What an operator relies on beyond the sync itself (docs/operating.md): the
//! metrics file readable by node_exporter whatever the unit's umask, and
//! `sync_logs` kept to `SYNC_LOGS_RETAIN_DAYS` (SPEC §8), pruned in small batches.

mod support;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::process::Stdio;

use support::Sandbox;

/// The unit runs with UMask=0077; node_exporter is another user and must read
/// the file, so it is 0644 all the same, and nothing else is left beside it.
#[test]
fn metrics_file_is_world_readable_under_umask_0077() {
    let mut s = Sandbox::new();
    let dir = s.dir.join("metrics");
    fs::create_dir_all(&dir).unwrap();
    let path = dir.join("meter-sync.prom");
    s.set("METRICS_TEXTFILE", path.display());
    let status = s
        .program("sh")
        .arg("-c")
        .arg("umask 077; exec \"$0\" once")
        .arg(support::bin())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o644, "metrics file mode {mode:o}");
    assert!(fs::read_to_string(&path)
        .unwrap()
        .contains("meter_sync_cycles_total 1\n"));
    let names: Vec<_> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![path.file_name().unwrap().to_owned()]);
}

/// `n` sync_logs rows, `days` old.
fn old_rows(s: &Sandbox, n: i64, days: i32) {
    s.local()
        .execute(
            "INSERT INTO sync_logs (sync_type, success, records_processed, duration_ms, \"timestamp\")
             SELECT 'upload', true, 0, 1, now() - make_interval(days => $2) - g * interval '1 second'
             FROM generate_series(1, $1::bigint) g",
            &[&n, &days],
        )
        .unwrap();
}

fn rows_older_than(s: &Sandbox, days: i32) -> i64 {
    s.local()
        .query_one(
            "SELECT count(*) FROM sync_logs WHERE \"timestamp\" < now() - make_interval(days => $1)",
            &[&days],
        )
        .unwrap()
        .get(0)
}

#[test]
fn sync_logs_older_than_the_retention_are_pruned_in_bounded_passes() {
    let mut s = Sandbox::new();
    s.set("SYNC_LOGS_RETAIN_DAYS", 30);
    // A year of history (well, 12,500 rows of it) and the last four weeks.
    old_rows(&s, 12_500, 40);
    old_rows(&s, 100, 29);
    s.run(&["once"]).assert_ok();
    // One pass deletes at most 10 batches of 1,000: a backlog clears over cycles.
    assert_eq!(rows_older_than(&s, 30), 2_500);
    s.run(&["once"]).assert_ok();
    assert_eq!(rows_older_than(&s, 30), 0);
    // What is younger than the retention stays, with the six rows of two cycles.
    assert_eq!(s.local_count("sync_logs"), 100 + 6);
}

#[test]
fn sync_logs_retention_zero_keeps_everything() {
    let mut s = Sandbox::new();
    s.set("SYNC_LOGS_RETAIN_DAYS", 0);
    old_rows(&s, 50, 4000);
    s.run(&["once"]).assert_ok();
    assert_eq!(rows_older_than(&s, 30), 50);
}

/// The default is 30 days, and the running daemon prunes too (at its first cycle).
#[test]
fn the_daemon_prunes_with_the_default_retention() {
    let s = Sandbox::new();
    old_rows(&s, 1_500, 31);
    old_rows(&s, 10, 29);
    let d = s.spawn(&["run"]);
    assert!(
        support::wait_until(std::time::Duration::from_secs(30), || rows_older_than(
            &s, 30
        ) == 0),
        "{}",
        d.log_text()
    );
    assert!(s.local_count("sync_logs") >= 10 + 3);
}

/// docs/operating.md: `meter_sync_cycle_errors_total` counts "cycles with a failed
/// phase or no local database". `once` used to write a file saying 0 cycles, 0
/// errors and no last cycle when its local database was unreachable (only `run`
/// counted it).
#[test]
fn a_once_without_its_local_database_is_a_counted_cycle_error() {
    let dir = support::temp_dir("metrics-nolocal");
    let path = dir.join("meter-sync.prom");
    let port = support::free_port().to_string();
    let out = std::process::Command::new(support::bin())
        .arg("once")
        .env_clear()
        .env("POSTGRES_SYNC_HOST", "127.0.0.1")
        .env("POSTGRES_SYNC_PORT", &port)
        .env("POSTGRES_CLIENT_HOST", "127.0.0.1")
        .env("POSTGRES_CLIENT_PORT", &port)
        .env("MAX_CONNECTION_RETRIES", "1")
        .env("LOG_TARGET", "stderr")
        .env("METRICS_TEXTFILE", &path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let text = fs::read_to_string(&path).unwrap();
    for line in [
        "meter_sync_cycles_total 1\n",
        "meter_sync_cycle_errors_total 1\n",
    ] {
        assert!(text.contains(line), "no {line:?} in:\n{text}");
    }
    assert!(
        text.contains("\nmeter_sync_last_cycle_timestamp_seconds "),
        "{text}"
    );
    let _ = fs::remove_dir_all(dir);
}

/// A reading stamped `-infinity` (a collector's "unknown time", which PostgreSQL
/// accepts) waits in the queue while central is away. `status` must still report
/// the queue (exit 0), and the cycle must still count it for the metrics file and
/// the heartbeat: on PostgreSQL before 17, `now() - '-infinity'` is an error
/// (22008), so an age computed that way made the whole local probe fail.
#[test]
fn an_infinite_timestamp_in_the_queue_does_not_break_status_or_the_queue_count() {
    let mut s = Sandbox::new();
    support::insert_readings(&mut s.local(), 3, 0);
    s.local()
        .batch_execute(
            "INSERT INTO meter_readings (meter_id, \"timestamp\", value, unit) \
             VALUES ('m-unknown-time', '-infinity', 1, 'kWh')",
        )
        .unwrap();
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    s.set("POSTGRES_CLIENT_HOST", "127.0.0.1");
    s.set("POSTGRES_CLIENT_PORT", closed);
    s.set("MAX_CONNECTION_RETRIES", 1);
    let dir = s.dir.join("metrics");
    fs::create_dir_all(&dir).unwrap();
    let path = dir.join("meter-sync.prom");
    s.set("METRICS_TEXTFILE", path.display());

    let status = s.run(&["status", "--json"]);
    status.assert_ok();
    assert!(
        status.stdout.contains("\"queue_size\":4") || status.stdout.contains("\"queue_size\": 4"),
        "{}",
        status.all()
    );

    let once = s.run(&["once"]);
    assert!(
        !once.stderr.contains("queue after the cycle unknown"),
        "{}",
        once.stderr
    );
    let metrics = fs::read_to_string(&path).unwrap();
    assert!(
        metrics.contains("meter_sync_queue_readings 4\n"),
        "{metrics}\n{}",
        once.stderr
    );
}
