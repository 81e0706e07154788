//! The reader thread of a replicating node. It reads the replication
//! partition with the [`Follower`] rule and, by role:
//!
//! - standby: logs every record of the history in the local log (the same
//!   LSNs) and has the shards apply it; promotes itself when the primary
//!   has been silent for the failover timeout while it is caught up;
//! - primary: has the shards apply and answer a logged mutation only once
//!   the record was read back in the primary's own epoch;
//! - replaced (another node's promotion came first): answers the records
//!   it logged after the promotion NOT_PRIMARY; nothing more is applied.
//!
//! Every logged batch comes here from the log writer, in LSN order, and is
//! routed to the shards (or fenced) from here, in that order.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam::channel::{Receiver, Sender};
use rdkafka::consumer::BaseConsumer;

use rdkafka::error::KafkaError;
use rdkafka::Message;
use stockd_persistence::wal::{self, Committed, Wal};
use stockd_record::LogRecord;

use super::envelope::{data_messages, Envelope, Kind};
use super::follower::{Follower, Step};
use super::kafka::{self, Outgoing};
use super::{Cursor, Replica, ReplicationConfig, Role};
use crate::shard::commits::{fence_commits, Router};
use crate::shard::mailbox::WalToken;
use crate::shard::now_ms;
use crate::shard::passed::Passed;

/// How often the reader's place is saved (`REPLICATION` in the data directory).
const CURSOR_EVERY: Duration = Duration::from_millis(500);

/// What the reader thread needs.
pub struct ReaderParts {
    pub cfg: ReplicationConfig,
    pub dir: PathBuf,
    pub replica: Arc<Replica>,
    /// Where to start reading (from [`super::sync::sync`]).
    pub start: Cursor,
    /// The last LSN in the local log at startup, applied by recovery.
    pub local_end: u64,
    pub shards: usize,
    /// The local log, for a standby's records.
    pub wal: Wal<WalToken>,
    /// Every batch the log writer made durable.
    pub commits: Receiver<Vec<Committed<WalToken>>>,
    pub router: Router,
    pub producer: Sender<Outgoing>,
}

pub struct ReaderThread {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

impl ReaderThread {
    pub fn stop(self) {
        self.stop.store(true, Relaxed);
        let _ = self.thread.join();
    }
}

/// A logged batch waiting for the topic.
struct Pending {
    /// Its last LSN of a mutation this node coordinates (0: none).
    own_through: u64,
    batch: Vec<Committed<WalToken>>,
}

struct Reader {
    p: ReaderParts,
    follower: Follower,
    pending: VecDeque<Pending>,
    /// Every record through this LSN is routed to the shards (it is applied
    /// or about to be).
    routed: u64,
    /// A standby's last record handed to the local log.
    submitted: u64,
    /// After this node was replaced: the last LSN of its epoch in the history.
    replaced_at: Option<u64>,
    /// The broker said the reader reached the end of the partition, and
    /// nothing came since.
    at_end: bool,
    /// When the last message came.
    last_message: Instant,
    last_alive: Instant,
    promote_asked: Option<Instant>,
    /// The epoch this run of the node asked to lead. A winning promotion
    /// of this node for another epoch is a previous run's (read again from
    /// the saved place after a restart): that run is gone, so it is followed
    /// like anyone's, never taken over.
    asked_epoch: Option<u64>,
    /// The next place to save, once the local log holds its `applied`.
    candidate: Option<Cursor>,
    last_save: Instant,
    gaps_logged: Instant,
}

pub fn spawn(p: ReaderParts) -> Result<ReaderThread, String> {
    let consumer = kafka::reader(&p.cfg, p.replica.node, p.start.offset)?;
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let follower = Follower::new(p.start.epoch, p.start.leader.clone(), p.start.applied);
    let routed = p.local_end;
    let mut r = Reader {
        follower,
        pending: VecDeque::new(),
        routed,
        submitted: routed,
        replaced_at: None,
        at_end: false,
        last_message: Instant::now(),
        last_alive: Instant::now(),
        promote_asked: None,
        asked_epoch: None,
        candidate: None,
        last_save: Instant::now(),
        gaps_logged: Instant::now() - Duration::from_secs(60),
        p,
    };
    r.p.replica.set_leader(r.follower.epoch, r.follower.leader.clone());
    let thread = std::thread::Builder::new()
        .name("stockd-repl-read".into())
        .spawn(move || r.run(&consumer, &stop2))
        .map_err(|e| e.to_string())?;
    Ok(ReaderThread { stop, thread })
}

/// A standby cannot go on: the operator must act. Stops the process.
fn fatal(message: String) -> ! {
    tracing::error!("replication: {message}");
    eprintln!("stockd: {message}");
    std::process::exit(3);
}

impl Reader {
    fn run(&mut self, consumer: &BaseConsumer<kafka::ReaderContext>, stop: &AtomicBool) {
        while !stop.load(Relaxed) {
            let wait =
                if self.pending.is_empty() { Duration::from_millis(5) } else { Duration::from_millis(1) };
            for i in 0..1024 {
                match consumer.poll(if i == 0 { wait } else { Duration::ZERO }) {
                    None => break,
                    Some(Ok(m)) => {
                        self.at_end = false;
                        self.last_message = Instant::now();
                        self.message(m.offset(), m.payload().unwrap_or_default());
                    }
                    Some(Err(KafkaError::PartitionEOF(_))) => {
                        self.at_end = true;
                        break;
                    }
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "replication: reading the topic");
                        break;
                    }
                }
            }
            self.take_commits();
            self.route_ready();
            self.maybe_promote();
            if self.last_save.elapsed() >= CURSOR_EVERY {
                self.save_cursor();
            }
        }
        self.save_cursor();
    }

    fn take_commits(&mut self) {
        while let Ok(batch) = self.p.commits.try_recv() {
            let own_through = batch
                .iter()
                .filter(|c| matches!(c.token, WalToken::Own { .. }))
                .map(|c| c.lsn)
                .max()
                .unwrap_or(0);
            self.pending.push_back(Pending { own_through, batch });
        }
    }

    /// Routes the batches the topic confirmed, in order; fences what it never will.
    fn route_ready(&mut self) {
        while let Some(front) = self.pending.front() {
            let confirmed_through = self.replaced_at.unwrap_or(self.follower.applied);
            if front.own_through <= confirmed_through {
                let b = self.pending.pop_front().expect("front exists");
                self.routed = b.batch.last().map_or(self.routed, |c| c.lsn);
                self.p.router.route(b.batch);
            } else if self.replaced_at.is_some() {
                let b = self.pending.pop_front().expect("front exists");
                let (ok, never): (Vec<_>, Vec<_>) =
                    b.batch.into_iter().partition(|c| c.lsn <= confirmed_through);
                if !ok.is_empty() {
                    self.p.router.route(ok);
                }
                self.routed = self.routed.max(confirmed_through);
                let message: Arc<str> = self.p.replica.not_primary().into();
                fence_commits(&self.p.router.mailboxes, never, &message);
            } else {
                break;
            }
        }
    }

    fn message(&mut self, offset: i64, payload: &[u8]) {
        let (e, records) = match Envelope::decode(payload) {
            Ok(m) => m,
            Err(why) => {
                tracing::warn!(offset, "replication: skipping a message no reader can use: {why}");
                return;
            }
        };
        match self.follower.step(&e, records.len()) {
            Step::Apply { from } => {
                self.last_alive = Instant::now();
                if self.p.replica.role() == Role::Standby {
                    self.log_replicated(e.lsn + from as u64, e.ts_ms, &records[from..]);
                }
            }
            Step::Promoted => {
                self.last_alive = Instant::now();
                self.promote_asked = None;
                self.p.replica.set_leader(self.follower.epoch, self.follower.leader.clone());
                let leader = self.follower.leader.clone().unwrap_or_default();
                if leader.node == self.p.replica.node && self.asked_epoch == Some(self.follower.epoch) {
                    self.take_over();
                } else if self.p.replica.role() == Role::Primary {
                    self.replaced_at = Some(self.follower.applied);
                    self.p.replica.replaced();
                    tracing::error!(
                        epoch = self.follower.epoch,
                        primary = %leader.addr,
                        through = self.follower.applied,
                        "replication: another node became the primary; this one takes no more mutations (restart it to rejoin as a standby)"
                    );
                } else if leader.node == self.p.replica.node {
                    tracing::info!(
                        epoch = self.follower.epoch,
                        "replication: a promotion of this node's previous run; following it until this run takes over"
                    );
                } else {
                    tracing::info!(epoch = self.follower.epoch, primary = %leader.addr, "replication: a new primary");
                }
            }
            Step::Heartbeat => self.last_alive = Instant::now(),
            Step::Gap { want, got } => {
                if self.gaps_logged.elapsed() >= Duration::from_secs(1) {
                    self.gaps_logged = Instant::now();
                    tracing::warn!(
                        want,
                        got,
                        "replication: a record is missing; waiting for it to be sent again"
                    );
                }
            }
            Step::Skip(why) => tracing::debug!(offset, lsn = e.lsn, epoch = e.epoch, "replication: {why}"),
        }
        // A place to start again from, saved once the local log holds
        // everything applied before it.
        if self.candidate.is_none() && self.replaced_at.is_none() {
            let f = &self.follower;
            self.candidate = Some(Cursor {
                offset: offset + 1,
                epoch: f.epoch,
                applied: f.applied,
                leader: f.leader.clone(),
            });
        }
    }

    /// A standby logs the history's next records, the run of one message
    /// (`first` is the first one's LSN), at their own LSNs, with the
    /// primary's timestamp (ids age by it): one batch for the log writer.
    fn log_replicated(&mut self, first: u64, ts_ms: u64, records: &[&[u8]]) {
        if first != self.submitted + 1 {
            fatal(format!(
                "record {first} of the topic follows local record {}: the local log does not fit the topic",
                self.submitted
            ));
        }
        let mut batch = self.p.wal.batch();
        batch.reserve(records.len(), records.iter().map(|r| r.len()).sum());
        for (i, record) in records.iter().enumerate() {
            let lsn = first + i as u64;
            let token = match LogRecord::decode(record) {
                Ok(LogRecord::Mutation(m)) => WalToken::Replicated(Some(Passed::new(m))),
                Ok(LogRecord::Layout { shards }) if shards as usize == self.p.shards => {
                    WalToken::Replicated(None)
                }
                Ok(LogRecord::Layout { shards }) => fatal(format!(
                    "the primary runs {shards} shards and this standby {}: restart it with --shards {shards}",
                    self.p.shards
                )),
                Err(why) => fatal(format!("record {lsn} of the topic cannot be read: {why}")),
            };
            batch.push_copied(token, ts_ms, record);
        }
        if self.p.wal.submit_batch(batch).is_err() {
            return; // the writer stopped: shutting down
        }
        self.submitted += records.len() as u64;
    }

    /// This node's promotion won: once every record before it is applied
    /// here, it is the primary.
    fn take_over(&mut self) {
        let epoch = self.follower.epoch;
        let through = self.follower.applied;
        while self.routed < through.min(self.submitted) {
            match self.p.commits.recv_timeout(Duration::from_millis(100)) {
                Ok(batch) => {
                    self.pending.push_back(Pending { own_through: 0, batch });
                    self.route_ready();
                }
                Err(crossbeam::channel::RecvTimeoutError::Timeout) => {}
                Err(crossbeam::channel::RecvTimeoutError::Disconnected) => return,
            }
        }
        // The first primary of a topic: its own log is where the history begins.
        if self.routed > through {
            let mut records = Vec::new();
            let scanned =
                wal::scan(&self.p.dir, through, |r| records.push((r.lsn, r.ts_ms, r.payload.to_vec())));
            if let Err(e) = scanned {
                fatal(format!("reading the local log to send it: {e}"));
            }
            tracing::info!(
                records = records.len(),
                "replication: sending the local log, where the topic's history begins"
            );
            let refs = records.iter().map(|(lsn, ts, p)| (*lsn, *ts, &p[..]));
            let _ = self.p.producer.send(Outgoing::Data(data_messages(epoch, self.p.replica.node, refs)));
        }
        self.p.replica.become_primary(epoch);
        tracing::info!(epoch, after_lsn = through, "replication: this node is the primary");
    }

    /// Caught up with the partition: the broker said so, or nothing at all
    /// has come for the failover timeout. (tansu was seen reporting a high
    /// watermark below messages it had served; a reader that took a pause
    /// in a slow broker's backlog for the end started needless promotions.)
    fn caught_up(&self) -> bool {
        self.at_end || self.last_message.elapsed() >= self.p.cfg.failover_timeout
    }

    fn maybe_promote(&mut self) {
        if self.p.replica.role() != Role::Standby || !self.caught_up() {
            return;
        }
        let f = &self.follower;
        let start_as_primary = !self.p.cfg.standby && (f.epoch == 0 || f.led_by(self.p.replica.node));
        let silent = f.epoch > 0 && self.last_alive.elapsed() >= self.p.cfg.failover_timeout;
        // An operator's PROMOTE: now, whatever the primary is doing.
        let asked = self.p.replica.take_promotion_request();
        if !(start_as_primary || silent || asked) {
            return;
        }
        if !asked && self.promote_asked.is_some_and(|t| t.elapsed() < self.p.cfg.failover_timeout) {
            return;
        }
        self.promote_asked = Some(Instant::now());
        self.asked_epoch = Some(f.epoch + 1);
        let env = Envelope {
            kind: Kind::Promote,
            epoch: f.epoch + 1,
            lsn: f.applied,
            ts_ms: now_ms(),
            node: self.p.replica.node,
            body: self.p.cfg.advertise.as_bytes(),
        };
        tracing::warn!(
            epoch = f.epoch + 1,
            applied = f.applied,
            silent_ms = self.last_alive.elapsed().as_millis() as u64,
            operator = asked,
            "replication: asking to become the primary"
        );
        let _ = self.p.producer.send(Outgoing::Promote(env.to_vec()));
    }

    fn save_cursor(&mut self) {
        self.last_save = Instant::now();
        if let Some(c) = self.candidate.take_if(|c| c.applied <= self.routed) {
            if let Err(e) = c.save(&self.p.dir) {
                tracing::warn!(error = %e, "replication: saving the reader's place");
            }
        }
    }
}
