//! When the automations of DESIGN.md §2 fall due: site-local dates and times turned into
//! instants, DST-correct. Pure: no clock, no I/O.
//!
//! A local time that happens twice (the repeated hour when clocks go back) means its first
//! occurrence; one that never happens (the skipped hour when clocks go forward) means the
//! first instant after the gap, which is the transition itself.

use chrono::{
    DateTime, Days, FixedOffset, NaiveDate, NaiveDateTime, NaiveTime, Offset, TimeZone, Utc,
};
use chrono_tz::Tz;
use serde::{Deserialize, Deserializer};

/// The automation settings of a site (`[site]` in the config, kept in the site row).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct Automations {
    /// Reserved → occupied on the tenancy's start date.
    pub auto_occupy: bool,
    /// Site-local time of the automatic move-in.
    #[serde(deserialize_with = "hh_mm")]
    pub auto_occupy_at: NaiveTime,
    /// Deallocate the units of a tenancy whose end date has passed.
    pub auto_deallocate: bool,
    /// Overlock a contact's occupied units on `payment.failed`.
    pub auto_overlock: bool,
}

impl Default for Automations {
    fn default() -> Self {
        Automations {
            auto_occupy: true,
            auto_occupy_at: NaiveTime::MIN + chrono::Duration::hours(6),
            auto_deallocate: true,
            auto_overlock: false,
        }
    }
}

fn hh_mm<'de, D: Deserializer<'de>>(d: D) -> Result<NaiveTime, D::Error> {
    let s = String::deserialize(d)?;
    NaiveTime::parse_from_str(&s, "%H:%M").map_err(serde::de::Error::custom)
}

/// The instant of a site-local date and time: the earlier one if the time happens twice,
/// the first valid instant after the gap if it never happens.
pub fn local_instant(local: NaiveDateTime, tz: Tz) -> DateTime<Utc> {
    match tz.from_local_datetime(&local).earliest() {
        Some(t) => t.with_timezone(&Utc),
        None => after_gap(local, tz),
    }
}

/// The transition instant that skips over `local` (a local time inside a DST gap).
fn after_gap(local: NaiveDateTime, tz: Tz) -> DateTime<Utc> {
    let offset = |t: NaiveDateTime| -> FixedOffset { tz.offset_from_utc_datetime(&t).fix() };
    let day = chrono::Duration::days(1);
    let (before, after) = (offset(local - day), offset(local + day));
    let unix = |o: FixedOffset| local.and_utc().timestamp() - i64::from(o.local_minus_utc());
    let at = |secs: i64| DateTime::from_timestamp(secs, 0).unwrap_or(DateTime::<Utc>::MAX_UTC);
    // Read with the later offset, `local` is an instant before the transition; read with the
    // earlier one, an instant at or after it. Transitions fall on whole seconds.
    let (mut lo, mut hi) = (unix(after), unix(before));
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if offset(at(mid).naive_utc()) == before {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    at(hi)
}

/// When a reservation for a tenancy starting on `start_date` moves in: `at` site-local
/// time on that date.
pub fn move_in_at(start_date: NaiveDate, at: NaiveTime, tz: Tz) -> DateTime<Utc> {
    local_instant(start_date.and_time(at), tz)
}

/// When a tenancy ending on `end_date` has ended: the site-local midnight that starts the
/// next day (the end date itself is the tenancy's last day).
pub fn deallocate_at(end_date: NaiveDate, tz: Tz) -> DateTime<Utc> {
    let next = end_date
        .checked_add_days(Days::new(1))
        .unwrap_or(NaiveDate::MAX);
    local_instant(next.and_time(NaiveTime::MIN), tz)
}

/// The earliest of `instants` still in the future (after `now`): when to look again.
pub fn next_due(
    now: DateTime<Utc>,
    instants: impl IntoIterator<Item = DateTime<Utc>>,
) -> Option<DateTime<Utc>> {
    instants.into_iter().filter(|t| *t > now).min()
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono_tz::{America, Australia, Europe};

    fn date(s: &str) -> NaiveDate {
        s.parse().unwrap()
    }
    fn time(s: &str) -> NaiveTime {
        NaiveTime::parse_from_str(s, "%H:%M").unwrap()
    }
    fn utc(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    #[test]
    fn a_normal_day_is_the_local_time() {
        let six = time("06:00");
        // London in winter (GMT) and in summer (BST).
        assert_eq!(
            move_in_at(date("2026-03-20"), six, Europe::London),
            utc("2026-03-20T06:00:00Z")
        );
        assert_eq!(
            move_in_at(date("2026-07-01"), six, Europe::London),
            utc("2026-07-01T05:00:00Z")
        );
        // New York (EST, UTC-5) and Sydney (AEDT, UTC+11: the previous UTC day).
        assert_eq!(
            move_in_at(date("2026-03-02"), six, America::New_York),
            utc("2026-03-02T11:00:00Z")
        );
        assert_eq!(
            move_in_at(date("2026-03-02"), six, Australia::Sydney),
            utc("2026-03-01T19:00:00Z")
        );
    }

    #[test]
    fn six_oclock_on_the_days_the_clocks_change() {
        let six = time("06:00");
        // London: forward on 2026-03-29 at 01:00Z, back on 2026-10-25 at 01:00Z.
        assert_eq!(
            move_in_at(date("2026-03-29"), six, Europe::London),
            utc("2026-03-29T05:00:00Z")
        );
        assert_eq!(
            move_in_at(date("2026-10-25"), six, Europe::London),
            utc("2026-10-25T06:00:00Z")
        );
        // New York: forward on 2026-03-08, back on 2026-11-01 (both at 02:00 local).
        assert_eq!(
            move_in_at(date("2026-03-08"), six, America::New_York),
            utc("2026-03-08T10:00:00Z")
        );
        assert_eq!(
            move_in_at(date("2026-11-01"), six, America::New_York),
            utc("2026-11-01T11:00:00Z")
        );
    }

    #[test]
    fn a_time_in_the_skipped_hour_runs_at_the_transition() {
        // London skips 01:00..02:00 local on 2026-03-29: the first valid instant is 01:00Z.
        assert_eq!(
            move_in_at(date("2026-03-29"), time("01:30"), Europe::London),
            utc("2026-03-29T01:00:00Z")
        );
        assert_eq!(
            move_in_at(date("2026-03-29"), time("01:00"), Europe::London),
            utc("2026-03-29T01:00:00Z")
        );
        // New York skips 02:00..03:00 local on 2026-03-08 (EST → EDT at 07:00Z).
        assert_eq!(
            move_in_at(date("2026-03-08"), time("02:30"), America::New_York),
            utc("2026-03-08T07:00:00Z")
        );
        // Sydney skips 02:00..03:00 local on 2026-10-04 (AEST → AEDT at 16:00Z the day before).
        assert_eq!(
            move_in_at(date("2026-10-04"), time("02:59"), Australia::Sydney),
            utc("2026-10-03T16:00:00Z")
        );
        // The hour after the gap is normal again.
        assert_eq!(
            move_in_at(date("2026-03-29"), time("02:00"), Europe::London),
            utc("2026-03-29T01:00:00Z")
        );
    }

    #[test]
    fn a_time_in_the_repeated_hour_is_its_first_occurrence() {
        // London repeats 01:00..02:00 local on 2026-10-25: 01:30 BST (00:30Z), not GMT (01:30Z).
        assert_eq!(
            move_in_at(date("2026-10-25"), time("01:30"), Europe::London),
            utc("2026-10-25T00:30:00Z")
        );
        // New York repeats 01:00..02:00 local on 2026-11-01: 01:30 EDT (05:30Z), not EST.
        assert_eq!(
            move_in_at(date("2026-11-01"), time("01:30"), America::New_York),
            utc("2026-11-01T05:30:00Z")
        );
        // Sydney repeats 02:00..03:00 local on 2026-04-05: 02:30 AEDT (15:30Z the day before).
        assert_eq!(
            move_in_at(date("2026-04-05"), time("02:30"), Australia::Sydney),
            utc("2026-04-04T15:30:00Z")
        );
    }

    #[test]
    fn a_tenancy_has_ended_at_the_local_midnight_after_its_end_date() {
        assert_eq!(
            deallocate_at(date("2026-03-01"), Europe::London),
            utc("2026-03-02T00:00:00Z")
        );
        assert_eq!(
            deallocate_at(date("2026-06-30"), Europe::London),
            utc("2026-06-30T23:00:00Z")
        );
        assert_eq!(
            deallocate_at(date("2026-03-31"), Australia::Sydney),
            utc("2026-03-31T13:00:00Z")
        );
        // Santiago moves its clocks at midnight: 2026-09-06 00:00 does not exist locally,
        // the day starts at 01:00 -03 = 04:00Z, the transition instant.
        assert_eq!(
            deallocate_at(date("2026-09-05"), chrono_tz::America::Santiago),
            utc("2026-09-06T04:00:00Z")
        );
    }

    #[test]
    fn the_next_due_instant_is_the_earliest_future_one() {
        let now = utc("2026-03-10T12:00:00Z");
        let due = [
            utc("2026-03-10T06:00:00Z"),
            utc("2026-03-12T06:00:00Z"),
            utc("2026-03-11T00:00:00Z"),
            now,
        ];
        assert_eq!(next_due(now, due), Some(utc("2026-03-11T00:00:00Z")));
        assert_eq!(next_due(now, [now]), None);
    }

    #[test]
    fn settings_read_from_the_site_row_with_defaults() {
        let a: Automations = serde_json::from_value(serde_json::json!({
            "access_hours": {}, "auto_occupy_at": "07:30", "auto_overlock": true
        }))
        .unwrap();
        assert_eq!(
            a,
            Automations {
                auto_occupy: true,
                auto_occupy_at: time("07:30"),
                auto_deallocate: true,
                auto_overlock: true,
            }
        );
        assert!(
            serde_json::from_value::<Automations>(serde_json::json!({"auto_occupy_at": "6am"}))
                .is_err()
        );
    }
}
