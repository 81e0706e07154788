//! The Redis read model: hash `stock:{vendor_item_id}`, field
//! `{fulfillment_center_id}`, value = available, the keys a shop's front end
//! reads with `HGET`/`HGETALL`.
//!
//! Rows are written by one Lua script per batch of up to [`ROWS_PER_CALL`]
//! rows, which checks and advances the cursor key `stockd:{server_id}:lsn`
//! in the same call: the cursor lives in Redis, atomically with the data, so
//! a replayed batch changes nothing and a flushed Redis (no cursor) is
//! noticed and resynced. The script writes keys it builds itself, so it
//! needs a single Redis (or a replicated primary), not Redis Cluster.
//!
//! Only the sink's latest connection writes. A batch of more than
//! [`ROWS_PER_CALL`] rows is several calls, and the cursor moves with the
//! last: in between, rows newer than the cursor are already written. A
//! call left over from a connection the sink gave up on (sent while Redis
//! stalled, run when it came back) could land in that window and write its
//! older levels over them, with nothing after it to repair them. So each
//! connection claims the writer key `stockd:{server_id}:writer` with a
//! token of its own when it connects, every call carries its token, and a
//! call whose token is not the key's writes nothing.

use std::time::Duration;

use redis::{Client, Connection, Script};

use crate::levels::{rows_changed, KeyMap, Levels};
use crate::sink::{Batch, Sink, SinkError};

/// Rows per script call.
pub const ROWS_PER_CALL: usize = 256;

/// KEYS[1]: the cursor, KEYS[2]: the writer key. ARGV: the LSN the batch
/// starts after, the LSN it goes through, whether this call ends the batch
/// (1/0), the connection's writer token, then per row: item, center,
/// available, the row's LSN. Returns -1 when the cursor is missing (a fresh
/// or flushed Redis), -2 when another connection is the writer, else the
/// cursor after the call; a cursor below the batch's start means Redis lost
/// records (an older backup) and nothing is written.
const APPLY: &str = r#"
local cur = redis.call('GET', KEYS[1])
if not cur then return -1 end
if redis.call('GET', KEYS[2]) ~= ARGV[4] then return -2 end
cur = tonumber(cur)
if cur < tonumber(ARGV[1]) then return cur end
for i = 5, #ARGV, 4 do
  if tonumber(ARGV[i + 3]) > cur then
    redis.call('HSET', 'stock:' .. ARGV[i], ARGV[i + 1], ARGV[i + 2])
  end
end
local to = tonumber(ARGV[2])
if ARGV[3] == '1' and to > cur then
  redis.call('SET', KEYS[1], ARGV[2])
  return to
end
return cur
"#;

/// The Redis read model sink.
pub struct RedisSink {
    client: Client,
    conn: Option<Connection>,
    cursor_key: String,
    writer_key: String,
    /// This connection's claim on the writer key (new at each connect).
    token: String,
    script: Script,
}

fn unavailable(what: &str, e: redis::RedisError) -> SinkError {
    SinkError::Unavailable(format!("redis {what}: {e}"))
}

impl RedisSink {
    /// A sink for the Redis at `url` (`redis://host:port/db`), fed by the server `server_id`.
    pub fn new(url: &str, server_id: u64) -> Result<RedisSink, String> {
        let client = check_url(url)?;
        Ok(RedisSink {
            client,
            conn: None,
            cursor_key: cursor_key(server_id),
            writer_key: format!("stockd:{server_id}:writer"),
            token: String::new(),
            script: Script::new(APPLY),
        })
    }

    /// Makes this sink's connection the only one whose calls write.
    fn claim_writer(&mut self) -> Result<(), SinkError> {
        let (key, token) = (self.writer_key.clone(), self.token.clone());
        redis::cmd("SET")
            .arg(key)
            .arg(token)
            .query::<()>(self.conn()?)
            .map_err(|e| unavailable("SET writer", e))
    }

    fn conn(&mut self) -> Result<&mut Connection, SinkError> {
        self.conn.as_mut().ok_or_else(|| SinkError::Unavailable("redis: not connected".into()))
    }
}

/// A clear error for a URL the redis crate cannot use.
pub fn check_url(url: &str) -> Result<Client, String> {
    Client::open(url).map_err(|e| format!("--redis-url {url}: {e}"))
}

/// A token unlike any earlier connection's but for a 2^-64 chance: the
/// clock, hashed under keys std draws at random for each `RandomState`.
fn new_token() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos()),
    );
    format!("{:016x}", h.finish())
}

/// The key holding the last LSN applied to Redis by server `server_id`.
pub fn cursor_key(server_id: u64) -> String {
    format!("stockd:{server_id}:lsn")
}

impl Sink for RedisSink {
    fn name(&self) -> &'static str {
        "redis"
    }

    fn connect(&mut self, _local: Option<u64>) -> Result<Option<u64>, SinkError> {
        self.conn = None;
        let conn = self
            .client
            .get_connection_with_timeout(Duration::from_secs(2))
            .map_err(|e| unavailable("connect", e))?;
        let timeout = Some(Duration::from_secs(10));
        conn.set_read_timeout(timeout)
            .and_then(|_| conn.set_write_timeout(timeout))
            .map_err(|e| unavailable("connect", e))?;
        self.conn = Some(conn);
        // Claimed before the cursor is read: a leftover call of an earlier
        // connection runs before the claim (and the cursor read below
        // sees what it did) or after it (and writes nothing).
        self.token = new_token();
        self.claim_writer()?;
        let cursor: Option<u64> = redis::cmd("GET")
            .arg(&self.cursor_key)
            .query(self.conn()?)
            .map_err(|e| unavailable("GET cursor", e))?;
        Ok(cursor)
    }

    fn resync(&mut self, levels: &Levels) -> Result<u64, SinkError> {
        let lsn = levels.lsn();
        let cursor_key = self.cursor_key.clone();
        // A flushed Redis lost the claim with everything else.
        self.claim_writer()?;
        let conn = self.conn()?;
        let rows: Vec<_> = levels.iter().collect();
        for chunk in rows.chunks(ROWS_PER_CALL) {
            let mut pipe = redis::pipe();
            for (key, level) in chunk {
                pipe.cmd("HSET")
                    .arg(format!("stock:{}", key.item))
                    .arg(key.fc)
                    .arg(level.available())
                    .ignore();
            }
            pipe.query::<()>(conn).map_err(|e| unavailable("resync HSET", e))?;
        }
        redis::cmd("SET")
            .arg(&cursor_key)
            .arg(lsn)
            .query::<()>(conn)
            .map_err(|e| unavailable("resync SET", e))?;
        Ok(lsn)
    }

    fn deliver(&mut self, batch: &Batch) -> Result<u64, SinkError> {
        // Each row once, at its last level in the batch.
        let mut last: KeyMap<(u64, u64)> = KeyMap::default();
        let mut order = Vec::new();
        for c in &batch.changes {
            for (key, _, after) in rows_changed(&c.lines) {
                if last.insert(key, (after.available(), c.lsn)).is_none() {
                    order.push(key);
                }
            }
        }
        let (script, cursor_key, writer_key) =
            (self.script.clone(), self.cursor_key.clone(), self.writer_key.clone());
        let token = self.token.clone();
        let conn = self.conn()?;
        let chunks: Vec<&[stockd_protocol::Key]> =
            if order.is_empty() { vec![&[][..]] } else { order.chunks(ROWS_PER_CALL).collect() };
        let mut cursor = 0;
        for (i, chunk) in chunks.iter().enumerate() {
            let mut call = script.key(&cursor_key);
            call.key(&writer_key);
            call.arg(batch.after_lsn).arg(batch.through_lsn).arg(u8::from(i + 1 == chunks.len())).arg(&token);
            for key in chunk.iter() {
                let (available, lsn) = last[key];
                call.arg(key.item).arg(key.fc).arg(available).arg(lsn);
            }
            let answer: i64 = call.invoke(conn).map_err(|e| unavailable("apply script", e))?;
            if answer == -1 {
                return Err(SinkError::NeedsResync);
            }
            if answer < 0 {
                return Err(SinkError::Unavailable(
                    "redis: another connection of this server's sink claimed the writer key; reconnecting"
                        .into(),
                ));
            }
            if (answer as u64) < batch.after_lsn {
                return Err(SinkError::Unavailable(format!(
                    "redis holds records only through LSN {answer}, before this batch (restored from an older copy?)"
                )));
            }
            cursor = answer as u64;
        }
        Ok(cursor)
    }

    fn idle(&mut self) -> Result<u64, SinkError> {
        let cursor_key = self.cursor_key.clone();
        let conn = self.conn()?;
        // A cheap read keeps a flushed Redis from going unnoticed while nothing changes.
        let cursor: Option<u64> =
            redis::cmd("GET").arg(&cursor_key).query(conn).map_err(|e| unavailable("GET cursor", e))?;
        cursor.ok_or(SinkError::NeedsResync)
    }
}
