//! End-to-end behaviour of the `keygate` binary: a real mock upstream, a real gateway on port 0,
//! HTTP over loopback.

mod common;

use common::*;
use futures_util::StreamExt;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

// ---------------------------------------------------------------- admitted calls

#[tokio::test(flavor = "multi_thread")]
async fn admitted_call_reaches_upstream_with_upstream_credential_only() {
    let env = Env::start().await;
    let resp = chat(&env, OK, "gpt-4o-mini").await;
    assert_eq!(resp.status(), 200);
    let rid = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["object"], "chat.completion");

    let reqs = env.mock.requests();
    assert_eq!(reqs.len(), 1);
    let r = &reqs[0];
    assert_eq!(r.path_and_query, "/v1/chat/completions");
    assert_eq!(
        r.headers["authorization"],
        format!("Bearer {UPSTREAM_SECRET}")
    );
    assert_eq!(r.headers["x-request-id"], rid.as_str());
    assert_eq!(r.headers["host"], env.mock.addr().to_string().as_str());
    let all: String = format!("{:?}{:?}", r.headers, r.path_and_query);
    assert!(!all.contains(OK), "client key leaked upstream: {all}");
    assert_eq!(r.body, chat_body("gpt-4o-mini").as_bytes());
}

#[tokio::test(flavor = "multi_thread")]
async fn hashed_key_entry_is_admitted() {
    let env = Env::start().await;
    assert_eq!(chat(&env, HASHED, "gpt-4o").await.status(), 200);
    // The same key without its sk- prefix is the same key.
    assert_eq!(chat(&env, &HASHED[3..], "gpt-4o").await.status(), 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn each_credential_style_is_replaced_by_the_upstream_credential_in_the_same_style() {
    let env = Env::start().await;
    let c = client();
    let body = chat_body("claude-3-5-sonnet-latest");
    // x-api-key (Anthropic)
    let r = c
        .post(env.url("/v1/messages"))
        .header("x-api-key", OK)
        .header("content-type", "application/json")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // x-goog-api-key (Gemini)
    let r = c
        .post(env.url("/v1beta/models/gemini-1.5-pro:generateContent"))
        .header("x-goog-api-key", OK)
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // ?key= (Gemini)
    let r = c
        .post(env.url(&format!(
            "/v1beta/models/gemini-1.5-pro:generateContent?alt=sse&key={OK}"
        )))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // Sec-WebSocket-Protocol (OpenAI realtime); the rest of the header survives.
    let r = c
        .get(env.url("/v1/realtime?model=gpt-4o-realtime"))
        .header(
            "sec-websocket-protocol",
            format!("realtime, openai-insecure-api-key.{OK}"),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    let reqs = env.mock.requests();
    assert_eq!(reqs.len(), 4);
    assert_eq!(reqs[0].headers["x-api-key"], UPSTREAM_SECRET);
    assert!(reqs[0].headers.get("authorization").is_none());
    assert_eq!(reqs[1].headers["x-goog-api-key"], UPSTREAM_SECRET);
    assert_eq!(reqs[2].headers["x-goog-api-key"], UPSTREAM_SECRET);
    assert_eq!(
        reqs[2].path_and_query,
        "/v1beta/models/gemini-1.5-pro:generateContent?alt=sse"
    );
    assert_eq!(reqs[3].headers["sec-websocket-protocol"], "realtime");
    assert_eq!(
        reqs[3].headers["authorization"],
        format!("Bearer {UPSTREAM_SECRET}")
    );
    for r in &reqs {
        let all = format!("{:?}{}", r.headers, r.path_and_query);
        assert!(!all.contains(OK), "client key leaked upstream: {all}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn one_megabyte_body_is_forwarded_byte_exact() {
    let env = Env::start().await;
    let filler = "x".repeat(1024 * 1024);
    let body = json!({"messages": [{"role": "user", "content": filler}], "model": "gpt-4o-mini"})
        .to_string();
    let r = client()
        .post(env.url("/v1/chat/completions"))
        .bearer_auth(OK)
        .header("content-type", "application/json")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let reqs = env.mock.requests();
    assert_eq!(reqs[0].body.len(), body.len());
    assert!(reqs[0].body == body.as_bytes());
}

#[tokio::test(flavor = "multi_thread")]
async fn chunked_bodies_are_forwarded_and_large_ones_need_a_length() {
    let env = Env::start().await;
    let small = chat_body("gpt-4o-mini");
    let chunked = |body: String| {
        let s = futures_util::stream::iter(
            body.into_bytes()
                .chunks(1000)
                .map(|c| Ok::<_, std::io::Error>(c.to_vec()))
                .collect::<Vec<_>>(),
        );
        reqwest::Body::wrap_stream(s)
    };
    let r = client()
        .post(env.url("/v1/chat/completions"))
        .bearer_auth(OK)
        .header("content-type", "application/json")
        .body(chunked(small.clone()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let reqs = env.mock.requests();
    assert_eq!(reqs[0].body, small.as_bytes());
    assert_eq!(
        reqs[0].headers["content-length"],
        small.len().to_string().as_str()
    );

    let big = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "y".repeat(200_000)}]}).to_string();
    let r = client()
        .post(env.url("/v1/chat/completions"))
        .bearer_auth(OK)
        .header("content-type", "application/json")
        .body(chunked(big))
        .send()
        .await
        .unwrap();
    assert_eq!(denial(r).await.1, "length_required");
    assert_eq!(env.mock.request_count(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn multipart_model_field_is_found() {
    let env = Env::start().await;
    let form = reqwest::multipart::Form::new()
        .part(
            "file",
            reqwest::multipart::Part::bytes(vec![0u8; 5000]).file_name("a.wav"),
        )
        .text("model", "whisper-1");
    let r = client()
        .post(env.url("/v1/audio/transcriptions"))
        .bearer_auth(OK)
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let form = reqwest::multipart::Form::new().text("model", "whisper-1");
    let r = client()
        .post(env.url("/v1/audio/transcriptions"))
        .bearer_auth(MINI_ONLY)
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(denial(r).await.1, "model_not_allowed");
}

#[tokio::test(flavor = "multi_thread")]
async fn sse_is_streamed_as_it_arrives() {
    let env = Env::start().await;
    let started = Instant::now();
    let r = slow_stream(&env.gw.base, 300, 5).await;
    assert_eq!(r.status(), 200);
    let mut stream = r.bytes_stream();
    let first = stream.next().await.unwrap().unwrap();
    let first_at = started.elapsed();
    assert!(String::from_utf8_lossy(&first).starts_with("data: "));
    let mut rest = Vec::new();
    while let Some(c) = stream.next().await {
        rest.extend_from_slice(&c.unwrap());
    }
    let total = started.elapsed();
    assert!(String::from_utf8_lossy(&rest).contains("[DONE]"));
    // The mock sleeps 300 ms between events: a buffered response would deliver the first
    // event only at the end (≥ 1.5 s).
    assert!(
        total - first_at >= Duration::from_millis(1000),
        "first event at {first_at:?}, end at {total:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn request_id_is_kept_when_sane_and_generated_otherwise() {
    let env = Env::start().await;
    let c = client();
    let send = |rid: &'static str| {
        c.post(env.url("/v1/chat/completions"))
            .bearer_auth(OK)
            .header("x-request-id", rid)
            .body(chat_body("gpt-4o-mini"))
            .send()
    };
    let r = send("client-id-123").await.unwrap();
    assert_eq!(r.headers()["x-request-id"], "client-id-123");
    let r = send("bad id with spaces").await.unwrap();
    let generated = r.headers()["x-request-id"].to_str().unwrap().to_string();
    assert!(generated.starts_with("kg-"), "{generated}");
    let reqs = env.mock.requests();
    assert_eq!(reqs[0].headers["x-request-id"], "client-id-123");
    assert_eq!(reqs[1].headers["x-request-id"], generated.as_str());
    // Denials carry one too.
    let r = chat(&env, "sk-unknown", "gpt-4o-mini").await;
    assert!(r.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .starts_with("kg-"));
}

#[tokio::test(flavor = "multi_thread")]
async fn models_endpoint_lists_what_the_key_may_use() {
    let env = Env::start().await;
    let list = |key: &'static str| {
        let url = env.url("/v1/models");
        async move {
            let v: Value = client()
                .get(url)
                .bearer_auth(key)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            let mut ids: Vec<String> = v["data"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| m["id"].as_str().unwrap().to_string())
                .collect();
            ids.sort();
            (v["object"].clone(), ids)
        }
    };
    let (object, ids) = list(MINI_ONLY).await;
    assert_eq!(object, "list");
    assert_eq!(ids, vec!["gpt-4o-mini"]);
    let (_, ids) = list(LIMITED_GROUP).await;
    assert_eq!(ids, vec!["gpt-4o", "gpt-4o-mini"]);
    let (_, ids) = list(OK).await;
    assert_eq!(
        ids,
        vec![
            "claude-3-5-sonnet-latest",
            "gpt-4o",
            "gpt-4o-mini",
            "text-embedding-3-small"
        ]
    );
    assert_eq!(
        env.mock.request_count(),
        0,
        "/v1/models is answered locally"
    );
    let r = client().get(env.url("/v1/models")).send().await.unwrap();
    assert_eq!(denial(r).await.1, "missing_api_key");
}

// ---------------------------------------------------------------- refusals

#[tokio::test(flavor = "multi_thread")]
async fn every_refusal_has_its_status_and_code() {
    let env = Env::start().await;
    let c = client();
    let cases: Vec<(reqwest::RequestBuilder, u16, &str)> = vec![
        (
            c.post(env.url("/v1/chat/completions"))
                .body(chat_body("gpt-4o-mini")),
            401,
            "missing_api_key",
        ),
        (
            c.post(env.url("/v1/chat/completions"))
                .bearer_auth("sk-nope")
                .body(chat_body("gpt-4o-mini")),
            401,
            "invalid_api_key",
        ),
        (
            c.post(env.url("/v1/chat/completions"))
                .bearer_auth(DISABLED)
                .body(chat_body("gpt-4o-mini")),
            401,
            "key_disabled",
        ),
        (
            c.post(env.url("/v1/chat/completions"))
                .bearer_auth(EXPIRED)
                .body(chat_body("gpt-4o-mini")),
            401,
            "key_expired",
        ),
        (
            c.post(env.url("/v1/chat/completions"))
                .bearer_auth(IP_LOCKED)
                .body(chat_body("gpt-4o-mini")),
            403,
            "ip_not_allowed",
        ),
        (
            c.post(env.url("/v1/chat/completions"))
                .bearer_auth(OK)
                .header("content-type", "application/json")
                .body(r#"{"messages":[]}"#),
            400,
            "model_required",
        ),
        (
            c.post(env.url("/v1/chat/completions"))
                .bearer_auth(MINI_ONLY)
                .body(chat_body("gpt-4o")),
            403,
            "model_not_allowed",
        ),
        (
            c.post(env.url("/v1/chat/completions"))
                .bearer_auth(LIMITED_GROUP)
                .body(chat_body("claude-3-5-sonnet-latest")),
            403,
            "model_not_allowed",
        ),
        (
            c.post(env.url("/v1/chat/completions"))
                .bearer_auth(OK)
                .body(chat_body("llama-3-70b")),
            404,
            "model_not_found",
        ),
        (
            c.post(env.url("/v1/chat/completions"))
                .bearer_auth(OK)
                .header("content-type", "application/json")
                .body(r#"{"model": "gpt-4o-mini", "#),
            400,
            "invalid_json",
        ),
        (
            c.post(env.url("/v1/chat/completions"))
                .bearer_auth(OK)
                .body(vec![b'{'; 3 * 1024 * 1024]),
            413,
            "request_too_large",
        ),
    ];
    for (i, (req, status, code)) in cases.into_iter().enumerate() {
        let (s, got, rid) = denial(req.send().await.unwrap()).await;
        assert_eq!((s, got.as_str()), (status, code), "case {i}");
        assert!(rid.is_some(), "case {i}: no x-request-id");
    }
    assert_eq!(
        env.mock.request_count(),
        0,
        "no refused call reached the upstream"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn checks_run_in_the_specs_order() {
    let env = Env::start().await;
    // Disabled wins over a bad model and bad JSON; IP wins over the model.
    let r = client()
        .post(env.url("/v1/chat/completions"))
        .bearer_auth(DISABLED)
        .body("not json")
        .send()
        .await
        .unwrap();
    assert_eq!(denial(r).await.1, "key_disabled");
    let r = chat(&env, IP_LOCKED, "llama").await;
    assert_eq!(denial(r).await.1, "ip_not_allowed");
    // Model not allowed (key) is decided before model not found (routing).
    let r = chat(&env, MINI_ONLY, "llama").await;
    assert_eq!(denial(r).await.1, "model_not_allowed");
}

#[tokio::test(flavor = "multi_thread")]
async fn anthropic_and_gemini_paths_answer_in_their_own_shapes() {
    let env = Env::start().await;
    let r = client()
        .post(env.url("/v1/messages"))
        .header("x-api-key", "sk-unknown")
        .body(chat_body("claude-3-5-sonnet-latest"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["type"], "error");
    assert_eq!(v["error"]["type"], "authentication_error");
    let r = client()
        .post(env.url("/v1/messages"))
        .header("x-api-key", MINI_ONLY)
        .body(chat_body("claude-3-5-sonnet-latest"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["type"], "permission_error");

    let r = client()
        .post(env.url("/v1beta/models/gemini-pro:generateContent?key=sk-unknown"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], 401);
    assert_eq!(v["error"]["status"], "UNAUTHENTICATED");
}

#[tokio::test(flavor = "multi_thread")]
async fn oversized_body_is_refused_from_content_length_before_it_is_sent() {
    let env = Env::start().await;
    // Only the head is sent: the answer must come from Content-Length alone.
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {OK}\r\nContent-Type: application/json\r\nContent-Length: 50000000\r\n\r\n"
    );
    let out = raw_exchange(env.gw.addr, head.as_bytes(), false, Duration::from_secs(5));
    assert!(out.starts_with("HTTP/1.1 413"), "{out}");
    assert!(out.contains("request_too_large"), "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_denial_keeps_the_connection_alive() {
    let env = Env::start().await;
    let body = chat_body("gpt-4o-mini");
    let denied = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk-unknown\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let admitted = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {OK}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(env.gw.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(denied.as_bytes()).unwrap();
    // Read the first answer fully before sending the second request.
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains("invalid_api_key") {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "connection closed after a denial");
        got.extend_from_slice(&buf[..n]);
    }
    s.write_all(admitted.as_bytes()).unwrap();
    let mut rest = String::new();
    let _ = s.read_to_string(&mut rest);
    assert!(rest.starts_with("HTTP/1.1 200"), "{rest}");
    assert_eq!(env.mock.request_count(), 1);
}

// ---------------------------------------------------------------- client IP

#[tokio::test(flavor = "multi_thread")]
async fn forwarded_for_is_believed_only_from_trusted_proxies() {
    let send = |env: &Env, xff: &'static str| {
        client()
            .post(env.url("/v1/chat/completions"))
            .bearer_auth(IP_LOCKED)
            .header("x-forwarded-for", xff)
            .body(chat_body("gpt-4o-mini"))
            .send()
    };
    let untrusting = Env::start().await;
    let r = send(&untrusting, "203.0.113.7").await.unwrap();
    assert_eq!(denial(r).await.1, "ip_not_allowed");

    let trusting = Env::with(Opts {
        extra: "trusted_proxies: [\"127.0.0.0/8\", \"10.0.0.0/8\"]".into(),
        ..Opts::default()
    })
    .await;
    assert_eq!(send(&trusting, "203.0.113.7").await.unwrap().status(), 200);
    // Right-most untrusted entry: the spoofed left-most value is ignored.
    assert_eq!(
        send(&trusting, "203.0.113.7, 198.51.100.1")
            .await
            .unwrap()
            .status(),
        403
    );
    assert_eq!(
        send(&trusting, "198.51.100.1, 203.0.113.7, 10.1.2.3")
            .await
            .unwrap()
            .status(),
        200
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn ipv4_mapped_peer_matches_ipv4_cidr() {
    // A dual-stack listener sees 127.0.0.1 as ::ffff:127.0.0.1.
    if std::net::TcpListener::bind("[::]:0").is_err() {
        eprintln!("no IPv6 on this machine; skipped");
        return;
    }
    let env = Env::with(Opts {
        listen: "[::]:0".into(),
        ..Opts::default()
    })
    .await;
    let url = format!(
        "http://127.0.0.1:{}/v1/chat/completions",
        env.gw.addr.port()
    );
    let r = client()
        .post(&url)
        .bearer_auth(LOCALHOST_ONLY)
        .body(chat_body("gpt-4o-mini"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = client()
        .post(&url)
        .bearer_auth(IP_LOCKED)
        .body(chat_body("gpt-4o-mini"))
        .send()
        .await
        .unwrap();
    assert_eq!(denial(r).await.1, "ip_not_allowed");
}

// ---------------------------------------------------------------- upstream failures, TLS

#[tokio::test(flavor = "multi_thread")]
async fn unreachable_upstream_gets_502_in_the_clients_shape() {
    // Nothing listens on port 1 (a privileged port no test binds), so connecting is refused.
    let dead_addr = "127.0.0.1:1";
    let env = Env::with(Opts {
        upstream_url: Some(format!("http://{dead_addr}")),
        ..Opts::default()
    })
    .await;
    let r = chat(&env, OK, "gpt-4o-mini").await;
    let (status, code, rid) = denial(r).await;
    assert_eq!((status, code.as_str()), (502, "upstream_error"));
    assert!(rid.is_some());
}

fn self_signed(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let cert =
        rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    let (c, k) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&c, cert.cert.pem()).unwrap();
    std::fs::write(&k, cert.signing_key.serialize_pem()).unwrap();
    (c, k)
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_listener_and_https_upstream() {
    // Gateway B: TLS listener in front of the mock.
    let mock = keygate::mock::MockBackend::start("127.0.0.1:0")
        .await
        .unwrap();
    let dir_b = tempfile::tempdir().unwrap();
    self_signed(dir_b.path());
    let opts_b = Opts {
        extra: "tls: { cert: cert.pem, key: key.pem }".into(),
        ..Opts::default()
    };
    let gw_b = start_gateway(dir_b.path(), &opts_b, &format!("http://{}", mock.addr()));
    assert!(gw_b.base.starts_with("https://"));
    let tls_client = reqwest::Client::builder()
        .danger_accept_invalid_certs(true)
        .build()
        .unwrap();
    let r = tls_client
        .post(format!("{}/v1/chat/completions", gw_b.base))
        .bearer_auth(OK)
        .body(chat_body("gpt-4o-mini"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // Gateway A: plain listener, https upstream = gateway B. A's upstream credential is a key B
    // accepts, so the chain proves the credential swap too.
    let dir_a = tempfile::tempdir().unwrap();
    let opts_a = Opts {
        upstream_extra: "    tls_verify: false\n".into(),
        ..Opts::default()
    };
    std::fs::write(
        dir_a.path().join("keys.json"),
        serde_json::to_vec(&opts_a.sync).unwrap(),
    )
    .unwrap();
    let config =
        common::config_yaml(&opts_a, &gw_b.base).replace("KG_TEST_UPSTREAM_KEY", "KG_CHAIN_KEY");
    std::fs::write(dir_a.path().join("keygate.yaml"), config).unwrap();
    std::env::set_var("KG_CHAIN_KEY", HASHED);
    let gw_a = spawn_keygate(dir_a.path(), &dir_a.path().join("keygate.yaml"));
    let r = client()
        .post(format!("{}/v1/chat/completions", gw_a.base))
        .bearer_auth(OK)
        .body(chat_body("gpt-4o-mini"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let last = mock.requests().pop().unwrap();
    assert_eq!(
        last.headers["authorization"],
        format!("Bearer {UPSTREAM_SECRET}")
    );
}

// ---------------------------------------------------------------- bad input

#[tokio::test(flavor = "multi_thread")]
async fn bad_request_heads_get_precise_answers() {
    let env = Env::start().await;
    let body = chat_body("gpt-4o-mini");
    let req = |auth: &[u8]| {
        let mut v =
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n".to_vec();
        v.extend_from_slice(auth);
        v.extend_from_slice(format!("Content-Length: {}\r\n\r\n{body}", body.len()).as_bytes());
        v
    };
    let out = raw_exchange(
        env.gw.addr,
        &req(b"Authorization: Bearer \xff\xfe\x80\r\n"),
        false,
        Duration::from_secs(5),
    );
    assert!(
        out.starts_with("HTTP/1.1 401") && out.contains("invalid_api_key"),
        "{out}"
    );
    let out = raw_exchange(
        env.gw.addr,
        &req(b"Authorization: Bearer \r\n"),
        false,
        Duration::from_secs(5),
    );
    assert!(
        out.starts_with("HTTP/1.1 401") && out.contains("missing_api_key"),
        "{out}"
    );
    let out = raw_exchange(
        env.gw.addr,
        &req(b"X-Api-Key: \xc3\x28\r\n"),
        false,
        Duration::from_secs(5),
    );
    assert!(
        out.starts_with("HTTP/1.1 401") && out.contains("invalid_api_key"),
        "{out}"
    );
    assert_eq!(env.mock.request_count(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn body_ending_before_its_content_length_is_refused() {
    let env = Env::start().await;
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {OK}\r\nContent-Length: 1000\r\n\r\n{{\"model\":\"gpt-4o-mini\""
    );
    let out = raw_exchange(env.gw.addr, head.as_bytes(), true, Duration::from_secs(10));
    assert!(
        out.starts_with("HTTP/1.1 400") && out.contains("incomplete_body"),
        "{out}"
    );
    assert_eq!(env.mock.request_count(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_bodies_get_precise_answers() {
    let env = Env::start().await;
    let deep = format!(
        "{{\"model\":\"gpt-4o-mini\",\"x\":{}}}",
        "[".repeat(100_000)
    );
    let long_model = format!("{{\"model\":\"{}\"}}", "m".repeat(100 * 1024));
    let cases: Vec<(String, u16, &str)> = vec![
        (
            r#"{"model": 42, "messages": []}"#.into(),
            400,
            "invalid_model",
        ),
        (
            r#"{"model": null, "messages": []}"#.into(),
            400,
            "model_required",
        ),
        (long_model, 400, "invalid_model"),
        (r#"["gpt-4o-mini"]"#.into(), 400, "invalid_json"),
        (deep, 400, "invalid_json"),
        (
            r#"{"model":"gpt-4o-mini"} trailing"#.into(),
            400,
            "invalid_json",
        ),
        (
            r#"{"model":"gpt-4o-mini","model":"gpt-4o"}"#.into(),
            400,
            "invalid_json",
        ),
    ];
    for (body, status, code) in cases {
        let r = client()
            .post(env.url("/v1/chat/completions"))
            .bearer_auth(OK)
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
            .unwrap();
        let (s, c, _) = denial(r).await;
        assert_eq!(
            (s, c.as_str()),
            (status, code),
            "{}",
            &body[..body.len().min(60)]
        );
    }
    assert_eq!(env.mock.request_count(), 0);
    // Still serving.
    assert_eq!(chat(&env, OK, "gpt-4o-mini").await.status(), 200);
}

// ---------------------------------------------------------------- health and metrics

#[tokio::test(flavor = "multi_thread")]
async fn metrics_health_and_readiness() {
    let env = Env::start().await;
    chat(&env, OK, "gpt-4o-mini").await;
    chat(&env, "sk-nope", "gpt-4o-mini").await;
    let m = env.gw.metrics.clone().unwrap();
    // `logging` runs after the answer is written: poll until both requests are counted.
    let deadline = Instant::now() + Duration::from_secs(10);
    let text = loop {
        let text = client()
            .get(format!("{m}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if text.contains("keygate_gate_duration_seconds_count 2") || Instant::now() > deadline {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(text.contains(r#"keygate_requests_total{group="default",model="gpt-4o-mini",outcome="admitted",reason=""} 1"#), "{text}");
    assert!(
        text.contains(r#"outcome="denied",reason="invalid_api_key""#),
        "{text}"
    );
    assert!(text.contains("keygate_config_revision 7"));
    assert!(
        text.contains("keygate_gate_duration_seconds_count 2"),
        "{text}"
    );
    assert!(!text.contains(OK));
    let r = client().get(format!("{m}/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = client()
        .get(format!("{m}/readyz"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["revision"], 7);
    assert_eq!(v["keys"], 9);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_still_sending_an_oversized_body_reads_the_413() {
    // Without a lingering close the gateway's close resets the connection while the client is
    // still writing, and the client sees a broken pipe instead of the answer.
    let env = Env::start().await;
    for _ in 0..5 {
        let r = client()
            .post(env.url("/v1/chat/completions"))
            .bearer_auth(OK)
            .body(vec![b' '; 4 * 1024 * 1024])
            .send()
            .await
            .expect("the client gets an answer, not a reset");
        assert_eq!(denial(r).await.1, "request_too_large");
    }
}

/// POST `body` as a chat call with the `OK` key on a raw connection (Content-Length framing,
/// `Connection: close`); the whole answer as text.
fn raw_chat(env: &Env, body: &[u8]) -> String {
    let mut req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {OK}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(body);
    raw_exchange(env.gw.addr, &req, false, Duration::from_secs(10))
}

#[tokio::test(flavor = "multi_thread")]
async fn deeply_nested_body_after_the_model_is_refused_and_never_forwarded() {
    let env = Env::start().await;
    // Well-formed JSON: the model first, then 5,000 nested arrays, every one closed.
    let deep = format!(
        r#"{{"model":"gpt-4o-mini","messages":{}{}}}"#,
        "[".repeat(5_000),
        "]".repeat(5_000)
    );
    // Objects rather than arrays, and just over the limit (129 levels with the body's own).
    let objects = format!(
        r#"{{"model":"gpt-4o-mini","messages":[{}1{}]}}"#,
        r#"{"a":"#.repeat(127),
        "}".repeat(127)
    );
    for body in [deep, objects] {
        let out = raw_chat(&env, body.as_bytes());
        assert_eq!(env.mock.request_count(), 0, "forwarded: {out}");
        assert!(out.starts_with("HTTP/1.1 400 "), "{out}");
        assert!(out.contains(r#""code":"invalid_json""#), "{out}");
        assert!(out.contains("deeper than 128"), "{out}");
    }
    // Still serving.
    assert_eq!(chat(&env, OK, "gpt-4o-mini").await.status(), 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn body_broken_after_the_model_is_refused_and_never_forwarded() {
    let env = Env::start().await;
    for body in [
        // Trailing garbage after a whole object.
        &br#"{"model":"gpt-4o-mini","messages":[]} {"model":"gpt-4o"}"#[..],
        br#"{"model":"gpt-4o-mini","messages":[]}]"#,
        // Truncated after the model: the Content-Length matches, the JSON does not end.
        br#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}"#,
        br#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"#,
        // Broken inside a member keygate itself does not read.
        br#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi",}]}"#,
    ] {
        let out = raw_chat(&env, body);
        assert_eq!(env.mock.request_count(), 0, "forwarded: {out}");
        assert!(out.starts_with("HTTP/1.1 400 "), "{out}");
        assert!(out.contains(r#""code":"invalid_json""#), "{out}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_model_check_cannot_be_sidestepped() {
    let env = Env::start().await;
    // A Transfer-Encoding the client lists oddly still means a body keygate reads.
    let b = chat_body("gpt-4o");
    let req = format!(
        "POST /v1/chat/completions?model=gpt-4o-mini HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {MINI_ONLY}\r\nTransfer-Encoding: identity, chunked\r\nConnection: close\r\n\r\n{:x}\r\n{b}\r\n0\r\n\r\n",
        b.len()
    );
    let out = raw_exchange(env.gw.addr, req.as_bytes(), false, Duration::from_secs(5));
    assert!(!out.starts_with("HTTP/1.1 200"), "{out}");
    // ?model= does not stand in for a body that names another model (or none).
    let r = client()
        .post(env.url("/v1/chat/completions?model=gpt-4o-mini"))
        .bearer_auth(MINI_ONLY)
        .body(r#"{"messages":[]}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(denial(r).await.1, "model_required");
    // A case variant of `model` is a second model field, as Go's JSON decoder sees it.
    let r = client()
        .post(env.url("/v1/chat/completions"))
        .bearer_auth(MINI_ONLY)
        .body(r#"{"model":"gpt-4o-mini","MODEL":"gpt-4o"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(denial(r).await.1, "invalid_json");
    // Two model fields in a form.
    let form = reqwest::multipart::Form::new()
        .text("model", "gpt-4o-mini")
        .text("model", "gpt-4o");
    let r = client()
        .post(env.url("/v1/audio/transcriptions"))
        .bearer_auth(MINI_ONLY)
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(denial(r).await.1, "invalid_model");
    assert_eq!(env.mock.request_count(), 0, "{:?}", env.mock.requests());
}

#[tokio::test(flavor = "multi_thread")]
async fn query_keys_never_reach_the_error_log() {
    let env = Env::with(Opts {
        upstream_url: Some("http://127.0.0.1:1".into()),
        ..Opts::default()
    })
    .await;
    let r = client()
        .post(env.url(&format!(
            "/v1beta/models/gemini-1.5-pro:generateContent?key={OK}"
        )))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let log = env.gw.log();
    assert!(log.contains("Fail to proxy"), "{log}");
    assert!(!log.contains(&OK[3..]), "a key reached the log: {log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_silent_upstream_times_out_with_504_and_a_refund_but_a_live_stream_is_never_cut() {
    let env = Env::with(Opts {
        upstream_extra: "    read_timeout_seconds: 1\n".into(),
        ..Opts::default()
    })
    .await;
    let r = client()
        .post(env.url("/v1/chat/completions"))
        .bearer_auth(OK)
        .header("x-mock-delay-ms", "3000")
        .body(chat_body("gpt-4o-mini"))
        .send()
        .await
        .unwrap();
    let (status, code, _) = denial(r).await;
    assert_eq!((status, code.as_str()), (504, "upstream_timeout"));
    // A stream whose events come every 0.7 s outlives the 1 s read timeout many times over.
    let r = slow_stream(&env.gw.base, 700, 5).await;
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().contains("[DONE]"));
    let records = env.gw.wait_records(2).await;
    assert_eq!(records[0]["quota"], 0, "the timed-out call was refunded");
    assert_eq!(records[0]["status"], 504);
    assert!(records[1]["quota"].as_i64().unwrap() > 0);
}
