//! What the daemon writes to its log (P14, P16; issue 15 item 1): sd-daemon
//! priority prefixes when stderr is the journal, configuration errors at error
//! priority, control characters from outside escaped, and an idle cycle that
//! costs at most two info lines.

mod support;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::process::Stdio;
use std::time::Duration;

use support::Sandbox;

/// Runs `args` with stderr to a file and `JOURNAL_STREAM` naming that file
/// (`journal`) or naming another file (`!journal`: the variable was inherited,
/// the stream was not); returns the exit code and what it wrote to stderr.
fn run_with_journal_stream(s: &Sandbox, args: &[&str], journal: bool) -> (Option<i32>, String) {
    let err = s.dir.join(format!("stderr-{}", args.join("-")));
    let f = fs::File::create(&err).unwrap();
    let named = if journal {
        err.clone()
    } else {
        let other = s.dir.join("another-stream");
        fs::write(&other, "").unwrap();
        other
    };
    let md = fs::metadata(&named).unwrap();
    let status = s
        .command(args)
        .env("JOURNAL_STREAM", format!("{}:{}", md.dev(), md.ino()))
        .stdout(Stdio::null())
        .stderr(f)
        .status()
        .unwrap();
    (status.code(), fs::read_to_string(&err).unwrap())
}

/// The priority prefix of a journal line, and the rest.
fn priority(line: &str) -> (u8, &str) {
    let rest = line
        .strip_prefix('<')
        .unwrap_or_else(|| panic!("no priority prefix: {line:?}"));
    let (p, msg) = rest
        .split_once('>')
        .unwrap_or_else(|| panic!("no priority prefix: {line:?}"));
    let p: u8 = p
        .parse()
        .unwrap_or_else(|_| panic!("bad priority: {line:?}"));
    assert!(p <= 7, "{line:?}");
    (p, msg)
}

fn priority_of(log: &str, needle: &str) -> u8 {
    let line = log
        .lines()
        .find(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("no line with {needle:?} in:\n{log}"));
    priority(line).0
}

/// A central nobody listens on: the upload fails after a warned retry, the
/// downloads fail at once, the cycle still ends with its result line.
fn central_away() -> Sandbox {
    let mut s = Sandbox::new();
    s.set("POSTGRES_CLIENT_PORT", support::free_port());
    s.set("MAX_CONNECTION_RETRIES", 2);
    s.set("LOG_LEVEL", "debug");
    s
}

#[test]
fn journal_stream_lines_carry_their_priority() {
    let s = central_away();
    let (code, log) = run_with_journal_stream(&s, &["once"], true);
    assert_eq!(code, Some(1), "{log}");
    let mut seen = [false; 8];
    for line in log.lines() {
        let (p, msg) = priority(line);
        seen[p as usize] = true;
        // journald stamps the time itself.
        assert!(
            !msg.starts_with("20"),
            "timestamp on a journal line: {line:?}"
        );
    }
    assert_eq!(priority_of(&log, "upload phase failed"), 3);
    assert_eq!(priority_of(&log, "retrying in"), 4);
    assert_eq!(priority_of(&log, "cycle finished"), 6);
    assert!(seen[7], "no debug line at 7:\n{log}");
}

#[test]
fn an_inherited_journal_stream_variable_is_not_the_journal() {
    let s = central_away();
    let (code, log) = run_with_journal_stream(&s, &["once"], false);
    assert_eq!(code, Some(1), "{log}");
    for line in log.lines() {
        assert!(!line.starts_with('<'), "journal prefix on a file: {line:?}");
        assert!(line.starts_with("20"), "no timestamp: {line:?}");
    }
    assert!(
        log.lines()
            .any(|l| l.contains(" ERROR upload phase failed")),
        "{log}"
    );
}

#[test]
fn configuration_errors_reach_the_journal_as_errors() {
    let mut s = Sandbox::empty();
    s.set("BATCH_SIZE", "lots");
    for cmd in ["run", "once", "check-config"] {
        let (code, log) = run_with_journal_stream(&s, &[cmd], true);
        assert_eq!(code, Some(78), "{cmd}: {log}");
        let line = log
            .lines()
            .find(|l| l.contains("BATCH_SIZE"))
            .unwrap_or_else(|| panic!("{cmd}: BATCH_SIZE not named:\n{log}"));
        assert_eq!(priority(line).0, 3, "{cmd}: {line:?}");
        for l in log.lines() {
            priority(l);
        }
    }
}

/// Error messages name their database once: "central: connect to …", never
/// "central: central: …".
#[test]
fn error_messages_name_the_side_once() {
    let s = central_away();
    let r = s.run(&["once"]);
    assert_eq!(r.code, Some(1), "{}", r.all());
    assert!(
        r.stderr.contains("meters phase failed: central: "),
        "{}",
        r.stderr
    );
    for side in ["central", "local"] {
        let twice = format!("{side}: {side}:");
        assert!(!r.all().contains(&twice), "{twice:?} in:\n{}", r.all());
    }
}

/// A notice a server sends the daemon's session (central's "terminating connection
/// due to immediate shutdown command" on a bad day; here a central trigger's
/// `RAISE WARNING`) is logged naming the database it came from, not bare.
#[test]
fn a_server_notice_names_its_database() {
    let s = Sandbox::new();
    s.central()
        .batch_execute(
            "CREATE FUNCTION warn() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN RAISE WARNING 'central is about to restart'; RETURN NULL; END $$;
             CREATE TRIGGER warn BEFORE INSERT ON meter_readings
                 FOR EACH STATEMENT EXECUTE FUNCTION warn();",
        )
        .unwrap();
    s.insert_readings(3);
    let r = s.run(&["once"]);
    r.assert_ok();
    let line = r
        .stderr
        .lines()
        .find(|l| l.contains("central is about to restart"))
        .unwrap_or_else(|| panic!("the notice is not logged:\n{}", r.stderr));
    assert!(
        line.contains("central: the server says: WARNING: central is about to restart"),
        "{line}"
    );
}

/// A meter name central sends with a newline (and a terminal escape) in it is
/// logged on one line: it cannot forge a line of its own.
#[test]
fn a_meter_name_cannot_forge_a_log_line() {
    let s = Sandbox::new();
    let forged = "2026-01-01T00:00:00.000Z ERROR upload phase failed: forged";
    s.central()
        .execute(
            "INSERT INTO meters (meter_id, name, location_id, meter_type, unit, updated_at)
             VALUES ('m-1', $1, 'loc-1', 'electricity', 'kWh', now())",
            &[&format!("Hall\n{forged}\r\u{1b}[1A")],
        )
        .unwrap();
    let r = s.run(&["once"]);
    r.assert_ok();
    assert!(
        !r.stderr.lines().any(|l| l.starts_with(forged)),
        "a forged line:\n{}",
        r.stderr
    );
    let line = r
        .stderr
        .lines()
        .find(|l| l.contains("forged"))
        .unwrap_or_else(|| panic!("the meter is not logged:\n{}", r.stderr));
    assert!(line.contains(r"Hall\n2026-01-01"), "{line:?}");
    assert!(line.contains(r"\r\u{1b}[1A"), "{line:?}");
    assert!(line.contains(" INFO "), "{line:?}");
    assert!(!r.stderr.contains('\u{1b}') && !r.stderr.contains('\r'));
    // The meter itself is stored as central sent it.
    let name: String = s
        .local()
        .query_one("SELECT name FROM meters WHERE meter_id = 'm-1'", &[])
        .unwrap()
        .get(0);
    assert!(name.starts_with("Hall\n"));
}

/// P14 without the noise: a cycle with nothing to do says so in two info lines,
/// its start with the queue and its result with counts and durations (about
/// 1 MB a day per gateway at 8 lines).
#[test]
fn an_idle_cycle_writes_at_most_two_info_lines() {
    let s = Sandbox::new();
    s.central()
        .batch_execute(
            "INSERT INTO meters (meter_id, name, location_id, meter_type, unit, updated_at)
             VALUES ('m-1', 'Hall', 'loc-1', 'electricity', 'kWh', now());
             INSERT INTO tenant (tenant_id, name, updated_at) VALUES ('t-1', 'Acme', now());",
        )
        .unwrap();
    // The first cycle brings the meter and the tenant; the later ones are idle.
    let d = s.spawn(&["run"]);
    assert!(
        support::wait_until(Duration::from_secs(30), || d
            .log_text()
            .matches("cycle finished")
            .count()
            >= 4),
        "{}",
        d.log_text()
    );
    let log = d.log_text();
    // Cycles 2 and 3, each from its start line to the next one's.
    let starts: Vec<usize> = log.match_indices("cycle started").map(|(i, _)| i).collect();
    assert!(starts.len() >= 4, "{log}");
    for w in starts[1..4].windows(2) {
        let cycle = &log[log[..w[0]].rfind('\n').map_or(0, |i| i + 1)..w[1]];
        let cycle = &cycle[..cycle.rfind('\n').map_or(cycle.len(), |i| i + 1)];
        let info: Vec<&str> = cycle.lines().filter(|l| l.contains(" INFO ")).collect();
        assert!(
            info.len() <= 2,
            "an idle cycle wrote {} info lines:\n{cycle}",
            info.len()
        );
        assert!(
            info[0].contains("cycle started; queue: 0 reading(s) waiting"),
            "{cycle}"
        );
        let result = info[1];
        assert!(result.contains("cycle finished"), "{cycle}");
        // P8, P9: "up to date" (after the first cycle's full reconciliation an
        // idle cycle asks central for changes only); durations per phase and in total.
        assert!(
            result.contains("meters: up to date (no changes centrally)"),
            "{result}"
        );
        assert!(
            result.contains("tenant: up to date (no changes centrally)"),
            "{result}"
        );
        assert!(result.matches(" ms").count() >= 4, "{result}");
        assert!(
            cycle
                .lines()
                .all(|l| !l.contains(" WARN ") && !l.contains(" ERROR ")),
            "{cycle}"
        );
        eprintln!(
            "idle cycle: {} bytes of info lines:\n{}",
            info.iter().map(|l| l.len() + 1).sum::<usize>(),
            info.join("\n")
        );
    }
}

/// The same idle cycle at debug still shows what the info lines leave out.
#[test]
fn debug_shows_the_phases_of_an_idle_cycle() {
    let mut s = Sandbox::new();
    s.set("LOG_LEVEL", "debug");
    s.run(&["once"]).assert_ok();
    let r = s.run(&["once"]);
    r.assert_ok();
    assert!(
        r.stderr
            .lines()
            .any(|l| l.contains(" DEBUG ") && l.contains("upload")),
        "{}",
        r.stderr
    );
}
