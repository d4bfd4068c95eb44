//! Running the real `meter-sync` binary as an operator would: a [`Sandbox`] is a
//! test's own pair of databases (on the shared clusters or on clusters the test
//! owns) plus the environment that points the binary at them; [`Sandbox::run`]
//! runs it to completion ([`Run`]: exit code and output), [`Sandbox::spawn`]
//! starts it in the background ([`Daemon`]: signals, `kill -9`, waiting for its
//! exit or for a line in its log).
//!
//! The binary gets only this environment and PATH, in a directory that is not the
//! repository, so a test proves it depends on neither.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use postgres::Client;

use super::cluster::{shared, Cluster, CENTRAL_PASSWORD};
use super::host::temp_dir;
use super::readings::insert_readings;

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_meter-sync")
}

/// A test's own pair of databases, one on a local and one on a central cluster,
/// plus everything needed to run the binary against them.
pub struct Sandbox {
    pub local_db: String,
    pub central_db: String,
    local: &'static Cluster,
    central: &'static Cluster,
    /// Extra or overriding environment for every run of the binary.
    pub env: BTreeMap<String, String>,
    pub dir: PathBuf,
}

impl Sandbox {
    /// New, empty databases on the shared clusters (not migrated).
    pub fn empty() -> Sandbox {
        static N: AtomicUsize = AtomicUsize::new(0);
        let (local, central) = shared();
        let n = N.fetch_add(1, Ordering::SeqCst);
        let name = format!("t{}_{n}", std::process::id());
        local.create_db(&name);
        central.create_db(&name);
        Sandbox::on(local, central, &name, &name)
    }

    /// New databases on the shared clusters, migrated with `meter-sync migrate`.
    pub fn new() -> Sandbox {
        let s = Sandbox::empty();
        s.migrate();
        s
    }

    /// A sandbox on clusters the test owns (for stopping or reconfiguring them).
    /// The clusters must outlive the sandbox: leak them with `Box::leak` or keep them in a static.
    pub fn on(
        local: &'static Cluster,
        central: &'static Cluster,
        local_db: &str,
        central_db: &str,
    ) -> Sandbox {
        let dir = temp_dir("sandbox");
        let mut env = BTreeMap::new();
        let mut set = |k: &str, v: String| {
            env.insert(k.to_string(), v);
        };
        set("POSTGRES_SYNC_HOST", "127.0.0.1".into());
        set("POSTGRES_SYNC_PORT", local.port.to_string());
        set("POSTGRES_SYNC_DB", local_db.into());
        set("POSTGRES_SYNC_USER", "postgres".into());
        set("POSTGRES_CLIENT_HOST", "localhost".into());
        set("POSTGRES_CLIENT_PORT", central.port.to_string());
        set("POSTGRES_CLIENT_DB", central_db.into());
        set("POSTGRES_CLIENT_USER", "postgres".into());
        set("POSTGRES_CLIENT_PASSWORD", CENTRAL_PASSWORD.into());
        if let Some(c) = &central.certs {
            set("POSTGRES_CLIENT_SSLROOTCERT", c.ca.display().to_string());
        }
        if !central.serves_tls() {
            // A central built without OpenSSL (CENTRAL_PG_BIN_DIR, for a benchmark).
            set("POSTGRES_CLIENT_SSLMODE", "disable".into());
        }
        set("LOG_TARGET", "stderr".into());
        set("LOG_LEVEL", "info".into());
        set("SYNC_INTERVAL_SECONDS", "1".into());
        set("MAX_CONNECTION_RETRIES", "2".into());
        set("DB_CONNECTION_TIMEOUT_MS", "3000".into());
        Sandbox {
            local_db: local_db.into(),
            central_db: central_db.into(),
            local,
            central,
            env,
            dir,
        }
    }

    pub fn set(&mut self, k: &str, v: impl ToString) -> &mut Self {
        self.env.insert(k.into(), v.to_string());
        self
    }

    pub fn unset(&mut self, k: &str) -> &mut Self {
        self.env.remove(k);
        self
    }

    pub fn local_cluster(&self) -> &'static Cluster {
        self.local
    }

    pub fn central_cluster(&self) -> &'static Cluster {
        self.central
    }

    /// A test-side connection to the local database.
    pub fn local(&self) -> Client {
        self.local.connect(&self.local_db)
    }

    /// A test-side connection to the central database.
    pub fn central(&self) -> Client {
        self.central.connect(&self.central_db)
    }

    /// A test-side session on the central database as `role` (trust over the
    /// Unix socket).
    pub fn central_as(&self, role: &str) -> Client {
        self.central.connect_as(role, &self.central_db)
    }

    /// The binary with only this sandbox's environment (and PATH), run from a
    /// directory that is not the repository: it must not depend on either.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = self.program(bin());
        c.args(args);
        c
    }

    /// `program` (another build of the binary, a wrapper, an emulator) started the
    /// way [`Sandbox::command`] starts the binary.
    pub fn program(&self, program: impl AsRef<OsStr>) -> Command {
        self.program_with(program, &self.env)
    }

    /// As [`Sandbox::program`], with `env` in place of this sandbox's environment.
    pub fn program_with(
        &self,
        program: impl AsRef<OsStr>,
        env: &BTreeMap<String, String>,
    ) -> Command {
        let mut c = Command::new(program);
        c.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(env)
            .current_dir(&self.dir)
            .stdin(Stdio::null());
        c
    }

    /// Runs the binary to completion (killed after 120 s).
    pub fn run(&self, args: &[&str]) -> Run {
        let child = self
            .command(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn meter-sync");
        let out = wait_output(child, Duration::from_secs(120));
        Run::from(out)
    }

    /// Starts the binary in the background; killed when the returned handle drops.
    pub fn spawn(&self, args: &[&str]) -> Daemon {
        let log = self.dir.join(format!(
            "daemon-{}.log",
            DAEMONS.fetch_add(1, Ordering::SeqCst)
        ));
        let f = std::fs::File::create(&log).unwrap();
        let child = self
            .command(args)
            .stdout(Stdio::null())
            .stderr(f)
            .spawn()
            .expect("spawn meter-sync");
        Daemon {
            child: Some(child),
            log,
        }
    }

    pub fn migrate(&self) {
        self.run(&["migrate"]).assert_ok();
    }

    /// Inserts `n` readings as the collector would (only its five columns), with
    /// distinct timestamps one second apart starting at 2026-01-01.
    pub fn insert_readings(&self, n: usize) {
        insert_readings(&mut self.local(), n, 0);
    }

    /// Count of rows in `from` in the local database: a table, or a table and a
    /// `WHERE` clause.
    pub fn local_count(&self, from: &str) -> i64 {
        count(&mut self.local(), from)
    }

    /// As [`Sandbox::local_count`], in the central database.
    pub fn central_count(&self, from: &str) -> i64 {
        count(&mut self.central(), from)
    }
}

fn count(c: &mut Client, from: &str) -> i64 {
    c.query_one(&format!("SELECT count(*) FROM {from}"), &[])
        .unwrap()
        .get(0)
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

static DAEMONS: AtomicUsize = AtomicUsize::new(0);

/// A finished run of the binary.
#[derive(Debug)]
pub struct Run {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl From<Output> for Run {
    fn from(o: Output) -> Run {
        Run {
            code: o.status.code(),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

impl Run {
    pub fn assert_ok(&self) -> &Run {
        assert_eq!(
            self.code,
            Some(0),
            "meter-sync failed:\nstdout:\n{}\nstderr:\n{}",
            self.stdout,
            self.stderr
        );
        self
    }

    pub fn assert_code(&self, code: i32) -> &Run {
        assert_eq!(
            self.code,
            Some(code),
            "unexpected exit:\nstdout:\n{}\nstderr:\n{}",
            self.stdout,
            self.stderr
        );
        self
    }

    /// Everything it printed.
    pub fn all(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

fn wait_output(mut child: Child, limit: Duration) -> Output {
    // The pipes are read while the child runs: a child that writes more than a pipe
    // holds (64 KiB of log lines) would otherwise block on its write forever.
    fn drain(r: Option<impl std::io::Read + Send + 'static>) -> std::thread::JoinHandle<Vec<u8>> {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut buf);
            }
            buf
        })
    }
    let out = drain(child.stdout.take());
    let err = drain(child.stderr.take());
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Output {
                status,
                stdout: out.join().unwrap(),
                stderr: err.join().unwrap(),
            };
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "meter-sync did not finish within {limit:?}:\n{}\n{}",
                String::from_utf8_lossy(&out.join().unwrap()),
                String::from_utf8_lossy(&err.join().unwrap())
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A background `meter-sync` process, killed (SIGKILL) on drop.
pub struct Daemon {
    pub child: Option<Child>,
    pub log: PathBuf,
}

impl Daemon {
    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    pub fn signal(&self, sig: i32) {
        unsafe {
            libc::kill(self.pid(), sig);
        }
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits up to `limit` for exit; returns the exit code (None if killed by a signal).
    pub fn wait_exit(&mut self, limit: Duration) -> Option<Option<i32>> {
        let deadline = Instant::now() + limit;
        let c = self.child.as_mut()?;
        loop {
            if let Some(st) = c.try_wait().unwrap() {
                self.child = None;
                return Some(st.code());
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// What it has logged to stderr so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until its log contains `needle`; panics with the log after `limit`.
    pub fn wait_log(&self, needle: &str, limit: Duration) {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if self.log_text().contains(needle) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "daemon log never showed {needle:?} within {limit:?}:\n{}",
            self.log_text()
        );
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
    }
}
