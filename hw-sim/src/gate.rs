//! Gates: when a keypad's gate strike coil energises, the gate swings open and its position
//! sensor (if the site names one) reports open; when the strike releases, the gate closes
//! again a little later. This is what lets a test see "gate held open" and "gate closed".

use crate::config::KeypadConfig;
use crate::relay::RelayBoard;
use crate::{DeviceContext, Registry};
use std::time::Duration;

/// How long after the strike energises the gate reads open.
pub const OPENS_AFTER: Duration = Duration::from_millis(300);
/// How long after the strike releases the gate reads closed.
pub const CLOSES_AFTER: Duration = Duration::from_millis(1500);

/// Starts one task per keypad whose gate has both a strike coil and a position sensor.
pub fn start(keypads: &[KeypadConfig], registry: &Registry, ctx: &DeviceContext) {
    for k in keypads {
        let (Some(coil), Some(sensor)) = (&k.gate, &k.gate_sensor) else {
            continue;
        };
        let (Some(strike), Some(board)) = (
            registry.relays.get(&coil.board).cloned(),
            registry.relays.get(&sensor.board).cloned(),
        ) else {
            continue;
        };
        let mut rx = ctx.bus.subscribe();
        let mut shutdown = ctx.shutdown.clone();
        let (coil_board, coil_n, input) = (coil.board.clone(), coil.coil, sensor.input);
        let gate = k.id.clone();
        tokio::spawn(async move {
            loop {
                let o = tokio::select! {
                    _ = shutdown.wait_for(|s| *s) => return,
                    o = rx.recv() => match o {
                        Ok(o) => o,
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                        Err(_) => return,
                    },
                };
                if o.device != coil_board || o.kind != "coil_changed" || o.data["coil"] != coil_n {
                    continue;
                }
                let open = o.data["on"].as_bool().unwrap_or(false);
                follow(&strike, coil_n, &board, input, open, &gate).await;
            }
        });
    }
}

async fn follow(
    strike: &RelayBoard,
    coil: u16,
    board: &RelayBoard,
    input: u16,
    open: bool,
    gate: &str,
) {
    tokio::time::sleep(if open { OPENS_AFTER } else { CLOSES_AFTER }).await;
    // Only move if the strike is still where it was (a quick re-pulse keeps the gate open).
    let strike_now = strike.state().coils.get(coil as usize).copied();
    if strike_now == Some(open)
        && let Err(e) = board.set_input(input, open)
    {
        tracing::warn!(gate, error = %e, "gate sensor");
    }
}
