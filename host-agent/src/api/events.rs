//! `/v1/events`: every state change, numbered. `?since=SEQ` lists what
//! came after SEQ; `/v1/events/stream` sends the same and then new events
//! as server-sent events, so a client that reconnects with the last
//! sequence number it saw misses nothing.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::routing::get;
use axum::{Json, Router};
use futures_util::Stream;
use serde::Deserialize;
use tokio::sync::broadcast::error::RecvError;

use super::{AppState, ValidQuery};
use crate::error::ApiError;
use crate::model::Event;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/events", get(list))
        .route("/events/stream", get(stream))
}

#[derive(Deserialize, utoipa::IntoParams)]
pub struct EventsQuery {
    /// Only events after this sequence number.
    #[serde(default)]
    pub since: u64,
    /// At most this many (default and maximum 1000).
    #[serde(default)]
    pub limit: Option<u32>,
}

/// Events after `since`, oldest first (the newest 10,000 are kept).
#[utoipa::path(get, path = "/v1/events", tag = "events", operation_id = "events.list",
    params(EventsQuery), responses((status = 200, body = [Event])))]
pub async fn list(
    State(st): State<AppState>,
    ValidQuery(q): ValidQuery<EventsQuery>,
) -> Result<Json<Vec<Event>>, ApiError> {
    let limit = q.limit.unwrap_or(1000).clamp(1, 1000) as usize;
    Ok(Json(st.db.events_since(q.since, limit)?))
}

#[derive(Deserialize, utoipa::IntoParams)]
pub struct StreamQuery {
    /// Replay the events after this sequence number first.
    #[serde(default)]
    pub since: Option<u64>,
}

/// Server-sent events: each `data:` is one event's JSON and its `id:` the
/// sequence number. Without `since`, only new events.
#[utoipa::path(get, path = "/v1/events/stream", tag = "events", operation_id = "events.stream",
    params(StreamQuery),
    responses((status = 200, content_type = "text/event-stream", body = String)))]
pub async fn stream(
    State(st): State<AppState>,
    ValidQuery(q): ValidQuery<StreamQuery>,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, ApiError> {
    // Subscribe first, then read the log: an event committed in between is
    // in both and is sent once (by its sequence number).
    let rx = st.db.subscribe();
    let since = match q.since {
        Some(s) => s,
        None => st.db.last_seq()?,
    };
    let db = st.db.clone();
    let s = futures_util::stream::unfold(
        (rx, since, Vec::<Event>::new(), false),
        move |(mut rx, mut last, mut backlog, mut caught_up)| {
            let db = db.clone();
            async move {
                loop {
                    if let Some(e) = backlog.pop() {
                        last = e.seq;
                        return Some((Ok(to_sse(&e)), (rx, last, backlog, caught_up)));
                    }
                    if !caught_up {
                        // Replay from the log in pages.
                        let page = db.events_since(last, 500).unwrap_or_default();
                        if page.is_empty() {
                            caught_up = true;
                        } else {
                            backlog = page.into_iter().rev().collect();
                        }
                        continue;
                    }
                    match rx.recv().await {
                        Ok(e) if e.seq > last => backlog.push(e),
                        Ok(_) => {}
                        // Fell behind the live channel: replay from the log.
                        Err(RecvError::Lagged(_)) => caught_up = false,
                        Err(RecvError::Closed) => return None,
                    }
                }
            }
        },
    );
    Ok(Sse::new(s).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

fn to_sse(e: &Event) -> SseEvent {
    SseEvent::default()
        .id(e.seq.to_string())
        .event("event")
        .data(serde_json::to_string(e).unwrap_or_default())
}
