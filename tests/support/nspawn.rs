//! A Debian bookworm gateway under a real systemd: a base tree made once with
//! `debootstrap` and cached, an overlayfs per container so every test starts
//! from the same clean tree, `systemd-nspawn --boot` to run it, and `nsenter`
//! to send commands in. The container shares the host's network (no
//! `--private-network`), so the daemon inside reaches the test clusters on
//! 127.0.0.1 exactly as a gateway reaches its local PostgreSQL.
//!
//! Only for `#[ignore]`d tests (root, debootstrap, systemd-container), which
//! `.ci/cross` runs with `--ignored` when `METER_SYNC_SYSTEMD=1` (it installs
//! what they need). `--register=no --keep-unit`: the host need not run systemd.
//!
//! Cleanup: like the clusters, each container has a reaper that kills it,
//! unmounts its overlay and deletes its directory as soon as the test process is
//! gone, however it ended.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::host::{reap_after_exit, temp_dir, wait_until};

/// Packages on top of `--variant=minbase`: an init, the bus systemctl talks over,
/// sshd and python3 for the Ansible stand-ins.
const INCLUDE: &str = "systemd,systemd-sysv,dbus,openssh-server,python3";
/// Bump when INCLUDE or the tree's preparation changes: a new cache entry is made.
const TREE_VERSION: &str = "bookworm-v1";

fn cache_dir() -> PathBuf {
    PathBuf::from(
        std::env::var("METER_SYNC_TEST_CACHE")
            .unwrap_or_else(|_| "/var/cache/meter-sync-test".into()),
    )
}

/// The Debian mirror this machine's apt uses (deb822 `URIs:` or one-line `deb`),
/// so that debootstrap reaches the same registry apt does.
fn debian_mirror() -> String {
    if let Ok(m) = std::env::var("METER_SYNC_DEBIAN_MIRROR") {
        return m;
    }
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(rd) = fs::read_dir("/etc/apt/sources.list.d") {
        let mut more: Vec<PathBuf> = rd.filter_map(|e| e.ok()).map(|e| e.path()).collect();
        more.sort();
        files.extend(more);
    }
    for f in files {
        let Ok(text) = fs::read_to_string(&f) else {
            continue;
        };
        for line in text.lines().map(str::trim) {
            let uri = if let Some(rest) = line.strip_prefix("URIs:") {
                rest.split_whitespace().next()
            } else if let Some(rest) = line.strip_prefix("deb ") {
                rest.split_whitespace().find(|w| w.starts_with("http"))
            } else {
                None
            };
            if let Some(u) = uri {
                if u.contains("debian") && !u.contains("security") {
                    return u.trim_end_matches('/').to_string();
                }
            }
        }
    }
    "http://deb.debian.org/debian".into()
}

fn sh(cmd: &str) -> Output {
    Command::new("sh")
        .args(["-c", cmd])
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"))
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The cached base tree, made with debootstrap on first use (a few minutes),
/// under a lock so that parallel tests and processes make it once.
pub fn base_tree() -> PathBuf {
    let cache = cache_dir();
    let tree = cache.join(TREE_VERSION);
    if tree.join(".complete").exists() {
        return tree;
    }
    fs::create_dir_all(&cache).unwrap();
    let tmp = cache.join(format!("{TREE_VERSION}.tmp"));
    let mirror = debian_mirror();
    // flock serializes test processes; the re-check inside makes the loser reuse it.
    let script = format!(
        "set -e; exec 9>'{lock}'; flock 9; \
         if [ -e '{tree}/.complete' ]; then exit 0; fi; \
         rm -rf '{tmp}' '{tree}'; \
         debootstrap --variant=minbase --include={INCLUDE} bookworm '{tmp}' '{mirror}' >'{log}' 2>&1 \
           || {{ tail -20 '{log}' >&2; exit 1; }}; \
         touch '{tmp}/.complete'; mv '{tmp}' '{tree}'",
        lock = cache.join(".lock").display(),
        tree = tree.display(),
        tmp = tmp.display(),
        log = cache.join(format!("{TREE_VERSION}.debootstrap.log")).display(),
    );
    let t = Instant::now();
    let o = sh(&script);
    assert!(
        o.status.success(),
        "debootstrap from {mirror} failed: {}",
        text(&o)
    );
    eprintln!(
        "nspawn: base tree {} ready after {:.0} s",
        tree.display(),
        t.elapsed().as_secs_f64()
    );
    tree
}

/// One booted container. Dropping it powers it off and removes its overlay.
pub struct Container {
    pub name: String,
    pub dir: PathBuf,
    /// The overlay's merged view: the container's `/`.
    pub root: PathBuf,
    nspawn: Option<Child>,
    /// PID 1 of the container, as the host sees it.
    pub leader: i32,
    boots: u32,
}

impl Container {
    /// Mounts a fresh overlay on the base tree, lets `prepare` write into it (the
    /// container's root) before boot, boots it and waits until systemd is up.
    pub fn boot(tag: &str, prepare: impl FnOnce(&Path)) -> Container {
        let base = base_tree();
        let dir = temp_dir(&format!("nspawn-{tag}"));
        let (upper, work, root) = (dir.join("upper"), dir.join("work"), dir.join("root"));
        for d in [&upper, &work, &root] {
            fs::create_dir_all(d).unwrap();
        }
        let o = Command::new("mount")
            .args(["-t", "overlay", "overlay", "-o"])
            .arg(format!(
                "lowerdir={},upperdir={},workdir={}",
                base.display(),
                upper.display(),
                work.display()
            ))
            .arg(&root)
            .output()
            .unwrap();
        assert!(o.status.success(), "mount overlay: {}", text(&o));
        fs::set_permissions(&root, fs::Permissions::from_mode(0o755)).unwrap();
        // Names are unique per process and container so that parallel tests
        // never share a machine name.
        // temp_dir's counter makes the name unique among this process's containers.
        let n = dir
            .file_name()
            .unwrap()
            .to_string_lossy()
            .split('-')
            .nth(4)
            .unwrap_or("0")
            .to_string();
        let name: String = format!("ms-{tag}-{n}").chars().take(60).collect();
        reaper(&dir, &root);
        Self::common_setup(&root, &name);
        prepare(&root);
        let mut c = Container {
            name,
            dir,
            root,
            nspawn: None,
            leader: 0,
            boots: 0,
        };
        c.start();
        c
    }

    /// What every gateway stand-in gets before boot: a hostname, `localhost`
    /// for the central certificate's name, no units that wait on hardware, and
    /// sshd off (the Ansible test turns it on with its own port).
    fn common_setup(root: &Path, name: &str) {
        fs::write(root.join("etc/hostname"), format!("{name}\n")).unwrap();
        fs::write(
            root.join("etc/hosts"),
            format!("127.0.0.1 localhost\n::1 localhost ip6-localhost\n127.0.1.1 {name}\n"),
        )
        .unwrap();
        for unit in [
            "ssh.service",
            "systemd-networkd-wait-online.service",
            "apt-daily.timer",
            "apt-daily-upgrade.timer",
        ] {
            let _ = fs::remove_file(
                root.join("etc/systemd/system/multi-user.target.wants")
                    .join(unit),
            );
            let _ = fs::remove_file(
                root.join("etc/systemd/system/timers.target.wants")
                    .join(unit),
            );
        }
        // Journal in memory only: nothing of the test outlives the overlay anyway.
        let jd = root.join("etc/systemd/journald.conf.d");
        fs::create_dir_all(&jd).unwrap();
        fs::write(jd.join("test.conf"), "[Journal]\nStorage=volatile\n").unwrap();
    }

    fn start(&mut self) {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("console.log"))
            .unwrap();
        let child = Command::new("systemd-nspawn")
            .arg("-D")
            .arg(&self.root)
            .args([
                "--boot",
                "--register=no",
                "--keep-unit",
                "--console=pipe",
                "--quiet",
            ])
            .arg(format!("--machine={}", self.name))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn systemd-nspawn (apt-get install systemd-container)");
        let nspawn_pid = child.id() as i32;
        self.nspawn = Some(child);
        self.boots += 1;
        let mut leader = 0;
        let found = wait_until(Duration::from_secs(30), || {
            leader = find_leader(nspawn_pid).unwrap_or(0);
            leader != 0
        });
        assert!(found, "no container init under nspawn: {}", self.console());
        self.leader = leader;
        fs::write(self.dir.join("leader"), leader.to_string()).unwrap();
        // `is-system-running --wait` returns once boot finished (running or degraded).
        let mut state = String::new();
        let up = wait_until(Duration::from_secs(90), || {
            let o = self.exec_output("systemctl is-system-running --wait");
            state = String::from_utf8_lossy(&o.stdout).trim().to_string();
            matches!(state.as_str(), "running" | "degraded")
        });
        assert!(
            up,
            "container did not finish booting (state {state:?}): {}\nfailed: {}",
            self.console(),
            self.sh("systemctl --failed --no-legend || true")
        );
    }

    /// Powers the container off and boots it again from the same overlay, as a
    /// gateway that is rebooted.
    pub fn reboot(&mut self) {
        self.poweroff();
        self.start();
    }

    fn poweroff(&mut self) {
        let Some(mut child) = self.nspawn.take() else {
            return;
        };
        // SIGTERM to nspawn asks the container's systemd to shut down cleanly.
        unsafe {
            libc::kill(child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if child.try_wait().unwrap().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        unsafe {
            libc::kill(self.leader, libc::SIGKILL);
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    pub fn console(&self) -> String {
        fs::read_to_string(self.dir.join("console.log")).unwrap_or_default()
    }

    /// `sh -c cmd` inside the container (all its namespaces), with a clean
    /// environment as a root login would have.
    pub fn command(&self, cmd: &str) -> Command {
        let mut c = Command::new("nsenter");
        c.arg("-t")
            .arg(self.leader.to_string())
            .args(["-a", "--", "env", "-i"])
            .arg("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
            .args([
                "LANG=C.UTF-8",
                "HOME=/root",
                "SYSTEMD_PAGER=",
                "SYSTEMD_COLORS=0",
            ])
            .args(["sh", "-c", cmd])
            .stdin(Stdio::null());
        c
    }

    pub fn exec_output(&self, cmd: &str) -> Output {
        self.command(cmd).output().expect("nsenter")
    }

    /// Runs `cmd` inside; panics with its output unless it succeeds; returns stdout.
    pub fn sh(&self, cmd: &str) -> String {
        let o = self.exec_output(cmd);
        assert!(
            o.status.success(),
            "in {}: `{cmd}` failed ({:?}): {}",
            self.name,
            o.status.code(),
            text(&o)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// One property of a unit (`systemctl show -p NAME --value`).
    pub fn prop(&self, unit: &str, name: &str) -> String {
        self.sh(&format!("systemctl show -p {name} --value {unit}"))
            .trim()
            .to_string()
    }

    /// An executable that behaves like `ssh HOST CMD...` for this container:
    /// deploy/install and deploy/rollback take it as `SSH=` and so run their
    /// live-gateway path (systemctl, the health gate) exactly as over ssh.
    pub fn ssh_shim(&self) -> PathBuf {
        let p = self.dir.join("ssh-into");
        fs::write(
            &p,
            format!(
                "#!/bin/sh\n# ssh HOST CMD...: the host is this container; the words form one\n\
                 # shell command, as ssh joins them.\nshift\n\
                 exec nsenter -t {} -a -- env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
                 LANG=C.UTF-8 HOME=/root SYSTEMD_PAGER= sh -c \"$*\"\n",
                self.leader
            ),
        )
        .unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
        p
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        self.poweroff();
        let _ = Command::new("umount").arg(&self.root).status();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// The descendant of `nspawn` that is PID 1 in its own PID namespace.
fn find_leader(nspawn: i32) -> Option<i32> {
    let mut todo = vec![nspawn];
    while let Some(p) = todo.pop() {
        if p != nspawn {
            let status = fs::read_to_string(format!("/proc/{p}/status")).unwrap_or_default();
            let nspid = status
                .lines()
                .find_map(|l| l.strip_prefix("NSpid:"))
                .unwrap_or("");
            let ids: Vec<&str> = nspid.split_whitespace().collect();
            if ids.len() >= 2 && ids.last() == Some(&"1") {
                let comm = fs::read_to_string(format!("/proc/{p}/comm")).unwrap_or_default();
                if comm.trim() == "systemd" {
                    return Some(p);
                }
            }
        }
        for task in fs::read_dir(format!("/proc/{p}/task"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let children = fs::read_to_string(task.path().join("children")).unwrap_or_default();
            todo.extend(
                children
                    .split_whitespace()
                    .filter_map(|c| c.parse::<i32>().ok()),
            );
        }
    }
    None
}

/// Once the test process is gone: kill the container (its nspawn is our child
/// and dies with us; the init may linger), unmount, delete.
fn reaper(dir: &Path, root: &Path) {
    reap_after_exit(&format!(
        "sleep 1; [ -f '{dir}/leader' ] && kill -9 \"$(cat '{dir}/leader')\" 2>/dev/null; \
         sleep 1; umount -l '{root}' 2>/dev/null; rm -rf '{dir}'",
        root = root.display(),
        dir = dir.display(),
    ));
}

/// The environment file of a gateway whose local database is `s`'s local one
/// (over TCP on loopback) and whose central is `s`'s central one, with the
/// README's layout: the CA in /etc/meter-sync/central-ca.pem, the password as
/// the unit's credential. Logging stays at its default, as on a gateway.
pub fn gateway_env(s: &super::Sandbox, extra: &[(&str, String)]) -> String {
    let mut env = s.env.clone();
    for k in ["POSTGRES_CLIENT_PASSWORD", "LOG_TARGET", "LOG_LEVEL"] {
        env.remove(k);
    }
    env.insert(
        "POSTGRES_CLIENT_SSLROOTCERT".into(),
        "/etc/meter-sync/central-ca.pem".into(),
    );
    for (k, v) in extra {
        env.insert(k.to_string(), v.clone());
    }
    env.iter().map(|(k, v)| format!("{k}={v}\n")).collect()
}

/// Writes what the "Configure" step of docs/deploying.md has the operator write, into a
/// gateway root: meter-sync.env (keeping its mode), the central CA, the password.
pub fn configure_gateway(root: &Path, s: &super::Sandbox, extra: &[(&str, String)]) {
    let etc = root.join("etc/meter-sync");
    fs::create_dir_all(&etc).unwrap();
    fs::write(etc.join("meter-sync.env"), gateway_env(s, extra)).unwrap();
    let ca = &s
        .central_cluster()
        .certs
        .as_ref()
        .expect("central has TLS")
        .ca;
    fs::copy(ca, etc.join("central-ca.pem")).unwrap();
    fs::set_permissions(
        etc.join("central-ca.pem"),
        fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let pw = etc.join("client-password");
    fs::write(&pw, super::CENTRAL_PASSWORD).unwrap();
    fs::set_permissions(&pw, fs::Permissions::from_mode(0o600)).unwrap();
}
