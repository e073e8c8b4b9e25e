//! The HTTPS event uplink (DESIGN.md §3), for clouds without MQTT: the event log after the
//! durable cursor `https` is POSTed in batches as `{"site_id", "events": [...]}`, signed
//! `X-Unitgate-Signature: t=<unix>,v1=<hex HMAC-SHA256 of "t.body">`. Only a 2xx advances
//! the cursor (to the batch's last seq), so a batch is either acknowledged or sent again:
//! delivery is at-least-once, in seq order, and a receiver deduplicates by `seq` (or `id`).
//!
//! Failures back off, capped exponential with jitter: 429 waits its `Retry-After`; 5xx,
//! timeouts and connection errors retry from 250 ms up to 30 s; any other 4xx (a refused
//! signature, a wrong URL) is a configuration problem and retries from 30 s up to 10 min,
//! so a misconfigured endpoint is not hammered. Commits wake the uplink; it also polls
//! every second (events written outside commands, e.g. access and device events).

use super::Links;
use super::webhooks::{SIGNATURE_HEADER, sign};
use crate::command::Executor;
use crate::config::HttpsUplinkConfig;
use crate::domain::Event;
use crate::failpoint;
use crate::secret::{Secret, SecretFileError, read_secret_file};
use crate::store::{StoreError, cloud, events};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Notify, watch};

/// The uplink's name in `Links` and its cursor name.
pub const NAME: &str = "https";

/// Errors setting the uplink up.
#[derive(Debug, thiserror::Error)]
pub enum UplinkError {
    /// The secret file cannot be used.
    #[error("cloud.https_uplink.secret_file {0}")]
    Secret(#[from] SecretFileError),
    /// The HTTP client cannot be built.
    #[error("cloud.https_uplink: {0}")]
    Client(String),
}

/// How a delivery attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// 2xx: the batch is acknowledged.
    Delivered,
    /// 429 / 5xx / timeout / connection error: retry soon (after `retry_after` if given).
    Transient {
        /// What happened.
        error: String,
        /// The server's `Retry-After`.
        retry_after: Option<Duration>,
    },
    /// Another 4xx: the endpoint refuses us; retry much later.
    Refused(String),
}

/// Capped exponential backoff with jitter (each wait uniform in [base/2, base]).
#[derive(Debug, Clone)]
pub struct Backoff {
    first: Duration,
    cap: Duration,
    attempt: u32,
}

impl Backoff {
    /// Starts at `first`, doubling to at most `cap`.
    pub fn new(first: Duration, cap: Duration) -> Self {
        Backoff {
            first,
            cap,
            attempt: 0,
        }
    }

    /// The next wait.
    pub fn next_wait(&mut self) -> Duration {
        let base = self
            .first
            .saturating_mul(1u32 << self.attempt.min(20))
            .min(self.cap);
        self.attempt = self.attempt.saturating_add(1);
        base.mul_f64(0.5 + rand::random::<f64>() * 0.5)
    }

    /// Back to the first wait.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// Longest `Retry-After` honoured as given.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// `Retry-After`: delay-seconds or an HTTP date (relative to `now`).
pub fn parse_retry_after(v: &str, now: chrono::DateTime<chrono::Utc>) -> Option<Duration> {
    let v = v.trim();
    let d = match v.parse::<u64>() {
        Ok(s) => Duration::from_secs(s),
        Err(_) => {
            let at = chrono::DateTime::parse_from_rfc2822(v).ok()?;
            (at.with_timezone(&chrono::Utc) - now)
                .to_std()
                .unwrap_or(Duration::ZERO)
        }
    };
    Some(d.min(MAX_RETRY_AFTER))
}

/// The HTTPS uplink task.
pub struct HttpsUplink {
    url: String,
    secret: Secret,
    batch: u32,
    client: reqwest::Client,
    executor: Executor,
    links: Links,
    committed: Arc<Notify>,
}

impl HttpsUplink {
    /// Reads the secret and builds the client.
    pub fn new(
        cfg: &HttpsUplinkConfig,
        executor: Executor,
        links: Links,
        committed: Arc<Notify>,
    ) -> Result<Self, UplinkError> {
        let secret = read_secret_file(&cfg.secret_file)?;
        let client = reqwest::Client::builder()
            .timeout(Duration::from_millis(cfg.timeout_ms))
            .connect_timeout(Duration::from_millis(cfg.timeout_ms.min(10_000)))
            .user_agent(concat!("unitgate/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| UplinkError::Client(e.to_string()))?;
        links.add(NAME);
        Ok(HttpsUplink {
            url: cfg.url.clone(),
            secret,
            batch: cfg.batch.max(1),
            client,
            executor,
            links,
            committed,
        })
    }

    /// Sends one batch and says how it went.
    async fn post(&self, events: &[Event]) -> Outcome {
        let body = serde_json::json!({"site_id": self.executor.site_id(), "events": events});
        let body = match serde_json::to_vec(&body) {
            Ok(b) => b,
            Err(e) => return Outcome::Refused(format!("cannot encode the batch: {e}")),
        };
        let t = self.executor.now().timestamp();
        let res = self
            .client
            .post(&self.url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(SIGNATURE_HEADER, sign(self.secret.expose(), t, &body))
            .body(body)
            .send()
            .await;
        let res = match res {
            Ok(r) => r,
            Err(e) => {
                let kind = if e.is_timeout() {
                    "timeout"
                } else {
                    "connection failed"
                };
                return Outcome::Transient {
                    error: format!("{kind}: {}", without_url(&e)),
                    retry_after: None,
                };
            }
        };
        let status = res.status();
        if status.is_success() {
            return Outcome::Delivered;
        }
        let retry_after = res
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, chrono::Utc::now()));
        let error = format!("HTTP {}", status.as_u16());
        if status.as_u16() == 429 || status.is_server_error() || status.as_u16() == 408 {
            Outcome::Transient { error, retry_after }
        } else {
            Outcome::Refused(error)
        }
    }

    /// Delivers until shutdown.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let mut transient = Backoff::new(Duration::from_millis(250), Duration::from_secs(30));
        let mut refused = Backoff::new(Duration::from_secs(30), Duration::from_secs(600));
        let store = self.executor.store().clone();
        let mut delivered = store
            .read(|c| cloud::cursor(c, NAME))
            .await
            .unwrap_or_default();
        self.links.update(NAME, |s| s.delivered_seq = delivered);
        loop {
            if *shutdown.borrow() {
                return;
            }
            // Registered before the read, so a commit during it is not missed.
            let notified = self.committed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();

            let (after, batch) = (delivered, self.batch);
            let site = self.executor.site_id().to_owned();
            let pending = store
                .read(move |c| -> Result<Vec<Event>, StoreError> {
                    events::list(c, &site, after, batch)
                })
                .await;
            let wait = match pending {
                Err(e) => {
                    tracing::warn!(error = %e, "https uplink: cannot read the event log");
                    Some(Duration::from_secs(1))
                }
                Ok(evs) if evs.is_empty() => None,
                Ok(evs) => {
                    let last = evs.last().map_or(after, |e| e.seq);
                    match self.post(&evs).await {
                        Outcome::Delivered => {
                            let recorded =
                                match failpoint::check(failpoint::UPLINK_CURSOR_BEFORE) {
                                    Ok(()) => {
                                        store
                                            .write(move |c| cloud::advance_cursor(c, NAME, last))
                                            .await
                                    }
                                    Err(e) => Err(StoreError::from(e)),
                                }
                                .and_then(|()| {
                                    failpoint::check(failpoint::UPLINK_CURSOR_AFTER)
                                        .map_err(StoreError::from)
                                });
                            match recorded {
                                Ok(()) => {
                                    delivered = last;
                                    transient.reset();
                                    refused.reset();
                                    let now = self.executor.now();
                                    self.links.set_connected(NAME, true, None, now);
                                    self.links.update(NAME, |s| s.delivered_seq = last);
                                    tracing::debug!(
                                        seq = last,
                                        n = evs.len(),
                                        "https uplink: batch delivered"
                                    );
                                    continue;
                                }
                                Err(e) => {
                                    // Sent again later: the receiver deduplicates by seq.
                                    tracing::error!(error = %e, "https uplink: cannot record the cursor");
                                    Some(Duration::from_secs(1))
                                }
                            }
                        }
                        Outcome::Transient { error, retry_after } => {
                            refused.reset();
                            let backoff = transient.next_wait();
                            let wait = retry_after.unwrap_or(backoff);
                            tracing::warn!(%error, wait_ms = wait.as_millis() as u64, "https uplink: delivery failed; retrying");
                            self.links
                                .set_connected(NAME, false, Some(error), self.executor.now());
                            Some(wait)
                        }
                        Outcome::Refused(error) => {
                            let wait = refused.next_wait();
                            tracing::error!(%error, wait_s = wait.as_secs(), "https uplink: the endpoint refuses our batches; check the URL and secret");
                            self.links
                                .set_connected(NAME, false, Some(error), self.executor.now());
                            Some(wait)
                        }
                    }
                }
            };
            match wait {
                // Failing: wait out the backoff (commits do not shorten it).
                Some(d) => tokio::select! {
                    r = shutdown.changed() => if r.is_err() || *shutdown.borrow() { return; },
                    _ = tokio::time::sleep(d) => {}
                },
                None => tokio::select! {
                    r = shutdown.changed() => if r.is_err() || *shutdown.borrow() { return; },
                    _ = &mut notified => {}
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                },
            }
        }
    }
}

/// A reqwest error without its URL (the URL may carry a token in its query).
fn without_url(e: &reqwest::Error) -> String {
    let mut s = e.to_string();
    if let Some(u) = e.url() {
        s = s.replace(u.as_str(), "<url>");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_up_to_the_cap() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(1000));
        let waits: Vec<_> = (0..8).map(|_| b.next_wait()).collect();
        for (i, w) in waits.iter().enumerate() {
            let base = Duration::from_millis(100 << i).min(Duration::from_millis(1000));
            assert!(*w >= base / 2 && *w <= base, "attempt {i}: {w:?}");
        }
        b.reset();
        assert!(b.next_wait() <= Duration::from_millis(100));
    }

    #[test]
    fn retry_after_takes_seconds_or_a_date_and_is_capped() {
        let now: chrono::DateTime<chrono::Utc> = "2026-03-10T12:00:00Z".parse().unwrap();
        assert_eq!(parse_retry_after("3", now), Some(Duration::from_secs(3)));
        assert_eq!(
            parse_retry_after("Tue, 10 Mar 2026 12:00:07 GMT", now),
            Some(Duration::from_secs(7))
        );
        assert_eq!(parse_retry_after("99999999", now), Some(MAX_RETRY_AFTER));
        assert_eq!(parse_retry_after("soon", now), None);
    }
}
