//! Kafka: an event per committed mutation on `{prefix}.events`, and each
//! changed row's level on `{prefix}.levels` (compacted), produced by an
//! idempotent producer with acks=all. Delivery reports move the cursor; the
//! runner keeps it in the data directory.
//!
//! The producer never gives up on a message (`message.timeout.ms=0`): while
//! the brokers are away it retries and the backlog waits in the log, since
//! the sink stops taking batches once [`MAX_PENDING`] messages wait.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};

use crate::events::{self, Message, Topic};
use crate::levels::Levels;
use crate::sink::{Batch, Sink, SinkError};

/// Messages waiting for the producer's queue or a delivery report beyond
/// which the sink takes no more batches.
pub const MAX_PENDING: usize = 200_000;

#[derive(Clone, Debug)]
pub struct KafkaConfig {
    /// `host:port[,host:port...]`
    pub brokers: String,
    /// Topics are `{prefix}.events` and `{prefix}.levels`.
    pub topic_prefix: String,
    /// Partitions of topics this sink creates.
    pub partitions: i32,
    /// Replication factor of topics this sink creates.
    pub replication: i32,
}

impl KafkaConfig {
    pub fn events_topic(&self) -> String {
        format!("{}.events", self.topic_prefix)
    }

    pub fn levels_topic(&self) -> String {
        format!("{}.levels", self.topic_prefix)
    }
}

/// Delivery reports, collected while the producer is polled.
#[derive(Default)]
struct Reports(Mutex<Vec<(u64, Option<String>)>>);

impl ClientContext for Reports {}

impl ProducerContext for Reports {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, lsn: usize) {
        let outcome = result.as_ref().err().map(|(e, _)| e.to_string());
        self.0.lock().unwrap_or_else(|p| p.into_inner()).push((lsn as u64, outcome));
    }
}

pub struct KafkaSink {
    cfg: KafkaConfig,
    events_topic: String,
    levels_topic: String,
    producer: Option<BaseProducer<Reports>>,
    /// Messages not yet accepted by the producer, in LSN order.
    waiting: VecDeque<(u64, Topic, Message)>,
    /// Per LSN: its messages without a delivery report.
    outstanding: BTreeMap<u64, u32>,
    /// Every record through this LSN has all its messages handed over.
    handed_through: u64,
    confirmed: Option<u64>,
    failed: Option<String>,
    /// Scratch buffers for one message's key and value.
    scratch: (String, Vec<u8>),
}

impl KafkaSink {
    pub fn new(cfg: KafkaConfig) -> KafkaSink {
        KafkaSink {
            events_topic: cfg.events_topic(),
            levels_topic: cfg.levels_topic(),
            cfg,
            producer: None,
            waiting: VecDeque::new(),
            outstanding: BTreeMap::new(),
            handed_through: 0,
            confirmed: None,
            failed: None,
            scratch: Default::default(),
        }
    }

    fn create_topics(&self) -> Result<(), SinkError> {
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", &self.cfg.brokers)
            .create()
            .map_err(|e| SinkError::Unavailable(format!("kafka admin client: {e}")))?;
        let replication = TopicReplication::Fixed(self.cfg.replication);
        let topics = [
            NewTopic::new(&self.events_topic, self.cfg.partitions, replication),
            NewTopic::new(
                &self.levels_topic,
                self.cfg.partitions,
                TopicReplication::Fixed(self.cfg.replication),
            )
            .set("cleanup.policy", "compact"),
        ];
        let opts = AdminOptions::new().request_timeout(Some(Duration::from_secs(5)));
        let results = futures_executor::block_on(admin.create_topics(&topics, &opts))
            .map_err(|e| SinkError::Unavailable(format!("kafka create topics: {e}")))?;
        for r in results {
            match r {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((topic, code)) => {
                    return Err(SinkError::Unavailable(format!("kafka create topic {topic}: {code}")))
                }
            }
        }
        Ok(())
    }

    fn topic_name(&self, topic: Topic) -> &str {
        match topic {
            Topic::Events => &self.events_topic,
            Topic::Levels => &self.levels_topic,
        }
    }

    /// Hands one message to the producer, or queues a copy while the
    /// producer's queue is full (or earlier messages still wait: order).
    fn offer(&mut self, lsn: u64, topic: Topic, key: &str, value: &[u8]) -> Result<(), SinkError> {
        *self.outstanding.entry(lsn).or_insert(0) += 1;
        if self.waiting.is_empty() {
            let producer = self
                .producer
                .as_ref()
                .ok_or_else(|| SinkError::Unavailable("kafka: not connected".into()))?;
            let name = self.topic_name(topic);
            match producer.send(BaseRecord::with_opaque_to(name, lsn as usize).key(key).payload(value)) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {}
                Err((e, _)) => return Err(SinkError::Unavailable(format!("kafka produce: {e}"))),
            }
        }
        self.waiting.push_back((lsn, topic, (key.to_string(), value.to_vec())));
        Ok(())
    }

    /// Hands waiting messages to the producer until its queue is full, then
    /// serves the delivery reports that have come; returns the LSN through
    /// which every message is delivered.
    fn pump(&mut self) -> Result<u64, SinkError> {
        let producer =
            self.producer.as_ref().ok_or_else(|| SinkError::Unavailable("kafka: not connected".into()))?;
        while let Some((lsn, topic, (key, value))) = self.waiting.front() {
            let record =
                BaseRecord::with_opaque_to(self.topic_name(*topic), *lsn as usize).key(key).payload(value);
            match producer.send(record) {
                Ok(()) => {
                    self.waiting.pop_front();
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => break,
                Err((e, _)) => return Err(SinkError::Unavailable(format!("kafka produce: {e}"))),
            }
        }
        // With a zero timeout `poll` serves one event (the delivery report of
        // one request): poll until no report comes.
        let reports_now = || producer.context().0.lock().unwrap_or_else(|p| p.into_inner()).len();
        loop {
            let before = reports_now();
            producer.poll(Duration::ZERO);
            if reports_now() == before {
                break;
            }
        }
        let reports = std::mem::take(&mut *producer.context().0.lock().unwrap_or_else(|p| p.into_inner()));
        for (lsn, outcome) in reports {
            if let Some(e) = outcome {
                self.failed.get_or_insert(format!("kafka delivery of LSN {lsn}: {e}"));
            }
            if let Some(n) = self.outstanding.get_mut(&lsn) {
                *n -= 1;
                if *n == 0 {
                    self.outstanding.remove(&lsn);
                }
            }
        }
        if let Some(e) = self.failed.take() {
            return Err(SinkError::Unavailable(e));
        }
        Ok(match self.outstanding.first_key_value() {
            Some((lsn, _)) => lsn - 1,
            None => self.handed_through,
        })
    }

    /// Moves the confirmed cursor to what [`KafkaSink::pump`] found.
    fn confirm(&mut self, delivered: Result<u64, SinkError>) -> Result<u64, SinkError> {
        let cursor = delivered?.max(self.confirmed.unwrap_or(0));
        self.confirmed = Some(cursor);
        Ok(cursor)
    }
}

impl Sink for KafkaSink {
    fn name(&self) -> &'static str {
        "kafka"
    }

    fn connect(&mut self, local: Option<u64>) -> Result<Option<u64>, SinkError> {
        // Whatever the old producer still held is sent again from the cursor.
        self.producer = None;
        self.waiting.clear();
        self.outstanding.clear();
        self.failed = None;
        self.create_topics()?;
        let producer: BaseProducer<Reports> = ClientConfig::new()
            .set("bootstrap.servers", &self.cfg.brokers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("message.timeout.ms", "0")
            .set("linger.ms", "2")
            // Nagle with delayed ACKs held produce requests back ~40 ms.
            .set("socket.nagle.disable", "true")
            .set("queue.buffering.max.messages", "100000")
            .create_with_context(Reports::default())
            .map_err(|e| SinkError::Unavailable(format!("kafka producer: {e}")))?;
        self.producer = Some(producer);
        let cursor = match (local, self.confirmed) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        self.handed_through = cursor.unwrap_or(0);
        Ok(cursor)
    }

    fn resync(&mut self, levels: &Levels) -> Result<u64, SinkError> {
        let lsn = levels.lsn();
        for (row, level) in levels.iter() {
            let (key, value) = events::level(row, level, lsn);
            self.offer(lsn, Topic::Levels, &key, &value)?;
        }
        self.handed_through = lsn;
        // Nothing counts as delivered until every level is.
        self.confirmed = None;
        while !(self.waiting.is_empty() && self.outstanding.is_empty()) {
            self.pump()?;
            std::thread::sleep(Duration::from_millis(1));
        }
        self.confirmed = Some(lsn);
        Ok(lsn)
    }

    fn ready(&mut self) -> bool {
        self.waiting.len() + self.outstanding.len() < MAX_PENDING
    }

    fn deliver(&mut self, batch: &Batch) -> Result<u64, SinkError> {
        let (mut key, mut value) = std::mem::take(&mut self.scratch);
        let mut result = Ok(());
        for c in &batch.changes {
            events::messages(c, &mut key, &mut value, |topic, k, v| {
                if result.is_ok() {
                    result = self.offer(c.lsn, topic, k, v);
                }
            });
        }
        self.scratch = (key, value);
        result?;
        self.handed_through = batch.through_lsn;
        let delivered = self.pump();
        self.confirm(delivered)
    }

    fn idle(&mut self) -> Result<u64, SinkError> {
        // Never a timeout: `poll` spins through the last millisecond of one;
        // the runner sleeps between calls instead.
        let delivered = self.pump();
        self.confirm(delivered)
    }
}
