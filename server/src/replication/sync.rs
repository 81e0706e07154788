//! Before recovery: where does this node's log agree with the topic?
//!
//! A record in the local log that the topic's history does not hold was
//! never acknowledged (a primary acknowledges only what it read back), so
//! the log is cut where it stops agreeing: the unsent tail of a primary that
//! crashed, or what a replaced primary logged after the promotion that
//! replaced it. Everything the snapshot holds was applied, hence confirmed,
//! so a cut never reaches below it.

use std::collections::hash_map::DefaultHasher;
use std::hash::Hasher;
use std::path::Path;
use std::time::{Duration, Instant};

use rdkafka::consumer::Consumer;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::Message;
use stockd_persistence::snapshot::read_manifest;
use stockd_persistence::wal;

use super::envelope::Envelope;
use super::follower::{Follower, Step};
use super::{kafka, Cursor, ReplicationConfig};

/// How long reading the topic to its end may take at startup.
const SYNC_LIMIT: Duration = Duration::from_secs(120);

fn digest(payload: &[u8]) -> u64 {
    let mut h = DefaultHasher::new();
    h.write(payload);
    h.finish()
}

/// Cuts the local log where it stops agreeing with the topic; returns where
/// the live reader starts, and whether the topic has had a primary.
pub fn sync(cfg: &ReplicationConfig, dir: &Path, node: u64) -> Result<(Cursor, bool), String> {
    let t = Instant::now();
    let cursor = Cursor::load(dir)?;
    let snapshot_lsn = read_manifest(dir).map_err(|e| e.to_string())?.map_or(0, |m| m.lsn);
    let base = cursor.applied.max(snapshot_lsn);
    // The local records after `base`, by digest.
    let mut local = Vec::new();
    let scanned = wal::scan(dir, base, |r| local.push(digest(r.payload))).map_err(|e| e.to_string())?;
    let local_end = scanned.next_lsn - 1;
    let oldest = wal::list_segments(dir).map_err(|e| e.to_string())?.first().map(|(l, _)| *l);

    kafka::create_topic(cfg)?;
    let consumer = kafka::reader(cfg, node, cursor.offset)?;
    let (low, high) = consumer
        .fetch_watermarks(&cfg.topic, 0, Duration::from_secs(10))
        .map_err(|e| format!("kafka: the end of {}: {e}", cfg.topic))?;
    if cursor.offset < low {
        return Err(format!(
            "the topic {} no longer holds offset {} (it starts at {low}): start this node from a copy of the primary's data directory",
            cfg.topic, cursor.offset
        ));
    }
    let mut f = Follower::new(cursor.epoch, cursor.leader.clone(), cursor.applied);
    let mut agreed = base;
    let mut agreeing = true;
    let mut read = 0u64;
    let mut position = cursor.offset;
    while position < high {
        if t.elapsed() > SYNC_LIMIT {
            return Err(format!("kafka: reading {} to its end took over {SYNC_LIMIT:?}", cfg.topic));
        }
        let m = match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => m,
            Some(Err(KafkaError::PartitionEOF(_))) => break,
            Some(Err(KafkaError::MessageConsumption(RDKafkaErrorCode::OffsetOutOfRange))) => {
                return Err(format!("kafka: offset {} of {} is out of range", position, cfg.topic));
            }
            Some(Err(e)) => {
                tracing::warn!(error = %e, "replication: reading the topic at startup");
                continue;
            }
            None => continue,
        };
        position = m.offset() + 1;
        read += 1;
        let Ok((e, records)) = Envelope::decode(m.payload().unwrap_or_default()) else { continue };
        let Step::Apply { from } = f.step(&e, records.len()) else { continue };
        for (lsn, record) in (e.lsn..).zip(&records).skip(from) {
            if !agreeing || lsn <= base {
                continue;
            }
            let i = (lsn - base - 1) as usize;
            if lsn == agreed + 1 && local.get(i) == Some(&digest(record)) {
                agreed = lsn;
            } else {
                agreeing = false;
            }
        }
    }
    if f.epoch == 0 {
        // No primary ever: nothing was acknowledged through the topic, and
        // this log is where the history will begin.
        if cfg.standby && local_end > 0 {
            return Err(format!(
                "{} holds records (through LSN {local_end}) but the topic {} has no primary yet: start a standby with an empty data directory",
                dir.display(),
                cfg.topic
            ));
        }
        if local_end > 0 && oldest != Some(1) {
            return Err(format!(
                "the log of {} no longer starts at LSN 1 (a snapshot replaced its start), so standbys could not replay it from the topic: replicating an existing data directory like this one is not supported",
                dir.display()
            ));
        }
        tracing::info!(topic = %cfg.topic, local_end, "replication: the topic has no primary yet");
        return Ok((Cursor { applied: 0, ..cursor }, false));
    }
    if local_end > agreed {
        let cut = wal::truncate_after(dir, agreed).map_err(|e| e.to_string())?;
        tracing::warn!(
            cut,
            agreed,
            local_end,
            "replication: cut the log's tail that the topic never confirmed (it was never acknowledged)"
        );
    }
    tracing::info!(
        epoch = f.epoch,
        leader = ?f.leader,
        messages = read,
        agreed,
        ms = t.elapsed().as_millis() as u64,
        "replication: the local log agrees with the topic"
    );
    Ok((Cursor { applied: agreed, ..cursor }, true))
}
