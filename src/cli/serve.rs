//! `serve` and `migrate`.

use tokio::net::TcpListener;

use sessiond::app::{self, AppState};
use sessiond::config::Config;

use super::deps;

pub async fn migrate(config: &Config) -> anyhow::Result<()> {
    deps::database(config).await?;
    println!("migrations applied");
    Ok(())
}

pub async fn serve(config: Config) -> anyhow::Result<()> {
    let pool = deps::database(&config).await?;
    let master = app::master_key(&config)?;
    #[cfg(feature = "test-faults")]
    if let Some(ms) = config.test_clock_offset() {
        sessiond::clock::set_test_offset_ms(ms);
        tracing::warn!(offset_ms = ms, "TEST MODE: this process's clock is shifted");
    }
    let listener = TcpListener::bind(&config.listen_addr).await?;
    let addr = listener.local_addr()?;
    let state = AppState::connect(config, pool, master).await?;
    tracing::info!(%addr, "sessiond listening on http://{addr}");
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop_tx.send(true);
    });
    app::serve(listener, state, stop_rx).await
}

/// Resolves on ctrl-c or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(err) = tokio::signal::ctrl_c().await {
            tracing::error!(%err, "cannot listen for ctrl-c");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(err) => {
                tracing::error!(%err, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
    tracing::info!("shutting down");
}
