//! docker-compose.yml, Prometheus and Grafana files agree with the service.
//! No containers run here, so this checks what can be checked: the files
//! parse, every mounted file exists, ports and names agree with
//! config/compose.toml, and every metric the dashboard and the alert rules
//! query is one a live service really exports.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::mocking::MockCluster;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use rdkafka::ClientConfig;
use serde_json::Value;

use inferstream::Config;

use crate::harness::{free_port, http_get};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn yaml(path: &str) -> Value {
    let text = std::fs::read_to_string(root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_norway::from_str(&text).unwrap_or_else(|e| panic!("{path} does not parse: {e}"))
}

fn compose() -> Value {
    yaml("docker-compose.yml")
}

fn service<'a>(compose: &'a Value, name: &str) -> &'a Value {
    let s = &compose["services"][name];
    assert!(s.is_object(), "docker-compose.yml has no service `{name}`");
    s
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Array(a) => a.iter().map(text).collect::<Vec<_>>().join(" "),
        other => other.to_string(),
    }
}

fn compose_config() -> Config {
    Config::load_with_env(Some(&root().join("config/compose.toml")), Vec::new())
        .unwrap_or_else(|e| panic!("config/compose.toml: {e}"))
}

/// host:port of a URL such as http://minio:9000.
fn host_port(url: &str) -> (String, u16) {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let (host, port) = rest
        .trim_end_matches('/')
        .rsplit_once(':')
        .expect("host:port");
    (host.to_string(), port.parse().expect("port"))
}

#[test]
fn every_mounted_file_exists_and_every_service_is_there() {
    let compose = compose();
    for name in [
        "kafka",
        "minio",
        "localstack",
        "endpoint",
        "inferstream",
        "prometheus",
        "grafana",
    ] {
        service(&compose, name);
    }
    let services = compose["services"].as_object().unwrap();
    let mut mounted = 0;
    for (name, s) in services {
        for v in s["volumes"].as_array().into_iter().flatten() {
            let host = text(v).split(':').next().unwrap().to_string();
            if let Some(rel) = host.strip_prefix("./") {
                assert!(
                    root().join(rel).is_file(),
                    "service {name} mounts {host}, which does not exist"
                );
                mounted += 1;
            }
        }
        if s.get("build").is_some() {
            assert!(
                root().join("Dockerfile").is_file(),
                "service {name} builds a Dockerfile that is missing"
            );
        }
    }
    assert!(mounted >= 6, "only {mounted} mounted files checked");
}

#[test]
fn ports_hosts_and_topics_agree_with_the_compose_config() {
    let compose = compose();
    let cfg = compose_config();

    // Kafka: the service's brokers are the broker's advertised listener,
    // and every topic is made by kafka-init.
    let kafka_env = &service(&compose, "kafka")["environment"];
    let advertised = text(&kafka_env["KAFKA_ADVERTISED_LISTENERS"]);
    assert!(
        advertised
            .split(',')
            .any(|l| l.ends_with(&format!("//{}", cfg.kafka.brokers))),
        "kafka.brokers {} is not advertised: {advertised}",
        cfg.kafka.brokers
    );
    let init = text(&service(&compose, "kafka-init")["command"]);
    for topic in [
        &cfg.kafka.input_topic,
        &cfg.kafka.results_topic,
        &cfg.kafka.review_topic,
        &cfg.kafka.dead_letter_topic,
    ] {
        assert!(
            init.contains(topic.as_str()),
            "kafka-init does not create {topic}"
        );
    }
    // The digest alerter's state topic, compacted.
    let state = &cfg.alerts.state_topic;
    assert!(
        init.lines()
            .any(|l| l.contains(&format!("--topic {state} "))
                && l.contains("cleanup.policy=compact")),
        "kafka-init does not create {state} compacted: {init}"
    );

    // MinIO notifies the service's input topic, on the broker it reads.
    let minio_env = &service(&compose, "minio")["environment"];
    assert_eq!(
        text(&minio_env["MINIO_NOTIFY_KAFKA_TOPIC_PRIMARY"]),
        cfg.kafka.input_topic
    );
    assert_eq!(
        text(&minio_env["MINIO_NOTIFY_KAFKA_BROKERS_PRIMARY"]),
        cfg.kafka.brokers
    );
    let minio_init = text(&service(&compose, "minio-init")["command"]);
    assert!(
        minio_init.contains("arn:minio:sqs::PRIMARY:kafka"),
        "{minio_init}"
    );
    let (capture_bucket, _) = cfg
        .capture
        .bucket_and_prefix()
        .expect("capture destination");
    assert!(
        minio_init.contains(&format!("local/{capture_bucket}")),
        "capture bucket not made: {minio_init}"
    );
    let (host, port) = host_port(&cfg.aws.s3.endpoint_url);
    assert_eq!(host, "minio");
    assert!(text(&service(&compose, "minio")["ports"]).contains(&format!(":{port}")));
    let inferstream_env = &service(&compose, "inferstream")["environment"];
    assert_eq!(
        text(&inferstream_env["AWS_ACCESS_KEY_ID"]),
        text(&minio_env["MINIO_ROOT_USER"])
    );
    assert_eq!(
        text(&inferstream_env["AWS_SECRET_ACCESS_KEY"]),
        text(&minio_env["MINIO_ROOT_PASSWORD"])
    );

    // The endpoint listens where the service calls it.
    let (host, port) = host_port(&cfg.aws.sagemaker.endpoint_url);
    assert_eq!(host, "endpoint");
    assert!(text(&service(&compose, "endpoint")["command"]).contains(&format!("0.0.0.0:{port}")));

    // SNS: LocalStack, and its init script makes the alerts topic.
    let (host, port) = host_port(&cfg.aws.sns.endpoint_url);
    assert_eq!(host, "localstack");
    assert!(text(&service(&compose, "localstack")["ports"]).contains(&format!("{port}:{port}")));
    let topic = cfg.alerts.topic_arn.rsplit(':').next().unwrap();
    let init_sh = std::fs::read_to_string(root().join("config/localstack/init-aws.sh")).unwrap();
    assert!(
        init_sh.contains(&format!("--name {topic}")),
        "init-aws.sh does not create {topic}"
    );

    // Prometheus scrapes the port the service listens on.
    let port = cfg.metrics.listen.rsplit(':').next().unwrap();
    assert!(text(&service(&compose, "inferstream")["ports"]).contains(&format!(":{port}")));
    let prom = yaml("config/prometheus/prometheus.yml");
    let targets = text(&prom["scrape_configs"][0]["static_configs"][0]["targets"]);
    assert_eq!(targets, format!("inferstream:{port}"));
    let mounts = text(&service(&compose, "prometheus")["volumes"]);
    for rule_file in prom["rule_files"].as_array().unwrap() {
        assert!(
            mounts.contains(&format!(":{}", text(rule_file))),
            "{rule_file} is not mounted"
        );
    }

    // Grafana: the dashboard's datasource is the provisioned one, and the
    // provider reads the directory the dashboard is mounted in.
    let ds = yaml("config/grafana/provisioning/datasources/prometheus.yml");
    let uid = text(&ds["datasources"][0]["uid"]);
    assert_eq!(text(&ds["datasources"][0]["url"]), "http://prometheus:9090");
    let provider = yaml("config/grafana/provisioning/dashboards/dashboards.yml");
    let dir = text(&provider["providers"][0]["options"]["path"]);
    assert!(
        text(&service(&compose, "grafana")["volumes"]).contains(&format!("{dir}/inferstream.json"))
    );
    for panel in dashboard()["panels"].as_array().unwrap() {
        assert_eq!(
            text(&panel["datasource"]["uid"]),
            uid,
            "panel {}",
            panel["title"]
        );
    }
}

fn dashboard() -> Value {
    let text =
        std::fs::read_to_string(root().join("config/grafana/dashboards/inferstream.json")).unwrap();
    serde_json::from_str(&text).expect("dashboard JSON")
}

/// Metric names (`inferstream_…`) in a PromQL expression.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = expr;
    while let Some(i) = rest.find("inferstream_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        out.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn dashboard_and_alert_rules_query_metrics_the_service_exports() {
    // What the dashboard and the rules ask for.
    let mut wanted: BTreeSet<(String, String)> = BTreeSet::new();
    for panel in dashboard()["panels"].as_array().unwrap() {
        for t in panel["targets"].as_array().unwrap() {
            for m in metric_names(t["expr"].as_str().unwrap()) {
                wanted.insert((m, format!("dashboard panel {}", panel["title"])));
            }
        }
    }
    let rules = yaml("config/prometheus/rules.yml");
    for group in rules["groups"].as_array().unwrap() {
        for rule in group["rules"].as_array().unwrap() {
            for m in metric_names(rule["expr"].as_str().unwrap()) {
                wanted.insert((m, format!("alert rule {}", rule["alert"])));
            }
        }
    }
    assert!(wanted.len() >= 15, "{wanted:?}");

    // A live service: embedded Kafka, two test events (skipped, so no AWS
    // call is needed), until the lag and committed offsets are exported.
    let kafka = MockCluster::new(1).unwrap();
    kafka.create_topic("s3-events", 2, 1).unwrap();
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", kafka.bootstrap_servers())
        .create()
        .unwrap();
    for p in 0..2 {
        producer
            .send(
                FutureRecord::<(), _>::to("s3-events").partition(p).payload(
                    br#"{"Service":"Amazon S3","Event":"s3:TestEvent","Bucket":"uploads"}"#,
                ),
                Timeout::Never,
            )
            .await
            .map_err(|(e, _)| e)
            .unwrap();
    }
    let port = free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_inferstream"))
        .arg("run")
        .current_dir(root())
        .env("INFERSTREAM__KAFKA__BROKERS", kafka.bootstrap_servers())
        .env("INFERSTREAM__KAFKA__SESSION_TIMEOUT", "6s")
        .env("INFERSTREAM__KAFKA__HEARTBEAT_INTERVAL", "500ms")
        .env("INFERSTREAM__ALERTS__ENABLED", "false")
        .env("INFERSTREAM__METRICS__LISTEN", format!("127.0.0.1:{port}"))
        .env("AWS_REGION", "us-east-1")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}/metrics");
    let end = Instant::now() + Duration::from_secs(60);
    let mut last = String::new();
    let body = loop {
        if let Ok((200, body)) = http_get(&url).await {
            last = body.clone();
            if body.contains("inferstream_consumer_lag{")
                && body.contains("inferstream_committed_offset{")
            {
                break body;
            }
        }
        if Instant::now() > end {
            let _ = child.kill();
            let seen: Vec<&str> = last
                .lines()
                .filter(|l| l.contains("lag") || l.contains("committed") || l.contains("events"))
                .collect();
            panic!("the service did not export lag and committed offsets within 60 s: {seen:#?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let _ = child.kill();
    let _ = child.wait();
    let exported: BTreeSet<&str> = body
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .collect();
    let missing: Vec<_> = wanted
        .iter()
        .filter(|(m, _)| !exported.contains(m.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "queried but not exported: {missing:?}\nexported: {exported:?}"
    );
}
