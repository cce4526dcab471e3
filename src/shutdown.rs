//! SIGTERM and SIGINT start a drain; a second signal exits at once.

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
