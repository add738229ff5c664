//! Writing one turn's answer on `.out`: chunks with unique part ids, then the
//! `turn-complete` control record that ends the turn for the clients and tells
//! the next run where to resume.

use super::chunk::{envelope, UiChunk};
use crate::worker::channels::SessionChannels;

/// Header of `turn-complete`: the `.in` seq this turn answered (a message, or
/// the stop that ended it). The server resumes the next run after it.
pub use crate::streams::ANSWERED_HEADER as SESSION_IN_EVENT_ID_HEADER;
/// Header naming a control record's subtype (its body is empty).
pub use crate::streams::{CONTROL_HEADER, SESSION_CLOSED, TURN_COMPLETE};
/// Header of `turn-complete`: a fresh token for the browser's next requests.
pub const PUBLIC_ACCESS_TOKEN_HEADER: &str = "public-access-token";

/// Part ids for one run: a random prefix (so a retried attempt of the same run
/// never repeats an id a client already saw and would drop) and a counter.
pub struct PartIds {
    prefix: String,
    next: u64,
}

impl Default for PartIds {
    fn default() -> Self {
        PartIds { prefix: uuid::Uuid::new_v4().simple().to_string()[..12].to_string(), next: 0 }
    }
}

impl PartIds {
    /// A fresh id, unique on the channel; `kind` only makes it readable.
    pub fn next(&mut self, kind: &str) -> String {
        self.next += 1;
        format!("{kind}-{}-{}", self.prefix, self.next)
    }
}

/// What an agent writes one turn's answer with.
pub struct TurnWriter<'a> {
    channels: &'a dyn SessionChannels,
    ids: &'a mut PartIds,
}

impl<'a> TurnWriter<'a> {
    pub fn new(channels: &'a dyn SessionChannels, ids: &'a mut PartIds) -> Self {
        TurnWriter { channels, ids }
    }

    /// A fresh id for a part of the message (`text-start`'s `id`, a tool call's id).
    pub fn new_id(&mut self, kind: &str) -> String {
        self.ids.next(kind)
    }

    /// Appends one chunk as its own `.out` record.
    pub async fn write(&mut self, chunk: impl Into<UiChunk>) -> anyhow::Result<()> {
        let part = self.ids.next("part");
        self.channels.append_output(&envelope(&chunk.into(), &part), &[]).await
    }
}

/// The headers of a `turn-complete` record.
pub fn turn_complete_headers(answered_in_seq: u64, token: Option<&str>) -> Vec<(String, String)> {
    let mut headers = vec![
        (CONTROL_HEADER.to_string(), TURN_COMPLETE.to_string()),
        (SESSION_IN_EVENT_ID_HEADER.to_string(), answered_in_seq.to_string()),
    ];
    if let Some(token) = token {
        headers.push((PUBLIC_ACCESS_TOKEN_HEADER.to_string(), token.to_string()));
    }
    headers
}

/// Ends a turn: the clients stop reading at this record and take its token;
/// the server resumes the next run after `answered_in_seq`.
pub async fn complete_turn(channels: &dyn SessionChannels, answered_in_seq: u64) -> anyhow::Result<()> {
    // A turn still ends without a fresh token: the client keeps its old one.
    let token = match channels.turn_token().await {
        Ok(token) => token,
        Err(err) => {
            tracing::warn!(%err, "could not mint the turn's public access token");
            None
        }
    };
    channels.append_output("", &turn_complete_headers(answered_in_seq, token.as_deref())).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn part_ids_are_unique_within_and_across_runs() {
        let (mut a, mut b) = (PartIds::default(), PartIds::default());
        let ids: std::collections::HashSet<String> = (0..100).flat_map(|_| [a.next("part"), b.next("part")]).collect();
        assert_eq!(ids.len(), 200);
    }

    #[test]
    fn turn_complete_carries_the_answered_seq_and_the_token() {
        let h = turn_complete_headers(7, Some("tok"));
        assert_eq!(
            h,
            vec![
                ("trigger-control".to_string(), "turn-complete".to_string()),
                ("session-in-event-id".to_string(), "7".to_string()),
                ("public-access-token".to_string(), "tok".to_string()),
            ]
        );
        assert_eq!(turn_complete_headers(0, None).len(), 2);
    }
}
