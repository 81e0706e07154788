use std::io::IsTerminal;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use stockd::replication::ReplicationConfig;
use stockd::state::IdLimits;
use stockd::{Config, SinkConfig};
use stockd_sinks::cassandra::CassandraConfig;
use stockd_sinks::kafka::KafkaConfig;

/// stockd: thread-per-core exact inventory server.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Address every shard accepts on (SO_REUSEPORT): HOST:PORT, HOST a name or an IP.
    #[arg(long, default_value = "127.0.0.1:7400", value_parser = resolve)]
    listen: SocketAddr,
    /// Write-ahead log, snapshots, lock file.
    #[arg(long, default_value = "./stockd-data")]
    data_dir: PathBuf,
    /// Shards (threads), 1 to 64; default: half the cores (at least 1), the
    /// rest left to the log writer, the sinks and the kernel's networking.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=stockd::shard::MAX_SHARDS as i64))]
    shards: Option<u16>,
    /// First per-shard port (default: listen port + 1).
    #[arg(long)]
    shard_port_base: Option<u16>,
    /// Require HELLO with this token before any other request.
    #[arg(long, env = "STOCKD_AUTH_TOKEN")]
    auth_token: Option<String>,
    /// A snapshot is taken when the log has grown by half the state (rows +
    /// ids, at least 1,000,000 records), or, once this many seconds have
    /// passed since the last one, by an eighth of the state.
    #[arg(long, default_value_t = 60)]
    snapshot_interval_secs: u64,
    /// Hours an order, hold or receipt id is remembered for idempotent retries.
    #[arg(long, default_value_t = 24)]
    id_window_hours: u64,
    /// Ids remembered per shard at most; beyond it the oldest are forgotten first.
    #[arg(long, default_value_t = 16_000_000)]
    max_ids_per_shard: usize,
    /// Seconds an id is remembered however full the table is; new ids that do
    /// not fit get OVERLOADED.
    #[arg(long, default_value_t = 60)]
    id_min_window_secs: u64,
    /// Client connections open at once, over all shards; more get one
    /// OVERLOADED answer and are closed. Default: the file-descriptor limit
    /// (ulimit -n) less 128.
    #[arg(long)]
    max_connections: Option<usize>,
    /// Seconds a connection may hold part of a frame without sending more
    /// before it is closed.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    partial_frame_timeout_secs: u64,
    /// Serve Prometheus metrics at http://HOST:PORT/metrics (off by default).
    #[arg(long, value_parser = resolve)]
    metrics_listen: Option<SocketAddr>,
    /// Stream every committed mutation to these Kafka brokers (HOST:PORT[,...]).
    #[arg(long, env = "STOCKD_KAFKA_BROKERS")]
    kafka_brokers: Option<String>,
    /// Kafka topics are PREFIX.events and PREFIX.levels.
    #[arg(long, env = "STOCKD_KAFKA_TOPIC_PREFIX", default_value = "stock")]
    kafka_topic_prefix: String,
    /// Partitions of the Kafka topics stockd creates.
    #[arg(long, env = "STOCKD_KAFKA_PARTITIONS", default_value_t = 4, value_parser = clap::value_parser!(i32).range(1..))]
    kafka_partitions: i32,
    /// Replication factor of the Kafka topics stockd creates.
    #[arg(long, env = "STOCKD_KAFKA_REPLICATION", default_value_t = 1, value_parser = clap::value_parser!(i32).range(1..))]
    kafka_replication: i32,
    /// Keep a read model in this Redis: redis://HOST:PORT[/DB].
    #[arg(long, env = "STOCKD_REDIS_URL")]
    redis_url: Option<String>,
    /// Write every row and its movements to these Cassandra/ScyllaDB nodes (HOST:PORT[,...]).
    #[arg(long, env = "STOCKD_CASSANDRA_NODES", value_delimiter = ',')]
    cassandra_nodes: Vec<String>,
    /// An existing keyspace; stockd creates its tables there (docs/cassandra.cql).
    #[arg(long, env = "STOCKD_CASSANDRA_KEYSPACE", default_value = "stockd")]
    cassandra_keyspace: String,
    /// A sink more log records behind than this is logged loudly (stockd keeps serving).
    #[arg(long, env = "STOCKD_SINK_LAG_LIMIT", default_value_t = 1_000_000)]
    sink_lag_limit_records: u64,
    /// Replicate through the Kafka brokers of --kafka-brokers (docs/ha.md):
    /// the first node of a topic becomes the primary; a node that another
    /// one replaced rejoins as a standby. Mutations are acknowledged once
    /// the topic holds them. The sinks do not run with replication yet.
    #[arg(long, requires = "kafka_brokers")]
    replicate: bool,
    /// Replicate as a standby: serve reads, refuse mutations, take over when
    /// the primary has been silent for --failover-timeout-ms.
    #[arg(long, requires = "kafka_brokers", conflicts_with = "replicate")]
    standby: bool,
    /// The replication topic (one partition used).
    #[arg(long, env = "STOCKD_REPLICATION_TOPIC", default_value = "stock.log")]
    replication_topic: String,
    /// A standby caught up with the topic takes over after the primary has
    /// been silent this long.
    #[arg(long, default_value_t = 3000, value_parser = clap::value_parser!(u64).range(100..))]
    failover_timeout_ms: u64,
    /// The address clients reach this server at, named to them when it is
    /// the primary (default: --listen).
    #[arg(long)]
    advertise: Option<String>,
}

/// HOST:PORT with HOST a name or an address, to the address to listen on:
/// the first IPv4 address the name resolves to, else its first address
/// (clients try every address of a name, a listener binds one).
fn resolve(s: &str) -> Result<SocketAddr, String> {
    let addrs: Vec<SocketAddr> =
        s.to_socket_addrs().map_err(|e| format!("{s}: {e} (expected HOST:PORT)"))?.collect();
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or(addrs.first())
        .copied()
        .ok_or_else(|| format!("{s}: the name resolves to no address"))
}

/// Half the cores, at least one. Measured on 2 cores with the load
/// generator beside the server (docs/benchmarks.md): 1 shard beat 2 on every
/// workload (orders 1.13-1.37x, queries 1.41-1.88x, 64-key batches
/// 1.13-1.61x), because a shard thread per core leaves none for the log
/// writer, the sinks and the kernel's network processing.
fn default_shards(cores: usize) -> usize {
    (cores / 2).clamp(1, stockd::shard::MAX_SHARDS)
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        // Colour codes only for a person at a terminal, never into log files.
        .with_ansi(std::io::stdout().is_terminal())
        .init();
    let args = Args::parse();
    // A file-size limit (`ulimit -f`) reached by the log then fails the
    // write or allocation with EFBIG, which the log writer waits out like a
    // full disk, instead of killing the server with SIGXFSZ.
    // SAFETY: setting a signal's disposition to "ignore" before any thread starts.
    unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let shards = args.shards.map_or(default_shards(cores), usize::from);
    let mut cfg = Config::new(args.listen, args.data_dir, shards);
    cfg.shard_port_base = args.shard_port_base;
    cfg.auth_token = args.auth_token;
    cfg.snapshot_interval = Duration::from_secs(args.snapshot_interval_secs.max(1));
    cfg.max_connections = args.max_connections.unwrap_or(cfg.max_connections);
    cfg.partial_frame_timeout = Duration::from_secs(args.partial_frame_timeout_secs);
    cfg.metrics_listen = args.metrics_listen;
    if args.replicate || args.standby {
        let brokers = args.kafka_brokers.clone().expect("clap requires --kafka-brokers");
        let advertise = args.advertise.clone().unwrap_or_else(|| args.listen.to_string());
        let mut r = ReplicationConfig::new(brokers, advertise);
        r.topic = args.replication_topic.clone();
        r.topic_replication = args.kafka_replication;
        r.standby = args.standby;
        r.failover_timeout = Duration::from_millis(args.failover_timeout_ms);
        cfg.replication = Some(r);
    }
    let events_sink = !(args.replicate || args.standby);
    cfg.sinks = SinkConfig {
        kafka: args.kafka_brokers.filter(|_| events_sink).map(|brokers| KafkaConfig {
            brokers,
            topic_prefix: args.kafka_topic_prefix,
            partitions: args.kafka_partitions,
            replication: args.kafka_replication,
        }),
        redis_url: args.redis_url,
        cassandra: (!args.cassandra_nodes.is_empty())
            .then_some(CassandraConfig { nodes: args.cassandra_nodes, keyspace: args.cassandra_keyspace }),
        lag_limit_records: args.sink_lag_limit_records,
    };
    cfg.ids = IdLimits {
        window_ms: args.id_window_hours * 3_600_000,
        min_window_ms: args.id_min_window_secs * 1000,
        max_ids: args.max_ids_per_shard,
    };
    let running = match stockd::start(cfg) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("stockd: {e}");
            std::process::exit(1);
        }
    };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("signal runtime");
    rt.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = int.recv() => tracing::info!("SIGINT: shutting down"),
        }
    });
    running.shutdown();
}
