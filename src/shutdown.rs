//! SIGTERM and SIGINT start a drain; a second signal exits at once. A
//! watchdog ends the process if the shutdown outlasts its budget.

use tokio_util::sync::CancellationToken;

/// Cancels `token` on the first SIGTERM or SIGINT; exits with 130 on the second.
pub fn on_signals(token: CancellationToken) -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        let mut seen = 0;
        loop {
            let name = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            };
            seen += 1;
            if seen == 1 {
                tracing::info!(
                    signal = name,
                    "draining in-flight work; send again to exit at once"
                );
                token.cancel();
            } else {
                tracing::warn!(signal = name, "second signal: exiting without draining");
                std::process::exit(130);
            }
        }
    });
    Ok(())
}

/// How long past `pipeline.shutdown_timeout` the watchdog waits.
pub const WATCHDOG_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// Once `token` is cancelled, exits the process (status 1) if it is still
/// running `budget` + [`WATCHDOG_GRACE`] later. Every wait of the shutdown
/// is bounded by the budget already; this only catches a call that ignores
/// its bound (a Kafka client call blocking in C), so that the process never
/// outlives the orchestrator's grace period by much. Nothing is lost: what
/// was not committed is re-delivered.
pub fn watchdog(token: CancellationToken, budget: std::time::Duration) {
    tokio::spawn(async move {
        token.cancelled().await;
        let _ = std::thread::Builder::new()
            .name("inferstream-watchdog".into())
            .spawn(move || {
                std::thread::sleep(budget + WATCHDOG_GRACE);
                tracing::error!(
                    ?budget,
                    "shutdown outlasted pipeline.shutdown_timeout; exiting now (uncommitted work is re-delivered)"
                );
                std::process::exit(1);
            });
    });
}
