//! Fan-out: one upstream reader per active channel per server process.
//!
//! Appends announce themselves on one Redis pub/sub channel. A single listener
//! per process wakes the local feed of the channel named; the feed reads the new
//! records once (XRANGE on the shared connection) and broadcasts them to every
//! local subscriber. Subscribers never hold a Redis connection of their own, and
//! a feed lives exactly as long as somebody subscribes to it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::{broadcast, Notify};

use super::sse::Encoded;
use super::store::ChannelStore;
use super::{ChannelKey, Io};

/// Records buffered per feed for slow subscribers; a subscriber that falls
/// further behind re-reads from Redis.
const FEED_BUFFER: usize = 1024;
/// A feed re-checks Redis this often even without a notification, in case one
/// was lost (listener reconnecting).
const SAFETY_POLL: Duration = Duration::from_secs(1);

pub struct Feed {
    key: ChannelKey,
    tx: broadcast::Sender<Arc<Encoded>>,
    wake: Arc<Notify>,
    hub: Weak<HubInner>,
    task: tokio::task::JoinHandle<()>,
}

impl Feed {
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Encoded>> {
        self.tx.subscribe()
    }
}

impl Drop for Feed {
    fn drop(&mut self) {
        self.task.abort();
        if let Some(hub) = self.hub.upgrade() {
            if let Ok(mut feeds) = hub.feeds.lock() {
                // Only remove our own entry (a newer feed may have replaced it).
                if feeds.get(&self.key).is_some_and(|w| w.strong_count() == 0) {
                    feeds.remove(&self.key);
                }
            }
        }
    }
}

struct HubInner {
    store: ChannelStore,
    feeds: Mutex<HashMap<ChannelKey, Weak<Feed>>>,
}

#[derive(Clone)]
pub struct Hub(Arc<HubInner>);

impl Hub {
    pub fn new(store: ChannelStore) -> Self {
        Hub(Arc::new(HubInner { store, feeds: Mutex::new(HashMap::new()) }))
    }

    /// The feed of `key`, started if nobody was subscribed.
    pub fn feed(&self, key: ChannelKey) -> Arc<Feed> {
        let mut feeds = self.0.feeds.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(feed) = feeds.get(&key).and_then(Weak::upgrade) {
            return feed;
        }
        let (tx, _) = broadcast::channel(FEED_BUFFER);
        let wake = Arc::new(Notify::new());
        let task = tokio::spawn(read_upstream(self.0.store.clone(), key, tx.clone(), wake.clone()));
        let feed = Arc::new(Feed { key, tx, wake, hub: Arc::downgrade(&self.0), task });
        feeds.insert(key, Arc::downgrade(&feed));
        feed
    }

    /// Wakes the local feed of `key`, if any (after a local append, or a notification).
    pub fn notify(&self, key: ChannelKey) {
        let feed = self.0.feeds.lock().ok().and_then(|f| f.get(&key).and_then(Weak::upgrade));
        if let Some(feed) = feed {
            feed.wake.notify_one();
        }
    }

    /// Number of channels with a live feed in this process.
    pub fn active_feeds(&self) -> usize {
        self.0.feeds.lock().map(|f| f.values().filter(|w| w.strong_count() > 0).count()).unwrap_or(0)
    }

    /// Listens for append notifications from every server. Runs until the
    /// process ends, reconnecting after errors.
    pub async fn listen(self, client: redis::Client) {
        let on_message = |payload: &str| {
            if let Some(key) = parse_tag(payload) {
                self.notify(key);
            }
        };
        crate::pubsub::follow(client, self.0.store.notify_channel(), "channel notify", on_message, || {}).await
    }
}

/// `<session uuid simple>:<io>:<seq>` → the channel.
fn parse_tag(payload: &str) -> Option<ChannelKey> {
    let mut parts = payload.split(':');
    let session_id = uuid::Uuid::parse_str(parts.next()?).ok()?;
    let io = Io::parse(parts.next()?)?;
    Some(ChannelKey { session_id, io })
}

async fn read_upstream(store: ChannelStore, key: ChannelKey, tx: broadcast::Sender<Arc<Encoded>>, wake: Arc<Notify>) {
    // Broadcast only what arrives after the feed starts; subscribers read older
    // records from Redis themselves.
    let mut last = match store.next_seq(key).await {
        Ok(0) => None,
        Ok(n) => Some(n - 1),
        Err(err) => {
            tracing::warn!(%err, "feed cannot read the channel tail");
            None
        }
    };
    loop {
        let _ = tokio::time::timeout(SAFETY_POLL, wake.notified()).await;
        loop {
            match store.read_after(key, last, 512).await {
                Ok(records) if records.is_empty() => break,
                Ok(records) => {
                    for r in records {
                        last = Some(r.seq_num);
                        let _ = tx.send(Arc::new(Encoded::new(&r)));
                    }
                }
                Err(err) => {
                    tracing::warn!(%err, "feed read failed");
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_parse() {
        let id = uuid::Uuid::now_v7();
        let key = parse_tag(&format!("{}:in:42", id.simple())).unwrap();
        assert_eq!(key, ChannelKey { session_id: id, io: Io::In });
        assert!(parse_tag("garbage").is_none());
    }
}
