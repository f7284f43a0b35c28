//! The database goes away: sends answer a retryable 503 in time — never 500, never after the
//! request timeout — and a retry with the same client_msg_id stores the message once.

use std::time::{Duration, Instant};

use futures::StreamExt;
use quickim_testkit::{Distributed, NatsServer, PgDatabase, PgServer};
use serde_json::json;

use crate::BIN;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sends_during_a_database_outage_answer_in_time_and_retry_once() {
    let pg = PgServer::start();
    let db = PgDatabase::create_on(&pg.base).await;
    let name = db.name.clone();
    // A 3 s request timeout: the services wait 1.5 s for a database connection.
    let d =
        Distributed::start_on(BIN, NatsServer::start(), db, 1, 2, 2, &[("QUICKIM_REQUEST_TIMEOUT_MS", "3000")]).await;
    d.api(0).conversation("c", &["alice"]).await;
    let send = |api: quickim_testkit::Api, key: String| async move {
        let started = Instant::now();
        let (s, v) = api
            .inner(
                "/inner/send_msg",
                json!({"conversation_id":"c","from":"alice","type":1,"content":key,"client_msg_id":key}),
            )
            .await;
        (s.as_u16(), v, started.elapsed())
    };

    // Down: 60 sends at once on two gateways, more than either keeps in flight. Every answer
    // is 503 or 504 and comes within the request timeout of the request's arrival.
    pg.stop();
    let answers: Vec<(u16, serde_json::Value, Duration)> = futures::stream::iter(0..60)
        .map(|i| send(d.api(i % 2).clone(), format!("k{i}")))
        .buffer_unordered(60)
        .collect()
        .await;
    for (status, v, took) in &answers {
        assert!(matches!(status, 503 | 504), "{status} {v}");
        assert!(*took < Duration::from_millis(3_000 + 1_000), "answered after {took:?}: {v}");
    }
    let unavailable = answers.iter().filter(|(s, _, _)| *s == 503).count();
    assert!(unavailable > 0, "an unreachable database answers 503: {answers:?}");
    let timeouts: Vec<&serde_json::Value> = answers.iter().filter(|(s, _, _)| *s == 504).map(|(_, v, _)| v).collect();
    for v in timeouts {
        assert!(v["error"].as_str().unwrap().contains("client_msg_id"), "a timeout says how to retry: {v}");
    }

    // Back: every send retried with its key is stored once.
    pg.start_again();
    for i in 0..60 {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (status, v, _) = send(d.api(i % 2).clone(), format!("k{i}")).await;
            assert_ne!(status, 500, "{v}");
            if status == 200 {
                break;
            }
            assert!(Instant::now() < deadline, "k{i} never stored: {v}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    // Backends terminated under load: retryable errors only, and every key stored once.
    let load = {
        let api = d.api(1).clone();
        tokio::spawn(async move {
            let mut statuses = Vec::new();
            for i in 0..200 {
                let key = format!("t{i}");
                loop {
                    let (status, v, _) = send(api.clone(), key.clone()).await;
                    statuses.push((status, v));
                    if status == 200 {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            statuses
        })
    };
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        pg.terminate_backends(&name).await;
    }
    let statuses = load.await.unwrap();
    for (status, v) in &statuses {
        assert!(matches!(status, 200 | 503 | 504), "{status} {v}");
    }
    let (s, v) = d
        .api(0)
        .inner("/inner/send_msg", json!({"conversation_id":"c","from":"alice","type":1,"content":"last"}))
        .await;
    assert_eq!(s, 200, "{v}");
    // 1 creation + 60 + 200 + this one: nothing stored twice.
    assert_eq!(v["data"]["msg_id"], 262, "every retried key stored once");
    d.finish().await;
}
