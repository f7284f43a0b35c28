//! Graceful shutdown: streams close with a reconnect code, the node exits within its grace
//! period, clients resume on another node with nothing lost.

use std::time::{Duration, Instant};

use quickim_testkit::{Closed, Distributed};

use crate::{BIN, SOON, connect_every_protocol, contents, messages, send};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stopping_gateway_closes_streams_and_clients_resume_elsewhere() {
    let mut d = Distributed::start(BIN, 1, 1, 2, &[("QUICKIM_SHUTDOWN_GRACE_S", "5")]).await;
    d.api(0).conversation("c", &["alice", "bob"]).await;
    let t = d.api(0).token("alice", "web").await;
    let mut clients = connect_every_protocol(&d.api(0).public, &t).await;
    send(d.api(1), "c", "bob", "before").await;
    for c in &mut clients {
        messages(c, 1).await;
    }
    // A poll waiting on the stopping node must come back at once, not after its timeout.
    let poller = {
        let (http, base, t, cursor) =
            (d.api(0).http.clone(), d.api(0).public.clone(), t.clone(), clients[2].cursor.clone().unwrap());
        tokio::spawn(async move {
            let started = Instant::now();
            let r =
                http.get(format!("{base}/notify?protoc=poll&timeout=30&cursor={cursor}")).bearer_auth(&t).send().await;
            (started.elapsed(), r.map(|r| r.status().as_u16()))
        })
    };
    // Until the poll is waiting on the node.
    let deadline = Instant::now() + SOON;
    loop {
        let text = d.api(0).http.get(format!("{}/metrics", d.api(0).inner)).send().await.unwrap().text().await.unwrap();
        let open: f64 = text
            .lines()
            .filter(|l| l.starts_with("quickim_notify_connections{") && l.contains("poll"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        if open >= 1.0 {
            break;
        }
        assert!(Instant::now() < deadline, "the poll never started waiting");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let started = Instant::now();
    let code = d.gateways[0].0.terminate(Duration::from_secs(15));
    assert_eq!(code, Some(0), "clean exit");
    assert!(started.elapsed() < Duration::from_secs(6), "within the grace period: {:?}", started.elapsed());
    let (waited, status) = poller.await.unwrap();
    assert!(waited < Duration::from_secs(6), "the waiting poll was answered at shutdown ({waited:?}, {status:?})");
    assert_eq!(clients[0].wait_closed(SOON).await, Some(Closed::Ws(1001, "shutdown".into())));
    assert_eq!(clients[1].wait_closed(SOON).await, Some(Closed::Ended));
    for i in 0..5 {
        send(d.api(1), "c", "bob", &format!("during{i}")).await;
    }
    let other = d.api(1).public.clone();
    for c in clients {
        let p = c.protocol;
        let mut c = c.reconnect(&other).await.unwrap();
        assert_eq!(
            contents(&messages(&mut c, 5).await),
            (0..5).map(|i| format!("during{i}")).collect::<Vec<_>>(),
            "{p:?}"
        );
    }
    d.finish().await;
}
