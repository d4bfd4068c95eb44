//! Benchmarks for SPEC §7: drain throughput against a COPY pipe, pipelining over a slow
//! uplink, peak memory, binary size and a fleet of gateways on one central server.
//!
//! Figures, not pass/fail tests: the run prints markdown tables (and saves them under
//! `target/bench/`). The machines this runs on are small and shared, so every comparison is
//! a ratio to a baseline measured in the same run, runs are interleaved (baseline, then each
//! variant, repeated) so that a burst of load from a neighbour hits all of them alike, and
//! every figure that is cheap to repeat is a median.
//!
//! Usage (see README "Benchmarks"): `bench/run [drain] [slow] [memory] [size] [fleet]`
//! (no section names: all of them). Knobs are environment variables, see [`Knobs`].

#[path = "../tests/support/mod.rs"]
mod support;

// Section `central`: the fleet through PgBouncer into a partitioned central.
#[path = "sync/fleet_central.rs"]
mod fleet_central;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::proxy::Proxy;
use support::readings::count_and_distinct;
use support::{Client, Sandbox};

/// Columns the upload carries to central (central assigns its own `id`).
const COLUMNS: &str = "reading_uid, meter_id, \"timestamp\", value, unit, metadata, created_at";
/// The round trip the slow-uplink section injects: 100 ms each way.
const ONE_WAY: Duration = Duration::from_millis(100);
const MIB: f64 = 1024.0 * 1024.0;

/// Sizes and repetitions, from the environment so that `bench/run` stays argument-free
/// for the common case. `BENCH_QUICK=1` shrinks everything for a smoke run (about a
/// minute); any explicit variable still wins over the quick default.
struct Knobs {
    /// BENCH_ROWS: backlog for the drain and memory sections.
    rows: usize,
    /// BENCH_REPS: repetitions of the drain comparison (medians are reported).
    reps: usize,
    /// BENCH_BATCHES: batch sizes to drain with, comma-separated.
    batches: Vec<usize>,
    /// BENCH_SLOW_ROWS: readings drained over the slow link at depth ≥ 2.
    slow_rows: usize,
    /// BENCH_SLOW_ROWS_SERIAL: readings drained over the slow link at depth 1, where each
    /// batch costs at least a full round trip (100,000 would take over 200 s alone).
    slow_rows_serial: usize,
    /// BENCH_DEPTHS: UPLOAD_PIPELINE_DEPTH values for the slow link.
    depths: Vec<usize>,
    /// BENCH_SLOW_BATCH: BATCH_SIZE over the slow link (600–1400 send each batch as
    /// several COPYs, which must pipeline as well).
    slow_batch: usize,
    /// BENCH_METERS: meters central holds for the download memory figure.
    meters: usize,
    /// BENCH_FLEET: gateways uploading at once.
    fleet: usize,
    /// BENCH_FLEET_BACKLOG: readings each gateway has queued.
    fleet_backlog: usize,
    /// BENCH_PROFILE=1: pg_stat_statements on both servers, top statements printed.
    profile: bool,
    /// BENCH_PIN=1: in the drain section, the central server on CPU 1 and everything
    /// else (local server, daemon, psql pipe) on CPU 0, as if central were its own
    /// machine.
    pin: bool,
    /// BENCH_LOCAL_FSYNC=1: in the drain section, the local server flushes its WAL at
    /// every commit that asks for it (`fsync`, `synchronous_commit = on`), as a
    /// gateway's does; the test clusters skip both. Its WAL flushes are counted.
    durable_local: bool,
    /// BENCH_BYTES_ROWS: readings drained through the byte-counting proxy.
    bytes_rows: usize,
}

impl Knobs {
    fn from_env() -> Knobs {
        let quick = std::env::var("BENCH_QUICK").is_ok_and(|v| v == "1");
        let num = |name: &str, full: usize, small: usize| -> usize {
            match std::env::var(name) {
                Ok(v) => v
                    .replace(['_', ','], "")
                    .parse()
                    .unwrap_or_else(|_| fail(&format!("{name}: {v:?} is not a number"))),
                Err(_) if quick => small,
                Err(_) => full,
            }
        };
        let list = |name: &str, default: &[usize]| -> Vec<usize> {
            match std::env::var(name) {
                Ok(v) => v
                    .split(',')
                    .map(|x| {
                        x.trim()
                            .parse()
                            .unwrap_or_else(|_| fail(&format!("{name}: {x:?} is not a number")))
                    })
                    .collect(),
                Err(_) => default.to_vec(),
            }
        };
        Knobs {
            rows: num("BENCH_ROWS", 1_000_000, 20_000),
            reps: num("BENCH_REPS", 3, 1).max(1),
            batches: list("BENCH_BATCHES", &[100, 1000, 5000]),
            slow_rows: num("BENCH_SLOW_ROWS", 100_000, 3_000),
            slow_rows_serial: num("BENCH_SLOW_ROWS_SERIAL", 20_000, 1_000),
            depths: list("BENCH_DEPTHS", &[1, 8, 32]),
            slow_batch: num("BENCH_SLOW_BATCH", 100, 100).max(1),
            meters: num("BENCH_METERS", 20_000, 2_000),
            fleet: num("BENCH_FLEET", 50, 5),
            fleet_backlog: num("BENCH_FLEET_BACKLOG", 10_000, 1_000),
            profile: std::env::var("BENCH_PROFILE").is_ok_and(|v| v == "1"),
            pin: std::env::var("BENCH_PIN").is_ok_and(|v| v == "1"),
            durable_local: std::env::var("BENCH_LOCAL_FSYNC").is_ok_and(|v| v == "1"),
            bytes_rows: num("BENCH_BYTES_ROWS", 20_000, 5_000),
        }
    }
}

fn fail(msg: &str) -> ! {
    eprintln!("bench: {msg}");
    std::process::exit(64);
}

fn main() {
    const SECTIONS: [&str; 8] = [
        "drain", "bytes", "slow", "memory", "size", "fleet", "download", "central",
    ];
    // `cargo bench` passes `--bench` to harness-less targets; other flags are not ours.
    let mut chosen: Vec<String> = Vec::new();
    for a in std::env::args().skip(1).filter(|a| !a.starts_with('-')) {
        if !SECTIONS.contains(&a.as_str()) {
            fail(&format!(
                "unknown section {a:?}; choose from {}",
                SECTIONS.join(", ")
            ));
        }
        chosen.push(a);
    }
    if chosen.is_empty() {
        chosen = SECTIONS.iter().map(|s| s.to_string()).collect();
    }
    let k = Knobs::from_env();
    let started = Instant::now();
    elapsed_s();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "meter-sync benchmarks, {} UTC, nproc {}, load average at start {}",
        sh("date -u '+%Y-%m-%d %H:%M'"),
        sh("nproc"),
        loadavg()
    );
    let _ = writeln!(out);
    print!("{out}");
    if k.profile {
        enable_pg_stat_statements();
    }
    let mut drained = Vec::new();
    for s in &chosen {
        let section = match s.as_str() {
            "drain" => drain(&k, &mut drained),
            "bytes" => uplink_bytes(&k),
            "slow" => slow_uplink(&k),
            "memory" => memory(&k, &drained),
            "size" => size(),
            "fleet" => fleet(&k),
            "download" => download_bytes(),
            "central" => fleet_central::central(&k),
            _ => unreachable!(),
        };
        print!("{section}");
        out.push_str(&section);
    }
    let tail = format!(
        "Total {:.0} s; load average at end {}.\n",
        started.elapsed().as_secs_f64(),
        loadavg()
    );
    print!("{tail}");
    out.push_str(&tail);
    save(&out);
}

// ---------------------------------------------------------------------------------------
// 1. Drain against the COPY pipe (and the daemon's peak RSS while draining)
// ---------------------------------------------------------------------------------------

fn drain(k: &Knobs, rss_out: &mut Vec<(usize, u64)>) -> String {
    let n = k.rows;
    progress(&format!("drain: generating {n} readings"));
    let mut s = Sandbox::new();
    s.set("UPLOAD_TIME_BUDGET_SECONDS", 86_400)
        .set("LOG_LEVEL", "warn")
        .set("DB_QUERY_TIMEOUT_MS", 600_000);
    let pristine = s.local_db.clone();
    // No autovacuum on either measured table: when an ANALYZE or a VACUUM of the
    // inserted (central) or deleted (local) rows starts is up to the launcher, and
    // its CPU would land in whichever run it overlaps. The daemon's deletes leave
    // vacuum work on the gateway that the pipe does not; autovacuum pays it later, in
    // the background, outside these figures.
    s.central()
        .batch_execute("ALTER TABLE meter_readings SET (autovacuum_enabled = off)")
        .unwrap();
    {
        let mut c = s.local();
        c.batch_execute("ALTER TABLE meter_readings SET (autovacuum_enabled = off)")
            .unwrap();
        support::insert_readings(&mut c, n, 0);
        // A backlog that has sat for a while: all-visible, hinted, analysed. Every copy
        // starts from exactly this state, so no run pays for hint bits the others skip.
        c.batch_execute("VACUUM (FREEZE, ANALYZE) meter_readings")
            .unwrap();
    }
    // No connection may touch the template while it is copied (autovacuum included).
    s.local_cluster()
        .admin()
        .batch_execute(&format!(
            "ALTER DATABASE \"{pristine}\" WITH ALLOW_CONNECTIONS false"
        ))
        .unwrap();
    let work = format!("{pristine}_run");
    s.set("POSTGRES_SYNC_DB", &work);
    if k.pin {
        // On one machine the local server's work competes with central's for the
        // same cores, which the pipe's light local side hardly does; pinned, each
        // side has its own core, as a gateway and its central have.
        pin_server(s.central_cluster(), 1);
        pin_server(s.local_cluster(), 0);
        // The daemon and both psql processes are started from here and inherit it.
        pin(0, 0);
        progress("drain: central server pinned to CPU 1, the rest to CPU 0");
    }

    if k.durable_local {
        local_durable(&s, true);
        progress("drain: local server flushes its WAL at every synchronous commit");
    }

    let mut variants: Vec<(String, Option<usize>)> = vec![("COPY".into(), None)];
    variants.extend(k.batches.iter().map(|b| (format!("b{b}"), Some(*b))));
    // [variant][rep]: readings/s, client CPU s, central and local server CPU µs per
    // reading; rss[variant] is the max over reps.
    let mut rates = vec![Vec::new(); variants.len()];
    let mut rss = vec![0u64; variants.len()];
    let mut cpus = vec![Vec::new(); variants.len()];
    let mut central_us = vec![Vec::new(); variants.len()];
    // The local server's CPU: the daemon's keyset selects and deletes against the
    // pipe's one sequential COPY out.
    let mut local_us = vec![Vec::new(); variants.len()];
    // BENCH_LOCAL_FSYNC: the local server's WAL flushes per 1,000 readings.
    let mut flushes = vec![Vec::new(); variants.len()];
    // One pipe run more after the last round, so that every daemon run has a pipe
    // run on each side of it: on a shared machine the speed drifts over a round.
    for rep in 0..=k.reps {
        for (i, (label, batch)) in variants.iter().enumerate() {
            if rep == k.reps && batch.is_some() {
                continue;
            }
            restore(&s, &pristine, &work);
            let central0 = server_cpu(s.central_cluster());
            let local0 = server_cpu(s.local_cluster());
            let flushes0 = k.durable_local.then(|| local_wal_flushes(&s));
            let (secs, cpu) = match batch {
                None => copy_pipe(&s, &work),
                Some(b) => {
                    let mut env = s.env.clone();
                    env.insert("BATCH_SIZE".into(), b.to_string());
                    let r = run_once(&s, &env, &format!("drain-{label}-{rep}"));
                    r.check_drained(&s, &work);
                    // The checks' own backends (milliseconds) are inside the figure;
                    // so are the COPY pipe's checks below.
                    rss[i] = rss[i].max(r.maxrss_kib);
                    (r.elapsed.as_secs_f64(), r.cpu.as_secs_f64())
                }
            };
            cpus[i].push(cpu);
            assert_eq!(
                s.central_count("meter_readings"),
                n as i64,
                "{label}: central must hold every reading exactly once"
            );
            let central = (server_cpu(s.central_cluster()) - central0).as_secs_f64();
            let us = central * 1e6 / n as f64;
            central_us[i].push(us);
            let local = (server_cpu(s.local_cluster()) - local0).as_secs_f64();
            local_us[i].push(local * 1e6 / n as f64);
            if let Some(f0) = flushes0 {
                flushes[i].push((local_wal_flushes(&s) - f0) as f64 * 1000.0 / n as f64);
            }
            let rate = n as f64 / secs;
            rates[i].push(rate);
            progress(&format!(
                "drain round {}/{}: {label}: {secs:.1} s (client CPU {cpu:.1} s, central {us:.1} µs/reading = {:.2}x this round's COPY), {rate:.0} readings/s, {:.2}x this round's COPY",
                rep + 1,
                k.reps,
                us / central_us[0][rep],
                rate / rates[0][rep]
            ));
        }
    }
    // Each daemon run against the mean of the pipe runs before and after it.
    let against_pipe = |v: &[Vec<f64>]| -> Vec<Vec<f64>> {
        let around = |rep: usize| (v[0][rep] + v[0][rep + 1]) / 2.0;
        v.iter()
            .map(|x| (0..k.reps).map(|rep| x[rep] / around(rep)).collect())
            .collect()
    };
    let mut ratios = against_pipe(&rates);
    let mut central_ratios = against_pipe(&central_us);
    // The pipe is the baseline itself.
    ratios[0] = vec![1.0; k.reps];
    central_ratios[0] = vec![1.0; k.reps];
    if k.profile {
        eprintln!("{}", top_statements(&s));
    }
    if k.pin {
        // The sections after this one run unpinned.
        unpin_self();
    }
    if k.durable_local {
        local_durable(&s, false);
    }
    for (i, (_, batch)) in variants.iter().enumerate() {
        if let Some(b) = batch {
            rss_out.push((*b, rss[i]));
        }
    }

    let mut o = String::new();
    let central_version: String = s
        .central()
        .query_one("SHOW server_version", &[])
        .map(|r| r.get(0))
        .unwrap_or_default();
    let tls = if s.central_cluster().serves_tls() {
        "TLS"
    } else {
        "without TLS"
    };
    let _ = writeln!(
        o,
        "### Drain {} readings, local → central (PostgreSQL {central_version}, {tls}), median of {}\n",
        group(n),
        k.reps
    );
    let _ = writeln!(
        o,
        "| method | readings/s | ratio to COPY | ratio range | before (text INSERT, 2026-11-25) | target | central CPU per reading | ratio to COPY's | target | local server CPU per reading | client CPU | daemon peak RSS |"
    );
    let _ = writeln!(
        o,
        "|---|---:|---:|---:|---:|---|---:|---:|---|---:|---:|---:|"
    );
    for (i, (_, batch)) in variants.iter().enumerate() {
        let ratio = median(&ratios[i]);
        let cratio = median(&central_ratios[i]);
        let (name, rss_text, old, target, ctarget) = match batch {
            None => (
                "COPY … TO STDOUT (binary) \\| COPY … FROM STDIN (psql pipe)".to_string(),
                "–".to_string(),
                "–".to_string(),
                "baseline".to_string(),
                String::new(),
            ),
            Some(b) => {
                // README "Benchmarks", run of 2026-11-25 (every value as text, INSERT … ON CONFLICT).
                let old = match b {
                    100 => "0.53×",
                    1000 => "0.52×",
                    5000 => "0.47×",
                    _ => "–",
                };
                let want = matches!(b, 1000 | 5000).then_some(0.9);
                (
                    format!("`meter-sync once`, BATCH_SIZE={b}"),
                    mib(rss[i]),
                    old.to_string(),
                    want.map(|w| format!("≥ {w}× {}", verdict(ratio >= w)))
                        .unwrap_or_default(),
                    want.map(|_| format!("≤ 1.2× {}", verdict(cratio <= 1.2)))
                        .unwrap_or_default(),
                )
            }
        };
        let _ = writeln!(
            o,
            "| {name} | {} | {ratio:.2} | {:.2}–{:.2} | {old} | {target} | {:.1} µs | {cratio:.2} | {ctarget} | {:.1} µs | {:.1} s | {rss_text} |",
            group(median(&rates[i]) as usize),
            ratios[i].iter().cloned().fold(f64::INFINITY, f64::min),
            ratios[i].iter().cloned().fold(0.0, f64::max),
            median(&central_us[i]),
            median(&local_us[i]),
            median(&cpus[i])
        );
    }
    let _ = writeln!(
        o,
        "\nEach ratio is a round's daemon run against the mean of the pipe runs just before and just \
         after it (that round's and the next one's; one more pipe run closes the last round): the \
         machine's speed drifts within a round. The pipe's row is the median of all its runs.\n\nCentral CPU: user + system time of the central server's processes: those that exited (the \
         postmaster's cutime + cstime in /proc, i.e. the backends that served the run, autovacuum workers \
         included) and those still running (WAL writer, checkpointer, background writer), taken just \
         before the run and once its backends have exited. Local server CPU likewise.\n"
    );
    if k.durable_local {
        let per: Vec<String> = variants
            .iter()
            .zip(&flushes)
            .map(|((label, _), f)| format!("{label} {:.1}", median(f)))
            .collect();
        let _ = writeln!(
            o,
            "Local server with `fsync = on`, `synchronous_commit = on` (BENCH_LOCAL_FSYNC=1): its WAL \
             flushes per 1,000 readings (pg_stat_wal.wal_sync, median): {}.\n",
            per.join(", ")
        );
    }
    o
}

/// The local server as a gateway runs it (`durable`: every commit that asks waits for
/// its WAL flush) or as the test clusters do (neither fsync nor synchronous commit).
fn local_durable(s: &Sandbox, durable: bool) {
    let value = if durable { "on" } else { "off" };
    for name in ["fsync", "synchronous_commit"] {
        s.local_cluster().set_and_reload(name, value);
    }
}

/// WAL flushes the local server has done so far (counted only with `fsync = on`).
fn local_wal_flushes(s: &Sandbox) -> i64 {
    s.local_cluster()
        .admin()
        .query_one("SELECT wal_sync FROM pg_stat_wal", &[])
        .unwrap()
        .get(0)
}

/// CPU time of `cluster`'s server processes so far: the backends its postmaster has
/// reaped (`cutime + cstime` of /proc/<postmaster>/stat, i.e. the backends that served
/// finished connections), plus `utime + stime` of its processes still running (WAL
/// writer, background writer, checkpointer, …). The second part matters for a fair
/// comparison: with `synchronous_commit = off` (the pipe's session) the WAL writer
/// writes much of the WAL in the background, where the daemon's `SET LOCAL
/// synchronous_commit = on` makes each committing backend write it itself.
fn server_cpu(cluster: &support::Cluster) -> Duration {
    // A backend exits and is reaped a moment after its client closed the connection.
    std::thread::sleep(Duration::from_millis(300));
    let Some((postmaster, children)) = server_processes(cluster) else {
        return Duration::ZERO;
    };
    let f = stat_fields(postmaster);
    let field = |f: &[u64], i: usize| f.get(i).copied().unwrap_or(0);
    let mut ticks = field(&f, 13) + field(&f, 14);
    for child in children {
        let c = stat_fields(child);
        ticks += field(&c, 11) + field(&c, 12);
    }
    // SAFETY: sysconf has no preconditions.
    let tick = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_micros(ticks * 1_000_000 / tick)
}

/// The numeric fields of /proc/<pid>/stat after the parenthesised command name:
/// state is 0 (parsed as 0), ppid 1, utime 11, stime 12, cutime 13, cstime 14.
fn stat_fields(pid: i32) -> Vec<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    rest.split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect()
}

/// `cluster`'s postmaster and the processes it runs now, if it is up.
fn server_processes(cluster: &support::Cluster) -> Option<(i32, Vec<i32>)> {
    let postmaster: i32 = std::fs::read_to_string(cluster.data.join("postmaster.pid"))
        .ok()?
        .lines()
        .next()?
        .trim()
        .parse()
        .ok()?;
    let children = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| stat_fields(pid).get(1).copied() == Some(postmaster as u64))
        .collect();
    Some((postmaster, children))
}

/// Runs process `pid` (0: this one) and the threads it starts from now on on `cpu` only.
fn pin(pid: i32, cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; the pointer and size are of it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(pid, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            fail(&format!(
                "BENCH_PIN: cannot pin process {pid} to CPU {cpu}: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
}

/// Lets this process run on every CPU again.
fn unpin_self() {
    // SAFETY: as in `pin`; sysconf has no preconditions.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for cpu in 0..libc::sysconf(libc::_SC_NPROCESSORS_ONLN).max(1) as usize {
            libc::CPU_SET(cpu, &mut set);
        }
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// Pins `cluster`'s postmaster and its running children to `cpu`; backends it forks
/// later inherit the affinity.
fn pin_server(cluster: &support::Cluster, cpu: usize) {
    let (postmaster, children) =
        server_processes(cluster).unwrap_or_else(|| fail("BENCH_PIN: no postmaster.pid"));
    for pid in std::iter::once(postmaster).chain(children) {
        pin(pid, cpu);
    }
}

/// A fresh copy of the pristine backlog as the daemon's local database, an empty central
/// table, and a checkpoint on both servers so that no run flushes the previous one's pages.
fn restore(s: &Sandbox, pristine: &str, work: &str) {
    let mut a = s.local_cluster().admin();
    a.batch_execute(&format!("DROP DATABASE IF EXISTS \"{work}\" WITH (FORCE)"))
        .unwrap();
    // FILE_COPY copies the files instead of WAL-logging every block: seconds, not minutes.
    a.batch_execute(&format!(
        "CREATE DATABASE \"{work}\" TEMPLATE \"{pristine}\" STRATEGY FILE_COPY"
    ))
    .unwrap();
    a.batch_execute("CHECKPOINT").unwrap();
    let mut c = s.central();
    c.batch_execute("TRUNCATE meter_readings; CHECKPOINT")
        .unwrap();
}

/// The physical limit: the same rows between the same two servers over the same kind of
/// connections (TCP to local, TLS with a password to central), by two psql processes.
/// Returns the elapsed seconds and the CPU seconds of the two psql processes.
fn copy_pipe(s: &Sandbox, work: &str) -> (f64, f64) {
    let env = &s.env;
    let src = format!(
        "host=127.0.0.1 port={} dbname={work} user=postgres",
        env["POSTGRES_SYNC_PORT"]
    );
    // TLS as the daemon's connection: verify-full, or none to a central built without
    // it (the sandbox names a root certificate only for a central that serves TLS).
    let tls = match env.get("POSTGRES_CLIENT_SSLROOTCERT") {
        Some(ca) => format!("sslmode=verify-full sslrootcert={ca}"),
        None => "sslmode=disable".to_string(),
    };
    let dst = format!(
        "host={} port={} dbname={} user=postgres {tls}",
        env["POSTGRES_CLIENT_HOST"], env["POSTGRES_CLIENT_PORT"], env["POSTGRES_CLIENT_DB"],
    );
    let script = format!(
        "psql -X -q -v ON_ERROR_STOP=1 '{src}' -c 'COPY (SELECT {cols} FROM meter_readings) TO STDOUT (FORMAT binary)' \
         | psql -X -q -v ON_ERROR_STOP=1 '{dst}' -c 'COPY meter_readings ({cols}) FROM STDIN (FORMAT binary)'",
        cols = COLUMNS
    );
    let cpu0 = children_cpu();
    let t = Instant::now();
    let out = Command::new("bash")
        .args(["-o", "pipefail", "-c", &script])
        .env("PGPASSWORD", &env["POSTGRES_CLIENT_PASSWORD"])
        .output()
        .expect("run psql");
    let secs = t.elapsed().as_secs_f64();
    assert!(
        out.status.success(),
        "COPY pipe failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (secs, (children_cpu() - cpu0).as_secs_f64())
}

// ---------------------------------------------------------------------------------------
// 1b. Uplink bytes per reading, through the byte-counting proxy
// ---------------------------------------------------------------------------------------

/// Bytes the daemon sends to central per reading (TLS records included), against the
/// size of the same rows in PostgreSQL's binary COPY format, for each batch size. The
/// bytes of a cycle with nothing to upload (connect, TLS, SCRAM, downloads) are
/// measured the same way and subtracted.
fn uplink_bytes(k: &Knobs) -> String {
    let n = k.bytes_rows;
    let mut s = Sandbox::new();
    let central = s.central_cluster();
    let proxy = Proxy::start(([127, 0, 0, 1], central.port).into());
    s.set("POSTGRES_CLIENT_PORT", proxy.port())
        .set("UPLOAD_TIME_BUDGET_SECONDS", 86_400)
        .set("LOG_LEVEL", "warn");
    let up = || proxy.bytes_forwarded().0;
    let mut idle = Vec::new();
    for i in 0..3 {
        let u0 = up();
        run_once(&s, &s.env, &format!("bytes-idle-{i}"));
        idle.push((up() - u0) as f64);
    }
    let idle = median(&idle);
    progress(&format!(
        "bytes: a cycle with nothing to upload sends {idle:.0} bytes"
    ));

    let mut o = String::new();
    let _ = writeln!(
        o,
        "### Uplink bytes per reading: {} readings, TLS, through a byte-counting proxy\n",
        group(n)
    );
    let _ = writeln!(
        o,
        "A cycle with nothing to upload sends {idle:.0} bytes to central; subtracted below. \
         Binary COPY size: `COPY (SELECT {COLUMNS} FROM meter_readings) TO STDOUT (FORMAT binary)` \
         of the same rows.\n"
    );
    let _ = writeln!(
        o,
        "| BATCH_SIZE | bytes up per reading | binary COPY bytes per reading | ratio | before (2026-11-25) | target |"
    );
    let _ = writeln!(o, "|---:|---:|---:|---:|---:|---|");
    let mut offset = 0i64;
    for &b in &k.batches {
        let copy_bytes = {
            let mut c = s.local();
            c.batch_execute("TRUNCATE meter_readings").unwrap();
            support::insert_readings(&mut c, n, offset);
            offset += n as i64;
            s.central()
                .batch_execute("TRUNCATE meter_readings")
                .unwrap();
            let mut r = c
                .copy_out(&format!(
                    "COPY (SELECT {COLUMNS} FROM meter_readings) TO STDOUT (FORMAT binary)"
                ))
                .unwrap();
            std::io::copy(&mut r, &mut std::io::sink()).unwrap()
        };
        let mut env = s.env.clone();
        env.insert("BATCH_SIZE".into(), b.to_string());
        let u0 = up();
        let r = run_once(&s, &env, &format!("bytes-b{b}"));
        r.check_drained(&s, &s.local_db);
        assert_eq!(s.central_count("meter_readings"), n as i64);
        let sent = ((up() - u0) as f64 - idle).max(0.0);
        let per = sent / n as f64;
        let copy_per = copy_bytes as f64 / n as f64;
        let ratio = sent / copy_bytes as f64;
        progress(&format!(
            "bytes: BATCH_SIZE {b}: {per:.1} bytes/reading up, binary COPY {copy_per:.1}, {ratio:.2}x"
        ));
        let old = if b == 100 { "150.8 (1.51×)" } else { "–" };
        let _ = writeln!(
            o,
            "| {b} | {per:.1} | {copy_per:.1} | {ratio:.2} | {old} | ≤ 1.25× {} |",
            verdict(ratio <= 1.25)
        );
    }
    let _ = writeln!(o);
    o
}

// ---------------------------------------------------------------------------------------
// 2. Slow uplink
// ---------------------------------------------------------------------------------------

fn slow_uplink(k: &Knobs) -> String {
    let mut s = Sandbox::new();
    let central = s.central_cluster();
    let proxy = Proxy::start(([127, 0, 0, 1], central.port).into());
    proxy.delay(ONE_WAY);
    let rtt = (ONE_WAY * 2).as_secs_f64();
    // Connecting through 200 ms takes several round trips (TCP, TLS, SCRAM); the
    // sandbox's 3 s timeout is meant for tests on loopback.
    s.set("POSTGRES_CLIENT_PORT", proxy.port())
        .set("DB_CONNECTION_TIMEOUT_MS", 30_000)
        .set("UPLOAD_TIME_BUDGET_SECONDS", 86_400)
        .set("LOG_LEVEL", "warn")
        .set("BATCH_SIZE", k.slow_batch);

    // What a cycle costs over this link with nothing to upload (connects, downloads,
    // sync_logs): subtracted so that the figure is about batches alone.
    let mut overhead = Vec::new();
    for i in 0..3 {
        let r = run_once(&s, &s.env, &format!("slow-empty-{i}"));
        overhead.push(r.elapsed.as_secs_f64());
    }
    let overhead = median(&overhead);
    progress(&format!(
        "slow: a cycle with nothing to upload takes {overhead:.2} s"
    ));

    let mut o = String::new();
    let _ = writeln!(
        o,
        "### Slow uplink: {} ms round trip, BATCH_SIZE={}\n",
        (ONE_WAY * 2).as_millis(),
        k.slow_batch
    );
    let _ = writeln!(
        o,
        "A cycle with nothing to upload takes {overhead:.2} s over this link (connect, TLS, downloads); \
         it is subtracted below.\n"
    );
    let _ = writeln!(
        o,
        "| UPLOAD_PIPELINE_DEPTH | readings | batches | cycle | batches per round trip | before (2026-11-25) | round trips per batch | target |"
    );
    let _ = writeln!(o, "|---:|---:|---:|---:|---:|---:|---:|---|");
    let mut offset = 0i64;
    for &depth in &k.depths {
        let n = if depth == 1 {
            k.slow_rows_serial
        } else {
            k.slow_rows
        };
        {
            let mut c = s.local();
            c.batch_execute("TRUNCATE meter_readings").unwrap();
            support::insert_readings(&mut c, n, offset);
            offset += n as i64;
            s.central()
                .batch_execute("TRUNCATE meter_readings")
                .unwrap();
        }
        let mut env = s.env.clone();
        env.insert("UPLOAD_PIPELINE_DEPTH".into(), depth.to_string());
        let r = run_once(&s, &env, &format!("slow-d{depth}"));
        r.check_drained(&s, &s.local_db);
        assert_eq!(s.central_count("meter_readings"), n as i64);
        let batches = n.div_ceil(k.slow_batch);
        let net = (r.elapsed.as_secs_f64() - overhead).max(0.001);
        let per_rtt = batches as f64 / (net / rtt);
        progress(&format!(
            "slow: depth {depth}: {n} readings in {:.1} s, {per_rtt:.2} batches per round trip",
            r.elapsed.as_secs_f64()
        ));
        let target = if depth == 8 {
            format!("≥ 6 {}", verdict(per_rtt >= 6.0))
        } else {
            String::new()
        };
        // The 2026-11-25 figures were taken at BATCH_SIZE 100.
        let old = match (k.slow_batch, depth) {
            (100, 1) => "0.96",
            (100, 8) => "7.38",
            (100, 32) => "28.9",
            _ => "–",
        };
        let _ = writeln!(
            o,
            "| {depth} | {} | {} | {:.1} s | {per_rtt:.2} | {old} | {:.3} | {target} |",
            group(n),
            group(batches),
            r.elapsed.as_secs_f64(),
            1.0 / per_rtt
        );
    }
    let _ = writeln!(o);
    o
}

// ---------------------------------------------------------------------------------------
// 3. Memory
// ---------------------------------------------------------------------------------------

/// Peak RSS while draining is taken from the drain section when it ran (`drained`:
/// batch size and KiB); otherwise this section drains the backlog itself at the default
/// batch size.
fn memory(k: &Knobs, drained: &[(usize, u64)]) -> String {
    let mut s = Sandbox::new();
    s.set("UPLOAD_TIME_BUDGET_SECONDS", 86_400)
        .set("LOG_LEVEL", "warn")
        .set("DB_QUERY_TIMEOUT_MS", 600_000);
    let mut o = String::new();
    let _ = writeln!(
        o,
        "### Peak RSS of the daemon (VmHWM, from wait4's ru_maxrss), `meter-sync once`\n"
    );
    let _ = writeln!(o, "| cycle | peak RSS | before (2026-11-25) | target |");
    let _ = writeln!(o, "|---|---:|---:|---|");
    // Targets (issue 14): ≤ 10 MiB with the shipped defaults, ≤ 16 MiB draining at
    // BATCH_SIZE 5000 (depth 8); in-flight memory grows with BATCH_SIZE ×
    // UPLOAD_PIPELINE_DEPTH. Before: the README's run of 2026-11-25.
    let row = |o: &mut String, what: String, kib: u64, limit_mib: Option<f64>, old: &str| {
        let target = match limit_mib {
            Some(l) => format!("≤ {l} MiB {}", verdict(kib as f64 * 1024.0 <= l * MIB)),
            None => "–".into(),
        };
        let _ = writeln!(o, "| {what} | {} | {old} | {target} |", mib(kib));
    };
    let drain_target = |b: usize| match b {
        100 => (Some(10.0), "8.7 MiB"),
        1000 => (None, "13.2 MiB"),
        5000 => (Some(16.0), "36.2 MiB"),
        _ => (None, "–"),
    };

    let r = run_once(&s, &s.env, "mem-idle");
    row(
        &mut o,
        "nothing to do (connects, empty downloads)".into(),
        r.maxrss_kib,
        Some(10.0),
        "8.4 MiB",
    );

    // Without the drain section: drain here, at the default and at 5000.
    let mut drained = drained.to_vec();
    if drained.is_empty() {
        for (i, b) in [100usize, 5000].into_iter().enumerate() {
            progress(&format!(
                "memory: draining {} readings at BATCH_SIZE {b}",
                k.rows
            ));
            support::insert_readings(&mut s.local(), k.rows, (i * k.rows) as i64);
            let mut env = s.env.clone();
            env.insert("BATCH_SIZE".into(), b.to_string());
            let r = run_once(&s, &env, &format!("mem-drain-{b}"));
            r.check_drained(&s, &s.local_db);
            drained.push((b, r.maxrss_kib));
        }
    }
    for &(b, kib) in &drained {
        let (limit, old) = drain_target(b);
        row(
            &mut o,
            format!("drain {} readings, BATCH_SIZE={b}, depth 8", group(k.rows)),
            kib,
            limit,
            old,
        );
    }

    progress(&format!("memory: syncing {} meters", k.meters));
    s.central()
        .execute(
            "INSERT INTO meters (meter_id, name, location_id, meter_type, unit, configuration, updated_at)
             SELECT 'meter-' || lpad(g::text, 6, '0'), 'Meter ' || g, 'site-' || (g % 97), 'electricity', 'kWh',
                    jsonb_build_object('interval_s', 60, 'scale', 1.0, 'register', g % 8, 'tariff', 'T' || (g % 5)),
                    now()
             FROM generate_series(1, $1::int) g",
            &[&(k.meters as i32)],
        )
        .unwrap();
    let r = run_once(&s, &s.env, "mem-meters-new");
    let got = s.local_count("meters");
    let note = if got == k.meters as i64 {
        String::new()
    } else {
        format!(" (**only {got} arrived**: {})", r.first_error())
    };
    row(
        &mut o,
        format!("download {} new meters{note}", group(k.meters)),
        r.maxrss_kib,
        Some(10.0),
        "8.6 MiB",
    );
    s.central()
        .batch_execute("UPDATE meters SET name = name || ' (renamed)', updated_at = now()")
        .unwrap();
    let r = run_once(&s, &s.env, "mem-meters-changed");
    row(
        &mut o,
        format!("download {} changed meters", group(k.meters)),
        r.maxrss_kib,
        Some(10.0),
        "8.6 MiB",
    );
    let _ = writeln!(o);
    o
}

// ---------------------------------------------------------------------------------------
// 4. Size
// ---------------------------------------------------------------------------------------

fn size() -> String {
    let bin = Path::new(support::bin());
    // <target>/<profile>/meter-sync: cross builds sit under <target>/<triple>/release.
    let target = bin.parent().and_then(Path::parent).unwrap();
    let mut o = String::new();
    let _ = writeln!(
        o,
        "### Release binary size (Cargo.toml's release profile: LTO, stripped)\n"
    );
    let _ = writeln!(o, "| target | bytes | MiB | file(1) says |");
    let _ = writeln!(o, "|---|---:|---:|---|");
    let line = |o: &mut String, name: &str, p: &Path| {
        if let Ok(m) = std::fs::metadata(p) {
            let kind = sh(&format!("file -b '{}'", p.display()));
            let short: Vec<&str> = kind
                .split(", ")
                .filter(|f| f.contains("linked") || f.contains("stripped") || f.starts_with("ELF"))
                .collect();
            let _ = writeln!(
                o,
                "| {name} | {} | {:.2} | {} |",
                group(m.len() as usize),
                m.len() as f64 / MIB,
                short.join(", ")
            );
        }
    };
    line(&mut o, &format!("{} (host)", host_triple()), bin);
    // Whatever cross builds exist (deploy/build-release, cross): <target>/<triple>/release.
    let mut triples: Vec<String> = std::fs::read_dir(target)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.matches('-').count() >= 2)
                .collect()
        })
        .unwrap_or_default();
    triples.sort();
    for triple in triples {
        line(
            &mut o,
            &triple,
            &target.join(&triple).join("release").join("meter-sync"),
        );
    }
    let _ = writeln!(o);
    o
}

fn host_triple() -> String {
    sh("rustc -vV | sed -n 's/^host: //p'")
}

// ---------------------------------------------------------------------------------------
// 5. Fleet
// ---------------------------------------------------------------------------------------

fn fleet(k: &Knobs) -> String {
    let (n, backlog) = (k.fleet, k.fleet_backlog);
    progress(&format!(
        "fleet: preparing {n} gateway databases with {backlog} readings each"
    ));
    let mut s = Sandbox::new();
    // Production defaults for connecting, so that a central that cannot keep up with N
    // handshakes at once shows as retries rather than being hidden by generous limits.
    s.unset("MAX_CONNECTION_RETRIES")
        .unset("DB_CONNECTION_TIMEOUT_MS")
        .set("UPLOAD_TIME_BUDGET_SECONDS", 86_400)
        .set("LOG_LEVEL", "info");
    let template = s.local_db.clone();
    let local = s.local_cluster();
    let gateways: Vec<String> = (0..n).map(|i| format!("{template}_gw{i}")).collect();
    for (i, g) in gateways.iter().enumerate() {
        create_from_template(local, &template, g);
        let mut c = local.connect(g);
        insert_gateway_readings(&mut c, i, backlog);
    }
    local.admin().batch_execute("CHECKPOINT").unwrap();
    s.central().batch_execute("CHECKPOINT").unwrap();

    let t0 = Instant::now();
    let mut children = Vec::with_capacity(n);
    for (i, g) in gateways.iter().enumerate() {
        let mut env = s.env.clone();
        env.insert("POSTGRES_SYNC_DB".into(), g.clone());
        children.push(spawn_once(&s, &env, &format!("fleet-{i}")));
    }
    let done = wait_all(children);
    let wall = t0.elapsed().as_secs_f64();

    let total = (n * backlog) as i64;
    let (central_rows, distinct) = count_and_distinct(&mut s.central());
    let mut errors = 0;
    let mut first_error = String::new();
    let mut retries = 0;
    let mut drain_ms = Vec::new();
    let mut cycle_s = Vec::new();
    let mut rss = 0;
    for (r, g) in done.iter().zip(&gateways) {
        let log = r.log_text();
        retries += log.matches("retrying in").count();
        let left = local
            .connect(g)
            .query_one("SELECT count(*) FROM meter_readings", &[])
            .unwrap()
            .get::<_, i64>(0);
        if r.code != Some(0) || left != 0 || log.contains(" ERROR ") {
            errors += 1;
            if first_error.is_empty() {
                first_error = format!("{g}: exit {:?}, {left} left: {}", r.code, r.first_error());
            }
        }
        let ms: Option<i64> = local
            .connect(g)
            .query_opt(
                "SELECT duration_ms FROM sync_logs WHERE sync_type = 'upload' AND success",
                &[],
            )
            .unwrap()
            .map(|row| row.get(0));
        drain_ms.push(ms.unwrap_or(i64::MAX) as f64);
        cycle_s.push(r.elapsed.as_secs_f64());
        rss = rss.max(r.maxrss_kib);
    }
    let max_cycle = cycle_s.iter().cloned().fold(0.0, f64::max);
    let max_drain = drain_ms.iter().cloned().fold(0.0, f64::max);
    let exact = central_rows == total && distinct == total;
    progress(&format!(
        "fleet: {n} gateways, {total} readings in {wall:.1} s, {errors} with errors, central holds {central_rows}"
    ));
    if !first_error.is_empty() {
        progress(&format!("fleet: first error: {first_error}"));
    }

    let mut o = String::new();
    let _ = writeln!(
        o,
        "### Fleet: {n} gateways × {} readings, all at once, one central server\n",
        group(backlog)
    );
    let _ = writeln!(o, "| figure | value |");
    let _ = writeln!(o, "|---|---:|");
    let _ = writeln!(
        o,
        "| central ingest rate (all readings / first start to last exit) | {} readings/s |",
        group((total as f64 / wall) as usize)
    );
    let _ = writeln!(o, "| wall time, all gateways | {wall:.1} s |");
    let _ = writeln!(
        o,
        "| slowest gateway: upload phase (sync_logs) | {} |",
        if max_drain.is_finite() && max_drain < i64::MAX as f64 {
            format!("{:.1} s", max_drain / 1000.0)
        } else {
            "failed".into()
        }
    );
    let _ = writeln!(
        o,
        "| slowest gateway: whole `once` (start to exit) | {max_cycle:.1} s |"
    );
    let _ = writeln!(
        o,
        "| median gateway: whole `once` | {:.1} s |",
        median(&cycle_s)
    );
    let _ = writeln!(o, "| gateways with errors (must be 0) | {errors} |");
    let _ = writeln!(o, "| connection retries (logged) | {retries} |");
    let _ = writeln!(
        o,
        "| central rows / distinct reading_uid / expected | {} / {} / {} {} |",
        group(central_rows as usize),
        group(distinct as usize),
        group(total as usize),
        verdict(exact)
    );
    let _ = writeln!(o, "| largest daemon peak RSS | {} |", mib(rss));
    if !first_error.is_empty() {
        let _ = writeln!(o, "\nFirst error: `{first_error}`");
    }
    let _ = writeln!(o);
    o
}

/// A gateway of its own: 200 meters named after it, jsonb metadata on a tenth, one
/// reading per meter every 10 minutes or so going back from 2026-01-01.
fn insert_gateway_readings(c: &mut Client, gateway: usize, n: usize) {
    c.execute(
        "INSERT INTO meter_readings (meter_id, \"timestamp\", value, unit, metadata)
         SELECT 'gw' || $2::int || '-meter-' || (g % 200),
                timestamptz '2026-01-01 00:00:00+00' + make_interval(secs => (g * 3)::float8),
                (g * 1.5)::numeric, 'kWh',
                CASE WHEN g % 10 = 0 THEN jsonb_build_object('seq', g, 'src', 'collector') END
         FROM generate_series(1, $1::bigint) g",
        &[&(n as i64), &(gateway as i32)],
    )
    .unwrap();
}

fn create_from_template(cluster: &support::Cluster, template: &str, name: &str) {
    // Autovacuum may be visiting the template for a moment; CREATE DATABASE then refuses.
    for attempt in 0.. {
        match cluster.admin().batch_execute(&format!(
            "CREATE DATABASE \"{name}\" TEMPLATE \"{template}\""
        )) {
            Ok(()) => return,
            Err(e) if attempt < 50 => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => panic!("create database {name}: {e}"),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Running the daemon and measuring it
// ---------------------------------------------------------------------------------------

struct Finished {
    elapsed: Duration,
    code: Option<i32>,
    /// Peak resident set (VmHWM) in KiB, from the kernel's accounting at exit (wait4):
    /// exact, unlike polling /proc, and needs no /usr/bin/time.
    maxrss_kib: u64,
    /// User plus system CPU time the process used.
    cpu: Duration,
    log: PathBuf,
}

impl Finished {
    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn first_error(&self) -> String {
        self.log_text()
            .lines()
            .find(|l| l.contains(" ERROR ") || l.contains("error"))
            .unwrap_or("(no error logged)")
            .to_string()
    }

    /// The run must have emptied the local queue with a successful upload phase; other
    /// phases failing (downloads not there yet) do not spoil an upload figure.
    fn check_drained(&self, s: &Sandbox, db: &str) {
        let mut c = s.local_cluster().connect(db);
        let left: i64 = c
            .query_one("SELECT count(*) FROM meter_readings", &[])
            .unwrap()
            .get(0);
        let ok: Option<bool> = c
            .query_opt(
                "SELECT success FROM sync_logs WHERE sync_type = 'upload' ORDER BY id DESC LIMIT 1",
                &[],
            )
            .unwrap()
            .map(|r| r.get(0));
        assert!(
            left == 0 && ok == Some(true),
            "the upload did not drain the queue ({left} left, upload phase ok: {ok:?}); exit {:?}\n{}",
            self.code,
            self.log_text()
        );
        if self.code != Some(0) {
            progress(&format!(
                "note: exit {:?} although the upload drained: {}",
                self.code,
                self.first_error()
            ));
        }
    }
}

struct Running {
    pid: i32,
    started: Instant,
    log: PathBuf,
}

fn spawn_once(s: &Sandbox, env: &std::collections::BTreeMap<String, String>, tag: &str) -> Running {
    let log = s.dir.join(format!("{tag}.log"));
    let f = std::fs::File::create(&log).unwrap();
    let started = Instant::now();
    #[allow(clippy::zombie_processes)]
    let child = s
        .program_with(support::bin(), env)
        .arg("once")
        .stdout(Stdio::null())
        .stderr(f)
        .spawn()
        .expect("spawn meter-sync");
    // Reaped with wait4 in wait_all, which std's Child knows nothing about; its Drop
    // neither waits nor kills, so letting it go leaves no zombie.
    Running {
        pid: child.id() as i32,
        started,
        log,
    }
}

fn run_once(s: &Sandbox, env: &std::collections::BTreeMap<String, String>, tag: &str) -> Finished {
    wait_all(vec![spawn_once(s, env, tag)]).pop().unwrap()
}

/// Reaps every child as soon as it exits (so each one's elapsed time is its own), with
/// its rusage. A child still running after an hour is killed: a hung daemon must not hang
/// the benchmark.
fn wait_all(mut running: Vec<Running>) -> Vec<Finished> {
    let mut done: Vec<Option<Finished>> = (0..running.len()).map(|_| None).collect();
    let mut left: Vec<usize> = (0..running.len()).collect();
    let limit = Duration::from_secs(3600);
    while !left.is_empty() {
        left.retain(|&i| {
            let r = &mut running[i];
            let mut status = 0;
            // SAFETY: plain syscall on our own child; both out-pointers are valid locals.
            let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
            let got = unsafe { libc::wait4(r.pid, &mut status, libc::WNOHANG, &mut ru) };
            if got == r.pid {
                let code = libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status));
                done[i] = Some(Finished {
                    elapsed: r.started.elapsed(),
                    code,
                    maxrss_kib: ru.ru_maxrss as u64,
                    cpu: tv(ru.ru_utime) + tv(ru.ru_stime),
                    log: std::mem::take(&mut r.log),
                });
                return false;
            }
            if r.started.elapsed() > limit {
                // SAFETY: signalling our own unreaped child.
                unsafe { libc::kill(r.pid, libc::SIGKILL) };
            }
            true
        });
        std::thread::sleep(Duration::from_millis(5));
    }
    done.into_iter().map(Option::unwrap).collect()
}

fn tv(t: libc::timeval) -> Duration {
    Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
}

/// CPU time of every child reaped so far (the psql pipe is reaped by bash, and bash by us).
fn children_cpu() -> Duration {
    // SAFETY: getrusage only writes the struct we hand it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) };
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

// ---------------------------------------------------------------------------------------
// Profiling
// ---------------------------------------------------------------------------------------

/// Restarts both shared servers with pg_stat_statements loaded (before any sandbox uses them).
fn enable_pg_stat_statements() {
    let (local, central) = support::shared();
    for c in [local, central] {
        let conf = c.data.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf).unwrap();
        text.push_str(
            "\nshared_preload_libraries = 'pg_stat_statements'\npg_stat_statements.track = all\n",
        );
        std::fs::write(&conf, text).unwrap();
        c.stop();
        c.restart();
    }
}

fn top_statements(s: &Sandbox) -> String {
    let mut o = String::from("\n--- pg_stat_statements (top 8 by total time) ---\n");
    for (name, mut c) in [
        ("local", s.local_cluster().admin()),
        ("central", s.central()),
    ] {
        let _ = c.batch_execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements");
        let rows = c
            .query(
                "SELECT calls, round(total_exec_time)::bigint, rows, left(regexp_replace(query, '\\s+', ' ', 'g'), 140)
                 FROM pg_stat_statements ORDER BY total_exec_time DESC LIMIT 8",
                &[],
            )
            .unwrap_or_default();
        let _ = writeln!(o, "[{name}] calls | total ms | rows | query");
        for r in rows {
            let _ = writeln!(
                o,
                "  {} | {} | {} | {}",
                r.get::<_, i64>(0),
                r.get::<_, i64>(1),
                r.get::<_, i64>(2),
                r.get::<_, String>(3)
            );
        }
    }
    o
}

// ---------------------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------------------

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "**missed**"
    }
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

/// 1234567 -> "1,234,567".
fn group(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn sh(cmd: &str) -> String {
    Command::new("sh")
        .args(["-c", cmd])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn progress(msg: &str) {
    eprintln!("[{:>5} s, load {}] {msg}", elapsed_s(), loadavg());
}

fn elapsed_s() -> u64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_secs()
}

/// Keeps the tables of every run under target/bench/ for the README.
fn save(report: &str) {
    let bin = Path::new(support::bin());
    let dir = bin.parent().and_then(Path::parent).unwrap().join("bench");
    let _ = std::fs::create_dir_all(&dir);
    let name = format!("sync-{}.md", sh("date -u +%Y%m%dT%H%M%SZ"));
    if std::fs::write(dir.join(&name), report).is_ok() {
        eprintln!("saved to {}", dir.join(name).display());
    }
}

// ---------------------------------------------------------------------------------------
// Download bytes (P20): what an idle cycle costs on the central link, against table size
// ---------------------------------------------------------------------------------------

/// Bytes through a counting proxy in front of central, both directions, for a daemon
/// (`run`, one connection kept between cycles) over a central holding N meters of about
/// 1 KB of configuration each and 200 tenants: the first cycle (a full reconciliation:
/// what every cycle cost before changes-only downloads), then idle cycles (nothing queued,
/// nothing changed: median and max of BENCH_DOWNLOAD_IDLE cycles), then the cycle that
/// brings one changed meter. Sizes: BENCH_DOWNLOAD_METERS (default 100,2000,20000).
fn download_bytes() -> String {
    let sizes: Vec<usize> = std::env::var("BENCH_DOWNLOAD_METERS")
        .unwrap_or_else(|_| "100,2000,20000".into())
        .split(',')
        .map(|x| {
            x.trim()
                .replace('_', "")
                .parse()
                .unwrap_or_else(|_| fail(&format!("BENCH_DOWNLOAD_METERS: {x:?} is not a number")))
        })
        .collect();
    let idle_reps: usize = std::env::var("BENCH_DOWNLOAD_IDLE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(7)
        .max(1);
    let mut o = String::new();
    let _ = writeln!(
        o,
        "### Central link bytes per cycle (up + down, TLS included), `meter-sync run`\n"
    );
    let _ = writeln!(
        o,
        "| meters (+200 tenants) | central data (meters + tenant) | first cycle (full) | idle cycle: median (max of {idle_reps}) | cycle with 1 changed meter | idle target ≤ 4 KiB |"
    );
    let _ = writeln!(o, "|---:|---:|---:|---:|---:|---|");
    for n in sizes {
        progress(&format!("download: {n} meters"));
        let mut s = Sandbox::new();
        s.central()
            .batch_execute(&format!(
                "INSERT INTO meters (meter_id, name, location_id, meter_type, unit, configuration, updated_at)
                 SELECT 'm-' || lpad(g::text, 6, '0'), 'Meter ' || g, 'site-' || (g % 97), 'electricity', 'kWh',
                        jsonb_build_object('registers', (SELECT jsonb_agg(jsonb_build_object(
                            'obis', '1.8.' || r, 'scale', r * 0.001, 'label', 'register number ' || r || ' of ' || g))
                            FROM generate_series(1, 16) r), 'serial', md5(g::text)),
                        now()
                 FROM generate_series(1, {n}) g;
                 INSERT INTO tenant (tenant_id, name, configuration, updated_at)
                 SELECT 't-' || g, 'Tenant ' || g, jsonb_build_object('tariff', g), now()
                 FROM generate_series(1, 200) g;"
            ))
            .unwrap();
        for t in ["meters", "tenant"] {
            s.central()
                .batch_execute(&format!("VACUUM ANALYZE {t}"))
                .unwrap();
        }
        let data: i64 = s
            .central()
            .query_one(
                "SELECT pg_total_relation_size('meters') + pg_total_relation_size('tenant')",
                &[],
            )
            .unwrap()
            .get(0);
        let target = format!("127.0.0.1:{}", s.central_cluster().port);
        let proxy = Proxy::start(target.parse().unwrap());
        s.set("POSTGRES_CLIENT_PORT", proxy.port())
            .set("SYNC_INTERVAL_SECONDS", 1)
            .set("DB_QUERY_TIMEOUT_MS", 120_000);
        let d = s.spawn(&["run"]);
        let cycles = || d.log_text().matches("cycle finished:").count();
        let total = || {
            let (up, down) = proxy.bytes_forwarded();
            up + down
        };
        // Each reading is taken while the daemon pauses between cycles (1 s), when
        // nothing moves on the link.
        let wait_cycle = |k: usize| {
            if !support::wait_until(Duration::from_secs(600), || cycles() >= k) {
                fail(&format!(
                    "download: cycle {k} never finished:\n{}",
                    d.log_text()
                ));
            }
            total()
        };
        let first = wait_cycle(1);
        let mut last = first;
        let mut idle = Vec::new();
        for i in 0..idle_reps {
            let now = wait_cycle(2 + i);
            idle.push((now - last) as f64);
            last = now;
        }
        let log = d.log_text();
        // Piece k (from 1) starts with cycle k's result line; cycle 1 is the full one.
        let idle_ok = log
            .split("cycle finished:")
            .skip(2)
            .take(idle_reps)
            .all(|c| c.contains("meters: up to date (no changes centrally)"));
        s.central()
            .batch_execute("UPDATE meters SET name = 'Renamed' WHERE meter_id = 'm-000001'")
            .unwrap();
        // The change may arrive in the cycle running now or the next one: count both,
        // minus one idle cycle.
        let c = cycles();
        let before = last;
        let after = wait_cycle(c + 2);
        let changed = after - before - median(&idle) as u64;
        drop(d);
        let med = median(&idle);
        let max = idle.iter().cloned().fold(0.0, f64::max);
        let _ = writeln!(
            o,
            "| {} | {} | {} | {} ({}) | {} | {}{} |",
            group(n),
            group(data as usize),
            group(first as usize),
            group(med as usize),
            group(max as usize),
            group(changed as usize),
            verdict(max <= 4096.0),
            if idle_ok {
                ""
            } else {
                " (an idle cycle downloaded rows!)"
            }
        );
    }
    let _ = writeln!(
        o,
        "\nThe first cycle includes the TCP, TLS and SCRAM handshakes; idle cycles reuse the connection. \
         Before changes-only downloads every cycle cost about what the first one does.\n"
    );
    o
}
