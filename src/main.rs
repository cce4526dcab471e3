//! The command line: parses arguments, sets up logging, calls the library.

/// mimalloc instead of glibc's malloc: with large images glibc's per-thread
/// arenas kept freed buffers and peak RSS grew past 200 MB (143 MB with one
/// arena), and malloc/free were a sixth of the service's CPU profile
/// (docs/BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use inferstream::config::{Config, LogFormat};
use inferstream::tools::endpoint::{EndpointOptions, Failure, Faults};

const DEFAULT_CONFIG: &str = "config/inferstream.toml";

#[derive(Parser)]
#[command(
    name = "inferstream",
    version,
    about = "Classifies images as they land in S3"
)]
struct Cli {
    /// Configuration file, layered on the embedded defaults; environment
    /// variables INFERSTREAM__SECTION__KEY override both.
    #[arg(long, global = true, value_name = "PATH")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the service.
    Run,
    /// Run a local model server speaking the SageMaker Runtime API.
    Endpoint(EndpointArgs),
    /// Validate the configuration and print it with secrets redacted.
    CheckConfig,
    /// Draw charts (PNG and SVG) from data capture.
    Report(ReportArgs),
    /// Run the whole pipeline on this machine with embedded Kafka, S3 and
    /// endpoint: upload sample images and watch them being classified.
    Demo(DemoArgs),
}

#[derive(clap::Args)]
struct DemoArgs {
    /// Sample images to upload.
    #[arg(long, default_value_t = 200)]
    images: usize,
    /// Confidence threshold (default: route.threshold of the configuration).
    #[arg(long)]
    threshold: Option<f64>,
    /// Request mode (default: endpoint.mode of the configuration).
    #[arg(long, value_parser = ["per-image", "batch"])]
    mode: Option<String>,
    /// Directory the report charts are written to.
    #[arg(long, default_value = "demo-report", value_name = "DIR")]
    out: PathBuf,
}

#[derive(clap::Args)]
struct ReportArgs {
    /// Where the capture is: s3://bucket/prefix (S3 settings from the
    /// configuration's aws.s3 section) or a local directory.
    #[arg(long, value_name = "S3_URL_OR_DIR")]
    from: String,
    /// Directory the charts are written to.
    #[arg(long, default_value = "report", value_name = "DIR")]
    out: PathBuf,
}

#[derive(clap::Args)]
struct EndpointArgs {
    /// Listen address (SageMaker containers use port 8080).
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: String,
    /// Only answer this endpoint name on /endpoints/{name}/invocations.
    #[arg(long)]
    name: Option<String>,
    /// Number of classes of the test model.
    #[arg(long, default_value_t = 2)]
    classes: usize,
    /// Calls served at once (like model server workers); more calls wait
    /// for a free one. 0: no limit.
    #[arg(long, default_value_t = 0)]
    workers: usize,
    /// Latency added to every call, e.g. 50ms.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "0s")]
    latency: Duration,
    /// Latency added per image of a call.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "0s")]
    latency_per_image: Duration,
    /// Fraction of calls answered 500 InternalFailure.
    #[arg(long, default_value_t = 0.0)]
    failure_rate: f64,
    /// Fraction of calls answered 400 ThrottlingException.
    #[arg(long, default_value_t = 0.0)]
    throttle_rate: f64,
    /// Fraction of calls answered only after an extra --slow-for.
    #[arg(long, default_value_t = 0.0)]
    slow_rate: f64,
    /// Extra delay of a slow call, e.g. 5s.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5s")]
    slow_for: Duration,
    /// Start of an outage (503 ServiceUnavailable), from server start.
    #[arg(long, value_parser = humantime::parse_duration)]
    outage_after: Option<Duration>,
    /// Length of the outage.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "30s")]
    outage_for: Duration,
    /// What calls get during the outage: unavailable (503), model-crash
    /// (424 ModelError from a failed container), access-denied,
    /// expired-token, unrecognized-client, endpoint-not-found.
    #[arg(long, default_value = "unavailable", value_parser = parse_failure)]
    outage_kind: Failure,
    /// Seed of the fault dice.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

fn parse_failure(name: &str) -> Result<Failure, String> {
    Failure::parse(name).ok_or_else(|| {
        let names: Vec<&str> = Failure::ALL.iter().map(|(_, n)| *n).collect();
        format!("`{name}` is not one of {}", names.join(", "))
    })
}

fn init_logging(format: LogFormat, level: &str) {
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

fn config_path(path: Option<PathBuf>) -> Option<PathBuf> {
    path.or_else(|| {
        let default = PathBuf::from(DEFAULT_CONFIG);
        default.exists().then_some(default)
    })
}

fn load_config(path: Option<PathBuf>) -> Result<Config, String> {
    Config::load(config_path(path).as_deref()).map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // `run` sizes its runtime from the configuration.
    let mut run_config = None;
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Command::Run = cli.command {
        match load_config(cli.config.clone()) {
            Ok(cfg) => {
                if cfg.pipeline.worker_threads > 0 {
                    builder.worker_threads(cfg.pipeline.worker_threads);
                }
                run_config = Some(cfg);
            }
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(2);
            }
        }
    }
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = match cli.command {
        Command::CheckConfig => check_config(cli.config),
        Command::Run => match run_config {
            Some(cfg) => runtime.block_on(run(cfg)),
            None => ExitCode::FAILURE,
        },
        Command::Endpoint(args) => runtime.block_on(endpoint(args)),
        Command::Report(args) => runtime.block_on(report(cli.config, args)),
        Command::Demo(args) => runtime.block_on(demo(cli.config, args)),
    };
    // Work stuck in the blocking pool (a Kafka call that does not return)
    // must not keep the process alive past its shutdown budget.
    runtime.shutdown_timeout(Duration::from_secs(1));
    code
}

async fn demo(path: Option<PathBuf>, args: DemoArgs) -> ExitCode {
    let cfg = match Config::load_unchecked(config_path(path).as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    // The embedded S3 server logs every error response it sends; the demo
    // shows outcomes itself.
    init_logging(cfg.log.format, "warn,s3s=off");
    let opts = inferstream::tools::demo::DemoOptions {
        images: args.images,
        threshold: args.threshold,
        report_dir: args.out,
        mode: args.mode.map(|m| {
            if m == "batch" {
                inferstream::config::RequestMode::Batch
            } else {
                inferstream::config::RequestMode::PerImage
            }
        }),
    };
    match inferstream::tools::demo::run(cfg, opts).await {
        Ok(summary) => {
            println!("\nsummary\n{}", summary.table());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn check_config(path: Option<PathBuf>) -> ExitCode {
    match load_config(path) {
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

async fn run(cfg: Config) -> ExitCode {
    init_logging(cfg.log.format, &cfg.log.level);
    let shutdown = CancellationToken::new();
    if let Err(e) = inferstream::shutdown::on_signals(shutdown.clone()) {
        tracing::error!(error = %e, "cannot install signal handlers");
        return ExitCode::FAILURE;
    }
    inferstream::shutdown::watchdog(shutdown.clone(), cfg.pipeline.shutdown_timeout);
    let service = match inferstream::start(cfg, shutdown).await {
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

async fn endpoint(args: EndpointArgs) -> ExitCode {
    init_logging(LogFormat::Text, "info");
    let listener = match tokio::net::TcpListener::bind(&args.listen).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(listen = %args.listen, error = %e, "cannot listen");
            return ExitCode::FAILURE;
        }
    };
    let shutdown = CancellationToken::new();
    if let Err(e) = inferstream::shutdown::on_signals(shutdown.clone()) {
        tracing::error!(error = %e, "cannot install signal handlers");
        return ExitCode::FAILURE;
    }
    let opts = EndpointOptions {
        name: args.name,
        classes: args.classes.max(1),
        workers: args.workers,
        memoize: false,
        faults: Faults {
            latency: args.latency,
            latency_per_image: args.latency_per_image,
            failure_rate: args.failure_rate,
            throttle_rate: args.throttle_rate,
            slow_rate: args.slow_rate,
            slow_for: args.slow_for,
            outage_after: args.outage_after,
            outage_for: args.outage_for,
            outage_kind: args.outage_kind,
            seed: args.seed,
        },
    };
    let running = match inferstream::tools::endpoint::spawn(listener, opts, shutdown) {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the endpoint");
            return ExitCode::FAILURE;
        }
    };
    tracing::info!(url = %running.url(), "endpoint listening");
    match running.task.await {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e)) => {
            tracing::error!(error = %e, "endpoint failed");
            ExitCode::FAILURE
        }
        Err(e) => {
            tracing::error!(error = %e, "endpoint task failed");
            ExitCode::FAILURE
        }
    }
}

async fn report(path: Option<PathBuf>, args: ReportArgs) -> ExitCode {
    init_logging(LogFormat::Text, "warn");
    let loaded = if args.from.starts_with("s3://") {
        let Some((bucket, prefix)) = inferstream::config::parse_s3_url(&args.from) else {
            eprintln!("error: --from `{}` is not s3://bucket/prefix", args.from);
            return ExitCode::from(2);
        };
        let cfg = match Config::load_unchecked(config_path(path).as_deref()) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(2);
            }
        };
        let sdk = inferstream::clients::aws::sdk_config(&cfg).await;
        let client = inferstream::clients::aws::s3_client(&sdk, &cfg);
        inferstream::tools::report::load_s3(&client, &bucket, &prefix).await
    } else {
        inferstream::tools::report::load_dir(std::path::Path::new(&args.from))
    };
    let loaded = match loaded {
        Ok(l) => l,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    println!(
        "read {} predictions from {} capture objects in {}{}",
        loaded.points.len(),
        loaded.objects,
        args.from,
        if loaded.bad_lines > 0 {
            format!(
                " ({} lines were not capture records and were skipped)",
                loaded.bad_lines
            )
        } else {
            String::new()
        }
    );
    match inferstream::tools::report::render(&loaded.points, &args.out) {
        Ok(files) => {
            for f in files {
                println!("wrote {}", f.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
