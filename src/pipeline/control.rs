//! Live settings every instance follows: the confidence thresholds, from a
//! compacted control topic (`console.control_topic`).
//!
//! The configuration's `[route]` thresholds hold until the topic says
//! otherwise; then its latest record (key `thresholds`) wins, in every
//! instance that reads it, without a restart. A record that is not valid
//! thresholds is logged and skipped, never applied and never fatal. Each
//! prediction records the threshold it was routed by.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use rdkafka::producer::{FutureProducer, FutureRecord};
use serde::{Deserialize, Serialize};

use crate::config::{Config, KafkaConfig};

/// The key of the thresholds record on the control topic.
pub const THRESHOLDS_KEY: &str = "thresholds";
/// The schema of a thresholds record.
pub const SCHEMA: &str = "inferstream.thresholds.v1";
/// Changes kept for the console's history.
const HISTORY: usize = 50;

/// The thresholds routing uses, and who set them when.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Thresholds {
    pub schema: String,
    /// For labels without one of their own.
    pub threshold: f64,
    #[serde(default)]
    pub label_thresholds: BTreeMap<String, f64>,
    /// Who set them ("configuration" for the file's).
    pub by: String,
    /// When (RFC 3339).
    pub at: String,
}

impl Thresholds {
    /// The configuration's `[route]` thresholds.
    pub fn from_config(c: &Config) -> Thresholds {
        Thresholds {
            schema: SCHEMA.into(),
            threshold: c.route.threshold,
            label_thresholds: c.route.label_thresholds.clone(),
            by: "configuration".into(),
            at: String::new(),
        }
    }

    /// The threshold for `label`.
    pub fn for_label(&self, label: &str) -> f64 {
        self.label_thresholds
            .get(label)
            .copied()
            .unwrap_or(self.threshold)
    }

    /// Every threshold between 0 and 1, every label one of the model's.
    pub fn check(&self, labels: &[String]) -> Result<(), String> {
        if self.schema != SCHEMA {
            return Err(format!("schema is `{}`, not {SCHEMA}", self.schema));
        }
        let valid = |t: f64| t.is_finite() && (0.0..=1.0).contains(&t);
        if !valid(self.threshold) {
            return Err(format!(
                "threshold {} is not between 0 and 1",
                self.threshold
            ));
        }
        for (label, t) in &self.label_thresholds {
            if !labels.contains(label) {
                return Err(format!("{label:?} is not one of endpoint.labels"));
            }
            if !valid(*t) {
                return Err(format!(
                    "the threshold of {label:?}, {t}, is not between 0 and 1"
                ));
            }
        }
        Ok(())
    }

    /// `by` and `at` as printable text of bounded length (they are logged
    /// and shown).
    pub fn tidy(mut self) -> Thresholds {
        self.by = printable(&self.by, 100);
        self.at = printable(&self.at, 40);
        self
    }
}

/// At most `max` characters of `s`, without control characters.
pub fn printable(s: &str, max: usize) -> String {
    s.chars().filter(|c| !c.is_control()).take(max).collect()
}

/// The thresholds in force here, and the recent changes.
pub struct Live {
    current: RwLock<Arc<Thresholds>>,
    history: Mutex<VecDeque<Thresholds>>,
    labels: Vec<String>,
    /// Per partition of the control topic, the offset after the last
    /// record read.
    read: Mutex<BTreeMap<i32, i64>>,
}

impl Live {
    pub fn new(config: &Config) -> Arc<Live> {
        Arc::new(Live {
            current: RwLock::new(Arc::new(Thresholds::from_config(config))),
            history: Mutex::new(VecDeque::new()),
            labels: config.endpoint.labels.clone(),
            read: Mutex::new(BTreeMap::new()),
        })
    }

    /// Per partition of the control topic, the offset after the last
    /// record read here.
    pub fn read_to(&self) -> BTreeMap<i32, i64> {
        self.read.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The thresholds to route by now.
    pub fn get(&self) -> Arc<Thresholds> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The latest changes, newest last.
    pub fn history(&self) -> Vec<Thresholds> {
        self.history
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect()
    }

    /// Applies a control record; a bad one is logged and skipped.
    ///
    /// Thresholds for labels not in this instance's `endpoint.labels` are
    /// left out (with a warning) and the rest applied, so that instances
    /// whose label lists differ for a while (a rolling deploy of a model
    /// with a new label) still follow the same changes.
    pub fn apply(&self, payload: &[u8], offset: i64) -> bool {
        let mut t = match serde_json::from_slice::<Thresholds>(payload) {
            Ok(t) => t.tidy(),
            Err(e) => {
                tracing::warn!(offset, error = %e, "control topic: a thresholds record that is not JSON of the right shape; skipped");
                return false;
            }
        };
        let before = t.label_thresholds.len();
        let unknown: Vec<String> = t
            .label_thresholds
            .keys()
            .filter(|l| !self.labels.contains(l))
            .take(5)
            .map(|l| printable(l, 60))
            .collect();
        if !unknown.is_empty() {
            t.label_thresholds.retain(|l, _| self.labels.contains(l));
            tracing::warn!(offset, by = %t.by, ignored = before - t.label_thresholds.len(), labels = ?unknown,
                "control topic: thresholds for labels not in this instance's endpoint.labels are ignored; the rest applies");
        }
        if let Err(e) = t.check(&self.labels) {
            tracing::warn!(offset, by = %t.by, error = %e, "control topic: invalid thresholds; skipped");
            return false;
        }
        if *self.get() == t {
            return false;
        }
        tracing::info!(threshold = t.threshold, label_thresholds = ?t.label_thresholds, by = %t.by, at = %t.at,
            "thresholds changed");
        let mut history = self.history.lock().unwrap_or_else(|p| p.into_inner());
        history.push_back(t.clone());
        while history.len() > HISTORY {
            history.pop_front();
        }
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(t);
        true
    }

    /// Reads the control topic from its beginning until the task is
    /// aborted, on `reader` (see [`connect`]); `caught_up` is notified once
    /// every partition's end has been read. Errors that go on for ten
    /// seconds make it connect again, reading on from where it was.
    pub async fn run(
        self: Arc<Self>,
        kafka: KafkaConfig,
        topic: String,
        reader: Reader,
        caught_up: Arc<tokio::sync::Notify>,
    ) {
        use rdkafka::error::KafkaError;
        use rdkafka::message::Message as _;
        let mut reader = Some(reader);
        loop {
            let (consumer, partitions) = match reader.take() {
                Some(r) => r,
                None => {
                    // On from what was read, so that older thresholds are
                    // not applied again on the way.
                    let (kafka, topic, from) = (kafka.clone(), topic.clone(), self.read_to());
                    match tokio::task::spawn_blocking(move || connect(&kafka, &topic, &from)).await
                    {
                        Ok(Ok(r)) => r,
                        Ok(Err(e)) => {
                            tracing::warn!(error = %e, "control topic: cannot read console.control_topic; thresholds stay as they are; trying again in 10 s");
                            tokio::time::sleep(Duration::from_secs(10)).await;
                            continue;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "control topic: connecting failed");
                            tokio::time::sleep(Duration::from_secs(10)).await;
                            continue;
                        }
                    }
                }
            };
            let mut at_end = std::collections::HashSet::new();
            let mut failing = 0u32;
            loop {
                match consumer.recv().await {
                    Ok(m) => {
                        failing = 0;
                        self.read
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .insert(m.partition(), m.offset() + 1);
                        if m.key() == Some(THRESHOLDS_KEY.as_bytes()) {
                            self.apply(m.payload().unwrap_or_default(), m.offset());
                        }
                    }
                    Err(KafkaError::PartitionEOF(p)) => {
                        failing = 0;
                        if at_end.insert(p) && at_end.len() >= partitions {
                            caught_up.notify_one();
                        }
                    }
                    Err(e) => {
                        failing += 1;
                        tracing::warn!(error = %e, "control topic: reading failed");
                        if failing >= 50 {
                            tracing::warn!(
                                "control topic: reading has failed for 10 s; connecting again"
                            );
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
            // Closed off the runtime: destroying a client can block.
            tokio::task::spawn_blocking(move || drop(consumer));
        }
    }
}

/// A consumer assigned to every partition of the control topic, and how
/// many partitions there are.
pub type Reader = (rdkafka::consumer::StreamConsumer, usize);

/// Connects to the control topic (blocking: run it off the runtime), each
/// partition from the offset in `from`, else from its beginning; an error
/// names the key and the problem.
pub fn connect(
    kafka: &KafkaConfig,
    topic: &str,
    from: &BTreeMap<i32, i64>,
) -> Result<Reader, String> {
    let c: rdkafka::consumer::StreamConsumer =
        crate::clients::kafka::state_reader_config(kafka, &format!("{}-control", kafka.group_id))
            .create()
            .map_err(|e| e.to_string())?;
    let n = crate::clients::kafka::assign_all(
        &c,
        topic,
        |p| {
            from.get(&p)
                .map_or(rdkafka::Offset::Beginning, |n| rdkafka::Offset::Offset(*n))
        },
        "console.control_topic",
    )
    .map_err(|e| format!("{e} (create it with cleanup.policy=compact)"))?;
    Ok((c, n))
}

/// Writes `t` to the control topic with `producer` (see
/// [`control_producer`]); returns once Kafka has it (every instance, this
/// one too, applies it as it reads it), or once librdkafka gave up on it.
pub async fn publish(producer: &FutureProducer, topic: &str, t: &Thresholds) -> Result<(), String> {
    let json = serde_json::to_vec(t).map_err(|e| format!("cannot encode thresholds: {e}"))?;
    let record = FutureRecord::to(topic).key(THRESHOLDS_KEY).payload(&json);
    match producer.send(record, rdkafka::util::Timeout::Never).await {
        Ok(_) => Ok(()),
        Err((e, _)) => Err(format!(
            "Kafka did not confirm the change ({e}); it may still be applied: \
             check GET /api/thresholds before trying again"
        )),
    }
}

/// How long a change may take to reach Kafka before it is given up.
pub const PUBLISH_TIMEOUT: Duration = Duration::from_secs(10);

/// The producer of console changes: librdkafka itself gives a change up
/// after [`PUBLISH_TIMEOUT`], so that one answered as failed is not
/// delivered minutes later over a newer one (unless it was already on the
/// wire).
pub fn control_producer(kafka: &KafkaConfig) -> Result<FutureProducer, String> {
    let mut c = crate::clients::kafka::producer_config(kafka);
    c.set(
        "message.timeout.ms",
        PUBLISH_TIMEOUT.as_millis().to_string(),
    );
    c.create()
        .map_err(|e| format!("creating the console's Kafka producer: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        Config::from_toml_str("[alerts]\nenabled = false\n").unwrap()
    }

    fn record(threshold: f64, labels: &[(&str, f64)]) -> Vec<u8> {
        serde_json::to_vec(&Thresholds {
            schema: SCHEMA.into(),
            threshold,
            label_thresholds: labels.iter().map(|(l, t)| (l.to_string(), *t)).collect(),
            by: "ops@example.com".into(),
            at: "2026-12-01T19:00:00Z".into(),
        })
        .unwrap()
    }

    #[test]
    fn the_latest_valid_record_wins_and_bad_ones_change_nothing() {
        let live = Live::new(&config());
        assert_eq!(live.get().by, "configuration");
        assert!(live.apply(&record(0.8, &[("bicycle", 0.6)]), 1));
        assert_eq!(live.get().for_label("bicycle"), 0.6);
        assert_eq!(live.get().for_label("motorcycle"), 0.8);
        for bad in [
            b"not json".to_vec(),
            record(1.5, &[]),
            record(f64::NAN, &[]),
            record(0.7, &[("bicycle", -0.1)]),
            br#"{"schema": "other", "threshold": 0.5, "by": "x", "at": "y"}"#.to_vec(),
        ] {
            assert!(!live.apply(&bad, 2));
        }
        assert_eq!(live.get().threshold, 0.8);
        // The same again is not a change.
        assert!(!live.apply(&record(0.8, &[("bicycle", 0.6)]), 3));
        assert!(live.apply(&record(0.9, &[]), 4));
        let h = live.history();
        assert_eq!(h.len(), 2);
        assert_eq!(h[1].threshold, 0.9);
    }

    #[test]
    fn thresholds_of_labels_this_instance_lacks_are_left_out_not_the_change() {
        // Another instance's model knows "scooter": the rest still applies.
        let live = Live::new(&config());
        assert!(live.apply(&record(0.7, &[("scooter", 0.5), ("bicycle", 0.6)]), 1));
        let t = live.get();
        assert_eq!(t.threshold, 0.7);
        assert_eq!(
            t.label_thresholds.keys().collect::<Vec<_>>(),
            vec!["bicycle"]
        );
        assert!(live.apply(&record(0.75, &[("scooter", 0.5)]), 2));
        assert_eq!(live.get().for_label("bicycle"), 0.75);
    }

    #[test]
    fn who_and_when_are_printable_and_short() {
        let live = Live::new(&config());
        let mut t: Thresholds = serde_json::from_slice(&record(0.7, &[])).unwrap();
        t.by = format!(
            "mallory\n2026-12-01T00:00:00Z INFO forged{}",
            "x".repeat(500)
        );
        assert!(live.apply(&serde_json::to_vec(&t).unwrap(), 1));
        let by = live.get().by.clone();
        assert!(!by.contains('\n') && by.chars().count() == 100, "{by}");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_reconnection_reads_on_from_where_reading_was() {
        use rdkafka::consumer::StreamConsumer;
        use rdkafka::message::Message as _;
        let cluster = rdkafka::mocking::MockCluster::new(1).unwrap();
        cluster.create_topic("control", 1, 1).unwrap();
        let producer: FutureProducer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", cluster.bootstrap_servers())
            .create()
            .unwrap();
        for t in [0.6, 0.7, 0.8] {
            let payload = record(t, &[]);
            producer
                .send(
                    FutureRecord::to("control")
                        .key(THRESHOLDS_KEY)
                        .payload(&payload),
                    rdkafka::util::Timeout::Never,
                )
                .await
                .unwrap();
        }
        let mut config = config();
        config.kafka.brokers = cluster.bootstrap_servers();
        let read_from = |from: BTreeMap<i32, i64>| {
            let kafka = config.kafka.clone();
            async move {
                let (c, n): (StreamConsumer, usize) =
                    tokio::task::spawn_blocking(move || connect(&kafka, "control", &from))
                        .await
                        .unwrap()
                        .unwrap();
                assert_eq!(n, 1);
                // The first record read, past partition ends.
                let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
                loop {
                    match tokio::time::timeout_at(deadline, c.recv()).await {
                        Ok(Ok(m)) => return m.offset(),
                        Ok(Err(e)) => eprintln!("{e}"),
                        Err(_) => panic!("nothing read within 30 s"),
                    }
                }
            }
        };
        assert_eq!(read_from(BTreeMap::new()).await, 0);
        assert_eq!(read_from(BTreeMap::from([(0, 2)])).await, 2);
    }

    #[test]
    fn history_is_bounded() {
        let live = Live::new(&config());
        for i in 0..(HISTORY + 10) {
            assert!(live.apply(&record(0.5 + i as f64 / 1000.0, &[]), i as i64));
        }
        assert_eq!(live.history().len(), HISTORY);
    }
}
