//! Shared helpers: a real server on 127.0.0.1 with a real data directory.
#![allow(dead_code)]

pub mod journal;
pub mod proxy;
pub mod servers;

use std::path::Path;
use std::time::Duration;

use stockd::{Config, Running};
use stockd_client::{Client, Key, Options};

pub fn config(dir: &Path, shards: usize) -> Config {
    let mut cfg = Config::new("127.0.0.1:0".parse().unwrap(), dir, shards);
    cfg.pin = false;
    cfg
}

pub fn start(dir: &Path, shards: usize) -> Running {
    stockd::start(config(dir, shards)).expect("server starts")
}

pub async fn client(r: &Running) -> Client {
    Client::connect(&r.addr.to_string()).await.expect("connect")
}

/// A client that sends everything over one connection, so the server forwards between shards.
pub async fn single(r: &Running) -> Client {
    let opts = Options { single_connection: true, ..Options::default() };
    Client::connect_with(&r.addr.to_string(), opts).await.expect("connect")
}

/// The first `n` items owned by `shard` of `shards`.
pub fn items_on(shard: usize, shards: usize, n: usize) -> Vec<u64> {
    (1..).filter(|i| stockd_protocol::shard_of(*i, shards) == shard).take(n).collect()
}

pub fn key(item: u64, fc: u32) -> Key {
    Key { item, fc }
}

/// Polls `f` until it returns true, for at most `limit`.
pub async fn eventually<F, Fut>(limit: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let t = std::time::Instant::now();
    while t.elapsed() < limit {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// A client of the server on 127.0.0.1:`port`, once it accepts (at most 20 s).
pub async fn client_at(port: u16) -> Client {
    let t = std::time::Instant::now();
    loop {
        match Client::connect(&format!("127.0.0.1:{port}")).await {
            Ok(c) => return c,
            Err(_) if t.elapsed() < Duration::from_secs(20) => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(e) => panic!("stockd did not come up: {e}"),
        }
    }
}

/// A free TCP port on 127.0.0.1 for a server, never the same one twice in
/// this process (tests run as threads of one process): see
/// [`stockd::listeners::restartable_port`].
pub fn free_port() -> u16 {
    stockd::listeners::restartable_port()
}

/// The real `stockd` binary on 127.0.0.1:`port`, shard ports ephemeral
/// unless `args` names `--shard-port-base`, with `args` added. Killed when dropped.
pub struct Daemon {
    child: std::process::Child,
    pub port: u16,
}

impl Daemon {
    pub fn spawn(dir: &Path, port: u16, args: &[&str]) -> Daemon {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_stockd"));
        cmd.args(["--listen", &format!("127.0.0.1:{port}")]);
        if !args.contains(&"--shard-port-base") {
            cmd.args(["--shard-port-base", "0"]);
        }
        let child = cmd
            .arg("--data-dir")
            .arg(dir)
            .args(args)
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .expect("start stockd");
        Daemon { child, port }
    }

    /// A client, once the server accepts connections (at most 20 s).
    pub async fn client(&self) -> Client {
        client_at(self.port).await
    }

    /// SIGSTOP: the process stops answering, its sockets stay open, until [`Daemon::resume`].
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, sig: &str) {
        let pid = self.child.id().to_string();
        let ok = std::process::Command::new("kill").args([sig, &pid]).status().unwrap().success();
        assert!(ok, "kill {sig} {pid}");
    }

    /// SIGKILL: no chance to flush or snapshot anything.
    pub fn kill_9(mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().unwrap();
    }

    /// SIGTERM, then waits for a clean exit (at most 20 s).
    pub fn terminate(mut self) {
        let pid = self.child.id().to_string();
        let ok = std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success();
        assert!(ok, "kill -TERM {pid}");
        let t = std::time::Instant::now();
        while t.elapsed() < Duration::from_secs(20) {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "stockd exited with {status} after SIGTERM");
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("stockd did not stop within 20 s of SIGTERM");
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-CONT", &self.child.id().to_string()])
            .stderr(std::process::Stdio::null())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads answers from a raw socket until `n` have come (or the server
/// closed it, or 10 s passed): (request id, answer), in arrival order.
pub fn read_answers(s: &mut std::net::TcpStream, n: usize) -> Vec<(u64, stockd_protocol::Response)> {
    use std::io::Read;
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let (mut buf, mut out, mut chunk) = (Vec::new(), Vec::new(), [0u8; 4096]);
    while out.len() < n {
        let k = match s.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(k) => k,
        };
        buf.extend_from_slice(&chunk[..k]);
        while let Some((h, body)) = stockd_protocol::parse_frame(&buf).unwrap() {
            out.push((h.request_id, stockd_protocol::Response::decode(h.opcode, body).unwrap()));
            buf.drain(..stockd_protocol::HEADER_LEN + h.body_len);
        }
    }
    out
}

/// GET `path` over HTTP/1.1 from `addr`: (head, body).
pub fn get(addr: std::net::SocketAddr, path: &str) -> (String, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    std::io::Write::write_all(&mut s, format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes()).unwrap();
    let mut all = String::new();
    std::io::Read::read_to_string(&mut s, &mut all).unwrap();
    let (head, body) = all.split_once("\r\n\r\n").unwrap();
    (head.to_string(), body.to_string())
}

/// The value of the sample line that starts with `series ` (name and labels).
pub fn sample(body: &str, series: &str) -> f64 {
    body.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("no {series} in\n{body}"))
        .parse()
        .unwrap()
}
