//! Following one Redis pub/sub channel for the life of the process. The run
//! queues, the job queue and the channel hub each use one to learn of work that
//! other servers produced.

use std::time::Duration;

use futures::StreamExt;

/// Delivers every message on `channel` to `on_message`, reconnecting after any
/// error. `on_reconnect` runs after each lost connection (messages may have been
/// missed meanwhile). Never returns.
pub async fn follow(
    client: redis::Client,
    channel: String,
    what: &'static str,
    mut on_message: impl FnMut(&str),
    mut on_reconnect: impl FnMut(),
) {
    loop {
        match client.get_async_pubsub().await {
            Ok(mut pubsub) => match pubsub.subscribe(&channel).await {
                Ok(()) => {
                    let mut messages = pubsub.on_message();
                    while let Some(msg) = messages.next().await {
                        on_message(&msg.get_payload::<String>().unwrap_or_default());
                    }
                }
                Err(err) => tracing::warn!(%err, listener = what, "pub/sub subscribe failed"),
            },
            Err(err) => tracing::warn!(%err, listener = what, "pub/sub listener cannot connect"),
        }
        on_reconnect();
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
