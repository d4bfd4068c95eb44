//! A gateway's wall clock that is wrong or jumps, for real: libfaketime (Debian's
//! `faketime` package, installed by .ci/setup) preloaded into the local PostgreSQL
//! and into the binary, all reading one offset file that a test rewrites while
//! they run, as NTP steps a clock. `CLOCK_MONOTONIC` is left alone, as NTP
//! leaves it.

use std::path::PathBuf;
use std::process::Command;

use super::cluster::{chown_to_server, Cluster, Role};
use super::host::{run_ok, temp_dir};

/// Debian's libfaketime, wherever the architecture puts it.
fn libfaketime() -> String {
    [
        "x86_64-linux-gnu",
        "aarch64-linux-gnu",
        "arm-linux-gnueabihf",
    ]
    .iter()
    .map(|a| format!("/usr/lib/{a}/faketime/libfaketime.so.1"))
    .find(|p| std::path::Path::new(p).exists())
    .expect(
        "no libfaketime.so.1 under /usr/lib/*/faketime: apt-get install faketime (.ci/setup does)",
    )
}

/// One wall clock shared by the processes started with [`FakeClock::env`].
pub struct FakeClock {
    file: PathBuf,
}

impl FakeClock {
    /// A clock that is right, until [`FakeClock::set`].
    pub fn new() -> FakeClock {
        libfaketime();
        let dir = temp_dir("clock");
        let c = FakeClock {
            file: dir.join("offset"),
        };
        c.set("+0");
        chown_to_server(&dir);
        c
    }

    /// The offset from the real time from now on, in libfaketime's words: `+700d`,
    /// `-20000d`, `+0`. Replaced whole, so that no process reads half a line.
    pub fn set(&self, offset: &str) {
        let tmp = self.file.with_extension("new");
        std::fs::write(&tmp, format!("{offset}\n")).unwrap();
        std::fs::rename(&tmp, &self.file).unwrap();
    }

    /// The environment that puts a process on this clock.
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("LD_PRELOAD", libfaketime()),
            ("FAKETIME_TIMESTAMP_FILE", self.file.display().to_string()),
            // Read the file at every call, so a change applies at once.
            ("FAKETIME_NO_CACHE", "1".to_string()),
            ("FAKETIME_DONT_FAKE_MONOTONIC", "1".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// A local cluster of its own whose server runs on this clock (its `now()`
    /// jumps with it, as the gateway's PostgreSQL does). Restarting it with
    /// [`Cluster::restart`] would leave the clock.
    pub fn local_cluster(&self) -> Cluster {
        let c = Cluster::start(Role::Local);
        c.stop();
        let mut start: Command = c.start_cmd();
        start.envs(self.env());
        run_ok(start, "pg_ctl start on the fake clock");
        c
    }
}
