//! Gate access at a keypad, without I/O: the PIN being typed ([`Entry`]), the brute-force
//! lockout ([`Lockout`]) and the decision from the replica's facts ([`decide`]).
//!
//! DESIGN.md §4: digits then `#`; `*` clears; 10 s between keys or the entry is dropped.
//! A PIN is granted when its contact has at least one `occupied`, not gatelocked unit whose
//! zones include the keypad's zone and now (site local) is within the site's and the
//! contact's hours. A gatelock (a per-unit flag from the cloud) closes the gate only: the
//! tenant is sent to the office, as when overlocked, and the unit's lock is not touched.
//! Refusals never tell a stranger anything about other tenants: a code that matches
//! nobody and a code whose tenant has nothing behind this gate both read "Invalid code".

use super::hours::AccessHours;
use super::status::UnitStatus;
use chrono::{Datelike, NaiveDateTime};
use serde::Serialize;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Time allowed between two keys before the entry is dropped.
pub const INTER_KEY_TIMEOUT: Duration = Duration::from_secs(10);
/// Keys kept in an entry; a longer one can only be wrong (PINs have at most 10 digits).
const MAX_KEYS: usize = 16;

/// A PIN as typed. Never printed: `Debug` hides it.
#[derive(Clone, PartialEq, Eq)]
pub struct Pin(String);

impl Pin {
    /// The digits.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Pin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Pin({} digits)", self.0.len())
    }
}

/// What one key did to the entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyOutcome {
    /// A digit was added.
    Digit,
    /// `*`: the entry was cleared.
    Cleared,
    /// `#` after digits: this PIN is submitted (the entry is empty again).
    Submitted(Pin),
    /// `#` with nothing typed, or a key that is not one: ignored.
    Ignored,
}

/// The keys typed so far on one keypad.
#[derive(Default)]
pub struct Entry {
    keys: String,
    last: Option<Instant>,
}

impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The keys are a PIN in the making: only their count is shown.
        f.debug_struct("Entry")
            .field("keys", &self.keys.len())
            .field("last", &self.last)
            .finish()
    }
}

impl Entry {
    /// Applies one key pressed at `now`. An entry idle longer than
    /// [`INTER_KEY_TIMEOUT`] is dropped first.
    pub fn press(&mut self, now: Instant, key: char) -> KeyOutcome {
        self.expire(now);
        self.last = Some(now);
        match key {
            '0'..='9' => {
                if self.keys.len() < MAX_KEYS {
                    self.keys.push(key);
                } else {
                    // Keeps growing past any valid PIN: remember only that it is too long.
                    self.keys.replace_range(..1, "");
                    self.keys.push('x');
                }
                KeyOutcome::Digit
            }
            '*' => {
                self.clear();
                KeyOutcome::Cleared
            }
            '#' if !self.keys.is_empty() => {
                let pin = Pin(std::mem::take(&mut self.keys));
                self.last = None;
                KeyOutcome::Submitted(pin)
            }
            _ => KeyOutcome::Ignored,
        }
    }

    /// Drops the entry if the last key is older than the timeout; true if it did.
    pub fn expire(&mut self, now: Instant) -> bool {
        let stale = self
            .last
            .is_some_and(|t| now.saturating_duration_since(t) >= INTER_KEY_TIMEOUT);
        if stale {
            self.clear();
        }
        stale && !self.keys.is_empty()
    }

    /// When the entry will expire, if anything is typed.
    pub fn deadline(&self) -> Option<Instant> {
        self.last
            .filter(|_| !self.keys.is_empty())
            .map(|t| t + INTER_KEY_TIMEOUT)
    }

    /// Forgets what was typed.
    pub fn clear(&mut self) {
        self.keys.clear();
        self.last = None;
    }

    /// Keys typed so far.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether nothing is typed.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// Brute-force protection settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LockoutPolicy {
    /// Wrong PINs that lock the keypad...
    pub attempts: u32,
    /// ...within this window...
    pub window: Duration,
    /// ...for this long.
    pub duration: Duration,
}

/// A keypad's recent wrong PINs and its lockout.
#[derive(Debug, Default)]
pub struct Lockout {
    failures: VecDeque<Instant>,
    until: Option<Instant>,
}

impl Lockout {
    /// The time left if the keypad is locked out at `now`.
    pub fn remaining(&self, now: Instant) -> Option<Duration> {
        self.until
            .filter(|u| *u > now)
            .map(|u| u.saturating_duration_since(now))
    }

    /// Counts a wrong PIN; true when this one starts a lockout.
    pub fn wrong(&mut self, now: Instant, policy: &LockoutPolicy) -> bool {
        while self
            .failures
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) >= policy.window)
        {
            self.failures.pop_front();
        }
        self.failures.push_back(now);
        if self.failures.len() >= policy.attempts.max(1) as usize {
            self.failures.clear();
            self.until = Some(now + policy.duration);
            return true;
        }
        false
    }

    /// A right PIN: the count starts again.
    pub fn right(&mut self) {
        self.failures.clear();
    }
}

/// One unit of the PIN's contact, as the decision needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnitAccess {
    /// Unit id.
    pub unit_id: String,
    /// Its status.
    pub status: UnitStatus,
    /// The gates its tenant may pass.
    pub zones: Vec<String>,
    /// Gatelocked: this unit does not open the gate.
    pub gatelock: bool,
}

/// The contact a PIN belongs to, with what the decision reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    /// Contact id.
    pub contact_id: String,
    /// The contact's own hours, if any.
    pub hours: Option<AccessHours>,
    /// Units with an active allocation to one of the contact's tenancies.
    pub units: Vec<UnitAccess>,
}

/// Why a PIN was refused (the event's `reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DenyReason {
    /// The code matches no contact.
    InvalidCode,
    /// The contact has no occupied unit behind this gate.
    NoAccess,
    /// The contact's occupied units behind this gate are all gatelocked.
    Gatelocked,
    /// The contact's units behind this gate are overlocked.
    Overlocked,
    /// The contact's units behind this gate are repossessed.
    Repossessed,
    /// Outside the site's or the contact's access hours.
    OutsideHours,
    /// The keypad is locked out after too many wrong PINs.
    Lockout,
}

impl DenyReason {
    /// Whether it counts towards the lockout: codes that open nothing here. (A gatelocked
    /// tenant's code is a valid one.)
    pub fn is_wrong_code(self) -> bool {
        matches!(self, DenyReason::InvalidCode | DenyReason::NoAccess)
    }
}

/// The outcome for one PIN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Open the gate.
    Granted {
        /// The contact.
        contact_id: String,
        /// The occupied, not gatelocked units behind this gate.
        units: Vec<String>,
    },
    /// Keep it shut.
    Denied {
        /// Why.
        reason: DenyReason,
        /// The contact, when the code matched one.
        contact_id: Option<String>,
        /// The contact's units behind this gate.
        units: Vec<String>,
        /// What the keypad shows.
        text: String,
    },
}

/// The keypad text of a grant.
pub const WELCOME: &str = "Welcome";
/// The keypad text of a wrong or useless code.
pub const INVALID_CODE: &str = "Invalid code";
/// The keypad text of an overlocked, gatelocked or repossessed tenant.
pub const SEE_OFFICE: &str = "Please see office";
/// The keypad text while locked out.
pub const LOCKED_OUT: &str = "Locked - try later";

/// Decides a PIN at a keypad guarding `zone`, at site-local time `local`. `holder` is the
/// PIN's contact, `None` when the code matches nobody.
pub fn decide(
    zone: &str,
    holder: Option<&Holder>,
    site_hours: &AccessHours,
    local: NaiveDateTime,
) -> Decision {
    let Some(h) = holder else {
        return denied(
            DenyReason::InvalidCode,
            None,
            Vec::new(),
            INVALID_CODE.into(),
        );
    };
    let here: Vec<&UnitAccess> = h
        .units
        .iter()
        .filter(|u| u.zones.iter().any(|z| z == zone))
        .collect();
    let ids = |pred: fn(&UnitAccess) -> bool| -> Vec<String> {
        here.iter()
            .filter(|u| pred(u))
            .map(|u| u.unit_id.clone())
            .collect()
    };
    let occupied = ids(|u| u.status == UnitStatus::Occupied && !u.gatelock);
    let contact = Some(h.contact_id.clone());
    if !occupied.is_empty() {
        let site_ok = site_hours.allows(local);
        let own_ok = h.hours.as_ref().is_none_or(|c| c.allows(local));
        if site_ok && own_ok {
            return Decision::Granted {
                contact_id: h.contact_id.clone(),
                units: occupied,
            };
        }
        let hours = if site_ok {
            h.hours.as_ref().unwrap_or(site_hours)
        } else {
            site_hours
        };
        return denied(
            DenyReason::OutsideHours,
            contact,
            occupied,
            hours_text(hours, local),
        );
    }
    // Gatelocked before hours: the office, not the clock, is what stands in the way.
    let gatelocked = ids(|u| u.status == UnitStatus::Occupied && u.gatelock);
    if !gatelocked.is_empty() {
        return denied(
            DenyReason::Gatelocked,
            contact,
            gatelocked,
            SEE_OFFICE.into(),
        );
    }
    let overlocked = ids(|u| u.status == UnitStatus::Overlocked);
    if !overlocked.is_empty() {
        return denied(
            DenyReason::Overlocked,
            contact,
            overlocked,
            SEE_OFFICE.into(),
        );
    }
    let repossessed = ids(|u| u.status == UnitStatus::Repossessed);
    if !repossessed.is_empty() {
        return denied(
            DenyReason::Repossessed,
            contact,
            repossessed,
            SEE_OFFICE.into(),
        );
    }
    denied(
        DenyReason::NoAccess,
        contact,
        Vec::new(),
        INVALID_CODE.into(),
    )
}

/// The refusal while a keypad is locked out.
pub fn locked_out() -> Decision {
    denied(DenyReason::Lockout, None, Vec::new(), LOCKED_OUT.into())
}

fn denied(
    reason: DenyReason,
    contact_id: Option<String>,
    units: Vec<String>,
    text: String,
) -> Decision {
    Decision::Denied {
        reason,
        contact_id,
        units,
        text,
    }
}

/// "Open 06:00-22:00" for today's window, or "Closed today".
fn hours_text(hours: &AccessHours, local: NaiveDateTime) -> String {
    match hours.window(local.weekday()) {
        Some(w) => format!("Open {w}"),
        None => "Closed today".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> NaiveDateTime {
        NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M").expect("time")
    }

    fn hours(day: &str, window: &str) -> AccessHours {
        AccessHours([(day.to_owned(), window.to_owned())].into_iter().collect())
    }

    fn holder(units: &[(&str, UnitStatus, &[&str])]) -> Holder {
        Holder {
            contact_id: "c1".into(),
            hours: None,
            units: units
                .iter()
                .map(|(id, status, zones)| UnitAccess {
                    unit_id: (*id).into(),
                    status: *status,
                    zones: zones.iter().map(|z| (*z).to_owned()).collect(),
                    gatelock: false,
                })
                .collect(),
        }
    }

    fn reason(d: &Decision) -> Option<DenyReason> {
        match d {
            Decision::Granted { .. } => None,
            Decision::Denied { reason, .. } => Some(*reason),
        }
    }

    #[test]
    fn entry_submits_on_hash_clears_on_star_and_expires() {
        let t0 = Instant::now();
        let mut e = Entry::default();
        for k in "12".chars() {
            assert_eq!(e.press(t0, k), KeyOutcome::Digit);
        }
        assert_eq!(e.press(t0, '*'), KeyOutcome::Cleared);
        assert!(e.is_empty());
        assert_eq!(e.press(t0, '#'), KeyOutcome::Ignored);
        for k in "2222".chars() {
            e.press(t0, k);
        }
        assert_eq!(e.press(t0, '#'), KeyOutcome::Submitted(Pin("2222".into())));
        // 10 s between keys drops what was typed; 9.9 s does not.
        e.press(t0, '1');
        e.press(t0 + Duration::from_millis(9_900), '2');
        let late = t0 + Duration::from_millis(9_900) + INTER_KEY_TIMEOUT;
        assert_eq!(e.deadline(), Some(late));
        e.press(late, '3');
        assert_eq!(e.press(late, '#'), KeyOutcome::Submitted(Pin("3".into())));
        assert_eq!(e.press(late, 'A'), KeyOutcome::Ignored);
    }

    #[test]
    fn an_overlong_entry_stays_bounded_and_wrong() {
        let t0 = Instant::now();
        let mut e = Entry::default();
        for _ in 0..1000 {
            e.press(t0, '1');
        }
        assert!(e.len() <= MAX_KEYS);
        let KeyOutcome::Submitted(pin) = e.press(t0, '#') else {
            panic!("submitted");
        };
        assert!(crate::domain::pin::validate(pin.as_str()).is_err());
        assert_eq!(format!("{pin:?}"), "Pin(16 digits)");
    }

    #[test]
    fn lockout_after_n_wrong_in_the_window_and_it_expires() {
        let p = LockoutPolicy {
            attempts: 5,
            window: Duration::from_secs(600),
            duration: Duration::from_secs(300),
        };
        let t0 = Instant::now();
        let mut l = Lockout::default();
        // Four wrong, one falls out of the window, so the fifth does not lock.
        assert!(!l.wrong(t0, &p));
        for i in 1..4 {
            assert!(!l.wrong(t0 + Duration::from_secs(300 + i), &p));
        }
        let t = t0 + Duration::from_secs(601);
        assert!(!l.wrong(t, &p));
        assert!(l.remaining(t).is_none());
        assert!(l.wrong(t + Duration::from_secs(1), &p));
        let locked = t + Duration::from_secs(1);
        assert_eq!(l.remaining(locked), Some(Duration::from_secs(300)));
        assert!(l.remaining(locked + Duration::from_secs(300)).is_none());
        // A right PIN resets the count.
        l.wrong(locked + Duration::from_secs(400), &p);
        l.right();
        for i in 0..4 {
            assert!(!l.wrong(locked + Duration::from_secs(401 + i), &p));
        }
    }

    #[test]
    fn decides_by_status_zone_and_hours() {
        let site = AccessHours::always();
        let now = at("2026-03-10 12:00");
        let g = decide(
            "main",
            Some(&holder(&[("u1", UnitStatus::Occupied, &["main"])])),
            &site,
            now,
        );
        assert_eq!(
            g,
            Decision::Granted {
                contact_id: "c1".into(),
                units: vec!["u1".into()]
            }
        );
        type Units<'a> = &'a [(&'a str, UnitStatus, &'a [&'a str])];
        let cases: &[(Units, Option<DenyReason>)] = &[
            (
                &[("u1", UnitStatus::Occupied, &["east"])],
                Some(DenyReason::NoAccess),
            ),
            (
                &[("u1", UnitStatus::Reserved, &["main"])],
                Some(DenyReason::NoAccess),
            ),
            (
                &[("u1", UnitStatus::Overlocked, &["main"])],
                Some(DenyReason::Overlocked),
            ),
            (
                &[("u1", UnitStatus::Repossessed, &["main"])],
                Some(DenyReason::Repossessed),
            ),
            (
                &[
                    ("u1", UnitStatus::Overlocked, &["main"]),
                    ("u2", UnitStatus::Occupied, &["main", "east"]),
                ],
                None,
            ),
            (&[], Some(DenyReason::NoAccess)),
        ];
        for (units, want) in cases {
            let d = decide("main", Some(&holder(units)), &site, now);
            assert_eq!(reason(&d), *want, "{units:?}");
        }
        let d = decide("main", None, &site, now);
        assert_eq!(reason(&d), Some(DenyReason::InvalidCode));
        // Unknown code and no access read the same on the keypad.
        let Decision::Denied { text: a, .. } = d else {
            panic!()
        };
        let Decision::Denied { text: b, .. } = decide("main", Some(&holder(&[])), &site, now)
        else {
            panic!()
        };
        assert_eq!(a, b);
    }

    /// `holder(units)` with the units named in `locked` gatelocked.
    fn gatelocked(units: &[(&str, UnitStatus, &[&str])], locked: &[&str]) -> Holder {
        let mut h = holder(units);
        for u in &mut h.units {
            u.gatelock = locked.contains(&u.unit_id.as_str());
        }
        h
    }

    #[test]
    fn a_gatelocked_unit_does_not_open_the_gate() {
        let site = AccessHours::always();
        let now = at("2026-03-10 12:00");
        let h = gatelocked(&[("u1", UnitStatus::Occupied, &["main"])], &["u1"]);
        assert_eq!(
            decide("main", Some(&h), &site, now),
            Decision::Denied {
                reason: DenyReason::Gatelocked,
                contact_id: Some("c1".into()),
                units: vec!["u1".into()],
                text: SEE_OFFICE.into(),
            }
        );
        // A valid code: it does not count towards the keypad's lockout.
        assert!(!DenyReason::Gatelocked.is_wrong_code());
        // Outside hours too, the office is where to go.
        let closed = hours("tuesday", "06:00-07:00");
        let d = decide("main", Some(&h), &closed, now);
        assert_eq!(reason(&d), Some(DenyReason::Gatelocked));

        // Another occupied unit behind this gate still opens it, and only it is listed.
        let units: &[(&str, UnitStatus, &[&str])] = &[
            ("u1", UnitStatus::Occupied, &["main"]),
            ("u2", UnitStatus::Occupied, &["main", "east"]),
            ("u3", UnitStatus::Occupied, &["main"]),
        ];
        assert_eq!(
            decide("main", Some(&gatelocked(units, &["u1", "u3"])), &site, now),
            Decision::Granted {
                contact_id: "c1".into(),
                units: vec!["u2".into()]
            }
        );
        // ...but that unit's outside hours is outside hours.
        let d = decide(
            "main",
            Some(&gatelocked(units, &["u1", "u3"])),
            &closed,
            now,
        );
        assert_eq!(reason(&d), Some(DenyReason::OutsideHours));
        type Units<'a> = &'a [(&'a str, UnitStatus, &'a [&'a str])];
        let cases: &[(Units, &[&str], Option<DenyReason>)] = &[
            // A gatelock on a unit behind another gate does not matter here...
            (
                &[
                    ("u1", UnitStatus::Occupied, &["main"]),
                    ("u2", UnitStatus::Occupied, &["east"]),
                ],
                &["u2"],
                None,
            ),
            // ...nor does a free unit behind another gate open this one.
            (
                &[
                    ("u1", UnitStatus::Occupied, &["east"]),
                    ("u2", UnitStatus::Occupied, &["main"]),
                ],
                &["u2"],
                Some(DenyReason::Gatelocked),
            ),
            // The contact's occupied unit is gatelocked, another overlocked: see the office
            // for the gatelock first (the occupied unit is the one they came for).
            (
                &[
                    ("u1", UnitStatus::Occupied, &["main"]),
                    ("u2", UnitStatus::Overlocked, &["main"]),
                ],
                &["u1"],
                Some(DenyReason::Gatelocked),
            ),
            // Gatelock on a unit that gives no access anyway changes nothing.
            (
                &[("u1", UnitStatus::Overlocked, &["main"])],
                &["u1"],
                Some(DenyReason::Overlocked),
            ),
            (
                &[("u1", UnitStatus::Reserved, &["main"])],
                &["u1"],
                Some(DenyReason::NoAccess),
            ),
            (
                &[("u1", UnitStatus::Repossessed, &["main"])],
                &["u1"],
                Some(DenyReason::Repossessed),
            ),
            // Gatelock lifted: in again.
            (&[("u1", UnitStatus::Occupied, &["main"])], &[], None),
        ];
        for (units, locked, want) in cases {
            let d = decide("main", Some(&gatelocked(units, locked)), &site, now);
            assert_eq!(reason(&d), *want, "{units:?} gatelocked {locked:?}");
        }
    }

    #[test]
    fn hours_of_the_site_and_the_contact_both_apply() {
        let site = hours("tuesday", "06:00-22:00");
        let mut h = holder(&[("u1", UnitStatus::Occupied, &["main"])]);
        let ok = |h: &Holder, t: &str| reason(&decide("main", Some(h), &site, at(t)));
        assert_eq!(ok(&h, "2026-03-10 06:00"), None);
        assert_eq!(ok(&h, "2026-03-10 21:59"), None);
        assert_eq!(ok(&h, "2026-03-10 22:00"), Some(DenyReason::OutsideHours));
        assert_eq!(ok(&h, "2026-03-10 05:59"), Some(DenyReason::OutsideHours));
        let Decision::Denied { text, .. } = decide("main", Some(&h), &site, at("2026-03-10 23:00"))
        else {
            panic!()
        };
        assert_eq!(text, "Open 06:00-22:00");
        h.hours = Some(hours("tuesday", "08:00-18:00"));
        assert_eq!(ok(&h, "2026-03-10 07:59"), Some(DenyReason::OutsideHours));
        assert_eq!(ok(&h, "2026-03-10 08:00"), None);
        let Decision::Denied { text, .. } = decide("main", Some(&h), &site, at("2026-03-10 19:00"))
        else {
            panic!()
        };
        assert_eq!(text, "Open 08:00-18:00");
        // Wednesday: the site is closed.
        let Decision::Denied { text, .. } = decide("main", Some(&h), &site, at("2026-03-11 12:00"))
        else {
            panic!()
        };
        assert_eq!(text, "Closed today");
    }
}
