//! What an operator relies on beyond the sync itself (docs/operating.md): the
//! metrics file readable by node_exporter whatever the unit's umask, and
//! `sync_logs` kept to `SYNC_LOGS_RETAIN_DAYS` (SPEC §8), pruned in small batches.

mod support;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::process::Stdio;
use std::time::Duration;

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

fn proc_kib(pid: i32, field: &str) -> i64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches(" kB").parse().ok())
        .unwrap_or_else(|| panic!("{field} of {pid}"))
}

fn sessions(c: &mut support::Client) -> i64 {
    c.query_one(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()",
        &[],
    )
    .unwrap()
    .get(0)
}

/// What a daemon leaves behind after a while, measured in the pause after a cycle.
struct Sample {
    cycle: usize,
    up: u64,
    down: u64,
    log: usize,
    rss_kib: i64,
    fds: usize,
}

/// Samples in the pause after cycle `n` (or a later one, if the pause was missed):
/// once that cycle's heartbeat has reached central and before the next cycle has
/// started, so that the bytes counted so far are exactly those of the cycles up to it.
fn sample_after(
    s: &Sandbox,
    d: &support::Daemon,
    proxy: &support::proxy::Proxy,
    mut n: usize,
) -> Sample {
    let finished = |log: &str| log.matches("cycle finished").count();
    let started = |log: &str| log.matches("cycle started").count();
    let mut central = s.central();
    loop {
        assert!(
            support::wait_until(Duration::from_secs(30), || finished(&d.log_text()) >= n),
            "cycle {n} never finished:\n{}",
            d.log_text()
        );
        // The n-th result line's time, in central's format: the heartbeat of cycle
        // n is written after it, that of cycle n - 1 before it.
        let log = d.log_text();
        let line = log
            .lines()
            .filter(|l| l.contains("cycle finished"))
            .nth(n - 1)
            .unwrap()
            .to_string();
        let at = line.split(' ').next().unwrap().to_string();
        let beat = || -> bool {
            central
                .query_one(
                    "SELECT coalesce(max(updated_at) >= $1::text::timestamptz, false) FROM gateway_status",
                    &[&at],
                )
                .unwrap()
                .get(0)
        };
        let delivered = support::wait_until(Duration::from_secs(10), beat);
        let (up, down) = proxy.bytes_forwarded();
        let sample = Sample {
            cycle: n,
            up,
            down,
            log: 0,
            rss_kib: proc_kib(d.pid(), "VmRSS:"),
            fds: std::fs::read_dir(format!("/proc/{}/fd", d.pid()))
                .unwrap()
                .count(),
        };
        let log = d.log_text();
        if delivered && started(&log) == n && finished(&log) == n {
            return Sample {
                log: log.len(),
                ..sample
            };
        }
        // The next cycle began meanwhile: take the pause after it instead.
        n += 1;
    }
}

/// Months without a restart, compressed: idle cycles at a 1 s interval (40 by
/// default, `LONGRUN_CYCLES` for more). An idle cycle costs the same on the
/// central link after many cycles as after a few, and at most P20's 4 KiB; its
/// log is two lines; the daemon's memory, file descriptors and sessions on both
/// databases do not grow; each cycle adds its three `sync_logs` rows and nothing
/// else is written locally.
#[test]
fn an_idle_daemon_costs_the_same_after_many_cycles() {
    let n: usize = std::env::var("LONGRUN_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(40)
        .max(20);
    let mut s = Sandbox::new();
    s.central()
        .batch_execute(
            "INSERT INTO meters (meter_id, name, location_id, meter_type, unit, updated_at)
             VALUES ('m-1', 'Hall', 'loc-1', 'electricity', 'kWh', now());
             INSERT INTO tenant (tenant_id, name, updated_at) VALUES ('t-1', 'Acme', now());",
        )
        .unwrap();
    let target = format!("127.0.0.1:{}", s.central_cluster().port);
    let proxy = support::proxy::Proxy::start(target.parse().unwrap());
    s.set("POSTGRES_CLIENT_PORT", proxy.port());
    let d = s.spawn(&["run"]);
    // Cycle 1 downloads the meter and the tenant and inserts the heartbeat's row.
    let first = sample_after(&s, &d, &proxy, 3);
    let early = sample_after(&s, &d, &proxy, first.cycle + 10);
    let late_start = sample_after(&s, &d, &proxy, n - 10);
    let last = sample_after(&s, &d, &proxy, late_start.cycle + 10);
    let per_cycle = |a: &Sample, b: &Sample| {
        let c = (b.cycle - a.cycle) as u64;
        (
            (b.up + b.down - a.up - a.down) / c,
            (b.log - a.log) as u64 / c,
        )
    };
    let (early_bytes, early_log) = per_cycle(&first, &early);
    let (late_bytes, late_log) = per_cycle(&late_start, &last);
    eprintln!(
        "idle cycle: {early_bytes} bytes on the central link and {early_log} bytes of log \
         (cycles {}-{}), {late_bytes} and {late_log} (cycles {}-{}); RSS {} -> {} KiB, fds {} -> {}",
        first.cycle,
        early.cycle,
        late_start.cycle,
        last.cycle,
        first.rss_kib,
        last.rss_kib,
        first.fds,
        last.fds
    );
    assert!(
        early_bytes <= 4096,
        "P20: {early_bytes} bytes per idle cycle"
    );
    assert!(
        late_bytes <= early_bytes + early_bytes / 50,
        "the idle cycle's bytes crept up: {early_bytes} per cycle early, {late_bytes} late"
    );
    // Durations may take a digit more late than early; lines may not.
    assert!(
        late_log <= early_log + early_log / 20,
        "the idle cycle's log grew from {early_log} to {late_log} bytes:\n{}",
        d.log_text()
    );
    let log = d.log_text();
    let tail: Vec<&str> = log.lines().rev().take(20).collect();
    assert!(
        tail.iter().all(|l| l.contains(" INFO ")),
        "{}",
        d.log_text()
    );
    assert_eq!(
        last.fds, first.fds,
        "file descriptors: {} -> {}",
        first.fds, last.fds
    );
    assert!(
        last.rss_kib <= first.rss_kib + 1024,
        "RSS grew from {} to {} KiB",
        first.rss_kib,
        last.rss_kib
    );
    assert_eq!(sessions(&mut s.local()), 1, "local sessions");
    assert_eq!(sessions(&mut s.central()), 1, "central sessions");
    // Three rows per cycle, no more (a cycle cut short by the stop may leave fewer).
    let mut d = d;
    d.signal(15);
    assert_eq!(d.wait_exit(Duration::from_secs(10)), Some(Some(0)));
    let log = d.log_text();
    let (finished, started) = (
        log.matches("cycle finished").count() as i64,
        log.matches("cycle started").count() as i64,
    );
    let rows = s.local_count("sync_logs");
    assert!(
        3 * finished <= rows && rows <= 3 * started,
        "{rows} sync_logs rows after {finished} cycles"
    );
    // Nothing but sync_logs was written locally after the first cycle.
    let written: Vec<(String, i64)> = s
        .local()
        .query(
            "SELECT relname::text, n_tup_upd + n_tup_del FROM pg_stat_user_tables
             WHERE n_tup_upd + n_tup_del > 0",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert!(
        written.is_empty(),
        "rows updated or deleted locally: {written:?}"
    );
}
