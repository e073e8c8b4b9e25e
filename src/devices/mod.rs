//! Device drivers: one task per device or link, owning its transport, driven through a handle.

pub mod modbus;
pub mod osdp;
pub mod smartlock;
