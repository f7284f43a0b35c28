//! Soak: thousands of messages to many conversations while clients on all three protocols
//! drop and reconnect at random, to random nodes. Every client must end with every message
//! of its conversations exactly once, each conversation in msg_id order.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use quickim_testkit::{Distributed, NotifyClient, Protocol};
use serde_json::json;
use tokio::sync::Mutex;

use crate::{BIN, SOON};

const CONVERSATIONS: usize = 20;
const USERS: usize = 24;
const PER_USER: usize = 5;
const MESSAGES: usize = 3000;

/// A small deterministic generator (the test must be repeatable).
struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_client_gets_every_message_once_in_order_despite_random_reconnects() {
    let d = Distributed::start(BIN, 1, 2, 2, &[("QUICKIM_RATE_LIMIT_PER_S", "0")]).await;
    let mut rng = Lcg(42);
    let mut members: Vec<Vec<String>> = vec![Vec::new(); CONVERSATIONS];
    let mut of_user: Vec<Vec<usize>> = Vec::new();
    for u in 0..USERS {
        let mut mine = Vec::new();
        while mine.len() < PER_USER {
            let c = rng.below(CONVERSATIONS);
            if !mine.contains(&c) {
                mine.push(c);
                members[c].push(format!("u{u}"));
            }
        }
        of_user.push(mine);
    }
    for (c, m) in members.iter().enumerate() {
        let refs: Vec<&str> = m.iter().map(String::as_str).collect();
        d.api(0).conversation(&format!("c{c}"), &refs).await;
    }
    let publics: Arc<Vec<String>> = Arc::new(d.gateways.iter().map(|(_, a)| a.public.clone()).collect());

    // Connect every client first: everything sent afterwards is expected.
    // Per user: (conversation, msg_id) in the order received.
    type Received = Arc<Mutex<Vec<Vec<(usize, u64)>>>>;
    let received: Received = Arc::new(Mutex::new(vec![Vec::new(); USERS]));

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut readers = Vec::new();
    for u in 0..USERS {
        let token = d.api(0).token(&format!("u{u}"), "web").await;
        let protocol = Protocol::ALL[u % 3];
        let mut client = NotifyClient::connect(&publics[u % 2], &token, protocol, None).await.unwrap();
        assert_eq!(client.next(SOON).await.unwrap()["type"], "ready");
        let (received, publics, stop) = (received.clone(), publics.clone(), stop.clone());
        readers.push(tokio::spawn(async move {
            let mut rng = Lcg(1000 + u as u64);
            let mut reconnects = 0;
            let mut until = Instant::now() + Duration::from_millis(50 + rng.below(400) as u64);
            loop {
                if let Some(e) = client.next(Duration::from_millis(100)).await {
                    if e["type"] == "message" {
                        let m = &e["message"];
                        let c: usize = m["conversation_id"].as_str().unwrap()[1..].parse().unwrap();
                        received.lock().await[u].push((c, m["msg_id"].as_u64().unwrap()));
                    }
                    assert_ne!(e["type"], "resync", "no resync in a soak within the window");
                }
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    return reconnects;
                }
                if Instant::now() > until {
                    let target = publics[rng.below(publics.len())].clone();
                    // Every reconnect must be accepted: both nodes stay up.
                    client =
                        match NotifyClient::connect(&target, client.token(), client.protocol, client.cursor.as_deref())
                            .await
                        {
                            Ok(c) => c,
                            Err(e) => panic!("reconnect refused: {} {}", e.status, e.body),
                        };
                    reconnects += 1;
                    until = Instant::now() + Duration::from_millis(50 + rng.below(400) as u64);
                }
            }
        }));
    }

    // Send from random members through random gateways, several senders at once.
    let started = Instant::now();
    let mut senders = Vec::new();
    for s in 0..4 {
        let apis: Vec<_> = (0..2).map(|i| d.api(i).clone()).collect();
        let members = members.clone();
        senders.push(tokio::spawn(async move {
            let mut rng = Lcg(7 + s);
            let mut sent: Vec<(usize, u64)> = Vec::new();
            for batch in 0..(MESSAGES / 4 / 25) {
                let msgs: Vec<_> = (0..25)
                    .map(|i| {
                        let c = rng.below(CONVERSATIONS);
                        let from = &members[c][rng.below(members[c].len())];
                        json!({"conversation_id":format!("c{c}"),"from":from,"type":1,"content":format!("{s}-{batch}-{i}")})
                    })
                    .collect();
                let (status, v) = apis[batch % 2].inner("/inner/send_msg_batch", json!({ "msgs": msgs })).await;
                assert_eq!(status, 200, "{v}");
                for r in v["data"]["results"].as_array().unwrap() {
                    assert_eq!(r["code"], 0, "{r}");
                    let m = &r["data"];
                    sent.push((m["conversation_id"].as_str().unwrap()[1..].parse().unwrap(), m["msg_id"].as_u64().unwrap()));
                }
            }
            sent
        }));
    }
    let mut sent: Vec<(usize, u64)> = Vec::new();
    for s in senders {
        sent.extend(s.await.unwrap());
    }
    let send_time = started.elapsed();
    assert_eq!(sent.len(), MESSAGES);
    let mut per_conversation: BTreeMap<usize, Vec<u64>> = BTreeMap::new();
    for (c, id) in &sent {
        per_conversation.entry(*c).or_default().push(*id);
    }
    for ids in per_conversation.values_mut() {
        ids.sort_unstable();
    }

    // Wait until every client has everything (or time runs out), then compare exactly.
    let expected: Vec<usize> =
        of_user.iter().map(|convs| convs.iter().map(|c| per_conversation.get(c).map_or(0, Vec::len)).sum()).collect();
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let counts: Vec<usize> = received.lock().await.iter().map(Vec::len).collect();
        if counts.iter().zip(&expected).all(|(got, want)| got >= want) || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut reconnects = 0;
    for r in readers {
        reconnects += r.await.unwrap();
    }
    let received = received.lock().await;
    for u in 0..USERS {
        let mut by_conv: HashMap<usize, Vec<u64>> = HashMap::new();
        for (c, id) in &received[u] {
            by_conv.entry(*c).or_default().push(*id);
        }
        for c in &of_user[u] {
            let want = per_conversation.get(c).cloned().unwrap_or_default();
            let got = by_conv.remove(c).unwrap_or_default();
            assert_eq!(
                got.len(),
                want.len(),
                "u{u} ({:?}) c{c}: {} of {}",
                Protocol::ALL[u % 3],
                got.len(),
                want.len()
            );
            assert_eq!(got, want, "u{u} c{c}: exactly once, in msg_id order");
        }
        assert!(by_conv.is_empty(), "u{u} got messages of conversations it is not in: {:?}", by_conv.keys());
    }
    assert!(reconnects >= USERS * 3, "clients did reconnect ({reconnects})");
    eprintln!(
        "soak: {MESSAGES} messages sent in {send_time:?}, {} deliveries checked, {reconnects} reconnects",
        expected.iter().sum::<usize>()
    );
    d.finish().await;
}
