//! Prometheus text-format metrics for node_exporter's textfile collector
//! (`METRICS_TEXTFILE`), rewritten atomically after every cycle.
//!
//! Counters (`*_total`) count since this process started, as Prometheus counters
//! do; `rate()` and `increase()` handle the reset at a restart. Gauges whose value
//! is not known yet (no successful phase since start, local unreachable) are left
//! out rather than written as a misleading 0.

use std::fmt::Write as _;
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use crate::error::{Error, Kind, Result};
use crate::report::{CycleReport, Phase};

#[derive(Clone, Copy, Default)]
struct PhaseStats {
    last_success: Option<SystemTime>,
    last_success_duration: Option<Duration>,
    last_duration: Option<Duration>,
    last_ok: Option<bool>,
    errors: u64,
}

/// What the daemon has done since it started.
#[derive(Default)]
pub struct Metrics {
    cycles: u64,
    cycle_errors: u64,
    readings_uploaded: u64,
    phases: [PhaseStats; Phase::ALL.len()],
    /// (pending, quarantined) as last counted.
    queue: Option<(i64, i64)>,
    /// The oldest waiting reading's `timestamp` and age, as last counted; the outer
    /// None when the queue could not be counted, the inner when nothing waits.
    oldest_pending: Option<(Option<SystemTime>, Option<Duration>)>,
    last_cycle_end: Option<SystemTime>,
    last_cycle_duration: Option<Duration>,
}

/// Unix time; negative before 1970 (a reading from a meter whose clock was reset),
/// rather than 0, which would name a date the reading does not have.
fn epoch_seconds(t: SystemTime) -> f64 {
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(after) => after.as_secs_f64(),
        Err(before) => -before.duration().as_secs_f64(),
    }
}

impl Metrics {
    /// Counts a cycle that ran. A cycle cut short by shutdown counts its phases but
    /// is not an error.
    pub fn record_cycle(&mut self, report: &CycleReport) {
        let now = SystemTime::now();
        self.cycles += 1;
        if !report.ok() {
            self.cycle_errors += 1;
        }
        for o in &report.phases {
            let s = &mut self.phases[o.phase.index()];
            s.last_duration = Some(o.duration);
            s.last_ok = Some(o.ok());
            // A drain that failed part way delivered its readings all the same.
            if o.phase == Phase::Upload {
                self.readings_uploaded += o.records;
            }
            if o.ok() {
                s.last_success = Some(now);
                s.last_success_duration = Some(o.duration);
            } else {
                s.errors += 1;
            }
        }
        self.last_cycle_end = Some(now);
        self.last_cycle_duration = Some(report.duration);
    }

    /// Counts a cycle that could not start (the local database was unreachable).
    pub fn record_failed_start(&mut self) {
        self.cycles += 1;
        self.cycle_errors += 1;
        self.last_cycle_end = Some(SystemTime::now());
    }

    pub fn set_queue(&mut self, queue: Option<(i64, i64)>) {
        self.queue = queue;
    }

    pub fn set_oldest_pending(&mut self, oldest: Option<(Option<SystemTime>, Option<Duration>)>) {
        self.oldest_pending = oldest;
    }

    /// The whole file, in the text exposition format 0.0.4.
    pub fn render(&self) -> String {
        let one = |v: Option<f64>| {
            v.map(|v| (String::new(), v))
                .into_iter()
                .collect::<Vec<_>>()
        };
        let per_phase = |f: &dyn Fn(&PhaseStats) -> Option<f64>| {
            Phase::ALL
                .iter()
                .filter_map(|p| {
                    f(&self.phases[p.index()]).map(|v| (format!("{{phase=\"{}\"}}", p.as_str()), v))
                })
                .collect::<Vec<_>>()
        };
        let mut o = String::new();
        family(
            &mut o,
            "meter_sync_queue_readings",
            "gauge",
            "Readings waiting for upload (unsynchronized, not quarantined), counted after the last cycle.",
            one(self.queue.map(|q| q.0 as f64)),
        );
        family(
            &mut o,
            "meter_sync_quarantined_readings",
            "gauge",
            "Readings central rejected, kept locally until meter-sync requeue.",
            one(self.queue.map(|q| q.1 as f64)),
        );
        family(
            &mut o,
            "meter_sync_oldest_pending_age_seconds",
            "gauge",
            "Age of the oldest reading waiting for upload (its timestamp to the local database's now()) \
             after the last cycle; 0 when none waits.",
            one(self
                .oldest_pending
                .map(|(_, age)| age.map_or(0.0, |a| a.as_secs_f64()))),
        );
        family(
            &mut o,
            "meter_sync_oldest_pending_timestamp_seconds",
            "gauge",
            "Timestamp of the oldest reading waiting for upload (Unix time), after the last cycle; \
             absent when none waits.",
            one(self.oldest_pending.and_then(|(at, _)| at).map(epoch_seconds)),
        );
        family(
            &mut o,
            "meter_sync_readings_uploaded_total",
            "counter",
            "Readings uploaded to central since the daemon started.",
            one(Some(self.readings_uploaded as f64)),
        );
        family(
            &mut o,
            "meter_sync_cycles_total",
            "counter",
            "Cycles started since the daemon started.",
            one(Some(self.cycles as f64)),
        );
        family(
            &mut o,
            "meter_sync_cycle_errors_total",
            "counter",
            "Cycles with at least one failed phase, or that could not reach the local database.",
            one(Some(self.cycle_errors as f64)),
        );
        family(
            &mut o,
            "meter_sync_phase_errors_total",
            "counter",
            "Failed runs of each phase since the daemon started.",
            per_phase(&|s| Some(s.errors as f64)),
        );
        family(
            &mut o,
            "meter_sync_phase_last_success_timestamp_seconds",
            "gauge",
            "When each phase last succeeded (Unix time).",
            per_phase(&|s| s.last_success.map(epoch_seconds)),
        );
        family(
            &mut o,
            "meter_sync_phase_last_success_duration_seconds",
            "gauge",
            "How long each phase took the last time it succeeded.",
            per_phase(&|s| s.last_success_duration.map(|d| d.as_secs_f64())),
        );
        family(
            &mut o,
            "meter_sync_phase_last_duration_seconds",
            "gauge",
            "How long each phase took the last time it ran.",
            per_phase(&|s| s.last_duration.map(|d| d.as_secs_f64())),
        );
        family(
            &mut o,
            "meter_sync_phase_last_success",
            "gauge",
            "1 if the phase's last run succeeded, 0 if it failed.",
            per_phase(&|s| s.last_ok.map(|ok| f64::from(u8::from(ok)))),
        );
        family(
            &mut o,
            "meter_sync_last_cycle_timestamp_seconds",
            "gauge",
            "When the last cycle ended (Unix time).",
            one(self.last_cycle_end.map(epoch_seconds)),
        );
        family(
            &mut o,
            "meter_sync_last_cycle_duration_seconds",
            "gauge",
            "How long the last cycle took.",
            one(self.last_cycle_duration.map(|d| d.as_secs_f64())),
        );
        o
    }

    /// Writes [`Metrics::render`] to `path` through a temporary file in the same
    /// directory and a rename, so that node_exporter never reads half a file. The
    /// temporary name does not end in `.prom`, so the collector ignores it.
    ///
    /// The file is mode 0644 whatever the umask (the unit's `UMask=0077` would
    /// make it 0600, which node_exporter, another user, cannot read). The
    /// temporary file is created with `O_EXCL` under a name nobody can guess, so
    /// a file or symbolic link planted in the directory is never written through.
    pub fn write(&self, path: &Path) -> Result<()> {
        let fail = |what: &str, e: std::io::Error| {
            Error::new(
                Kind::Other,
                format!("metrics: {what} {}: {e}", path.display()),
            )
        };
        let name = path.file_name().ok_or_else(|| {
            Error::new(
                Kind::Other,
                format!("metrics: {} names no file", path.display()),
            )
        })?;
        let (tmp, mut file) = create_temporary(path, &name.to_string_lossy())
            .map_err(|e| fail("create a temporary file beside", e))?;
        let written = file
            .write_all(self.render().as_bytes())
            .and_then(|()| file.set_permissions(std::fs::Permissions::from_mode(0o644)));
        drop(file);
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(fail("write", e));
        }
        std::fs::rename(&tmp, path).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            fail("rename onto", e)
        })
    }
}

/// A new file `.NAME.RANDOM.tmp` beside `path`, created with `O_CREAT | O_EXCL`
/// (which also refuses to follow a symbolic link). RANDOM is 64 bits of SipHash
/// under the process's random `RandomState` keys: unpredictable from outside,
/// without a dependency. A name that exists all the same is drawn again.
fn create_temporary(path: &Path, name: &str) -> std::io::Result<(PathBuf, std::fs::File)> {
    use std::hash::{BuildHasher, Hasher};
    let mut last = None;
    for attempt in 0u32..8 {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(attempt);
        let tmp = path.with_file_name(format!(".{name}.{:016x}.tmp", h.finish()));
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&tmp)
        {
            Ok(f) => return Ok((tmp, f)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("no temporary name")))
}

/// One metric family: HELP, TYPE, then its samples (`labels` is `{…}` or empty).
fn family(o: &mut String, name: &str, kind: &str, help: &str, samples: Vec<(String, f64)>) {
    let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
    for (labels, v) in samples {
        let _ = writeln!(o, "{name}{labels} {}", fmt_f64(v));
    }
}

/// Prometheus floats: integers without a fraction, others with enough digits.
fn fmt_f64(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v:.3}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::PhaseOutcome;

    #[test]
    fn every_sample_follows_its_type_line() {
        let mut m = Metrics::default();
        m.set_queue(Some((12, 3)));
        m.record_cycle(&CycleReport {
            phases: vec![
                PhaseOutcome {
                    phase: Phase::Upload,
                    records: 40,
                    duration: Duration::from_millis(1500),
                    error: None,
                    summary: String::new(),
                },
                PhaseOutcome {
                    phase: Phase::Meters,
                    records: 0,
                    duration: Duration::from_millis(3),
                    error: Some("x".into()),
                    summary: String::new(),
                },
            ],
            duration: Duration::from_millis(1503),
        });
        let text = m.render();
        let mut typed = None;
        for l in text.lines() {
            if let Some(r) = l.strip_prefix("# TYPE ") {
                typed = r.split(' ').next().map(str::to_string);
            } else if !l.starts_with('#') {
                let fam = l.split(['{', ' ']).next().unwrap();
                assert_eq!(Some(fam.to_string()), typed, "{l}\n{text}");
            }
        }
        assert!(text.contains("meter_sync_queue_readings 12\n"), "{text}");
        assert!(
            text.contains("meter_sync_readings_uploaded_total 40\n"),
            "{text}"
        );
        assert!(text.contains("meter_sync_phase_errors_total{phase=\"meters\"} 1\n"));
        assert!(text
            .contains("meter_sync_phase_last_success_duration_seconds{phase=\"upload\"} 1.500\n"));
        assert!(!text.contains("last_success_timestamp_seconds{phase=\"meters\"}"));
    }

    fn scratch(tag: &str) -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("meter-sync-metrics-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn a_planted_link_at_a_temporary_name_is_not_written_through() {
        let d = scratch("link");
        let victim = d.join("victim");
        std::fs::write(&victim, "precious").unwrap();
        // The name the writer used to choose: `.NAME.PID.tmp`.
        let old_name = d.join(format!(".meter-sync.prom.{}.tmp", std::process::id()));
        std::os::unix::fs::symlink(&victim, &old_name).unwrap();
        let path = d.join("meter-sync.prom");
        let m = Metrics::default();
        for _ in 0..3 {
            m.write(&path).unwrap();
        }
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), m.render());
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o644);
        // Nothing left behind but the file, the victim and the planted link.
        let mut names: Vec<String> = std::fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names.len(), 3, "{names:?}");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn temporary_names_are_not_predictable() {
        let d = scratch("names");
        let path = d.join("x.prom");
        let names: std::collections::BTreeSet<PathBuf> = (0..50)
            .map(|_| {
                let (p, _f) = create_temporary(&path, "x.prom").unwrap();
                p
            })
            .collect();
        assert_eq!(names.len(), 50, "a temporary name repeated");
        let _ = std::fs::remove_dir_all(&d);
    }
}
