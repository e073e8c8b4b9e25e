//! Message-level security for the MQTT command topics (`signed_commands = true`), for
//! brokers we do not trust: every command is wrapped as
//! `{"client_id", "nonce": <int>, "hmac": "<hex>", "request": {...}}` where
//! `hmac = HMAC-SHA256(client key, operation "\n" nonce "\n" <request bytes as sent>)`.
//! The MAC is checked in constant time over the raw bytes of `request` (no re-encoding);
//! each nonce is taken once per client, durably, within a window below the client's highest
//! (`store::cloud::take_nonce`), so a replay is refused even after a restart.

use crate::config::MqttClientConfig;
use crate::secret::{Secret, read_secret_file};
use hmac::{Hmac, Mac};
use serde::Deserialize;
use serde_json::value::RawValue;
use sha2::Sha256;
use std::collections::HashMap;

/// Shortest key accepted, bytes.
pub const MIN_KEY_BYTES: usize = 32;

/// A cloud client's key could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The key file cannot be read or is empty.
    #[error("cloud.mqtt.clients {id}: key_file {source}")]
    Read {
        /// Client id.
        id: String,
        /// Cause (names the file).
        source: crate::secret::SecretFileError,
    },
    /// The key is too short.
    #[error(
        "cloud.mqtt.clients {id}: key_file {path} holds {len} bytes, at least {MIN_KEY_BYTES} are needed"
    )]
    Short {
        /// Client id.
        id: String,
        /// The file.
        path: String,
        /// Its length.
        len: usize,
    },
}

/// Why a signed command is refused (mapped to the contract's error codes by the dispatcher).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// The envelope is not `{"client_id", "nonce", "hmac", "request"}`.
    #[error("a signed command is {{\"client_id\", \"nonce\", \"hmac\", \"request\"}}: {0}")]
    Malformed(String),
    /// Unknown client or a MAC that does not verify (not told apart, on purpose).
    #[error("unknown client or bad signature")]
    Unauthorized,
    /// The client may not call this operation.
    #[error("client {client} may not call {operation}")]
    Forbidden {
        /// Client id.
        client: String,
        /// Operation.
        operation: String,
    },
}

struct CloudClient {
    key: Secret,
    operations: Vec<String>,
}

/// The configured cloud clients and their keys. `Debug` names the clients, never keys.
#[derive(Default)]
pub struct CloudClients(HashMap<String, CloudClient>);

impl std::fmt::Debug for CloudClients {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.0.keys()).finish()
    }
}

/// A command whose signature verified; its nonce is still to be taken.
#[derive(Debug)]
pub struct Verified<'a> {
    /// The signing client.
    pub client_id: String,
    /// Its nonce.
    pub nonce: i64,
    /// The request object, as received.
    pub request: &'a RawValue,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Envelope<'a> {
    client_id: String,
    nonce: i64,
    hmac: String,
    #[serde(borrow)]
    request: &'a RawValue,
}

/// The MAC of a command, as a cloud client computes it.
pub fn sign(key: &[u8], operation: &str, nonce: i64, request: &[u8]) -> String {
    let mut mac = new_mac(key);
    feed(&mut mac, operation, nonce, request);
    hex::encode(mac.finalize().into_bytes())
}

fn new_mac(key: &[u8]) -> Hmac<Sha256> {
    // HMAC takes keys of any length; `new_from_slice` cannot fail for it.
    <Hmac<Sha256> as Mac>::new_from_slice(key).unwrap_or_else(|_| unreachable!())
}

fn feed(mac: &mut Hmac<Sha256>, operation: &str, nonce: i64, request: &[u8]) {
    mac.update(operation.as_bytes());
    mac.update(b"\n");
    mac.update(nonce.to_string().as_bytes());
    mac.update(b"\n");
    mac.update(request);
}

impl CloudClients {
    /// Reads every client's key file (one trailing newline is not part of the key).
    pub fn load(clients: &[MqttClientConfig]) -> Result<Self, KeyError> {
        let mut out = HashMap::new();
        for c in clients {
            let key = read_secret_file(&c.key_file).map_err(|source| KeyError::Read {
                id: c.id.clone(),
                source,
            })?;
            if key.len() < MIN_KEY_BYTES {
                return Err(KeyError::Short {
                    id: c.id.clone(),
                    path: c.key_file.display().to_string(),
                    len: key.len(),
                });
            }
            out.insert(
                c.id.clone(),
                CloudClient {
                    key,
                    operations: c.operations.clone(),
                },
            );
        }
        Ok(CloudClients(out))
    }

    /// From keys in memory (tests).
    pub fn from_keys(clients: impl IntoIterator<Item = (String, Vec<u8>, Vec<String>)>) -> Self {
        CloudClients(
            clients
                .into_iter()
                .map(|(id, key, operations)| {
                    let key = Secret::new(key);
                    (id, CloudClient { key, operations })
                })
                .collect(),
        )
    }

    /// Checks the envelope's MAC (constant time) and the client's right to `operation`.
    pub fn verify<'a>(
        &self,
        operation: &str,
        payload: &'a [u8],
    ) -> Result<Verified<'a>, SignatureError> {
        let env: Envelope<'a> = serde_json::from_slice(payload)
            .map_err(|e| SignatureError::Malformed(e.to_string()))?;
        let mac_bytes = hex::decode(&env.hmac).map_err(|_| SignatureError::Unauthorized)?;
        let client = self
            .0
            .get(&env.client_id)
            .ok_or(SignatureError::Unauthorized)?;
        let mut mac = new_mac(client.key.expose());
        feed(&mut mac, operation, env.nonce, env.request.get().as_bytes());
        mac.verify_slice(&mac_bytes)
            .map_err(|_| SignatureError::Unauthorized)?;
        if !client.operations.iter().any(|o| o == "*" || o == operation) {
            return Err(SignatureError::Forbidden {
                client: env.client_id,
                operation: operation.to_owned(),
            });
        }
        Ok(Verified {
            client_id: env.client_id,
            nonce: env.nonce,
            request: env.request,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn clients() -> CloudClients {
        CloudClients::from_keys([
            ("cloud".into(), KEY.to_vec(), vec!["*".into()]),
            ("reader".into(), KEY.to_vec(), vec!["get_unit".into()]),
        ])
    }

    fn envelope(client: &str, nonce: i64, mac: &str, request: &str) -> Vec<u8> {
        format!(r#"{{"client_id":"{client}","nonce":{nonce},"hmac":"{mac}","request":{request}}}"#)
            .into_bytes()
    }

    #[test]
    fn the_mac_covers_the_request_bytes_as_sent() {
        // Whitespace and key order are kept: the MAC is over the bytes, not a re-encoding.
        let req = r#"{ "request_id": "r1",  "tenancy_id": "t" }"#;
        let mac = sign(KEY, "reserve", 7, req.as_bytes());
        let body = envelope("cloud", 7, &mac, req);
        let v = clients().verify("reserve", &body).expect("verifies");
        assert_eq!((v.client_id.as_str(), v.nonce), ("cloud", 7));
        assert_eq!(v.request.get(), req);
        // Another operation, nonce or byte breaks it.
        assert_eq!(
            clients().verify("deallocate", &body).unwrap_err(),
            SignatureError::Unauthorized
        );
        let other = envelope("cloud", 8, &mac, req);
        assert!(clients().verify("reserve", &other).is_err());
        let other = envelope("cloud", 7, &mac, &req.replace("t\"", "u\""));
        assert!(clients().verify("reserve", &other).is_err());
    }

    #[test]
    fn a_trailing_newline_in_the_key_file_is_not_part_of_the_key() {
        // `echo KEY > file` adds one; the cloud signs with the key alone (found by interop).
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cloud.key");
        std::fs::write(&path, [KEY, b"\n"].concat()).unwrap();
        let loaded = CloudClients::load(&[MqttClientConfig {
            id: "cloud".into(),
            key_file: path,
            operations: vec!["*".into()],
        }])
        .expect("loads");
        let req = r#"{"request_id":"r1"}"#;
        let mac = sign(KEY, "reserve", 1, req.as_bytes());
        assert!(
            loaded
                .verify("reserve", &envelope("cloud", 1, &mac, req))
                .is_ok()
        );
    }

    #[test]
    fn unknown_clients_bad_hex_and_forbidden_operations() {
        let req = r#"{"request_id":"r1"}"#;
        let mac = sign(KEY, "reserve", 1, req.as_bytes());
        assert_eq!(
            clients()
                .verify("reserve", &envelope("nobody", 1, &mac, req))
                .unwrap_err(),
            SignatureError::Unauthorized
        );
        assert_eq!(
            clients()
                .verify("reserve", &envelope("cloud", 1, "zz", req))
                .unwrap_err(),
            SignatureError::Unauthorized
        );
        assert!(matches!(
            clients()
                .verify("reserve", &envelope("reader", 1, &mac, req))
                .unwrap_err(),
            SignatureError::Forbidden { .. }
        ));
        assert!(matches!(
            clients().verify("reserve", b"[1]").unwrap_err(),
            SignatureError::Malformed(_)
        ));
    }
}
