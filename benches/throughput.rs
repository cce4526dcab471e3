//! `make bench`: how close the service comes to the endpoint's bound, and
//! what it costs itself.
//!
//! An endpoint that answers in L seconds, serving C calls at once of B
//! images each, classifies at most C·B/L images per second. Each scenario
//! runs the real `inferstream` binary, in its own process so that its CPU
//! time and peak memory are its own, against parts in this process: Kafka
//! is librdkafka's mock cluster, S3 an in-memory s3s server (signatures
//! checked, objects generated, so a 200,000-image backlog costs no disk),
//! and the SageMaker endpoint is `inferstream endpoint` with a fixed latency
//! and C workers. Every image's outcome is read back from the output topics
//! and checked: none missing.
//!
//! `cargo bench --bench throughput -- [SCENARIO…] [--quick]`; without
//! `--bench` (as `cargo test --all-targets` runs it) a small smoke run of
//! two scenarios checks that the benchmark itself works.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use image::ImageFormat;
use inferstream::tools::endpoint::model::noisy_image;
use inferstream::tools::endpoint::{EndpointOptions, Faults};
use inferstream::tools::events::s3_event_at;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Message, Timestamp};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use s3s::dto::{ETag, GetObjectInput, GetObjectOutput, StreamingBlob};
use s3s::{s3_error, S3Request, S3Response, S3Result, S3};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

const BUCKET: &str = "uploads";
const INPUT: &str = "s3-events";
const RESULTS: &str = "inferstream-results";
const REVIEW: &str = "inferstream-review";
const DEAD: &str = "inferstream-dead-letter";
/// The mock cluster keeps at most 5 MB (and 100,000 messages) per
/// partition and deletes older messages, as retention would: 64 partitions
/// hold the 200,000-event backlog (about 1 KB each) and its outputs.
const PARTITIONS: i32 = 64;
const LABELS: usize = 2;

mod common;
use common::{serve_s3, Res, KEY, SECRET};

fn fail<T>(msg: impl Into<String>) -> Res<T> {
    Err(msg.into().into())
}

// ---------------------------------------------------------------- scenarios

#[derive(Clone, Copy, PartialEq, Eq)]
enum Images {
    /// 32×32 PNG and JPEG, about 3 KB and 2 KB.
    Small,
    /// 480×360 JPEG photos, about 200 KB.
    Photos,
}

#[derive(Clone)]
struct Scenario {
    name: &'static str,
    about: &'static str,
    /// "batch" or "per-image".
    mode: &'static str,
    /// Endpoint latency per call, and per image of the call.
    latency: Duration,
    latency_per_image: Duration,
    /// C: endpoint workers, and the service's endpoint.concurrency.
    concurrency: usize,
    /// B: batch.max_images (batch mode).
    batch: usize,
    events: usize,
    images: Images,
    /// Events produced while the service runs, at this fraction of the
    /// bound; `None`: all events are in Kafka before the service starts.
    paced: Option<f64>,
    /// More `INFERSTREAM__…` settings for the service.
    extra: Vec<(&'static str, String)>,
    /// S3's GetObject latency: median and 99th percentile (log-normal);
    /// `None`: it answers at once.
    s3_latency: Option<(Duration, Duration)>,
    /// The endpoint's workers phase by phase (how long, how many), its
    /// capacity changing as it scales; empty: `concurrency` throughout.
    phases: Vec<(Duration, usize)>,
    /// Calls that may wait for a worker; more are throttled.
    queue: Option<usize>,
}

impl Scenario {
    fn images_per_call(&self) -> usize {
        if self.mode == "batch" {
            self.batch
        } else {
            1
        }
    }

    /// C·B/L, `None` when the endpoint answers at once or its capacity
    /// changes.
    fn bound(&self) -> Option<f64> {
        if !self.phases.is_empty() {
            return None;
        }
        self.bound_with(self.concurrency)
    }

    /// C·B/L with C `workers`.
    fn bound_with(&self, workers: usize) -> Option<f64> {
        let b = self.images_per_call();
        let l = self.latency + self.latency_per_image * b as u32;
        (!l.is_zero()).then(|| workers as f64 * b as f64 / l.as_secs_f64())
    }
}

fn scenarios(scale: f64) -> Vec<Scenario> {
    let n = |x: usize| ((x as f64 * scale) as usize).max(200);
    let ms = Duration::from_millis;
    let base = Scenario {
        name: "",
        about: "",
        mode: "batch",
        latency: ms(50),
        latency_per_image: Duration::ZERO,
        concurrency: 4,
        batch: 16,
        events: n(50_000),
        images: Images::Small,
        paced: None,
        extra: vec![],
        s3_latency: None,
        phases: vec![],
        queue: None,
    };
    vec![
        Scenario {
            name: "1-batch",
            about: "L=50ms C=4 B=16, batch mode, 3 KB images",
            ..base.clone()
        },
        Scenario {
            name: "2-per-image",
            about: "L=50ms C=64, per-image mode, 3 KB images",
            mode: "per-image",
            concurrency: 64,
            ..base.clone()
        },
        Scenario {
            name: "3-ceiling",
            about: "L=0, batch mode C=4 B=64: the service's own ceiling",
            latency: Duration::ZERO,
            batch: 64,
            events: n(100_000),
            ..base.clone()
        },
        Scenario {
            name: "3-ceiling-per-image",
            about: "L=0, per-image mode C=32",
            mode: "per-image",
            latency: Duration::ZERO,
            concurrency: 32,
            events: n(50_000),
            ..base.clone()
        },
        Scenario {
            name: "4-backlog",
            about: "as 3-ceiling with 200,000 events waiting at start",
            latency: Duration::ZERO,
            batch: 64,
            events: n(200_000),
            ..base.clone()
        },
        Scenario {
            name: "5-photos-per-image",
            about: "L=50ms C=64, per-image mode, 200 KB photos",
            mode: "per-image",
            concurrency: 64,
            events: n(10_000),
            images: Images::Photos,
            ..base.clone()
        },
        Scenario {
            name: "5-photos",
            about: "L=50ms C=4 B=16, batch mode, 200 KB photos",
            events: n(10_000),
            images: Images::Photos,
            ..base.clone()
        },
        // Batch size against an endpoint whose latency grows with it:
        // 20 ms + 1 ms per image.
        sweep("7-sweep-b8", 8, n(10_000)),
        sweep("7-sweep-b16", 16, n(10_000)),
        sweep("7-sweep-b32", 32, n(10_000)),
        sweep("7-sweep-b64", 64, n(10_000)),
        // S3 as it answers small GETs in a region: tens of milliseconds,
        // with a long tail. The service's fetch settings are its defaults.
        Scenario {
            name: "8-s3-20ms",
            about: "as 1-batch, S3 answering in 20 ms (p99 200 ms)",
            events: n(20_000),
            s3_latency: Some((ms(20), ms(200))),
            ..base.clone()
        },
        Scenario {
            name: "8-s3-50ms",
            about: "as 1-batch, S3 answering in 50 ms (p99 200 ms)",
            events: n(20_000),
            s3_latency: Some((ms(50), ms(200))),
            ..base.clone()
        },
        capacity(
            "9-capacity",
            "L=100ms B=16, endpoint workers 4 → 16 → 2 (20 s each, 4 may queue, more throttled), endpoint.concurrency adaptive",
            4,
            &base,
        ),
        capacity(
            "9-capacity-no-queue",
            "as 9-capacity, but every call beyond the workers is throttled",
            0,
            &base,
        ),
        Scenario {
            name: "6-paced",
            about: "as 1-batch, events arriving at 80% of the bound",
            events: n(20_000),
            paced: Some(0.8),
            ..base.clone()
        },
    ]
}

/// An endpoint that scales in and out while the service runs, with
/// adaptive concurrency: 4 workers, then 16, then 2, each answering a call
/// of 16 images in 100 ms; `queue` calls may wait for a worker, more are
/// throttled. The events outnumber what the phases take: the rest are
/// drained with 32 workers, and every one is checked.
fn capacity(name: &'static str, about: &'static str, queue: usize, base: &Scenario) -> Scenario {
    Scenario {
        name,
        about,
        latency: Duration::from_millis(100),
        concurrency: 4,
        events: 80_000,
        extra: vec![("ENDPOINT__CONCURRENCY", "adaptive".into())],
        phases: vec![
            (Duration::from_secs(20), 4),
            (Duration::from_secs(20), 16),
            (Duration::from_secs(20), 2),
        ],
        queue: Some(queue),
        ..base.clone()
    }
}

fn sweep(name: &'static str, batch: usize, events: usize) -> Scenario {
    Scenario {
        name,
        about: "L = 20 ms + 1 ms per image, C=4, batch mode",
        mode: "batch",
        latency: Duration::from_millis(20),
        latency_per_image: Duration::from_millis(1),
        concurrency: 4,
        batch,
        events,
        images: Images::Small,
        paced: None,
        extra: vec![],
        s3_latency: None,
        phases: vec![],
        queue: None,
    }
}

// ---------------------------------------------------------------- S3

/// Objects `small/{n}.png`, `small/{n}.jpg` and `photo/{n}.jpg` for every
/// n, served from a pool of generated images.
struct ImageStore {
    small_png: Vec<Bytes>,
    small_jpg: Vec<Bytes>,
    photos: Vec<Bytes>,
}

const POOL: usize = 64;

impl ImageStore {
    fn generate() -> ImageStore {
        let make = |i: usize, size: (u32, u32), format: ImageFormat| {
            // About one in seven is not confident enough: review.
            let (label, confidence) = if i % 7 == 3 {
                (i % LABELS, 0.6 + (i % 5) as f64 * 0.05)
            } else {
                (i % LABELS, 0.95 + (i % 5) as f64 * 0.01)
            };
            Bytes::from(noisy_image(
                label, confidence, LABELS, size, format, i as u64,
            ))
        };
        ImageStore {
            small_png: (0..POOL)
                .map(|i| make(i, (32, 32), ImageFormat::Png))
                .collect(),
            small_jpg: (0..POOL)
                .map(|i| make(i, (32, 32), ImageFormat::Jpeg))
                .collect(),
            photos: (0..POOL / 2)
                .map(|i| make(i, (480, 360), ImageFormat::Jpeg))
                .collect(),
        }
    }

    fn get(&self, key: &str) -> Option<&Bytes> {
        let (dir, file) = key.split_once('/')?;
        let (n, ext) = file.split_once('.')?;
        let n: usize = n.parse().ok()?;
        let pool = match (dir, ext) {
            ("small", "png") => &self.small_png,
            ("small", "jpg") => &self.small_jpg,
            ("photo", "jpg") => &self.photos,
            _ => return None,
        };
        pool.get(n % pool.len())
    }

    fn key(images: Images, i: usize) -> String {
        match images {
            Images::Small if i % 2 == 0 => format!("small/{i}.png"),
            Images::Small => format!("small/{i}.jpg"),
            Images::Photos => format!("photo/{i}.jpg"),
        }
    }

    fn mean_size(&self, images: Images) -> usize {
        let pools: Vec<&Vec<Bytes>> = match images {
            Images::Small => vec![&self.small_png, &self.small_jpg],
            Images::Photos => vec![&self.photos],
        };
        let all: Vec<usize> = pools
            .iter()
            .flat_map(|p| p.iter().map(Bytes::len))
            .collect();
        all.iter().sum::<usize>() / all.len().max(1)
    }
}

/// The in-process S3: the images, and the latency the running scenario
/// gives GetObject.
struct BenchS3(Arc<ImageStore>, S3Latency);

type S3Latency = Arc<std::sync::Mutex<Option<(Duration, Duration)>>>;

/// A log-normal latency of this median and 99th percentile (at most 2 s).
fn sample_latency(median: Duration, p99: Duration) -> Duration {
    let sigma = (p99.as_secs_f64() / median.as_secs_f64()).ln() / 2.326;
    // Box-Muller: a standard normal from two uniforms.
    let (u, v) = (fastrand::f64().max(1e-12), fastrand::f64());
    let z = (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos();
    Duration::from_secs_f64((median.as_secs_f64() * (sigma * z).exp()).min(2.0))
}

#[async_trait::async_trait]
impl S3 for BenchS3 {
    async fn get_object(
        &self,
        req: S3Request<GetObjectInput>,
    ) -> S3Result<S3Response<GetObjectOutput>> {
        let input = req.input;
        if input.bucket != BUCKET {
            return Err(s3_error!(NoSuchBucket));
        }
        let Some(body) = self.0.get(&input.key) else {
            return Err(s3_error!(NoSuchKey));
        };
        let latency = *self.1.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((median, p99)) = latency {
            tokio::time::sleep(sample_latency(median, p99)).await;
        }
        let output = GetObjectOutput {
            content_length: Some(body.len() as i64),
            e_tag: Some(ETag::Strong(format!("{:016x}", body.len()))),
            body: Some(StreamingBlob::from(s3s::Body::from(body.clone()))),
            ..Default::default()
        };
        Ok(S3Response::new(output))
    }
}

// ---------------------------------------------------------------- the service

struct ServiceProc {
    child: Child,
    metrics: SocketAddr,
    log: PathBuf,
}

impl Drop for ServiceProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl ServiceProc {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// User + system CPU time of the whole process.
    fn cpu(&self) -> Duration {
        process_cpu(&self.pid().to_string())
    }

    /// Peak resident memory (VmHWM), bytes.
    fn peak_rss(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Outcomes so far: predictions and dead letters.
    async fn outcomes(&self) -> Option<u64> {
        let (status, body) = http_get(self.metrics, "/metrics").await.ok()?;
        if status != 200 {
            return None;
        }
        let sum: f64 = body
            .lines()
            .filter(|l| {
                l.starts_with("inferstream_predictions_total")
                    || l.starts_with("inferstream_dead_letters_total")
            })
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum();
        Some(sum as u64)
    }

    /// Mean S3 fetch and endpoint call durations, ms, from /metrics.
    async fn mean_durations(&self) -> (f64, f64) {
        let Ok((_, body)) = http_get(self.metrics, "/metrics").await else {
            return (f64::NAN, f64::NAN);
        };
        let value = |name: &str| {
            body.lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
                .unwrap_or(f64::NAN)
        };
        let mean = |m: &str| value(&format!("{m}_sum")) / value(&format!("{m}_count")) * 1000.0;
        (
            mean("inferstream_fetch_duration_seconds"),
            mean("inferstream_inference_duration_seconds"),
        )
    }

    async fn stop(mut self) -> Res<()> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
        let end = Instant::now() + Duration::from_secs(60);
        while Instant::now() < end {
            if let Some(s) = self.child.try_wait()? {
                if !s.success() {
                    return fail(format!(
                        "service exited with {s}; log:\n{}",
                        self.log_tail()
                    ));
                }
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        fail("service did not stop within 60 s of SIGTERM")
    }
}

/// User + system CPU time of process `pid` ("self" for this one).
fn process_cpu(pid: &str) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which is in parentheses.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    // utime and stime are fields 14 and 15 of stat, 12 and 13 here.
    let ticks = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
    Duration::from_secs_f64(ticks as f64 / clock_ticks())
}

fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

fn free_port() -> Res<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

async fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await?;
    let text = String::from_utf8_lossy(&buf).to_string();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

fn start_service(s: &Scenario, brokers: &str, s3: SocketAddr, endpoint: &str) -> Res<ServiceProc> {
    let port = free_port()?;
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("bench");
    std::fs::create_dir_all(&dir)?;
    let log = dir.join(format!("{}.log", s.name));
    let mut env: Vec<(String, String)> = vec![
        ("AWS_ACCESS_KEY_ID".into(), KEY.into()),
        ("AWS_SECRET_ACCESS_KEY".into(), SECRET.into()),
        ("AWS_REGION".into(), "us-east-1".into()),
        ("AWS_EC2_METADATA_DISABLED".into(), "true".into()),
    ];
    let mut set = |k: &str, v: String| env.push((format!("INFERSTREAM__{k}"), v));
    set("KAFKA__BROKERS", brokers.to_string());
    set("KAFKA__GROUP_ID", format!("bench-{}", s.name));
    set("KAFKA__SESSION_TIMEOUT", "6s".into());
    set("KAFKA__HEARTBEAT_INTERVAL", "1s".into());
    set("AWS__S3__ENDPOINT_URL", format!("http://{s3}"));
    set("AWS__S3__FORCE_PATH_STYLE", "true".into());
    set("AWS__SAGEMAKER__ENDPOINT_URL", endpoint.to_string());
    set("ALERTS__ENABLED", "false".into());
    set("ENDPOINT__MODE", s.mode.into());
    set("ENDPOINT__CONCURRENCY", s.concurrency.to_string());
    set("BATCH__MAX_IMAGES", s.batch.to_string());
    set("METRICS__LISTEN", format!("127.0.0.1:{port}"));
    set(
        "LOG__LEVEL",
        std::env::var("BENCH_LOG").unwrap_or_else(|_| "warn".into()),
    );
    // The mock broker answers a fetch that found no data only after
    // fetch.wait.max.ms (500 ms by default), even when data arrives
    // meanwhile; a real broker answers as soon as it has data.
    set("KAFKA__CONSUMER_PROPERTIES__FETCH_WAIT_MAX_MS", "10".into());
    for (k, v) in &s.extra {
        set(k, v.clone());
    }
    // BENCH_CONCURRENCY=adaptive (or a number) overrides the scenario's.
    if let Ok(c) = std::env::var("BENCH_CONCURRENCY") {
        set("ENDPOINT__CONCURRENCY", c);
    }
    let child = Command::new(env!("CARGO_BIN_EXE_inferstream"))
        .arg("run")
        .env_remove("RUST_LOG")
        .envs(env)
        .stdout(Stdio::null())
        .stderr(Stdio::from(std::fs::File::create(&log)?))
        .spawn()?;
    Ok(ServiceProc {
        child,
        metrics: SocketAddr::from(([127, 0, 0, 1], port)),
        log,
    })
}

// ---------------------------------------------------------------- Kafka

fn producer(brokers: &str) -> Res<FutureProducer> {
    Ok(ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "20")
        .set("queue.buffering.max.messages", "1000000")
        .set("queue.buffering.max.kbytes", "2097151")
        .create()?)
}

/// Sends events `range`, waiting for every delivery.
async fn produce(
    p: &FutureProducer,
    store: &ImageStore,
    images: Images,
    range: std::ops::Range<usize>,
) -> Res<()> {
    let mut pending = Vec::with_capacity(range.len());
    for i in range {
        pending.push(queue(p, store, images, i)?);
        if pending.len() >= 10_000 {
            settle(pending.drain(..)).await?;
        }
    }
    settle(pending.drain(..)).await
}

/// Queues event `i` in the producer.
fn queue(
    p: &FutureProducer,
    store: &ImageStore,
    images: Images,
    i: usize,
) -> Res<rdkafka::producer::DeliveryFuture> {
    let key = ImageStore::key(images, i);
    let size = store.get(&key).map_or(0, Bytes::len);
    let payload = s3_event_at(
        BUCKET,
        &key,
        size,
        &format!("{size:016x}"),
        SystemTime::now(),
    );
    let record = FutureRecord::to(INPUT).key(&key).payload(&payload);
    p.send_result(record)
        .map_err(|(e, _)| format!("queueing an event: {e}").into())
}

async fn settle(deliveries: impl Iterator<Item = rdkafka::producer::DeliveryFuture>) -> Res<()> {
    for r in futures::future::join_all(deliveries).await {
        match r {
            Ok(Ok(_)) => {}
            Ok(Err((e, _))) => return fail(format!("producing an event: {e}")),
            Err(_) => return fail("producing an event: the producer went away"),
        }
    }
    Ok(())
}

/// Events in the input topic that the mock cluster still has.
fn kept_events(brokers: &str) -> Res<i64> {
    let consumer: rdkafka::consumer::BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "bench-watermarks")
        .create()?;
    let mut kept = 0;
    for p in 0..PARTITIONS {
        let (low, high) = consumer.fetch_watermarks(INPUT, p, Duration::from_secs(10))?;
        kept += high - low;
    }
    Ok(kept)
}

/// One outcome read back from an output topic.
struct Outcome {
    source: (i64, i64),
    dead: Option<String>,
    /// Event time to the output record's timestamp.
    e2e_ms: Option<f64>,
    /// Consumed to prediction made (`latency_ms.total`).
    service_ms: Option<f64>,
    /// When the service consumed the event (ms since the epoch).
    consumed_ms: Option<f64>,
    /// The output record's timestamp (ms since the epoch).
    written_ms: f64,
}

fn epoch_ms(t: &str) -> Option<f64> {
    let t = humantime::parse_rfc3339_weak(t).ok()?;
    Some(t.duration_since(SystemTime::UNIX_EPOCH).ok()?.as_secs_f64() * 1000.0)
}

async fn read_outcomes(brokers: &str, want: usize) -> Res<Vec<Outcome>> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "bench-reader")
        .set("enable.auto.commit", "false")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    for t in [RESULTS, REVIEW, DEAD] {
        for p in 0..PARTITIONS {
            tpl.add_partition_offset(t, p, Offset::Beginning)?;
        }
    }
    consumer.assign(&tpl)?;
    let mut out = Vec::with_capacity(want);
    let mut seen = std::collections::HashSet::new();
    loop {
        let wait = if seen.len() >= want { 1 } else { 5 };
        let msg = match tokio::time::timeout(Duration::from_secs(wait), consumer.recv()).await {
            Ok(m) => m?,
            Err(_) => break,
        };
        let v: Value = serde_json::from_slice(msg.payload().unwrap_or_default())?;
        let written_ms = match msg.timestamp() {
            Timestamp::CreateTime(t) | Timestamp::LogAppendTime(t) => t as f64,
            Timestamp::NotAvailable => 0.0,
        };
        let source = (
            v["source"]["partition"].as_i64().unwrap_or(-1),
            v["source"]["offset"].as_i64().unwrap_or(-1),
        );
        seen.insert(source);
        let processed = v["processed_at"].as_str().and_then(epoch_ms);
        let total = v["latency_ms"]["total"].as_f64();
        out.push(Outcome {
            source,
            dead: (msg.topic() == DEAD).then(|| v["reason"].as_str().unwrap_or("?").to_string()),
            e2e_ms: v["event_time"]
                .as_str()
                .and_then(epoch_ms)
                .map(|e| written_ms - e),
            service_ms: total,
            consumed_ms: processed.zip(total).map(|(p, t)| p - t),
            written_ms,
        });
    }
    Ok(out)
}

// ---------------------------------------------------------------- one run

struct Figures {
    images: usize,
    lost: usize,
    duplicates: usize,
    dead: BTreeMap<String, usize>,
    rate: f64,
    bound: Option<f64>,
    e2e: (f64, f64),
    service: (f64, f64),
    cpu_us: f64,
    peak_rss: u64,
    calls: u64,
    mean_size: usize,
    /// Mean S3 GetObject and InvokeEndpoint durations seen by the service.
    fetch_ms: f64,
    call_ms: f64,
    /// Mean time the endpoint took to answer, as it saw it.
    answer_ms: f64,
    /// CPU cores busy on average while images were processed: the service
    /// and this process (Kafka, S3, endpoint).
    service_cores: f64,
    harness_cores: f64,
    /// How the service followed the endpoint's capacity, phase by phase.
    phases: Vec<Phase>,
}

/// One phase of an endpoint whose capacity changes.
struct Phase {
    workers: usize,
    bound: f64,
    /// Seconds from the phase's start to the first second at 90% of its
    /// bound; `None`: never.
    reached_s: Option<f64>,
    /// Over the phase's second half: images per second, the share of calls
    /// throttled, and the service's mean concurrency limit.
    settled_rate: f64,
    settled_throttled: f64,
    settled_limit: f64,
    /// The share of calls throttled over the whole phase.
    throttled: f64,
}

/// A sample of the run, every 100 ms.
#[derive(Clone, Copy)]
struct Sample {
    at: Instant,
    outcomes: u64,
    calls: u64,
    throttled: u64,
    limit: f64,
}

/// Runs the endpoint through `s.phases`, sampling, then drains the rest of
/// the events with 32 workers.
async fn phases(
    s: &Scenario,
    endpoint: &Arc<inferstream::tools::endpoint::RunningEndpoint>,
    metrics: SocketAddr,
) -> Res<Vec<Phase>> {
    use std::sync::atomic::Ordering::Relaxed;
    let sample = || async {
        let (_, body) = http_get(metrics, "/metrics").await.unwrap_or_default();
        let value = |name: &str| {
            body.lines()
                .filter(|l| l.starts_with(name))
                .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
                .sum::<f64>()
        };
        Sample {
            at: Instant::now(),
            outcomes: (value("inferstream_predictions_total")
                + value("inferstream_dead_letters_total")) as u64,
            calls: endpoint.stats.requests.load(Relaxed),
            throttled: endpoint.stats.throttled.load(Relaxed),
            limit: value("inferstream_endpoint_concurrency_limit"),
        }
    };
    let mut out = Vec::new();
    for &(length, workers) in &s.phases {
        endpoint.set_workers(workers);
        let bound = s.bound_with(workers).unwrap_or(f64::INFINITY);
        let start = Instant::now();
        let mut samples = vec![sample().await];
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        while start.elapsed() < length {
            tick.tick().await;
            samples.push(sample().await);
        }
        // The first second-long stretch at 90% of the bound.
        let reached_s = samples.iter().enumerate().find_map(|(i, a)| {
            let b = samples[i..]
                .iter()
                .find(|b| b.at.duration_since(a.at) >= Duration::from_secs(1))?;
            let rate = (b.outcomes - a.outcomes) as f64 / b.at.duration_since(a.at).as_secs_f64();
            (rate >= 0.9 * bound).then(|| a.at.duration_since(start).as_secs_f64())
        });
        let half = &samples[samples.len() / 2..];
        let (a, b) = (half[0], half[half.len() - 1]);
        let span = b.at.duration_since(a.at).as_secs_f64().max(1e-3);
        out.push(Phase {
            workers,
            bound,
            reached_s,
            settled_rate: (b.outcomes - a.outcomes) as f64 / span,
            settled_throttled: (b.throttled - a.throttled) as f64
                / (b.calls - a.calls).max(1) as f64,
            settled_limit: half.iter().map(|x| x.limit).sum::<f64>() / half.len() as f64,
            throttled: (b.throttled - samples[0].throttled) as f64
                / (b.calls - samples[0].calls).max(1) as f64,
        });
    }
    endpoint.set_workers(32);
    Ok(out)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn p50_p99(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(f64::total_cmp);
    (percentile(&v, 0.5), percentile(&v, 0.99))
}

async fn run(s: &Scenario, store: &Arc<ImageStore>, s3: SocketAddr) -> Res<Figures> {
    let kafka = MockCluster::new(1)?;
    let brokers = kafka.bootstrap_servers();
    for t in [INPUT, RESULTS, REVIEW, DEAD] {
        kafka.create_topic(t, PARTITIONS, 1)?;
    }
    let stop = CancellationToken::new();
    let _stop = stop.clone().drop_guard();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let endpoint = Arc::new(inferstream::tools::endpoint::spawn(
        listener,
        EndpointOptions {
            name: None,
            classes: LABELS,
            workers: s.concurrency,
            queue: s.queue,
            memoize: true,
            faults: Faults {
                latency: s.latency,
                latency_per_image: s.latency_per_image,
                ..Faults::default()
            },
        },
        stop.clone(),
    )?);
    let producer = producer(&brokers)?;
    if s.paced.is_none() {
        produce(&producer, store, s.images, 0..s.events).await?;
        let kept = kept_events(&brokers)?;
        if kept != s.events as i64 {
            return fail(format!(
                "{}: the mock cluster kept {kept} of {} events (retention: 5 MB per partition); use more partitions",
                s.name, s.events
            ));
        }
    }

    let service = start_service(s, &brokers, s3, &endpoint.url())?;
    // Ready: partitions assigned. The CPU and outcome counts from here on
    // are the run's.
    let ready_by = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok((200, _)) = http_get(service.metrics, "/readyz").await {
            break;
        }
        if Instant::now() > ready_by {
            return fail(format!(
                "service not ready after 60 s; log:\n{}",
                service.log_tail()
            ));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let cpu0 = service.cpu();
    let harness0 = process_cpu("self");
    let done0 = service.outcomes().await.unwrap_or(0);

    let pacer = s.paced.map(|fraction| {
        let rate = s.bound().unwrap_or(1000.0) * fraction;
        let producer = producer.clone();
        let store = store.clone();
        let (images, events) = (s.images, s.events);
        tokio::spawn(async move {
            let start = Instant::now();
            let mut sent = 0;
            let mut pending = Vec::new();
            let mut tick = tokio::time::interval(Duration::from_millis(5));
            while sent < events {
                tick.tick().await;
                let due = ((start.elapsed().as_secs_f64() * rate) as usize).min(events);
                for i in sent..due {
                    pending.push(queue(&producer, &store, images, i)?);
                }
                sent = due;
            }
            settle(pending.into_iter()).await
        })
    });

    let phases = (!s.phases.is_empty()).then(|| {
        let endpoint = endpoint.clone();
        let metrics = service.metrics;
        let s = s.clone();
        tokio::spawn(async move { phases(&s, &endpoint, metrics).await })
    });

    // Expected time at the bound (or 10,000/s), with plenty of margin.
    let expect = s.events as f64 / s.bound().unwrap_or(10_000.0).min(10_000.0)
        + s.phases.iter().map(|p| p.0.as_secs_f64()).sum::<f64>();
    let waiting = Instant::now();
    let deadline = waiting + Duration::from_secs_f64(60.0 + expect * 5.0);
    let mut last = 0;
    loop {
        let done = service.outcomes().await.unwrap_or(last);
        last = done;
        if done as usize >= s.events {
            break;
        }
        if Instant::now() > deadline {
            let (_, metrics) = http_get(service.metrics, "/metrics")
                .await
                .unwrap_or_default();
            let counters: Vec<&str> = metrics
                .lines()
                .filter(|l| !l.starts_with('#') && !l.contains("_bucket"))
                .collect();
            return fail(format!(
                "{}: only {done} of {} outcomes before the deadline; metrics:\n{}\nlog:\n{}",
                s.name,
                s.events,
                counters.join("\n"),
                service.log_tail()
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let cpu = service.cpu().saturating_sub(cpu0);
    let harness = process_cpu("self").saturating_sub(harness0);
    let peak_rss = service.peak_rss();
    let waited = waiting.elapsed();
    let means = service.mean_durations().await;
    if let Some(p) = pacer {
        p.await??;
    }
    let phases = match phases {
        Some(p) => p.await??,
        None => vec![],
    };
    service.stop().await?;

    let outcomes = read_outcomes(&brokers, s.events).await?;
    let mut by_source: HashMap<(i64, i64), usize> = HashMap::new();
    for o in &outcomes {
        *by_source.entry(o.source).or_default() += 1;
    }
    let lost = s.events.saturating_sub(by_source.len());
    let duplicates = outcomes.len() - by_source.len();
    let mut dead = BTreeMap::new();
    for o in &outcomes {
        if let Some(r) = &o.dead {
            *dead.entry(r.clone()).or_default() += 1;
        }
    }
    let first = outcomes
        .iter()
        .filter_map(|o| o.consumed_ms)
        .fold(f64::INFINITY, f64::min);
    let end = outcomes.iter().map(|o| o.written_ms).fold(0.0, f64::max);
    let span_s = ((end - first) / 1000.0).max(1e-3);
    let figures = Figures {
        images: s.events,
        lost,
        duplicates,
        dead,
        rate: by_source.len() as f64 / span_s,
        bound: s.bound(),
        e2e: p50_p99(outcomes.iter().filter_map(|o| o.e2e_ms).collect()),
        service: p50_p99(outcomes.iter().filter_map(|o| o.service_ms).collect()),
        cpu_us: cpu.as_secs_f64() * 1e6 / (s.events as u64).saturating_sub(done0).max(1) as f64,
        peak_rss,
        calls: endpoint
            .stats
            .requests
            .load(std::sync::atomic::Ordering::Relaxed),
        answer_ms: endpoint
            .stats
            .answer_micros
            .load(std::sync::atomic::Ordering::Relaxed) as f64
            / 1000.0
            / endpoint
                .stats
                .ok
                .load(std::sync::atomic::Ordering::Relaxed)
                .max(1) as f64,
        mean_size: store.mean_size(s.images),
        fetch_ms: means.0,
        call_ms: means.1,
        service_cores: cpu.as_secs_f64() / waited.as_secs_f64().max(1e-3),
        harness_cores: harness.as_secs_f64() / waited.as_secs_f64().max(1e-3),
        phases,
    };
    drop(producer);
    drop(kafka);
    Ok(figures)
}

// ---------------------------------------------------------------- report

fn row(s: &Scenario, f: &Figures) -> String {
    let bound = f.bound.map_or("∞".to_string(), |b| format!("{b:.0}"));
    let ratio = f
        .bound
        .map_or("—".to_string(), |b| format!("{:.1}%", f.rate / b * 100.0));
    format!(
        "| {} | {} | {:.0} | {bound} | {ratio} | {:.0} / {:.0} | {:.0} / {:.0} | {:.1} | {:.0} | {:.1} | {} | {:.2} / {:.2} |",
        s.name,
        f.images,
        f.rate,
        f.service.0,
        f.service.1,
        f.e2e.0,
        f.e2e.1,
        f.cpu_us,
        f.peak_rss as f64 / 1e6,
        f.images as f64 / f.calls.max(1) as f64,
        f.mean_size,
        f.service_cores,
        f.harness_cores,
    )
}

const HEADER: &str = "| scenario | images | images/s | bound C·B/L | ratio | service latency p50 / p99 ms | end-to-end p50 / p99 ms | service CPU µs/image | peak RSS MB | images/call | image bytes | cores busy: service / harness |\n|---|---|---|---|---|---|---|---|---|---|---|---|";

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let benching = args.iter().any(|a| a == "--bench");
    let quick = args.iter().any(|a| a == "--quick");
    let wanted: Vec<&String> = args.iter().filter(|a| !a.starts_with("--")).collect();
    let (scale, names): (f64, Vec<&str>) = if !benching {
        // `cargo test --all-targets`: check the benchmark works, quickly.
        (0.004, vec!["1-batch", "3-ceiling"])
    } else if quick {
        (0.1, vec![])
    } else {
        (1.0, vec![])
    };
    // Fixed, so that TOKIO_WORKER_THREADS set for the service does not
    // change this process.
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot start a runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let chosen: Vec<Scenario> = scenarios(scale)
        .into_iter()
        .filter(|s| names.is_empty() || names.contains(&s.name))
        .filter(|s| wanted.is_empty() || wanted.iter().any(|w| s.name.starts_with(w.as_str())))
        .collect();
    match runtime.block_on(bench(&chosen, benching)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("benchmark failed: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn bench(chosen: &[Scenario], benching: bool) -> Res<()> {
    let store = Arc::new(ImageStore::generate());
    let stop = CancellationToken::new();
    let _stop = stop.clone().drop_guard();
    let latency = S3Latency::default();
    let s3 = serve_s3(BenchS3(store.clone(), latency.clone()), stop.clone()).await?;
    println!(
        "inferstream benchmark: {} cores; images {} B (32×32) and {} B (480×360 photos)\n",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        store.mean_size(Images::Small),
        store.mean_size(Images::Photos)
    );
    let mut rows = Vec::new();
    for s in chosen {
        println!("{}: {} ({} events)…", s.name, s.about, s.events);
        *latency.lock().unwrap_or_else(|e| e.into_inner()) = s.s3_latency;
        let f = run(s, &store, s3).await?;
        let line = row(s, &f);
        println!(
            "  {:.0} images/s, mean GetObject {:.1} ms, mean InvokeEndpoint {:.1} ms (endpoint side {:.1} ms), service CPU {:.1} µs/image, peak RSS {:.0} MB, lost {}, duplicates {}, dead letters {:?}",
            f.rate,
            f.fetch_ms,
            f.call_ms,
            f.answer_ms,
            f.cpu_us,
            f.peak_rss as f64 / 1e6,
            f.lost,
            f.duplicates,
            f.dead
        );
        for p in &f.phases {
            println!(
                "  {} workers (bound {:.0}/s): 90% of the bound after {}, {:.2}% of calls throttled; second half: {:.0} images/s ({:.1}% of the bound), {:.2}% of calls throttled, mean limit {:.1}",
                p.workers,
                p.bound,
                p.reached_s.map_or("never".to_string(), |t| format!("{t:.1} s")),
                p.throttled * 100.0,
                p.settled_rate,
                p.settled_rate / p.bound * 100.0,
                p.settled_throttled * 100.0,
                p.settled_limit
            );
        }
        if f.lost > 0 || !f.dead.is_empty() {
            return fail(format!(
                "{}: {} images without an outcome, dead letters {:?}",
                s.name, f.lost, f.dead
            ));
        }
        rows.push(line);
    }
    println!("\n{HEADER}");
    for r in &rows {
        println!("{r}");
    }
    if !benching {
        println!("\n(smoke run; `make bench` measures)");
    }
    Ok(())
}
