//! Sinks: Kafka results, review and dead-letter topics, and SNS alerts.
//!
//! A delivery returns only when Kafka (or SNS) acknowledged it, so that the
//! caller can release the input offset afterwards.

use std::sync::Arc;
use std::time::Duration;

use aws_sdk_sns::types::MessageAttributeValue;
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;

use crate::clients::aws::{backoff, classify, describe};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::record::{kafka_key, DeadLetter, Decision, Prediction};

/// SNS subjects must be shorter than 100 characters, ASCII, on one line.
pub const MAX_SUBJECT: usize = 99;

struct SendError {
    /// Kafka refused the record for its size; retrying cannot help.
    too_large: bool,
    detail: String,
}

/// Writes output records to Kafka.
#[derive(Clone)]
pub struct KafkaSink {
    producer: FutureProducer,
    results_topic: String,
    review_topic: String,
    dead_letter_topic: String,
    metrics: Arc<Metrics>,
}

impl KafkaSink {
    pub fn new(producer: FutureProducer, config: &Config, metrics: Arc<Metrics>) -> KafkaSink {
        KafkaSink {
            producer,
            results_topic: config.kafka.results_topic.clone(),
            review_topic: config.kafka.review_topic.clone(),
            dead_letter_topic: config.kafka.dead_letter_topic.clone(),
            metrics,
        }
    }

    async fn send(&self, topic: &str, key: &str, payload: &[u8]) -> Result<(), SendError> {
        let record = FutureRecord::to(topic).key(key).payload(payload);
        match self.producer.send(record, Timeout::Never).await {
            Ok(_) => Ok(()),
            Err((e, _)) => Err(SendError {
                too_large: matches!(
                    e.rdkafka_error_code(),
                    Some(
                        RDKafkaErrorCode::MessageSizeTooLarge
                            | RDKafkaErrorCode::MessageBatchTooLarge
                    )
                ),
                detail: format!("producing to {topic} failed: {e}"),
            }),
        }
    }

    /// Writes a prediction to the results or review topic.
    pub async fn prediction(&self, p: &Prediction) -> Result<(), String> {
        let topic = match p.decision {
            Decision::Accepted => &self.results_topic,
            Decision::Review => &self.review_topic,
        };
        let json = serde_json::to_vec(p).map_err(|e| format!("cannot encode prediction: {e}"))?;
        self.send(topic, &kafka_key(&p.bucket, &p.key), &json)
            .await
            .map_err(|e| e.detail)
    }

    /// Writes a dead-letter record. One that Kafka refuses as too large
    /// (a dead-letter topic with a limit below the configured cap) is
    /// written again without its payload rather than stopping the service.
    pub async fn dead_letter(&self, d: &DeadLetter) -> Result<(), String> {
        let key = match (&d.bucket, &d.key) {
            (Some(b), Some(k)) => kafka_key(b, k),
            _ => format!(
                "{}/{}/{}",
                d.source.topic, d.source.partition, d.source.offset
            ),
        };
        let json = serde_json::to_vec(d).map_err(|e| format!("cannot encode dead letter: {e}"))?;
        match self.send(&self.dead_letter_topic, &key, &json).await {
            Ok(()) => {}
            Err(e) if e.too_large => {
                tracing::warn!(reason = %d.reason, bytes = json.len(), error = %e.detail,
                    "dead letter too large for its topic; writing it without the payload");
                let small = d.without_payload("the record was too large for the dead-letter topic");
                let json = serde_json::to_vec(&small)
                    .map_err(|e| format!("cannot encode dead letter: {e}"))?;
                self.send(&self.dead_letter_topic, &key, &json)
                    .await
                    .map_err(|e| e.detail)?;
            }
            Err(e) => return Err(e.detail),
        }
        self.metrics
            .dead_letters
            .with_label_values(&[d.reason.as_str()])
            .inc();
        Ok(())
    }
}

/// Publishes low-confidence alerts to SNS.
#[derive(Clone)]
pub struct Alerter {
    client: aws_sdk_sns::Client,
    topic_arn: String,
    max_attempts: u32,
    timeout: Duration,
    metrics: Arc<Metrics>,
}

impl Alerter {
    pub fn new(client: aws_sdk_sns::Client, config: &Config, metrics: Arc<Metrics>) -> Alerter {
        Alerter {
            client,
            topic_arn: config.alerts.topic_arn.clone(),
            max_attempts: config.alerts.max_attempts,
            timeout: config.alerts.timeout,
            metrics,
        }
    }

    /// Publishes the alert of a review prediction, retrying with backoff.
    pub async fn alert(&self, p: &Prediction) -> Result<(), String> {
        let subject = subject(p);
        let message = message(p);
        let attributes = [
            ("label", "String", p.label.clone()),
            ("decision", "String", p.decision.as_str().to_string()),
            ("confidence", "Number", format!("{:.4}", p.confidence)),
        ];
        let mut last = String::new();
        for attempt in 0..self.max_attempts {
            if attempt > 0 {
                tokio::time::sleep(backoff(
                    attempt,
                    Duration::from_millis(200),
                    Duration::from_secs(10),
                ))
                .await;
            }
            match self.publish(&subject, &message, &attributes).await {
                Ok(()) => return Ok(()),
                Err(e) => {
                    tracing::debug!(attempt, detail = %e.detail, "sns publish failed");
                    last = e.detail;
                    if !e.retryable {
                        break;
                    }
                }
            }
        }
        self.metrics.alerts_failed.inc();
        Err(format!("SNS publish to {} failed: {last}", self.topic_arn))
    }

    /// One Publish call within `alerts.timeout`; `attributes` are (name,
    /// data type, value) message attributes.
    pub async fn publish(
        &self,
        subject: &str,
        message: &str,
        attributes: &[(&str, &str, String)],
    ) -> Result<(), PublishError> {
        let mut req = self
            .client
            .publish()
            .topic_arn(&self.topic_arn)
            .subject(subject)
            .message(message);
        for (name, data_type, value) in attributes {
            if let Ok(a) = MessageAttributeValue::builder()
                .data_type(*data_type)
                .string_value(value)
                .build()
            {
                req = req.message_attributes(*name, a);
            }
        }
        match tokio::time::timeout(self.timeout, req.send()).await {
            Ok(Ok(_)) => {
                self.metrics.alerts_published.inc();
                Ok(())
            }
            Ok(Err(err)) => Err(PublishError {
                retryable: classify(&err).retryable(),
                detail: describe(&err),
            }),
            Err(_) => Err(PublishError {
                retryable: true,
                detail: format!(
                    "no answer within alerts.timeout ({})",
                    humantime::format_duration(self.timeout)
                ),
            }),
        }
    }

    pub fn topic_arn(&self) -> &str {
        &self.topic_arn
    }
}

/// A failed Publish call.
#[derive(Debug)]
pub struct PublishError {
    /// Throttling, a 5xx or no answer: another attempt may succeed.
    pub retryable: bool,
    pub detail: String,
}

/// Printable ASCII on one line, under 100 characters (SNS's subject rules).
pub fn ascii_subject(raw: &str) -> String {
    let mut s: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii() && !c.is_ascii_control() {
                c
            } else {
                '?'
            }
        })
        .collect();
    if s.len() > MAX_SUBJECT {
        s.truncate(MAX_SUBJECT - 3);
        s.push_str("...");
    }
    s
}

/// `Low confidence: motorcycle 0.61 - uploads/bikes/img 1.png`, ASCII, < 100 characters.
pub fn subject(p: &Prediction) -> String {
    ascii_subject(&format!(
        "Low confidence: {} {:.2} - {}/{}",
        p.label, p.confidence, p.bucket, p.key
    ))
}

/// Readable text for email subscribers, then the prediction JSON.
pub fn message(p: &Prediction) -> String {
    let mut scores: Vec<_> = p.scores.iter().collect();
    scores.sort_by(|a, b| b.1.total_cmp(a.1));
    let scores = scores
        .iter()
        .map(|(l, s)| format!("  {l}: {s:.4}"))
        .collect::<Vec<_>>()
        .join("\n");
    let json = serde_json::to_string_pretty(p).unwrap_or_default();
    format!(
        "An image was classified below the confidence threshold and needs review.\n\n\
         Object:     s3://{}/{}\n\
         Label:      {}\n\
         Confidence: {:.4} (threshold {:.2})\n\
         Endpoint:   {}\n\
         Event time: {}\n\n\
         Scores:\n{scores}\n\n\
         Prediction record:\n{json}\n",
        p.bucket,
        p.key,
        p.label,
        p.confidence,
        p.threshold,
        p.endpoint,
        p.event_time.as_deref().unwrap_or("unknown"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{Latency, SourceRef};

    fn prediction(key: &str) -> Prediction {
        Prediction {
            schema: crate::record::PREDICTION_SCHEMA.into(),
            id: format!("uploads/{key}@e"),
            bucket: "uploads".into(),
            key: key.into(),
            etag: Some("e".into()),
            version_id: None,
            size: 10,
            label: "motorcycle".into(),
            confidence: 0.61,
            scores: [
                ("bicycle".to_string(), 0.39),
                ("motorcycle".to_string(), 0.61),
            ]
            .into(),
            threshold: 0.93,
            decision: Decision::Review,
            endpoint: "image-classifier".into(),
            variant: None,
            event_time: None,
            backfill: false,
            processed_at: "now".into(),
            latency_ms: Latency {
                fetch: 1.0,
                infer: 2.0,
                total: 3.0,
            },
            source: SourceRef {
                topic: "s3-events".into(),
                partition: 0,
                offset: 1,
            },
        }
    }

    #[test]
    fn subjects_are_short_ascii_single_lines() {
        assert_eq!(
            subject(&prediction("bikes/img 1.png")),
            "Low confidence: motorcycle 0.61 - uploads/bikes/img 1.png"
        );
        let long = subject(&prediction(&"ü\n".repeat(200)));
        assert!(long.len() < 100 && long.ends_with("..."));
        assert!(long.chars().all(|c| c.is_ascii() && !c.is_ascii_control()));
    }

    #[test]
    fn message_has_text_then_the_record() {
        let m = message(&prediction("bikes/img 1.png"));
        assert!(m.starts_with("An image was classified below"));
        assert!(m.contains("s3://uploads/bikes/img 1.png"));
        let json_start = m.find('{').unwrap();
        let v: serde_json::Value = serde_json::from_str(m[json_start..].trim()).unwrap();
        assert_eq!(v["decision"], "review");
    }
}
