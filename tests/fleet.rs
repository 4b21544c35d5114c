//! Fleets (SPEC §8): a gateway following an admin instance through `sync_url` sees a key
//! created there within a second; starts from its last good copy when the admin instance is
//! down; keeps serving through an admin restart; rejects a file that fails validation exactly
//! as a local reload does.

mod common;

use common::free_port;
use common::*;
use keygate::mock::MockBackend;
use serde_json::{json, Value};
use std::path::Path;
use std::time::{Duration, Instant};

fn admin_config(port: u16) -> String {
    format!(
        "admin:\n  listen: \"127.0.0.1:{port}\"\n  tokens:\n    - {{ name: ops, token_env: KG_TEST_ADMIN_TOKEN, role: admin }}\n"
    )
}

/// A follower's config in `dir`: no sync file, `sync_url` instead.
fn start_follower(dir: &Path, upstream: &str, sync_url: &str) -> Gateway {
    let yaml = config_yaml(&Opts::default(), upstream).replace(
        "sync_file: keys.json\n",
        &format!("sync_url: \"{sync_url}\"\nsync_token_env: KG_TEST_ADMIN_TOKEN\n"),
    );
    let config = dir.join("keygate.yaml");
    std::fs::write(&config, yaml).unwrap();
    spawn_keygate(dir, &config)
}

async fn readyz(gw: &Gateway) -> Value {
    let m = gw.metrics.clone().unwrap();
    client()
        .get(format!("{m}/readyz"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

async fn create(admin: &str) -> String {
    let r: Value = client()
        .post(format!("{admin}/admin/v1/keys"))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"name": "fleet", "quota": 1000000}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    r["secret"].as_str().unwrap().to_string()
}

/// Wait until `key` serves on `base`; how long it took.
async fn until_served(base: &str, key: &str) -> Duration {
    let started = Instant::now();
    loop {
        if chat_status(base, key).await == 200 {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{key} never served on {base}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_follower_sees_admin_writes_and_survives_the_admin_going_away() {
    let port = free_port();
    let admin_env = Env::with(Opts {
        extra: admin_config(port),
        ..Opts::default()
    })
    .await;
    let admin = admin_env.gw.admin.clone().unwrap();
    let upstream = format!("http://{}", admin_env.mock.addr());
    let fdir = tempfile::tempdir().unwrap();
    let sync_url = format!("{admin}/admin/v1/sync");
    let mut follower = start_follower(fdir.path(), &upstream, &sync_url);
    // The follower takes the admin's file (the standard keys) from its first poll.
    until_served(&follower.base, OK).await;

    // Create-to-served on the follower, over 100 writes on the admin instance.
    let mut took = Vec::new();
    let mut last = String::new();
    for _ in 0..100 {
        last = create(&admin).await;
        took.push(until_served(&follower.base, &last).await);
    }
    took.sort();
    eprintln!(
        "admin create to served on a follower, 100 writes: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        took[49].as_secs_f64() * 1e3,
        took[98].as_secs_f64() * 1e3,
        took[99].as_secs_f64() * 1e3
    );
    // The follower converges on the admin's revision.
    let admin_rev = readyz(&admin_env.gw).await["revision"].as_u64().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while readyz(&follower).await["revision"].as_u64() != Some(admin_rev) {
        assert!(
            Instant::now() < deadline,
            "the follower stays behind revision {admin_rev}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let copy = fdir.path().join("var/followed-keys.json");
    // Kept right after it is in force.
    let kept = format!("\"revision\": {admin_rev}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !std::fs::read_to_string(&copy)
        .unwrap_or_default()
        .contains(&kept)
    {
        assert!(
            Instant::now() < deadline,
            "revision {admin_rev} is not kept in {copy:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The admin instance goes away: the follower keeps serving.
    let Env {
        mock,
        gw: mut admin_gw,
        dir: admin_dir,
    } = admin_env;
    admin_gw.kill9();
    assert_eq!(
        chat_status(&follower.base, &last).await,
        200,
        "{}",
        follower.log()
    );
    // A restart while it is away starts from the last good copy.
    follower.terminate();
    let follower = spawn_keygate(fdir.path(), &fdir.path().join("keygate.yaml"));
    assert_eq!(chat_status(&follower.base, &last).await, 200);
    assert_eq!(
        readyz(&follower).await["revision"].as_u64(),
        Some(admin_rev)
    );
    assert!(
        follower.log().contains("the admin instance is away"),
        "{}",
        follower.log()
    );

    // The admin instance comes back (same files, same port): writes flow again.
    let admin_gw = spawn_keygate(admin_dir.path(), &admin_dir.path().join("keygate.yaml"));
    let admin = admin_gw.admin.clone().unwrap();
    assert_eq!(admin, format!("http://127.0.0.1:{port}"));
    let next = create(&admin).await;
    until_served(&follower.base, &next).await;
    drop(mock);
}

/// A stand-in admin instance (not keygate: it serves what the test says) answering every
/// request with `body` as revision `rev`.
async fn fake_admin(body: &'static str, rev: u64) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let mut buf = vec![0u8; 8192];
                let _ = s.read(&mut buf).await;
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nx-keygate-revision: {rev}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    body.len()
                );
                let _ = s.write_all(head.as_bytes()).await;
                let _ = s.write_all(body.as_bytes()).await;
            });
        }
    });
    format!("http://{addr}/admin/v1/sync")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_file_that_fails_validation_is_rejected_as_a_local_reload_would() {
    let mock = MockBackend::start("127.0.0.1:0").await.unwrap();
    let url = fake_admin(
        r#"{"revision": 9, "keys": [{"id": 1, "key": "sk-fleet-bad-cidr-000000000000000000000000000000000", "allow_ips": ["10.0.0/8"]}]}"#,
        9,
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let gw = start_follower(dir.path(), &format!("http://{}", mock.addr()), &url);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !gw
        .metrics_text()
        .await
        .contains("keygate_config_reloads_total{result=\"error\"}")
    {
        assert!(Instant::now() < deadline, "{}", gw.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        gw.log().contains("10.0.0/8"),
        "the rejection names the bad CIDR: {}",
        gw.log()
    );
    assert_eq!(readyz(&gw).await["revision"].as_u64(), Some(0));
    assert_eq!(
        chat_status(
            &gw.base,
            "sk-fleet-bad-cidr-000000000000000000000000000000000"
        )
        .await,
        401
    );
    // The bad file is not kept as the last good copy.
    let copy = std::fs::read_to_string(dir.path().join("var/followed-keys.json")).unwrap();
    assert!(!copy.contains("10.0.0/8"));
}
