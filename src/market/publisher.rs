//! Publishes ticks to `market.prices` (key = symbol, so a symbol's ticks keep their order).

use std::time::Duration;

use rdkafka::error::KafkaError;
use rdkafka::producer::{FutureProducer, FutureRecord};

use super::tick::Tick;
use crate::kafka::KafkaConfig;

/// How long a publish may wait for room in the producer's queue and for the broker's acknowledgement.
pub const PUBLISH_TIMEOUT_MS: u64 = 10_000;

pub struct TickPublisher {
    producer: FutureProducer,
    topic: String,
}

impl TickPublisher {
    pub fn new(kafka: &KafkaConfig) -> Result<Self, KafkaError> {
        let producer = kafka
            .client_config()
            .set("client.id", "ledger-market-data")
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "2")
            .set("message.timeout.ms", PUBLISH_TIMEOUT_MS.to_string())
            .create()?;
        Ok(Self { producer, topic: kafka.prices_topic.clone() })
    }

    /// Publishes one tick and waits for the broker's acknowledgement.
    pub async fn publish(&self, tick: &Tick) -> Result<(), KafkaError> {
        let payload = tick.encode();
        let record = FutureRecord::to(&self.topic).key(tick.symbol.as_str()).payload(payload.as_slice());
        self.producer
            .send(record, Duration::from_millis(PUBLISH_TIMEOUT_MS))
            .await
            .map(|_| ())
            .map_err(|(error, _)| error)
    }

    /// Publishes a batch (all enqueued first, then all awaited).
    pub async fn publish_all(&self, ticks: &[Tick]) -> Result<(), KafkaError> {
        let sends = ticks.iter().map(|tick| self.publish(tick));
        for result in futures::future::join_all(sends).await {
            result?;
        }
        Ok(())
    }
}
