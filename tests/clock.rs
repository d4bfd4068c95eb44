//! A gateway's wall clock that is wrong and is stepped by years while the daemon
//! runs, for real: the local PostgreSQL and the binary on one fake clock
//! (`support::clock`, libfaketime), central's clock right. Nothing may be lost
//! (SPEC §1), the cycles keep their interval (monotonic time), and what is timed by
//! the wall clock (the resend window, the daily full reconciliation, `status`)
//! survives the steps. docs/operating.md, "The gateway's clock".

mod support;

use std::time::Duration;

use serde_json::Value;
use support::clock::FakeClock;
use support::{shared, wait_until, Sandbox};

/// The collector writes `n` readings stamped by the gateway's clock.
fn collect(s: &Sandbox, n: i64, meter: &str) {
    s.local()
        .execute(
            "INSERT INTO meter_readings (meter_id, \"timestamp\", value, unit)
             SELECT $1, now(), g, 'kWh' FROM generate_series(1, $2::bigint) g",
            &[&meter, &n],
        )
        .unwrap();
}

fn meter_name(s: &Sandbox) -> String {
    s.local()
        .query_one("SELECT name::text FROM meters WHERE meter_id = 'm-1'", &[])
        .unwrap()
        .get(0)
}

#[test]
fn a_gateway_clock_stepped_by_years_loses_nothing_and_keeps_its_schedules() {
    let clock = FakeClock::new();
    let local: &'static support::Cluster = Box::leak(Box::new(clock.local_cluster()));
    let central = &shared().1;
    let name = format!("clock{}", std::process::id());
    local.create_db(&name);
    central.create_db(&name);
    let mut s = Sandbox::on(local, central, &name, &name);
    for (k, v) in clock.env() {
        s.set(&k, v);
    }
    s.set("UPLOAD_RETAIN_HOURS", 1)
        .set("DOWNLOAD_FULL_EVERY_SECONDS", 3);
    s.migrate();
    s.central()
        .batch_execute(
            "INSERT INTO meters (meter_id, name, meter_type, unit)
             VALUES ('m-1', 'Main hall', 'electricity', 'kWh')",
        )
        .unwrap();
    collect(&s, 10, "right");
    let mut d = s.spawn(&["run"]);
    assert!(
        wait_until(Duration::from_secs(30), || s
            .central_count("meter_readings")
            == 10),
        "{}",
        d.log_text()
    );

    // A bad NTP server (or an operator) steps the clock 700 days ahead: the ten
    // readings retained an hour are not purged at once.
    clock.set("+700d");
    let at = d.log_text().len();
    collect(&s, 10, "ahead");
    assert!(
        wait_until(Duration::from_secs(30), || s
            .central_count("meter_readings")
            == 20
            && d.log_text()[at..].contains("off central's")),
        "{}",
        &d.log_text()[at..]
    );
    let log = d.log_text()[at..].to_string();
    assert!(!log.contains("past the resend window"), "{log}");
    assert_eq!(s.local_count("meter_readings"), 20);

    // Set right again: the ten marked 700 days ahead are kept a whole window from
    // now, the daily full reconciliation keeps its schedule (it repairs a hand
    // edit), the cycles their interval.
    clock.set("+0");
    let at = d.log_text().len();
    s.local()
        .batch_execute("UPDATE meters SET name = 'edited by hand'")
        .unwrap();
    assert!(
        wait_until(Duration::from_secs(30), || {
            let log = &d.log_text()[at..];
            log.contains("10 retained reading(s) were marked uploaded in the future")
                && log.contains("meters: full reconciliation (the last one is 3 s old)")
                && meter_name(&s) == "Main hall"
                && log.matches("cycle finished").count() >= 5
        }),
        "{}",
        &d.log_text()[at..]
    );
    assert_eq!(s.local_count("meter_readings WHERE synced_at > now()"), 0);
    assert_eq!(s.local_count("meter_readings"), 20);
    // `status`: the last run of each phase is one since the clock was set right.
    let ahead: String = s
        .central()
        .query_one(
            "SELECT to_char(now() + interval '600 days', 'YYYY-MM-DD')",
            &[],
        )
        .unwrap()
        .get(0);
    let st = s.run(&["status", "--json"]);
    let v: Value = serde_json::from_str(&st.stdout).unwrap();
    for p in ["upload", "meters", "tenant"] {
        let last = v["phases"][p]["last_run_at"].as_str().unwrap_or_default();
        assert!(last < ahead.as_str(), "{p}: {last} (700 days ahead)\n{v}");
        assert_eq!(v["phases"][p]["last_run_ok"], true, "{p}: {v}");
    }

    // A reboot without a battery-backed clock: the gateway comes up in 1971, and
    // central's certificate is not valid yet by that clock. The readings stamped
    // 1971 wait, and go once NTP has set the clock; none is lost or purged.
    d.kill9();
    clock.set("-20400d");
    collect(&s, 5, "1971");
    let d = s.spawn(&["run"]);
    d.wait_log(
        "it is not valid yet by this gateway's clock (1971-",
        Duration::from_secs(30),
    );
    assert_eq!(s.local_count("meter_readings WHERE NOT is_synchronized"), 5);
    clock.set("+0");
    assert!(
        wait_until(Duration::from_secs(60), || s
            .central_count("meter_readings")
            == 25),
        "{}",
        d.log_text()
    );
    assert_eq!(
        s.central_count("meter_readings WHERE \"timestamp\" < '1972-01-01'"),
        5
    );
    assert!(
        !d.log_text().contains("past the resend window"),
        "{}",
        d.log_text()
    );
    assert_eq!(s.local_count("meter_readings"), 25);
}
