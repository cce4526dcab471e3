//! The test stack, all real and all on 127.0.0.1 with free ports:
//! librdkafka's mock cluster (in this process, so that it outlives a service
//! that a test kills), `moto_server` for S3, SNS and SQS, `inferstream
//! endpoint` in process, and the service itself as a child process of the
//! real binary.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_sdk_s3::config::{Credentials, Region};
use aws_sdk_s3::primitives::ByteStream;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{DefaultProducerContext, FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use inferstream::tools::endpoint::{EndpointOptions, Faults, RunningEndpoint};
pub use inferstream::tools::events::{event, Shape, SHAPES};

pub const REGION: &str = "us-east-1";
pub const INPUT: &str = "s3-events";
pub const RESULTS: &str = "inferstream-results";
pub const REVIEW: &str = "inferstream-review";
pub const DEAD: &str = "inferstream-dead-letter";
pub const ALERT_STATE: &str = "inferstream-alerts-state";
pub const PARTITIONS: i32 = 4;

/// The binary under test: this build's, or `INFERSTREAM_BIN` (e.g. a
/// release build, or an older one to compare behaviour with).
pub fn binary() -> PathBuf {
    std::env::var_os("INFERSTREAM_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_inferstream")))
}

pub fn free_port() -> u16 {
    let l = StdListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local addr").port()
}

fn log_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("it-logs");
    std::fs::create_dir_all(&dir).expect("create log dir");
    dir
}

fn unique(prefix: &str) -> String {
    format!("{prefix}-{}-{}", std::process::id(), fastrand::u64(..))
}

// ---------------------------------------------------------------- moto

/// `moto_server` on a free port, killed on drop.
pub struct Moto {
    child: Child,
    pub url: String,
}

impl Moto {
    pub async fn start() -> Moto {
        let bin = std::env::var("MOTO_SERVER")
            .map(PathBuf::from)
            .unwrap_or_else(|_| {
                PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/moto_server")
            });
        assert!(
            bin.exists(),
            "moto_server not found at {}; run the tests with `make test`, which installs it",
            bin.display()
        );
        let port = free_port();
        let log = File::create(log_dir().join(format!("moto-{port}.log"))).expect("moto log");
        let child = Command::new(&bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start moto_server");
        let moto = Moto {
            child,
            url: format!("http://127.0.0.1:{port}"),
        };
        let probe = format!("{}/moto-api/", moto.url);
        let end = Instant::now() + Duration::from_secs(60);
        loop {
            if http_get(&probe).await.is_ok() {
                break;
            }
            assert!(
                Instant::now() < end,
                "moto_server did not start on port {port}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        moto
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A minimal HTTP/1.0 GET, enough for probes and /metrics.
pub async fn http_get(url: &str) -> std::io::Result<(u16, String)> {
    http_request("GET", url, &[], "").await
}

/// A minimal HTTP/1.0 request with `headers` and `body`.
pub async fn http_request(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> std::io::Result<(u16, String)> {
    let (status, bytes) = http_request_bytes(method, url, headers, body).await?;
    Ok((status, String::from_utf8_lossy(&bytes).to_string()))
}

/// As [`http_request`], the body as bytes.
pub async fn http_request_bytes(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> std::io::Result<(u16, Vec<u8>)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://").unwrap_or(url);
    let (host, path) = rest
        .split_once('/')
        .map_or((rest, "/".to_string()), |(h, p)| (h, format!("/{p}")));
    let mut s = tokio::net::TcpStream::connect(host).await?;
    let mut head = format!("{method} {path} HTTP/1.0\r\nHost: {host}\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() {
        head.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    head.push_str("\r\n");
    head.push_str(body);
    s.write_all(head.as_bytes()).await?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await?;
    let head_end = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("no end of headers"))?;
    let status = String::from_utf8_lossy(&buf[..head_end])
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other("no status line"))?;
    Ok((status, buf[head_end + 4..].to_vec()))
}

// ---------------------------------------------------------------- stack

pub struct Stack {
    pub kafka: MockCluster<'static, DefaultProducerContext>,
    pub moto: Moto,
    pub endpoint: RunningEndpoint,
    endpoint_stop: CancellationToken,
    pub s3: aws_sdk_s3::Client,
    pub sqs: aws_sdk_sqs::Client,
    pub topic_arn: String,
    pub queue_url: String,
    pub group: String,
    producer: FutureProducer,
}

impl Drop for Stack {
    fn drop(&mut self) {
        self.endpoint_stop.cancel();
    }
}

/// An S3 client for moto (path-style addressing).
pub fn s3_client(sdk: &aws_config::SdkConfig) -> aws_sdk_s3::Client {
    aws_sdk_s3::Client::from_conf(
        aws_sdk_s3::config::Builder::from(sdk)
            .force_path_style(true)
            .build(),
    )
}

/// Asserts that `dir` holds each chart of `names` as PNG and SVG.
pub fn assert_charts(dir: &std::path::Path, names: &[&str]) {
    for name in names {
        for ext in ["png", "svg"] {
            let f = dir.join(format!("{name}.{ext}"));
            assert!(
                std::fs::metadata(&f)
                    .map(|m| m.len() > 1000)
                    .unwrap_or(false),
                "{} is missing or nearly empty",
                f.display()
            );
        }
    }
}

pub async fn aws_config(url: &str) -> aws_config::SdkConfig {
    aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(Region::new(REGION))
        .credentials_provider(Credentials::new("testing", "testing", None, None, "tests"))
        .endpoint_url(url)
        .load()
        .await
}

impl Stack {
    /// Kafka, moto (with bucket `uploads`, an SNS topic and an SQS queue
    /// subscribed to it) and an endpoint with `faults`.
    pub async fn start(faults: Faults) -> Stack {
        Stack::start_with_workers(faults, 0, None).await
    }

    /// A stack whose endpoint serves `workers` calls at once (0: any
    /// number) and throttles a call when `queue` calls wait already.
    pub async fn start_with_workers(faults: Faults, workers: usize, queue: Option<usize>) -> Stack {
        let kafka = MockCluster::new(1).expect("mock cluster");
        for t in [INPUT, RESULTS, REVIEW, DEAD, ALERT_STATE] {
            kafka.create_topic(t, PARTITIONS, 1).expect("create topic");
        }
        let moto = Moto::start().await;
        let sdk = aws_config(&moto.url).await;
        let s3 = s3_client(&sdk);
        let sns = aws_sdk_sns::Client::new(&sdk);
        let sqs = aws_sdk_sqs::Client::new(&sdk);
        for b in ["uploads", "elsewhere", "capture"] {
            s3.create_bucket()
                .bucket(b)
                .send()
                .await
                .expect("create bucket");
        }
        let topic_arn = sns
            .create_topic()
            .name("inferstream-alerts")
            .send()
            .await
            .expect("create topic")
            .topic_arn
            .expect("topic arn");
        let queue_url = sqs
            .create_queue()
            .queue_name("alerts")
            .send()
            .await
            .expect("create queue")
            .queue_url
            .expect("queue url");
        let queue_arn = sqs
            .get_queue_attributes()
            .queue_url(&queue_url)
            .attribute_names(aws_sdk_sqs::types::QueueAttributeName::QueueArn)
            .send()
            .await
            .expect("queue attributes")
            .attributes
            .and_then(|a| {
                a.get(&aws_sdk_sqs::types::QueueAttributeName::QueueArn)
                    .cloned()
            })
            .expect("queue arn");
        sns.subscribe()
            .topic_arn(&topic_arn)
            .protocol("sqs")
            .endpoint(queue_arn)
            .send()
            .await
            .expect("subscribe queue");

        let endpoint_stop = CancellationToken::new();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind endpoint");
        let endpoint = inferstream::tools::endpoint::spawn(
            listener,
            EndpointOptions {
                name: Some("image-classifier".into()),
                classes: 2,
                workers,
                queue,
                memoize: false,
                faults,
            },
            endpoint_stop.clone(),
        )
        .expect("endpoint");

        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", kafka.bootstrap_servers())
            .set("linger.ms", "2")
            // Hostile-input tests send messages near the decoder's 1 MiB cap.
            .set("message.max.bytes", "4000000")
            .create()
            .expect("producer");
        Stack {
            kafka,
            moto,
            endpoint,
            endpoint_stop,
            s3,
            sqs,
            topic_arn,
            queue_url,
            group: unique("inferstream"),
            producer,
        }
    }

    /// The service configuration for this stack, as environment variables.
    pub fn service_env(&self, metrics_port: u16) -> Vec<(String, String)> {
        let v = |k: &str, val: &str| (format!("INFERSTREAM__{k}"), val.to_string());
        vec![
            ("AWS_ACCESS_KEY_ID".into(), "testing".into()),
            ("AWS_SECRET_ACCESS_KEY".into(), "testing".into()),
            ("AWS_REGION".into(), REGION.into()),
            ("AWS_EC2_METADATA_DISABLED".into(), "true".into()),
            v("KAFKA__BROKERS", &self.kafka.bootstrap_servers()),
            v("KAFKA__GROUP_ID", &format!("\"{}\"", self.group)),
            v("KAFKA__SESSION_TIMEOUT", "6s"),
            v("KAFKA__HEARTBEAT_INTERVAL", "500ms"),
            v("KAFKA__COMMIT_INTERVAL", "200ms"),
            v("AWS__S3__ENDPOINT_URL", &self.moto.url),
            v("AWS__S3__FORCE_PATH_STYLE", "true"),
            v("AWS__SNS__ENDPOINT_URL", &self.moto.url),
            v("AWS__SAGEMAKER__ENDPOINT_URL", &self.endpoint.url()),
            v("ALERTS__TOPIC_ARN", &self.topic_arn),
            // Tests of digests say so; the others check one alert per image.
            v("ALERTS__MODE", "each"),
            v("ENDPOINT__BACKOFF_INITIAL", "10ms"),
            v("ENDPOINT__BACKOFF_MAX", "200ms"),
            v("METRICS__LISTEN", &format!("127.0.0.1:{metrics_port}")),
            v("LOG__LEVEL", "info,inferstream=debug"),
        ]
    }

    /// Starts the real binary against this stack; `extra` are more
    /// `INFERSTREAM__…` overrides, e.g. `("ENDPOINT__MODE", "batch")`.
    pub async fn service(&self, extra: &[(&str, &str)]) -> ServiceProc {
        let port = free_port();
        let log_path = log_dir().join(format!("{}.log", unique("service")));
        let log = File::create(&log_path).expect("service log");
        let mut cmd = Command::new(binary());
        cmd.arg("run")
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .env_remove("RUST_LOG")
            .envs(self.service_env(port))
            .stdout(Stdio::null())
            .stderr(Stdio::from(log));
        for (k, val) in extra {
            cmd.env(format!("INFERSTREAM__{k}"), val);
        }
        let child = cmd.spawn().expect("start inferstream");
        let proc = ServiceProc {
            child,
            metrics: SocketAddr::from(([127, 0, 0, 1], port)),
            log: log_path,
        };
        let end = Instant::now() + Duration::from_secs(60);
        while http_get(&proc.url("/healthz")).await.is_err() {
            assert!(
                Instant::now() < end,
                "service did not start; log: {}",
                proc.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        proc
    }

    /// The body of `bucket/key`.
    pub async fn get_object(&self, bucket: &str, key: &str) -> Vec<u8> {
        self.s3
            .get_object()
            .bucket(bucket)
            .key(key)
            .send()
            .await
            .unwrap_or_else(|e| panic!("get {bucket}/{key}: {e:?}"))
            .body
            .collect()
            .await
            .unwrap_or_else(|e| panic!("read {bucket}/{key}: {e:?}"))
            .into_bytes()
            .to_vec()
    }

    pub async fn put_object(&self, bucket: &str, key: &str, body: Vec<u8>) -> String {
        let out = self
            .s3
            .put_object()
            .bucket(bucket)
            .key(key)
            .body(ByteStream::from(body))
            .send()
            .await
            .unwrap_or_else(|e| panic!("put {bucket}/{key}: {e:?}"));
        out.e_tag.unwrap_or_default().trim_matches('"').to_string()
    }

    /// Produces raw payloads to the input topic, spread over partitions by key.
    pub async fn produce(&self, payloads: &[(String, Vec<u8>)]) {
        let sends = payloads.iter().map(|(key, payload)| {
            self.producer.send(
                FutureRecord::to(INPUT).key(key).payload(payload),
                Timeout::Never,
            )
        });
        for r in futures::future::join_all(sends).await {
            r.map_err(|(e, _)| e).expect("produce event");
        }
    }

    /// Every data capture line under `s3://capture/<prefix>/`, with its object key.
    pub async fn captured(&self, prefix: &str) -> Vec<(String, Value)> {
        let mut out = Vec::new();
        let mut pages = self
            .s3
            .list_objects_v2()
            .bucket("capture")
            .prefix(format!("{prefix}/"))
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            for obj in page.expect("list capture").contents.unwrap_or_default() {
                let key = obj.key.expect("object key");
                let body = self
                    .s3
                    .get_object()
                    .bucket("capture")
                    .key(&key)
                    .send()
                    .await
                    .expect("get capture object")
                    .body
                    .collect()
                    .await
                    .expect("read capture object")
                    .into_bytes();
                for line in body.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
                    out.push((
                        key.clone(),
                        serde_json::from_slice(line).expect("capture line is JSON"),
                    ));
                }
            }
        }
        out
    }

    /// Runs `inferstream ARGS` (a tool: report, baseline) with this
    /// stack's configuration; asserts it succeeded and returns its stdout.
    pub fn tool(&self, args: &[&str]) -> String {
        let out = Command::new(binary())
            .args(args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .envs(self.service_env(free_port()))
            .output()
            .unwrap_or_else(|e| panic!("run inferstream {args:?}: {e}"));
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            out.status.success(),
            "inferstream {args:?}: {}\n{stdout}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    }

    pub fn collector(&self) -> Collector {
        Collector::new(&self.kafka.bootstrap_servers())
    }

    /// The input topic's end offsets.
    pub fn input_ends(&self) -> BTreeMap<i32, i64> {
        self.ends(INPUT)
    }

    /// A topic's end offsets.
    pub fn ends(&self, topic: &str) -> BTreeMap<i32, i64> {
        self.watermarks(topic)
            .into_iter()
            .map(|(p, (_, hi))| (p, hi))
            .collect()
    }

    /// A topic's (oldest kept, end) offsets per partition.
    pub fn watermarks(&self, topic: &str) -> BTreeMap<i32, (i64, i64)> {
        let c: StreamConsumer = client(&self.kafka.bootstrap_servers(), &unique("probe"));
        let partitions = c
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .expect("metadata")
            .topics()
            .first()
            .map_or(0, |t| t.partitions().len()) as i32;
        (0..partitions)
            .map(|p| {
                let marks = c
                    .fetch_watermarks(topic, p, Duration::from_secs(10))
                    .expect("watermarks");
                (p, marks)
            })
            .collect()
    }

    /// Waits until the service group has committed every input offset.
    pub async fn wait_committed_to_end(&self, deadline: Duration) {
        self.wait_group_committed_to_end(&self.group, INPUT, deadline)
            .await;
    }

    /// Waits until `group` has committed every offset of `topic`.
    pub async fn wait_group_committed_to_end(&self, group: &str, topic: &str, deadline: Duration) {
        let ends = self.ends(topic);
        let end = Instant::now() + deadline;
        loop {
            let committed = committed_on(&self.kafka.bootstrap_servers(), group, topic);
            if ends
                .iter()
                .all(|(p, hi)| *hi == 0 || committed.get(p) == Some(hi))
            {
                return;
            }
            assert!(
                Instant::now() < end,
                "{topic} not committed to the end by {group}: committed {committed:?}, ends {ends:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SNS alerts delivered to the subscribed queue, as SNS envelopes.
    pub async fn alerts(&self, want: usize, deadline: Duration) -> Vec<Value> {
        let mut got = Vec::new();
        let end = Instant::now() + deadline;
        while got.len() < want {
            assert!(
                Instant::now() < end,
                "got {} of {want} alerts: {got:#?}",
                got.len()
            );
            got.extend(self.receive_alerts().await);
        }
        got
    }

    /// Every record on `topic` now, as JSON.
    pub async fn read_topic(&self, topic: &str) -> Vec<Out> {
        let ends = self.ends(topic);
        let consumer: StreamConsumer = client(&self.kafka.bootstrap_servers(), &unique("read"));
        let mut tpl = TopicPartitionList::new();
        for p in ends.keys() {
            tpl.add_partition_offset(topic, *p, Offset::Beginning)
                .expect("offset");
        }
        consumer.assign(&tpl).expect("assign");
        let mut next: BTreeMap<i32, i64> = ends.keys().map(|p| (*p, 0)).collect();
        let mut out = Vec::new();
        let end = Instant::now() + Duration::from_secs(60);
        while next.iter().any(|(p, n)| n < &ends[p]) {
            let left = end.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "{topic}: read to {next:?} of {ends:?}");
            let Ok(m) = tokio::time::timeout(left, consumer.recv()).await else {
                continue;
            };
            let m = m.expect("read record");
            next.insert(m.partition(), m.offset() + 1);
            out.push(Out {
                topic: topic.to_string(),
                key: String::from_utf8_lossy(m.key().unwrap_or_default()).to_string(),
                value: serde_json::from_slice(m.payload().unwrap_or(b"null"))
                    .unwrap_or_else(|e| panic!("a record on {topic} is not JSON: {e}")),
            });
        }
        out
    }

    /// Produces raw records to one partition of `topic`, in order.
    pub async fn produce_to_partition(
        &self,
        topic: &str,
        partition: i32,
        records: &[(String, Vec<u8>)],
    ) {
        let sends = records.iter().map(|(key, payload)| {
            self.producer.send(
                FutureRecord::to(topic)
                    .partition(partition)
                    .key(key)
                    .payload(payload),
                Timeout::Never,
            )
        });
        for r in futures::future::join_all(sends).await {
            r.map_err(|(e, _)| e).expect("produce record");
        }
    }

    /// Produces raw records to `topic` with the given keys.
    pub async fn produce_to(&self, topic: &str, records: &[(String, Vec<u8>)]) {
        let sends = records.iter().map(|(key, payload)| {
            self.producer.send(
                FutureRecord::to(topic).key(key).payload(payload),
                Timeout::Never,
            )
        });
        for r in futures::future::join_all(sends).await {
            r.map_err(|(e, _)| e).expect("produce record");
        }
    }

    /// Digests (and storm summaries) from SNS until `done` holds; panics
    /// after `deadline`.
    pub async fn digests_until<F: Fn(&[Digest]) -> bool>(
        &self,
        got: &mut Vec<Digest>,
        what: &str,
        deadline: Duration,
        done: F,
    ) {
        let end = Instant::now() + deadline;
        while !done(got) {
            assert!(
                Instant::now() < end,
                "timed out after {deadline:?} waiting for {what}; have {} digests: {:?}",
                got.len(),
                got.iter().map(|d| &d.subject).collect::<Vec<_>>()
            );
            got.extend(self.receive_alerts().await.iter().map(Digest::parse));
        }
    }

    /// Whatever digests arrive within `quiet` (one receive at least).
    pub async fn more_digests(&self, quiet: Duration) -> Vec<Digest> {
        let mut got = Vec::new();
        let end = Instant::now() + quiet;
        loop {
            got.extend(self.receive_alerts().await.iter().map(Digest::parse));
            if Instant::now() >= end {
                return got;
            }
        }
    }

    /// One receive from the alerts queue (waits up to 1 s); deletes what it took.
    async fn receive_alerts(&self) -> Vec<Value> {
        let mut got = Vec::new();
        {
            let out = self
                .sqs
                .receive_message()
                .queue_url(&self.queue_url)
                .max_number_of_messages(10)
                .wait_time_seconds(1)
                .send()
                .await
                .expect("receive alerts");
            for m in out.messages.unwrap_or_default() {
                let body: Value =
                    serde_json::from_str(m.body.as_deref().unwrap_or("")).expect("SNS envelope");
                got.push(body);
                if let Some(h) = m.receipt_handle {
                    self.sqs
                        .delete_message()
                        .queue_url(&self.queue_url)
                        .receipt_handle(h)
                        .send()
                        .await
                        .expect("delete alert");
                }
            }
        }
        got
    }
}

/// A digest or storm summary read back from SNS.
#[derive(Debug, Clone)]
pub struct Digest {
    pub subject: String,
    pub kind: String,
    pub group: String,
    pub text: String,
    /// The machine-readable record at the end of the message.
    pub record: Value,
}

impl Digest {
    fn parse(envelope: &Value) -> Digest {
        let text = envelope["Message"]
            .as_str()
            .expect("SNS message")
            .to_string();
        let attr = |name: &str| {
            envelope["MessageAttributes"][name]["Value"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        };
        let at = text
            .rfind("\n{\"")
            .unwrap_or_else(|| panic!("no record at the end of {text}"));
        let record: Value = serde_json::from_str(text[at..].trim())
            .unwrap_or_else(|e| panic!("record of {text}: {e}"));
        Digest {
            subject: envelope["Subject"].as_str().unwrap_or_default().to_string(),
            kind: attr("kind"),
            group: attr("group"),
            text,
            record,
        }
    }

    /// The prediction ids listed (none for a storm summary).
    pub fn ids(&self) -> Vec<String> {
        self.record["ids"]
            .as_array()
            .map(|a| a.iter().map(|v| v.as_str().unwrap().to_string()).collect())
            .unwrap_or_default()
    }

    /// Images a storm summary counts.
    pub fn suppressed(&self) -> u64 {
        self.record["suppressed"].as_u64().unwrap_or(0)
    }
}

/// Ids listed across `digests`, with how often each was listed.
pub fn listed(digests: &[Digest]) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for d in digests {
        for id in d.ids() {
            *m.entry(id).or_default() += 1;
        }
    }
    m
}

fn client<C: rdkafka::config::FromClientConfig>(brokers: &str, group: &str) -> C {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()
        .expect("kafka client")
}

/// Commits `offsets` (partition, offset) for `group` on `topic`.
pub fn commit_on(brokers: &str, group: &str, topic: &str, offsets: &[(i32, i64)]) {
    let c: StreamConsumer = client(brokers, group);
    let mut tpl = TopicPartitionList::new();
    for (p, o) in offsets {
        tpl.add_partition_offset(topic, *p, Offset::Offset(*o))
            .expect("offset");
    }
    c.commit(&tpl, rdkafka::consumer::CommitMode::Sync)
        .expect("commit");
}

/// `group`'s committed offsets on `topic`.
pub fn committed_on(brokers: &str, group: &str, topic: &str) -> BTreeMap<i32, i64> {
    let c: StreamConsumer = client(brokers, group);
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition(topic, p);
    }
    let got = c
        .committed_offsets(tpl, Duration::from_secs(10))
        .expect("committed offsets");
    got.elements()
        .iter()
        .filter_map(|e| match e.offset() {
            Offset::Offset(o) => Some((e.partition(), o)),
            _ => None,
        })
        .collect()
}

// ---------------------------------------------------------------- outputs

/// One output record.
#[derive(Debug, Clone)]
pub struct Out {
    pub topic: String,
    pub key: String,
    pub value: Value,
}

/// Reads the results, review and dead-letter topics from the beginning.
pub struct Collector {
    consumer: StreamConsumer,
    pub records: Vec<Out>,
}

impl Collector {
    fn new(brokers: &str) -> Collector {
        let consumer: StreamConsumer = client(brokers, &unique("reader"));
        let mut tpl = TopicPartitionList::new();
        for t in [RESULTS, REVIEW, DEAD] {
            for p in 0..PARTITIONS {
                tpl.add_partition_offset(t, p, Offset::Beginning)
                    .expect("offset");
            }
        }
        consumer.assign(&tpl).expect("assign outputs");
        Collector {
            consumer,
            records: Vec::new(),
        }
    }

    /// Reads until `done(records)` holds; panics after `deadline`. `done`
    /// is checked after each burst of records, not after each record.
    pub async fn until<F: Fn(&[Out]) -> bool>(&mut self, what: &str, deadline: Duration, done: F) {
        if let Err(e) = self.try_until(what, deadline, done).await {
            panic!("{e}");
        }
    }

    /// As `until`, but a timeout is returned, so that the caller can add
    /// what it knows (the service's log, which images are missing).
    pub async fn try_until<F: Fn(&[Out]) -> bool>(
        &mut self,
        what: &str,
        deadline: Duration,
        done: F,
    ) -> Result<(), String> {
        let end = Instant::now() + deadline;
        while !done(&self.records) {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!(
                    "timed out after {deadline:?} waiting for {what}; have {} records: {}",
                    self.records.len(),
                    summary(&self.records)
                ));
            }
            self.read(left.min(Duration::from_millis(500))).await;
        }
        Ok(())
    }

    /// Reads until each of `n` images has a prediction (within `deadline`),
    /// waits for the service group to commit to the end of the input, then
    /// reads any late records, so that duplicates are counted too.
    pub async fn all_predicted(&mut self, stack: &Stack, n: usize, deadline: Duration) {
        self.until(
            &format!("a prediction for each of {n} images"),
            deadline,
            |r| predictions_by_id(r).len() >= n,
        )
        .await;
        stack
            .wait_committed_to_end(2 * Duration::from_secs(60))
            .await;
        self.settle(Duration::from_millis(500)).await;
    }

    /// Reads whatever else arrives within `quiet` (to catch extra records).
    pub async fn settle(&mut self, quiet: Duration) {
        while self.read(quiet).await > 0 {}
    }

    /// Waits up to `wait` for a record, then takes every record already
    /// there; returns how many were read.
    async fn read(&mut self, wait: Duration) -> usize {
        let mut n = 0;
        let mut wait = wait;
        while let Ok(m) = tokio::time::timeout(wait, self.consumer.recv()).await {
            // Transient client errors (a broker down on purpose) are retried.
            let m = match m {
                Ok(m) => m,
                Err(e) => {
                    eprintln!("output reader: {e}");
                    continue;
                }
            };
            let value: Value = serde_json::from_slice(m.payload().unwrap_or(b"null"))
                .unwrap_or_else(|e| panic!("output on {} is not JSON: {e}", m.topic()));
            self.records.push(Out {
                topic: m.topic().to_string(),
                key: String::from_utf8_lossy(m.key().unwrap_or_default()).to_string(),
                value,
            });
            n += 1;
            if n >= 5000 {
                break;
            }
            wait = Duration::from_millis(1);
        }
        n
    }

    pub fn on(&self, topic: &str) -> Vec<&Out> {
        self.records.iter().filter(|r| r.topic == topic).collect()
    }
}

pub fn summary(records: &[Out]) -> String {
    let mut by: BTreeMap<String, usize> = BTreeMap::new();
    for r in records {
        let what = match r.value.get("reason").and_then(Value::as_str) {
            Some(reason) => format!("{}:{reason}", r.topic),
            None => r.topic.clone(),
        };
        *by.entry(what).or_default() += 1;
    }
    format!("{by:?}")
}

/// Predictions (results + review) per image id.
pub fn predictions_by_id(records: &[Out]) -> HashMap<String, Vec<&Out>> {
    let mut m: HashMap<String, Vec<&Out>> = HashMap::new();
    for r in records
        .iter()
        .filter(|r| r.topic == RESULTS || r.topic == REVIEW)
    {
        let id = r.value["id"].as_str().unwrap_or_default().to_string();
        m.entry(id).or_default().push(r);
    }
    m
}

// ---------------------------------------------------------------- service

pub struct ServiceProc {
    child: Child,
    pub metrics: SocketAddr,
    pub log: PathBuf,
}

impl ServiceProc {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.metrics)
    }

    pub fn log_text(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(60).collect();
        format!(
            "{} (last lines)\n{}",
            self.log.display(),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        )
    }

    /// Scrapes /metrics into `name{labels}` → value.
    pub async fn metrics(&self) -> BTreeMap<String, f64> {
        let (status, body) = http_get(&self.url("/metrics"))
            .await
            .expect("scrape /metrics");
        assert_eq!(status, 200);
        body.lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .filter_map(|l| {
                let (k, v) = l.rsplit_once(' ')?;
                Some((k.to_string(), v.parse().ok()?))
            })
            .collect()
    }

    /// Sum of a metric family over its labels that contain all of `with`.
    pub async fn metric(&self, name: &str, with: &[&str]) -> f64 {
        self.metrics()
            .await
            .iter()
            .filter(|(k, _)| {
                (k.as_str() == name || k.starts_with(&format!("{name}{{")))
                    && with.iter().all(|w| k.contains(w))
            })
            .map(|(_, v)| v)
            .sum()
    }

    /// Resident memory of the process, from /proc.
    pub fn rss_kb(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    }

    /// The whole log so far.
    pub fn log_all(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits until `metric(name, with)` satisfies `ok`; panics after `deadline`.
    pub async fn wait_metric(
        &self,
        name: &str,
        with: &[&str],
        deadline: Duration,
        ok: impl Fn(f64) -> bool,
    ) -> f64 {
        let end = Instant::now() + deadline;
        loop {
            let v = self.metric(name, with).await;
            if ok(v) {
                return v;
            }
            assert!(
                Instant::now() < end,
                "{name}{with:?} is {v} after {deadline:?}; log: {}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then the exit status (panics if it does not exit in `deadline`).
    pub async fn terminate(mut self, deadline: Duration) -> ExitStatus {
        let pid = self.child.id().to_string();
        let status = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill -TERM");
        assert!(status.success());
        self.wait_exit(deadline).await
    }

    /// Waits until the process ended; its exit status (panics if it is
    /// still running after `deadline`).
    pub async fn wait_exit(&mut self, deadline: Duration) -> ExitStatus {
        let end = Instant::now() + deadline;
        loop {
            if let Some(s) = self.child.try_wait().expect("wait") {
                return s;
            }
            assert!(
                Instant::now() < end,
                "service still running after {deadline:?}; log: {}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for ServiceProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------- S3 faults

/// A TCP proxy in front of moto that misbehaves like S3 under load: per
/// connection, it answers `503 SlowDown` with probability `slow_down`, or
/// holds the request without answering with probability `hang`; other
/// connections are passed through untouched.
pub struct FaultProxy {
    pub url: String,
    pub slowed: Arc<AtomicU64>,
    pub hung: Arc<AtomicU64>,
    /// For [`FaultProxy::outage`]: answer 503 while set.
    pub down: Arc<AtomicBool>,
    stop: CancellationToken,
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// The counters and stop signal a proxy's connections share.
#[derive(Clone)]
struct ProxyState {
    slowed: Arc<AtomicU64>,
    hung: Arc<AtomicU64>,
    down: Arc<AtomicBool>,
    stop: CancellationToken,
}

impl FaultProxy {
    /// Listens on a free port and hands every connection to `serve` (in a
    /// task of its own) until the proxy is dropped.
    async fn spawn<F, Fut>(mut serve: F) -> FaultProxy
    where
        F: FnMut(tokio::net::TcpStream, ProxyState) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind proxy");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let state = ProxyState {
            slowed: Arc::new(AtomicU64::new(0)),
            hung: Arc::new(AtomicU64::new(0)),
            down: Arc::new(AtomicBool::new(false)),
            stop: CancellationToken::new(),
        };
        let proxy = FaultProxy {
            url,
            slowed: state.slowed.clone(),
            hung: state.hung.clone(),
            down: state.down.clone(),
            stop: state.stop.clone(),
        };
        tokio::spawn(async move {
            loop {
                let client = tokio::select! {
                    r = listener.accept() => match r { Ok((c, _)) => c, Err(_) => continue },
                    _ = state.stop.cancelled() => return,
                };
                tokio::spawn(serve(client, state.clone()));
            }
        });
        proxy
    }

    /// A proxy that holds every request of `method` (e.g. `PUT`) without
    /// answering, and passes the others through. Each request goes on a
    /// connection of its own (`Connection: close`), so that the choice is
    /// made per request.
    pub async fn hang_method(upstream: &str, method: &'static str) -> FaultProxy {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let upstream = upstream.trim_start_matches("http://").to_string();
        FaultProxy::spawn(move |mut client, state| {
            let upstream = upstream.clone();
            async move {
                // The request head.
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 65536 {
                    match client.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                if head.starts_with(format!("{method} ").as_bytes()) {
                    state.hung.fetch_add(1, Ordering::Relaxed);
                    state.stop.cancelled().await;
                    return;
                }
                let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") else {
                    return;
                };
                let text = String::from_utf8_lossy(&head[..end]).to_string();
                let mut rewritten: Vec<&str> = text
                    .split("\r\n")
                    .filter(|l| !l.to_ascii_lowercase().starts_with("connection:"))
                    .collect();
                rewritten.push("Connection: close");
                let mut out = rewritten.join("\r\n").into_bytes();
                out.extend_from_slice(b"\r\n\r\n");
                out.extend_from_slice(&head[end + 4..]);
                if let Ok(mut server) = tokio::net::TcpStream::connect(&upstream).await {
                    if server.write_all(&out).await.is_ok() {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                }
            }
        })
        .await
    }

    /// A proxy that answers 503 (and closes the connection) to every
    /// request while `down` is set, and passes connections through
    /// otherwise; it starts down.
    pub async fn outage(upstream: &str) -> FaultProxy {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let upstream = upstream.trim_start_matches("http://").to_string();
        let proxy = FaultProxy::spawn(move |mut client, state| {
            let upstream = upstream.clone();
            async move {
                if state.down.load(Ordering::SeqCst) {
                    let mut buf = [0u8; 4096];
                    let _ = client.read(&mut buf).await;
                    state.slowed.fetch_add(1, Ordering::Relaxed);
                    let resp = "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
                    let _ = client.write_all(resp.as_bytes()).await;
                    let _ = client.shutdown().await;
                } else if let Ok(mut server) = tokio::net::TcpStream::connect(&upstream).await {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                }
            }
        })
        .await;
        proxy.down.store(true, Ordering::SeqCst);
        proxy
    }

    pub async fn start(upstream: &str, slow_down: f64, hang: f64, seed: u64) -> FaultProxy {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let upstream = upstream.trim_start_matches("http://").to_string();
        let mut dice = fastrand::Rng::with_seed(seed);
        FaultProxy::spawn(move |mut client, state| {
            let roll = dice.f64();
            let upstream = upstream.clone();
            async move {
                if roll < slow_down {
                    // Read the request head, then answer like S3 does.
                    let mut buf = [0u8; 4096];
                    let _ = client.read(&mut buf).await;
                    state.slowed.fetch_add(1, Ordering::Relaxed);
                    let body = "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>";
                    let resp = format!(
                        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = client.write_all(resp.as_bytes()).await;
                    let _ = client.shutdown().await;
                } else if roll < slow_down + hang {
                    state.hung.fetch_add(1, Ordering::Relaxed);
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(30)) => {}
                        _ = state.stop.cancelled() => {}
                    }
                } else if let Ok(mut server) = tokio::net::TcpStream::connect(&upstream).await {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                }
            }
        })
        .await
    }
}
