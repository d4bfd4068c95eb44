//! The Debian package (issue 15 item 5): built by deploy/build-deb with
//! cargo-deb, checked by Debian's own `lintian`, and installed, upgraded and
//! purged with apt on a booted Debian gateway (tests/support/nspawn.rs).
//!
//! `#[ignore]`d: they need cargo-deb, help2man and lintian (and for the second,
//! root, debootstrap and systemd-container), which .ci/run does not install;
//! `METER_SYNC_SYSTEMD=1 bash .ci/cross` installs them and runs these with
//! `--ignored`. The host's (debug) test binary stands in for the ARM release
//! binary, so that no cross toolchain is needed.

mod support;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use support::host::{ok_stdout, output_text, repo};
use support::nspawn::{configure_gateway, Container};
use support::{temp_dir, wait_until, Sandbox};

const UNIT: &str = "meter-sync.service";
const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), "-1");

/// deploy/build-deb on `binary`, into `out`; returns the .deb's path.
fn build_deb(binary: &Path, out: &Path, version: Option<&str>) -> PathBuf {
    let mut c = Command::new(repo("deploy/build-deb"));
    c.arg("amd64")
        .arg("--binary")
        .arg(binary)
        .arg("--out")
        .arg(out);
    if let Some(v) = version {
        c.args(["--version", v]);
    }
    let deb = PathBuf::from(ok_stdout(&mut c).trim().lines().last().unwrap());
    assert!(deb.exists(), "{} missing", deb.display());
    deb
}

#[test]
#[ignore = "needs cargo-deb, help2man and lintian: .ci/cross runs it with --ignored"]
fn package_is_lintian_clean_and_complete() {
    let dir = temp_dir("deb");
    let deb = build_deb(Path::new(support::bin()), &dir, None);
    assert_eq!(deb, dir.join(format!("meter-sync_{VERSION}_amd64.deb")));

    // Debian's own checker: no error, no warning (informational tags are fine).
    let o = Command::new("lintian")
        .args(["--pedantic", "--no-tag-display-limit"])
        .arg(&deb)
        .output()
        .expect("lintian (apt-get install lintian)");
    let tags: Vec<String> = output_text(&o)
        .lines()
        .filter(|l| l.starts_with("E:") || l.starts_with("W:") || l.starts_with("P:"))
        .map(String::from)
        .collect();
    assert!(tags.is_empty(), "lintian: {tags:#?}");
    assert!(o.status.success(), "lintian failed: {}", output_text(&o));

    let info = ok_stdout(Command::new("dpkg-deb").arg("--info").arg(&deb));
    for field in [
        "Package: meter-sync".to_string(),
        format!("Version: {VERSION}"),
        "Architecture: amd64".into(),
        "Depends: libc6".into(),
    ] {
        assert!(info.contains(&field), "--info lacks {field:?}: {info}");
    }
    let maintainer = info
        .lines()
        .find_map(|l| l.trim().strip_prefix("Maintainer: "))
        .unwrap();
    assert!(
        !maintainer.contains("localhost") && maintainer.contains('.'),
        "{maintainer}"
    );

    // "-rwxr-xr-x 0/0 123 date time ./usr/bin/meter-sync"
    let contents = ok_stdout(Command::new("dpkg-deb").arg("--contents").arg(&deb));
    let files: BTreeMap<String, String> = contents
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 6).then(|| (f[5].to_string(), format!("{} {}", f[0], f[1])))
        })
        .collect();
    for (p, m) in [
        ("./usr/bin/meter-sync", "-rwxr-xr-x 0/0"),
        (
            "./usr/lib/systemd/system/meter-sync.service",
            "-rw-r--r-- 0/0",
        ),
        ("./usr/lib/sysusers.d/meter-sync.conf", "-rw-r--r-- 0/0"),
        ("./usr/share/man/man1/meter-sync.1.gz", "-rw-r--r-- 0/0"),
        ("./usr/share/doc/meter-sync/copyright", "-rw-r--r-- 0/0"),
        (
            "./usr/share/doc/meter-sync/changelog.Debian.gz",
            "-rw-r--r-- 0/0",
        ),
        ("./etc/meter-sync/meter-sync.env", "-rw-r----- 0/0"),
    ] {
        assert_eq!(
            files.get(p).map(String::as_str),
            Some(m),
            "{p} in: {contents}"
        );
    }
    // The operator's secret is created by postinst, never shipped.
    assert!(!files.keys().any(|p| p.contains("password")), "{contents}");

    let x = dir.join("x");
    ok_stdout(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&x));
    let ctl = dir.join("control");
    ok_stdout(Command::new("dpkg-deb").arg("-e").arg(&deb).arg(&ctl));
    assert_eq!(
        fs::read_to_string(ctl.join("conffiles")).unwrap().trim(),
        "/etc/meter-sync/meter-sync.env"
    );
    assert_eq!(
        fs::read(x.join("etc/meter-sync/meter-sync.env")).unwrap(),
        fs::read(repo("deploy/meter-sync.env.example")).unwrap()
    );
    // The shipped unit but for the binary's path (and the docs it names).
    let unit = fs::read_to_string(x.join("usr/lib/systemd/system/meter-sync.service")).unwrap();
    let ours = fs::read_to_string(repo("systemd/meter-sync.service")).unwrap();
    let strip = |u: &str| -> Vec<String> {
        u.lines()
            .filter(|l| !l.starts_with("Documentation="))
            .map(|l| l.replace("/usr/local/bin/", "/usr/bin/"))
            .collect()
    };
    assert_eq!(strip(&unit), strip(&ours));
    assert!(unit.contains("ExecStart=/usr/bin/meter-sync run"), "{unit}");
    // The man page is the help text's.
    let man = ok_stdout(Command::new("sh").arg("-c").arg(format!(
        "zcat '{}'",
        x.join("usr/share/man/man1/meter-sync.1.gz").display()
    )))
    .replace("\\-", "-");
    assert!(man.contains(".TH METER-SYNC \"1\""), "{man}");
    for cmd in ["check-config", "requeue", "status [--json]"] {
        assert!(man.contains(cmd), "man page lacks {cmd}: {man}");
    }
    let _ = fs::remove_dir_all(dir);
}

fn step(t: &Instant, what: &str) {
    eprintln!("deb: {:6.1} s  {what}", t.elapsed().as_secs_f64());
}

fn apt(c: &Container, args: &str) -> String {
    c.sh(&format!(
        "DEBIAN_FRONTEND=noninteractive apt-get -y -q -o Dpkg::Options::=--force-confold {args} 2>&1"
    ))
}

#[test]
#[ignore = "boots systemd in a container and needs cargo-deb: .ci/cross runs it with --ignored"]
fn apt_install_upgrade_and_purge_on_a_booted_gateway() {
    let t = Instant::now();
    let s = Sandbox::empty();
    let dir = temp_dir("debs");
    let v1 = build_deb(Path::new(support::bin()), &dir, None);
    let v2_version = concat!(env!("CARGO_PKG_VERSION"), "-2");
    let v2 = build_deb(Path::new(support::bin()), &dir, Some(v2_version));
    step(&t, "two packages built");
    let mut c = Container::boot("deb", |root| {
        for d in [&v1, &v2] {
            fs::copy(d, root.join("root").join(d.file_name().unwrap())).unwrap();
        }
    });
    let fresh_state = c
        .sh("systemctl is-system-running || true")
        .trim()
        .to_string();
    step(&t, &format!("container booted ({fresh_state})"));

    // A fresh gateway: installed, not enabled, not started, not failed.
    let out = apt(
        &c,
        &format!(
            "install ./root/{}",
            v1.file_name().unwrap().to_string_lossy()
        ),
    );
    assert!(out.contains("systemctl enable --now meter-sync"), "{out}");
    assert_eq!(
        c.sh("systemctl is-enabled meter-sync.service || true")
            .trim(),
        "disabled"
    );
    assert_eq!(c.prop(UNIT, "ActiveState"), "inactive");
    assert!(c
        .sh("getent passwd meter-sync")
        .contains(":/nonexistent:/usr/sbin/nologin"));
    let mode = |p: &str| c.sh(&format!("stat -c '%a %U:%G' {p}")).trim().to_string();
    assert_eq!(mode("/etc/meter-sync/meter-sync.env"), "640 root:root");
    assert_eq!(mode("/etc/meter-sync/client-password"), "600 root:root");
    assert_eq!(mode("/etc/meter-sync/sync-password"), "600 root:root");
    assert!(c
        .sh("man -w meter-sync 2>/dev/null || ls /usr/share/man/man1/")
        .contains("meter-sync.1"));
    step(&t, "apt-get install: disabled, inactive");

    // Rebooted before anyone configured it: not failing, the gateway not degraded.
    c.reboot();
    assert_eq!(c.prop(UNIT, "ActiveState"), "inactive");
    assert_eq!(
        c.sh("systemctl is-system-running || true").trim(),
        fresh_state,
        "failed: {}",
        c.sh("systemctl --failed --no-legend || true")
    );
    step(&t, "rebooted unconfigured: inactive, system as fresh");

    // The operator configures it and turns it on.
    configure_gateway(&c.root, &s, &[]);
    let env = c.root.join("etc/meter-sync/meter-sync.env");
    let mut edited = fs::read_to_string(&env).unwrap();
    edited.push_str("# edited by the operator\n");
    fs::write(&env, &edited).unwrap();
    c.sh(
        "systemd-run --wait --pipe --collect --unit=meter-sync-migrate \
         -p User=meter-sync -p DynamicUser=yes -p EnvironmentFile=/etc/meter-sync/meter-sync.env \
         -p LoadCredential=client-password:/etc/meter-sync/client-password \
         -E POSTGRES_CLIENT_PASSWORD_FILE=/run/credentials/meter-sync-migrate.service/client-password \
         /usr/bin/meter-sync migrate",
    );
    s.insert_readings(30);
    c.sh(&format!("systemctl enable --now {UNIT}"));
    assert!(
        wait_until(Duration::from_secs(30), || c
            .prop(UNIT, "StatusText")
            .starts_with("last cycle ok")),
        "{}",
        c.sh(&format!("journalctl -u {UNIT} --no-pager | tail -20"))
    );
    assert_eq!(s.central_count("meter_readings"), 30);
    let pid = c.prop(UNIT, "MainPID");
    step(&t, "configured, enabled, cycling");

    // An upgrade keeps the operator's files and restarts the daemon onto it.
    let ca = fs::read(c.root.join("etc/meter-sync/central-ca.pem")).unwrap();
    apt(
        &c,
        &format!(
            "install ./root/{}",
            v2.file_name().unwrap().to_string_lossy()
        ),
    );
    assert_eq!(
        c.sh("dpkg-query -W -f='${Version}' meter-sync").trim(),
        v2_version
    );
    assert_eq!(fs::read_to_string(&env).unwrap(), edited);
    assert_eq!(
        fs::read_to_string(c.root.join("etc/meter-sync/client-password")).unwrap(),
        support::CENTRAL_PASSWORD
    );
    assert_eq!(
        fs::read(c.root.join("etc/meter-sync/central-ca.pem")).unwrap(),
        ca
    );
    assert!(!c
        .root
        .join("etc/meter-sync/meter-sync.env.dpkg-new")
        .exists());
    assert_eq!(c.prop(UNIT, "ActiveState"), "active");
    assert_ne!(
        c.prop(UNIT, "MainPID"),
        pid,
        "the upgrade did not restart the daemon"
    );
    assert_eq!(
        c.sh("systemctl is-enabled meter-sync.service").trim(),
        "enabled"
    );
    step(&t, "upgraded: edits kept, restarted");

    // Purge: stopped, and nothing of it left.
    apt(&c, "purge meter-sync");
    assert_ne!(c.prop(UNIT, "ActiveState"), "active");
    assert!(
        c.exec_output("pgrep -x meter-sync").stdout.is_empty(),
        "a daemon survived the purge"
    );
    for p in [
        "usr/bin/meter-sync",
        "etc/meter-sync",
        "usr/lib/systemd/system/meter-sync.service",
        "etc/systemd/system/multi-user.target.wants/meter-sync.service",
        "var/lib/meter-sync",
    ] {
        assert!(!c.root.join(p).exists(), "/{p} survived the purge");
    }
    assert_eq!(
        c.sh("dpkg-query -W -f='${db:Status-Abbrev}' meter-sync 2>/dev/null || true")
            .trim(),
        ""
    );
    step(&t, "purged: stopped, files and configuration gone");
    eprintln!(
        "deb: apt_install_upgrade_and_purge_on_a_booted_gateway took {:.0} s",
        t.elapsed().as_secs_f64()
    );
    let _ = fs::remove_dir_all(dir);
}
