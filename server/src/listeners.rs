//! The sockets a server accepts on: every shard listens on the shared port
//! (SO_REUSEPORT spreads connections) and on a port of its own. A port that
//! another process listens on is refused with a message naming it: two
//! servers sharing a port through SO_REUSEPORT would each answer part of
//! the clients from their own stock.

use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener as StdListener, TcpStream};
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use stockd_protocol::{parse_frame, Reply, Request, Response, Status};

/// Connections the kernel queues for a listener before the shard accepts them.
const LISTEN_BACKLOG: i32 = 1024;
/// How long to wait for whatever listens on a taken port to say what it is.
const IDENTIFY_TIMEOUT: Duration = Duration::from_millis(300);

/// Every shard's two listeners.
pub struct Listeners {
    pub addr: SocketAddr,
    pub shared_port: Vec<StdListener>,
    pub own_port: Vec<StdListener>,
    pub shard_ports: Vec<u16>,
    /// Held while the server runs: the claim on the shared port (see [`claim_port`]).
    pub port_claim: Option<File>,
}

impl Listeners {
    /// Binds `shards` listeners on `listen` and one per shard from
    /// `shard_port_base` (default: the listen port + 1; ephemeral ports if
    /// the listen port is 0).
    pub fn bind(
        listen: SocketAddr,
        shards: usize,
        shard_port_base: Option<u16>,
    ) -> Result<Listeners, String> {
        let port_claim = if listen.port() == 0 { None } else { Some(claim_port(listen)?) };
        let first = listener(listen, true)?;
        let addr = first.local_addr().map_err(|e| e.to_string())?;
        let mut shared_port = vec![first];
        for _ in 1..shards {
            shared_port.push(listener(addr, true)?);
        }
        let base = match shard_port_base {
            Some(base) => base,
            None if listen.port() == 0 => 0,
            None => listen.port().checked_add(1).ok_or_else(|| {
                format!("--listen {listen}: no port above it for the shards; set --shard-port-base")
            })?,
        };
        let mut own_port = Vec::new();
        for i in 0..shards {
            let port = match base {
                0 => 0,
                base => base.checked_add(i as u16).ok_or_else(|| {
                    format!("--shard-port-base {base}: shard {i} would need a port above 65535")
                })?,
            };
            own_port.push(listener(SocketAddr::new(addr.ip(), port), false)?);
        }
        let shard_ports = own_port.iter().map(|l| l.local_addr().map(|a| a.port()).unwrap_or(0)).collect();
        Ok(Listeners { addr, shared_port, own_port, shard_ports, port_claim })
    }
}

fn listener(addr: SocketAddr, reuse_port: bool) -> Result<StdListener, String> {
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
        .map_err(|e| format!("socket: {e}"))?;
    sock.set_reuse_address(true).map_err(|e| e.to_string())?;
    if reuse_port {
        sock.set_reuse_port(true).map_err(|e| e.to_string())?;
    }
    sock.set_nonblocking(true).map_err(|e| e.to_string())?;
    sock.bind(&addr.into()).map_err(|e| match e.kind() {
        ErrorKind::AddrInUse => taken(addr),
        _ => format!("bind {addr}: {e}"),
    })?;
    sock.listen(LISTEN_BACKLOG).map_err(|e| format!("listen {addr}: {e}"))?;
    Ok(sock.into())
}

/// Claims the shared port for this server. A plain bind (no SO_REUSEPORT)
/// fails if anything listens on `addr`, even a server whose sockets would
/// let ours join theirs. Two stockd starting at the same instant could both
/// pass that test before either listens, so each also takes an exclusive
/// lock on a file named after the address, held for its lifetime.
fn claim_port(addr: SocketAddr) -> Result<File, String> {
    let path = std::env::temp_dir().join(format!("stockd-port-{}-{}.lock", addr.ip(), addr.port()));
    let file = File::create(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    if file.try_lock().is_err() {
        return Err(taken(addr));
    }
    refuse_if_taken(addr)?;
    Ok(file)
}

fn refuse_if_taken(addr: SocketAddr) -> Result<(), String> {
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
        .map_err(|e| format!("socket: {e}"))?;
    sock.set_reuse_address(true).map_err(|e| e.to_string())?;
    match sock.bind(&addr.into()) {
        Err(e) if e.kind() == ErrorKind::AddrInUse => Err(taken(addr)),
        _ => Ok(()), // other errors show again, with their own words, at the real bind
    }
}

fn taken(addr: SocketAddr) -> String {
    format!(
        "{addr} is already in use by {}; two servers must never share a port: stop it, or choose \
         another --listen / --shard-port-base",
        identify(addr)
    )
}

/// What listens on `addr`, asked with a HELLO.
fn identify(addr: SocketAddr) -> String {
    let ask = || -> Option<Response> {
        let mut s = TcpStream::connect_timeout(&addr, IDENTIFY_TIMEOUT).ok()?;
        s.set_read_timeout(Some(IDENTIFY_TIMEOUT)).ok()?;
        let mut out = Vec::new();
        Request::Hello { token: Vec::new() }.encode(1, &mut out);
        s.write_all(&out).ok()?;
        let mut buf = vec![0u8; 4096];
        let mut len = 0;
        loop {
            if let Ok(Some((h, body))) = parse_frame(&buf[..len]) {
                return Response::decode(h.opcode, body).ok();
            }
            let n = s.read(&mut buf[len..]).ok().filter(|n| *n > 0)?;
            len += n;
            if len == buf.len() {
                return None;
            }
        }
    };
    match ask() {
        Some(Response::Ok(Reply::Hello(info))) => format!("another stockd (server id {})", info.server_id),
        Some(r) if r.status() == Status::Unauthorized => "another stockd (one that requires a token)".into(),
        _ => "another program".into(),
    }
}

/// A free port on 127.0.0.1 (bound, then released) for a harness that
/// kills a server and starts it again on the same port (the tests, the
/// kill -9 harness): never the same one twice in this process, and below
/// the kernel's ephemeral range. The kernel draws every `bind(0)` (the
/// shard ports of another server) and every client socket's port from
/// that range, so a port from it that a harness frees by killing its
/// server can be taken by someone else before the server starts again on
/// it (seen in CI: the new server found another test's shard on its
/// port). Below the range only explicit binds take a port.
pub fn restartable_port() -> u16 {
    static NEXT: std::sync::Mutex<Option<u16>> = std::sync::Mutex::new(None);
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32_768);
    if low <= 2_048 {
        // No room below the range: any free port, as the kernel picks it.
        let any = StdListener::bind("127.0.0.1:0").and_then(|l| l.local_addr());
        return any.expect("a free port on 127.0.0.1").port();
    }
    let first = low - (low - 1_024).min(8_192);
    let span = low - first;
    let mut next = NEXT.lock().unwrap_or_else(|e| e.into_inner());
    // Start where this process's id says, so that processes run side by side start apart.
    let mut port = next.unwrap_or(first + (std::process::id() % span as u32) as u16);
    for _ in 0..span {
        let candidate = port;
        port = if port + 1 >= low { first } else { port + 1 };
        if StdListener::bind(("127.0.0.1", candidate)).is_ok() {
            *next = Some(port);
            return candidate;
        }
    }
    panic!("no free port on 127.0.0.1 in {first}..{low}");
}
