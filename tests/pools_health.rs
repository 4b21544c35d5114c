//! Upstream pools (SPEC §11), a target's health end to end: passive ejection with its growing
//! back-off and probe, every target down, the active health check, `Retry-After` cooldowns
//! (extended, never shortened; a year or garbage), and `/readyz` while targets are out. Real
//! mock backends on port 0 behind the real gateway binary.

mod common;

use common::pools::*;
use common::*;
use keygate::mock::MockBackend;
use std::time::{Duration, Instant};

/// Keep sending calls (each must succeed) until `m` has received more than `seen` chat calls:
/// when that call came back.
async fn next_probe(gw: &Gateway, m: &MockBackend, seen: usize) -> Instant {
    let deadline = Instant::now() + Duration::from_secs(15);
    let body = chat_body("gpt-4o-mini");
    loop {
        assert_eq!(post_chat(gw, &body).await.status(), 200);
        if chat_calls(m) > seen {
            return Instant::now();
        }
        assert!(Instant::now() < deadline, "no probe of {} came", m.addr());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Wait until `/readyz` lists exactly `want` as the pool's healthy targets.
async fn wait_healthy(gw: &Gateway, want: &[&str]) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let now = healthy(gw).await;
        if now == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "healthy: {now:?}, waited for {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn up_series(target: &str) -> String {
    format!("keygate_upstream_target_up{{target=\"{target}\",upstream=\"pool\"}}")
}

#[tokio::test(flavor = "multi_thread")]
async fn consecutive_failures_eject_a_target_with_a_growing_back_off_until_a_probe_answers() {
    let m = mocks(2).await;
    let dir = tempfile::tempdir().unwrap();
    let gw = gateway(
        dir.path(),
        &[target(&m[0], ""), target(&m[1], "")],
        "retry: {attempts: 2, on: [500], budget_percent: 100}",
    );
    let (a, b) = (m[0].addr().to_string(), m[1].addr().to_string());
    assert_eq!(healthy(&gw).await, [a.as_str(), b.as_str()]);
    m[0].faults().set_status(500);
    // Three failed attempts in a row on `a` (each retried on `b`, so every call succeeds)
    // eject it (`unhealthy_after` defaults to 3).
    let body = chat_body("gpt-4o-mini");
    while chat_calls(&m[0]) < 3 {
        assert_eq!(post_chat(&gw, &body).await.status(), 200);
    }
    let ejected = Instant::now();
    // Out of service while ejected: `/readyz` and the gauge say so.
    assert_eq!(healthy(&gw).await, [b.as_str()]);
    assert_eq!(series(&gw.metrics_text().await, &up_series(&a)), 0.0);
    // Calls keep coming; `a` sees only its probes: the first after 1 s. It fails: ejected
    // again, for twice as long; `a` is healed meanwhile, and the next probe brings it back.
    let first = next_probe(&gw, &m[0], 3).await;
    assert_eq!(chat_calls(&m[0]), 4, "one probe");
    assert_eq!(
        healthy(&gw).await,
        [b.as_str()],
        "a failed probe keeps it out"
    );
    m[0].faults().set_status(0);
    let second = next_probe(&gw, &m[0], 4).await;
    let (gap1, gap2) = (first - ejected, second - first);
    eprintln!("ejected, then probed after {gap1:?}; ejected again, probed after {gap2:?}");
    assert!(gap1 >= Duration::from_millis(900), "{gap1:?}");
    assert!(gap2 >= Duration::from_millis(1900), "{gap2:?}");
    assert!(gap2 > gap1, "the back-off grows: {gap1:?} then {gap2:?}");
    // The probe answered: back in service and in the split.
    assert_eq!(healthy(&gw).await, [a.as_str(), b.as_str()]);
    assert_eq!(series(&gw.metrics_text().await, &up_series(&a)), 1.0);
    let before = chat_calls(&m[0]);
    for _ in 0..10 {
        assert_eq!(post_chat(&gw, &body).await.status(), 200);
    }
    let share = chat_calls(&m[0]) - before;
    assert!((4..=6).contains(&share), "{share} of 10");
}

#[tokio::test(flavor = "multi_thread")]
async fn when_every_target_is_down_the_least_recently_failed_is_tried_and_the_client_gets_502() {
    let (x, y) = (dead_port(), dead_port());
    let dir = tempfile::tempdir().unwrap();
    let gw = gateway(
        dir.path(),
        &[
            format!("{{url: \"http://{x}\"}}"),
            format!("{{url: \"http://{y}\"}}"),
        ],
        "retry: {attempts: 2, on: [connect], budget_percent: 100}",
    );
    let before = gw.total_used(OK).await;
    // Three calls, each trying both targets: three failures in a row eject both.
    for _ in 0..3 {
        let (status, code, _) = denial(post_chat(&gw, &chat_body("gpt-4o-mini")).await).await;
        assert_eq!((status, code.as_str()), (502, "upstream_error"));
    }
    assert!(healthy(&gw).await.is_empty());
    let records = gw.wait_records(3).await;
    assert!(records.iter().all(|r| r["attempts"] == 2), "{records:?}");
    // The third call's last attempt failed last; the other target failed longest ago.
    let last = records[2]["target"].as_str().unwrap().to_string();
    let other = if last == x.to_string() { y } else { x }.to_string();
    // Every target down: one attempt, on the one that failed longest ago, then 502
    // `upstream_error` (in the client's shape).
    for _ in 0..3 {
        let (status, code, _) = denial(post_chat(&gw, &chat_body("gpt-4o-mini")).await).await;
        assert_eq!((status, code.as_str()), (502, "upstream_error"));
    }
    let r = client()
        .post(format!("{}/v1/messages", gw.base))
        .header("x-api-key", OK)
        .body(r#"{"model":"claude-3-5-sonnet-latest","max_tokens":5,"messages":[]}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["type"], "error", "{v}");
    let records = gw.wait_records(7).await;
    let tried: Vec<(&str, u64)> = records[3..7]
        .iter()
        .map(|r| {
            (
                r["target"].as_str().unwrap(),
                r["attempts"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        tried,
        [
            (other.as_str(), 1),
            (last.as_str(), 1),
            (other.as_str(), 1),
            (last.as_str(), 1)
        ]
    );
    assert!(records
        .iter()
        .all(|r| r["status"] == 502 && r["quota"] == 0));
    assert_eq!(gw.total_used(OK).await, before, "failed calls cost nothing");
    let text = gw.metrics_text().await;
    let connects: f64 = [x, y]
        .iter()
        .map(|t| {
            series(
                &text,
                &format!(
                    "keygate_upstream_attempts_total{{result=\"connect\",target=\"{t}\",upstream=\"pool\"}}"
                ),
            )
        })
        .sum();
    assert_eq!(connects, 3.0 * 2.0 + 4.0, "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_health_check_takes_a_failing_target_out_and_brings_it_back() {
    let m = mocks(2).await;
    let dir = tempfile::tempdir().unwrap();
    let gw = gateway(
        dir.path(),
        &[target(&m[0], ""), target(&m[1], "")],
        "health: {path: /v1/models, interval_seconds: 1, unhealthy_after: 2, healthy_after: 2}",
    );
    let (a, b) = (m[0].addr().to_string(), m[1].addr().to_string());
    // No call is sent while `a` fails: only the health check can see it.
    m[0].faults().set_status(503);
    wait_healthy(&gw, &[&b]).await;
    assert_eq!(series(&gw.metrics_text().await, &up_series(&a)), 0.0);
    let probes = m[0]
        .requests()
        .iter()
        .filter(|r| r.path_and_query == "/v1/models" && r.method == "GET")
        .count();
    assert!(probes >= 2, "{probes}");
    for _ in 0..10 {
        assert_eq!(
            post_chat(&gw, &chat_body("gpt-4o-mini")).await.status(),
            200
        );
    }
    assert_eq!((chat_calls(&m[0]), chat_calls(&m[1])), (0, 10));
    // Healed: two good probes bring it back, into the split.
    m[0].faults().set_status(0);
    wait_healthy(&gw, &[&a, &b]).await;
    assert_eq!(series(&gw.metrics_text().await, &up_series(&a)), 1.0);
    for _ in 0..10 {
        assert_eq!(
            post_chat(&gw, &chat_body("gpt-4o-mini")).await.status(),
            200
        );
    }
    assert!(
        (4..=6).contains(&chat_calls(&m[0])),
        "{}",
        chat_calls(&m[0])
    );
}

/// A pool of one whose target answers two overlapping calls with 429, `Retry-After: first`
/// and then `second` (the second call was sent before the first answer cooled the target
/// down). Returns the `Retry-After` keygate gives the next call, and the cooldowns counted.
async fn two_retry_afters(first: &str, second: &str) -> (u64, f64) {
    let m = mocks(1).await;
    let dir = tempfile::tempdir().unwrap();
    let gw = gateway(dir.path(), &[target(&m[0], "")], "");
    let f = m[0].faults();
    f.set_status(429);
    f.set_retry_after(Some(first));
    f.set_first_byte_delay(Duration::from_millis(1500));
    let body = chat_body("gpt-4o-mini");
    let (r1, r2) = tokio::join!(
        async {
            let r = post_chat(&gw, &body).await;
            f.set_retry_after(Some(second));
            r
        },
        async {
            tokio::time::sleep(Duration::from_millis(400)).await;
            post_chat(&gw, &body).await
        }
    );
    assert_eq!((r1.status().as_u16(), r2.status().as_u16()), (429, 429));
    assert_eq!(
        r1.headers()["retry-after"],
        first,
        "the target's own answer"
    );
    assert_eq!(
        r2.headers()["retry-after"],
        second,
        "the target's own answer"
    );
    assert_eq!(m[0].request_count(), 2);
    f.set_first_byte_delay(Duration::ZERO);
    let r = post_chat(&gw, &body).await;
    assert_eq!(m[0].request_count(), 2, "nothing sent while cooling down");
    let after: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let (status, code, _) = denial(r).await;
    assert_eq!((status, code.as_str()), (429, "upstream_rate_limited"));
    let cooled = format!(
        "keygate_upstream_cooldowns_total{{target=\"{}\",upstream=\"pool\"}}",
        m[0].addr()
    );
    (after, series(&gw.metrics_text().await, &cooled))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cooldown_is_extended_by_a_later_retry_after_and_never_shortened() {
    let (after, cooldowns) = two_retry_afters("5", "30").await;
    assert!((27..=30).contains(&after), "extended: {after}");
    assert_eq!(cooldowns, 2.0);
    let (after, cooldowns) = two_retry_afters("30", "5").await;
    assert!((27..=30).contains(&after), "not shortened: {after}");
    assert_eq!(cooldowns, 1.0, "the shorter one did not count");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_retry_after_of_a_year_is_capped_at_an_hour_and_garbage_is_ignored() {
    let year =
        httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(365 * 86_400));
    for (i, long) in ["31536000", year.as_str()].into_iter().enumerate() {
        let m = mocks(1).await;
        let dir = tempfile::tempdir().unwrap();
        let gw = gateway(dir.path(), &[target(&m[0], "")], "");
        m[0].faults().set_status(429);
        // Garbage, negative, a fraction, a date in the past: no cooldown, the next call is
        // sent as before.
        if i == 0 {
            for (n, garbage) in ["soon", "-5", "1.5", "Fri, 31 Dec 1999 23:59:59 GMT"]
                .into_iter()
                .enumerate()
            {
                m[0].faults().set_retry_after(Some(garbage));
                let r = post_chat(&gw, &chat_body("gpt-4o-mini")).await;
                assert_eq!(r.status(), 429);
                assert_eq!(m[0].request_count(), n + 1, "{garbage:?} cooled it down");
            }
        }
        let sent = m[0].request_count();
        m[0].faults().set_retry_after(Some(long));
        assert_eq!(
            post_chat(&gw, &chat_body("gpt-4o-mini")).await.status(),
            429
        );
        let r = post_chat(&gw, &chat_body("gpt-4o-mini")).await;
        assert_eq!(m[0].request_count(), sent + 1, "cooling down: {long}");
        let after: u64 = r.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((3590..=3600).contains(&after), "{long}: {after}");
        let (status, code, _) = denial(r).await;
        assert_eq!((status, code.as_str()), (429, "upstream_rate_limited"));
        let cooled = format!(
            "keygate_upstream_cooldowns_total{{target=\"{}\",upstream=\"pool\"}}",
            m[0].addr()
        );
        assert_eq!(series(&gw.metrics_text().await, &cooled), 1.0);
    }
}
