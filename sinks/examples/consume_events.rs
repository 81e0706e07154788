//! A consumer of stockd's `stock.events` topic that applies each event once:
//! it keeps, per key, the highest LSN it has applied and skips anything at
//! or below it (stockd delivers at least once, in LSN order per key).
//!
//! ```sh
//! cargo run -p stockd-sinks --example consume_events -- BROKER_HOST:PORT stock.events
//! ```
//!
//! It reads every partition from the start with `assign` (no consumer group
//! to join) and prints each new event; a real consumer would store its
//! per-key LSNs with what it does with the event.

use std::collections::HashMap;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let Some(brokers) = args.next() else {
        eprintln!("usage: consume_events BROKERS [TOPIC]   (TOPIC defaults to stock.events)");
        std::process::exit(2);
    };
    let topic = args.next().unwrap_or_else(|| "stock.events".into());
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("group.id", "stock-events-example")
        .set("enable.auto.commit", "false")
        .create()?;
    let meta = consumer.fetch_metadata(Some(&topic), Duration::from_secs(10))?;
    let mut partitions = TopicPartitionList::new();
    for p in meta.topics().iter().flat_map(|t| t.partitions()) {
        partitions.add_partition_offset(&topic, p.id(), Offset::Beginning)?;
    }
    consumer.assign(&partitions)?;
    let mut applied: HashMap<(String, String), u64> = HashMap::new();
    loop {
        let Some(message) = consumer.poll(Duration::from_secs(1)) else { continue };
        let message = message?;
        let key = String::from_utf8_lossy(message.key().unwrap_or_default()).into_owned();
        let event: serde_json::Value = serde_json::from_slice(message.payload().unwrap_or_default())?;
        if event["schema_version"] != 1 {
            return Err(
                format!("schema_version {} is not one this consumer knows", event["schema_version"]).into()
            );
        }
        let (lsn, kind) =
            (event["lsn"].as_u64().unwrap_or(0), event["type"].as_str().unwrap_or("").to_string());
        // A derived event shares its mutation's LSN: dedupe per (key, type).
        let last = applied.entry((key.clone(), kind.clone())).or_insert(0);
        if lsn <= *last {
            continue; // delivered again after a crash: already applied
        }
        *last = lsn;
        println!("{kind:>9} key {key:>12} lsn {lsn}: {event}");
    }
}
