//! Tools a user runs beside the service; they use the library, and
//! nothing in the library uses them.

pub mod baseline;
pub mod demo;
pub mod endpoint;
pub mod events;
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
