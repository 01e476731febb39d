//! Kafka for tests: the shared broker of the test run, brokers a test owns (to stop and restart them), fresh
//! topic names, and an independent consumer that reads a topic the way any client would.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use ledger::kafka::KafkaConfig;
use ledger::relay::{headers, Envelope};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use tokio::process::{Child, Command};

/// The broker started by `scripts/test` (`KAFKA_BROKERS`).
pub fn brokers() -> String {
    std::env::var("KAFKA_BROKERS").unwrap_or_else(|_| {
        panic!(
            "Kafka tests need a broker: run ./scripts/test, or start one with \
             `eval $(scripts/kafka-broker.sh start)` and export KAFKA_BROKERS"
        )
    })
}

/// Topics named for one test, on the shared broker.
pub fn fresh_config(brokers: &str) -> KafkaConfig {
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    let mut config = KafkaConfig::new(brokers);
    config.events_topic = format!("test.events.{suffix}");
    config.prices_topic = format!("test.prices.{suffix}");
    config.dead_letter_topic = format!("test.dlq.{suffix}");
    config.partitions = 4;
    config
}

fn nisshi_bin() -> PathBuf {
    std::env::var_os("NISSHI_BIN").map(PathBuf::from).unwrap_or_else(|| {
        let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_default();
        home.join(".cache/nisshi-0.8.1/bin/nisshi")
    })
}

/// A broker process owned by one test, with PostgreSQL storage so that it keeps its topics across restarts.
pub struct OwnedBroker {
    pub port: u16,
    storage_url: String,
    storage_db: String,
    workdir: tempdir::Dir,
    child: Option<Child>,
}

mod tempdir {
    pub struct Dir(pub std::path::PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

impl OwnedBroker {
    pub async fn start() -> OwnedBroker {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let storage_db = format!("nisshi_test_{}", uuid::Uuid::new_v4().simple());
        let admin = super::admin_url();
        let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&admin).await.unwrap();
        sqlx::query(&format!("create database {storage_db}")).execute(&mut conn).await.unwrap();
        let storage_url = format!("{}/{storage_db}?sslmode=disable", admin.rsplit_once('/').unwrap().0);
        let workdir = std::env::temp_dir().join(format!("nisshi-{port}"));
        std::fs::create_dir_all(&workdir).unwrap();
        let mut broker = OwnedBroker { port, storage_url, storage_db, workdir: tempdir::Dir(workdir), child: None };
        broker.resume().await;
        broker
    }

    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Starts the process (again) on the same port and storage; returns when the port accepts connections.
    pub async fn resume(&mut self) {
        let log = std::fs::File::create(self.workdir.0.join("broker.log")).unwrap();
        let child = Command::new(nisshi_bin())
            .current_dir(&self.workdir.0)
            .args(["broker", "--listener-url", &format!("tcp://127.0.0.1:{}", self.port)])
            .args(["--advertised-listener-url", &format!("tcp://127.0.0.1:{}", self.port)])
            .args(["--storage-engine", &self.storage_url, "--group-initial-rebalance-delay", "0s"])
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("start nisshi (run ./scripts/test once to install it, or set NISSHI_BIN)");
        self.child = Some(child);
        for _ in 0..200 {
            if tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("nisshi did not open port {}", self.port);
    }

    /// Kills the process (SIGKILL) and waits for it to exit.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().await.ok();
        }
    }

    pub async fn stop(mut self) {
        self.kill().await;
        if let Ok(mut conn) = <sqlx::PgConnection as sqlx::Connection>::connect(&super::admin_url()).await {
            let statement = format!("drop database if exists {} with (force)", self.storage_db);
            let _ = sqlx::query(&statement).execute(&mut conn).await;
        }
    }
}

/// One message as an independent consumer sees it.
#[derive(Debug, Clone)]
pub struct Consumed {
    pub key: String,
    pub partition: i32,
    pub sequence_header: i64,
    pub envelope: Envelope,
}

/// Reads `topic` from the beginning under a fresh group until every `(aggregate_id, sequence)` in `expected`
/// has been seen (or `timeout`); returns everything read, in the order read per partition.
pub async fn consume_until(
    brokers: &str,
    topic: &str,
    expected: &HashSet<(String, i64)>,
    timeout: Duration,
) -> Vec<Consumed> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("test-reader-{}", uuid::Uuid::new_v4()))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    let mut seen = HashSet::new();
    let mut messages = Vec::new();
    let deadline = tokio::time::Instant::now() + timeout;
    while !expected.is_subset(&seen) {
        let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
        if remaining.is_zero() {
            break;
        }
        let message = match tokio::time::timeout(remaining, consumer.recv()).await {
            Ok(Ok(message)) => message,
            Ok(Err(error)) => panic!("consumer error: {error}"),
            Err(_) => break,
        };
        let key = String::from_utf8(message.key().unwrap_or_default().to_vec()).unwrap();
        let envelope = Envelope::decode(message.payload().unwrap_or_default()).expect("a JSON envelope");
        let sequence_header = message
            .headers()
            .and_then(|h| h.iter().find(|h| h.key == headers::SEQUENCE).and_then(|h| h.value))
            .map(|v| String::from_utf8_lossy(v).parse().unwrap())
            .expect("a sequence header");
        seen.insert((envelope.aggregate_id.clone(), envelope.sequence));
        messages.push(Consumed { key, partition: message.partition(), sequence_header, envelope });
    }
    messages
}

/// Checks what a consumer read against what was committed: nothing missing, nothing foreign, and per key
/// the sequences never go backwards except to repeat one already seen (a duplicate), nor skip ahead.
/// Returns the number of duplicates.
pub fn check_mirror(committed: &[(String, i64)], consumed: &[Consumed]) -> Result<usize, String> {
    let mut last: HashMap<&str, i64> = HashMap::new();
    let mut partition_of: HashMap<&str, i32> = HashMap::new();
    let mut seen = HashSet::new();
    let mut duplicates = 0;
    for message in consumed {
        let envelope = &message.envelope;
        if message.key != envelope.aggregate_id || message.sequence_header != envelope.sequence {
            return Err(format!("key or headers disagree with the body: {message:?}"));
        }
        let partition = *partition_of.entry(message.key.as_str()).or_insert(message.partition);
        if partition != message.partition {
            return Err(format!("key {} seen on partitions {partition} and {}", message.key, message.partition));
        }
        let max = last.entry(envelope.aggregate_id.as_str()).or_insert(0);
        if envelope.sequence <= *max {
            duplicates += 1;
        } else if envelope.sequence == *max + 1 {
            *max = envelope.sequence;
        } else {
            return Err(format!("{} jumped from #{} to #{}", envelope.aggregate_id, max, envelope.sequence));
        }
        seen.insert((envelope.aggregate_id.clone(), envelope.sequence));
    }
    let expected: HashSet<(String, i64)> = committed.iter().cloned().collect();
    let missing: Vec<_> = expected.difference(&seen).take(5).collect();
    if !missing.is_empty() {
        return Err(format!("{} committed events missing, e.g. {missing:?}", expected.difference(&seen).count()));
    }
    let foreign = seen.difference(&expected).count();
    if foreign > 0 {
        return Err(format!("{foreign} unexpected events on the topic"));
    }
    Ok(duplicates)
}

/// A group's lag on a topic: Σ over partitions of (high watermark − committed offset); a partition without a
/// committed offset counts from its low watermark.
pub fn group_lag(brokers: &str, group: &str, topic: &str) -> i64 {
    use rdkafka::consumer::BaseConsumer;
    use rdkafka::{Offset, TopicPartitionList};
    let timeout = Duration::from_secs(10);
    let consumer: BaseConsumer =
        ClientConfig::new().set("bootstrap.servers", brokers).set("group.id", group).create().expect("consumer");
    let metadata = consumer.fetch_metadata(Some(topic), timeout).expect("metadata");
    let partitions: Vec<i32> = metadata.topics()[0].partitions().iter().map(|p| p.id()).collect();
    let mut list = TopicPartitionList::new();
    for &partition in &partitions {
        list.add_partition(topic, partition);
    }
    let committed = consumer.committed_offsets(list, timeout).expect("committed offsets");
    partitions
        .iter()
        .map(|&partition| {
            let (low, high) = consumer.fetch_watermarks(topic, partition, timeout).expect("watermarks");
            match committed.find_partition(topic, partition).map(|p| p.offset()) {
                Some(Offset::Offset(offset)) => high - offset,
                _ => high - low,
            }
        })
        .sum()
}

/// A member of a consumer group that holds partitions and never commits: what a SIGKILLed worker looks like
/// to the group until its session times out. Leaves the group when dropped.
pub struct IdleMember {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl IdleMember {
    /// Joins `group` on `topic` (cooperative-sticky, like the workers) and returns once it holds partitions.
    pub fn join(brokers: &str, group: &str, topic: &str) -> Self {
        use rdkafka::consumer::BaseConsumer;
        use std::sync::atomic::{AtomicBool, Ordering};
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("partition.assignment.strategy", "cooperative-sticky")
            .set("session.timeout.ms", "10000")
            .set("heartbeat.interval.ms", "1000")
            .create()
            .expect("consumer");
        consumer.subscribe(&[topic]).expect("subscribe");
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let (joined_tx, joined_rx) = std::sync::mpsc::channel();
        let thread = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut joined = false;
                while !stop.load(Ordering::SeqCst) {
                    let _ = consumer.poll(Duration::from_millis(100));
                    if !joined && consumer.assignment().map(|a| a.count() > 0).unwrap_or(false) {
                        joined = true;
                        let _ = joined_tx.send(());
                    }
                }
                consumer.unsubscribe();
                for _ in 0..20 {
                    let _ = consumer.poll(Duration::from_millis(50));
                }
            })
        };
        joined_rx.recv_timeout(super::CONDITION_WAIT_MAX).expect("the idle member was assigned partitions");
        Self { stop, thread: Some(thread) }
    }
}

impl Drop for IdleMember {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
