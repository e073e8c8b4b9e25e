//! hw-sim: a simulated self-storage site (keypads, relay boards, smart locks).
//!
//! The simulator arrives with the hardware work; this crate is a placeholder so the
//! workspace layout of DESIGN.md §1 holds from the start.
