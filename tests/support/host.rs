//! The machine the tests run on: scratch directories the server user can enter,
//! free loopback ports, commands that must succeed, polling with a deadline, and
//! the lock that keeps timing-sensitive tests of one process off each other's cores.
//!
//! Everything else in tests/support builds on these; they know nothing of
//! PostgreSQL or of the binary.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A file of this repository (the deploy scripts, the unit, the docs).
pub fn repo(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(p)
}

/// Whether the tests run as root (then servers run as another user, and the
/// tests that need root run).
pub fn is_root() -> bool {
    // SAFETY-free: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Everything a finished command printed, stdout then stderr.
pub fn output_text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Runs `cmd` to completion with nothing on stdin; panics only if it cannot start.
pub fn output(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"))
}

/// Runs `cmd` as [`output`] does; panics with everything it printed unless it
/// succeeded, and returns everything it printed.
pub fn ok(cmd: &mut Command) -> String {
    output_text(&succeeded(cmd))
}

/// As [`ok`], returning only what it printed on stdout (a path, a version).
pub fn ok_stdout(cmd: &mut Command) -> String {
    String::from_utf8_lossy(&succeeded(cmd).stdout).into_owned()
}

fn succeeded(cmd: &mut Command) -> Output {
    let o = output(cmd);
    assert!(o.status.success(), "{cmd:?} failed: {}", output_text(&o));
    o
}

/// Runs `c` to completion; panics with its output unless it succeeded.
pub fn run_ok(mut c: Command, what: &str) -> Output {
    let out = c.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A directory under /tmp that the server user can enter.
pub fn temp_dir(tag: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let d = std::env::temp_dir().join(format!(
        "meter-sync-test-{}-{}-{tag}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
    d
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Once this test process is gone, however it ended (panic, `process::exit` after
/// the harness, SIGKILL), runs the shell command `cleanup`. The reaper runs in a
/// session of its own and outlives us by design; nobody waits for it.
pub fn reap_after_exit(cleanup: &str) {
    let script = format!(
        "while kill -0 {pid} 2>/dev/null; do sleep 0.5; done; {cleanup}",
        pid = std::process::id()
    );
    #[allow(clippy::zombie_processes)]
    Command::new("setsid")
        .args(["sh", "-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn reaper");
}

/// Polls `f` until it returns true or `limit` passes.
pub fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    f()
}

/// Serializes tests inside one process that would otherwise compete for the two
/// cores in a way that distorts timing (kill/cut tests).
pub fn heavy_lock() -> std::sync::MutexGuard<'static, ()> {
    static L: Mutex<()> = Mutex::new(());
    L.lock().unwrap_or_else(|e| e.into_inner())
}
