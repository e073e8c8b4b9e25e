//! Access hours: per weekday, `"HH:MM-HH:MM"` or `"closed"` (DESIGN.md §2).

use chrono::{Datelike, NaiveDateTime, Timelike, Weekday};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use utoipa::ToSchema;

/// Weekday keys accepted in an access-hours object, Monday first.
pub const WEEKDAYS: [&str; 7] = [
    "monday",
    "tuesday",
    "wednesday",
    "thursday",
    "friday",
    "saturday",
    "sunday",
];

/// Access hours as written in config and the API: `{"monday": "06:00-22:00", ...}`.
/// A weekday that is missing or `"closed"` allows no access that day; `"00:00-24:00"` is all day.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(transparent)]
pub struct AccessHours(pub BTreeMap<String, String>);

/// One weekday's window in minutes after midnight, `[open, close)`. A window that closes
/// before it opens (`"18:00-02:00"`) runs past midnight into the next day.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// Opening minute.
    pub open: u16,
    /// Closing minute (exclusive, up to 1440; below `open`: on the next day).
    pub close: u16,
}

impl Window {
    /// Whether it runs past midnight.
    pub fn wraps(&self) -> bool {
        self.close < self.open
    }
}

impl std::fmt::Display for Window {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hm = |m: u16| format!("{:02}:{:02}", m / 60, m % 60);
        write!(f, "{}-{}", hm(self.open), hm(self.close))
    }
}

/// An access-hours value that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct HoursError {
    /// The weekday key at fault.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

fn parse_hhmm(s: &str) -> Option<u16> {
    let (h, m) = s.split_once(':')?;
    if h.len() != 2 || m.len() != 2 {
        return None;
    }
    let h: u16 = h.parse().ok()?;
    let m: u16 = m.parse().ok()?;
    (m < 60 && (h < 24 || (h == 24 && m == 0))).then_some(h * 60 + m)
}

/// Parses `"HH:MM-HH:MM"` or `"closed"`. A closing time before the opening time runs
/// past midnight (`"22:00-02:00"`: until 02:00 the next day); equal times are refused.
pub fn parse_window(s: &str) -> Result<Option<Window>, String> {
    if s == "closed" {
        return Ok(None);
    }
    let bad = || format!("{s:?} is not \"HH:MM-HH:MM\" or \"closed\"");
    let (a, b) = s.split_once('-').ok_or_else(bad)?;
    let (open, close) = (
        parse_hhmm(a).ok_or_else(bad)?,
        parse_hhmm(b).ok_or_else(bad)?,
    );
    if open == close {
        return Err(format!(
            "{s:?}: opening and closing times are the same (all day is \"00:00-24:00\")"
        ));
    }
    if close < open && close == 0 {
        return Err(format!("{s:?}: write midnight closing as 24:00"));
    }
    if open == 1440 {
        return Err(format!("{s:?}: cannot open at 24:00 (write 00:00)"));
    }
    Ok(Some(Window { open, close }))
}

impl AccessHours {
    /// Every day `00:00-24:00`.
    pub fn always() -> Self {
        AccessHours(
            WEEKDAYS
                .iter()
                .map(|d| (d.to_string(), "00:00-24:00".to_owned()))
                .collect(),
        )
    }

    /// Checks every key and value; returns all problems.
    pub fn validate(&self) -> Result<(), Vec<HoursError>> {
        let mut errors = Vec::new();
        for (day, value) in &self.0 {
            if !WEEKDAYS.contains(&day.as_str()) {
                errors.push(HoursError {
                    field: day.clone(),
                    message: format!("unknown weekday (expected one of {})", WEEKDAYS.join(", ")),
                });
            } else if let Err(message) = parse_window(value) {
                errors.push(HoursError {
                    field: day.clone(),
                    message,
                });
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }

    /// The window for a weekday, if open that day (invalid entries count as closed).
    pub fn window(&self, day: Weekday) -> Option<Window> {
        let key = WEEKDAYS[day.num_days_from_monday() as usize];
        self.0.get(key).and_then(|v| parse_window(v).ok().flatten())
    }

    /// Whether a site-local time falls within these hours: today's window, or the end of
    /// yesterday's window if that one runs past midnight.
    pub fn allows(&self, local: NaiveDateTime) -> bool {
        let minute = (local.hour() * 60 + local.minute()) as u16;
        let today = self.window(local.weekday()).is_some_and(|w| {
            if w.wraps() {
                minute >= w.open
            } else {
                (w.open..w.close).contains(&minute)
            }
        });
        let from_yesterday = self
            .window(local.weekday().pred())
            .is_some_and(|w| w.wraps() && minute < w.close);
        today || from_yesterday
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hours(pairs: &[(&str, &str)]) -> AccessHours {
        AccessHours(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    #[test]
    fn parses_windows_and_rejects_garbage() {
        assert_eq!(
            parse_window("06:00-22:00").unwrap(),
            Some(Window {
                open: 360,
                close: 1320
            })
        );
        assert_eq!(
            parse_window("00:00-24:00").unwrap(),
            Some(Window {
                open: 0,
                close: 1440
            })
        );
        assert_eq!(parse_window("closed").unwrap(), None);
        for bad in [
            "6:00-22:00",
            "06:00",
            "06:00-06:00",
            "22:00-00:00",
            "24:00-06:00",
            "06:60-07:00",
            "24:01-24:02",
            "",
            "x",
        ] {
            assert!(parse_window(bad).is_err(), "{bad}");
        }
        let errs = hours(&[("funday", "06:00-07:00"), ("monday", "late")])
            .validate()
            .unwrap_err();
        assert_eq!(errs.len(), 2);
    }

    #[test]
    fn a_window_past_midnight_continues_into_the_next_day() {
        assert_eq!(
            parse_window("22:00-02:00").unwrap(),
            Some(Window {
                open: 1320,
                close: 120
            })
        );
        // Tuesday 22:00 until Wednesday 02:00; Wednesday itself is closed.
        let h = hours(&[("tuesday", "22:00-02:00")]);
        let at = |s: &str| NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M").unwrap();
        assert!(!h.allows(at("2026-03-10 21:59")));
        assert!(h.allows(at("2026-03-10 22:00")));
        assert!(h.allows(at("2026-03-10 23:59")));
        assert!(h.allows(at("2026-03-11 00:00")));
        assert!(h.allows(at("2026-03-11 01:59")));
        assert!(!h.allows(at("2026-03-11 02:00")));
        assert!(!h.allows(at("2026-03-11 22:00")));
        // Monday's window does not reach Tuesday morning.
        assert!(!h.allows(at("2026-03-10 01:00")));
        assert_eq!(
            h.window(chrono::Weekday::Tue).map(|w| w.to_string()),
            Some("22:00-02:00".into())
        );
    }

    #[test]
    fn allows_inside_the_window_only() {
        let h = hours(&[("tuesday", "06:00-22:00")]);
        let at = |s: &str| NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M").unwrap();
        // 2026-03-10 is a Tuesday.
        assert!(h.allows(at("2026-03-10 06:00")));
        assert!(h.allows(at("2026-03-10 21:59")));
        assert!(!h.allows(at("2026-03-10 22:00")));
        assert!(!h.allows(at("2026-03-10 05:59")));
        assert!(
            !h.allows(at("2026-03-11 12:00")),
            "wednesday is missing: closed"
        );
        assert!(AccessHours::always().allows(at("2026-03-11 23:59")));
    }
}
