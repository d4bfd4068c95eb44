//! Calendar dates in UTC for log stamps and `status`, without a date crate: the
//! one conversion from an instant to year, month, day (Howard Hinnant's
//! civil_from_days). UTC only, because a gateway has no time zone database to
//! speak of and journald stamps lines itself.

use std::time::{SystemTime, UNIX_EPOCH};

/// One instant, split into its UTC calendar fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Utc {
    pub year: i64,
    /// 1 ..= 12.
    pub month: i64,
    pub day: i64,
    pub hour: i64,
    pub minute: i64,
    pub second: i64,
    pub millis: i64,
}

impl Utc {
    pub fn now() -> Utc {
        Utc::of(SystemTime::now())
    }

    /// Also before 1970 (a clock set wrong still prints a date).
    pub fn of(t: SystemTime) -> Utc {
        let millis: i128 = match t.duration_since(UNIX_EPOCH) {
            Ok(d) => d.as_millis() as i128,
            Err(e) => -(e.duration().as_millis() as i128),
        };
        let (secs, ms) = (
            millis.div_euclid(1000) as i64,
            millis.rem_euclid(1000) as i64,
        );
        let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z - era * 146_097;
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = doy - (153 * mp + 2) / 5 + 1;
        let month = if mp < 10 { mp + 3 } else { mp - 9 };
        Utc {
            year: yoe + era * 400 + i64::from(month <= 2),
            month,
            day,
            hour: rem / 3600,
            minute: rem % 3600 / 60,
            second: rem % 60,
            millis: ms,
        }
    }

    /// `YYYY-MM-DDTHH:MM:SS.mmmZ` (RFC 3339).
    pub fn rfc3339(&self) -> String {
        format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
            self.year, self.month, self.day, self.hour, self.minute, self.second, self.millis
        )
    }

    /// RFC 3164's `Mmm dd hh:mm:ss` (day padded with a space), for syslog.
    pub fn rfc3164(&self) -> String {
        const MONTHS: [&str; 12] = [
            "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
        ];
        format!(
            "{} {:>2} {:02}:{:02}:{:02}",
            MONTHS[(self.month - 1) as usize],
            self.day,
            self.hour,
            self.minute,
            self.second
        )
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn dates_match_known_instants() {
        for (millis, text) in [
            (0, "1970-01-01T00:00:00.000Z"),
            (951_782_400_000, "2000-02-29T00:00:00.000Z"),
            (1_798_761_599_999, "2026-12-31T23:59:59.999Z"),
        ] {
            assert_eq!(
                Utc::of(UNIX_EPOCH + Duration::from_millis(millis)).rfc3339(),
                text
            );
        }
        assert_eq!(
            Utc::of(UNIX_EPOCH - Duration::from_millis(1)).rfc3339(),
            "1969-12-31T23:59:59.999Z"
        );
        assert_eq!(
            Utc::of(UNIX_EPOCH + Duration::from_secs(951_782_400 + 3_723)).rfc3164(),
            "Feb 29 01:02:03"
        );
    }
}
