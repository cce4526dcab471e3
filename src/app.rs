//! The process around the library: logging, the configuration file a
//! command reads, the async runtime, and the service's own commands (`run`,
//! `check-config`). `main.rs` parses arguments and calls these or a tool.

use std::io::IsTerminal as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::{Config, LogFormat};

/// The configuration file read when `--config` is not given (if it exists).
pub const DEFAULT_CONFIG: &str = "config/inferstream.toml";

/// `--config PATH`, else the default file when it exists.
pub fn config_path(path: Option<&Path>) -> Option<PathBuf> {
    path.map(Path::to_path_buf).or_else(|| {
        let default = PathBuf::from(DEFAULT_CONFIG);
        default.exists().then_some(default)
    })
}

/// Logging to stderr; `RUST_LOG` overrides `level`.
pub fn init_logging(format: LogFormat, level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

/// Runs `future` on a multi-thread runtime with `worker_threads` threads
/// (0: one per CPU). Work stuck in the blocking pool (a Kafka call that
/// does not return) gets 1 s once `future` is done, so that it cannot keep
/// the process alive past its shutdown budget.
pub fn block_on<F: std::future::Future<Output = ExitCode>>(
    worker_threads: usize,
    future: F,
) -> ExitCode {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if worker_threads > 0 {
        builder.worker_threads(worker_threads);
    }
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(future);
    runtime.shutdown_timeout(Duration::from_secs(1));
    code
}

/// `inferstream check-config`: exit 0 and the effective configuration with
/// secrets redacted, or exit 2 and every problem by key.
pub fn check_config(path: Option<&Path>) -> ExitCode {
    match Config::load(config_path(path).as_deref()) {
        Ok(cfg) => {
            println!("# configuration is valid; effective values, secrets redacted:\n");
            print!("{cfg}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

/// `inferstream run`: the service, until SIGTERM or SIGINT (exit 0 after a
/// clean shutdown) or a failure (exit 1); invalid configuration exits 2.
pub fn run(path: Option<&Path>) -> ExitCode {
    let cfg = match Config::load(config_path(path).as_deref()) {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    block_on(cfg.pipeline.worker_threads, serve(cfg))
}

async fn serve(cfg: Config) -> ExitCode {
    init_logging(cfg.log.format, &cfg.log.level);
    let shutdown = CancellationToken::new();
    if let Err(e) = crate::shutdown::on_signals(shutdown.clone()) {
        tracing::error!(error = %e, "cannot install signal handlers");
        return ExitCode::FAILURE;
    }
    crate::shutdown::watchdog(shutdown.clone(), cfg.pipeline.shutdown_timeout);
    let service = match crate::pipeline::start(cfg, shutdown).await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "cannot start");
            return ExitCode::FAILURE;
        }
    };
    match service.wait().await {
        Ok(()) => {
            tracing::info!("stopped");
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "stopped on error");
            ExitCode::FAILURE
        }
    }
}
