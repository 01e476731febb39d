//! Kafka settings shared by the relay, the projection workers and the market-data feed, and topic creation.
//!
//! The code speaks only the Kafka protocol through rdkafka (bundled librdkafka 2.12), so Apache Kafka, the
//! nisshi broker used in tests, or librdkafka's in-process mock cluster (the demo's default) all work.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::producer::{BaseProducer, Producer};
use rdkafka::types::RDKafkaErrorCode;

/// Topic the relay mirrors the event log to.
pub const EVENTS_TOPIC_DEFAULT: &str = "ledger.events";
/// Topic of market-data ticks (key = symbol).
pub const PRICES_TOPIC_DEFAULT: &str = "market.prices";
/// Topic where consumers put messages they cannot decode or apply, with the error.
pub const DEAD_LETTER_TOPIC_DEFAULT: &str = "ledger.dead-letter";
/// Partitions of topics the ledger creates (the upper bound on a consumer group's parallelism).
pub const PARTITIONS_DEFAULT: i32 = 8;
/// How long topic creation may take before it is reported as failed.
pub const ADMIN_TIMEOUT_MS: u64 = 15_000;

#[derive(Debug, Clone)]
pub struct KafkaConfig {
    /// `host:port[,host:port…]`.
    pub brokers: String,
    pub events_topic: String,
    pub prices_topic: String,
    pub dead_letter_topic: String,
    pub partitions: i32,
    pub replication_factor: i32,
}

impl KafkaConfig {
    pub fn new(brokers: impl Into<String>) -> Self {
        Self {
            brokers: brokers.into(),
            events_topic: EVENTS_TOPIC_DEFAULT.to_string(),
            prices_topic: PRICES_TOPIC_DEFAULT.to_string(),
            dead_letter_topic: DEAD_LETTER_TOPIC_DEFAULT.to_string(),
            partitions: PARTITIONS_DEFAULT,
            replication_factor: 1,
        }
    }

    /// A client configuration with the brokers set; callers add their role's settings.
    pub fn client_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &self.brokers).set("client.id", "ledger");
        config
    }

    /// The cluster's id, as the brokers report it (asked through a short-lived client).
    pub async fn cluster_id(&self, timeout: Duration) -> Result<String, KafkaError> {
        let client: BaseProducer = self.client_config().create()?;
        tokio::task::spawn_blocking(move || client.client().fetch_cluster_id(timeout))
            .await
            .map_err(|_| KafkaError::Canceled)?
            .ok_or(KafkaError::MetadataFetch(RDKafkaErrorCode::OperationTimedOut))
    }

    /// Creates the events, prices and dead-letter topics if they do not exist.
    pub async fn ensure_topics(&self) -> Result<(), KafkaError> {
        let admin: AdminClient<DefaultClientContext> = self.client_config().create()?;
        let topics: Vec<NewTopic<'_>> = [&self.events_topic, &self.prices_topic, &self.dead_letter_topic]
            .into_iter()
            .map(|name| NewTopic::new(name, self.partitions, TopicReplication::Fixed(self.replication_factor)))
            .collect();
        let options = AdminOptions::new().operation_timeout(Some(Duration::from_millis(ADMIN_TIMEOUT_MS)));
        for result in admin.create_topics(&topics, &options).await? {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((topic, code)) => {
                    tracing::error!(%topic, ?code, "creating topic failed");
                    return Err(KafkaError::AdminOp(code));
                }
            }
        }
        Ok(())
    }
}

/// How long closing a consumer may take before [`close_off_runtime`] stops waiting for it.
pub const CONSUMER_CLOSE_WAIT_MAX_MS: u64 = 10_000;

/// Drops `consumer` (closing it: leaving its group, revoking its partitions) on a thread of its own, waiting
/// for that at most [`CONSUMER_CLOSE_WAIT_MAX_MS`].
///
/// librdkafka's close blocks its thread, and has been seen to block it forever: a revocation during the close
/// (`incremental_unassign` in the rebalance callback) waited on the group coordinator without end. On a
/// runtime thread that stalls every task scheduled there (and a blocking-pool thread would keep the runtime
/// from shutting down), so the close runs on a detached thread and whoever stops the consumer goes on.
pub async fn close_off_runtime<T: Send + 'static>(consumer: T, what: &'static str) {
    let (closed, done) = tokio::sync::oneshot::channel::<()>();
    let closing = std::thread::Builder::new().name(format!("close-{what}")).spawn(move || {
        drop(consumer);
        let _ = closed.send(());
    });
    if let Err(error) = closing {
        tracing::warn!(what, %error, "no thread to close the Kafka consumer on; it was closed here");
        return;
    }
    if tokio::time::timeout(Duration::from_millis(CONSUMER_CLOSE_WAIT_MAX_MS), done).await.is_err() {
        tracing::warn!(what, "closing the Kafka consumer has not finished; it goes on in the background");
    }
}
