//! Replication through Kafka (docs/ha.md): the primary appends every logged
//! record to one partition of a replication topic and acknowledges a
//! mutation only once its own reader of that partition has read it back
//! with no newer promotion before it; standbys read the same partition,
//! log and apply the same records at the same LSNs, and one of them
//! promotes itself when the primary's heartbeats stop.
//!
//! Files: this one (configuration, the role every thread reads), the
//! message format ([`envelope`]), the reading rule every node applies
//! ([`follower`]), the Kafka clients ([`kafka`]), the check of the local log
//! against the topic before recovery ([`sync`]), and the reader thread that
//! applies, acknowledges, promotes and demotes ([`reader`]).

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::Duration;

use stockd_persistence::snapshot::write_durably;

pub mod envelope;
pub mod follower;
pub mod kafka;
pub mod reader;
pub mod sync;

use follower::Leader;

#[derive(Clone, Debug)]
pub struct ReplicationConfig {
    /// `host:port[,host:port...]`
    pub brokers: String,
    /// The replication topic; only its partition 0 is used.
    pub topic: String,
    /// Replication factor of the topic if stockd creates it (3 in production).
    pub topic_replication: i32,
    /// Never the first primary of a topic: only a failover makes this node one.
    pub standby: bool,
    /// A standby caught up with the topic promotes itself once the primary
    /// has been silent this long.
    pub failover_timeout: Duration,
    /// The client address this node names when it becomes the primary.
    pub advertise: String,
}

impl ReplicationConfig {
    pub fn new(brokers: impl Into<String>, advertise: impl Into<String>) -> ReplicationConfig {
        ReplicationConfig {
            brokers: brokers.into(),
            topic: "stock.log".into(),
            topic_replication: 1,
            standby: false,
            failover_timeout: Duration::from_millis(3000),
            advertise: advertise.into(),
        }
    }

    /// How often the primary says it is alive: six times per failover timeout.
    pub fn heartbeat_every(&self) -> Duration {
        (self.failover_timeout / 6).max(Duration::from_millis(10))
    }
}

/// What this node is now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Role {
    /// Follows the primary: serves reads, refuses mutations.
    Standby = 0,
    /// Takes mutations, acknowledged once the topic confirms them.
    Primary = 1,
    /// Was the primary until another node promoted itself: refuses
    /// mutations; a restart truncates what the topic never confirmed and
    /// rejoins as a standby.
    Replaced = 2,
}

/// The role and the primary, shared by every thread of a replicating server.
pub struct Replica {
    role: AtomicU8,
    /// The epoch this node leads or led: its records carry it, so it never
    /// changes once set (a replaced primary's late records stay stale).
    epoch: AtomicU64,
    /// The current epoch as this node's reader knows it.
    following: AtomicU64,
    leader: Mutex<Option<Leader>>,
    /// An operator asked this standby to take over (PROMOTE).
    promotion_asked: AtomicBool,
    /// This node's server id.
    pub node: u64,
}

impl Replica {
    pub fn new(node: u64) -> Replica {
        Replica {
            role: AtomicU8::new(Role::Standby as u8),
            epoch: AtomicU64::new(0),
            following: AtomicU64::new(0),
            leader: Mutex::new(None),
            promotion_asked: AtomicBool::new(false),
            node,
        }
    }

    pub fn role(&self) -> Role {
        match self.role.load(Relaxed) {
            1 => Role::Primary,
            2 => Role::Replaced,
            _ => Role::Standby,
        }
    }

    pub fn may_write(&self) -> bool {
        self.role() == Role::Primary
    }

    /// The epoch this node leads or led.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Relaxed)
    }

    /// The current epoch as the reader knows it.
    pub fn following(&self) -> u64 {
        self.following.load(Relaxed)
    }

    pub(crate) fn set_leader(&self, epoch: u64, leader: Option<Leader>) {
        self.following.store(epoch, Relaxed);
        *self.leader.lock().unwrap_or_else(|p| p.into_inner()) = leader;
    }

    /// PROMOTE: a standby takes over as soon as its reader is caught up.
    /// Refused, with the reason, by a node that is not a standby.
    pub fn ask_promotion(&self) -> Result<(), &'static str> {
        match self.role() {
            Role::Standby => {
                self.promotion_asked.store(true, Relaxed);
                Ok(())
            }
            Role::Primary => Ok(()),
            Role::Replaced => Err("this server was replaced as the primary; restart it (it rejoins as a standby), then promote it"),
        }
    }

    /// Takes the operator's request to promote, if there is one.
    pub(crate) fn take_promotion_request(&self) -> bool {
        self.promotion_asked.swap(false, Relaxed)
    }

    pub(crate) fn become_primary(&self, epoch: u64) {
        self.epoch.store(epoch, Relaxed);
        self.role.store(Role::Primary as u8, Relaxed);
    }

    pub(crate) fn replaced(&self) {
        self.role.store(Role::Replaced as u8, Relaxed);
    }

    /// The answer to a mutation this node may not take.
    pub fn not_primary(&self) -> String {
        let leader = self.leader.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let whom = match leader {
            Some(l) if l.node != self.node => format!("the primary is {}", l.addr),
            _ => "no primary is known yet".to_string(),
        };
        match self.role() {
            Role::Replaced => {
                format!("this server was replaced as the primary and takes no mutations; {whom}")
            }
            _ => format!("this server is a standby and takes no mutations; {whom}"),
        }
    }
}

/// Where a node's reader of the topic may start again: the next offset to
/// read, and the follower's state before it (every record through `applied`
/// is in the local log). Kept in `REPLICATION` in the data directory.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Cursor {
    pub offset: i64,
    pub epoch: u64,
    pub applied: u64,
    pub leader: Option<Leader>,
}

const CURSOR_FILE: &str = "REPLICATION";

impl Cursor {
    pub fn load(dir: &Path) -> Result<Cursor, String> {
        let path = dir.join(CURSOR_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Cursor::default()),
            Err(e) => return Err(format!("{}: {e}", path.display())),
        };
        let bad = || format!("{}: expected 'offset epoch applied [leader_node leader_addr]'", path.display());
        let f: Vec<&str> = text.split_whitespace().collect();
        if f.len() != 3 && f.len() != 5 {
            return Err(bad());
        }
        let num = |s: &str| s.parse::<u64>().map_err(|_| bad());
        let leader = match f.len() {
            5 => Some(Leader { node: num(f[3])?, addr: f[4].to_string() }),
            _ => None,
        };
        let offset = f[0].parse::<i64>().ok().filter(|o| *o >= 0).ok_or_else(bad)?;
        Ok(Cursor { offset, epoch: num(f[1])?, applied: num(f[2])?, leader })
    }

    pub fn save(&self, dir: &Path) -> Result<(), String> {
        let mut text = format!("{} {} {}", self.offset, self.epoch, self.applied);
        if let Some(l) = &self.leader {
            text.push_str(&format!(" {} {}", l.node, l.addr));
        }
        text.push('\n');
        write_durably(dir, CURSOR_FILE, text.as_bytes()).map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_round_trip_and_bad_files() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(Cursor::load(dir.path()).unwrap(), Cursor::default());
        let c = Cursor {
            offset: 12,
            epoch: 3,
            applied: 99,
            leader: Some(Leader { node: 7, addr: "h:1".into() }),
        };
        c.save(dir.path()).unwrap();
        assert_eq!(Cursor::load(dir.path()).unwrap(), c);
        for bad in ["", "1 2", "x 1 2", "-1 2 3", "1 2 3 4"] {
            std::fs::write(dir.path().join(CURSOR_FILE), bad).unwrap();
            assert!(Cursor::load(dir.path()).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn not_primary_names_the_primary() {
        let r = Replica::new(1);
        assert!(!r.may_write());
        assert!(r.not_primary().contains("no primary is known"));
        r.set_leader(3, Some(Leader { node: 2, addr: "10.0.0.2:7400".into() }));
        assert_eq!(r.following(), 3);
        assert!(r.ask_promotion().is_ok() && r.take_promotion_request() && !r.take_promotion_request());
        assert!(r.not_primary().contains("standby") && r.not_primary().contains("10.0.0.2:7400"));
        r.become_primary(4);
        assert!(r.may_write() && r.epoch() == 4);
        r.replaced();
        assert!(!r.may_write() && r.not_primary().contains("replaced"));
        assert!(r.ask_promotion().is_err());
    }
}
