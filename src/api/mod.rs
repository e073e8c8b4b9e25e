//! The APIs the cloud talks to. HTTP (and later MQTT) parse into [`crate::command::Command`]
//! and render [`error::ApiError`]; neither holds any rule of its own.

#[cfg(unix)]
pub mod control;
pub mod error;
pub mod http;
