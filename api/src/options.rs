//! Command-line options both binaries take (`ledger` and the lab's `ledger-lab`), so that a setting means the
//! same wherever it is given.

use anyhow::Context;

/// Kafka settings shared by every subcommand that talks to the broker.
#[derive(Debug, Clone, clap::Args)]
pub struct KafkaArgs {
    /// Kafka bootstrap servers (host:port,…). `demo` starts an in-process broker when this is not set.
    #[arg(long = "kafka-brokers", env = "KAFKA_BROKERS", global = true)]
    pub brokers: Option<String>,
    /// Topic the relay mirrors the event log to.
    #[arg(long, env = "LEDGER_EVENTS_TOPIC", default_value = ledger::kafka::EVENTS_TOPIC_DEFAULT, global = true)]
    pub events_topic: String,
    /// Topic of market-data ticks.
    #[arg(long, env = "LEDGER_PRICES_TOPIC", default_value = ledger::kafka::PRICES_TOPIC_DEFAULT, global = true)]
    pub prices_topic: String,
    /// Dead-letter topic for messages consumers cannot process.
    #[arg(long, env = "LEDGER_DEAD_LETTER_TOPIC", default_value = ledger::kafka::DEAD_LETTER_TOPIC_DEFAULT, global = true)]
    pub dead_letter_topic: String,
    /// Partitions of the topics the ledger creates.
    #[arg(long, env = "LEDGER_KAFKA_PARTITIONS", default_value_t = ledger::kafka::PARTITIONS_DEFAULT, global = true)]
    pub kafka_partitions: i32,
    /// Replication factor of the topics the ledger creates.
    #[arg(long, env = "LEDGER_KAFKA_REPLICATION", default_value_t = 1, global = true)]
    pub kafka_replication: i32,
}

impl KafkaArgs {
    /// The Kafka configuration for `brokers`.
    pub fn config(&self, brokers: &str) -> ledger::kafka::KafkaConfig {
        let mut config = ledger::kafka::KafkaConfig::new(brokers);
        config.events_topic = self.events_topic.clone();
        config.prices_topic = self.prices_topic.clone();
        config.dead_letter_topic = self.dead_letter_topic.clone();
        config.partitions = self.kafka_partitions;
        config.replication_factor = self.kafka_replication;
        config
    }

    /// The configured brokers, or an error saying how to set them.
    pub fn required(&self) -> anyhow::Result<ledger::kafka::KafkaConfig> {
        let brokers =
            self.brokers.as_deref().context("set KAFKA_BROKERS (or --kafka-brokers) to the Kafka bootstrap servers")?;
        Ok(self.config(brokers))
    }
}
