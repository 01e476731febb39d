//! The webhook deliverer: POSTs the deliveries of the outbox (`ledger::webhooks`) to their endpoints, signed.
//!
//! Each request carries the stored JSON body as it is and these headers:
//!
//! | header | value |
//! |--------|-------|
//! | `Ledger-Delivery-Id` | the delivery's id (also the body's `id`): the same on every attempt, for the receiver to deduplicate |
//! | `Ledger-Event` | `alert.fired` |
//! | `Ledger-Signature` | `t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>" keyed with the endpoint's secret>` |
//!
//! A receiver recomputes the HMAC over the timestamp, a dot and the raw body, compares in constant time, and
//! refuses a timestamp older than a few minutes (a captured request cannot be replayed later); README has a
//! Python snippet. A 2xx answer delivers; anything else (or no answer within [`DELIVERY_TIMEOUT_MS`]) is retried
//! as `ledger::webhooks::WebhookPolicy` says. Endpoints on loopback, private, link-local or otherwise
//! non-public addresses are refused unless allowed (`LEDGER_WEBHOOK_ALLOW_PRIVATE`): a portfolio owner must not
//! be able to make the ledger call into its own network. The address checked is the one connected to.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use futures::StreamExt;
use hmac::{Hmac, Mac};
use ledger::webhooks::{self, Attempt, DueDelivery, WebhookPolicy};
use sha2::Sha256;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::http::client::{Client, Target};

/// Longest wait for an endpoint's answer (connect, send, status line).
pub const DELIVERY_TIMEOUT_MS: u64 = 10_000;
/// Deliveries in flight at once per deliverer, and claimed at once: each attempt ends within
/// [`DELIVERY_TIMEOUT_MS`], so a batch ends well within its lease.
pub const DELIVERIES_IN_FLIGHT_MAX: usize = 16;
/// How often a deliverer looks for due deliveries besides being woken by a new one (`webhook_due`).
pub const POLL_INTERVAL_MS: u64 = 500;
/// Wait before looking again after PostgreSQL failed.
const DATABASE_RETRY_MS: u64 = 1_000;
/// The notification a new delivery sends (see the migration).
const DUE_CHANNEL: &str = "webhook_due";

#[derive(Debug, Clone)]
pub struct WebhookConfig {
    pub policy: WebhookPolicy,
    /// Deliver to loopback, private and link-local addresses too (tests; a ledger inside a trusted network).
    pub allow_private_targets: bool,
    pub poll_interval: Duration,
    /// Certificates (PEM) trusted for `https://` endpoints besides the Mozilla roots: a private CA's.
    pub ca_file: Option<std::path::PathBuf>,
    /// How long a claimed delivery is held before another deliverer may attempt it again (a deliverer that
    /// stopped mid-call leaves its deliveries to the lease's end).
    pub lease: Duration,
}

impl Default for WebhookConfig {
    fn default() -> Self {
        Self {
            policy: WebhookPolicy::default(),
            allow_private_targets: false,
            poll_interval: Duration::from_millis(POLL_INTERVAL_MS),
            ca_file: None,
            lease: Duration::from_secs(webhooks::LEASE_SECONDS_DEFAULT),
        }
    }
}

pub struct Deliverer {
    pool: PgPool,
    config: WebhookConfig,
    client: Client,
}

impl Deliverer {
    /// Fails if the CA file cannot be read.
    pub fn new(pool: PgPool, config: WebhookConfig) -> anyhow::Result<Self> {
        let client = Client::new(config.ca_file.as_deref()).map_err(|e| anyhow::anyhow!("webhooks: {e}"))?;
        Ok(Self { pool, config, client })
    }

    /// Delivers until `cancel` fires (attempts in flight then are left to their lease, and retried).
    pub async fn run(self, cancel: CancellationToken) -> anyhow::Result<()> {
        tokio::select! {
            _ = cancel.cancelled() => Ok(()),
            () = self.deliver_forever() => Ok(()),
        }
    }

    async fn deliver_forever(&self) {
        let mut wake = self.listen().await;
        loop {
            match webhooks::claim_due(&self.pool, DELIVERIES_IN_FLIGHT_MAX as i64, self.config.lease).await {
                Ok(due) if !due.is_empty() => {
                    futures::stream::iter(due)
                        .for_each_concurrent(DELIVERIES_IN_FLIGHT_MAX, |due| self.deliver(due))
                        .await;
                    continue;
                }
                Ok(_) => {}
                Err(error) => {
                    tracing::warn!(%error, "webhooks: claiming deliveries failed");
                    tokio::time::sleep(Duration::from_millis(DATABASE_RETRY_MS)).await;
                    continue;
                }
            }
            // Nothing due: wait for a new delivery's notification, or poll (retries become due by time).
            match wake.as_mut() {
                Some(listener) => {
                    if let Ok(Err(error)) = tokio::time::timeout(self.config.poll_interval, listener.recv()).await {
                        tracing::debug!(%error, "webhooks: LISTEN connection lost; polling");
                        wake = None;
                    }
                }
                None => {
                    tokio::time::sleep(self.config.poll_interval).await;
                    wake = self.listen().await;
                }
            }
        }
    }

    async fn listen(&self) -> Option<sqlx::postgres::PgListener> {
        let mut listener = sqlx::postgres::PgListener::connect_with(&self.pool).await.ok()?;
        listener.listen(DUE_CHANNEL).await.ok()?;
        Some(listener)
    }

    async fn deliver(&self, due: DueDelivery) {
        let attempt = self.attempt(&due).await;
        let now = chrono::Utc::now();
        match webhooks::record(&self.pool, &due, &attempt, &self.config.policy, now).await {
            Ok(status) => tracing::info!(delivery = %due.delivery_id, attempts = due.attempts, ?attempt, status,
                "webhook attempt"),
            // The lease runs out and the delivery is attempted again: at least once.
            Err(error) => tracing::warn!(delivery = %due.delivery_id, %error, "webhooks: recording an attempt failed"),
        }
    }

    /// One attempt, resolving the host included, within [`DELIVERY_TIMEOUT_MS`].
    async fn attempt(&self, due: &DueDelivery) -> Attempt {
        let limit = Duration::from_millis(DELIVERY_TIMEOUT_MS);
        match tokio::time::timeout(limit, self.attempt_unbounded(due)).await {
            Ok(attempt) => attempt,
            Err(_) => Attempt::Failed { status: None, error: format!("no answer within {DELIVERY_TIMEOUT_MS} ms") },
        }
    }

    async fn attempt_unbounded(&self, due: &DueDelivery) -> Attempt {
        let failed = |error: String| Attempt::Failed { status: None, error };
        let target = match Target::parse(&due.url) {
            Ok(target) => target,
            Err(error) => return failed(error),
        };
        let addresses = match self.addresses(&target).await {
            Ok(addresses) => addresses,
            Err(error) => return failed(error),
        };
        let timestamp = chrono::Utc::now().timestamp();
        let headers = [
            ("ledger-delivery-id", due.delivery_id.to_string()),
            ("ledger-event", "alert.fired".to_string()),
            ("ledger-signature", signature(&due.secret, timestamp, &due.body)),
            ("user-agent", concat!("ledger-webhooks/", env!("CARGO_PKG_VERSION")).to_string()),
        ];
        let body = bytes::Bytes::from(due.body.clone());
        match self.client.post(&target, &addresses, &headers, body, Duration::from_millis(DELIVERY_TIMEOUT_MS)).await {
            Ok(status) if status.is_success() => Attempt::Delivered { status: status.as_u16() },
            Ok(status) => Attempt::Failed { status: Some(status.as_u16()), error: format!("HTTP {status}") },
            Err(error) => failed(error),
        }
    }

    /// The addresses to connect to (tried in turn): those the host resolves to, without the non-public ones
    /// unless they are allowed.
    async fn addresses(&self, target: &Target) -> Result<Vec<SocketAddr>, String> {
        let mut addresses = target.resolve().await?;
        if !self.config.allow_private_targets {
            addresses.retain(|a| is_public(a.ip()));
        }
        if addresses.is_empty() {
            return Err(format!(
                "{} resolves only to non-public addresses (LEDGER_WEBHOOK_ALLOW_PRIVATE allows them)",
                target.host
            ));
        }
        Ok(addresses)
    }
}

/// `t=<timestamp>,v1=<hex HMAC-SHA256("<timestamp>.<body>")>`.
pub fn signature(secret: &str, timestamp: i64, body: &str) -> String {
    // HMAC takes a key of any length.
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC accepts any key length");
    mac.update(format!("{timestamp}.").as_bytes());
    mac.update(body.as_bytes());
    format!("t={timestamp},v1={}", hex_string(&mac.finalize().into_bytes()))
}

fn hex_string(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether an address is on the public internet: not loopback, private, link-local, shared (CGNAT), reserved,
/// benchmarking, documentation, multicast, broadcast or unspecified; for IPv6 also not unique-local, site-local,
/// or one of the forms that carry an IPv4 address (mapped and compatible ones are judged by that address; NAT64
/// and 6to4 are refused outright, as they could reach any IPv4 address).
fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, c, _] = v4.octets();
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                || a == 0
                || a >= 240
                || (a == 100 && (64..128).contains(&b))
                || (a == 192 && b == 0 && c == 0)
                || (a == 198 && (b == 18 || b == 19)))
        }
        IpAddr::V6(v6) => {
            let segments = v6.segments();
            if segments[..6].iter().all(|s| *s == 0) && !v6.is_loopback() && !v6.is_unspecified() {
                // IPv4-compatible (::a.b.c.d).
                return is_public(IpAddr::V4(std::net::Ipv4Addr::from(v6.to_bits() as u32)));
            }
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public(IpAddr::V4(v4));
            }
            let first = segments[0];
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (first & 0xfe00) == 0xfc00
                || (first & 0xffc0) == 0xfe80
                || (first & 0xffc0) == 0xfec0
                || first == 0x2002
                || (first == 0x0064 && segments[1] == 0xff9b))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_is_hmac_sha256_of_timestamp_dot_body() {
        // Independent check: `printf '%s' '1700000000.{"a":1}' | openssl dgst -sha256 -hmac secret`.
        assert_eq!(
            signature("secret", 1_700_000_000, r#"{"a":1}"#),
            "t=1700000000,v1=49f24e537407743fa4a0242bb63b94b9a47ee99cbbe071ccd8a22550ae411686"
        );
    }

    #[test]
    fn only_public_addresses_are_public() {
        for private in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "100.64.0.1",
            "::1",
            "fc00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
        ] {
            assert!(!is_public(private.parse().unwrap()), "{private}");
        }
        for public in ["93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946", "::ffff:93.184.216.34"] {
            assert!(is_public(public.parse().unwrap()), "{public}");
        }
    }
}
