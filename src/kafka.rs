//! Typed Kafka settings mapped to librdkafka properties, in one place.

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

/// The input consumer: manual offset management, statistics for lag.
pub fn consumer_config(cfg: &KafkaConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("client.id", "inferstream")
        .set("group.id", &cfg.group_id)
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
