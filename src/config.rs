//! Configuration: typed, layered, validated at start-up.
//!
//! Layers, later ones win: the defaults embedded from
//! `config/inferstream.toml`, the user's file, then environment variables
//! `INFERSTREAM__SECTION__KEY`. Unknown keys are errors. [`Config::validate`]
//! reports every problem at once, each naming its key.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The defaults, embedded in the binary.
pub const DEFAULT_TOML: &str = include_str!("../config/inferstream.toml");

/// Prefix of environment overrides.
pub const ENV_PREFIX: &str = "INFERSTREAM__";

/// The largest request body SageMaker accepts.
pub const SAGEMAKER_MAX_BODY: u64 = 6 * 1024 * 1024;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub kafka: KafkaConfig,
    pub aws: AwsConfig,
    pub filter: FilterConfig,
    pub fetch: FetchConfig,
    pub batch: BatchConfig,
    pub endpoint: EndpointConfig,
    pub route: RouteConfig,
    pub alerts: AlertsConfig,
    pub capture: CaptureConfig,
    pub pipeline: PipelineConfig,
    pub monitor: MonitorConfig,
    pub metrics: MetricsConfig,
    pub console: ConsoleConfig,
    pub log: LogConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// Bootstrap brokers, comma separated.
    pub brokers: String,
    /// Consumer group id.
    pub group_id: String,
    /// Topic carrying S3 notifications.
    pub input_topic: String,
    /// Confident predictions.
    pub results_topic: String,
    /// Low-confidence predictions.
    pub review_topic: String,
    /// Input that cannot be classified.
    pub dead_letter_topic: String,
    /// How often completed offsets are committed.
    #[serde(with = "humantime_serde")]
    pub commit_interval: Duration,
    /// Consumer group session timeout.
    #[serde(with = "humantime_serde")]
    pub session_timeout: Duration,
    /// Consumer group heartbeat interval.
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// "earliest" or "latest".
    pub auto_offset_reset: OffsetReset,
    /// How long a revocation waits for in-flight work of revoked partitions.
    #[serde(with = "humantime_serde")]
    pub revoke_drain_timeout: Duration,
    /// How long an offset commit may take before it is given up (and
    /// retried with the next commit).
    #[serde(with = "humantime_serde")]
    pub commit_timeout: Duration,
    /// Static group membership (`group.instance.id`), e.g. the pod name;
    /// empty for dynamic membership.
    #[serde(default)]
    pub instance_id: String,
    /// Extra librdkafka properties for the consumer and the producer.
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
    /// Extra librdkafka properties for the consumer only.
    #[serde(default)]
    pub consumer_properties: BTreeMap<String, String>,
    /// Extra librdkafka properties for the producer only.
    #[serde(default)]
    pub producer_properties: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OffsetReset {
    Earliest,
    Latest,
}

impl OffsetReset {
    pub fn as_str(self) -> &'static str {
        match self {
            OffsetReset::Earliest => "earliest",
            OffsetReset::Latest => "latest",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AwsConfig {
    /// Region; empty means the standard chain.
    pub region: String,
    pub s3: S3Config,
    pub sagemaker: ServiceEndpoint,
    pub sns: ServiceEndpoint,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Config {
    /// Custom endpoint; empty means AWS.
    pub endpoint_url: String,
    /// Bucket in the path instead of the host name.
    pub force_path_style: bool,
    /// The fetch stage's GetObject without the SDK's per-request
    /// orchestration (see `clients::s3get`); false: through the SDK.
    pub lean_get_object: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceEndpoint {
    /// Custom endpoint; empty means AWS.
    pub endpoint_url: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilterConfig {
    /// Buckets allowed; empty allows all.
    pub allowed_buckets: Vec<String>,
    /// Key prefixes processed; empty allows all.
    pub key_prefixes: Vec<String>,
    /// Key suffixes processed (case-insensitive); empty allows all.
    pub key_suffixes: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FetchConfig {
    /// Concurrent GetObject calls.
    pub concurrency: usize,
    /// Objects larger than this are dead-lettered unread.
    pub max_object_bytes: u64,
    /// Deadline of one GetObject including its body.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Attempts on retryable errors.
    pub max_attempts: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchConfig {
    /// Images per batch at most.
    pub max_images: usize,
    /// Image bytes per batch at most.
    pub max_bytes: u64,
    /// How long a partial batch waits.
    #[serde(with = "humantime_serde")]
    pub max_wait: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RequestMode {
    /// One InvokeEndpoint per image, body = image bytes.
    PerImage,
    /// One InvokeEndpoint per batch, JSON instances.
    Batch,
}

impl RequestMode {
    pub fn as_str(self) -> &'static str {
        match self {
            RequestMode::PerImage => "per-image",
            RequestMode::Batch => "batch",
        }
    }
}

/// The most endpoint calls at once that may be configured.
pub const MAX_CONCURRENCY: usize = 10_000;

/// `endpoint.concurrency`: a fixed number of calls at once, or `"adaptive"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Concurrency {
    Fixed(usize),
    /// Grows while the endpoint keeps its latency and does not throttle,
    /// shrinks when it does not (`pipeline::adaptive`).
    Adaptive,
}

impl Serialize for Concurrency {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Concurrency::Fixed(n) => s.serialize_u64(*n as u64),
            Concurrency::Adaptive => s.serialize_str("adaptive"),
        }
    }
}

impl<'de> Deserialize<'de> for Concurrency {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Concurrency, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(i64),
            Word(String),
        }
        match Raw::deserialize(d)? {
            Raw::Number(n) => usize::try_from(n).map(Concurrency::Fixed).map_err(|_| {
                serde::de::Error::custom(format!(
                    "endpoint.concurrency: {n} is not a number of calls; use 1 or more, or \"adaptive\""
                ))
            }),
            Raw::Word(w) if w.trim().eq_ignore_ascii_case("adaptive") => Ok(Concurrency::Adaptive),
            Raw::Word(w) => Err(serde::de::Error::custom(format!(
                "endpoint.concurrency: `{w}` is neither a number of calls nor \"adaptive\""
            ))),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointConfig {
    /// SageMaker endpoint name.
    pub name: String,
    /// Target production variant; empty lets SageMaker choose.
    pub variant: String,
    /// Request mode.
    pub mode: RequestMode,
    /// Content-Type of per-image requests, or "auto".
    pub content_type: String,
    /// Class labels in the order of the model's output.
    pub labels: Vec<String>,
    /// Calls at once: a number, or learnt from the endpoint's answers.
    pub concurrency: Concurrency,
    /// The most calls at once an adaptive concurrency may reach.
    pub max_concurrency: usize,
    /// Deadline of one call.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Attempts on retryable errors.
    pub max_attempts: u32,
    /// First backoff.
    #[serde(with = "humantime_serde")]
    pub backoff_initial: Duration,
    /// Largest backoff.
    #[serde(with = "humantime_serde")]
    pub backoff_max: Duration,
    /// Consecutive retryable failures that open the circuit.
    pub circuit_failures: u32,
    /// First open period; doubled after each failed probe.
    #[serde(with = "humantime_serde")]
    pub circuit_open_initial: Duration,
    /// Longest open period.
    #[serde(with = "humantime_serde")]
    pub circuit_open_max: Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Accept at or above this confidence.
    pub threshold: f64,
    /// Per-label overrides.
    #[serde(default)]
    pub label_thresholds: BTreeMap<String, f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertsConfig {
    /// Publish SNS alerts for review predictions.
    pub enabled: bool,
    /// SNS topic ARN.
    pub topic_arn: String,
    /// Publish attempts before `alert_failed`.
    pub max_attempts: u32,
    /// Deadline of one Publish call.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// `digest` (one message per window and label group, from the review
    /// topic) or `each` (one message per review image, on the hot path).
    pub mode: AlertMode,
    /// A digest collects review images for this long after its first one.
    #[serde(with = "humantime_serde")]
    pub digest_window: Duration,
    /// Images listed one by one in a digest's text; the rest are counted.
    pub digest_max_items: usize,
    /// Digests per label group: group name -> labels. Labels in no group
    /// share one digest (`all`, or `other` when groups are configured).
    #[serde(default)]
    pub label_groups: BTreeMap<String, Vec<String>>,
    /// What each listed image links to.
    pub link: AlertLink,
    /// Validity of `presigned` links.
    #[serde(with = "humantime_serde")]
    pub presign_expiry: Duration,
    /// An image alerted within this window is not alerted again.
    #[serde(with = "humantime_serde")]
    pub dedup_window: Duration,
    /// Images listed per hour; beyond it, one storm summary per window.
    pub max_per_hour: u32,
    /// Consumer group of the digest alerter; empty means `<kafka.group_id>-alerts`.
    #[serde(default)]
    pub group_id: String,
    /// Compacted topic holding which images were alerted (deduplication).
    pub state_topic: String,
}

/// How review predictions become SNS messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AlertMode {
    /// One message per review image, published before its offset commits.
    Each,
    /// Digests from the review topic, deduplicated, storm-controlled.
    Digest,
}

/// What a digest links each image to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AlertLink {
    /// The S3 console page of the object (needs a console login).
    Console,
    /// A presigned GetObject URL valid for `alerts.presign_expiry`.
    Presigned,
    /// The `s3://bucket/key` URI.
    S3,
}

impl AlertsConfig {
    /// The digest alerter's consumer group.
    pub fn group_id(&self, kafka: &KafkaConfig) -> String {
        if self.group_id.is_empty() {
            format!("{}-alerts", kafka.group_id)
        } else {
            self.group_id.clone()
        }
    }

    /// Whether the digest alerter runs.
    pub fn digests(&self) -> bool {
        self.enabled && self.mode == AlertMode::Digest
    }
}

/// The longest validity of a SigV4 presigned URL.
pub const MAX_PRESIGN_EXPIRY: Duration = Duration::from_secs(7 * 24 * 3600);

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaptureConfig {
    /// Write sampled predictions to S3 as JSON Lines.
    pub enabled: bool,
    /// `s3://bucket/prefix`.
    pub destination: String,
    /// Percentage of predictions captured, 0 to 100.
    pub sampling_percentage: f64,
    /// Also capture the endpoint input (the image, base64).
    pub capture_input: bool,
    /// An object is written when its buffer reaches this size.
    pub max_object_bytes: usize,
    /// ... or when its oldest line is this old.
    #[serde(with = "humantime_serde")]
    pub flush_interval: Duration,
    /// Attempts per object write.
    pub max_attempts: u32,
    /// Deadline of one PutObject call.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// `sagemaker` (Model Monitor's data-capture lines) or `inferstream`.
    pub format: CaptureFormat,
}

/// The shape of a data capture line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CaptureFormat {
    /// Model Monitor's lines under `<prefix>/<endpoint>/<variant>/yyyy/mm/dd/hh/`,
    /// with the prediction in a field of its own (`inferstream`).
    Sagemaker,
    /// `inferstream.capture.v1` lines under `<prefix>/yyyy/mm/dd/hh/`.
    Inferstream,
}

impl CaptureConfig {
    /// Bucket and prefix (without a trailing slash) of `destination`.
    pub fn bucket_and_prefix(&self) -> Option<(String, String)> {
        parse_s3_url(&self.destination)
    }
}

/// `s3://bucket/prefix` → (bucket, prefix without surrounding slashes).
pub fn parse_s3_url(url: &str) -> Option<(String, String)> {
    let rest = url.strip_prefix("s3://")?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.is_empty() {
        return None;
    }
    Some((bucket.to_string(), prefix.trim_matches('/').to_string()))
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineConfig {
    /// Images (and dead letters) in flight at most.
    pub max_in_flight: usize,
    /// Bytes of images fetched (or being fetched) and not yet answered, at
    /// most: what bounds memory with large images.
    pub max_in_flight_bytes: u64,
    /// The whole shutdown on SIGTERM/SIGINT: drain, commit, flush, leave.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// Records one input message may announce; more is `too_many_records`.
    pub max_records_per_message: usize,
    /// Bytes of the original message a dead letter carries at most.
    pub dead_letter_payload_bytes: usize,
    /// Threads running the pipeline's tasks; 0 means one per CPU.
    pub worker_threads: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MonitorConfig {
    /// A baseline made by `inferstream baseline`; empty: no drift metrics.
    pub baseline: String,
    /// The sliding window drift is measured over.
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// Drift is reported once the window holds this many predictions.
    pub min_predictions: u64,
    /// Kafka topic of true labels (`{"id", "label"}` or Model Monitor
    /// ground-truth lines); empty: no accuracy metrics.
    pub ground_truth_topic: String,
    /// Predictions wait this long for their true label; later ones are late.
    #[serde(with = "humantime_serde")]
    pub ground_truth_window: Duration,
    /// `s3://bucket/prefix` of Model Monitor ground-truth JSON Lines
    /// objects (or `{"id", "label"}` lines); empty: none read from S3.
    pub ground_truth_s3: String,
    /// How often the `ground_truth_s3` prefix is listed for new objects.
    #[serde(with = "humantime_serde")]
    pub ground_truth_poll: Duration,
}

/// A secret string: never in `Debug` output or logs.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_empty() { "\"\"" } else { REDACTED })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsoleConfig {
    /// Serve the operator console (its JSON API for now).
    pub enabled: bool,
    /// Its listen address; loopback unless you put it behind access control.
    pub listen: String,
    /// Changes (thresholds) need `Authorization: Bearer <token>`; empty:
    /// every change is refused. Set it from the environment
    /// (INFERSTREAM__CONSOLE__TOKEN), not in a file.
    pub token: Secret,
    /// Compacted Kafka topic of live settings every instance follows (the
    /// thresholds: its latest record wins over `route`); empty: the
    /// thresholds are the configuration's.
    pub control_topic: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Listen address of the metrics and health server.
    pub listen: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// "text" or "json".
    pub format: LogFormat,
    /// EnvFilter directive.
    pub level: String,
}

/// Why configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid TOML: {message}")]
    Parse { path: String, message: String },
    #[error("configuration is invalid: {0}")]
    Shape(String),
    #[error("configuration is invalid:\n{}", .0.iter().map(|e| format!("  - {e}")).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<String>),
}

impl Config {
    /// Defaults, then `path` if given, then the environment.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        Self::load_with_env(path, std::env::vars())
    }

    /// As [`Config::load`], with the environment given explicitly.
    pub fn load_with_env(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let config = Self::load_unchecked_with_env(path, env)?;
        config.validate()?;
        Ok(config)
    }

    /// Layers and parses like [`Config::load`] without [`Config::validate`],
    /// for commands that use only part of the configuration (`report`,
    /// `demo`) and check that part themselves.
    pub fn load_unchecked(path: Option<&Path>) -> Result<Config, ConfigError> {
        Self::load_unchecked_with_env(path, std::env::vars())
    }

    fn load_unchecked_with_env(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut value = parse_toml("<embedded defaults>", DEFAULT_TOML)?;
        if let Some(path) = path {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.display().to_string(),
                source,
            })?;
            let user = parse_toml(&path.display().to_string(), &text)?;
            merge(&mut value, user);
        }
        apply_env(&mut value, env)?;
        value
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Shape(e.message().to_string()))
    }

    /// Parses a complete TOML text layered on the defaults (no environment).
    pub fn from_toml_str(text: &str) -> Result<Config, ConfigError> {
        let mut value = parse_toml("<embedded defaults>", DEFAULT_TOML)?;
        merge(&mut value, parse_toml("<string>", text)?);
        let config: Config = value
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Shape(e.message().to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// Every problem at once, each naming its key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut errors = Vec::new();
        let mut err = |key: &str, problem: String| errors.push(format!("{key}: {problem}"));

        let k = &self.kafka;
        if k.brokers.split(',').all(|b| b.trim().is_empty()) {
            err(
                "kafka.brokers",
                "is empty; give host:port[,host:port]".into(),
            );
        }
        if k.group_id.trim().is_empty() {
            err("kafka.group_id", "is empty".into());
        }
        let topics = [
            ("kafka.input_topic", &k.input_topic),
            ("kafka.results_topic", &k.results_topic),
            ("kafka.review_topic", &k.review_topic),
            ("kafka.dead_letter_topic", &k.dead_letter_topic),
        ];
        for (key, topic) in topics {
            if topic.trim().is_empty() {
                err(key, "is empty".into());
            }
        }
        if k.input_topic.starts_with('^') {
            err(
                "kafka.input_topic",
                format!(
                    "`{}` is a pattern; inferstream reads one named topic",
                    k.input_topic
                ),
            );
        }
        for (key, topic) in &topics[1..] {
            if *topic == &k.input_topic {
                err(
                    key,
                    format!("is the input topic `{topic}`; outputs would be consumed again"),
                );
            }
        }
        if k.commit_interval.is_zero() {
            err("kafka.commit_interval", "must be above zero".into());
        }
        if k.commit_timeout.is_zero() {
            err("kafka.commit_timeout", "must be above zero".into());
        }
        if k.instance_id.chars().any(char::is_whitespace) {
            err(
                "kafka.instance_id",
                format!("`{}` contains whitespace", k.instance_id),
            );
        }
        if k.heartbeat_interval >= k.session_timeout {
            err(
                "kafka.heartbeat_interval",
                format!(
                    "({}) must be below kafka.session_timeout ({})",
                    humantime::format_duration(k.heartbeat_interval),
                    humantime::format_duration(k.session_timeout)
                ),
            );
        }
        let tables = [
            ("kafka.properties", &k.properties),
            ("kafka.consumer_properties", &k.consumer_properties),
            ("kafka.producer_properties", &k.producer_properties),
        ];
        for (table, key) in tables
            .iter()
            .flat_map(|(t, m)| m.keys().map(move |k| (*t, k)))
        {
            if let Some((_, why)) = MANAGED_KAFKA_PROPERTIES
                .iter()
                .find(|(name, _)| *name == key.as_str())
            {
                err(
                    &format!("{table}.\"{key}\""),
                    format!("is managed by inferstream ({why}); remove it"),
                );
            }
        }
        let message_max = k
            .producer_properties
            .get("message.max.bytes")
            .or_else(|| k.properties.get("message.max.bytes"));
        let message_max = match message_max.map(|v| v.trim().parse::<usize>()) {
            None => Some(LIBRDKAFKA_MESSAGE_MAX_BYTES),
            Some(Ok(n)) => Some(n),
            Some(Err(_)) => {
                err(
                    "kafka.producer_properties.\"message.max.bytes\"",
                    "is not a number of bytes".into(),
                );
                None
            }
        };

        for (key, url) in [
            ("aws.s3.endpoint_url", &self.aws.s3.endpoint_url),
            (
                "aws.sagemaker.endpoint_url",
                &self.aws.sagemaker.endpoint_url,
            ),
            ("aws.sns.endpoint_url", &self.aws.sns.endpoint_url),
        ] {
            if !(url.is_empty() || url.starts_with("http://") || url.starts_with("https://")) {
                err(
                    key,
                    format!("`{url}` is not an http:// or https:// URL; leave it empty for AWS"),
                );
            }
        }

        if self.fetch.concurrency == 0 {
            err("fetch.concurrency", "must be at least 1".into());
        }
        if self.fetch.max_object_bytes == 0 {
            err("fetch.max_object_bytes", "must be above zero".into());
        }
        if self.endpoint.mode == RequestMode::PerImage
            && self.fetch.max_object_bytes > SAGEMAKER_MAX_BODY
        {
            err(
                "fetch.max_object_bytes",
                format!(
                    "{} is above the 6 MiB ({SAGEMAKER_MAX_BODY}) SageMaker request limit",
                    self.fetch.max_object_bytes
                ),
            );
        }
        if self.fetch.max_attempts == 0 {
            err("fetch.max_attempts", "must be at least 1".into());
        }
        if self.fetch.timeout.is_zero() {
            err("fetch.timeout", "must be above zero".into());
        }

        let c = &self.capture;
        if c.enabled {
            if c.bucket_and_prefix().is_none() {
                err(
                    "capture.destination",
                    format!("`{}` is not an s3://bucket/prefix URL", c.destination),
                );
            }
            if !(0.0..=100.0).contains(&c.sampling_percentage) {
                err(
                    "capture.sampling_percentage",
                    format!("{} is not between 0 and 100", c.sampling_percentage),
                );
            }
            if c.max_object_bytes == 0 {
                err("capture.max_object_bytes", "must be above zero".into());
            }
            if c.flush_interval.is_zero() {
                err("capture.flush_interval", "must be above zero".into());
            }
            if c.max_attempts == 0 {
                err("capture.max_attempts", "must be at least 1".into());
            }
            if c.timeout.is_zero() {
                err("capture.timeout", "must be above zero".into());
            }
        }

        let e = &self.endpoint;
        if e.circuit_failures == 0 {
            err("endpoint.circuit_failures", "must be at least 1".into());
        }
        if e.circuit_open_initial.is_zero() {
            err("endpoint.circuit_open_initial", "must be above zero".into());
        }
        if e.circuit_open_max < e.circuit_open_initial {
            err(
                "endpoint.circuit_open_max",
                "must not be below endpoint.circuit_open_initial".into(),
            );
        }
        if e.circuit_failures > e.max_attempts {
            err(
                "endpoint.circuit_failures",
                format!(
                    "({}) must not exceed endpoint.max_attempts ({}): an outage would dead-letter images before the circuit opens",
                    e.circuit_failures, e.max_attempts
                ),
            );
        }

        if self.batch.max_images == 0 {
            err("batch.max_images", "must be at least 1".into());
        }
        if self.batch.max_bytes == 0 {
            err("batch.max_bytes", "must be above zero".into());
        }
        if self.endpoint.mode == RequestMode::Batch
            && batch_request_bytes(self.fetch.max_object_bytes) > SAGEMAKER_MAX_BODY
        {
            err(
                "fetch.max_object_bytes",
                format!(
                    "{} is too large for batch mode: an image that size alone makes a request over the 6 MiB SageMaker limit once base64-encoded; use at most {}",
                    self.fetch.max_object_bytes,
                    max_batch_image_bytes()
                ),
            );
        }
        if self.endpoint.mode == RequestMode::Batch
            && self.batch.max_bytes * 4 / 3 > SAGEMAKER_MAX_BODY
        {
            err(
                "batch.max_bytes",
                format!(
                    "{} base64-encoded exceeds the 6 MiB SageMaker request limit; use at most {}",
                    self.batch.max_bytes,
                    SAGEMAKER_MAX_BODY * 3 / 4 - 64 * 1024
                ),
            );
        }

        let e = &self.endpoint;
        if e.name.trim().is_empty() {
            err("endpoint.name", "is empty".into());
        }
        if e.labels.is_empty() {
            err(
                "endpoint.labels",
                "is empty; list the model's classes in output order".into(),
            );
        }
        let mut seen = std::collections::BTreeSet::new();
        for label in &e.labels {
            if label.trim().is_empty() {
                err("endpoint.labels", "contains an empty label".into());
            } else if !seen.insert(label) {
                err("endpoint.labels", format!("label `{label}` appears twice"));
            }
        }
        if e.concurrency == Concurrency::Fixed(0) {
            err(
                "endpoint.concurrency",
                "must be at least 1, or \"adaptive\"".into(),
            );
        }
        if !(1..=MAX_CONCURRENCY).contains(&e.max_concurrency) {
            err(
                "endpoint.max_concurrency",
                format!("{} is outside 1..={MAX_CONCURRENCY}", e.max_concurrency),
            );
        }
        if let Concurrency::Fixed(n) = e.concurrency {
            if n > MAX_CONCURRENCY {
                err(
                    "endpoint.concurrency",
                    format!("{n} is over {MAX_CONCURRENCY}"),
                );
            }
        }
        if e.max_attempts == 0 {
            err("endpoint.max_attempts", "must be at least 1".into());
        }
        if e.timeout.is_zero() {
            err("endpoint.timeout", "must be above zero".into());
        }
        if e.backoff_initial < Duration::from_millis(1) {
            // Zero would retry throttled calls at once, as fast as the
            // endpoint can refuse them.
            err(
                "endpoint.backoff_initial",
                "must be at least 1ms (e.g. \"100ms\")".into(),
            );
        }
        if e.backoff_initial > e.backoff_max {
            err(
                "endpoint.backoff_initial",
                "must not exceed endpoint.backoff_max".into(),
            );
        }
        if e.content_type.trim().is_empty() {
            err(
                "endpoint.content_type",
                "is empty; use application/x-image or auto".into(),
            );
        }

        if !(0.0..=1.0).contains(&self.route.threshold) {
            err(
                "route.threshold",
                format!("{} is outside 0..=1", self.route.threshold),
            );
        }
        for (label, t) in &self.route.label_thresholds {
            let key = format!("route.label_thresholds.{label}");
            if !(0.0..=1.0).contains(t) {
                err(&key, format!("{t} is outside 0..=1"));
            }
            if !e.labels.contains(label) {
                err(
                    &key,
                    format!("`{label}` is not one of endpoint.labels {:?}", e.labels),
                );
            }
        }

        if self.alerts.enabled && !self.alerts.topic_arn.starts_with("arn:") {
            err(
                "alerts.topic_arn",
                if self.alerts.topic_arn.is_empty() {
                    "is empty; set your SNS topic ARN or set alerts.enabled = false".into()
                } else {
                    format!(
                        "`{}` is not an ARN (arn:aws:sns:REGION:ACCOUNT:NAME)",
                        self.alerts.topic_arn
                    )
                },
            );
        }
        if self.alerts.max_attempts == 0 {
            err("alerts.max_attempts", "must be at least 1".into());
        }
        if self.alerts.timeout.is_zero() {
            err("alerts.timeout", "must be above zero".into());
        }
        let a = &self.alerts;
        if a.digest_window.is_zero() {
            err("alerts.digest_window", "must be above zero".into());
        }
        if a.digest_max_items == 0 {
            err("alerts.digest_max_items", "must be at least 1".into());
        }
        if a.max_per_hour == 0 {
            err(
                "alerts.max_per_hour",
                "must be at least 1 (set alerts.enabled = false for no alerts)".into(),
            );
        }
        if a.dedup_window < a.digest_window {
            err(
                "alerts.dedup_window",
                format!(
                    "({}) must not be below alerts.digest_window ({})",
                    humantime::format_duration(a.dedup_window),
                    humantime::format_duration(a.digest_window)
                ),
            );
        }
        if a.presign_expiry.is_zero() || a.presign_expiry > MAX_PRESIGN_EXPIRY {
            err(
                "alerts.presign_expiry",
                format!(
                    "{} is outside 1s..=7days, the validity SigV4 allows",
                    humantime::format_duration(a.presign_expiry)
                ),
            );
        }
        let mut grouped = BTreeMap::new();
        for (group, labels) in &a.label_groups {
            let key = format!("alerts.label_groups.{group}");
            if group.trim().is_empty() || !group.chars().all(|c| c.is_ascii_graphic()) {
                err(
                    &key,
                    "a group name must be printable ASCII without spaces".into(),
                );
            }
            if labels.is_empty() {
                err(&key, "lists no label".into());
            }
            for label in labels {
                if !self.endpoint.labels.contains(label) {
                    err(
                        &key,
                        format!(
                            "`{label}` is not one of endpoint.labels {:?}",
                            self.endpoint.labels
                        ),
                    );
                } else if let Some(other) = grouped.insert(label.clone(), group.clone()) {
                    err(&key, format!("`{label}` is in group `{other}` already"));
                }
            }
        }
        if a.digests() {
            let k = &self.kafka;
            if a.state_topic.trim().is_empty() {
                err("alerts.state_topic", "is empty".into());
            }
            for (key, topic) in [
                ("kafka.input_topic", &k.input_topic),
                ("kafka.results_topic", &k.results_topic),
                ("kafka.review_topic", &k.review_topic),
                ("kafka.dead_letter_topic", &k.dead_letter_topic),
            ] {
                if *topic == a.state_topic {
                    err(
                        "alerts.state_topic",
                        format!("is {key} `{topic}`; use a topic of its own"),
                    );
                }
            }
            if a.group_id(k) == k.group_id {
                err(
                    "alerts.group_id",
                    format!(
                        "is kafka.group_id `{}`; the alerter needs a group of its own",
                        k.group_id
                    ),
                );
            }
        }

        if self.monitor.ground_truth_window.is_zero() {
            err("monitor.ground_truth_window", "must be above zero".into());
        }
        let s3 = &self.monitor.ground_truth_s3;
        if !s3.is_empty() {
            match parse_s3_url(s3) {
                None => err(
                    "monitor.ground_truth_s3",
                    format!("`{s3}` is not an s3://bucket/prefix URL"),
                ),
                Some((_, prefix)) if prefix.ends_with(".jsonl") => err(
                    "monitor.ground_truth_s3",
                    format!("`{s3}` names an object; give the prefix the ground-truth objects are written under"),
                ),
                Some((bucket, prefix)) => {
                    let overlaps = |(b, p): (String, String)| {
                        b == bucket
                            && (p.is_empty()
                                || prefix.is_empty()
                                || format!("{p}/").starts_with(&format!("{prefix}/"))
                                || format!("{prefix}/").starts_with(&format!("{p}/")))
                    };
                    if self.capture.enabled && self.capture.bucket_and_prefix().is_some_and(overlaps) {
                        err(
                            "monitor.ground_truth_s3",
                            format!(
                                "`{s3}` overlaps capture.destination `{}`; capture lines are not ground truth, give them prefixes of their own",
                                self.capture.destination
                            ),
                        );
                    }
                }
            }
        }
        if self.monitor.ground_truth_poll < Duration::from_secs(1) {
            err("monitor.ground_truth_poll", "must be at least 1s".into());
        }
        let gt = &self.monitor.ground_truth_topic;
        if !gt.is_empty() {
            for (key, topic) in [
                ("kafka.input_topic", &self.kafka.input_topic),
                ("kafka.results_topic", &self.kafka.results_topic),
                ("kafka.review_topic", &self.kafka.review_topic),
                ("kafka.dead_letter_topic", &self.kafka.dead_letter_topic),
            ] {
                if topic == gt {
                    err(
                        "monitor.ground_truth_topic",
                        format!("is {key} `{topic}`; true labels need a topic of their own"),
                    );
                }
            }
        }
        if self.monitor.window < Duration::from_secs(1) {
            err(
                "monitor.window",
                "must be at least 1s (it slides a tenth at a time)".into(),
            );
        }
        if !self.monitor.baseline.is_empty() && !Path::new(&self.monitor.baseline).is_file() {
            err(
                "monitor.baseline",
                format!(
                    "`{}` is not a file; make one with `inferstream baseline --from CAPTURE --out FILE`",
                    self.monitor.baseline
                ),
            );
        }

        let p = &self.pipeline;
        if p.max_in_flight_bytes < 1 << 20 {
            err(
                "pipeline.max_in_flight_bytes",
                format!(
                    "is {}; it must be at least 1048576 (1 MiB)",
                    p.max_in_flight_bytes
                ),
            );
        }
        if p.max_in_flight == 0 {
            err("pipeline.max_in_flight", "must be at least 1".into());
        }
        if p.max_records_per_message == 0 {
            err(
                "pipeline.max_records_per_message",
                "must be at least 1".into(),
            );
        } else if p.max_records_per_message > p.max_in_flight {
            err(
                "pipeline.max_records_per_message",
                format!(
                    "({}) must not exceed pipeline.max_in_flight ({}): every record of a message is in flight at once",
                    p.max_records_per_message, p.max_in_flight
                ),
            );
        }
        if p.dead_letter_payload_bytes < 256 {
            err(
                "pipeline.dead_letter_payload_bytes",
                format!("{} is below 256 bytes", p.dead_letter_payload_bytes),
            );
        } else if let Some(max) = message_max {
            let worst = crate::record::max_dead_letter_bytes(p.dead_letter_payload_bytes);
            if worst > max {
                err(
                    "pipeline.dead_letter_payload_bytes",
                    format!(
                        "({}) makes dead letters of up to {worst} bytes (JSON escapes a control character in 6), above the producer's message.max.bytes ({max}); use at most {}",
                        p.dead_letter_payload_bytes,
                        crate::record::max_dead_letter_payload(max)
                    ),
                );
            }
        }
        if p.shutdown_timeout < Duration::from_secs(1) {
            err(
                "pipeline.shutdown_timeout",
                "must be at least 1s (drain, commit, flush and leave the group)".into(),
            );
        }
        if self.pipeline.worker_threads > 512 {
            err(
                "pipeline.worker_threads",
                format!(
                    "{} threads is more than 512; use 0 for one per CPU",
                    self.pipeline.worker_threads
                ),
            );
        }
        let c = &self.console;
        if c.enabled {
            if c.listen.parse::<SocketAddr>().is_err() {
                err(
                    "console.listen",
                    format!("`{}` is not an address like 127.0.0.1:9899", c.listen),
                );
            } else if c.listen == self.metrics.listen {
                err(
                    "console.listen",
                    format!(
                        "is metrics.listen `{}`; give the console its own port",
                        c.listen
                    ),
                );
            }
            if c.control_topic.is_empty() {
                err(
                    "console.control_topic",
                    "is empty; the console writes threshold changes there (a compacted topic all instances read)".into(),
                );
            }
        }
        if !c.control_topic.is_empty() {
            for (key, topic) in [
                ("kafka.input_topic", &self.kafka.input_topic),
                ("kafka.results_topic", &self.kafka.results_topic),
                ("kafka.review_topic", &self.kafka.review_topic),
                ("kafka.dead_letter_topic", &self.kafka.dead_letter_topic),
                (
                    "monitor.ground_truth_topic",
                    &self.monitor.ground_truth_topic,
                ),
            ] {
                if *topic == c.control_topic {
                    err(
                        "console.control_topic",
                        format!("is {key} `{topic}`; live settings need a topic of their own"),
                    );
                }
            }
        }
        if self.metrics.listen.parse::<SocketAddr>().is_err() {
            err(
                "metrics.listen",
                format!(
                    "`{}` is not an address like 127.0.0.1:9898",
                    self.metrics.listen
                ),
            );
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            err(
                "log.level",
                format!(
                    "`{}` is not a valid filter (e.g. info, inferstream=debug)",
                    self.log.level
                ),
            );
        }

        if errors.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(errors))
        }
    }

    /// The metrics listen address (validated).
    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics
            .listen
            .parse()
            .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 9898)))
    }

    /// The threshold that applies to `label`.
    pub fn threshold_for(&self, label: &str) -> f64 {
        self.route
            .label_thresholds
            .get(label)
            .copied()
            .unwrap_or(self.route.threshold)
    }

    /// The effective configuration as TOML with secrets redacted.
    pub fn redacted_toml(&self) -> String {
        let mut copy = self.clone();
        let k = &mut copy.kafka;
        for table in [
            &mut k.properties,
            &mut k.consumer_properties,
            &mut k.producer_properties,
        ] {
            for (key, value) in table.iter_mut() {
                if is_secret_key(key) {
                    *value = REDACTED.to_string();
                }
            }
        }
        if !copy.console.token.0.is_empty() {
            copy.console.token = Secret(REDACTED.to_string());
        }
        toml::to_string_pretty(&copy).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }
}

impl fmt::Display for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted_toml())
    }
}

const REDACTED: &str = "<redacted>";

/// librdkafka's default `message.max.bytes`.
pub const LIBRDKAFKA_MESSAGE_MAX_BYTES: usize = 1_000_000;

/// The size of a batch request holding one image of `image` bytes.
pub fn batch_request_bytes(image: u64) -> u64 {
    image.div_ceil(3) * 4 + 64
}

/// The largest image that fits alone in a batch request.
pub fn max_batch_image_bytes() -> u64 {
    (SAGEMAKER_MAX_BODY - 64) / 4 * 3
}

/// librdkafka properties inferstream sets itself, with what rests on them;
/// they are refused in the passthrough tables.
pub const MANAGED_KAFKA_PROPERTIES: &[(&str, &str)] = &[
    (
        "enable.auto.commit",
        "offsets are committed only after outputs are durable",
    ),
    (
        "auto.commit.enable",
        "offsets are committed only after outputs are durable",
    ),
    (
        "enable.auto.offset.store",
        "offsets are committed only after outputs are durable",
    ),
    ("group.id", "set kafka.group_id"),
    ("group.instance.id", "set kafka.instance_id"),
    ("bootstrap.servers", "set kafka.brokers"),
    ("metadata.broker.list", "set kafka.brokers"),
    (
        "enable.partition.eof",
        "the source reads end-of-partition as no event",
    ),
    (
        "acks",
        "outputs count as durable only when every in-sync replica has them",
    ),
    (
        "request.required.acks",
        "outputs count as durable only when every in-sync replica has them",
    ),
    (
        "enable.idempotence",
        "retried produce requests must not duplicate or reorder outputs",
    ),
    (
        "message.timeout.ms",
        "a delivery that times out stops the service; it must not be shortened",
    ),
    (
        "delivery.timeout.ms",
        "a delivery that times out stops the service; it must not be shortened",
    ),
];

/// Whether a librdkafka property holds a secret.
pub fn is_secret_key(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    [
        "password",
        "secret",
        "key.pem",
        "ssl.key",
        "token",
        "jaas",
        "sasl.oauthbearer.config",
    ]
    .iter()
    .any(|s| k.contains(s))
}

fn parse_toml(origin: &str, text: &str) -> Result<toml::Value, ConfigError> {
    text.parse::<toml::Table>()
        .map(toml::Value::Table)
        .map_err(|e| ConfigError::Parse {
            path: origin.to_string(),
            message: e.to_string(),
        })
}

/// Deep merge: tables merge key by key, anything else is replaced.
fn merge(base: &mut toml::Value, over: toml::Value) {
    match (base, over) {
        (toml::Value::Table(b), toml::Value::Table(o)) => {
            for (k, v) in o {
                match b.get_mut(&k) {
                    Some(existing) => merge(existing, v),
                    None => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (b, o) => *b = o,
    }
}

fn apply_env(
    value: &mut toml::Value,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<(), ConfigError> {
    let mut vars: Vec<(String, String)> = env
        .into_iter()
        .filter(|(k, _)| k.starts_with(ENV_PREFIX))
        .collect();
    vars.sort();
    for (name, raw) in vars {
        let path: Vec<String> = name[ENV_PREFIX.len()..]
            .split("__")
            .map(|s| s.to_ascii_lowercase())
            .collect();
        if path.iter().any(|p| p.is_empty()) {
            return Err(ConfigError::Shape(format!(
                "environment variable {name} has an empty path segment; use INFERSTREAM__SECTION__KEY"
            )));
        }
        let mut path = path;
        // librdkafka property names use dots, which environment names cannot.
        if path.len() == 3 && path[0] == "kafka" && path[1].ends_with("properties") {
            path[2] = path[2].replace('_', ".");
        }
        // Properties and the console token are strings whatever they look like.
        let always_string =
            (path.len() == 3 && path[1].ends_with("properties")) || path == ["console", "token"];
        let parsed = parse_env_value(&raw, always_string);
        let mut cursor = &mut *value;
        for (i, segment) in path.iter().enumerate() {
            let table = cursor.as_table_mut().ok_or_else(|| {
                ConfigError::Shape(format!(
                    "environment variable {name}: `{}` is not a section",
                    path[..i].join(".")
                ))
            })?;
            if i + 1 == path.len() {
                table.insert(segment.clone(), parsed.clone());
                break;
            }
            cursor = table
                .entry(segment.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        }
    }
    Ok(())
}

fn parse_env_value(raw: &str, always_string: bool) -> toml::Value {
    if always_string {
        return toml::Value::String(raw.to_string());
    }
    match format!("v = {raw}").parse::<toml::Table>() {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or_else(|| toml::Value::String(raw.to_string())),
        Err(_) => toml::Value::String(raw.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid_env() -> Vec<(String, String)> {
        vec![(
            "INFERSTREAM__ALERTS__TOPIC_ARN".into(),
            "arn:aws:sns:us-east-1:123456789012:alerts".into(),
        )]
    }

    #[test]
    fn digest_settings_are_checked_by_name() {
        let cfg = Config::load_with_env(None, valid_env()).unwrap();
        assert_eq!(cfg.alerts.mode, AlertMode::Digest, "digests by default");
        assert_eq!(cfg.alerts.group_id(&cfg.kafka), "inferstream-alerts");
        let text = "[alerts]
topic_arn = \"arn:aws:sns:us-east-1:1:a\"
digest_window = \"2h\"
dedup_window = \"1h\"
presign_expiry = \"8days\"
digest_max_items = 0
max_per_hour = 0
state_topic = \"inferstream-review\"
group_id = \"inferstream\"
[alerts.label_groups]
bikes = [\"bicycle\", \"tricycle\"]
motors = [\"motorcycle\", \"bicycle\"]
empty = []
";
        let err = Config::from_toml_str(text).unwrap_err().to_string();
        for want in [
            "alerts.dedup_window: (1h) must not be below alerts.digest_window (2h)",
            "alerts.presign_expiry: 8days is outside 1s..=7days",
            "alerts.digest_max_items: must be at least 1",
            "alerts.max_per_hour: must be at least 1",
            "alerts.state_topic: is kafka.review_topic `inferstream-review`",
            "alerts.group_id: is kafka.group_id `inferstream`",
            "alerts.label_groups.bikes: `tricycle` is not one of endpoint.labels",
            "alerts.label_groups.motors: `bicycle` is in group `bikes` already",
            "alerts.label_groups.empty: lists no label",
        ] {
            assert!(err.contains(want), "missing `{want}` in:\n{err}");
        }
    }

    #[test]
    fn endpoint_concurrency_is_adaptive_by_default_a_number_or_refused_by_name() {
        let cfg = Config::load_with_env(None, valid_env()).unwrap();
        assert_eq!(cfg.endpoint.concurrency, Concurrency::Adaptive);
        assert_eq!(cfg.endpoint.max_concurrency, 64);
        let with = |v: &str| {
            let mut env = valid_env();
            env.push(("INFERSTREAM__ENDPOINT__CONCURRENCY".into(), v.into()));
            Config::load_with_env(None, env)
        };
        assert_eq!(
            with("12").unwrap().endpoint.concurrency,
            Concurrency::Fixed(12)
        );
        assert_eq!(
            with("Adaptive").unwrap().endpoint.concurrency,
            Concurrency::Adaptive
        );
        for (v, want) in [
            (
                "fast",
                "endpoint.concurrency: `fast` is neither a number of calls nor \"adaptive\"",
            ),
            ("-3", "endpoint.concurrency: -3 is not a number of calls"),
            (
                "0",
                "endpoint.concurrency: must be at least 1, or \"adaptive\"",
            ),
        ] {
            let err = with(v).unwrap_err().to_string();
            assert!(err.contains(want), "{v}: {err}");
        }
        let text = "[alerts]\nenabled = false\n[endpoint]\nmax_concurrency = 0\n";
        let err = Config::from_toml_str(text).unwrap_err().to_string();
        assert!(
            err.contains("endpoint.max_concurrency: 0 is outside 1..=10000"),
            "{err}"
        );
        // Printed back as it was given.
        let cfg = with("12").unwrap();
        assert!(cfg.redacted_toml().contains("concurrency = 12"));
    }

    #[test]
    fn monitor_settings_are_checked_by_name() {
        let text = "[alerts]\nenabled = false\n[monitor]\nbaseline = \"/no/such/baseline.json\"\nwindow = \"500ms\"\n";
        let err = Config::from_toml_str(text).unwrap_err().to_string();
        assert!(err.contains("monitor.window: must be at least 1s"), "{err}");
        assert!(
            err.contains("monitor.baseline: `/no/such/baseline.json` is not a file; make one with `inferstream baseline"),
            "{err}"
        );
    }

    #[test]
    fn embedded_defaults_need_only_an_alert_topic() {
        let err = Config::load_with_env(None, Vec::new())
            .unwrap_err()
            .to_string();
        assert!(err.contains("alerts.topic_arn: is empty"), "{err}");
        let cfg = Config::load_with_env(None, valid_env()).unwrap();
        assert_eq!(cfg.kafka.input_topic, "s3-events");
        assert_eq!(cfg.route.threshold, 0.93);
        assert_eq!(cfg.endpoint.labels, vec!["bicycle", "motorcycle"]);
        assert_eq!(cfg.batch.max_wait, Duration::from_millis(50));
    }

    #[test]
    fn environment_overrides_typed_values_and_kafka_properties() {
        let mut env = valid_env();
        env.push(("INFERSTREAM__ROUTE__THRESHOLD".into(), "0.5".into()));
        env.push(("INFERSTREAM__KAFKA__BROKERS".into(), "a:1,b:2".into()));
        env.push(("INFERSTREAM__KAFKA__GROUP_ID".into(), "\"42\"".into()));
        env.push((
            "INFERSTREAM__ENDPOINT__LABELS".into(),
            "[\"cat\", \"dog\", \"emu\"]".into(),
        ));
        env.push((
            "INFERSTREAM__KAFKA__PROPERTIES__SASL_PASSWORD".into(),
            "hunter2".into(),
        ));
        env.push(("INFERSTREAM__BATCH__MAX_WAIT".into(), "2s".into()));
        env.push(("OTHER".into(), "ignored".into()));
        let cfg = Config::load_with_env(None, env).unwrap();
        assert_eq!(cfg.route.threshold, 0.5);
        assert_eq!(cfg.kafka.brokers, "a:1,b:2");
        assert_eq!(cfg.kafka.group_id, "42");
        assert_eq!(cfg.endpoint.labels.len(), 3);
        assert_eq!(cfg.batch.max_wait, Duration::from_secs(2));
        assert_eq!(cfg.kafka.properties["sasl.password"], "hunter2");
        let shown = cfg.redacted_toml();
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("<redacted>"));
    }

    #[test]
    fn every_problem_is_reported_with_its_key() {
        let text = r#"
            [kafka]
            results_topic = "s3-events"
            [route]
            threshold = 1.5
            [route.label_thresholds]
            cat = 0.5
            [batch]
            max_images = 0
            [metrics]
            listen = "nowhere"
            [endpoint]
            backoff_initial = "0s"
        "#;
        let err = Config::from_toml_str(text).unwrap_err().to_string();
        for needle in [
            "endpoint.backoff_initial: must be at least 1ms",
            "kafka.results_topic: is the input topic",
            "route.threshold: 1.5 is outside",
            "route.label_thresholds.cat: `cat` is not one of endpoint.labels",
            "batch.max_images: must be at least 1",
            "metrics.listen: `nowhere`",
            "alerts.topic_arn",
        ] {
            assert!(err.contains(needle), "missing {needle:?} in:\n{err}");
        }
    }

    #[test]
    fn ground_truth_in_s3_needs_a_prefix_of_its_own() {
        let check = |monitor: &str| {
            Config::from_toml_str(&format!(
                "[alerts]\nenabled = false\n[capture]\nenabled = true\ndestination = \"s3://cap/datacapture\"\n[monitor]\n{monitor}"
            ))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
        };
        assert_eq!(check("ground_truth_s3 = \"s3://cap/groundtruth\""), "");
        assert_eq!(
            check("ground_truth_s3 = \"s3://cap/datacapture-truth\""),
            ""
        );
        for (value, needle) in [
            ("bucket/x", "is not an s3://bucket/prefix URL"),
            ("s3://cap/gt/labels.jsonl", "names an object"),
            ("s3://cap", "overlaps capture.destination"),
            ("s3://cap/datacapture/gt", "overlaps capture.destination"),
        ] {
            let err = check(&format!("ground_truth_s3 = \"{value}\""));
            assert!(
                err.contains("monitor.ground_truth_s3") && err.contains(needle),
                "{value}: {err}"
            );
        }
        assert!(check("ground_truth_poll = \"0s\"").contains("monitor.ground_truth_poll"));
    }

    #[test]
    fn unknown_keys_and_bad_types_are_rejected_by_name() {
        let err = Config::from_toml_str("[fetch]\nconcurency = 3\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("concurency"), "{err}");
        let err = Config::from_toml_str("[batch]\nmax_wait = \"soon\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("max_wait") || err.contains("soon"), "{err}");
    }

    #[test]
    fn managed_kafka_properties_are_refused() {
        let text =
            "[alerts]\nenabled = false\n[kafka.properties]\n\"enable.auto.commit\" = \"true\"\n";
        let err = Config::from_toml_str(text).unwrap_err().to_string();
        assert!(err.contains("enable.auto.commit"), "{err}");
    }

    #[test]
    fn label_thresholds_override_the_default() {
        let text = "[alerts]\nenabled = false\n[route.label_thresholds]\nmotorcycle = 0.5\n";
        let cfg = Config::from_toml_str(text).unwrap();
        assert_eq!(cfg.threshold_for("motorcycle"), 0.5);
        assert_eq!(cfg.threshold_for("bicycle"), 0.93);
    }
}
