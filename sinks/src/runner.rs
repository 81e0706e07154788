//! One thread per sink: it follows the log from the sink's cursor, turns
//! records into changes with row levels, hands them to the sink, and keeps
//! the cursor, in the data directory and in the retention marks, as the sink
//! confirms.
//!
//! Nothing here runs on a shard or in the log writer's commit callback: a
//! slow or absent downstream system only makes its own backlog grow.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use stockd_persistence::histogram::AtomicHistogram;
use stockd_persistence::retention::Retention;
use stockd_persistence::snapshot::write_durably;
use stockd_persistence::tail::{Durable, LogTail, Watermark};
use stockd_persistence::wal::RECORD_HEADER;
use stockd_record::LogRecord;

use crate::levels::{Levels, Rewind};
use crate::sink::{Batch, Change, Sink, SinkError};

/// How a runner behaves; the defaults suit production.
#[derive(Clone, Debug)]
pub struct RunnerConfig {
    /// The server's data directory: the log, and the sinks' cursor files.
    pub dir: PathBuf,
    /// Most records in one batch handed to a sink.
    pub batch_records: usize,
    /// A sink more records behind than this is logged loudly (it keeps running).
    pub lag_limit_records: u64,
    /// The cursor file is rewritten at most this often.
    pub cursor_save_every: Duration,
    /// Fewer than `linger_records` records wait up to `linger` after the
    /// previous batch for more: at low rates a batch per group commit would
    /// spend more on each call to the downstream system than on its records.
    pub linger: Duration,
    pub linger_records: u64,
}

impl RunnerConfig {
    pub fn new(dir: impl Into<PathBuf>) -> RunnerConfig {
        RunnerConfig {
            dir: dir.into(),
            batch_records: 4096,
            lag_limit_records: 1_000_000,
            cursor_save_every: Duration::from_millis(200),
            linger: Duration::from_millis(2),
            linger_records: 1024,
        }
    }
}

/// What a sink's runner reports; read it from any thread.
pub struct SinkStatus {
    pub name: &'static str,
    durable: Arc<Durable>,
    /// The highest LSN the sink has confirmed.
    pub cursor: AtomicU64,
    /// Where the cursor is in the log, in bytes since the writer started
    /// (below 0: before it started).
    confirmed_at_byte: AtomicI64,
    /// Mutations handed to the sink (again after a reconnect: at least once).
    pub delivered: AtomicU64,
    /// Full resyncs: a downstream copy without a usable cursor.
    pub resyncs: AtomicU64,
    /// Failed connects and deliveries.
    pub errors: AtomicU64,
    pub connected: AtomicBool,
    /// Per batch, milliseconds from its oldest record's commit to the sink's
    /// confirmation (Kafka acknowledged it, Redis shows it).
    pub delivery_ms: AtomicHistogram,
}

/// Bucket bounds of [`SinkStatus::delivery_ms`].
pub const DELIVERY_MS_BUCKETS: &[u64] =
    &[1, 2, 5, 10, 20, 50, 100, 200, 500, 1_000, 2_000, 5_000, 10_000, 60_000];

impl SinkStatus {
    /// Records made durable that the sink has not confirmed.
    pub fn lag_records(&self) -> u64 {
        self.durable.get().saturating_sub(self.cursor.load(Relaxed))
    }

    /// Bytes of durable log records the sink has not confirmed.
    pub fn lag_bytes(&self) -> u64 {
        (self.durable.bytes() as i64).saturating_sub(self.confirmed_at_byte.load(Relaxed)).max(0) as u64
    }
}

/// The sinks' threads.
pub struct Runners {
    pub statuses: Vec<Arc<SinkStatus>>,
    threads: Vec<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
}

impl Runners {
    /// Starts one thread per sink. `levels` is every row's level as of the
    /// durable end of the log (the state recovery produced); each sink goes
    /// back from there to its cursor. Each sink's cursor file holds the log
    /// in `retention` before this returns, so no record a sink still needs
    /// is deleted.
    pub fn start(
        cfg: RunnerConfig,
        sinks: Vec<Box<dyn Sink>>,
        levels: &Levels,
        durable: Arc<Durable>,
        retention: &Arc<Retention>,
    ) -> Result<Runners, String> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut runners = Runners { statuses: Vec::new(), threads: Vec::new(), stop: stop.clone() };
        for sink in sinks {
            let name = sink.name();
            let saved = read_cursor(&cfg.dir, name)?;
            // Without a cursor the sink starts with a full resync at `levels`.
            let hold = retention.hold(saved.unwrap_or(levels.lsn()).min(levels.lsn()));
            let status = Arc::new(SinkStatus {
                name,
                durable: durable.clone(),
                cursor: AtomicU64::new(saved.unwrap_or(0)),
                confirmed_at_byte: AtomicI64::new(0),
                delivered: AtomicU64::new(0),
                resyncs: AtomicU64::new(0),
                errors: AtomicU64::new(0),
                connected: AtomicBool::new(false),
                delivery_ms: AtomicHistogram::new(DELIVERY_MS_BUCKETS),
            });
            let mut runner = Runner {
                cfg: cfg.clone(),
                sink,
                levels: levels.clone(),
                durable: durable.clone(),
                status: status.clone(),
                hold,
                retention: retention.clone(),
                stop: stop.clone(),
                saved,
                last_save: Instant::now(),
                unconfirmed: VecDeque::new(),
                read_at_byte: 0,
            };
            let thread = std::thread::Builder::new()
                .name(format!("stockd-sink-{name}"))
                .spawn(move || runner.run())
                .map_err(|e| e.to_string())?;
            runners.statuses.push(status);
            runners.threads.push(thread);
        }
        Ok(runners)
    }

    /// Asks every sink to deliver what is durable (for up to 3 s, then 2 s
    /// for confirmations), save its cursor and stop; waits for them.
    pub fn stop(self) {
        self.stop.store(true, Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
    }
}

/// How long a stopping sink goes on delivering what is durable.
const STOP_DRAIN: Duration = Duration::from_secs(3);

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn cursor_file(name: &str) -> String {
    format!("sink-{name}.cursor")
}

/// The cursor a sink's runner saved in `dir` (`None`: never).
pub fn read_cursor(dir: &Path, name: &str) -> Result<Option<u64>, String> {
    let path = dir.join(cursor_file(name));
    match std::fs::read_to_string(&path) {
        Ok(s) => s.trim().parse().map(Some).map_err(|e| format!("{}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

struct Runner {
    cfg: RunnerConfig,
    sink: Box<dyn Sink>,
    /// Levels as of the last record read.
    levels: Levels,
    durable: Arc<Durable>,
    status: Arc<SinkStatus>,
    /// The saved cursor, as the retention mark.
    hold: Arc<AtomicU64>,
    retention: Arc<Retention>,
    stop: Arc<AtomicBool>,
    saved: Option<u64>,
    last_save: Instant,
    /// Per batch handed over and not yet confirmed: its last LSN, the byte
    /// after it, and its first record's commit time.
    unconfirmed: VecDeque<(u64, i64, u64)>,
    /// Where the reader is (the record after `levels.lsn()`), in bytes since
    /// the writer started: the levels start at the writer's first record, 0.
    read_at_byte: i64,
}

/// Waits between attempts to reach a failed downstream system.
struct Backoff(Duration);

impl Backoff {
    const FIRST: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(5);

    fn sleep(&mut self, stop: &AtomicBool) {
        let until = Instant::now() + self.0;
        while !stop.load(Relaxed) && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(20));
        }
        self.0 = (self.0 * 2).min(Self::MAX);
    }
}

impl Runner {
    fn run(&mut self) {
        let name = self.sink.name();
        let mut backoff = Backoff(Backoff::FIRST);
        let mut last_complaint: Option<Instant> = None;
        while !self.stop.load(Relaxed) {
            match self.session(&mut backoff, &mut last_complaint) {
                Ok(()) => break,
                Err(e) => {
                    self.status.connected.store(false, Relaxed);
                    self.status.errors.fetch_add(1, Relaxed);
                    tracing::warn!(sink = name, error = %e, retry_in_ms = backoff.0.as_millis() as u64, "sink failed; the log keeps its backlog");
                    backoff.sleep(&self.stop);
                }
            }
        }
        // Give pending deliveries a moment, then keep what was confirmed.
        let until = Instant::now() + Duration::from_secs(2);
        while self.status.connected.load(Relaxed) && Instant::now() < until {
            match self.sink.idle() {
                Ok(c) if c >= self.levels.lsn() => {
                    self.confirm(c);
                    break;
                }
                Ok(c) => self.confirm(c),
                Err(_) => break,
            }
        }
        self.save_cursor(true);
        tracing::info!(sink = name, cursor = self.status.cursor.load(Relaxed), "sink stopped");
    }

    /// Connects, finds the cursor, and streams until stopped (`Ok`) or until the sink fails.
    fn session(&mut self, backoff: &mut Backoff, last_complaint: &mut Option<Instant>) -> Result<(), String> {
        let name = self.sink.name();
        let cursor = self.sink.connect(self.saved).map_err(|e| format!("connect: {e}"))?;
        self.status.connected.store(true, Relaxed);
        match cursor.map(|c| self.go_back_to(c)) {
            Some(Ok(())) => {}
            Some(Err(why)) => {
                tracing::error!(
                    sink = name,
                    "{why}: sending every row's level instead; the events in between are not published"
                );
                self.resync()?;
            }
            None => self.resync()?,
        }
        tracing::info!(sink = name, from_lsn = self.levels.lsn(), "sink streaming");
        let mut tail = LogTail::new(&self.cfg.dir, self.levels.lsn());
        let mut last_lag = Instant::now();
        let mut last_batch = Instant::now() - self.cfg.linger;
        // Once asked to stop, the sink still gets what is durable, for a while.
        let mut drain_until: Option<Instant> = None;
        loop {
            let watermark = self.durable.watermark();
            let durable = watermark.lsn;
            let waiting = (durable + 1).saturating_sub(tail.next_lsn());
            if self.stop.load(Relaxed) {
                let until = *drain_until.get_or_insert_with(|| Instant::now() + STOP_DRAIN);
                if waiting == 0 || Instant::now() >= until {
                    break;
                }
            }
            // A few records wait a little for more: fewer, larger batches.
            let lingering = waiting < self.cfg.linger_records && last_batch.elapsed() < self.cfg.linger;
            if waiting > 0 && lingering && drain_until.is_none() {
                std::thread::sleep(self.cfg.linger.saturating_sub(last_batch.elapsed()));
                continue;
            }
            let ready = self.sink.ready();
            let result = if waiting > 0 && ready {
                last_batch = Instant::now();
                let batch = self.read_batch(&mut tail, watermark)?;
                self.status.delivered.fetch_add(batch.changes.len() as u64, Relaxed);
                self.sink.deliver(&batch)
            } else {
                let r = self.sink.idle();
                if waiting > 0 {
                    // The sink takes nothing more until earlier deliveries are confirmed.
                    std::thread::sleep(Duration::from_millis(1));
                } else {
                    // Deliveries still unconfirmed: come back soon to collect them.
                    let pending = matches!(r, Ok(c) if c < self.levels.lsn());
                    self.durable.wait_past(durable, Duration::from_millis(if pending { 1 } else { 20 }));
                }
                r
            };
            match result {
                Ok(c) => self.confirm(c),
                Err(SinkError::NeedsResync) => {
                    tracing::warn!(sink = name, "the downstream copy is gone: sending every row's level");
                    self.resync()?;
                }
                Err(e) => return Err(e.to_string()),
            }
            *backoff = Backoff(Backoff::FIRST);
            if last_lag.elapsed() >= Duration::from_millis(250) {
                last_lag = Instant::now();
                self.check_lag(last_complaint);
            }
        }
        Ok(())
    }

    /// Takes the records after `cursor` back out of the levels.
    fn go_back_to(&mut self, cursor: u64) -> Result<(), String> {
        let through = self.levels.lsn();
        if cursor > through {
            return Err(format!("the sink's cursor {cursor} is past this server's log ({through})"));
        }
        let mut tail = LogTail::new(&self.cfg.dir, cursor);
        // The log is still being written: read no further than its durable end.
        let upto = Watermark { lsn: through, ..self.durable.watermark() };
        let mut back = Rewind::default();
        let mut bytes = 0i64;
        while tail.next_lsn() <= through {
            tail.read(upto, 4096, |r| {
                bytes += (RECORD_HEADER + r.payload.len()) as i64;
                if let Ok(LogRecord::Mutation(m)) = LogRecord::decode(r.payload) {
                    back.add(&m);
                }
            })
            .map_err(|e| format!("records after the sink's cursor {cursor} are gone ({e})"))?;
        }
        self.levels.rewind(cursor, back);
        self.read_at_byte -= bytes;
        self.forget_unconfirmed();
        Ok(())
    }

    fn resync(&mut self) -> Result<(), String> {
        let t = Instant::now();
        let cursor = self.sink.resync(&self.levels).map_err(|e| format!("resync: {e}"))?;
        self.status.resyncs.fetch_add(1, Relaxed);
        self.forget_unconfirmed();
        tracing::info!(
            sink = self.sink.name(),
            lsn = cursor,
            rows = self.levels.len(),
            ms = t.elapsed().as_millis() as u64,
            "sink resynced"
        );
        self.confirm(cursor);
        Ok(())
    }

    /// Reads the next batch and moves the levels over it.
    fn read_batch(&mut self, tail: &mut LogTail, durable: Watermark) -> Result<Batch, String> {
        let mut batch = Batch { after_lsn: tail.next_lsn() - 1, ..Batch::default() };
        let (levels, at) = (&mut self.levels, &mut self.read_at_byte);
        let mut first_ts_ms = None;
        tail.read(durable, self.cfg.batch_records, |r| {
            *at += (RECORD_HEADER + r.payload.len()) as i64;
            first_ts_ms.get_or_insert(r.ts_ms);
            match LogRecord::decode(r.payload) {
                Ok(LogRecord::Mutation(mutation)) => {
                    let lines = levels.apply(r.lsn, &mutation);
                    batch.changes.push(Change { lsn: r.lsn, ts_ms: r.ts_ms, mutation, lines });
                }
                Ok(LogRecord::Layout { .. }) => levels.set_lsn(r.lsn),
                Err(e) => {
                    // The server wrote it and recovery read it: only a bug gets here.
                    tracing::error!(lsn = r.lsn, error = %e, "a log record this build cannot decode; not delivered");
                    levels.set_lsn(r.lsn);
                }
            }
        })
        .map_err(|e| format!("reading the log: {e}"))?;
        batch.through_lsn = tail.next_lsn() - 1;
        self.unconfirmed.push_back((
            batch.through_lsn,
            self.read_at_byte,
            first_ts_ms.unwrap_or_else(now_ms),
        ));
        Ok(batch)
    }

    /// The sink starts over from its cursor, where the reader now is.
    fn forget_unconfirmed(&mut self) {
        self.unconfirmed.clear();
        self.status.confirmed_at_byte.store(self.read_at_byte, Relaxed);
    }

    fn confirm(&mut self, cursor: u64) {
        while let Some(&(lsn, at, committed_ms)) = self.unconfirmed.front() {
            if lsn > cursor {
                break;
            }
            self.status.confirmed_at_byte.store(at, Relaxed);
            self.status.delivery_ms.observe(now_ms().saturating_sub(committed_ms));
            self.unconfirmed.pop_front();
        }
        self.status.cursor.fetch_max(cursor, Relaxed);
        self.save_cursor(false);
    }

    /// Writes the cursor file (at most every `cursor_save_every` unless `now`),
    /// then lets the log go behind it.
    fn save_cursor(&mut self, now: bool) {
        let cursor = self.status.cursor.load(Relaxed);
        if self.saved.is_some_and(|s| s >= cursor)
            || (!now && self.last_save.elapsed() < self.cfg.cursor_save_every)
        {
            return;
        }
        let name = cursor_file(self.sink.name());
        if let Err(e) = write_durably(&self.cfg.dir, &name, cursor.to_string().as_bytes()) {
            tracing::error!(sink = self.sink.name(), error = %e, "cannot save the sink's cursor");
            return;
        }
        self.saved = Some(cursor);
        self.last_save = Instant::now();
        self.hold.store(cursor, Relaxed);
        if let Err(e) = self.retention.collect() {
            tracing::error!(error = %e, "deleting log segments behind the sinks failed");
        }
    }

    /// Logs loudly while the sink is more than its limit behind.
    fn check_lag(&self, last_complaint: &mut Option<Instant>) {
        let lag = self.status.lag_records();
        if lag > self.cfg.lag_limit_records {
            if last_complaint.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                *last_complaint = Some(Instant::now());
                tracing::error!(
                    sink = self.sink.name(),
                    lag_records = lag,
                    limit = self.cfg.lag_limit_records,
                    "sink is far behind the log; stockd keeps serving and keeps the log for it"
                );
            }
        } else if last_complaint.take().is_some() {
            tracing::info!(sink = self.sink.name(), lag_records = lag, "sink is back within its lag limit");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    use stockd_persistence::wal::{Committed, Wal, WalConfig};
    use stockd_protocol::{Key, Line};
    use stockd_record::{Mutation, Op};

    use crate::levels::Level;

    /// A sink whose downstream system is a vector in memory: for the runner's own logic.
    struct Recorder(Arc<Mutex<Vec<u64>>>);

    impl Sink for Recorder {
        fn name(&self) -> &'static str {
            "recorder"
        }
        fn connect(&mut self, local: Option<u64>) -> Result<Option<u64>, SinkError> {
            Ok(local)
        }
        fn resync(&mut self, levels: &Levels) -> Result<u64, SinkError> {
            Ok(levels.lsn())
        }
        fn deliver(&mut self, batch: &Batch) -> Result<u64, SinkError> {
            self.0.lock().unwrap().extend(batch.changes.iter().map(|c| c.lsn));
            Ok(batch.through_lsn)
        }
        fn idle(&mut self) -> Result<u64, SinkError> {
            Ok(self.0.lock().unwrap().last().copied().unwrap_or(0))
        }
    }

    #[test]
    fn a_stopping_runner_delivers_everything_durable_and_saves_its_cursor() {
        let dir = tempfile::tempdir().unwrap();
        let (wal, writer) =
            Wal::start(WalConfig::new(dir.path()), 1, 0, |_: Vec<Committed<()>>, _: &[u8]| {}).unwrap();
        let retention = Arc::new(Retention::new(dir.path(), 0));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let key = Key { item: 1, fc: 1 };
        let levels = Levels::new(0, [(key, Level { on_hand: 1_000, held: 0 })]);
        let mut cfg = RunnerConfig::new(dir.path());
        cfg.linger = Duration::from_millis(50); // records are still lingering when the stop comes
        let sinks: Vec<Box<dyn Sink>> = vec![Box::new(Recorder(seen.clone()))];
        let runners = Runners::start(cfg, sinks, &levels, wal.durable.clone(), &retention).unwrap();
        let order = |id: u64| {
            let mut payload = Vec::new();
            Mutation { op: Op::Order { id }, lines: vec![Line::new(1, 1, 1)].into() }.encode(&mut payload);
            payload
        };
        // The first record is delivered at once; the runner then lingers.
        wal.submit(order(1), ()).unwrap();
        let t = Instant::now();
        while seen.lock().unwrap().is_empty() {
            assert!(t.elapsed() < Duration::from_secs(5));
            std::thread::sleep(Duration::from_millis(1));
        }
        for id in 2..=300u64 {
            wal.submit(order(id), ()).unwrap();
        }
        let durable = wal.durable.clone();
        drop(wal);
        writer.join().unwrap();
        assert_eq!(durable.get(), 300);
        runners.stop();
        assert_eq!(
            *seen.lock().unwrap(),
            (1..=300).collect::<Vec<u64>>(),
            "every durable record, once, in order"
        );
        assert_eq!(read_cursor(dir.path(), "recorder").unwrap(), Some(300));
    }
}
