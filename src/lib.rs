//! inferstream classifies images as they land in S3.
//!
//! ```text
//!  Kafka `s3-events` ──► source ──► decode ──► fetch (S3) ──► batch ──► infer (SageMaker)
//!                          │           │            │                        │
//!                          │           └── skip / dead letter ◄──────────────┤
//!                          │                                                 ▼
//!                          │                                   route (threshold)
//!                          │                                                 ▼
//!                          │          sinks: results / review / dead-letter topics, SNS alerts
//!                          ▼                                                 │
//!                     ack tracker ◄──── every output acknowledged ───────────┘
//!                          │
//!                     commit lowest incomplete offset per partition
//! ```
//!
//! The map, one line per module, lowest layer first. A module imports only
//! modules above it in this list (the stages only stages before them in the
//! flow); `layout_tests` below checks it, and that the README's "Code map"
//! matches the files.
//!
//! ```text
//! record.rs              output records: prediction, dead letter (reasons, payload caps)
//! config.rs              typed configuration, layered and validated
//! metrics.rs             every metric, declared in one place; depends on no other module
//! http.rs                /metrics, /healthz, /readyz
//! shutdown.rs            SIGTERM/SIGINT, the shutdown watchdog
//! clients.rs             the outside systems' clients, owned by no stage:
//!   clients/aws.rs         AWS SDK clients, what is retryable, backoff
//!   clients/kafka.rs       librdkafka properties of the consumer and producer
//! pipeline.rs            the service: the stages wired with bounded channels, shutdown
//!   pipeline/ack.rs        offset tracking: committable when every output is durable
//!   pipeline/source.rs     Kafka consumer context (rebalances, lag) and the commit thread
//!   pipeline/decode.rs     event JSON -> images, skips and rejections
//!   pipeline/decode/fuzz.rs  property tests of the decoder
//!   pipeline/fetch.rs      S3 GetObject with a size cap and a magic-byte check
//!   pipeline/batch.rs      micro-batches by count, bytes and wait
//!   pipeline/breaker.rs    the endpoint's circuit breaker
//!   pipeline/infer.rs      SageMaker InvokeEndpoint: retries, canary probes, bisection
//!   pipeline/route.rs      confidence threshold -> accepted or review
//!   pipeline/sink.rs       Kafka results/review/dead-letter topics, SNS alerts
//!   pipeline/capture.rs    sampled predictions to S3 (data capture)
//!   pipeline/monitor.rs    model monitoring: baseline, drift (PSI) over a sliding window
//!   pipeline/truth.rs      ground truth joined to predictions: accuracy, precision, recall
//!   pipeline/truth_s3.rs   ground truth read from S3 as it is written (Model Monitor layout)
//!   pipeline/control.rs    live thresholds every instance follows, from the control topic
//!   pipeline/recent.rs     the latest predictions, for the console's live view and curves
//!   pipeline/digest.rs     alert digests: windows, label groups, dedup, storm limit, the messages
//!   pipeline/alerts.rs     the digest alerter: reads the review topic, publishes, records what it alerted
//! console.rs             the operator console: live view, thresholds and their effect, changes
//! app.rs                 the process: logging, runtime, the `run` and `check-config` commands
//! tools.rs               tools a user runs beside the service:
//!   tools/endpoint.rs      `inferstream endpoint`, a SageMaker-compatible test model
//!   tools/events.rs        upload notifications in the four shapes (demo, tests)
//!   tools/report.rs        `inferstream report`, charts from data capture
//!   tools/baseline.rs      `inferstream baseline`, a drift baseline from data capture
//!   tools/demo.rs          `inferstream demo`, everything on one machine
//! lib.rs                 this map
//! main.rs                the command line: argument parsing and dispatch
//! ```

pub mod app;
pub mod clients;
pub mod config;
pub mod console;
pub mod http;
pub mod metrics;
pub mod pipeline;
pub mod record;
pub mod shutdown;
pub mod tools;

pub use config::Config;
pub use pipeline::{start, Service};

#[cfg(test)]
mod layout_tests {
    //! The layering of the map above, checked on the sources.

    use std::collections::BTreeSet;
    use std::path::{Path, PathBuf};

    /// Modules by layer; a module may import only modules of a lower
    /// number. The stages are numbered in the order data flows.
    const LAYERS: &[(&str, u32)] = &[
        ("record", 0),
        ("config", 1),
        ("metrics", 1),
        ("http", 2),
        ("shutdown", 2),
        ("clients", 2),
        ("clients::aws", 2),
        ("clients::kafka", 2),
        ("clients::s3get", 3),
        ("pipeline::ack", 10),
        ("pipeline::source", 11),
        ("pipeline::decode", 12),
        ("pipeline::fetch", 13),
        ("pipeline::batch", 14),
        ("pipeline::breaker", 15),
        ("pipeline::adaptive", 15),
        ("pipeline::infer", 16),
        ("pipeline::route", 17),
        ("pipeline::sink", 18),
        ("pipeline::capture", 19),
        ("pipeline::monitor", 20),
        ("pipeline::truth", 20),
        ("pipeline::truth_s3", 21),
        ("pipeline::control", 16),
        ("pipeline::recent", 16),
        ("console", 25),
        ("pipeline::digest", 21),
        ("pipeline::alerts", 22),
        ("pipeline", 30),
        ("app", 40),
        ("tools", 50),
        ("tools::endpoint", 50),
        ("tools::events", 50),
        ("tools::report", 51),
        ("tools::baseline", 52),
        ("tools::backfill", 52),
        ("tools::redrive", 52),
        ("tools::demo", 52),
        ("lib", 100),
        ("main", 100),
    ];

    fn layer(module: &str) -> u32 {
        LAYERS
            .iter()
            .find(|(m, _)| *m == module)
            .map(|(_, l)| *l)
            .unwrap_or_else(|| panic!("module `{module}` is not in LAYERS (src/lib.rs)"))
    }

    fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                rust_files(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }

    fn src() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
    }

    /// `src/pipeline/decode/fuzz.rs` -> `pipeline::decode` (its own
    /// module's tests count as that module).
    fn module_of(path: &Path) -> String {
        let rel = path.strip_prefix(src()).unwrap().with_extension("");
        let name = rel.to_string_lossy().replace('/', "::");
        if name == "pipeline::decode::fuzz" {
            "pipeline::decode".to_string()
        } else {
            name
        }
    }

    /// The modules a file's non-test code names with `crate::`.
    fn imports(text: &str) -> BTreeSet<String> {
        let code = text.split("#[cfg(test)]").next().unwrap_or_default();
        let mut out = BTreeSet::new();
        let mut rest = code;
        while let Some(i) = rest.find("crate::") {
            rest = &rest[i + "crate::".len()..];
            let path: String = rest
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || *c == '_' || *c == ':')
                .collect();
            let parts: Vec<&str> = path.split("::").filter(|p| !p.is_empty()).collect();
            let Some(first) = parts.first() else { continue };
            let two = parts.get(1).map(|s| format!("{first}::{s}"));
            match two {
                Some(two) if LAYERS.iter().any(|(m, _)| *m == two) => out.insert(two),
                _ => out.insert(first.to_string()),
            };
        }
        out
    }

    #[test]
    fn no_module_imports_one_above_it() {
        let mut files = Vec::new();
        rust_files(&src(), &mut files);
        let mut wrong = Vec::new();
        for file in &files {
            let module = module_of(file);
            if module == "pipeline::decode::fuzz" {
                continue;
            }
            let text = std::fs::read_to_string(file).unwrap();
            for target in imports(&text) {
                if target != module && layer(&target) >= layer(&module) {
                    wrong.push(format!("{module} imports {target}"));
                }
            }
        }
        assert!(wrong.is_empty(), "imports against the layering: {wrong:#?}");
    }

    #[test]
    fn the_readme_code_map_lists_every_source_file() {
        let readme =
            std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
                .unwrap();
        let start = readme.find("## Code map").expect("a `## Code map` section");
        let section = &readme[start..];
        let section = &section[..section[3..].find("\n## ").map_or(section.len(), |i| i + 3)];
        let mut files = Vec::new();
        rust_files(&src(), &mut files);
        let on_disk: BTreeSet<String> = files
            .iter()
            .map(|f| {
                let rel = f
                    .strip_prefix(Path::new(env!("CARGO_MANIFEST_DIR")))
                    .unwrap();
                rel.to_string_lossy().to_string()
            })
            .collect();
        let in_map: BTreeSet<String> = section
            .split('`')
            .filter(|w| w.starts_with("src/") && w.ends_with(".rs"))
            .map(str::to_string)
            .collect();
        assert_eq!(in_map, on_disk, "README \"Code map\" against `ls -R src`");
        for (module, _) in LAYERS {
            let file = match *module {
                "lib" | "main" => format!("src/{module}.rs"),
                m => format!("src/{}.rs", m.replace("::", "/")),
            };
            assert!(
                on_disk.contains(&file),
                "LAYERS names {module}, but {file} is gone"
            );
        }
    }
}
