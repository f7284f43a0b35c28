//! One suite, run against SQLite and against PostgreSQL: every test exists twice.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::HashSet;

use quickim_shared::error::ErrorCode;
use quickim_shared::protocol::api::ConversationSummary;
use quickim_shared::protocol::api::MetaRole;
use quickim_shared::protocol::service::{HistoryQuery, Origin};
use quickim_shared::protocol::system;
use quickim_shared::protocol::system::Action;
use quickim_store::{NewConversation, Revision, SendItem, Store, UnreadRule};
use quickim_testkit::PgDatabase;

struct Db {
    store: Store,
    _dir: Option<tempfile::TempDir>,
    pg: Option<PgDatabase>,
}

impl Db {
    async fn sqlite() -> Db {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_sqlite(&dir.path().join("q.db"), 8, 4).await.unwrap();
        Db { store, _dir: Some(dir), pg: None }
    }

    async fn postgres() -> Db {
        let pg = PgDatabase::create().await;
        let store = Store::open_postgres(&pg.url, 8, 4, std::time::Duration::from_secs(10)).await.unwrap();
        Db { store, _dir: None, pg: Some(pg) }
    }

    /// A second, independent connection pool on the same database (a second service instance).
    async fn another_instance(&self) -> Store {
        match &self.pg {
            Some(pg) => Store::open_postgres(&pg.url, 8, 4, std::time::Duration::from_secs(10)).await.unwrap(),
            None => self.store.clone(),
        }
    }

    async fn finish(self) {
        self.store.close().await;
        if let Some(pg) = self.pg {
            pg.drop_db().await;
        }
    }
}

macro_rules! both {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
               async fn $name() { let db = super::Db::sqlite().await; super::$name(&db).await; db.finish().await; } )*
        }
        mod postgres {
            $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
               async fn $name() { let db = super::Db::postgres().await; super::$name(&db).await; db.finish().await; } )*
        }
    };
}

both!(
    create_is_idempotent_and_conflicts_differ,
    membership_changes_are_messages,
    send_checks_membership_archive_and_keys,
    idempotent_retries_within_and_across_batches,
    history_reads,
    unread_and_joined_list,
    replay_follows_membership,
    log_reads_and_heads,
    log_pages_stop_at_bytes_and_count,
    one_refused_item_never_fails_the_others,
    expired_keys_and_old_messages_are_pruned,
    membership_and_revocation_pages,
    concurrent_senders_stay_gap_free,
    concurrent_retries_store_once,
    keys_lost_to_a_concurrent_batch_leave_the_others_usable,
    retention_horizon_forces_resync,
    unread_counts_what_others_send,
    listed_system_types_count_as_unread,
    revisions_rewrite_in_place_and_recall_erases,
    receipts_since_a_time_and_presence_records,
);

fn conv(id: &str, members: &[&str], owner: Option<&str>) -> NewConversation {
    NewConversation {
        conversation_id: Some(id.to_string()),
        conversation_type: 1,
        joinable: false,
        members: members.iter().map(|s| s.to_string()).collect(),
        owner: owner.map(str::to_string),
        title: None,
        avatar: None,
        ext: None,
        meta_role: MetaRole::None,
        receipts: true,
        presence: false,
    }
}

fn item(c: &str, from: &str, content: &str, key: Option<&str>) -> SendItem {
    SendItem {
        origin: Origin::Client,
        conversation_id: c.to_string(),
        from: from.to_string(),
        msg_type: 1,
        content: content.to_string(),
        client_msg_id: key.map(str::to_string),
        count_unread: true,
    }
}

async fn send(store: &Store, c: &str, from: &str, content: &str) -> u64 {
    let (mut r, _) = store.send_batch(&[item(c, from, content, None)]).await.unwrap();
    r.remove(0).unwrap().msg_id
}

fn users(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

async fn create_is_idempotent_and_conflicts_differ(db: &Db) {
    let s = &db.store;
    let out = s.create_conversation(conv("c1", &["bob", "alice"], Some("alice"))).await.unwrap();
    assert!(out.created);
    assert_eq!(out.entries.len(), 1);
    assert_eq!(out.entries[0].message.msg_id, 1);
    assert_eq!(out.entries[0].message.msg_type, system::CREATED);
    // Same members in another order: idempotent, no new message.
    let again = s.create_conversation(conv("c1", &["alice", "bob"], Some("alice"))).await.unwrap();
    assert!(!again.created);
    assert!(again.entries.is_empty());
    // Different members: conflict, nothing written.
    let err = s.create_conversation(conv("c1", &["alice", "carol"], Some("alice"))).await.unwrap_err();
    assert_eq!(quickim_shared::error::ServiceError::from(err).code, ErrorCode::Conflict);
    assert_eq!(s.last_msg_id("c1", "alice").await.unwrap(), 1);
    // Generated ids are UUIDv7.
    let generated =
        s.create_conversation(NewConversation { conversation_id: None, ..conv("x", &["a"], None) }).await.unwrap();
    assert_eq!(uuid::Uuid::parse_str(&generated.conversation_id).unwrap().get_version_num(), 7);
    let d = s.detail("c1", "bob", None, 500, 1 << 20).await.unwrap();
    assert_eq!((d.members.len(), d.member_count, d.next_members_cursor.as_deref()), (2, 2, None));
    assert!(d.members.iter().any(|m| m.user_id == "alice" && m.role == quickim_shared::protocol::api::Role::Owner));

    // Members in pages: by count, and by bytes.
    let many: Vec<String> = (0..25).map(|i| format!("member-{i:02}")).collect();
    s.create_conversation(NewConversation { members: many.clone(), ..conv("big", &[], Some("member-00")) })
        .await
        .unwrap();
    let (_, _) = s.join("big", &users(&["late"]), false, 1000).await.unwrap();
    for (limit, bytes) in [(10, 1 << 20), (1000, 1200)] {
        let mut seen = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let d = s.detail("big", "late", cursor.as_deref(), limit, bytes).await.unwrap();
            assert_eq!(d.member_count, 26);
            assert!(d.members.len() <= limit as usize);
            seen.extend(d.members.into_iter().map(|m| m.user_id));
            match d.next_members_cursor {
                Some(c) => cursor = Some(c),
                None => break,
            }
        }
        let mut want = many.clone();
        want.push("late".into());
        assert_eq!(seen, want, "every member once, in join order (limit {limit}, {bytes} bytes)");
    }
    let err = s.detail("big", "late", Some("nonsense"), 10, 1 << 20).await.unwrap_err();
    assert_eq!(quickim_shared::error::ServiceError::from(err).code, ErrorCode::InvalidParam);
}

async fn membership_changes_are_messages(db: &Db) {
    let s = &db.store;
    s.create_conversation(conv("c", &["a"], Some("a"))).await.unwrap();
    let (joined, e) = s.join("c", &users(&["b", "c", "b"]), false, 1000).await.unwrap();
    assert_eq!(joined, users(&["b", "c"]));
    assert_eq!(e[0].message.msg_id, 2);
    assert_eq!(e[0].message.msg_type, system::JOINED);
    // Joining again changes nothing.
    let (_, e) = s.join("c", &users(&["b"]), false, 1000).await.unwrap();
    assert!(e.is_empty());
    // Self-join of a private conversation: not_member, as for an unknown one.
    let err = s.join("c", &users(&["z"]), true, 1000).await.unwrap_err();
    assert_eq!(quickim_shared::error::ServiceError::from(err).code, ErrorCode::NotMember);
    let err = s.join("nope", &users(&["z"]), true, 1000).await.unwrap_err();
    assert_eq!(quickim_shared::error::ServiceError::from(err).code, ErrorCode::NotMember);
    let err = s.join("nope", &users(&["z"]), false, 1000).await.unwrap_err();
    assert_eq!(quickim_shared::error::ServiceError::from(err).code, ErrorCode::NotFound);
    // At max_members, a join that would pass it is refused whole, and changes nothing.
    let err = s.join("c", &users(&["x", "y"]), false, 4).await.unwrap_err();
    assert_eq!(quickim_shared::error::ServiceError::from(err).code, ErrorCode::ConversationFull);
    assert!(!s.is_member("c", "x").await.unwrap());
    let (joined, _) = s.join("c", &users(&["x"]), false, 4).await.unwrap();
    assert_eq!(joined, users(&["x"]));
    let e = s.kick("c", &users(&["x"])).await.unwrap().1;
    assert_eq!(e.len(), 1);

    assert_eq!(send(s, "c", "b", "hello").await, 5);
    let e = s.leave("c", "b").await.unwrap();
    assert_eq!(e[0].message.msg_id, 6);
    assert!(!s.is_member("c", "b").await.unwrap());
    let (kicked, e) = s.kick("c", &users(&["c", "b"])).await.unwrap();
    assert_eq!(kicked, users(&["c"]));
    assert_eq!(e[0].message.msg_type, system::KICKED);
    // Former members read nothing and send nothing.
    let err = s.history("c", "c", HistoryQuery::Last, false, 100, 1 << 20).await.unwrap_err();
    assert_eq!(quickim_shared::error::ServiceError::from(err).code, ErrorCode::NotMember);
    let (r, _) = s.send_batch(&[item("c", "b", "x", None)]).await.unwrap();
    assert_eq!(r[0].as_ref().unwrap_err().code, ErrorCode::NotMember);
    // Rejoined: reads the whole history, unread counts from the join.
    s.join("c", &users(&["b"]), false, 1000).await.unwrap();
    let h = s.history("c", "b", HistoryQuery::Last, false, 100, 1 << 20).await.unwrap();
    assert_eq!(h.iter().map(|m| m.msg_id).collect::<Vec<_>>(), (1..=8).collect::<Vec<_>>());
    let list = s.list_joined("b", None, 10, None, 1 << 20).await.unwrap();
    assert_eq!(list.conversations[0].read_msg_id, 8);
    assert_eq!(list.conversations[0].unread, 0);
    // Archive toggles write messages; unknown ids are skipped.
    let (updated, e) = s.set_archived(&users(&["c", "nope"]), true).await.unwrap();
    assert_eq!(updated, users(&["c"]));
    assert_eq!(e[0].message.msg_type, system::ARCHIVED);
    let (updated, _) = s.set_archived(&users(&["c"]), true).await.unwrap();
    assert!(updated.is_empty());
}

async fn send_checks_membership_archive_and_keys(db: &Db) {
    let s = &db.store;
    s.create_conversation(conv("c", &["a", "b"], None)).await.unwrap();
    let mut sys = item("c", "", "notice", None);
    sys.origin = Origin::Inner;
    let mut sys_client = item("c", "", "notice", None);
    sys_client.origin = Origin::Client;
    let (r, entries) = s
        .send_batch(&[
            item("c", "a", "1", None),
            item("c", "mallory", "2", None),
            item("nope", "a", "3", None),
            sys,
            sys_client,
            item("c", "b", "4", None),
        ])
        .await
        .unwrap();
    assert_eq!(r[0].as_ref().unwrap().msg_id, 2);
    assert_eq!(r[1].as_ref().unwrap_err().code, ErrorCode::NotMember);
    assert_eq!(r[2].as_ref().unwrap_err().code, ErrorCode::NotMember);
    assert_eq!(r[3].as_ref().unwrap().msg_id, 3);
    assert_eq!(r[4].as_ref().unwrap_err().code, ErrorCode::InvalidParam);
    assert_eq!(r[5].as_ref().unwrap().msg_id, 4);
    assert_eq!(entries.len(), 3);
    s.set_archived(&users(&["c"]), true).await.unwrap();
    let (r, _) = s.send_batch(&[item("c", "a", "late", None)]).await.unwrap();
    assert_eq!(r[0].as_ref().unwrap_err().code, ErrorCode::ConversationArchived);
    let mut inner = item("c", "a", "late", None);
    inner.origin = Origin::Inner;
    let (r, _) = s.send_batch(&[inner]).await.unwrap();
    assert_eq!(r[0].as_ref().unwrap().msg_id, 6);
}

async fn idempotent_retries_within_and_across_batches(db: &Db) {
    let s = &db.store;
    s.create_conversation(conv("c", &["a", "b"], None)).await.unwrap();
    s.create_conversation(conv("d", &["a"], None)).await.unwrap();
    let (r, e) = s
        .send_batch(&[
            item("c", "a", "hi", Some("k1")),
            item("c", "a", "hi", Some("k1")),
            item("c", "a", "other", Some("k1")),
        ])
        .await
        .unwrap();
    let first = r[0].clone().unwrap();
    assert_eq!(r[1].clone().unwrap(), first);
    assert_eq!(r[2].as_ref().unwrap_err().code, ErrorCode::Conflict);
    assert_eq!(e.len(), 1);
    // A later retry answers the original, publishes nothing.
    let (r, e) = s.send_batch(&[item("c", "a", "hi", Some("k1"))]).await.unwrap();
    assert_eq!(r[0].clone().unwrap(), first);
    assert!(e.is_empty());
    // Same key, other conversation: conflict. Same key, other sender: independent.
    let (r, _) = s.send_batch(&[item("d", "a", "hi", Some("k1")), item("c", "b", "hi", Some("k1"))]).await.unwrap();
    assert_eq!(r[0].as_ref().unwrap_err().code, ErrorCode::Conflict);
    assert_eq!(r[1].as_ref().unwrap().from, "b");
    // A rejected first use does not reserve the key.
    let (r, _) = s.send_batch(&[item("c", "zed", "x", Some("k9"))]).await.unwrap();
    assert_eq!(r[0].as_ref().unwrap_err().code, ErrorCode::NotMember);
    let (r, _) = s.send_batch(&[item("c", "a", "x", Some("k9"))]).await.unwrap();
    assert!(r[0].is_ok());
    assert_eq!(s.last_msg_id("c", "a").await.unwrap(), 4);
}

async fn history_reads(db: &Db) {
    let s = &db.store;
    s.create_conversation(conv("c", &["a"], None)).await.unwrap();
    for i in 0..120 {
        send(s, "c", "a", &format!("m{i}")).await;
    }
    // msg 1 is CREATED; user messages are 2..=121.
    let ids = |v: Vec<quickim_shared::protocol::api::Message>| v.into_iter().map(|m| m.msg_id).collect::<Vec<_>>();
    let r = s.history("c", "a", HistoryQuery::Range { start: 10, end: 12 }, false, 100, 1 << 20).await.unwrap();
    assert_eq!(ids(r), vec![10, 11, 12]);
    let r = s.history("c", "a", HistoryQuery::Range { start: 10, end: 12 }, true, 100, 1 << 20).await.unwrap();
    assert_eq!(ids(r), vec![12, 11, 10]);
    let r = s.history("c", "a", HistoryQuery::Range { start: 1, end: 121 }, false, 100, 1 << 20).await.unwrap();
    assert_eq!(r.len(), 100);
    assert_eq!(r[0].msg_id, 1);
    let r = s.history("c", "a", HistoryQuery::Range { start: 1, end: 121 }, true, 100, 1 << 20).await.unwrap();
    assert_eq!((r[0].msg_id, r[99].msg_id), (121, 22));
    let err = s.history("c", "a", HistoryQuery::Range { start: 5, end: 4 }, false, 100, 1 << 20).await.unwrap_err();
    assert_eq!(quickim_shared::error::ServiceError::from(err).code, ErrorCode::InvalidParam);
    let r = s.history("c", "a", HistoryQuery::Before { msg_id: 50 }, false, 100, 1 << 20).await.unwrap();
    assert_eq!(ids(r), (20..50).collect::<Vec<_>>());
    let r = s.history("c", "a", HistoryQuery::Before { msg_id: 50 }, true, 100, 1 << 20).await.unwrap();
    assert_eq!(ids(r), (20..50).rev().collect::<Vec<_>>());
    let r = s.history("c", "a", HistoryQuery::After { msg_id: 100 }, false, 100, 1 << 20).await.unwrap();
    assert_eq!(ids(r), (101..=121).collect::<Vec<_>>());
    let r = s.history("c", "a", HistoryQuery::Last, false, 100, 1 << 20).await.unwrap();
    assert_eq!(ids(r), (92..=121).collect::<Vec<_>>());
    let r = s.history("c", "a", HistoryQuery::LastOne, false, 100, 1 << 20).await.unwrap();
    assert_eq!(r[0].content, "m119");
    assert_eq!(s.last_msg_id("c", "a").await.unwrap(), 121);
    // Bounded in bytes: the messages nearest where the query starts, as many as fit.
    let one = quickim_shared::bus::size::encoded_len(
        &s.history("c", "a", HistoryQuery::LastOne, false, 1, 1 << 20).await.unwrap()[0],
    );
    let room = 2 + 5 * (one + 1);
    let r = s.history("c", "a", HistoryQuery::Range { start: 10, end: 100 }, false, 100, room).await.unwrap();
    assert_eq!(ids(r), vec![10, 11, 12, 13, 14]);
    let r = s.history("c", "a", HistoryQuery::Range { start: 10, end: 100 }, true, 100, room).await.unwrap();
    assert_eq!(ids(r), vec![100, 99, 98, 97, 96]);
    let r = s.history("c", "a", HistoryQuery::Last, false, 100, room).await.unwrap();
    assert_eq!(ids(r), (117..=121).collect::<Vec<_>>());
    let r = s.history("c", "a", HistoryQuery::Before { msg_id: 50 }, false, 100, room).await.unwrap();
    assert_eq!(ids(r), (45..50).collect::<Vec<_>>());
    let r = s.history("c", "a", HistoryQuery::After { msg_id: 50 }, true, 100, room).await.unwrap();
    assert_eq!(ids(r), (51..56).rev().collect::<Vec<_>>());
    assert_eq!(s.history("c", "a", HistoryQuery::Last, false, 100, 1).await.unwrap().len(), 1, "at least one");
}

async fn unread_and_joined_list(db: &Db) {
    let s = &db.store;
    for i in 0..5 {
        s.create_conversation(conv(&format!("c{i}"), &["a", "b"], None)).await.unwrap();
    }
    for i in 0..5 {
        for _ in 0..i {
            send(s, &format!("c{i}"), "b", "x").await;
        }
    }
    s.set_archived(&users(&["c0"]), true).await.unwrap();
    let page1 = s.list_joined("a", None, 2, None, 1 << 20).await.unwrap();
    assert_eq!(page1.conversations.len(), 2);
    let page2 = s.list_joined("a", None, 2, page1.next_cursor.as_deref(), 1 << 20).await.unwrap();
    let page3 = s.list_joined("a", None, 2, page2.next_cursor.as_deref(), 1 << 20).await.unwrap();
    assert!(page3.next_cursor.is_none());
    let all: Vec<_> = [page1, page2, page3].into_iter().flat_map(|p| p.conversations).collect();
    let ids: HashSet<_> = all.iter().map(|c| c.conversation_id.clone()).collect();
    assert_eq!(ids.len(), 5);
    let c4 = all.iter().find(|c| c.conversation_id == "c4").unwrap();
    assert_eq!((c4.last_msg_id, c4.read_msg_id, c4.unread), (5, 1, 4));
    let mark = |m: quickim_store::ReadMark| (m.read_msg_id, m.unread, m.moved);
    assert_eq!(mark(s.mark_read("c4", "a", 3).await.unwrap()), (3, 2, true));
    assert_eq!(mark(s.mark_read("c4", "a", 2).await.unwrap()), (3, 2, false), "never moves back");
    assert_eq!(mark(s.mark_read("c4", "a", 999).await.unwrap()), (5, 0, true), "clamped to the newest");
    let archived = s.list_joined("a", Some(true), 10, None, 1 << 20).await.unwrap();
    assert_eq!(archived.conversations.len(), 1);
    assert!(archived.conversations[0].archived);
    assert_eq!(s.list_joined("a", Some(false), 10, None, 1 << 20).await.unwrap().conversations.len(), 4);
    let err = s.list_joined("a", None, 10, Some("garbage!"), 1 << 20).await.unwrap_err();
    assert_eq!(quickim_shared::error::ServiceError::from(err).code, ErrorCode::InvalidParam);
    // Bounded in bytes too: pages of the size that fits, every conversation once.
    let mut seen = HashSet::new();
    let mut cursor: Option<String> = None;
    loop {
        let page = s.list_joined("a", None, 10, cursor.as_deref(), 512 + 2 + 2 * 200).await.unwrap();
        assert!((1..=2).contains(&page.conversations.len()), "{}", page.conversations.len());
        for c in page.conversations {
            assert!(seen.insert(c.conversation_id));
        }
        match page.next_cursor {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    assert_eq!(seen.len(), 5);
}

async fn replay_follows_membership(db: &Db) {
    let s = &db.store;
    s.create_conversation(conv("stay", &["u", "x"], None)).await.unwrap();
    s.create_conversation(conv("leave", &["u", "x"], None)).await.unwrap();
    s.create_conversation(conv("later", &["x"], None)).await.unwrap();
    send(s, "stay", "x", "before").await;
    let cursor = s.heads().await.unwrap().heads;
    send(s, "stay", "x", "s1").await;
    send(s, "leave", "x", "l1").await;
    s.kick("leave", &users(&["u"])).await.unwrap();
    send(s, "leave", "x", "after kick").await;
    send(s, "later", "x", "before join").await;
    s.join("later", &users(&["u"]), false, 1000).await.unwrap();
    send(s, "later", "x", "after join").await;
    send(s, "stay", "x", "s2").await;
    let upto = s.heads().await.unwrap().heads;
    let page = s.replay("u", &cursor, &upto, 100, 1 << 20, 86_400_000).await.unwrap();
    assert!(!page.more && !page.expired);
    let entries = page.entries;
    let got: Vec<(String, String)> =
        entries.iter().map(|e| (e.message.conversation_id.clone(), e.message.content.clone())).collect();
    let want = |c: &str| got.iter().filter(|(cc, _)| cc == c).map(|(_, m)| m.clone()).collect::<Vec<_>>();
    assert_eq!(want("stay"), vec!["s1", "s2"]);
    assert_eq!(want("leave").len(), 2, "backlog up to and including the kick: {got:?}");
    assert!(want("leave")[1].contains("user_ids"));
    assert_eq!(want("later").len(), 2, "the join message and what followed: {got:?}");
    assert_eq!(want("later")[1], "after join");
    // Entries come per partition in offset order.
    for w in entries.windows(2) {
        assert!((w[0].part, w[0].offset) < (w[1].part, w[1].offset));
    }
    // Paging: pages of 2 continue exactly where the previous one stopped.
    let mut after = cursor.clone();
    let mut paged = Vec::new();
    loop {
        let page = s.replay("u", &after, &upto, 2, 1 << 20, 86_400_000).await.unwrap();
        assert!(page.entries.len() <= 2);
        if let Some(last) = page.entries.last() {
            let p = usize::from(last.part);
            after[..p].copy_from_slice(&upto[..p]);
            after[usize::from(last.part)] = last.offset;
        }
        paged.extend(page.entries);
        if !page.more {
            break;
        }
    }
    assert_eq!(paged, entries);
    // A byte budget cuts a page short (at least one entry per page).
    let page = s.replay("u", &cursor, &upto, 100, 1, 86_400_000).await.unwrap();
    assert_eq!(page.entries.len(), 1);
    assert!(page.more);
    // Wrong cursor width: expired (resync).
    assert!(s.replay("u", &[0], &upto, 100, 1 << 20, 86_400_000).await.unwrap().expired);
}

async fn log_reads_and_heads(db: &Db) {
    let s = &db.store;
    for i in 0..6 {
        s.create_conversation(conv(&format!("c{i}"), &["a"], None)).await.unwrap();
        send(s, &format!("c{i}"), "a", "x").await;
    }
    let heads = s.heads().await.unwrap();
    assert_eq!(heads.heads.len(), 4);
    assert_eq!(heads.heads.iter().sum::<u64>(), 12);
    for part in 0..4u16 {
        let entries = s.read_log(part, 0, heads.heads[usize::from(part)], 1000, 1 << 20).await.unwrap();
        let offsets: Vec<u64> = entries.iter().map(|e| e.offset).collect();
        assert_eq!(offsets, (1..=heads.heads[usize::from(part)]).collect::<Vec<_>>(), "gap-free partition {part}");
        assert!(entries.iter().all(|e| e.part == part));
    }
    assert_eq!(s.epoch(), db.another_instance().await.epoch());
}

async fn log_pages_stop_at_bytes_and_count(db: &Db) {
    let s = &db.store;
    s.create_conversation(conv("big", &["a"], None)).await.unwrap();
    for _ in 0..150 {
        send(s, "big", "a", &"x".repeat(1000)).await;
    }
    // The one partition used (its creation message and the 150).
    let heads = s.heads().await.unwrap().heads;
    let part = heads.iter().position(|h| *h == 151).unwrap() as u16;
    // Bytes: contents of 1,000 bytes, at most 10,000 → 10 entries (the one that reaches the
    // bound is the last); count: 100 of 1,000 bytes within 1 MiB → 100.
    let page = s.read_log(part, 1, u64::MAX, 1000, 10_000).await.unwrap();
    assert_eq!(page.len(), 10);
    assert_eq!(page.first().unwrap().offset, 2);
    let page = s.read_log(part, 1, u64::MAX, 100, 1 << 20).await.unwrap();
    assert_eq!(page.len(), 100);
    let offsets: Vec<u64> = page.iter().map(|e| e.offset).collect();
    assert_eq!(offsets, (2..102).collect::<Vec<_>>());
    // At least one entry, however small the bound; `upto` is respected.
    assert_eq!(s.read_log(part, 1, u64::MAX, 1000, 1).await.unwrap().len(), 1);
    assert_eq!(s.read_log(part, 1, 5, 1000, 1 << 20).await.unwrap().len(), 4);
}

async fn one_refused_item_never_fails_the_others(db: &Db) {
    let s = &db.store;
    s.create_conversation(conv("c", &["a", "b"], None)).await.unwrap();
    // PostgreSQL cannot keep U+0000 in a text (the API refuses it before it gets here; a
    // store must still not let one such item fail its batch).
    let batch: Vec<SendItem> = (0..7)
        .map(|i| item("c", if i % 2 == 0 { "a" } else { "b" }, if i == 3 { "bad\u{0}nul" } else { "fine" }, None))
        .collect();
    let (results, entries) = s.send_batch(&batch).await.unwrap();
    assert_eq!(results.len(), 7);
    let stored: Vec<u64> = results.iter().filter_map(|r| r.as_ref().ok().map(|m| m.msg_id)).collect();
    match db.pg {
        Some(_) => {
            assert!(results[3].is_err(), "the refused item fails alone");
            assert_eq!(stored, (2..=7).collect::<Vec<_>>(), "the others are stored, in order, gap-free");
        }
        None => assert_eq!(stored, (2..=8).collect::<Vec<_>>()),
    }
    assert_eq!(entries.len(), stored.len());
}

async fn expired_keys_and_old_messages_are_pruned(db: &Db) {
    let s = &db.store;
    s.create_conversation(conv("c", &["a"], None)).await.unwrap();
    let (r, _) = s.send_batch(&[item("c", "a", "first", Some("k1"))]).await.unwrap();
    assert_eq!(r[0].as_ref().unwrap().msg_id, 2);
    // Within the key's life a retry answers the stored message; once it expired, it stores again.
    assert_eq!(s.prune_keys(quickim_shared::time::now_ms() - 60_000, 100).await.unwrap(), 0);
    let (r, _) = s.send_batch(&[item("c", "a", "first", Some("k1"))]).await.unwrap();
    assert_eq!(r[0].as_ref().unwrap().msg_id, 2);
    assert_eq!(s.prune_keys(quickim_shared::time::now_ms() + 1, 100).await.unwrap(), 1);
    let (r, _) = s.send_batch(&[item("c", "a", "first", Some("k1"))]).await.unwrap();
    assert_eq!(r[0].as_ref().unwrap().msg_id, 3, "stored again");
    for i in 0..5 {
        send(s, "c", "a", &format!("m{i}")).await;
    }
    // Messages up to a horizon (the heads of the retention period ago) go, in batches; the
    // conversation goes on counting.
    let horizon = s.heads().await.unwrap().heads;
    let part = horizon.iter().position(|h| *h > 0).unwrap();
    let mut cut = vec![0; horizon.len()];
    cut[part] = horizon[part] - 2;
    assert_eq!(s.prune_messages(&cut, 3).await.unwrap(), 3);
    assert_eq!(s.prune_messages(&cut, 3).await.unwrap(), 3);
    assert_eq!(s.prune_messages(&cut, 3).await.unwrap(), 0);
    let h = s.history("c", "a", HistoryQuery::Last, false, 100, 1 << 20).await.unwrap();
    assert_eq!(h.iter().map(|m| m.msg_id).collect::<Vec<_>>(), vec![7, 8]);
    assert_eq!(send(s, "c", "a", "after").await, 9);
}

async fn membership_and_revocation_pages(db: &Db) {
    let s = &db.store;
    for i in 0..25 {
        s.create_conversation(conv(&format!("m{i:02}"), &["u"], None)).await.unwrap();
    }
    // Pages of 10 in conversation_id order, each with the heads of its snapshot.
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = s.memberships("u", after.as_deref(), 10).await.unwrap();
        assert_eq!(page.heads.len(), 4);
        assert!(page.conversations.len() <= 10);
        seen.extend(page.conversations.iter().map(|r| r.conversation_id.clone()));
        after = page.conversations.last().map(|r| r.conversation_id.clone());
        if !page.more {
            break;
        }
    }
    assert_eq!(seen, (0..25).map(|i| format!("m{i:02}")).collect::<Vec<_>>());

    for i in 0..7 {
        s.revoke(&format!("user{i}"), if i % 2 == 0 { Some("web") } else { None }, 1_000 + (i % 3)).await.unwrap();
    }
    s.revoke("user0", Some("ios"), 1_000).await.unwrap();
    let mut all = Vec::new();
    let mut after = None;
    loop {
        let page = s.revocations(1_000, after.as_ref(), 3).await.unwrap();
        assert!(page.revocations.len() <= 3);
        after = page.revocations.last().cloned();
        all.extend(page.revocations);
        if !page.more {
            break;
        }
    }
    assert_eq!(all.len(), 8, "{all:?}");
    let keys: Vec<(i64, String, String)> =
        all.iter().map(|r| (r.before_ms, r.user_id.clone(), r.platform.clone().unwrap_or_default())).collect();
    let mut sorted = keys.clone();
    sorted.sort();
    assert_eq!(keys, sorted, "in (before_ms, user_id, platform) order");
    // Only the newer ones.
    assert_eq!(s.revocations(1_002, None, 100).await.unwrap().revocations.len(), 2);
}

async fn concurrent_senders_stay_gap_free(db: &Db) {
    let s = &db.store;
    let other = db.another_instance().await;
    s.create_conversation(conv("hot", &["a", "b"], None)).await.unwrap();
    s.create_conversation(conv("warm", &["a", "b"], None)).await.unwrap();
    let mut tasks = Vec::new();
    for w in 0..8 {
        let store = if w % 2 == 0 { s.clone() } else { other.clone() };
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for i in 0..25 {
                let batch: Vec<SendItem> = (0..4)
                    .map(|j| {
                        item(
                            if (i + j) % 3 == 0 { "warm" } else { "hot" },
                            if j % 2 == 0 { "a" } else { "b" },
                            "x",
                            None,
                        )
                    })
                    .collect();
                let (r, _) = store.send_batch(&batch).await.unwrap();
                ids.extend(r.into_iter().map(|m| {
                    let m = m.unwrap();
                    (m.conversation_id, m.msg_id)
                }));
            }
            ids
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    assert_eq!(all.len(), 800);
    for c in ["hot", "warm"] {
        let mut ids: Vec<u64> = all.iter().filter(|(cc, _)| cc == c).map(|(_, id)| *id).collect();
        ids.sort_unstable();
        let n = ids.len() as u64;
        assert_eq!(ids, (2..2 + n).collect::<Vec<_>>(), "msg_ids of {c} are gap-free and unique");
    }
    let heads = s.heads().await.unwrap();
    for part in 0..4u16 {
        let entries = s.read_log(part, 0, u64::MAX, 10_000, usize::MAX).await.unwrap();
        assert_eq!(entries.len() as u64, heads.heads[usize::from(part)]);
        assert!(entries.iter().enumerate().all(|(i, e)| e.offset == i as u64 + 1));
    }
    other.close().await;
}

async fn concurrent_retries_store_once(db: &Db) {
    let s = &db.store;
    let other = db.another_instance().await;
    s.create_conversation(conv("c", &["a"], None)).await.unwrap();
    let mut tasks = Vec::new();
    for w in 0..16 {
        let store = if w % 2 == 0 { s.clone() } else { other.clone() };
        tasks.push(tokio::spawn(async move {
            let (mut r, _) = store.send_batch(&[item("c", "a", "once", Some("retry-me"))]).await.unwrap();
            r.remove(0).unwrap()
        }));
    }
    let mut got = Vec::new();
    for t in tasks {
        got.push(t.await.unwrap());
    }
    assert!(got.iter().all(|m| *m == got[0]), "every retry answers the same message");
    assert_eq!(s.last_msg_id("c", "a").await.unwrap(), 2, "stored once");
    other.close().await;
}

/// Batches in different conversations that each hold a new key of their own and one key
/// they all use: the batches that lose the shared key to another (still open) transaction
/// run again without it, and their own keys, claimed in the lost attempt, must not stay
/// claimed by it (each own-keyed message is stored, and answered the same on a retry).
async fn keys_lost_to_a_concurrent_batch_leave_the_others_usable(db: &Db) {
    let s = &db.store;
    let other = db.another_instance().await;
    const BATCHES: usize = 24;
    for w in 0..BATCHES {
        s.create_conversation(conv(&format!("c{w}"), &["a"], None)).await.unwrap();
    }
    let mut tasks = Vec::new();
    for w in 0..BATCHES {
        let store = if w % 2 == 0 { s.clone() } else { other.clone() };
        tasks.push(tokio::spawn(async move {
            // "k-<w>" sorts before "k-shared": each batch claims its own key first.
            let (c, own) = (format!("c{w}"), format!("k-{w:02}"));
            let items = [item(&c, "a", "own", Some(&own)), item(&c, "a", "shared", Some("k-shared"))];
            let (mut r, _) = store.send_batch(&items).await.unwrap();
            let shared = r.pop().unwrap();
            (w, r.pop().unwrap(), shared)
        }));
    }
    let mut winners = 0;
    for t in tasks {
        let (w, mine, shared) = t.await.unwrap();
        let mine = mine.unwrap_or_else(|e| panic!("k-{w:02} refused: {e:?}"));
        match shared {
            Ok(_) => winners += 1,
            Err(e) => assert_eq!(e.code, ErrorCode::Conflict),
        }
        let (mut again, _) =
            s.send_batch(&[item(&format!("c{w}"), "a", "own", Some(&format!("k-{w:02}")))]).await.unwrap();
        assert_eq!(again.remove(0).unwrap(), mine, "a retry of k-{w:02} answers its message");
    }
    assert_eq!(winners, 1, "one conversation holds the shared key's message");
    other.close().await;
}

async fn retention_horizon_forces_resync(db: &Db) {
    let s = &db.store;
    s.create_conversation(conv("c", &["u", "x"], None)).await.unwrap();
    let old = s.heads().await.unwrap().heads;
    send(s, "c", "x", "1").await;
    // A checkpoint taken now counts as old for a zero retention window.
    s.record_checkpoint(86_400_000).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    send(s, "c", "x", "2").await;
    let upto = s.heads().await.unwrap().heads;
    let page = s.replay("u", &old, &upto, 100, 1 << 20, 1).await.unwrap();
    assert!(page.expired && page.entries.is_empty(), "a cursor behind the horizon gets resync");
    let page = s.replay("u", &old, &upto, 100, 1 << 20, 86_400_000).await.unwrap();
    assert!(!page.expired);
    assert_eq!(page.entries.len(), 2);
    assert!(s.horizon(1).await.unwrap().is_some());
}

async fn summary(s: &Store, user: &str, conversation: &str) -> ConversationSummary {
    let list = s.list_joined(user, None, 100, None, 1 << 20).await.unwrap();
    list.conversations.into_iter().find(|c| c.conversation_id == conversation).unwrap()
}

async fn read_and_unread(s: &Store, user: &str, conversation: &str) -> (u64, u64) {
    let c = summary(s, user, conversation).await;
    (c.read_msg_id, c.unread)
}

async fn unread_counts_what_others_send(db: &Db) {
    let s = &db.store;
    s.create_conversation(conv("u", &["a", "b"], None)).await.unwrap(); // 1
    send(s, "u", "a", "x").await; // 2
    send(s, "u", "a", "y").await; // 3
    for _ in 0..3 {
        send(s, "u", "b", "z").await; // 4, 5, 6
    }
    let mut notice = item("u", "", "a quiet notice", None);
    (notice.origin, notice.count_unread) = (Origin::Inner, false);
    s.send_batch(&[notice]).await.unwrap().0.remove(0).unwrap(); // 7
    s.join("u", &users(&["c"]), false, 1000).await.unwrap(); // 8, a system message
    assert_eq!(read_and_unread(s, "a", "u").await, (3, 3), "a's own sends moved its read position");
    assert_eq!(read_and_unread(s, "b", "u").await, (6, 0));
    assert_eq!(read_and_unread(s, "c", "u").await, (8, 0), "a new member starts at its join");
    let nine = send(s, "u", "a", "last").await;
    assert_eq!(read_and_unread(s, "a", "u").await, (9, 0));
    assert_eq!(read_and_unread(s, "b", "u").await, (6, 1));
    assert_eq!(read_and_unread(s, "c", "u").await, (8, 1));
    let listed = summary(s, "c", "u").await;
    assert_eq!(listed.last_msg.map(|m| (m.msg_id, m.content)), Some((nine, "last".to_string())));
    let m = s.mark_read("u", "b", 9).await.unwrap();
    assert_eq!((m.read_msg_id, m.unread, m.moved, m.receipts), (9, 0, true, true));
}

async fn listed_system_types_count_as_unread(db: &Db) {
    let s = &db.store;
    s.set_unread_rule(UnreadRule::new(vec![system::JOINED]));
    s.create_conversation(conv("u", &["a"], None)).await.unwrap(); // 1
    send(s, "u", "a", "x").await; // 2
    s.join("u", &users(&["b"]), false, 1000).await.unwrap(); // 3, counted
    assert_eq!(read_and_unread(s, "a", "u").await, (2, 1), "the join counts for those already in");
    assert_eq!(read_and_unread(s, "b", "u").await, (3, 0), "not for the one who joined");
}

async fn revisions_rewrite_in_place_and_recall_erases(db: &Db) {
    let s = &db.store;
    s.create_conversation(conv("r", &["a", "b"], None)).await.unwrap(); // 1
    let m = send(s, "r", "a", "secret one").await; // 2
    let rev = |action: Action, content: Option<&str>, by: &str| Revision {
        origin: if by.is_empty() { Origin::Inner } else { Origin::Client },
        by: by.to_string(),
        conversation_id: "r".into(),
        msg_id: m,
        action,
        content: content.map(str::to_string),
        window_ms: 0,
    };
    let (edited, entries) = s.revise(rev(Action::Edit, Some("secret two"), "a")).await.unwrap();
    assert_eq!((edited.msg_id, edited.content.as_str()), (m, "secret two"));
    assert!(edited.edited_at.is_some());
    assert_eq!(entries.len(), 1);
    assert_eq!((entries[0].message.msg_id, entries[0].message.msg_type), (m + 1, system::REVISED));
    let part = entries[0].part;
    let err = s.revise(rev(Action::Edit, Some("not mine"), "b")).await.unwrap_err();
    assert_eq!(quickim_shared::error::ServiceError::from(err).code, ErrorCode::NotSender);
    let (_, entries) = s.revise(rev(Action::Edit, Some("secret three"), "")).await.unwrap();
    assert_eq!(entries[0].message.msg_id, m + 2, "the business system may edit anyone's");
    let versions = s.versions("r", Some("b"), m, None, 1 << 20).await.unwrap().versions;
    let contents: Vec<_> = versions.iter().map(|v| v.content.as_str()).collect();
    assert_eq!(contents, vec!["secret one", "secret two", "secret three"]);
    assert_eq!(read_and_unread(s, "b", "r").await, (1, 1), "revisions do not count as unread");

    let (recalled, entries) = s.revise(rev(Action::Recall, None, "a")).await.unwrap();
    assert!(recalled.recalled && recalled.content.is_empty(), "{recalled:?}");
    assert_eq!(entries[0].message.msg_id, m + 3);
    let (again, entries) = s.revise(rev(Action::Recall, None, "a")).await.unwrap();
    assert_eq!((again, entries.len()), (recalled.clone(), 0), "a repeated recall changes nothing");
    let err = s.revise(rev(Action::Edit, Some("back"), "")).await.unwrap_err();
    assert_eq!(quickim_shared::error::ServiceError::from(err).code, ErrorCode::MessageGone);

    // Gone from every read: history, the log (gap fill, replay), versions.
    let history = s.history("r", "b", HistoryQuery::Range { start: 1, end: 100 }, false, 100, 1 << 20).await.unwrap();
    let log = s.read_log(part, 0, 1_000_000, 100, 1 << 20).await.unwrap();
    let text = format!("{history:?} {log:?}");
    assert!(!text.contains("secret"), "recalled content is still stored: {text}");
    assert_eq!(history.iter().map(|m| m.msg_id).collect::<Vec<_>>(), (1..=5).collect::<Vec<_>>(), "gap-free");
    assert!(s.versions("r", Some("b"), m, None, 1 << 20).await.unwrap().versions.is_empty());
    let listed = summary(s, "b", "r").await;
    assert_eq!(
        listed.last_msg.map(|m| (m.msg_id, m.recalled)),
        Some((m, true)),
        "a revision is never the last message"
    );

    // Delete: a tombstone, for the sender at any time.
    let d = send(s, "r", "b", "bye").await;
    let (deleted, _) =
        s.revise(Revision { msg_id: d, by: "b".into(), ..rev(Action::Delete, None, "b") }).await.unwrap();
    assert!(deleted.deleted && deleted.content.is_empty(), "{deleted:?}");
}

async fn receipts_since_a_time_and_presence_records(db: &Db) {
    let s = &db.store;
    s.create_conversation(conv("r1", &["a", "b"], None)).await.unwrap();
    s.create_conversation(NewConversation { receipts: false, ..conv("quiet", &["a", "b"], None) }).await.unwrap();
    s.create_conversation(NewConversation { presence: true, ..conv("p", &["a", "c"], None) }).await.unwrap();
    for c in ["r1", "quiet"] {
        send(s, c, "a", "x").await;
        send(s, c, "a", "y").await;
    }
    let before = quickim_shared::time::now_ms();
    assert!(!s.mark_read("quiet", "b", 3).await.unwrap().receipts);
    s.mark_read("r1", "b", 2).await.unwrap();
    s.mark_read("r1", "b", 3).await.unwrap();
    let page = s.receipts_since("a", before, None, 100, 1 << 20).await.unwrap();
    let got: Vec<_> =
        page.receipts.iter().map(|r| (r.conversation_id.as_str(), r.user_id.as_str(), r.read_msg_id)).collect();
    assert_eq!(got, vec![("r1", "b", 3)], "the latest, and none where receipts are off");
    assert!(
        s.receipts_since("a", quickim_shared::time::now_ms() + 1000, None, 100, 1 << 20)
            .await
            .unwrap()
            .receipts
            .is_empty()
    );
    let page = s.receipts_since("b", before, None, 100, 1 << 20).await.unwrap();
    assert_eq!(page.receipts.len(), 1, "the reader's own, for its other devices");

    // Presence: the user's conversations with it on; last_seen only moves forward.
    let page = s.presence_conversations("a", None, 10, 1 << 20).await.unwrap();
    assert_eq!((page.conversation_ids, page.more), (vec!["p".to_string()], false));
    assert!(s.presence_conversations("b", None, 10, 1 << 20).await.unwrap().conversation_ids.is_empty());
    s.record_seen("c", true, 1_500).await.unwrap();
    s.record_seen("c", false, 2_000).await.unwrap();
    s.record_seen("c", false, 1_000).await.unwrap();
    assert_eq!(s.presence_since(1, 10).await.unwrap(), vec![("c".to_string(), false, 2_000)]);
    s.record_seen("d", true, 3_000).await.unwrap();
    assert_eq!(s.presence_since(2_500, 10).await.unwrap(), vec![("d".to_string(), true, 3_000)]);
    assert_eq!(s.last_seen(&users(&["c", "z"])).await.unwrap(), vec![("c".to_string(), 2_000)]);
    let detail = s.detail("p", "a", None, 10, 1 << 20).await.unwrap();
    let c = detail.members.iter().find(|m| m.user_id == "c").unwrap();
    assert_eq!((c.last_seen, detail.presence, detail.receipts), (Some(2_000), true, true));
}
