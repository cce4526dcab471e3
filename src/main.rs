//! The command line: parses arguments and hands each command to the
//! library (`app` for the service's own commands, `tools` for the others).

/// mimalloc instead of glibc's malloc: with large images glibc's per-thread
/// arenas kept freed buffers and peak RSS grew past 200 MB (143 MB with one
/// arena), and malloc/free were a sixth of the service's CPU profile
/// (docs/BENCHMARKS.md). Built without transparent huge pages (`no_thp`):
/// mimalloc asked for them on its arenas, and on hosts that grant them on
/// request (THP `madvise`, Debian's default) each arena touched became
/// 2 MiB pages: 10–30 MB more RSS, and photos classified at half the speed
/// (docs/BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use inferstream::app;
use inferstream::config::RequestMode;
use inferstream::tools::demo::{self, DemoOptions};
use inferstream::tools::endpoint::{self, EndpointOptions, Failure, Faults};
use inferstream::tools::{backfill, baseline, redrive, report};

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
    /// Make a drift baseline (monitor.baseline) from data capture.
    Baseline(BaselineArgs),
    /// Run the whole pipeline on this machine with embedded Kafka, S3 and
    /// endpoint: upload sample images and watch them being classified.
    Demo(DemoArgs),
    /// Classify objects already in S3: one upload event per object under
    /// a prefix, produced to the input topic for the running service.
    Backfill(BackfillArgs),
    /// Send dead letters of chosen reasons back to the input topic, once
    /// each (each reason remembers what it redrove).
    Redrive(RedriveArgs),
}

#[derive(clap::Args)]
struct RedriveArgs {
    /// Only these reasons, comma-separated (e.g. not_an_image,object_too_large);
    /// default: object_not_found, fetch_failed, endpoint_unavailable and
    /// bad_endpoint_response.
    #[arg(long, value_name = "LIST")]
    reason: Option<String>,
    /// Only dead letters that failed at or after this time (RFC 3339); the
    /// older ones of the chosen reasons count as handled.
    #[arg(long, value_parser = humantime::parse_rfc3339_weak, value_name = "TIME")]
    since: Option<std::time::SystemTime>,
    /// Count by reason only; send nothing, remember nothing.
    #[arg(long)]
    dry_run: bool,
}

#[derive(clap::Args)]
struct BackfillArgs {
    /// What to backfill: s3://bucket/prefix (S3 settings from the
    /// configuration's aws.s3 section, Kafka from its kafka section).
    #[arg(value_name = "S3_URL")]
    url: String,
    /// Only objects last modified at or after this time (RFC 3339).
    #[arg(long, value_parser = humantime::parse_rfc3339_weak, value_name = "TIME")]
    since: Option<std::time::SystemTime>,
    /// Only objects last modified before this time (RFC 3339).
    #[arg(long, value_parser = humantime::parse_rfc3339_weak, value_name = "TIME")]
    until: Option<std::time::SystemTime>,
    /// Only keys with one of these endings, comma-separated, any case
    /// (e.g. .jpg,.png).
    #[arg(long, value_name = "LIST")]
    suffix: Option<String>,
    /// Events per second at most, 0.001 to 1,000,000 (default: as fast as
    /// Kafka takes them).
    #[arg(long, value_name = "N", value_parser = positive_rate)]
    rate: Option<f64>,
    /// List and count (objects, bytes) only; produce nothing.
    #[arg(long)]
    dry_run: bool,
    /// Continue an interrupted backfill from its checkpoint.
    #[arg(long)]
    resume: bool,
    /// Where the checkpoint is kept.
    #[arg(long, default_value = "backfill.checkpoint.json", value_name = "FILE")]
    checkpoint: PathBuf,
    /// Keys listed per request (S3 answers at most 1,000).
    #[arg(long, default_value_t = 1000, value_name = "N")]
    page_size: i32,
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
    /// A baseline (`inferstream baseline`): adds the drift-over-time chart.
    #[arg(long, value_name = "FILE")]
    baseline: Option<PathBuf>,
    /// Ground truth (Model Monitor ground-truth JSON Lines, or {"id",
    /// "label"} lines), s3://bucket/prefix or a local directory: adds the
    /// accuracy-over-time chart and the threshold curve.
    #[arg(long, value_name = "S3_URL_OR_DIR")]
    ground_truth: Option<String>,
}

#[derive(clap::Args)]
struct BaselineArgs {
    /// Where the capture is: s3://bucket/prefix (S3 settings from the
    /// configuration's aws.s3 section) or a local directory.
    #[arg(long, value_name = "S3_URL_OR_DIR")]
    from: String,
    /// The baseline file to write.
    #[arg(long, default_value = "baseline.json", value_name = "FILE")]
    out: PathBuf,
    /// Only predictions made at or after this time (RFC 3339).
    #[arg(long, value_parser = humantime::parse_rfc3339_weak, value_name = "TIME")]
    start: Option<std::time::SystemTime>,
    /// Only predictions made at or before this time (RFC 3339).
    #[arg(long, value_parser = humantime::parse_rfc3339_weak, value_name = "TIME")]
    end: Option<std::time::SystemTime>,
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
    /// Calls that may wait for a worker; more are throttled at once
    /// (ThrottlingException). Unset: any number wait.
    #[arg(long)]
    queue: Option<usize>,
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
    /// expired-token, unrecognized-client, endpoint-not-found, throttled
    /// (400 ThrottlingException at once).
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = cli.config.as_deref();
    match cli.command {
        Command::CheckConfig => app::check_config(config),
        Command::Run => app::run(config),
        Command::Endpoint(args) => {
            let listen = args.listen.clone();
            app::block_on(0, endpoint::command(&listen, args.into()))
        }
        Command::Report(args) => app::block_on(
            0,
            report::command(
                config,
                &args.from,
                &args.out,
                args.baseline.as_deref(),
                args.ground_truth.as_deref(),
            ),
        ),
        Command::Baseline(args) => app::block_on(
            0,
            baseline::command(config, &args.from, &args.out, args.start, args.end),
        ),
        Command::Demo(args) => app::block_on(0, demo::command(config, args.into())),
        Command::Backfill(args) => app::block_on(0, backfill::command(config, args.into())),
        Command::Redrive(args) => app::block_on(
            0,
            redrive::command(
                config,
                redrive::Options {
                    reasons: args
                        .reason
                        .as_deref()
                        // Given but empty (an unset shell variable): refused, not the default.
                        .map(|r| r.split(',').map(|s| s.trim().to_string()).collect())
                        .unwrap_or_default(),
                    since: args.since,
                    dry_run: args.dry_run,
                },
            ),
        ),
    }
}

/// `--rate`: events per second, from 0.001 to 1,000,000.
fn positive_rate(s: &str) -> Result<f64, String> {
    let r: f64 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number of events per second"))?;
    if (0.001..=1e6).contains(&r) {
        Ok(r)
    } else {
        Err(format!(
            "{s} is not between 0.001 and 1000000 events per second; leave --rate out for no limit"
        ))
    }
}

impl From<BackfillArgs> for backfill::Options {
    fn from(args: BackfillArgs) -> backfill::Options {
        backfill::Options {
            url: args.url,
            since: args.since,
            until: args.until,
            suffixes: args
                .suffix
                .as_deref()
                .map(backfill::parse_suffixes)
                .unwrap_or_default(),
            rate: args.rate,
            dry_run: args.dry_run,
            resume: args.resume,
            checkpoint: args.checkpoint,
            page_size: args.page_size,
        }
    }
}

impl From<DemoArgs> for DemoOptions {
    fn from(args: DemoArgs) -> DemoOptions {
        DemoOptions {
            images: args.images,
            threshold: args.threshold,
            report_dir: args.out,
            mode: args.mode.map(|m| {
                if m == "batch" {
                    RequestMode::Batch
                } else {
                    RequestMode::PerImage
                }
            }),
        }
    }
}

impl From<EndpointArgs> for EndpointOptions {
    fn from(args: EndpointArgs) -> EndpointOptions {
        EndpointOptions {
            name: args.name,
            classes: args.classes.max(1),
            workers: args.workers,
            queue: args.queue,
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
        }
    }
}
