use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use stock_gateway::{serve, Config, Gateway};

/// HTTP/JSON gateway in front of stockd.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// HTTP address to serve on, HOST:PORT.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: String,
    /// stockd's address, HOST:PORT; several, comma-separated, for a
    /// replicated stockd: the gateway follows the primary among them.
    #[arg(long, default_value = "127.0.0.1:7400")]
    stockd: String,
    /// File of accepted API keys, one per line; mutating endpoints then need
    /// `Authorization: Bearer <key>`.
    #[arg(long)]
    api_key_file: Option<PathBuf>,
    /// With --api-key-file, require a key on read endpoints too.
    #[arg(long)]
    protect_reads: bool,
    /// Token to send to stockd, if it runs with --auth-token.
    #[arg(long, env = "STOCKD_AUTH_TOKEN")]
    stockd_token: Option<String>,
    /// Worker threads.
    #[arg(long, default_value_t = 2)]
    threads: usize,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let a = Args::parse();
    let api_keys = match &a.api_key_file {
        None => Vec::new(),
        Some(p) => match std::fs::read_to_string(p) {
            Ok(s) => {
                let keys: Vec<String> = s
                    .lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty() && !l.starts_with('#'))
                    .map(String::from)
                    .collect();
                if keys.is_empty() {
                    eprintln!("stock-gateway: {} holds no keys", p.display());
                    return ExitCode::from(2);
                }
                keys
            }
            Err(e) => {
                eprintln!("stock-gateway: {}: {e}", p.display());
                return ExitCode::from(2);
            }
        },
    };
    let cfg =
        Config { stockd: a.stockd, stockd_token: a.stockd_token, api_keys, protect_reads: a.protect_reads };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(a.threads.max(1))
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("stock-gateway: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        let listener = match tokio::net::TcpListener::bind(&a.listen).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("stock-gateway: bind {}: {e}", a.listen);
                return ExitCode::FAILURE;
            }
        };
        tracing::info!(listen = %a.listen, stockd = %cfg.stockd, auth = !cfg.api_keys.is_empty(), "stock-gateway serving");
        let shutdown = async {
            use tokio::signal::unix::{signal, SignalKind};
            let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            tracing::info!("shutting down");
        };
        let gateway = match Gateway::new(cfg) {
            Ok(g) => g,
            Err(e) => {
                eprintln!("stock-gateway: {e}");
                return ExitCode::from(2);
            }
        };
        match serve(listener, gateway, shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("stock-gateway: {e}");
                ExitCode::FAILURE
            }
        }
    })
}
