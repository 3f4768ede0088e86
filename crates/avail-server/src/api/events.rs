//! The event history and its live stream (server-sent events).

use super::*;

#[utoipa::path(get, path = "/v1/events", params(EventsQuery),
    responses((status = 200, body = [ClusterEvent], description = "a JSON list, or with `follow=true` a text/event-stream of `event` messages whose data is one ClusterEvent")),
    security(("bearer" = [])))]
pub(super) async fn events(
    _: Admin,
    State(state): State<AppStateRef>,
    Query(q): Query<EventsQuery>,
) -> ApiResult<Response> {
    let limit = q.limit.unwrap_or(1000);
    if !q.follow {
        return Ok(Json(state.events.history(q.since, None, limit, q.tail).await?).into_response());
    }
    // Subscribe before reading history so nothing falls between the two; drop repeats
    // by seq. Followers are bounded in number, queue and replay (crate::followers).
    let Some(follower) = state.events.followers.follow(state.events.subscribe()) else {
        return Err(ApiErr::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_followers",
            format!(
                "{} event followers are connected already; retry later",
                crate::followers::MAX_FOLLOWERS
            ),
        ));
    };
    // Replay what is kept after `since` up to the last event recorded before the
    // subscription, a page at a time, then follow live.
    enum Phase {
        Replay(std::vec::IntoIter<ClusterEvent>, bool),
        Live,
    }
    let upto = state.events.last_seq().await;
    let first = state
        .events
        .page(q.since, upto, crate::followers::REPLAY_PAGE)
        .await?;
    let more = first.last().is_some_and(|e| e.seq < upto);
    let s = stream::unfold(
        (
            state.clone(),
            follower,
            q.since,
            Phase::Replay(first.into_iter(), more),
        ),
        move |(state, follower, mut last, mut phase)| async move {
            loop {
                match &mut phase {
                    Phase::Replay(page, more) => {
                        if let Some(ev) = page.next() {
                            last = ev.seq;
                            return Some((to_sse(ev), (state, follower, last, phase)));
                        }
                        phase = if *more {
                            match state
                                .events
                                .page(last, upto, crate::followers::REPLAY_PAGE)
                                .await
                            {
                                Ok(p) => {
                                    let more = p.last().is_some_and(|e| e.seq < upto);
                                    Phase::Replay(p.into_iter(), more)
                                }
                                Err(e) => {
                                    let err = std::io::Error::other(format!("event history: {e}"));
                                    return Some((Err(err), (state, follower, last, Phase::Live)));
                                }
                            }
                        } else {
                            Phase::Live
                        };
                    }
                    Phase::Live => match follower.next().await {
                        FollowerNext::Event(ev) if ev.seq <= last => continue,
                        FollowerNext::Event(ev) => {
                            last = ev.seq;
                            return Some((to_sse(ev), (state, follower, last, phase)));
                        }
                        FollowerNext::Dropped => {
                            // The connection is closed; the client resumes with `since`.
                            let err = std::io::Error::other(
                                "event follower dropped: it fell behind; reconnect with since",
                            );
                            return Some((Err(err), (state, follower, last, phase)));
                        }
                        FollowerNext::Closed => return None,
                    },
                }
            }
        },
    );
    Ok(Sse::new(s)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response())
}

pub(super) fn to_sse(ev: ClusterEvent) -> Result<SseEvent, std::io::Error> {
    Ok(SseEvent::default()
        .event("event")
        .id(ev.seq.to_string())
        .data(serde_json::to_string(&ev).expect("event serialises")))
}
