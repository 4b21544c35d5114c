//! Smoke tests for the built-in mock backend (`keygate::mock`).

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use keygate::mock::MockBackend;
use serde_json::{json, Value};

fn url(mock: &MockBackend, path: &str) -> String {
    format!("http://{}{}", mock.addr(), path)
}

fn sse_data(text: &str) -> Vec<String> {
    text.split("\n\n")
        .filter_map(|ev| ev.lines().find_map(|l| l.strip_prefix("data: ")))
        .map(str::to_string)
        .collect()
}

#[tokio::test]
async fn non_stream_chat_usage() {
    let mock = MockBackend::start("127.0.0.1:0").await.unwrap();
    let body = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 7}).to_string();
    let resp = reqwest::Client::new()
        .post(url(&mock, "/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-mock-backend"], "1");
    let v: Value = resp.json().await.unwrap();
    let p = 1 + body.len() as u64 / 4;
    assert_eq!(v["model"], "gpt-4o-mini");
    assert_eq!(v["usage"]["prompt_tokens"], p);
    assert_eq!(v["usage"]["completion_tokens"], 7);
    assert_eq!(v["usage"]["total_tokens"], p + 7);
    assert_eq!(mock.request_count(), 1);
}

#[tokio::test]
async fn stream_chat_usage_chunk_only_when_requested() {
    let mock = MockBackend::start("127.0.0.1:0").await.unwrap();
    let client = reqwest::Client::new();
    for include in [true, false] {
        let body = json!({"model": "m", "messages": [], "stream": true, "stream_options": {"include_usage": include}}).to_string();
        let resp = client
            .post(url(&mock, "/v1/chat/completions"))
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.headers()["content-type"], "text/event-stream");
        let text = resp.text().await.unwrap();
        let data = sse_data(&text);
        assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
        let chunks: Vec<Value> = data[..data.len() - 1]
            .iter()
            .map(|d| serde_json::from_str(d).unwrap())
            .collect();
        assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
        let usage: Vec<&Value> = chunks.iter().filter(|c| !c["usage"].is_null()).collect();
        if include {
            // 5 content + finish + usage
            assert_eq!(chunks.len(), 7);
            assert_eq!(usage.len(), 1);
            assert_eq!(usage[0]["choices"], json!([]));
            assert_eq!(
                usage[0]["usage"]["prompt_tokens"],
                1 + body.len() as u64 / 4
            );
            assert_eq!(usage[0]["usage"]["completion_tokens"], 20);
        } else {
            assert_eq!(chunks.len(), 6);
            assert!(usage.is_empty());
        }
    }
}

#[tokio::test]
async fn mock_status_and_bad_json() {
    let mock = MockBackend::start("127.0.0.1:0").await.unwrap();
    let client = reqwest::Client::new();
    let resp = client
        .post(url(&mock, "/v1/chat/completions"))
        .header("x-mock-status", "503")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], "mock_error");

    let resp = client
        .post(url(&mock, "/v1/chat/completions"))
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], "invalid_json");
    assert_eq!(mock.request_count(), 2);
}

#[tokio::test]
async fn stream_is_really_streamed() {
    let mock = MockBackend::start("127.0.0.1:0").await.unwrap();
    let start = Instant::now();
    let resp = reqwest::Client::new()
        .post(url(&mock, "/v1/chat/completions"))
        .header("x-mock-delay-ms", "200")
        .header("x-mock-chunks", "3")
        .body(json!({"model": "m", "messages": [], "stream": true}).to_string())
        .send()
        .await
        .unwrap();
    let mut body = resp.bytes_stream();
    let mut first = None;
    let mut all = Vec::new();
    while let Some(chunk) = body.next().await {
        first.get_or_insert_with(|| start.elapsed());
        all.extend_from_slice(&chunk.unwrap());
    }
    let total = start.elapsed();
    let first = first.unwrap();
    // 3 content + finish + [DONE] = 5 events, 4 delays of 200 ms.
    assert!(
        first < Duration::from_millis(150),
        "first chunk after {first:?}"
    );
    assert!(total >= Duration::from_millis(800), "total {total:?}");
    let text = String::from_utf8(all).unwrap();
    assert_eq!(sse_data(&text).len(), 5);
    println!("time to first chunk {first:?}, total {total:?}");
}

#[tokio::test]
async fn records_large_body_exactly() {
    let mock = MockBackend::start("127.0.0.1:0").await.unwrap();
    let body: Vec<u8> = (0..1_048_576u32).map(|i| (i * 31 % 251) as u8).collect();
    let resp = reqwest::Client::new()
        .post(url(&mock, "/some/other/path?x=1"))
        .body(body.clone())
        .send()
        .await
        .unwrap();
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["object"], "mock.echo");
    assert_eq!(v["body_bytes"], 1_048_576);
    let reqs = mock.requests();
    assert_eq!(reqs.len(), 1);
    assert_eq!(reqs[0].method, "POST");
    assert_eq!(reqs[0].path_and_query, "/some/other/path?x=1");
    assert_eq!(reqs[0].body.as_ref(), body.as_slice());
}

#[tokio::test]
async fn other_routes() {
    let mock = MockBackend::start("127.0.0.1:0").await.unwrap();
    let client = reqwest::Client::new();

    let v: Value = client
        .get(url(&mock, "/v1/models"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["data"].as_array().unwrap().len(), 4);

    let v: Value = client
        .post(url(&mock, "/v1/embeddings"))
        .body(r#"{"input":"x"}"#)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["model"], "unknown");
    assert_eq!(v["usage"]["prompt_tokens"], 1 + 13 / 4);

    let body =
        json!({"model": "claude", "max_tokens": 5, "stream": true, "messages": []}).to_string();
    let text = client
        .post(url(&mock, "/v1/messages"))
        .body(body)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(text.starts_with("event: message_start\n"));
    assert!(text.contains(r#""usage":{"output_tokens":5}"#));
    assert!(text.ends_with("event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n"));

    let v: Value = client
        .post(url(
            &mock,
            "/v1beta/models/gemini-2.0-flash:generateContent",
        ))
        .header("x-mock-no-usage", "1")
        .body("{}")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["modelVersion"], "gemini-2.0-flash");
    assert!(v.get("usageMetadata").is_none());

    let text = client
        .post(url(&mock, "/v1beta/models/g:streamGenerateContent?alt=sse"))
        .body(r#"{"generationConfig":{"maxOutputTokens":3}}"#)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let data = sse_data(&text);
    assert_eq!(data.len(), 5);
    let last: Value = serde_json::from_str(data.last().unwrap()).unwrap();
    assert_eq!(last["usageMetadata"]["candidatesTokenCount"], 3);

    // Drop stops the listener.
    let addr = mock.addr();
    drop(mock);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}
