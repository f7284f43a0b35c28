//! The in-process bus of `quickim standalone`: the same semantics as NATS core, without a
//! network. Every subscription has a bounded channel: a publish that finds it full drops the
//! message (and counts it), a request waits for room up to its timeout.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;

use super::{BusError, Headers, Incoming, Reply, ReplyTo, Subscription, subject_matches};

/// The largest message of the in-process bus (standalone): large, but bounded like NATS's,
/// so the same paging applies.
pub const MAX_PAYLOAD: usize = 8 * 1024 * 1024;

struct LocalSub {
    pattern: String,
    queue: Option<String>,
    tx: mpsc::Sender<Incoming>,
}

/// See the module docs.
pub struct LocalBus {
    capacity: usize,
    max_payload: usize,
    subs: Mutex<Vec<LocalSub>>,
    round_robin: AtomicUsize,
    dropped: AtomicU64,
    closed: std::sync::atomic::AtomicBool,
}

impl LocalBus {
    pub(super) fn new(capacity: usize, max_payload: usize) -> LocalBus {
        LocalBus {
            capacity: capacity.max(1),
            max_payload,
            subs: Mutex::new(Vec::new()),
            round_robin: AtomicUsize::new(0),
            dropped: AtomicU64::new(0),
            closed: std::sync::atomic::AtomicBool::new(false),
        }
    }

    fn subs(&self) -> MutexGuard<'_, Vec<LocalSub>> {
        // A panic while holding this lock cannot leave the list half-updated.
        self.subs.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn subscribe(&self, subject: &str, queue: Option<&str>) -> Subscription {
        let (tx, rx) = mpsc::channel(self.capacity);
        if !self.closed.load(Ordering::Relaxed) {
            self.subs().push(LocalSub { pattern: subject.to_string(), queue: queue.map(str::to_string), tx });
        }
        ReceiverStream::new(rx).boxed()
    }

    /// The senders a message for `subject` goes to: every plain subscriber, one per queue group.
    fn targets(&self, subject: &str) -> Vec<mpsc::Sender<Incoming>> {
        let mut subs = self.subs();
        subs.retain(|s| !s.tx.is_closed());
        let mut out = Vec::new();
        let mut groups: Vec<(&str, Vec<&mpsc::Sender<Incoming>>)> = Vec::new();
        for s in subs.iter().filter(|s| subject_matches(&s.pattern, subject)) {
            match &s.queue {
                None => out.push(s.tx.clone()),
                Some(q) => match groups.iter_mut().find(|(name, _)| name == q) {
                    Some((_, members)) => members.push(&s.tx),
                    None => groups.push((q, vec![&s.tx])),
                },
            }
        }
        for (_, members) in groups {
            let i = self.round_robin.fetch_add(1, Ordering::Relaxed) % members.len();
            out.push(members[i].clone());
        }
        out
    }

    pub(super) fn max_payload(&self) -> usize {
        self.max_payload
    }

    /// Refuses a message over [`LocalBus::max_payload`], as NATS does.
    pub(super) fn check(&self, subject: &str, headers: &Headers, payload: &Bytes) -> Result<(), BusError> {
        let size = super::nats::wire_len(headers, payload.len());
        if size > self.max_payload {
            return Err(BusError::TooLarge { subject: subject.to_string(), size, max: self.max_payload });
        }
        Ok(())
    }

    pub(super) fn publish(&self, subject: &str, headers: Headers, payload: Bytes) -> Result<(), BusError> {
        self.check(subject, &headers, &payload)?;
        for tx in self.targets(subject) {
            let msg = Incoming {
                subject: subject.to_string(),
                headers: headers.clone(),
                payload: payload.clone(),
                reply: None,
            };
            if tx.try_send(msg).is_err() {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    pub(super) async fn request(
        &self,
        subject: &str,
        headers: Headers,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<Reply, BusError> {
        self.check(subject, &headers, &payload)?;
        let Some(tx) = self.targets(subject).into_iter().next() else {
            return Err(BusError::NoResponders(subject.to_string()));
        };
        let (reply_tx, reply_rx) = oneshot::channel();
        let msg = Incoming {
            subject: subject.to_string(),
            headers,
            payload,
            reply: Some(ReplyTo::Local(reply_tx, self.max_payload)),
        };
        let exchange = async {
            tx.send(msg).await.map_err(|_| BusError::NoResponders(subject.to_string()))?;
            reply_rx.await.map_err(|_| BusError::NoResponders(subject.to_string()))
        };
        tokio::time::timeout(timeout, exchange).await.map_err(|_| BusError::TimedOut(subject.to_string()))?
    }

    pub(super) async fn gather(
        &self,
        subject: &str,
        headers: Headers,
        payload: Bytes,
        timeout: Duration,
        expect: usize,
    ) -> Result<Vec<Reply>, BusError> {
        self.check(subject, &headers, &payload)?;
        let mut waiting = Vec::new();
        for tx in self.targets(subject) {
            let (reply_tx, reply_rx) = oneshot::channel();
            let msg = Incoming {
                subject: subject.to_string(),
                headers: headers.clone(),
                payload: payload.clone(),
                reply: Some(ReplyTo::Local(reply_tx, self.max_payload)),
            };
            if tx.try_send(msg).is_ok() {
                waiting.push(reply_rx);
            }
        }
        let mut replies = Vec::new();
        let deadline = tokio::time::Instant::now() + timeout;
        for rx in waiting {
            if replies.len() >= expect {
                break;
            }
            if let Ok(Ok(r)) = tokio::time::timeout_at(deadline, rx).await {
                replies.push(r);
            }
        }
        Ok(replies)
    }

    pub(super) fn close(&self) {
        self.closed.store(true, Ordering::Relaxed);
        self.subs().clear();
    }

    pub(super) fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::super::Bus;
    use super::*;

    #[tokio::test]
    async fn request_reply_and_queue_groups() {
        let bus = Bus::local(8);
        let mut a = bus.subscribe("svc.*", Some("q")).await.unwrap();
        let mut b = bus.subscribe("svc.*", Some("q")).await.unwrap();
        let server = tokio::spawn(async move {
            let mut served = 0;
            loop {
                let msg = tokio::select! {
                    Some(m) = a.next() => m,
                    Some(m) = b.next() => m,
                    else => break,
                };
                let body = msg.payload.clone();
                msg.respond(vec![], body).await.unwrap();
                served += 1;
                if served == 4 {
                    break;
                }
            }
        });
        for i in 0..4u8 {
            let r = bus.request("svc.echo", vec![], Bytes::from(vec![i]), Duration::from_secs(1)).await.unwrap();
            assert_eq!(&r.payload[..], &[i]);
        }
        server.await.unwrap();
        let err = bus.request("other.x", vec![], Bytes::new(), Duration::from_secs(1)).await.unwrap_err();
        assert!(matches!(err, BusError::NoResponders(_)));
    }

    #[tokio::test]
    async fn publish_fans_out_and_drops_when_full() {
        let bus = Bus::local(2);
        let mut s1 = bus.subscribe("log.*", None).await.unwrap();
        let mut s2 = bus.subscribe("log.1", None).await.unwrap();
        for i in 0..3u8 {
            bus.publish("log.1", vec![("k".into(), "v".into())], Bytes::from(vec![i])).await.unwrap();
        }
        // capacity 2: the third publish is dropped for both subscribers
        assert_eq!(bus.dropped(), 2);
        for s in [&mut s1, &mut s2] {
            let m = s.next().await.unwrap();
            assert_eq!(&m.payload[..], &[0]);
            assert_eq!(m.headers, vec![("k".to_string(), "v".to_string())]);
            assert!(!m.expects_reply());
        }
    }

    #[tokio::test]
    async fn request_times_out_when_nobody_answers() {
        let bus = Bus::local(2);
        let _silent = bus.subscribe("svc.slow", None).await.unwrap();
        let err = bus.request("svc.slow", vec![], Bytes::new(), Duration::from_millis(50)).await.unwrap_err();
        assert!(matches!(err, BusError::TimedOut(_)));
    }
}
