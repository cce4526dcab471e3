//! `make bench-backfill`: how fast `inferstream backfill` lists and
//! produces, and how much memory it holds, for a prefix of a million keys.
//!
//! The real binary runs in its own process (so its peak RSS, VmHWM, is its
//! own) against parts in this process: an s3s server whose ListObjectsV2
//! answers from a generated, sorted key space (`photos/0000000.jpg`, …; no
//! objects stored, signatures checked) and librdkafka's mock cluster. Runs:
//! a dry run (listing only), then a backfill that produces every event;
//! the events on the input topic are counted afterwards.
//!
//! `cargo bench --bench backfill -- [--keys N]`; without `--bench` (as
//! `cargo test --all-targets` runs it) a 20,000-key smoke run.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::mocking::MockCluster;
use rdkafka::ClientConfig;
use s3s::dto::{ETag, ListObjectsV2Input, ListObjectsV2Output, Object, Timestamp};
use s3s::{s3_error, S3Request, S3Response, S3Result, S3};
use tokio_util::sync::CancellationToken;

const BUCKET: &str = "uploads";
const INPUT: &str = "s3-events";
const PARTITIONS: i32 = 16;

mod common;
use common::{serve_s3, Res, KEY, SECRET};

/// A bucket of `keys` objects `photos/NNNNNNN.jpg`, listed in key order.
#[derive(Clone)]
struct Listing {
    keys: u64,
    modified: SystemTime,
}

impl Listing {
    fn key(i: u64) -> String {
        format!("photos/{i:07}.jpg")
    }

    /// The index of the first key after `after`.
    fn first_after(&self, after: &str) -> u64 {
        match after
            .strip_prefix("photos/")
            .and_then(|r| r.strip_suffix(".jpg"))
            .and_then(|n| n.parse::<u64>().ok())
        {
            Some(n) => n + 1,
            None if after < "photos/" => 0,
            None => self.keys,
        }
    }
}

#[async_trait::async_trait]
impl S3 for Listing {
    async fn list_objects_v2(
        &self,
        req: S3Request<ListObjectsV2Input>,
    ) -> S3Result<S3Response<ListObjectsV2Output>> {
        let input = req.input;
        if input.bucket != BUCKET {
            return Err(s3_error!(NoSuchBucket));
        }
        let prefix = input.prefix.clone().unwrap_or_default();
        if !"photos/".starts_with(prefix.as_str()) && !prefix.starts_with("photos/") {
            return Ok(S3Response::new(ListObjectsV2Output {
                is_truncated: Some(false),
                key_count: Some(0),
                ..Default::default()
            }));
        }
        let start = match (&input.continuation_token, &input.start_after) {
            (Some(t), _) => self.first_after(t),
            (None, Some(a)) => self.first_after(a),
            (None, None) => 0,
        };
        let max = input.max_keys.unwrap_or(1000).clamp(1, 1000) as u64;
        let end = (start + max).min(self.keys);
        let contents: Vec<Object> = (start..end)
            .map(|i| Object {
                key: Some(Listing::key(i)),
                size: Some(200_000 + (i % 1000) as i64),
                e_tag: Some(ETag::Strong(format!("{i:032x}"))),
                last_modified: Some(Timestamp::from(self.modified)),
                ..Default::default()
            })
            .collect();
        let truncated = end < self.keys;
        Ok(S3Response::new(ListObjectsV2Output {
            name: Some(BUCKET.into()),
            prefix: input.prefix,
            max_keys: Some(max as i32),
            key_count: Some(contents.len() as i32),
            is_truncated: Some(truncated),
            next_continuation_token: truncated.then(|| Listing::key(end - 1)),
            continuation_token: input.continuation_token,
            encoding_type: input.encoding_type,
            contents: Some(contents),
            ..Default::default()
        }))
    }
}

/// What one run of the binary took.
struct Run {
    secs: f64,
    /// VmHWM: every resident page at the peak, the binary's own code
    /// included.
    peak_rss: u64,
    /// The most anonymous memory (heap, stacks) seen in the samples.
    peak_anon: u64,
    cpu: Duration,
    stdout: String,
}

/// A figure of `/proc/PID/status` (`VmHWM:`, `RssAnon:`, ...), bytes.
fn status_bytes(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb = status
        .lines()
        .find_map(|l| l.strip_prefix(field))?
        .split_whitespace()
        .next()?
        .parse::<u64>()
        .ok()?;
    Some(kb * 1024)
}

/// User + system CPU of a running process.
fn cpu(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    let ticks = f.get(11)? + f.get(12)?;
    Some(Duration::from_secs_f64(ticks as f64 / 100.0))
}

/// Runs `inferstream backfill ARGS`, sampling its VmHWM and CPU every 20
/// ms until it exits (the last sample is within 20 ms of its end; VmHWM
/// only grows).
async fn backfill(brokers: &str, s3: SocketAddr, args: &[&str]) -> Res<Run> {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("bench-backfill");
    std::fs::create_dir_all(&dir)?;
    let checkpoint = dir.join(format!("checkpoint-{}.json", std::process::id()));
    let _ = std::fs::remove_file(&checkpoint);
    let started = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_inferstream"))
        .arg("backfill")
        .args(args)
        .arg("--checkpoint")
        .arg(&checkpoint)
        .env_remove("RUST_LOG")
        .env("AWS_ACCESS_KEY_ID", KEY)
        .env("AWS_SECRET_ACCESS_KEY", SECRET)
        .env("AWS_REGION", "us-east-1")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("INFERSTREAM__KAFKA__BROKERS", brokers)
        .env("INFERSTREAM__AWS__S3__ENDPOINT_URL", format!("http://{s3}"))
        .env("INFERSTREAM__AWS__S3__FORCE_PATH_STYLE", "true")
        .env("INFERSTREAM__ALERTS__ENABLED", "false")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let pid = child.id();
    let (mut rss, mut anon, mut used) = (0, 0, Duration::ZERO);
    let status = loop {
        if let Some(r) = status_bytes(pid, "VmHWM:") {
            rss = rss.max(r);
        }
        if let Some(r) = status_bytes(pid, "RssAnon:") {
            anon = anon.max(r);
        }
        if let Some(c) = cpu(pid) {
            used = used.max(c);
        }
        if let Some(status) = child.try_wait()? {
            break status;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let secs = started.elapsed().as_secs_f64();
    let out = child.wait_with_output()?;
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let _ = std::fs::remove_file(&checkpoint);
    if !status.success() {
        return Err(format!(
            "inferstream backfill {args:?}: {status}\n{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    Ok(Run {
        secs,
        peak_rss: rss,
        peak_anon: anon,
        cpu: used,
        stdout,
    })
}

/// Events on the input topic (its end offsets' sum: the mock cluster may
/// drop the oldest of a partition beyond 5 MB, but offsets stay).
fn produced(brokers: &str) -> Res<i64> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "bench-backfill-watermarks")
        .create()?;
    let mut n = 0;
    for p in 0..PARTITIONS {
        n += consumer
            .fetch_watermarks(INPUT, p, Duration::from_secs(10))?
            .1;
    }
    Ok(n)
}

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let benching = args.iter().any(|a| a == "--bench");
    let keys: u64 = args
        .iter()
        .position(|a| a == "--keys")
        .and_then(|i| args.get(i + 1)?.parse().ok())
        .unwrap_or(if benching { 1_000_000 } else { 20_000 });
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
    match runtime.block_on(bench(keys)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("benchmark failed: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn bench(keys: u64) -> Res<()> {
    let stop = CancellationToken::new();
    let _stop = stop.clone().drop_guard();
    let s3 = serve_s3(
        Listing {
            keys,
            modified: SystemTime::now(),
        },
        stop.clone(),
    )
    .await?;
    let kafka = MockCluster::new(1)?;
    let brokers = kafka.bootstrap_servers();
    kafka.create_topic(INPUT, PARTITIONS, 1)?;
    println!("inferstream backfill benchmark: {keys} keys under s3://{BUCKET}/photos/\n");
    println!("| run | objects | seconds | objects/s | CPU s | peak RSS MB | of which heap and stacks MB |");
    println!("|---|---|---|---|---|---|---|");
    let row = |name: &str, n: u64, r: &Run| {
        println!(
            "| {name} | {n} | {:.1} | {:.0} | {:.1} | {:.1} | {:.1} |",
            r.secs,
            n as f64 / r.secs,
            r.cpu.as_secs_f64(),
            r.peak_rss as f64 / 1e6,
            r.peak_anon as f64 / 1e6
        );
    };
    let dry = backfill(&brokers, s3, &["s3://uploads/photos/", "--dry-run"]).await?;
    if !dry.stdout.contains(&format!("{keys} objects listed")) {
        return Err(format!("the dry run listed something else: {}", dry.stdout).into());
    }
    row("dry run (list only)", keys, &dry);
    let full = backfill(&brokers, s3, &["s3://uploads/photos/"]).await?;
    let events = produced(&brokers)?;
    if events != keys as i64 {
        return Err(format!("{events} events produced for {keys} keys: {}", full.stdout).into());
    }
    row("backfill (list, count ahead, produce)", keys, &full);
    Ok(())
}
