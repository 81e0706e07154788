//! Echo of 16-byte messages, server pinned to core 0, load from core 1.
//!
//! `cargo run --release -- server glommio|tokio PORT` then
//! `cargo run --release -- client PORT CONNECTIONS PIPELINE SECONDS`.
//! `bench.sh` runs both runtimes alternately and prints msgs/s.

use std::time::{Duration, Instant};

const MSG: usize = 16;

fn pin(core: usize) {
    if let Some(ids) = core_affinity::get_core_ids() {
        if let Some(id) = ids.get(core % ids.len()) {
            core_affinity::set_for_current(*id);
        }
    }
}

fn glommio_server(port: u16) {
    use futures_lite::{AsyncReadExt, AsyncWriteExt};
    use glommio::{net::TcpListener, LocalExecutorBuilder, Placement};
    LocalExecutorBuilder::new(Placement::Fixed(0))
        .spawn(move || async move {
            let listener = TcpListener::bind(("127.0.0.1", port)).unwrap();
            loop {
                let mut stream = listener.accept().await.unwrap();
                stream.set_nodelay(true).unwrap();
                glommio::spawn_local(async move {
                    let mut buf = vec![0u8; 64 << 10];
                    loop {
                        let n = match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        if stream.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                })
                .detach();
            }
        })
        .unwrap()
        .join()
        .unwrap();
}

fn tokio_server(port: u16) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    pin(0);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.unwrap();
        loop {
            let (mut stream, _) = listener.accept().await.unwrap();
            stream.set_nodelay(true).unwrap();
            tokio::task::spawn_local(async move {
                let mut buf = vec![0u8; 64 << 10];
                loop {
                    let n = match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    if stream.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
}

fn client(port: u16, conns: usize, pipeline: usize, secs: u64) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    pin(1);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let total: u64 = rt.block_on(async move {
        let deadline = Instant::now() + Duration::from_secs(secs);
        let mut tasks = Vec::new();
        for _ in 0..conns {
            tasks.push(tokio::spawn(async move {
                let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
                s.set_nodelay(true).unwrap();
                let out = vec![7u8; MSG * pipeline];
                let mut inb = vec![0u8; MSG * pipeline];
                let mut n = 0u64;
                while Instant::now() < deadline {
                    s.write_all(&out).await.unwrap();
                    s.read_exact(&mut inb).await.unwrap();
                    n += pipeline as u64;
                }
                n
            }));
        }
        let mut sum = 0;
        for t in tasks {
            sum += t.await.unwrap();
        }
        sum
    });
    println!("{:.0}", total as f64 / secs as f64);
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let num = |i: usize| args[i].parse::<u64>().unwrap();
    match args.get(1).map(String::as_str) {
        Some("server") if args[2] == "glommio" => glommio_server(num(3) as u16),
        Some("server") => tokio_server(num(3) as u16),
        Some("client") => client(num(2) as u16, num(3) as usize, num(4) as usize, num(5)),
        _ => eprintln!("usage: runtime-echo server glommio|tokio PORT | client PORT CONNS PIPELINE SECS"),
    }
}
