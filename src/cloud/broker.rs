//! The demo's embedded MQTT broker (rumqttd, MQTT 3.1.1 so `mosquitto_sub` works as is).
//! rumqttd's `Broker::start` blocks, so it gets its own thread; it runs until the process
//! exits.

use std::net::{SocketAddr, TcpListener};

/// The broker could not start.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The address is taken or invalid.
    #[error("MQTT broker cannot listen on {addr}: {source}")]
    Listen {
        /// Address.
        addr: String,
        /// Cause.
        source: std::io::Error,
    },
    /// The configuration was refused, or its thread could not start.
    #[error("MQTT broker: {0}")]
    Start(String),
}

/// Starts a broker listening on `listen` (its address; it accepts within moments).
pub fn start(listen: &str) -> Result<SocketAddr, BrokerError> {
    let err = |source| BrokerError::Listen {
        addr: listen.to_owned(),
        source,
    };
    // Bind once here so a taken port is reported now, not logged from the broker thread.
    let addr = TcpListener::bind(listen)
        .and_then(|l| l.local_addr())
        .map_err(err)?;
    let config: rumqttd::Config = serde_json::from_value(serde_json::json!({
        "id": 0,
        "router": {
            "id": 0,
            "max_connections": 1000,
            "max_outgoing_packet_count": 200,
            "max_segment_size": 104857600,
            "max_segment_count": 10,
        },
        "v4": {"1": {
            "name": "demo",
            "listen": addr.to_string(),
            "next_connection_delay_ms": 1,
            "connections": {
                "connection_timeout_ms": 60000,
                "max_payload_size": 1 << 20,
                "max_inflight_count": 500,
                "dynamic_filters": true,
            },
        }},
    }))
    .map_err(|e| BrokerError::Start(e.to_string()))?;
    std::thread::Builder::new()
        .name("mqtt-broker".into())
        .spawn(move || {
            let mut broker = rumqttd::Broker::new(config);
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "the embedded MQTT broker stopped");
            }
        })
        .map_err(|e| BrokerError::Start(e.to_string()))?;
    // Not probed with a connection (rumqttd logs an aborted connect as an error): the
    // MQTT link retries within 100 ms if it comes first.
    Ok(addr)
}
