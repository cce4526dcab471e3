//! `inferstream demo`: the whole pipeline on one machine with nothing
//! installed.
//!
//! An embedded Kafka (librdkafka's mock cluster), an embedded S3 server
//! (s3s-fs over a temporary directory) and the local endpoint stand in for
//! the real services. The demo makes sample images, uploads them, sends
//! their upload notifications in all four shapes, runs the real service on
//! them, shows progress and alert digests in the terminal (the real digest
//! alerter, with a short window, printing instead of publishing to SNS
//! unless `alerts.topic_arn` is set), prints a summary and writes the
//! report charts from the data capture.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use aws_sdk_s3::config::{Credentials, Region};
use aws_sdk_s3::primitives::ByteStream;
use futures::StreamExt as _;
use indicatif::{ProgressBar, ProgressStyle};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::config::{AlertMode, Config};
use crate::pipeline::digest::Message as Digest;
use crate::tools::endpoint::model::{test_image, FORMATS};
use crate::tools::endpoint::{EndpointOptions, Faults};
use crate::tools::events::{event, SHAPES};

const UPLOADS: &str = "uploads";
const CAPTURE_BUCKET: &str = "inferstream-capture";
const PARTITIONS: i32 = 4;
/// Credentials of the embedded S3 (it checks signatures, like S3).
const DEMO_KEY: &str = "INFERSTREAMDEMO";
const DEMO_SECRET: &str = "inferstream-demo-secret";
/// Shown in the terminal at most; the rest are counted.
const MAX_ALERTS_SHOWN: usize = 12;
/// The demo's digest window (the default is minutes).
const DEMO_DIGEST_WINDOW: Duration = Duration::from_secs(2);
/// 128 random bits from the operating system, as hex.
fn random_token() -> std::io::Result<String> {
    use std::io::Read as _;
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// The demo's control topic, unless console.control_topic names one.
const DEMO_CONTROL_TOPIC: &str = "inferstream-control";
/// The demo's ground-truth topic, unless monitor.ground_truth_topic names one.
const DEMO_GROUND_TRUTH_TOPIC: &str = "inferstream-ground-truth";
/// Lines of a digest's text shown in the terminal.
const DIGEST_LINES_SHOWN: usize = 14;

pub struct DemoOptions {
    /// Images to upload.
    pub images: usize,
    /// Confidence threshold; the configuration's when `None`.
    pub threshold: Option<f64>,
    /// Where the report charts go.
    pub report_dir: PathBuf,
    /// Request mode; the configuration's when `None`.
    pub mode: Option<crate::config::RequestMode>,
}

/// What the demo saw.
#[derive(Debug, Default)]
pub struct Summary {
    pub images: usize,
    pub accepted: usize,
    pub review: usize,
    pub dead_letters: BTreeMap<String, usize>,
    pub alerts_shown: usize,
    /// Digests received, and the review images they account for (listed
    /// or counted in a storm summary).
    pub digests: usize,
    pub digest_images: usize,
    /// From upload of the first image to the last outcome.
    pub elapsed: Duration,
    /// From the first image consumed to the last output, by the records'
    /// timestamps.
    pub classifying: Duration,
    pub metrics_addr: Option<SocketAddr>,
    pub report: Vec<PathBuf>,
}

/// `inferstream demo`: runs the demo with the configuration at `path`
/// (or the default file), prints its summary; exit 2 on bad configuration.
pub async fn command(path: Option<&std::path::Path>, opts: DemoOptions) -> std::process::ExitCode {
    use std::process::ExitCode;
    let cfg = match Config::load_unchecked(crate::app::config_path(path).as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    // The embedded S3 server logs every error response it sends; the demo
    // shows outcomes itself.
    crate::app::init_logging(cfg.log.format, "warn,s3s=off");
    match run(cfg, opts).await {
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

/// Runs the demo. `config` supplies everything not embedded (threshold,
/// labels, batching, SNS when `alerts.topic_arn` is set).
pub async fn run(mut config: Config, opts: DemoOptions) -> anyhow::Result<Summary> {
    if opts.images == 0 {
        bail!("--images must be at least 1");
    }
    let stop = CancellationToken::new();
    let _stop_on_exit = stop.clone().drop_guard();

    // Kafka.
    let kafka = MockCluster::new(1).context("starting the embedded Kafka")?;
    let brokers = kafka.bootstrap_servers();
    for t in [
        &config.kafka.input_topic,
        &config.kafka.results_topic,
        &config.kafka.review_topic,
        &config.kafka.dead_letter_topic,
        &config.alerts.state_topic,
    ] {
        kafka
            .create_topic(t, PARTITIONS, 1)
            .with_context(|| format!("creating topic {t}"))?;
    }
    // The console's live thresholds.
    if config.console.control_topic.is_empty() {
        config.console.control_topic = DEMO_CONTROL_TOPIC.into();
    }
    kafka
        .create_topic(&config.console.control_topic, 1, 1)
        .with_context(|| format!("creating topic {}", config.console.control_topic))?;
    // Reviewers' answers in the console become true labels.
    if config.monitor.ground_truth_topic.is_empty() {
        config.monitor.ground_truth_topic = DEMO_GROUND_TRUTH_TOPIC.into();
    }
    kafka
        .create_topic(&config.monitor.ground_truth_topic, PARTITIONS, 1)
        .with_context(|| format!("creating topic {}", config.monitor.ground_truth_topic))?;

    // S3 and the endpoint.
    let s3_dir = tempfile::tempdir().context("creating a directory for the embedded S3")?;
    // Alerts go to a real SNS topic only when one is configured; then the
    // standard AWS credentials sign every request, and the embedded S3
    // accepts those credentials.
    let sns = config.alerts.enabled && !config.alerts.topic_arn.is_empty();
    let sdk = demo_sdk_config(&config, sns).await;
    let (key, secret) = signing_keys(&sdk).await?;
    let s3_addr = serve_s3(s3_dir.path(), &key, &secret, stop.clone()).await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let endpoint = crate::tools::endpoint::spawn(
        listener,
        EndpointOptions {
            name: None,
            classes: config.endpoint.labels.len(),
            workers: 0,
            queue: None,
            memoize: false,
            faults: Faults {
                latency: Duration::from_millis(5),
                ..Faults::default()
            },
        },
        stop.clone(),
    )?;

    // The service's configuration: everything embedded, SNS only if set.
    let k = &mut config.kafka;
    k.brokers = brokers.clone();
    k.group_id = "inferstream-demo".into();
    k.session_timeout = Duration::from_secs(6);
    k.heartbeat_interval = Duration::from_secs(1);
    k.commit_interval = Duration::from_millis(500);
    config.aws.s3.endpoint_url = format!("http://{s3_addr}");
    config.aws.s3.force_path_style = true;
    config.aws.sagemaker.endpoint_url = endpoint.url();
    // Digests are printed here unless they go to SNS; `each` alerts are
    // printed from the review topic.
    let digests = config.alerts.mode == AlertMode::Digest;
    config.alerts.enabled = sns || digests;
    if digests {
        config.alerts.digest_window = DEMO_DIGEST_WINDOW;
        if !sns {
            // Never called: the digests come to the terminal.
            config.alerts.topic_arn = "arn:aws:sns:local:000000000000:terminal".into();
        }
    }
    config.capture.enabled = true;
    config.capture.destination = format!("s3://{CAPTURE_BUCKET}/demo");
    config.capture.flush_interval = Duration::from_secs(5);
    if let Some(t) = opts.threshold {
        config.route.threshold = t;
    }
    if let Some(mode) = opts.mode {
        config.endpoint.mode = mode;
    }
    if std::net::TcpListener::bind(config.metrics_addr()).is_err() {
        config.metrics.listen = "127.0.0.1:0".into();
    }
    config.console.enabled = true;
    if std::net::TcpListener::bind(&config.console.listen).is_err() {
        config.console.listen = "127.0.0.1:0".into();
    }
    // A token for this run only, printed below; one you set is not printed.
    let console_token = if config.console.token.0.is_empty() {
        let token = random_token().context("making a console token for the demo")?;
        config.console.token = crate::config::Secret(token.clone());
        token
    } else {
        "the one in console.token".into()
    };
    config.validate()?;

    let s3 = crate::clients::aws::s3_client(&sdk, &config);
    for bucket in [UPLOADS, CAPTURE_BUCKET] {
        s3.create_bucket()
            .bucket(bucket)
            .send()
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "creating bucket {bucket}: {}",
                    crate::clients::aws::describe(&e)
                )
            })?;
    }

    let labels = config.endpoint.labels.clone();
    let threshold = config.route.threshold;
    let interpretation = crate::tools::report::Interpretation::from_config(&config);
    println!(
        "inferstream demo: {} images, threshold {threshold}, labels {labels:?}, {} mode",
        opts.images,
        config.endpoint.mode.as_str()
    );
    println!(
        "  embedded Kafka {brokers}, embedded S3 http://{s3_addr}, endpoint {}",
        endpoint.url()
    );
    let started = Instant::now();

    // Upload the images, then announce them.
    let uploads = upload(&s3, opts.images, labels.len()).await?;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()
        .context("creating the demo producer")?;
    let input = config.kafka.input_topic.clone();
    let topics = [
        config.kafka.results_topic.clone(),
        config.kafka.review_topic.clone(),
        config.kafka.dead_letter_topic.clone(),
    ];
    let reader = output_reader(&brokers, &topics)?;

    let shutdown = CancellationToken::new();
    let (digest_tx, mut digest_rx) = tokio::sync::mpsc::unbounded_channel::<Digest>();
    let service = crate::pipeline::start_with(
        config,
        sdk.clone(),
        shutdown.clone(),
        (digests && !sns).then_some(digest_tx),
    )
    .await?;
    if digests && !sns {
        println!(
            "  alert digests every {} here (alerts.digest_window; 5m by default), printed instead of sent to SNS",
            humantime::format_duration(DEMO_DIGEST_WINDOW)
        );
    }
    let metrics_addr = service.metrics_addr;
    if let Some(console) = service.console_addr {
        println!("  console while it runs: http://{console}/ (token for Apply: {console_token})");
    }
    println!("  metrics while it runs: http://{metrics_addr}/metrics\n");

    let sends = uploads.iter().enumerate().map(|(i, u)| {
        let payload = event(SHAPES[i % SHAPES.len()], UPLOADS, &u.key, u.size, &u.etag);
        let producer = &producer;
        let input = &input;
        async move {
            producer
                .send(
                    FutureRecord::to(input).key(&u.key).payload(&payload),
                    Timeout::After(Duration::from_secs(30)),
                )
                .await
                .map_err(|(e, _)| anyhow::anyhow!("sending an upload event: {e}"))
        }
    });
    for r in futures::future::join_all(sends).await {
        r?;
    }

    // Watch the outputs until every image has one.
    let bar = ProgressBar::new(opts.images as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:40.green/white} {pos}/{len} images  {msg}  [{elapsed_precise}]",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut summary = Summary {
        images: opts.images,
        metrics_addr: Some(metrics_addr),
        ..Summary::default()
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut seen = std::collections::HashSet::new();
    let mut more_alerts = 0usize;
    // The service's busy span, from the records' own timestamps (the
    // reader may receive them in bursts).
    let mut span = Span::default();
    while seen.len() < opts.images {
        while let Ok(d) = digest_rx.try_recv() {
            show_digest(&bar, &d, &mut summary);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bar.abandon();
            bail!(
                "only {} of {} images had an outcome after 120 s; see the log above",
                seen.len(),
                opts.images
            );
        }
        let msg =
            match tokio::time::timeout(left.min(Duration::from_millis(250)), reader.recv()).await {
                Ok(Ok(m)) => m,
                Ok(Err(e)) => bail!("reading the output topics: {e}"),
                Err(_) => continue,
            };
        let value: Value =
            serde_json::from_slice(msg.payload().unwrap_or_default()).unwrap_or(Value::Null);
        let key = String::from_utf8_lossy(msg.key().unwrap_or_default()).to_string();
        if !seen.insert(key) {
            continue;
        }
        span.add(&value);
        if msg.topic() == topics[0] {
            summary.accepted += 1;
        } else if msg.topic() == topics[1] {
            summary.review += 1;
            if !sns && !digests {
                if summary.alerts_shown < MAX_ALERTS_SHOWN {
                    say(&bar, format!("  ALERT  {}", alert_line(&value)));
                    summary.alerts_shown += 1;
                } else {
                    more_alerts += 1;
                }
            }
        } else {
            let reason = value["reason"].as_str().unwrap_or("unknown").to_string();
            say(
                &bar,
                format!(
                    "  DEAD LETTER  {reason}: {}",
                    value["detail"].as_str().unwrap_or_default()
                ),
            );
            *summary.dead_letters.entry(reason).or_default() += 1;
        }
        bar.set_position(seen.len() as u64);
        bar.set_message(format!(
            "accepted {}  review {}  dead letters {}",
            summary.accepted,
            summary.review,
            summary.dead_letters.values().sum::<usize>()
        ));
    }
    summary.elapsed = started.elapsed();
    summary.classifying = span.duration();
    bar.finish();
    if more_alerts > 0 {
        println!("  … and {more_alerts} more alerts (all on the review topic)");
    }
    if sns {
        println!(
            "  alerts were published to SNS for the {} review predictions",
            summary.review
        );
    } else if digests {
        // The last window closes a digest window after the last review image.
        let until = Instant::now() + DEMO_DIGEST_WINDOW * 5;
        while summary.digest_images < summary.review {
            let left = until.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, digest_rx.recv()).await {
                Ok(Some(d)) => show_digest(&bar, &d, &mut summary),
                _ => bail!(
                    "digests accounted for {} of {} review images",
                    summary.digest_images,
                    summary.review
                ),
            }
        }
    }

    // Stop the service: it drains, commits and flushes the capture.
    shutdown.cancel();
    service
        .wait()
        .await
        .context("the service stopped on an error")?;

    let loaded =
        crate::tools::report::load_s3(&s3, CAPTURE_BUCKET, "demo", &interpretation).await?;
    summary.report = crate::tools::report::render(&loaded.points, &opts.report_dir)?;
    // Clients first, then the cluster they talk to.
    drop(reader);
    drop(producer);
    drop(kafka);
    Ok(summary)
}

impl Summary {
    /// The table printed at the end.
    pub fn table(&self) -> String {
        let secs = self.elapsed.as_secs_f64();
        let busy = self.classifying.as_secs_f64().max(1e-3);
        let dead: usize = self.dead_letters.values().sum();
        let mut rows = vec![
            ("images".to_string(), self.images.to_string()),
            ("accepted".to_string(), self.accepted.to_string()),
            ("review (alerts)".to_string(), self.review.to_string()),
            ("alert digests".to_string(), self.digests.to_string()),
            ("dead letters".to_string(), dead.to_string()),
        ];
        for (reason, n) in &self.dead_letters {
            rows.push((format!("  {reason}"), n.to_string()));
        }
        rows.push((
            "elapsed".into(),
            format!("{secs:.1} s (uploads, consumer group join, classification)"),
        ));
        rows.push((
            "throughput".into(),
            format!(
                "{:.0} images/s (first image consumed to last output, {:.2} s)",
                self.images as f64 / busy,
                busy
            ),
        ));
        if let Some(addr) = self.metrics_addr {
            rows.push((
                "metrics (while running)".into(),
                format!("http://{addr}/metrics"),
            ));
        }
        let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        let mut out = String::new();
        for (k, v) in rows {
            out.push_str(&format!("  {k:<width$}  {v}\n"));
        }
        if !self.report.is_empty() {
            out.push_str("\n  report:\n");
            for f in &self.report {
                out.push_str(&format!("    {}\n", f.display()));
            }
        }
        out
    }
}

/// Earliest start and latest end of the outputs seen.
#[derive(Default)]
struct Span {
    start: Option<std::time::SystemTime>,
    end: Option<std::time::SystemTime>,
}

impl Span {
    /// A prediction started `latency_ms.total` before `processed_at`; a
    /// dead letter is counted at `failed_at`.
    fn add(&mut self, record: &Value) {
        let at = record["processed_at"]
            .as_str()
            .or_else(|| record["failed_at"].as_str())
            .and_then(|t| humantime::parse_rfc3339_weak(t).ok());
        let Some(end) = at else {
            return;
        };
        let took = record["latency_ms"]["total"].as_f64().unwrap_or(0.0);
        let start = end
            .checked_sub(Duration::from_secs_f64(took.max(0.0) / 1000.0))
            .unwrap_or(end);
        self.start = Some(self.start.map_or(start, |s| s.min(start)));
        self.end = Some(self.end.map_or(end, |e| e.max(end)));
    }

    fn duration(&self) -> Duration {
        match (self.start, self.end) {
            (Some(s), Some(e)) => e.duration_since(s).unwrap_or_default(),
            _ => Duration::ZERO,
        }
    }
}

/// A digest in the terminal: its subject and the start of its text.
fn show_digest(bar: &ProgressBar, d: &Digest, summary: &mut Summary) {
    summary.digests += 1;
    summary.digest_images += if d.images > 0 {
        d.images
    } else {
        d.attributes
            .iter()
            .find(|(name, _, _)| *name == "count")
            .and_then(|(_, _, v)| v.parse().ok())
            .unwrap_or(0)
    };
    let mut text = format!(
        "  DIGEST  {}
",
        d.subject
    );
    let lines: Vec<&str> = d
        .body
        .lines()
        .take_while(|l| !l.starts_with("Digest record"))
        .collect();
    for line in lines.iter().take(DIGEST_LINES_SHOWN) {
        text.push_str(&format!("          {line}\n"));
    }
    if lines.len() > DIGEST_LINES_SHOWN {
        text.push_str("          ...\n");
    }
    say(bar, text.trim_end().to_string());
}

/// A line above the progress bar, or plainly when there is no terminal.
fn say(bar: &ProgressBar, line: String) {
    if bar.is_hidden() {
        println!("{line}");
    } else {
        bar.println(line);
    }
}

fn alert_line(prediction: &Value) -> String {
    format!(
        "Low confidence: {} {:.2} - {}/{}",
        prediction["label"].as_str().unwrap_or("?"),
        prediction["confidence"].as_f64().unwrap_or(0.0),
        prediction["bucket"].as_str().unwrap_or("?"),
        prediction["key"].as_str().unwrap_or("?"),
    )
}

/// Static credentials for the embedded services; the standard chain when
/// alerts go to a real SNS.
async fn demo_sdk_config(config: &Config, sns: bool) -> aws_config::SdkConfig {
    if sns {
        return crate::clients::aws::sdk_config(config).await;
    }
    let region = if config.aws.region.is_empty() {
        "us-east-1".to_string()
    } else {
        config.aws.region.clone()
    };
    aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(Region::new(region))
        .credentials_provider(Credentials::new(
            DEMO_KEY,
            DEMO_SECRET,
            None,
            None,
            "inferstream-demo",
        ))
        .retry_config(aws_config::retry::RetryConfig::disabled())
        .load()
        .await
}

struct Upload {
    key: String,
    size: usize,
    etag: String,
}

/// Uploads `n` sample images: most confident, some not, a few that are not
/// images at all (they end as dead letters).
async fn upload(s3: &aws_sdk_s3::Client, n: usize, classes: usize) -> anyhow::Result<Vec<Upload>> {
    let mut rng = fastrand::Rng::with_seed(42);
    let items: Vec<(String, Vec<u8>)> = (0..n)
        .map(|i| {
            let (format, ext) = FORMATS[i % FORMATS.len()];
            let roll = rng.f64();
            if roll < 0.02 {
                let key = format!("camera {}/IMG_{i:05}.{ext}", i % 3);
                return (key, b"this upload is a text file, not a picture".to_vec());
            }
            let confidence = if roll < 0.85 {
                0.94 + rng.f64() * 0.059
            } else {
                0.55 + rng.f64() * 0.36
            };
            let label = rng.usize(..classes.max(1));
            let key = format!("camera {}/IMG_{i:05}.{ext}", i % 3);
            (key, test_image(label, confidence, classes, 48, format))
        })
        .collect();
    let puts = items.into_iter().map(|(key, body)| async move {
        let size = body.len();
        let out = s3
            .put_object()
            .bucket(UPLOADS)
            .key(&key)
            .body(ByteStream::from(body))
            .send()
            .await
            .map_err(|e| {
                anyhow::anyhow!("uploading {key}: {}", crate::clients::aws::describe(&e))
            })?;
        let etag = out.e_tag.unwrap_or_default().trim_matches('"').to_string();
        Ok::<_, anyhow::Error>(Upload { key, size, etag })
    });
    futures::stream::iter(puts)
        .buffered(16)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect()
}

fn output_reader(brokers: &str, topics: &[String; 3]) -> anyhow::Result<StreamConsumer> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "inferstream-demo-reader")
        .set("enable.auto.commit", "false")
        .create()
        .context("creating the demo's output reader")?;
    let mut tpl = TopicPartitionList::new();
    for t in topics {
        for p in 0..PARTITIONS {
            tpl.add_partition_offset(t, p, Offset::Beginning)?;
        }
    }
    consumer.assign(&tpl)?;
    Ok(consumer)
}

/// Serves S3 (s3s-fs over `root`) on a free loopback port until `stop`.
/// The access key and secret that `sdk` signs with.
async fn signing_keys(sdk: &aws_config::SdkConfig) -> anyhow::Result<(String, String)> {
    use aws_sdk_s3::config::ProvideCredentials as _;
    let provider = sdk.credentials_provider().context(
        "no AWS credentials provider (alerts.topic_arn is set, so SNS needs credentials)",
    )?;
    let creds = provider.provide_credentials().await.map_err(|e| {
        anyhow::anyhow!(
            "alerts.topic_arn is set, so the demo publishes to SNS, but no AWS credentials were found: {e}; \
             configure credentials or leave alerts.topic_arn empty to see alerts in the terminal"
        )
    })?;
    Ok((
        creds.access_key_id().to_string(),
        creds.secret_access_key().to_string(),
    ))
}

/// The embedded S3 (s3s over the file system under `root`), checking
/// SigV4 signatures made with `key` and `secret`; stops with `stop`.
pub async fn serve_s3(
    root: &std::path::Path,
    key: &str,
    secret: &str,
    stop: CancellationToken,
) -> anyhow::Result<SocketAddr> {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use hyper_util::server::conn::auto::Builder as ConnBuilder;

    let fs = s3s_fs::FileSystem::new(root).map_err(|e| anyhow::anyhow!("embedded S3: {e:?}"))?;
    let mut builder = s3s::service::S3ServiceBuilder::new(fs);
    builder.set_auth(s3s::auth::SimpleAuth::from_single(key, secret));
    let service = builder.build();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        let http = ConnBuilder::new(TokioExecutor::new());
        let graceful = hyper_util::server::graceful::GracefulShutdown::new();
        loop {
            let socket = tokio::select! {
                r = listener.accept() => match r {
                    Ok((s, _)) => s,
                    Err(e) => {
                        tracing::warn!(error = %e, "embedded S3 accept failed");
                        continue;
                    }
                },
                _ = stop.cancelled() => break,
            };
            let conn = http.serve_connection(TokioIo::new(socket), service.clone());
            let conn = graceful.watch(conn.into_owned());
            tokio::spawn(async move {
                let _ = conn.await;
            });
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), graceful.shutdown()).await;
    });
    Ok(addr)
}
