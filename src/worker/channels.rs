//! Session channel I/O as a worker sees it. The HTTP implementation arrives with
//! the realtime streams; [`MemoryChannels`] serves tests and local experiments.

use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Notify;

/// One record on a channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub seq: u64,
    pub body: String,
    pub headers: Vec<(String, String)>,
}

impl Record {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

#[async_trait]
pub trait SessionChannels: Send + Sync {
    /// The next `.in` record after `after` (from the start if None), waiting up
    /// to `timeout`; None if nothing arrived.
    async fn next_input(&self, after: Option<u64>, timeout: Duration) -> anyhow::Result<Option<Record>>;
    /// Appends a record to `.out`.
    async fn append_output(&self, body: &str, headers: &[(String, String)]) -> anyhow::Result<()>;
    /// Every `.out` record so far (an agent reads it to resume where the last run stopped).
    async fn read_output(&self) -> anyhow::Result<Vec<Record>>;
}

/// Makes the channels of the session a run serves.
pub trait ChannelFactory: Send + Sync {
    fn for_run(&self, run: &super::AssignedRun) -> std::sync::Arc<dyn SessionChannels>;
}

/// In-memory channels: one `.in` and one `.out` list.
#[derive(Default)]
pub struct MemoryChannels {
    input: Mutex<Vec<Record>>,
    output: Mutex<Vec<Record>>,
    arrived: Notify,
}

impl MemoryChannels {
    pub fn send_input(&self, body: &str, headers: &[(String, String)]) -> u64 {
        let seq = {
            let mut input = self.input.lock().unwrap_or_else(|e| e.into_inner());
            let seq = input.len() as u64;
            input.push(Record { seq, body: body.to_string(), headers: headers.to_vec() });
            seq
        };
        self.arrived.notify_waiters();
        seq
    }

    pub fn output(&self) -> Vec<Record> {
        self.output.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

#[async_trait]
impl SessionChannels for MemoryChannels {
    async fn next_input(&self, after: Option<u64>, timeout: Duration) -> anyhow::Result<Option<Record>> {
        let wanted = after.map(|a| a + 1).unwrap_or(0) as usize;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.arrived.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(r) = self.input.lock().unwrap_or_else(|e| e.into_inner()).get(wanted) {
                return Ok(Some(r.clone()));
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Ok(None);
            }
        }
    }

    async fn append_output(&self, body: &str, headers: &[(String, String)]) -> anyhow::Result<()> {
        let mut out = self.output.lock().unwrap_or_else(|e| e.into_inner());
        let seq = out.len() as u64;
        out.push(Record { seq, body: body.to_string(), headers: headers.to_vec() });
        Ok(())
    }

    async fn read_output(&self) -> anyhow::Result<Vec<Record>> {
        Ok(self.output())
    }
}
