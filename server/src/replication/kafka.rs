//! The Kafka clients of replication: the topic (one partition used), a
//! reader of partition 0 from an offset, and the producer thread that sends
//! the primary's records, its heartbeats and promotions.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam::channel::{Receiver, RecvTimeoutError, Sender};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::{Offset, TopicPartitionList};

use super::envelope::{Envelope, Kind};
use super::{Replica, ReplicationConfig, Role};
use crate::shard::now_ms;

/// How this node's replication clients name themselves to the brokers
/// (their logs and quotas; the tests' proxy cuts one node off by it).
pub fn client_id(node: u64) -> String {
    format!("stockd-{node}")
}

/// Creates the topic with one partition unless it exists.
pub fn create_topic(cfg: &ReplicationConfig) -> Result<(), String> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &cfg.brokers)
        .create()
        .map_err(|e| format!("kafka admin client: {e}"))?;
    let topic = NewTopic::new(&cfg.topic, 1, TopicReplication::Fixed(cfg.topic_replication));
    let opts = AdminOptions::new().request_timeout(Some(Duration::from_secs(10)));
    let results = futures_executor::block_on(admin.create_topics([&topic], &opts))
        .map_err(|e| format!("kafka: creating topic {}: {e}", cfg.topic))?;
    for r in results {
        match r {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => return Err(format!("kafka: creating topic {topic}: {code}")),
        }
    }
    Ok(())
}

/// The reader's client context: reaching the end of the partition is news
/// (the reader is caught up), not an error to log.
pub struct ReaderContext;

impl ClientContext for ReaderContext {
    fn error(&self, error: KafkaError, reason: &str) {
        let end =
            matches!(error, KafkaError::PartitionEOF(_) | KafkaError::Global(RDKafkaErrorCode::PartitionEOF));
        if !end {
            tracing::warn!(error = %error, "replication: kafka: {reason}");
        }
    }
}

impl ConsumerContext for ReaderContext {}

/// A reader of partition 0 from `offset`. It reports reaching the end of
/// the partition (`PartitionEOF`), which says the reader is caught up.
pub fn reader(
    cfg: &ReplicationConfig,
    node: u64,
    offset: i64,
) -> Result<BaseConsumer<ReaderContext>, String> {
    let consumer: BaseConsumer<ReaderContext> = ClientConfig::new()
        .set("bootstrap.servers", &cfg.brokers)
        .set("client.id", client_id(node))
        .set("group.id", format!("stockd-replica-{node}"))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        // An offset the topic no longer holds is an error, never a silent jump.
        .set("auto.offset.reset", "error")
        // A broker that does not answer a waiting fetch when data arrives
        // (tansu) makes every read-back wait this long. (fetch.min.bytes
        // 16 KiB, to fetch less often under load, measured no better here.)
        .set("fetch.wait.max.ms", "2")
        .set("socket.nagle.disable", "true")
        .create_with_context(ReaderContext)
        .map_err(|e| format!("kafka consumer: {e}"))?;
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(&cfg.topic, 0, Offset::Offset(offset)).map_err(|e| e.to_string())?;
    consumer.assign(&tpl).map_err(|e| format!("kafka: reading {}: {e}", cfg.topic))?;
    Ok(consumer)
}

/// What the producer thread sends.
pub enum Outgoing {
    /// Data messages in LSN order: (first lsn, last lsn, bytes).
    Data(Vec<(u64, u64, Vec<u8>)>),
    /// A promotion of this node to the epoch in the envelope.
    Promote(Vec<u8>),
}

struct Reports;

impl ClientContext for Reports {}

impl ProducerContext for Reports {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if let Err((e, _)) = result {
            // With message.timeout.ms=0 the producer retries until a fatal
            // error; then records the readers wait for may be missing, and
            // nothing is acknowledged any more. Stop, as a failed fsync
            // does: a restart resends from the topic's confirmed end.
            tracing::error!(error = %e, "replication: the producer failed; aborting");
            std::process::abort();
        }
    }
}

/// The producer thread: data and promotions as they come, a heartbeat
/// whenever this node is the primary and has sent nothing for a while.
pub struct ProducerThread {
    pub tx: Sender<Outgoing>,
    pub thread: JoinHandle<()>,
}

pub fn spawn_producer(cfg: &ReplicationConfig, replica: Arc<Replica>) -> Result<ProducerThread, String> {
    let producer: BaseProducer<Reports> = ClientConfig::new()
        .set("bootstrap.servers", &cfg.brokers)
        .set("client.id", client_id(replica.node))
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("message.timeout.ms", "0")
        .set("linger.ms", "1")
        .set("socket.nagle.disable", "true")
        .set("queue.buffering.max.messages", "1000000")
        .create_with_context(Reports)
        .map_err(|e| format!("kafka producer: {e}"))?;
    // Learn where the partition lives now, so that a standby's first
    // message, its promotion, does not wait for the lookup.
    if let Err(e) = producer.client().fetch_metadata(Some(&cfg.topic), Duration::from_secs(10)) {
        tracing::warn!(error = %e, "replication: kafka metadata of {} (the first message will look again)", cfg.topic);
    }
    let (tx, rx) = crossbeam::channel::unbounded();
    let (topic, every) = (cfg.topic.clone(), cfg.heartbeat_every());
    let thread = std::thread::Builder::new()
        .name("stockd-repl-send".into())
        .spawn(move || produce_loop(&producer, &topic, every, &replica, rx))
        .map_err(|e| e.to_string())?;
    Ok(ProducerThread { tx, thread })
}

fn produce_loop(
    producer: &BaseProducer<Reports>,
    topic: &str,
    every: Duration,
    replica: &Replica,
    rx: Receiver<Outgoing>,
) {
    let mut last_lsn = 0;
    let mut last_sent = Instant::now();
    loop {
        match rx.recv_timeout(every.min(Duration::from_millis(50))) {
            Ok(Outgoing::Data(records)) => {
                for (_, last, bytes) in records {
                    send(producer, topic, &bytes);
                    last_lsn = last;
                }
                last_sent = Instant::now();
            }
            Ok(Outgoing::Promote(bytes)) => send(producer, topic, &bytes),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break,
        }
        if replica.role() == Role::Primary && last_sent.elapsed() >= every {
            let hb = Envelope {
                kind: Kind::Heartbeat,
                epoch: replica.epoch(),
                lsn: last_lsn,
                ts_ms: now_ms(),
                node: replica.node,
                body: b"",
            };
            send(producer, topic, &hb.to_vec());
            last_sent = Instant::now();
        }
        producer.poll(Duration::ZERO);
    }
    if let Err(e) = producer.flush(Duration::from_secs(5)) {
        tracing::warn!(error = %e, "replication: records unsent at shutdown; the topic's readers never see them");
    }
}

fn send(producer: &BaseProducer<Reports>, topic: &str, bytes: &[u8]) {
    loop {
        match producer.send(BaseRecord::<(), [u8], ()>::with_opaque_to(topic, ()).partition(0).payload(bytes))
        {
            Ok(()) => return,
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                producer.poll(Duration::from_millis(5));
            }
            Err((e, _)) => {
                tracing::error!(error = %e, "replication: cannot queue a record; aborting");
                std::process::abort();
            }
        }
    }
}
