//! A TCP proxy in front of a Kafka-protocol broker that can cut one client
//! off: it reads the `client_id` of each connection's first request (the
//! Kafka request header: i32 size, i16 api key, i16 version, i32
//! correlation id, i16 length + client id) and, while that client is cut,
//! forwards nothing either way on its connections (they stay open, as
//! behind a network partition). The broker must advertise the proxy's
//! address, so that every connection comes through it.

use std::collections::HashSet;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub struct KafkaProxy {
    pub port: u16,
    cut: Arc<Mutex<HashSet<String>>>,
    stop: Arc<AtomicBool>,
}

type Tag = Arc<Mutex<Option<String>>>;

impl KafkaProxy {
    /// Listens on a free 127.0.0.1 port; forwards to 127.0.0.1:`upstream` (which may start later).
    pub fn start(upstream: impl Fn() -> u16 + Send + 'static) -> KafkaProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        let (cut, stop) = (Arc::new(Mutex::new(HashSet::new())), Arc::new(AtomicBool::new(false)));
        let (cut2, stop2) = (cut.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop2.load(Relaxed) {
                match listener.accept() {
                    Ok((client, _)) => {
                        let Ok(server) = TcpStream::connect(("127.0.0.1", upstream())) else { continue };
                        let tag: Tag = Arc::default();
                        for (from, to, first) in [(&client, &server, true), (&server, &client, false)] {
                            let (from, to) = (from.try_clone().unwrap(), to.try_clone().unwrap());
                            let (cut, stop, tag) = (cut2.clone(), stop2.clone(), tag.clone());
                            std::thread::spawn(move || pump(from, to, first, &tag, &cut, &stop));
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(5))
                    }
                    Err(_) => return,
                }
            }
        });
        KafkaProxy { port, cut, stop }
    }

    /// Stops forwarding for the client that named itself `client_id`.
    pub fn cut(&self, client_id: &str) {
        self.cut.lock().unwrap().insert(client_id.to_string());
    }

    pub fn heal(&self, client_id: &str) {
        self.cut.lock().unwrap().remove(client_id);
    }
}

impl Drop for KafkaProxy {
    fn drop(&mut self) {
        self.stop.store(true, Relaxed);
    }
}

/// The client id in a request header at the start of `buf`, once it is all there.
fn client_id(buf: &[u8]) -> Option<String> {
    let len = i16::from_be_bytes(buf.get(12..14)?.try_into().ok()?);
    if len < 0 {
        return Some(String::new());
    }
    let id = buf.get(14..14 + len as usize)?;
    Some(String::from_utf8_lossy(id).into_owned())
}

fn pump(
    mut from: TcpStream,
    mut to: TcpStream,
    first: bool,
    tag: &Tag,
    cut: &Mutex<HashSet<String>>,
    stop: &AtomicBool,
) {
    from.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
    // Bytes read and not yet forwarded: they go out only after a check of
    // the cut list made after they were read, so a cut holds everything
    // read from the moment it is set.
    let mut held = Vec::new();
    let mut buf = [0u8; 64 << 10];
    while !stop.load(Relaxed) {
        let known = tag.lock().unwrap().clone();
        if known.as_ref().is_some_and(|id| cut.lock().unwrap().contains(id)) {
            std::thread::sleep(Duration::from_millis(10));
            continue;
        }
        if first && known.is_none() {
            if let Some(id) = client_id(&held) {
                *tag.lock().unwrap() = Some(id);
                continue;
            }
        } else if !held.is_empty() {
            if to.write_all(&held).is_err() {
                break;
            }
            held.clear();
            continue;
        }
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => held.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => break,
        }
    }
    let _ = to.shutdown(Shutdown::Both);
}
