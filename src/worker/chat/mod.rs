//! Trigger.dev's chat protocol for agents written with this library, so the
//! official clients (`AgentChat` and the AI SDK `useChat` transport
//! `TriggerChatTransport`) talk to them unchanged.
//!
//! - [`input`]: the `.in` records the clients send, typed.
//! - [`chunk`]: the AI SDK UI message stream chunks an agent writes on `.out`.
//! - [`turn`]: writing a turn (unique part ids) and ending it with `turn-complete`.
//! - [`session`]: the run's turn loop (stop, close, idle, resume) and the
//!   [`ChatAgent`] trait an agent implements.
//!
//! [`ChatTask`] runs a [`ChatAgent`] as a worker task.

pub mod chunk;
pub mod input;
pub mod session;
pub mod turn;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;

pub use chunk::{DataChunk, FinishReason, KnownChunk, UiChunk};
pub use input::{ChatInput, MessagePayload, Trigger, UiMessage};
pub use session::{ChatAgent, Exit, Outcome, ServeOptions, Turn};
pub use turn::TurnWriter;

use super::channels::ChannelFactory;
use super::{RunContext, TaskHandler};

/// How long a run waits for the next message when the session sets no
/// `idleTimeoutInSeconds`.
pub const DEFAULT_IDLE: Duration = Duration::from_secs(60);

/// A [`ChatAgent`] as a worker task: each run serves its session's channels.
pub struct ChatTask<A: ChatAgent> {
    pub agent: A,
    pub channels: Arc<dyn ChannelFactory>,
}

#[async_trait]
impl<A: ChatAgent> TaskHandler for ChatTask<A> {
    async fn run(&self, ctx: RunContext) -> anyhow::Result<Value> {
        let channels = self.channels.for_run(&ctx.run);
        let mut options = session::options_from_payload(&ctx.run.payload, DEFAULT_IDLE);
        if options.resume_after.is_none() {
            // No resume point from the server (a first run, or channels it
            // cannot see such as in-memory ones): read our own turn ends.
            options.resume_after = session::last_answered(&channels.read_output().await?);
        }
        let outcome = session::serve(&self.agent, channels, options, ctx.cancel.clone()).await?;
        Ok(outcome.to_output())
    }
}
