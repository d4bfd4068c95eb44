//! Prometheus text-format metrics for node_exporter's textfile collector
//! (`METRICS_TEXTFILE`), rewritten atomically after every cycle.
//!
//! Counters (`*_total`) count since this process started, as Prometheus counters
//! do; `rate()` and `increase()` handle the reset at a restart. Gauges whose value
//! is not known yet (no successful phase since start, local unreachable) are left
//! out rather than written as a misleading 0.

use std::fmt::Write as _;
use std::path::Path;
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
    last_cycle_end: Option<SystemTime>,
    last_cycle_duration: Option<Duration>,
}

fn epoch_seconds(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
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
            if o.ok() {
                s.last_success = Some(now);
                s.last_success_duration = Some(o.duration);
                if o.phase == Phase::Upload {
                    self.readings_uploaded += o.records;
                }
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
        let tmp = path.with_file_name(format!(
            ".{}.{}.tmp",
            name.to_string_lossy(),
            std::process::id()
        ));
        std::fs::write(&tmp, self.render()).map_err(|e| fail("write", e))?;
        std::fs::rename(&tmp, path).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            fail("rename onto", e)
        })
    }
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
}
