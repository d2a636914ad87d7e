//! What a usage row says about its request: how its cost is known, when the client could
//! first read the answer, and how each attempt ended.

use std::path::Path;
use std::time::Duration;

use orproxy_testkit::FakeOpenRouter;
use serde_json::Value;

use crate::budgets::settled;
use crate::harness::{chat, client, daemon_for, events};
use crate::ledger::{
    billed_nanos, default_db, flushed_rows, post, request_finished, request_id, row_of,
};
use crate::streaming::wait_until;

/// A price for `fake/no-usage` only (USD 1 / 2 per million tokens) and a budget counting it.
const PRICED: &str = "pricing:\n  - { match: \"^openrouter:fake/no-usage$\", input_usd_per_mtok: 1, output_usd_per_mtok: 2 }\nbudgets:\n  - { name: answers, scope: model, match: \"^fake/no-usage$\", limit_usd: 100, period: total }\n";

/// The daemon's estimate of a [`chat`] body's prompt: four bytes of `messages` per token.
fn prompt_estimate(body: &Value) -> i64 {
    (serde_json::to_string(&body["messages"]).unwrap().len() / 4) as i64
}

/// The daemon's estimate of a whole answer's completion: four bytes of its message per token.
fn answer_estimate(answer: &Value) -> i64 {
    (serde_json::to_string(&answer["choices"][0]["message"])
        .unwrap()
        .len()
        / 4) as i64
}

/// The daemon's estimate of a stream's completion: one token per chunk relayed from the first
/// content on (the finish chunk included: it does not parse those it only relays).
fn relayed_chunks(got: &[(std::time::Instant, String)]) -> i64 {
    got.iter()
        .filter_map(|(_, e)| serde_json::from_str::<Value>(e.strip_prefix("data: ")?).ok())
        .skip_while(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .is_none_or(str::is_empty)
        })
        .count() as i64
}

/// `ttfb_us`, `upstream_us` and `latency_us` of request `id`.
fn timings(db: &Path, id: &str) -> (Option<i64>, Option<i64>, i64) {
    let conn = orproxy_ledger::open_reader(db).unwrap();
    conn.query_row(
        "SELECT ttfb_us, upstream_us, latency_us FROM requests WHERE request_id = ?1",
        [id],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
    )
    .unwrap()
}

/// A complete answer whose upstream reported no usage (no usage chunk although orproxy asked
/// for it; no `usage` in the JSON) is estimated like a cut stream: the prompt estimate plus
/// what was relayed, priced, and counted in budgets. Without a price the tokens are still kept.
#[tokio::test]
async fn a_complete_answer_without_usage_is_estimated_and_counted_in_budgets() {
    let fake = FakeOpenRouter::start().await.unwrap();
    let daemon = daemon_for(&fake.base_url(), PRICED);
    let text = "one two three four five";

    let body = chat("fake/no-usage", text, true);
    let prompt = prompt_estimate(&body);
    let streamed = post(&daemon, &body).await;
    assert_eq!(streamed.status(), 200);
    let stream_id = request_id(&streamed);
    let (got, error) = events(streamed).await;
    assert_eq!(error, None);
    assert_eq!(got.last().unwrap().1, "data: [DONE]\n\n", "{got:?}");
    let relayed = relayed_chunks(&got);
    assert!(relayed > 0, "{got:?}");

    let plain = post(&daemon, &chat("fake/no-usage", text, false)).await;
    assert_eq!(plain.status(), 200);
    let plain_id = request_id(&plain);
    let answer: Value = plain.json().await.unwrap();
    assert!(answer.get("usage").is_none(), "{answer}");
    let completion = answer_estimate(&answer);

    let unpriced = post(&daemon, &chat("fake/no-usage:free", text, false)).await;
    assert_eq!(unpriced.status(), 200);
    let unpriced_id = request_id(&unpriced);
    let unpriced_answer: Value = unpriced.json().await.unwrap();

    let stored = flushed_rows(&daemon, &default_db(&daemon)).await;
    let mut spent = 0;
    for (id, completion) in [(&stream_id, relayed), (&plain_id, completion)] {
        let row = row_of(&stored, id);
        assert_eq!(row.outcome, "ok", "{row:?}");
        assert_eq!(
            (row.prompt_tokens, row.completion_tokens),
            (Some(prompt), Some(completion)),
            "{row:?}"
        );
        assert_eq!(row.cost_source, "estimate", "{row:?}");
        assert_eq!(
            row.cost_nanos,
            prompt * 1_000 + completion * 2_000,
            "{row:?}"
        );
        spent += row.cost_nanos;
    }
    let row = row_of(&stored, &unpriced_id);
    assert_eq!((row.cost_nanos, row.cost_source.as_str()), (0, "none"));
    assert_eq!(
        (row.prompt_tokens, row.completion_tokens),
        (Some(prompt), Some(answer_estimate(&unpriced_answer))),
        "{row:?}"
    );
    let budget = settled(&daemon, "answers").await;
    assert_eq!(budget["spent_nanos"].as_i64(), Some(spent), "{budget:#}");
    assert!(fake.billing().is_empty(), "{:?}", fake.billing());
}

/// A single attempt failed by an in-band error chunk that reports a cost is billed that cost,
/// as the upstream's: no row has a cost without knowing where it comes from.
#[tokio::test]
async fn a_cost_reported_by_a_failed_attempt_is_the_upstreams() {
    let fake = FakeOpenRouter::start().await.unwrap();
    let daemon = daemon_for(&fake.base_url(), "");
    let response = post(&daemon, &chat("fake/billed-error-after-0", "x", true)).await;
    assert_eq!(response.status(), 502);
    let id = request_id(&response);
    response.bytes().await.unwrap();

    let stored = flushed_rows(&daemon, &default_db(&daemon)).await;
    let row = row_of(&stored, &id);
    let billing = fake.billing();
    assert_eq!(billing.len(), 1, "{billing:?}");
    let billed = billed_nanos(&billing[0]);
    assert!(billed > 0, "{billing:?}");
    assert_eq!(
        (row.status, row.cost_nanos, row.cost_source.as_str()),
        (502, billed, "upstream"),
        "{row:?}"
    );
}

/// A whole answer that is only an error (`finish_reason: "error"` before any content) fails
/// over like the same failure in a stream, and the cost the upstream reported for it is billed;
/// an unreadable 200 is named as the client is told, `upstream_unreachable`.
#[tokio::test]
async fn an_error_answer_without_content_fails_over_and_is_billed() {
    let fake = FakeOpenRouter::start().await.unwrap();
    let daemon = daemon_for(&fake.base_url(), "");
    let chain = "fake/billed-error-after-0|fake/echo";
    let response = post(&daemon, &chat(chain, "x", false)).await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["x-orproxy-route"],
        "openrouter:fake/echo"
    );
    let id = request_id(&response);
    response.bytes().await.unwrap();
    let malformed = post(&daemon, &chat("fake/malformed", "x", false)).await;
    assert_eq!(malformed.status(), 502);
    let malformed_id = request_id(&malformed);
    malformed.bytes().await.unwrap();

    let stored = flushed_rows(&daemon, &default_db(&daemon)).await;
    let row = row_of(&stored, &id);
    assert_eq!(row.outcome, "ok", "{row:?}");
    assert_eq!(row.attempts[0]["result"], "502 Server", "{row:?}");
    let billed: i64 = fake.billing().iter().map(billed_nanos).sum();
    assert_eq!(
        (row.cost_nanos, row.cost_source.as_str()),
        (billed, "upstream"),
        "{row:?}"
    );
    let row = row_of(&stored, &malformed_id);
    assert_eq!(row.attempts[0]["result"], "upstream_unreachable", "{row:?}");
}

/// `ttfb_us` is when the client could first read the answer: the head of a whole response
/// (errors passed through included), or a stream's first event that is not a keep-alive (its
/// error event when it failed after orproxy committed it); NULL when only keep-alives went out.
#[tokio::test]
async fn ttfb_is_when_the_client_could_first_read_the_answer() {
    let fake = FakeOpenRouter::start().await.unwrap();
    let daemon = daemon_for(
        &fake.base_url(),
        "limits:\n  commit_after: 100ms\n  first_byte_timeout: 400ms\n",
    );
    let ok = post(&daemon, &chat("fake/echo", "x", false)).await;
    let ok_id = request_id(&ok);
    ok.bytes().await.unwrap();
    let limited = post(&daemon, &chat("fake/status-429-retry-1", "x", false)).await;
    assert_eq!(limited.status(), 429);
    let limited_id = request_id(&limited);
    limited.bytes().await.unwrap();

    // Committed at 100 ms with keep-alives, then the first-byte timeout ends it.
    let failed = post(&daemon, &chat("fake/first-byte-2000", "x", true)).await;
    assert_eq!(failed.status(), 200);
    let failed_id = request_id(&failed);
    let (got, _) = events(failed).await;
    assert!(got.first().unwrap().1.starts_with(':'), "{got:?}");
    assert!(
        got.last().unwrap().1.contains("first_byte_timeout"),
        "{got:?}"
    );

    // Left after the first keep-alive: nothing of the answer reached it.
    let mut left = post(&daemon, &chat("fake/first-byte-2000", "x", true)).await;
    let left_id = request_id(&left);
    left.chunk().await.unwrap();
    drop(left);
    request_finished(&daemon, &left_id).await;

    let db = default_db(&daemon);
    flushed_rows(&daemon, &db).await;
    for id in [&ok_id, &limited_id] {
        let (ttfb, _, latency) = timings(&db, id);
        assert!(ttfb.is_some_and(|t| t <= latency), "{id}: {ttfb:?}");
    }
    let (ttfb, _, latency) = timings(&db, &failed_id);
    assert!(
        ttfb.is_some_and(|t| (400_000..=latency).contains(&t)),
        "the error event, not the commit: {ttfb:?}"
    );
    assert_eq!(timings(&db, &left_id).0, None);
}

/// Attempts and timings are named as the README names them: a stream broken before content
/// failed over as `stream`; a plain answer cut short by the upstream is a `midstream_error`
/// attempt; a plain request whose client left counts the time spent waiting on the upstream.
#[tokio::test]
async fn attempts_and_upstream_time_are_recorded_as_documented() {
    let fake = FakeOpenRouter::start().await.unwrap();
    let daemon = daemon_for(&fake.base_url(), "");
    let chain = "openrouter:fake/cut-after-0|openrouter:fake/echo";
    let failover = post(&daemon, &chat(chain, "x", true)).await;
    assert_eq!(failover.status(), 200);
    let failover_id = request_id(&failover);
    events(failover).await;
    let partial = post(&daemon, &chat("fake/midstream-error-after-2", "x", false)).await;
    assert_eq!(partial.status(), 200);
    let partial_id = request_id(&partial);
    partial.bytes().await.unwrap();

    let hang = client()
        .post(daemon.url("/v1/chat/completions"))
        .json(&chat("fake/hang", "x", false))
        .timeout(Duration::from_secs(1))
        .send()
        .await;
    assert!(hang.is_err(), "a hanging upstream cannot answer");
    // Polled, not waited on: the client's connection and the fake run on this test's runtime.
    wait_until(|| fake.requests().iter().any(|r| r.disconnected)).await;
    let log = daemon
        .wait_log(|v| v["message"] == "Request finished." && v["outcome"] == "client_disconnected");
    let hang_id = log["request_id"].as_str().unwrap().to_owned();

    let db = default_db(&daemon);
    let stored = flushed_rows(&daemon, &db).await;
    let row = row_of(&stored, &failover_id);
    assert_eq!(row.attempts[0]["result"], "stream", "{row:?}");
    assert_eq!(row.attempts[1]["result"], "ok", "{row:?}");
    let row = row_of(&stored, &partial_id);
    assert_eq!(row.outcome, "midstream_error", "{row:?}");
    let result = row.attempts[0]["result"].as_str().unwrap_or_default();
    assert!(result.starts_with("midstream_error: "), "{row:?}");
    let (_, upstream, _) = timings(&db, &hang_id);
    assert!(
        upstream.is_some_and(|u| u >= 900_000),
        "waited about 1 s on the upstream: {upstream:?}"
    );
}
