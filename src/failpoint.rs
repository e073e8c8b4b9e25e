//! Named failpoints at each durable step: where a power loss or a failed write can strike
//! between "the change is decided" and "the change is acknowledged".
//!
//! Compiled in only with the cargo feature `failpoints` (off by default; the Debian
//! package and the demo never carry it). Without it [`check`] is an inlined `Ok(())` and
//! every call site compiles to nothing.
//!
//! With the feature, the `FAILPOINTS` environment variable arms them when `unitgate` starts
//! (the syntax of the `fail` crate: `name=actions;name=actions`, actions chained with `->`,
//! each `[p%][count*]task[(arg)]`). Two tasks are this module's own:
//!
//! - `return(crash)`: `std::process::abort()` right there, as a power loss at that instant
//!   would stop the process (no destructors, no flush, no reply).
//! - `return(error)`: the step fails as an I/O error would (a failed `COMMIT` rolls the batch
//!   back and every job in it is answered with an error).
//!
//! Each hit prints `failpoint <name>: crash|error` to stderr first, so a test can tell that
//! the step was reached. Counts select the hit, e.g.
//!
//! ```text
//! FAILPOINTS='store.commit.after=3*off->return(crash)'        # abort at the 4th commit
//! FAILPOINTS='store.commit.before=5*off->1*return(error)->off' # only the 6th commit fails
//! ```
//!
//! The fail crate's own tasks (`panic`, `sleep(ms)`, `pause`, `print`) work too.
//! [`ALL`] lists every failpoint; tests/power_loss.rs runs a crash at each of them.

/// A failpoint: its name (as `FAILPOINTS` spells it) and the step it guards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Failpoint {
    /// The name, e.g. `store.commit.before`.
    pub name: &'static str,
    /// Where it is, in a few words.
    pub step: &'static str,
}

macro_rules! failpoints {
    ($($(#[$doc:meta])* $id:ident = $name:literal, $step:literal;)*) => {
        $($(#[$doc])* pub const $id: Failpoint = Failpoint { name: $name, step: $step };)*
        /// Every failpoint, in the order of the steps.
        pub const ALL: &[Failpoint] = &[$($id),*];
    };
}

failpoints! {
    /// The PIN key file is written and synced beside its place, not yet renamed into it.
    PIN_KEY_RENAME_BEFORE = "pin_key.rename.before", "first start: pin.key written to a temporary file, before the rename";
    /// The PIN key file is in place, the directory not yet synced.
    PIN_KEY_RENAME_AFTER = "pin_key.rename.after", "first start: pin.key renamed into place, before the directory sync";
    /// A command's hardware intents are about to be recorded in the outbox (in its transaction).
    OUTBOX_DESIRED_BEFORE = "outbox.desired.before", "a command's desired hardware state, before it is written (in the transaction)";
    /// A command's answer is about to be recorded under its idempotency key (in its transaction).
    IDEMPOTENCY_RECORD_BEFORE = "idempotency.record.before", "the idempotency record, before it is written (in the transaction)";
    /// An inbound webhook's event id is about to be recorded (in its transaction).
    WEBHOOK_RECORD_BEFORE = "webhook.record.before", "an inbound webhook's event id, before it is written (in the transaction)";
    /// Every job of a batch has run; `COMMIT` comes next.
    STORE_COMMIT_BEFORE = "store.commit.before", "the writer's batch, before COMMIT";
    /// `COMMIT` returned; no job of the batch has been answered yet.
    STORE_COMMIT_AFTER = "store.commit.after", "the writer's batch, after COMMIT, before the jobs are answered";
    /// A device confirmed a target; its outbox row does not say so yet.
    OUTBOX_APPLIED_BEFORE = "outbox.applied.before", "a delivered hardware target, before it is marked applied";
    /// The outbox row was marked applied (committed); the next delivery has not started.
    OUTBOX_APPLIED_AFTER = "outbox.applied.after", "a delivered hardware target, after it is marked applied";
    /// The cloud acknowledged an HTTPS batch; the uplink cursor has not moved yet.
    UPLINK_CURSOR_BEFORE = "uplink.cursor.before", "an HTTPS uplink batch acknowledged, before the cursor advances";
    /// The uplink cursor moved (committed); the next batch has not been read.
    UPLINK_CURSOR_AFTER = "uplink.cursor.after", "an HTTPS uplink batch acknowledged, after the cursor advanced";
    /// The broker acknowledged (PUBACK) the MQTT events up to a new `seq`; the MQTT delivery
    /// cursor has not moved yet.
    MQTT_CURSOR_BEFORE = "mqtt.cursor.before", "MQTT events acknowledged by the broker, before the delivery cursor advances";
    /// The MQTT delivery cursor moved (committed); nothing more has been acknowledged.
    MQTT_CURSOR_AFTER = "mqtt.cursor.after", "MQTT events acknowledged by the broker, after the delivery cursor advanced";
}

/// What an armed failpoint with `return(error)` makes the step fail with.
#[cfg(feature = "failpoints")]
fn injected(name: &str) -> std::io::Error {
    std::io::Error::other(format!("failpoint {name}: injected I/O error"))
}

/// Passes the failpoint: `Ok(())` unless it is armed (see the module doc). A `crash`
/// aborts the process here; an `error` comes back as an I/O error for the step to fail with.
#[cfg(feature = "failpoints")]
pub fn check(fp: Failpoint) -> Result<(), std::io::Error> {
    fn action(name: &str) -> Option<String> {
        fail::fail_point!(name, |arg: Option<String>| Some(arg.unwrap_or_default()));
        None
    }
    use std::io::Write;
    match action(fp.name).as_deref() {
        None => Ok(()),
        Some("crash") => {
            let _ = writeln!(std::io::stderr(), "failpoint {}: crash", fp.name);
            std::process::abort()
        }
        Some(other) => {
            if other != "error" {
                let _ = writeln!(
                    std::io::stderr(),
                    "failpoint {}: unknown return({other}); taken as error",
                    fp.name
                );
            }
            let _ = writeln!(std::io::stderr(), "failpoint {}: error", fp.name);
            Err(injected(fp.name))
        }
    }
}

/// Passes the failpoint: without the `failpoints` feature, always `Ok(())`.
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn check(_fp: Failpoint) -> Result<(), std::io::Error> {
    Ok(())
}

/// Arms the failpoints `FAILPOINTS` names, for the life of the process (call once, in
/// `main`). Refuses a name that is not in [`ALL`] (a typo must not test nothing) and an
/// action the fail crate cannot parse, with a message instead of a panic.
#[cfg(feature = "failpoints")]
pub fn arm_from_env() -> Result<(), String> {
    let Ok(spec) = std::env::var("FAILPOINTS") else {
        return Ok(());
    };
    for part in spec.split(';').map(str::trim).filter(|p| !p.is_empty()) {
        let (name, actions) = part
            .split_once('=')
            .ok_or_else(|| format!("FAILPOINTS: {part:?} is not name=actions"))?;
        let name = name.trim();
        if !ALL.iter().any(|f| f.name == name) {
            return Err(format!("FAILPOINTS: unknown failpoint {name:?}"));
        }
        fail::cfg(name, actions.trim()).map_err(|e| format!("FAILPOINTS: {name}: {e}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_dotted() {
        for (i, a) in ALL.iter().enumerate() {
            assert!(
                a.name.split('.').count() >= 3 && !a.step.is_empty(),
                "{a:?}"
            );
            assert!(ALL[i + 1..].iter().all(|b| b.name != a.name), "{a:?} twice");
        }
    }

    #[test]
    fn an_unarmed_failpoint_passes() {
        for fp in ALL {
            assert!(check(*fp).is_ok(), "{}", fp.name);
        }
    }
}
