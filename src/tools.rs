//! Tools a user runs beside the service; they use the library, and
//! nothing in the library uses them.

pub mod backfill;
pub mod baseline;
pub mod demo;
pub mod endpoint;
pub mod events;
pub mod redrive;
pub mod report;

/// A tool's start: logging to stderr (warnings), then the configuration
/// at `path` layered on the defaults, unchecked (a tool needs only part
/// of it); a bad one is printed and gives exit code 2.
pub fn load_config(
    path: Option<&std::path::Path>,
) -> Result<crate::config::Config, std::process::ExitCode> {
    crate::app::init_logging(crate::config::LogFormat::Text, "warn");
    crate::config::Config::load_unchecked(crate::app::config_path(path).as_deref()).map_err(|e| {
        eprintln!("error: {e}");
        std::process::ExitCode::from(2)
    })
}

/// The output producer of a tool that sends to Kafka; none for a dry run.
pub fn producer_unless(
    dry_run: bool,
    cfg: &crate::config::Config,
) -> Result<Option<rdkafka::producer::FutureProducer>, String> {
    if dry_run {
        return Ok(None);
    }
    crate::clients::kafka::producer_config(&cfg.kafka)
        .create()
        .map(Some)
        .map_err(|e| {
            format!("creating the Kafka producer (check kafka.brokers and kafka.properties): {e}")
        })
}

/// A long job's progress on stderr: one line redrawn on a terminal, a log
/// line every 5 s otherwise (so logs collected from a pipe stay short).
pub struct Progress {
    bar: Option<indicatif::ProgressBar>,
    last_line: Option<std::time::Instant>,
    name: &'static str,
}

impl Progress {
    pub fn new(name: &'static str) -> Progress {
        use std::io::IsTerminal as _;
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new_spinner();
            bar.enable_steady_tick(std::time::Duration::from_millis(200));
            bar
        });
        Progress {
            bar,
            last_line: None,
            name,
        }
    }

    /// Shows `line` (made only when it will be shown).
    pub fn show(&mut self, line: impl FnOnce() -> String) {
        match &self.bar {
            Some(bar) => bar.set_message(line()),
            None if self
                .last_line
                .is_none_or(|t| t.elapsed() >= std::time::Duration::from_secs(5)) =>
            {
                self.last_line = Some(std::time::Instant::now());
                eprintln!("{}: {}", self.name, line());
            }
            None => {}
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// `95 s` → "1m 35s"; for estimates, so whole seconds.
pub fn eta(secs: f64) -> String {
    if !secs.is_finite() || secs < 0.0 {
        return "unknown".into();
    }
    humantime::format_duration(std::time::Duration::from_secs(secs.round() as u64)).to_string()
}
