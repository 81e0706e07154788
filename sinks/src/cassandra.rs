//! Cassandra / ScyllaDB write-behind: every row's level in `stock_by_item`,
//! each row's history in `stock_movements`, and the sink's cursor in
//! `sink_cursor`, written with the `scylla` driver (CQL protocol v4+).
//!
//! Every write carries `USING TIMESTAMP <lsn>`: Cassandra keeps the cell with
//! the highest timestamp, so a replayed or reordered write can never replace
//! a newer one, and a batch written twice (at least once) changes nothing.
//! LSNs compare only within one server's log: one keyspace per stockd
//! server (the cursor table is keyed by server id to catch a mix-up).
//!
//! What a batch writes is decided by [`writes`], a pure function with unit
//! tests; [`CassandraSink`] only executes it. The schema is
//! `docs/cassandra.cql` (a test checks it is the one [`schema`] creates).

use std::time::Duration;

use futures_util::stream::{self, TryStreamExt};
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use scylla::statement::prepared::PreparedStatement;
use scylla::value::CqlTimestamp;
use stockd_protocol::Key;
use stockd_record::Op;

use crate::events::event_type;
use crate::levels::{rows_changed, KeyMap, Level, Levels};
use crate::sink::{Batch, Sink, SinkError};

/// Writes in flight at once.
const CONCURRENCY: usize = 64;

#[derive(Clone, Debug)]
pub struct CassandraConfig {
    /// `host:port` of one or more nodes.
    pub nodes: Vec<String>,
    /// An existing keyspace; the sink creates its tables in it.
    pub keyspace: String,
}

/// The tables, in the order to create them, for keyspace `ks`.
pub fn schema(ks: &str) -> [String; 3] {
    [
        format!(
            "CREATE TABLE IF NOT EXISTS {ks}.stock_by_item (\n    vendor_item_id bigint,\n    fulfillment_center_id bigint,\n    available bigint,\n    on_hand bigint,\n    held bigint,\n    lsn bigint,\n    updated_at timestamp,\n    PRIMARY KEY (vendor_item_id, fulfillment_center_id)\n)"
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS {ks}.stock_movements (\n    vendor_item_id bigint,\n    fulfillment_center_id bigint,\n    lsn bigint,\n    type text,\n    id bigint,\n    delta bigint,\n    available_after bigint,\n    on_hand_after bigint,\n    held_after bigint,\n    committed_at timestamp,\n    PRIMARY KEY ((vendor_item_id, fulfillment_center_id), lsn)\n) WITH CLUSTERING ORDER BY (lsn DESC)"
        ),
        format!("CREATE TABLE IF NOT EXISTS {ks}.sink_cursor (\n    server_id bigint PRIMARY KEY,\n    lsn bigint\n)"),
    ]
}

fn insert_level(ks: &str) -> String {
    format!(
        "INSERT INTO {ks}.stock_by_item (vendor_item_id, fulfillment_center_id, available, on_hand, held, lsn, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?) USING TIMESTAMP ?"
    )
}

fn insert_movement(ks: &str) -> String {
    format!(
        "INSERT INTO {ks}.stock_movements (vendor_item_id, fulfillment_center_id, lsn, type, id, delta, available_after, on_hand_after, held_after, committed_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) USING TIMESTAMP ?"
    )
}

fn insert_cursor(ks: &str) -> String {
    format!("INSERT INTO {ks}.sink_cursor (server_id, lsn) VALUES (?, ?) USING TIMESTAMP ?")
}

fn select_cursor(ks: &str) -> String {
    format!("SELECT lsn FROM {ks}.sink_cursor WHERE server_id = ?")
}

/// One write of a batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Write {
    /// A row's level after the batch (its last change in it).
    Level { key: Key, level: Level, lsn: u64, ts_ms: u64 },
    /// What one record did to one row.
    Movement { key: Key, lsn: u64, kind: &'static str, id: Option<u64>, delta: i64, after: Level, ts_ms: u64 },
}

/// What a batch writes: a movement per row each record changed, in LSN
/// order, then each changed row's last level.
pub fn writes(batch: &Batch) -> Vec<Write> {
    let mut out = Vec::new();
    let mut last: KeyMap<usize> = KeyMap::default();
    let mut levels: Vec<Write> = Vec::new();
    for c in &batch.changes {
        let id = match c.mutation.op {
            Op::Adjust { .. } => None,
            _ => Some(c.mutation.owner_id()),
        };
        for (key, before, after) in rows_changed(&c.lines) {
            let delta = after.available() as i128 - before.available() as i128;
            out.push(Write::Movement {
                key,
                lsn: c.lsn,
                kind: event_type(&c.mutation.op),
                id,
                delta: delta as i64,
                after,
                ts_ms: c.ts_ms,
            });
            let level = Write::Level { key, level: after, lsn: c.lsn, ts_ms: c.ts_ms };
            match last.get(&key) {
                Some(&i) => levels[i] = level,
                None => {
                    last.insert(key, levels.len());
                    levels.push(level);
                }
            }
        }
    }
    out.extend(levels);
    out
}

/// stockd's unsigned integers in CQL `bigint` columns: the same 64 bits
/// (values above 2^63 - 1 read back negative).
fn big(v: u64) -> i64 {
    v as i64
}

struct Prepared {
    level: PreparedStatement,
    movement: PreparedStatement,
    cursor: PreparedStatement,
}

pub struct CassandraSink {
    cfg: CassandraConfig,
    server_id: u64,
    runtime: tokio::runtime::Runtime,
    session: Option<(Session, Prepared)>,
    /// The cursor as last written.
    confirmed: u64,
}

fn unavailable(what: &str, e: impl std::fmt::Display) -> SinkError {
    SinkError::Unavailable(format!("cassandra {what}: {e}"))
}

impl CassandraConfig {
    /// A clear error for a configuration no node could accept.
    pub fn check(&self) -> Result<(), String> {
        if self.nodes.is_empty() {
            return Err("--cassandra-nodes names no node".into());
        }
        if self.keyspace.is_empty() || !self.keyspace.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!("--cassandra-keyspace {:?}: letters, digits and _ only", self.keyspace));
        }
        Ok(())
    }
}

impl CassandraSink {
    pub fn new(cfg: CassandraConfig, server_id: u64) -> Result<CassandraSink, String> {
        cfg.check()?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("cassandra runtime: {e}"))?;
        Ok(CassandraSink { cfg, server_id, runtime, session: None, confirmed: 0 })
    }

    fn execute_all(&mut self, writes: Vec<Write>, cursor: u64) -> Result<u64, SinkError> {
        let (session, prepared) =
            self.session.as_ref().ok_or_else(|| SinkError::Unavailable("cassandra: not connected".into()))?;
        let server_id = big(self.server_id);
        let done = self.runtime.block_on(async {
            stream::iter(writes.into_iter().map(Ok::<_, SinkError>))
                .map_ok(|w| async move {
                    match w {
                        Write::Level { key, level, lsn, ts_ms } => session
                            .execute_unpaged(
                                &prepared.level,
                                (
                                    big(key.item),
                                    i64::from(key.fc),
                                    big(level.available()),
                                    big(level.on_hand),
                                    big(level.held),
                                    big(lsn),
                                    CqlTimestamp(big(ts_ms)),
                                    big(lsn),
                                ),
                            )
                            .await
                            .map_err(|e| unavailable("write stock_by_item", e)),
                        Write::Movement { key, lsn, kind, id, delta, after, ts_ms } => session
                            .execute_unpaged(
                                &prepared.movement,
                                (
                                    big(key.item),
                                    i64::from(key.fc),
                                    big(lsn),
                                    kind,
                                    id.map(big),
                                    delta,
                                    big(after.available()),
                                    big(after.on_hand),
                                    big(after.held),
                                    CqlTimestamp(big(ts_ms)),
                                    big(lsn),
                                ),
                            )
                            .await
                            .map_err(|e| unavailable("write stock_movements", e)),
                    }
                })
                .try_buffer_unordered(CONCURRENCY)
                .try_for_each(|_| async { Ok(()) })
                .await?;
            // The cursor only after everything before it is in.
            session
                .execute_unpaged(&prepared.cursor, (server_id, big(cursor), big(cursor)))
                .await
                .map_err(|e| unavailable("write sink_cursor", e))?;
            Ok(cursor)
        })?;
        self.confirmed = done;
        Ok(done)
    }
}

impl Sink for CassandraSink {
    fn name(&self) -> &'static str {
        "cassandra"
    }

    fn connect(&mut self, _local: Option<u64>) -> Result<Option<u64>, SinkError> {
        self.session = None;
        let ks = self.cfg.keyspace.clone();
        let nodes = self.cfg.nodes.clone();
        let server_id = big(self.server_id);
        let (session, prepared, cursor) = self.runtime.block_on(async {
            let session = SessionBuilder::new()
                .known_nodes(&nodes)
                .connection_timeout(Duration::from_secs(5))
                .build()
                .await
                .map_err(|e| unavailable("connect", e))?;
            for ddl in schema(&ks) {
                session.query_unpaged(ddl, ()).await.map_err(|e| unavailable("create table", e))?;
            }
            let prepare = |q: String| {
                let session = &session;
                async move { session.prepare(q).await.map_err(|e| unavailable("prepare", e)) }
            };
            let prepared = Prepared {
                level: prepare(insert_level(&ks)).await?,
                movement: prepare(insert_movement(&ks)).await?,
                cursor: prepare(insert_cursor(&ks)).await?,
            };
            let rows = session
                .query_unpaged(select_cursor(&ks), (server_id,))
                .await
                .map_err(|e| unavailable("read sink_cursor", e))?
                .into_rows_result()
                .map_err(|e| unavailable("read sink_cursor", e))?;
            let cursor = rows
                .maybe_first_row::<(i64,)>()
                .map_err(|e| unavailable("read sink_cursor", e))?
                .map(|(lsn,)| lsn as u64);
            Ok::<_, SinkError>((session, prepared, cursor))
        })?;
        self.session = Some((session, prepared));
        self.confirmed = cursor.unwrap_or(0);
        Ok(cursor)
    }

    fn resync(&mut self, levels: &Levels) -> Result<u64, SinkError> {
        let lsn = levels.lsn();
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let writes =
            levels.iter().map(|(key, level)| Write::Level { key, level, lsn, ts_ms: now_ms }).collect();
        self.execute_all(writes, lsn)
    }

    fn deliver(&mut self, batch: &Batch) -> Result<u64, SinkError> {
        self.execute_all(writes(batch), batch.through_lsn)
    }

    fn idle(&mut self) -> Result<u64, SinkError> {
        // Writes are confirmed when deliver returns: nothing is pending.
        Ok(self.confirmed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::Change;
    use stockd_protocol::Line;
    use stockd_record::Mutation;

    #[test]
    fn a_batch_writes_a_movement_per_changed_row_and_each_row_s_last_level() {
        let k = |item, fc| Key { item, fc };
        let mut levels = Levels::new(0, [(k(1, 1), Level { on_hand: 10, held: 0 })]);
        let mut changes = Vec::new();
        for (lsn, op, lines) in [
            (1, Op::Order { id: 7 }, vec![Line::new(1, 1, 2), Line::new(2, 1, 0), Line::new(1, 1, 1)]),
            (2, Op::Reserve { id: 8, ttl_ms: 100 }, vec![Line::new(1, 1, 4)]),
            (3, Op::Adjust { before: 0, after: 5, reason: 1 }, vec![Line::new(2, 1, 0)]),
        ] {
            let mutation = Mutation { op, lines: lines.into() };
            let lines = levels.apply(lsn, &mutation);
            changes.push(Change { lsn, ts_ms: 100 + lsn, mutation, lines });
        }
        let w = writes(&Batch { after_lsn: 0, through_lsn: 3, changes });
        let after = |on_hand, held| Level { on_hand, held };
        let mv = |key, lsn, kind, id, delta, a| Write::Movement {
            key,
            lsn,
            kind,
            id,
            delta,
            after: a,
            ts_ms: 100 + lsn,
        };
        assert_eq!(
            w,
            vec![
                mv(k(1, 1), 1, "order", Some(7), -3, after(7, 0)),
                mv(k(2, 1), 1, "order", Some(7), 0, after(0, 0)),
                mv(k(1, 1), 2, "reserve", Some(8), -4, after(7, 4)),
                mv(k(2, 1), 3, "adjust", None, 5, after(5, 0)),
                Write::Level { key: k(1, 1), level: after(7, 4), lsn: 2, ts_ms: 102 },
                Write::Level { key: k(2, 1), level: after(5, 0), lsn: 3, ts_ms: 103 },
            ]
        );
    }

    #[test]
    fn every_write_carries_the_lsn_as_its_timestamp() {
        for q in [insert_level("ks"), insert_movement("ks"), insert_cursor("ks")] {
            assert!(q.ends_with("USING TIMESTAMP ?"), "{q}");
            // One bind marker per column, and one for the timestamp.
            let columns = q.split('(').nth(1).unwrap().split(')').next().unwrap().split(',').count();
            assert_eq!(q.matches('?').count(), columns + 1, "{q}");
            assert!(q.starts_with("INSERT INTO ks."), "{q}");
        }
    }

    #[test]
    fn docs_cassandra_cql_is_the_schema_the_sink_creates() {
        let doc = include_str!("../../docs/cassandra.cql");
        for ddl in schema("stockd") {
            assert!(doc.contains(&format!("{ddl};")), "docs/cassandra.cql lacks:\n{ddl};");
        }
    }

    #[test]
    fn a_keyspace_name_is_checked_before_it_reaches_a_statement() {
        // `new` checks and builds a runtime; it connects to nothing.
        let cfg = |ks: &str| CassandraConfig { nodes: vec!["127.0.0.1:1".into()], keyspace: ks.into() };
        assert!(CassandraSink::new(cfg("stock; DROP TABLE x"), 1).is_err());
        assert!(CassandraSink::new(cfg(""), 1).is_err());
        assert!(CassandraSink::new(CassandraConfig { nodes: vec![], keyspace: "ks".into() }, 1).is_err());
        assert!(CassandraSink::new(cfg("stockd_1"), 1).is_ok());
    }
}
