//! Typed Kafka settings mapped to librdkafka properties, in one place.

use rdkafka::consumer::Consumer as _;
use rdkafka::ClientConfig;

use crate::config::KafkaConfig;

fn millis(d: std::time::Duration) -> String {
    d.as_millis().max(1).to_string()
}

fn with_properties(mut c: ClientConfig, cfg: &KafkaConfig) -> ClientConfig {
    c.set("bootstrap.servers", &cfg.brokers);
    for (k, v) in &cfg.properties {
        c.set(k, v);
    }
    c
}

/// The input consumer: manual offset management, statistics for lag,
/// cooperative rebalancing and, with `kafka.instance_id`, static membership.
pub fn consumer_config(cfg: &KafkaConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("client.id", "inferstream")
        .set("group.id", &cfg.group_id)
        // A rebalance moves only the partitions that must move; the others
        // keep their in-flight work and are not re-processed.
        .set("partition.assignment.strategy", "cooperative-sticky")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "false")
        .set("auto.offset.reset", cfg.auto_offset_reset.as_str())
        .set("session.timeout.ms", millis(cfg.session_timeout))
        .set("heartbeat.interval.ms", millis(cfg.heartbeat_interval))
        .set("statistics.interval.ms", "5000")
        // Prefetched input is bounded by this, not by the backlog: 16 MiB is
        // about 16,000 S3 notifications, over a second of input at the
        // service's ceiling (librdkafka's default is 64 MiB).
        .set("queued.max.messages.kbytes", "16384");
    if !cfg.instance_id.is_empty() {
        c.set("group.instance.id", &cfg.instance_id);
    }
    let mut c = with_properties(c, cfg);
    for (k, v) in &cfg.consumer_properties {
        c.set(k, v);
    }
    c
}

/// The digest alerter's consumer of the review topic: a group of its own,
/// offsets committed by hand after a digest is published.
pub fn alerts_consumer_config(cfg: &KafkaConfig, group_id: &str) -> ClientConfig {
    let mut c = consumer_config(cfg);
    c.set("client.id", "inferstream-alerts")
        .set("group.id", group_id)
        // A new group must not skip review records written before it
        // first joined: those are alerts.
        .set("auto.offset.reset", "earliest")
        .remove("statistics.interval.ms");
    if !cfg.instance_id.is_empty() {
        c.set("group.instance.id", format!("{}-alerts", cfg.instance_id));
    }
    c
}

/// A reader of one partition of the alerter's state topic, from its start
/// to its end; no group, nothing committed.
pub fn state_reader_config(cfg: &KafkaConfig, group_id: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("client.id", "inferstream-alerts-state")
        // Required by librdkafka for a consumer; never joined or committed.
        .set("group.id", format!("{group_id}-state"))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("auto.offset.reset", "earliest");
    let mut c = with_properties(c, cfg);
    for (k, v) in &cfg.consumer_properties {
        c.set(k, v);
    }
    c
}

/// The output producer: idempotent, acks from all in-sync replicas.
pub fn producer_config(cfg: &KafkaConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("client.id", "inferstream")
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("message.timeout.ms", "300000");
    let mut c = with_properties(c, cfg);
    for (k, v) in &cfg.producer_properties {
        c.set(k, v);
    }
    c
}

/// Unsubscribes and polls, for at least a quarter of a second and then
/// until nothing is assigned (at most `wait` in all), before the consumer
/// is closed. librdkafka 2.12 can abort the process (the assert
/// `!rd_kafka_assignment_in_progress` in `rd_kafka_cgrp_terminated`) when
/// a consumer closes while an assignment is still being processed, as in
/// a rebalance under way at SIGTERM; seen here once in a test, and still
/// open upstream (confluentinc/librdkafka#4792). Leaving the subscription
/// and serving the rebalance events first is the mitigation users report
/// there (and for the earlier, fixed, #4527), not a fix from upstream.
/// The polls also serve rebalance events queued while nobody polled.
/// Records read meanwhile are dropped unprocessed (and uncommitted).
pub async fn leave_subscription<C>(
    consumer: &rdkafka::consumer::StreamConsumer<C>,
    wait: std::time::Duration,
) where
    C: rdkafka::consumer::ConsumerContext + 'static,
{
    use std::time::{Duration, Instant};
    consumer.unsubscribe();
    let began = Instant::now();
    let until = began + wait.min(Duration::from_secs(3));
    let quiet = began + Duration::from_millis(250).min(wait / 2);
    loop {
        let _ = tokio::time::timeout(Duration::from_millis(50), consumer.recv()).await;
        let now = Instant::now();
        let assigned = consumer
            .assignment()
            .map(|a| a.count() > 0)
            .unwrap_or(false);
        if now >= until || (now >= quiet && !assigned) {
            return;
        }
    }
}

/// How many partitions `topic` has (an error naming `key` when it does not
/// exist). Blocking (metadata): call it off the runtime.
pub fn partition_count<X, C>(consumer: &X, topic: &str, key: &str) -> Result<usize, String>
where
    X: rdkafka::consumer::Consumer<C>,
    C: rdkafka::consumer::ConsumerContext + 'static,
{
    let md = consumer
        .fetch_metadata(Some(topic), std::time::Duration::from_secs(10))
        .map_err(|e| format!("{key} `{topic}`: {e}"))?;
    md.topics()
        .iter()
        .find(|t| t.name() == topic && t.error().is_none())
        .map(|t| t.partitions().len())
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("{key} `{topic}` does not exist"))
}

/// Assigns every partition `p` of `topic` to `consumer` from `offset(p)`, and
/// returns how many there are; `key` names the setting in errors.
/// Blocking (metadata): call it off the runtime.
pub fn assign_all<X, C>(
    consumer: &X,
    topic: &str,
    offset: impl Fn(i32) -> rdkafka::Offset,
    key: &str,
) -> Result<usize, String>
where
    X: rdkafka::consumer::Consumer<C>,
    C: rdkafka::consumer::ConsumerContext + 'static,
{
    let partitions = partition_count(consumer, topic, key)?;
    let mut tpl = rdkafka::TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p as i32, offset(p as i32))
            .map_err(|e| e.to_string())?;
    }
    consumer.assign(&tpl).map_err(|e| e.to_string())?;
    Ok(partitions)
}

/// A librdkafka log line as a `tracing` event of the same level.
pub fn log(level: rdkafka::config::RDKafkaLogLevel, fac: &str, log_message: &str) {
    use rdkafka::config::RDKafkaLogLevel;
    match level {
        RDKafkaLogLevel::Emerg
        | RDKafkaLogLevel::Alert
        | RDKafkaLogLevel::Critical
        | RDKafkaLogLevel::Error => tracing::error!(target: "librdkafka", fac, "{log_message}"),
        RDKafkaLogLevel::Warning => tracing::warn!(target: "librdkafka", fac, "{log_message}"),
        RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
            tracing::info!(target: "librdkafka", fac, "{log_message}")
        }
        RDKafkaLogLevel::Debug => tracing::debug!(target: "librdkafka", fac, "{log_message}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Config;

    fn config(extra: &str) -> Config {
        Config::from_toml_str(&format!("[alerts]\nenabled = false\n{extra}")).unwrap()
    }

    #[test]
    fn the_consumer_rebalances_cooperatively_and_can_be_static() {
        let c = consumer_config(&config("").kafka);
        assert_eq!(
            c.get("partition.assignment.strategy"),
            Some("cooperative-sticky")
        );
        assert_eq!(c.get("group.instance.id"), None);
        assert_eq!(c.get("enable.auto.commit"), Some("false"));
        let c = consumer_config(&config("[kafka]\ninstance_id = \"pod-7\"\n").kafka);
        assert_eq!(c.get("group.instance.id"), Some("pod-7"));
        // The strategy stays the user's to choose.
        let c = consumer_config(
            &config("[kafka.consumer_properties]\n\"partition.assignment.strategy\" = \"range\"\n")
                .kafka,
        );
        assert_eq!(c.get("partition.assignment.strategy"), Some("range"));
    }

    #[test]
    fn the_alerts_group_reads_the_review_topic_from_its_start() {
        let cfg = config("[kafka]\nauto_offset_reset = \"latest\"\ninstance_id = \"pod-7\"\n");
        let c = alerts_consumer_config(&cfg.kafka, "g-alerts");
        assert_eq!(c.get("auto.offset.reset"), Some("earliest"));
        assert_eq!(c.get("group.id"), Some("g-alerts"));
        assert_eq!(c.get("group.instance.id"), Some("pod-7-alerts"));
        assert_eq!(c.get("enable.auto.commit"), Some("false"));
    }

    #[test]
    fn the_producer_waits_for_every_replica() {
        let c = producer_config(&config("").kafka);
        assert_eq!(c.get("acks"), Some("all"));
        assert_eq!(c.get("enable.idempotence"), Some("true"));
    }
}
