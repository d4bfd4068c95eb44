//! The unit under a real systemd (issue 15 item 2, SPEC §6): a Debian bookworm
//! gateway booted with `systemd-nspawn --boot` (tests/support/nspawn.rs), the
//! binary installed with `deploy/install` exactly as the README says (its live
//! path: `SSH=` is a shim that enters the container), against the test clusters
//! on 127.0.0.1.
//!
//! `#[ignore]`d: it needs root, debootstrap and systemd-container, and takes
//! about a minute (a few more on the first run, which makes the cached tree).
//! `METER_SYNC_SYSTEMD=1 bash .ci/cross` runs it with `--ignored`.

mod support;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use support::host::{output_text, repo};
use support::nspawn::{configure_gateway, Container};
use support::readings::count_and_distinct;
use support::{wait_until, Sandbox};

const UNIT: &str = "meter-sync.service";

/// deploy/install or deploy/rollback against the container's live system.
fn deploy(c: &Container, script: &str, args: &[&str]) -> Output {
    Command::new(repo(&format!("deploy/{script}")))
        .args(args)
        .arg("gateway")
        .env("SSH", c.ssh_shim())
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// The metrics path the documentation gives (the example file's commented line).
fn documented_metrics_path() -> String {
    fs::read_to_string(repo("deploy/meter-sync.env.example"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("#METRICS_TEXTFILE="))
        .expect("deploy/meter-sync.env.example documents METRICS_TEXTFILE")
        .trim()
        .to_string()
}

/// (PRIORITY, MESSAGE) of the daemon's own journal entries (not systemd's
/// about the unit).
fn journal(c: &Container) -> Vec<(u8, String)> {
    c.sh(&format!("journalctl -u {UNIT} -o json --no-pager"))
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["_COMM"] == "meter-sync")
        .filter_map(|v| {
            let msg = match &v["MESSAGE"] {
                serde_json::Value::String(s) => s.clone(),
                // journald stores non-UTF-8 or control characters as a byte array.
                serde_json::Value::Array(b) => String::from_utf8_lossy(
                    &b.iter()
                        .filter_map(|x| x.as_u64().map(|x| x as u8))
                        .collect::<Vec<u8>>(),
                )
                .into_owned(),
                _ => return None,
            };
            let prio = v["PRIORITY"].as_str()?.parse().ok()?;
            Some((prio, msg))
        })
        .collect()
}

fn lines_of(j: &[(u8, String)], ident: &str) -> String {
    j.iter()
        .map(|(p, m)| format!("<{p}> {m}"))
        .filter(|l| l.contains(ident))
        .collect::<Vec<_>>()
        .join("\n")
}

fn pending(s: &Sandbox) -> i64 {
    s.local()
        .query_one(
            "SELECT count(*) FROM meter_readings WHERE NOT is_synchronized AND sync_error IS NULL",
            &[],
        )
        .unwrap()
        .get(0)
}

fn step(t: &Instant, what: &str) {
    eprintln!("systemd: {:6.1} s  {what}", t.elapsed().as_secs_f64());
}

#[test]
#[ignore = "boots systemd in a container (root, debootstrap, systemd-container): .ci/cross runs it with --ignored"]
fn unit_under_a_real_systemd() {
    let t = Instant::now();
    let s = Sandbox::empty();
    let batch = 10;
    let c = Container::boot("unit", |_| {});
    step(&t, "container booted");

    // docs/deploying.md "The first install, step by step", step 3: a first install enables the unit
    // and, with nothing configured, does not start it.
    let o = deploy(&c, "install", &["--binary", support::bin()]);
    assert!(o.status.success(), "first install: {}", output_text(&o));
    assert_eq!(
        c.prop(UNIT, "ActiveState"),
        "inactive",
        "{}",
        output_text(&o)
    );
    assert_eq!(
        c.sh(&format!("systemctl is-enabled {UNIT}")).trim(),
        "enabled"
    );
    let version = c.sh("/usr/local/bin/meter-sync --version");
    assert!(
        version.starts_with(&format!("meter-sync {}", env!("CARGO_PKG_VERSION"))),
        "{version}"
    );
    step(&t, "deploy/install (first install)");

    // Step 4: configure.
    configure_gateway(
        &c.root,
        &s,
        &[
            ("BATCH_SIZE", batch.to_string()),
            ("UPLOAD_PIPELINE_DEPTH", "1".into()),
        ],
    );
    // The metrics file at the documented path, set before step 5: its directory
    // is the unit's RuntimeDirectory, which step 5's command creates too.
    let metrics = documented_metrics_path();
    let env = c.root.join("etc/meter-sync/meter-sync.env");
    let cfg = fs::read_to_string(&env).unwrap();
    fs::write(&env, format!("{cfg}METRICS_TEXTFILE={metrics}\n")).unwrap();
    // Step 5: the tables, with the service's environment and sandbox, exactly as
    // docs/deploying.md gives the command.
    c.sh(
        "systemd-run --wait --pipe --collect --unit=meter-sync-migrate \
         -p User=meter-sync -p DynamicUser=yes -p EnvironmentFile=/etc/meter-sync/meter-sync.env \
         -p LoadCredential=client-password:/etc/meter-sync/client-password \
         -p LoadCredential=sync-password:/etc/meter-sync/sync-password \
         -p RuntimeDirectory=meter-sync -p RuntimeDirectoryPreserve=yes \
         /usr/local/bin/meter-sync migrate",
    );
    s.insert_readings(50);
    step(&t, "configured and migrated (systemd-run)");

    // Step 6: start returns once READY=1 came; the first cycle reports in STATUS=.
    c.sh(&format!("systemctl start {UNIT}"));
    assert_eq!(c.prop(UNIT, "ActiveState"), "active");
    let mut status = String::new();
    assert!(
        wait_until(Duration::from_secs(30), || {
            status = c.prop(UNIT, "StatusText");
            status.starts_with("last cycle ok")
        }),
        "STATUS= never said the cycle was ok: {status:?}\n{}",
        c.sh(&format!("journalctl -u {UNIT} --no-pager | tail -30"))
    );
    assert_eq!(s.central_count("meter_readings"), 50, "{status}");
    step(&t, &format!("active; STATUS={status}"));

    // Journal priorities: the cycle's lines are info (6), none is an error.
    let j = journal(&c);
    let cycle_lines: Vec<_> = j.iter().filter(|(_, m)| m.contains("cycle")).collect();
    assert!(
        !cycle_lines.is_empty(),
        "no cycle lines in the journal: {j:?}"
    );
    assert!(
        cycle_lines.iter().all(|(p, _)| *p == 6),
        "cycle lines not at info: {cycle_lines:?}"
    );
    assert!(
        j.iter().all(|(p, _)| *p > 3),
        "errors in a good cycle: {}",
        lines_of(&j, "")
    );

    // The metrics file, at the documented path, readable by another user
    // (node_exporter runs as its own).
    assert!(
        // Inside: /run is the container's own tmpfs, not in the overlay.
        wait_until(Duration::from_secs(10), || c
            .exec_output(&format!("test -s '{metrics}'"))
            .status
            .success()),
        "no metrics file at {metrics}: {}",
        lines_of(&journal(&c), "")
    );
    let as_nobody = c.exec_output(&format!("runuser -u nobody -- cat '{metrics}'"));
    assert!(
        as_nobody.status.success(),
        "another user cannot read {metrics}: {}",
        output_text(&as_nobody)
    );
    assert!(String::from_utf8_lossy(&as_nobody.stdout).contains("meter_sync_cycles_total"));
    assert_eq!(
        c.sh(&format!("stat -c %a '{metrics}'")).trim(),
        "644",
        "mode of {metrics}"
    );

    // The sandbox: systemd's own score of the live unit, and what it applied to the process.
    let sec = c.sh(&format!("systemd-analyze security --no-pager {UNIT}"));
    let line = sec
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("no exposure figure: {sec}"))
        .to_string();
    let score: f64 = line
        .split(':')
        .nth(1)
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("cannot read {line:?}"));
    assert!(score <= 1.1, "exposure {score}: {sec}");
    let pid = c.prop(UNIT, "MainPID");
    let proc_status = c.sh(&format!("cat /proc/{pid}/status"));
    for want in ["NoNewPrivs:\t1", "Seccomp:\t2", "CapEff:\t0000000000000000"] {
        assert!(
            proc_status.contains(want),
            "daemon lacks {want:?}: {proc_status}"
        );
    }
    step(&t, &format!("sandbox: {}", line.trim()));

    // An upgrade onto a new release (deploy/install's health gate, once issue 15a
    // adds it, waits for a good cycle: this configuration has them).
    let v2 = c.dir.join("meter-sync.v2");
    let mut b = fs::read(support::bin()).unwrap();
    b.push(0);
    fs::write(&v2, &b).unwrap();
    let o = deploy(&c, "install", &["--binary", v2.to_str().unwrap()]);
    assert!(o.status.success(), "upgrade: {}", output_text(&o));
    assert_ne!(
        c.prop(UNIT, "MainPID"),
        pid,
        "upgrade did not restart: {}",
        output_text(&o)
    );
    assert_eq!(c.prop(UNIT, "ActiveState"), "active");
    assert!(
        fs::read(c.root.join("usr/local/bin/meter-sync")).unwrap() == b,
        "the gateway does not run the release it should"
    );
    step(&t, "deploy/install upgrade: restarted, active");

    // The health gate on a real systemd: a release that starts (READY=1) but
    // never completes a cycle is rolled back, binary and unit, and the previous
    // one cycles again.
    let broken = c.dir.join("meter-sync.broken");
    fs::write(
        &broken,
        "#!/bin/sh\ncase \"$1\" in --version) exec /usr/local/bin/meter-sync.prev --version ;; esac\n\
         POSTGRES_CLIENT_PORT=1 exec /usr/local/bin/meter-sync.prev \"$@\"\n",
    )
    .unwrap();
    fs::set_permissions(&broken, fs::Permissions::from_mode(0o755)).unwrap();
    let gate = Instant::now();
    let o = deploy(
        &c,
        "install",
        &[
            "--binary",
            broken.to_str().unwrap(),
            "--health-timeout",
            "10",
        ],
    );
    assert_eq!(
        o.status.code(),
        Some(1),
        "not rolled back: {}",
        output_text(&o)
    );
    assert!(
        fs::read(c.root.join("usr/local/bin/meter-sync")).unwrap() == b,
        "the gateway does not run the release it should"
    );
    assert!(
        wait_until(Duration::from_secs(20), || c
            .prop(UNIT, "StatusText")
            .starts_with("last cycle ok")),
        "the restored release does not cycle: {}",
        output_text(&o)
    );
    step(
        &t,
        &format!(
            "deploy/install of a release that never cycles: rolled back in {:.0} s",
            gate.elapsed().as_secs_f64()
        ),
    );

    // A stop in the middle of a drain: exit 0, every batch whole.
    let total = 100_000;
    support::insert_readings(&mut s.local(), total, 1_000_000);
    let before = s.central_count("meter_readings");
    assert!(
        wait_until(Duration::from_secs(30), || s
            .central_count("meter_readings")
            > before + 5 * batch),
        "the drain did not start"
    );
    let stop = Instant::now();
    c.sh(&format!("systemctl stop {UNIT}"));
    let stop_s = stop.elapsed().as_secs_f64();
    assert_eq!(c.prop(UNIT, "ExecMainStatus"), "0");
    assert_eq!(c.prop(UNIT, "Result"), "success");
    let uploaded = s.central_count("meter_readings") - before;
    let left = pending(&s);
    assert!(
        left > 0,
        "the drain finished before the stop: not a mid-drain stop"
    );
    assert_eq!(uploaded + left, total as i64, "readings lost or doubled");
    assert_eq!(
        uploaded % batch,
        0,
        "a partial batch reached central: {uploaded}"
    );
    let (rows, distinct) = count_and_distinct(&mut s.central());
    assert_eq!(distinct, rows);
    step(
        &t,
        &format!("stopped mid-drain in {stop_s:.2} s, exit 0, {uploaded} uploaded, {left} left"),
    );

    // The watchdog restarts a frozen daemon (WatchdogSec small via a drop-in).
    c.sh(&format!(
        "mkdir -p /etc/systemd/system/{UNIT}.d && printf '[Service]\\nWatchdogSec=3\\nRestartSec=1\\n' \
         > /etc/systemd/system/{UNIT}.d/test.conf && systemctl daemon-reload && systemctl start {UNIT}"
    ));
    let pid = c.prop(UNIT, "MainPID");
    let restarts: u32 = c.prop(UNIT, "NRestarts").parse().unwrap();
    c.sh(&format!("kill -STOP {pid}"));
    let frozen = Instant::now();
    assert!(
        wait_until(Duration::from_secs(30), || {
            c.prop(UNIT, "NRestarts").parse::<u32>().unwrap() > restarts
                && c.prop(UNIT, "ActiveState") == "active"
        }),
        "a frozen daemon was not restarted: {}",
        c.sh(&format!("systemctl status --no-pager {UNIT} || true"))
    );
    let restarted_s = frozen.elapsed().as_secs_f64();
    assert_ne!(c.prop(UNIT, "MainPID"), pid);
    let j = c.sh(&format!("journalctl -u {UNIT} --no-pager -o cat"));
    assert!(
        j.contains("Watchdog timeout"),
        "systemd did not log a watchdog timeout: {j}"
    );
    step(
        &t,
        &format!("frozen daemon restarted by the watchdog after {restarted_s:.1} s"),
    );

    // A bad configuration: exit 78, failed, no restart loop, the reason in `-p err`.
    let mut cfg = fs::read_to_string(&env).unwrap();
    cfg.push_str("BATCH_SIZE=0\n");
    fs::write(&env, cfg).unwrap();
    let o = c.exec_output(&format!("systemctl restart {UNIT}"));
    assert!(
        !o.status.success(),
        "a bad configuration started: {}",
        output_text(&o)
    );
    std::thread::sleep(Duration::from_secs(4)); // four RestartSec= periods
    assert_eq!(c.prop(UNIT, "ExecMainStatus"), "78");
    assert_eq!(c.prop(UNIT, "ActiveState"), "failed");
    // A manual restart resets the counter: any automatic one since counts.
    assert_eq!(
        c.prop(UNIT, "NRestarts").parse::<u32>().unwrap(),
        0,
        "restart loop"
    );
    let err = c.sh(&format!("journalctl -p err -u {UNIT} --no-pager -o cat"));
    assert!(
        err.contains("BATCH_SIZE"),
        "journalctl -p err does not say why: {err:?}"
    );
    step(&t, "bad configuration: exit 78, failed, no restart");

    eprintln!(
        "systemd: unit_under_a_real_systemd took {:.0} s",
        t.elapsed().as_secs_f64()
    );
}
