//! The storage contract (`store::Backend`), written once and run against
//! every backend: SQLite always, PostgreSQL when `TOKENKEEPER_TEST_PG_URL`
//! names a cluster (see `tests/common/postgres.rs`; CI always does).
//! Each test gets a store of its own (a temp file, a fresh database).

mod common;

use chrono::{Duration, Utc};
use secrecy::{ExposeSecret, SecretString};
use tokenkeeper::crypto::SealKey;
use tokenkeeper::store::{
    Before, BeginRefresh, CommitOutcome, ConnState, EventKind, EventQuery, Fingerprint, GrantMeta,
    LeaseSeen, Location, NewEvent, NewGrant, PendingAuthorization, PendingTake, Store, StoreError,
    TokenKind, FINGERPRINTS_KEPT,
};

#[derive(Clone, Copy, Debug)]
enum Kind {
    Sqlite,
    Postgres,
}

/// A store of one backend, and what keeps it alive.
struct Fixture {
    store: Store,
    location: Location,
    _dir: tempfile::TempDir,
}

impl Fixture {
    async fn new(kind: Kind, test: &str, key: Option<SealKey>) -> Option<Fixture> {
        let dir = tempfile::tempdir().unwrap();
        let location = match kind {
            Kind::Sqlite => Location::Sqlite(dir.path().join("t.db")),
            Kind::Postgres => Location::Postgres(SecretString::from(
                common::postgres::fresh_database(test).await?,
            )),
        };
        let store = Store::open_at(&location, key).await.expect("store opens");
        Some(Fixture {
            store,
            location,
            _dir: dir,
        })
    }

    /// Runs raw SQL (the same text in both dialects): what no method
    /// writes, such as damage.
    async fn raw(&self, sql: &str) {
        match &self.location {
            Location::Sqlite(p) => {
                let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", p.display()))
                    .await
                    .unwrap();
                sqlx::query(sql).execute(&pool).await.unwrap();
                pool.close().await;
            }
            Location::Postgres(url) => {
                let pool = sqlx::PgPool::connect(url.expose_secret()).await.unwrap();
                sqlx::query(sql).execute(&pool).await.unwrap();
                pool.close().await;
            }
        }
    }
}

fn key(n: u8) -> SealKey {
    SealKey::from_bytes([n; 32])
}

fn fp(kind: TokenKind, n: u8) -> Fingerprint {
    Fingerprint {
        kind,
        digest: [n; 32],
    }
}

/// Stores a browser authorization of keap/default whose tokens are
/// `access-{n}` and `refresh-{n}`; returns `(id, generation)`.
async fn authorize(store: &Store, n: &str) -> (i64, i64) {
    let access = SecretString::from(format!("access-{n}"));
    let refresh = SecretString::from(format!("refresh-{n}"));
    let (row, _) = store
        .save_authorized("keap", "default", &grant(&access, &refresh), &[], &[])
        .await
        .unwrap();
    (row.id, row.generation)
}

async fn begin(store: &Store, id: i64, owner: &str, attempt: &str) -> BeginRefresh {
    begin_seen(store, id, owner, attempt, None).await
}

/// Takes the lease on `id` for `owner`'s `attempt`, which must succeed.
async fn leased(
    store: &Store,
    id: i64,
    owner: &str,
    attempt: &str,
) -> Box<tokenkeeper::store::ConnectionRow> {
    let BeginRefresh::Started(row) = begin(store, id, owner, attempt).await else {
        panic!("{owner} takes the lease for {attempt}");
    };
    row
}

async fn begin_seen(
    store: &Store,
    id: i64,
    owner: &str,
    attempt: &str,
    takeover: Option<&LeaseSeen>,
) -> BeginRefresh {
    let now = Utc::now();
    store
        .begin_refresh(
            id,
            owner,
            attempt,
            now,
            now + Duration::seconds(30),
            takeover,
        )
        .await
        .unwrap()
}

/// `asker` asks for a lease someone else holds: refused; returns the
/// holder as seen then (for a takeover), `why` being the panic otherwise.
async fn busy_as_seen(
    store: &Store,
    id: i64,
    (owner, attempt): (&str, &str),
    why: &str,
) -> LeaseSeen {
    let BeginRefresh::Busy {
        owner,
        attempt,
        until,
    } = begin(store, id, owner, attempt).await
    else {
        panic!("{why}");
    };
    LeaseSeen {
        owner,
        attempt,
        until_ms: Some(until.timestamp_millis()),
    }
}

async fn commit(
    store: &Store,
    id: i64,
    (owner, attempt): (&str, &str),
    base: i64,
    n: &str,
    rotate: bool,
) -> CommitOutcome {
    let access = SecretString::from(format!("access-{n}"));
    let refresh = SecretString::from(format!("refresh-{n}"));
    store
        .commit_refresh(
            id,
            ("keap", "default"),
            owner,
            attempt,
            base,
            &NewGrant {
                refresh_token: rotate.then_some(&refresh),
                ..grant(&access, &refresh)
            },
            &[fp(TokenKind::Access, 7)],
            &[],
        )
        .await
        .unwrap()
}

async fn a_lease_refuses_a_second_owner_until_taken_over_as_seen(kind: Kind) {
    let Some(f) = Fixture::new(kind, "lease_exclusive", None).await else {
        return;
    };
    let (id, _) = authorize(&f.store, "1").await;
    let BeginRefresh::Started(row) = begin(&f.store, id, "a", "a1").await else {
        panic!("a free lease is taken");
    };
    assert_eq!(row.state, ConnState::Refreshing);
    assert_eq!(row.lease_owner.as_deref(), Some("a"));
    // The journal: "refresh started" is stored with the lease.
    assert!(row.attempt_started_at.is_some());
    assert_eq!(row.attempt_id.as_deref(), Some("a1"));

    let seen = busy_as_seen(
        &f.store,
        id,
        ("b", "b1"),
        "a held lease refuses another owner",
    )
    .await;
    assert_eq!(
        (seen.owner.as_str(), seen.attempt.as_deref()),
        ("a", Some("a1"))
    );

    // The holder renews: what B saw is no longer what is stored.
    let later = Utc::now() + Duration::seconds(60);
    assert!(f.store.renew_lease(id, "a", "a1", later).await.unwrap());
    assert!(matches!(
        begin_seen(&f.store, id, "b", "b1", Some(&seen)).await,
        BeginRefresh::Busy { .. }
    ));

    // Seen again, as stored now (the engine judged it lapsed): taken over,
    // and the unfinished attempt is recorded as interrupted.
    let seen = busy_as_seen(&f.store, id, ("b", "b1"), "still held").await;
    let BeginRefresh::Started(row) = begin_seen(&f.store, id, "b", "b1", Some(&seen)).await else {
        panic!("a lease seen exactly as stored is taken over");
    };
    assert_eq!(row.lease_owner.as_deref(), Some("b"));
    assert!(row.interrupted_at.is_some());
    // The old holder can no longer renew, finish or reject.
    assert!(!f.store.renew_lease(id, "a", "a1", later).await.unwrap());
    assert!(f
        .store
        .finish_attempt(id, "a", "a1", ConnState::Active, None, 0, None)
        .await
        .unwrap()
        .is_none());
    // The holder itself may begin again (same owner).
    assert!(matches!(
        begin(&f.store, id, "b", "b2").await,
        BeginRefresh::Started(_)
    ));
    assert!(matches!(
        begin(&f.store, id + 1000, "b", "b3").await,
        BeginRefresh::Gone
    ));
}

async fn concurrent_takers_get_exactly_one_lease(kind: Kind) {
    let Some(f) = Fixture::new(kind, "lease_race", None).await else {
        return;
    };
    let (id, _) = authorize(&f.store, "1").await;
    let mut tasks = Vec::new();
    for i in 0..8 {
        let store = f.store.clone();
        tasks.push(tokio::spawn(async move {
            let owner = format!("owner-{i}");
            matches!(
                begin(&store, id, &owner, "x").await,
                BeginRefresh::Started(_)
            )
        }));
    }
    let mut started = 0;
    for t in tasks {
        started += usize::from(t.await.unwrap());
    }
    assert_eq!(
        started, 1,
        "exactly one of eight racing owners holds the lease"
    );
}

async fn a_commit_lands_only_at_the_generation_read_and_ends_the_lease(kind: Kind) {
    let Some(f) = Fixture::new(kind, "commit_cas", Some(key(1))).await else {
        return;
    };
    let (id, generation) = authorize(&f.store, "1").await;
    let read = leased(&f.store, id, "a", "a1").await;
    assert_eq!(read.generation, generation);
    let CommitOutcome::Committed { row, kept_lease } =
        commit(&f.store, id, ("a", "a1"), generation, "2", true).await
    else {
        panic!("a commit at the generation read lands");
    };
    assert!(kept_lease);
    assert_eq!(row.generation, generation + 1);
    assert_eq!(row.state, ConnState::Active);
    assert!(row.lease_owner.is_none() && row.attempt_id.is_none());
    assert_eq!(row.access_token.expose_secret(), "access-2");
    assert_eq!(row.refresh_token.unwrap().expose_secret(), "refresh-2");

    // A second commit over the same base generation is superseded.
    let CommitOutcome::Superseded(Some(current)) =
        commit(&f.store, id, ("a", "a1"), generation, "3", true).await
    else {
        panic!("a commit over a moved generation is refused");
    };
    assert_eq!(current.access_token.expose_secret(), "access-2");

    // Without a new refresh token the stored one is kept, and (sealed) it
    // opens at the new generation.
    let read = leased(&f.store, id, "a", "a2").await;
    let CommitOutcome::Committed { row, .. } =
        commit(&f.store, id, ("a", "a2"), read.generation, "4", false).await
    else {
        panic!("commit");
    };
    assert_eq!(row.access_token.expose_secret(), "access-4");
    assert_eq!(row.refresh_token.unwrap().expose_secret(), "refresh-2");
    let again = f.store.load_connection(id).await.unwrap().unwrap();
    assert!(again.unreadable.is_none());
    assert_eq!(again.refresh_token.unwrap().expose_secret(), "refresh-2");
}

async fn a_refresh_superseded_by_a_new_authorization_writes_nothing(kind: Kind) {
    let Some(f) = Fixture::new(kind, "superseded", None).await else {
        return;
    };
    let (id, generation) = authorize(&f.store, "1").await;
    assert!(matches!(
        begin(&f.store, id, "a", "a1").await,
        BeginRefresh::Started(_)
    ));
    // A re-authorization lands while the refresh is out.
    authorize(&f.store, "new").await;
    let CommitOutcome::Superseded(Some(current)) =
        commit(&f.store, id, ("a", "a1"), generation, "2", true).await
    else {
        panic!("the refresh's result loses to the newer grant");
    };
    assert_eq!(current.access_token.expose_secret(), "access-new");
    assert!(current.lease_owner.is_none(), "the lease was released");
    // A rejection of the spent token does not park the new grant either.
    assert!(matches!(
        begin(&f.store, id, "a", "a2").await,
        BeginRefresh::Started(_)
    ));
    assert!(f
        .store
        .reject_attempt(id, ("a", "a2"), generation, "rejected", 1, &[])
        .await
        .unwrap()
        .is_none());
    let now = f.store.load_connection(id).await.unwrap().unwrap();
    assert_eq!(now.state, ConnState::Active);
    assert!(now.lease_owner.is_none());
}

/// The conditional store of an import: it lands on no row or a dead one,
/// and never over a working grant stored meanwhile (the compare is in the
/// storing transaction).
async fn a_conditional_authorization_never_overwrites_a_working_grant(kind: Kind) {
    let Some(f) = Fixture::new(kind, "conditional_authorization", None).await else {
        return;
    };
    let access = SecretString::from("access-imported".to_string());
    let refresh = SecretString::from("refresh-imported".to_string());
    let imported = grant(&access, &refresh);
    let store = |account: &'static str| {
        let (f, grant) = (&f, &imported);
        async move {
            f.store
                .save_authorized_if_no_working_grant("keap", account, grant, &[], &[])
                .await
        }
    };
    // No row: it lands.
    let (row, _) = store("fresh").await.unwrap();
    assert_eq!(row.access_token.expose_secret(), "access-imported");
    // A working grant stored meanwhile: nothing written.
    let (id, generation) = authorize(&f.store, "1").await;
    let Err(StoreError::WorkingGrantExists { provider, account }) = store("default").await else {
        panic!("a working grant is never overwritten");
    };
    assert_eq!((provider.as_str(), account.as_str()), ("keap", "default"));
    let kept = f.store.load_connection(id).await.unwrap().unwrap();
    assert_eq!(kept.generation, generation);
    assert_eq!(kept.access_token.expose_secret(), "access-1");
    // A dead grant is replaced.
    f.raw("UPDATE connections SET state = 'authorization_required' WHERE account = 'default'")
        .await;
    let (row, replaced) = store("default").await.unwrap();
    assert_eq!(row.access_token.expose_secret(), "access-imported");
    assert_eq!(replaced.unwrap().expose_secret(), "refresh-1");
}

async fn a_stalled_holder_still_lands_a_rotation_nobody_else_stored(kind: Kind) {
    let Some(f) = Fixture::new(kind, "stalled_commit", None).await else {
        return;
    };
    let (id, generation) = authorize(&f.store, "1").await;
    leased(&f.store, id, "a", "a1").await;
    let seen = busy_as_seen(&f.store, id, ("b", "b1"), "busy").await;
    assert!(matches!(
        begin_seen(&f.store, id, "b", "b1", Some(&seen)).await,
        BeginRefresh::Started(_)
    ));
    // A's provider call already rotated: its pair is the only one that
    // works, so it is stored; B keeps its lease.
    let CommitOutcome::Committed { row, kept_lease } =
        commit(&f.store, id, ("a", "a1"), generation, "2", true).await
    else {
        panic!("the only working pair is stored");
    };
    assert!(!kept_lease);
    assert_eq!(row.lease_owner.as_deref(), Some("b"));
    assert_eq!(row.generation, generation + 1);
}

async fn fingerprints_are_kept_in_order_and_bounded(kind: Kind) {
    let Some(f) = Fixture::new(kind, "fingerprints", None).await else {
        return;
    };
    let key_a = f.store.fingerprint_key().await.unwrap();
    assert_eq!(
        key_a,
        f.store.fingerprint_key().await.unwrap(),
        "created once"
    );
    let (id, mut generation) = authorize(&f.store, "1").await;
    let total = FINGERPRINTS_KEPT as usize + 3;
    for n in 0..total {
        leased(&f.store, id, "a", &format!("a{n}")).await;
        let access = SecretString::from("a".to_string());
        let CommitOutcome::Committed { row, .. } = f
            .store
            .commit_refresh(
                id,
                ("keap", "default"),
                "a",
                &format!("a{n}"),
                generation,
                &NewGrant {
                    refresh_token: None,
                    ..grant(&access, &access)
                },
                &[fp(TokenKind::Refresh, n as u8)],
                &[],
            )
            .await
            .unwrap()
        else {
            panic!("commit");
        };
        generation = row.generation;
    }
    let kept = f.store.fingerprints_of(id).await.unwrap();
    assert_eq!(kept.len(), FINGERPRINTS_KEPT as usize);
    assert_eq!(
        kept[0],
        fp(TokenKind::Refresh, 3),
        "the oldest were dropped"
    );
    assert_eq!(
        kept.last().copied(),
        Some(fp(TokenKind::Refresh, (total - 1) as u8))
    );
    let mut all = Vec::new();
    f.store
        .each_fingerprint(|c, fp| all.push((c, fp)))
        .await
        .unwrap();
    assert_eq!(all.len(), kept.len());
    // Forgetting the connection (at its generation) forgets its fingerprints.
    assert!(!f
        .store
        .delete_connection_at(id, generation - 1, &[])
        .await
        .unwrap());
    assert!(f
        .store
        .delete_connection_at(id, generation, &[])
        .await
        .unwrap());
    assert!(f.store.load_connection(id).await.unwrap().is_none());
    assert!(f.store.fingerprints_of(id).await.unwrap().is_empty());
    assert!(!f
        .store
        .delete_connection_at(id, generation, &[])
        .await
        .unwrap());
}

async fn a_pending_authorization_is_taken_once_by_its_browser(kind: Kind) {
    let Some(f) = Fixture::new(kind, "pending", Some(key(2))).await else {
        return;
    };
    let now = Utc::now();
    let pending = |state: &str, expires_in: i64| PendingAuthorization {
        state: state.into(),
        provider: "keap".into(),
        account: "default".into(),
        pkce_verifier: Some(SecretString::from("verifier-1".to_string())),
        redirect_uri: "http://127.0.0.1/callback".into(),
        browser_hash: "browser-a".into(),
        created_at: now,
        expires_at: now + Duration::seconds(expires_in),
    };
    f.store.insert_pending(&pending("s1", 600)).await.unwrap();
    f.store.insert_pending(&pending("old", -1)).await.unwrap();
    assert!(matches!(
        f.store
            .take_pending_for_browser("s1", "browser-b", now)
            .await
            .unwrap(),
        PendingTake::OtherBrowser
    ));
    let PendingTake::Taken(p) = f
        .store
        .take_pending_for_browser("s1", "browser-a", now)
        .await
        .unwrap()
    else {
        panic!("the right browser takes it");
    };
    assert_eq!(p.pkce_verifier.unwrap().expose_secret(), "verifier-1");
    assert!(matches!(
        f.store
            .take_pending_for_browser("s1", "browser-a", now)
            .await
            .unwrap(),
        PendingTake::Unknown
    ));
    assert!(
        f.store.take_pending("old", now).await.unwrap().is_none(),
        "expired ones are purged"
    );
    // Racing takers: one wins.
    f.store.insert_pending(&pending("s2", 600)).await.unwrap();
    let (a, b) = tokio::join!(
        f.store.take_pending("s2", now),
        f.store.take_pending("s2", now)
    );
    assert_eq!(
        usize::from(a.unwrap().is_some()) + usize::from(b.unwrap().is_some()),
        1
    );
}

async fn expired_pending_authorizations_are_purged_and_live_ones_kept(kind: Kind) {
    let Some(f) = Fixture::new(kind, "purge_pending", None).await else {
        return;
    };
    let now = Utc::now();
    let pending = |state: &str, expires_in: i64| PendingAuthorization {
        state: state.into(),
        provider: "keap".into(),
        account: "default".into(),
        pkce_verifier: None,
        redirect_uri: "http://127.0.0.1/callback".into(),
        browser_hash: "browser-a".into(),
        created_at: now,
        expires_at: now + Duration::seconds(expires_in),
    };
    for (state, expires_in) in [("old-1", -60), ("old-2", -1), ("live", 600)] {
        f.store
            .insert_pending(&pending(state, expires_in))
            .await
            .unwrap();
    }
    assert_eq!(f.store.purge_expired_pending(now).await.unwrap(), 2);
    assert_eq!(f.store.purge_expired_pending(now).await.unwrap(), 0);
    assert!(
        f.store.take_pending("live", now).await.unwrap().is_some(),
        "a live authorization survives the purge"
    );
}

async fn sealed_values_are_bound_to_their_place_and_key(kind: Kind) {
    let Some(f) = Fixture::new(kind, "sealing", Some(key(3))).await else {
        return;
    };
    let (id, _) = authorize(&f.store, "1").await;
    f.raw("UPDATE connections SET access_token = refresh_token, refresh_token = access_token")
        .await;
    let got = f.store.load_connection(id).await.unwrap().unwrap();
    assert_eq!(got.state, ConnState::AuthorizationRequired);
    assert!(got.access_token.expose_secret().is_empty());
    assert!(got.unreadable.unwrap().contains("does not decrypt"));
    // The lifecycle does not lease it.
    assert!(matches!(
        begin(&f.store, id, "a", "a1").await,
        BeginRefresh::Unreadable(_)
    ));
    f.raw("UPDATE connections SET access_token = refresh_token, refresh_token = access_token")
        .await;
    let got = f.store.load_connection(id).await.unwrap().unwrap();
    assert_eq!(got.access_token.expose_secret(), "access-1");
    f.store.close().await;

    // Another key, or none, refuses to open the store at all.
    let wrong = Store::open_at(&f.location, Some(key(4))).await;
    assert!(
        matches!(wrong, Err(StoreError::WrongKey)),
        "a wrong key is refused"
    );
    let none = Store::open_at(&f.location, None).await;
    assert!(
        matches!(none, Err(StoreError::KeyRequired)),
        "a missing key is refused"
    );
    let right = Store::open_at(&f.location, Some(key(3))).await.unwrap();
    assert!(right.encrypted());
    assert_eq!(
        right
            .load_connection(id)
            .await
            .unwrap()
            .unwrap()
            .access_token
            .expose_secret(),
        "access-1"
    );
}

async fn heartbeats_count_the_other_daemons(kind: Kind) {
    let Some(f) = Fixture::new(kind, "heartbeats", None).await else {
        return;
    };
    let now = Utc::now();
    let since = now - Duration::seconds(10);
    assert_eq!(f.store.heartbeat("a", now, since).await.unwrap(), 0);
    assert_eq!(f.store.heartbeat("b", now, since).await.unwrap(), 1);
    f.store.leave("b").await.unwrap();
    assert_eq!(f.store.heartbeat("a", now, since).await.unwrap(), 0);
    assert_eq!(f.store.versions().await.unwrap().len(), 0);
    f.store.write_probe().await.unwrap();
    f.store.ping().await.unwrap();
}

/// A grant of keap/default as `save_authorized` and `commit_refresh` take it.
fn grant<'a>(access: &'a SecretString, refresh: &'a SecretString) -> NewGrant<'a> {
    let now = Utc::now();
    NewGrant {
        access_token: access,
        refresh_token: Some(refresh),
        token_type: "Bearer",
        scope: None,
        issued_at: now,
        expires_at: now + Duration::hours(1),
        meta: None,
    }
}

fn event(kind: EventKind) -> NewEvent {
    NewEvent::new(("keap", "default"), Utc::now(), kind)
}

async fn history(store: &Store, before: Option<Before>, limit: u32) -> Vec<EventKind> {
    let q = EventQuery {
        before,
        after: None,
        limit,
    };
    store
        .events("keap", "default", &q)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.kind)
        .collect()
}

async fn events_land_only_with_the_write_they_record(kind: Kind) {
    let Some(f) = Fixture::new(kind, "events_with_writes", None).await else {
        return;
    };
    let (access, refresh) = (
        SecretString::from("access-e".to_owned()),
        SecretString::from("refresh-e".to_owned()),
    );
    let g = grant(&access, &refresh);
    let (row, _) = f
        .store
        .save_authorized("keap", "default", &g, &[], &[event(EventKind::Authorized)])
        .await
        .unwrap();
    let id = row.id;
    // A refresh read the grant, then a new authorization replaced it: the
    // late commit writes neither the grant nor its events.
    let read = leased(&f.store, id, "a", "a1").await;
    f.store
        .save_authorized("keap", "default", &g, &[], &[event(EventKind::Authorized)])
        .await
        .unwrap();
    let late = f
        .store
        .commit_refresh(
            id,
            ("keap", "default"),
            "a",
            "a1",
            read.generation,
            &g,
            &[],
            &[event(EventKind::Refreshed)],
        )
        .await
        .unwrap();
    assert!(matches!(late, CommitOutcome::Superseded(_)));
    // A commit that lands brings its events.
    let read = leased(&f.store, id, "a", "a2").await;
    let landed = f
        .store
        .commit_refresh(
            id,
            ("keap", "default"),
            "a",
            "a2",
            read.generation,
            &g,
            &[],
            &[
                event(EventKind::Refreshed).took(std::time::Duration::from_millis(42)),
                event(EventKind::Rotated),
            ],
        )
        .await
        .unwrap();
    let CommitOutcome::Committed { row, .. } = landed else {
        panic!("commit");
    };
    // A rejection of a grant that has moved on is not recorded.
    leased(&f.store, id, "a", "a3").await;
    assert!(f
        .store
        .reject_attempt(
            id,
            ("a", "a3"),
            row.generation - 1,
            "rejected",
            1,
            &[event(EventKind::AuthorizationRequired)]
        )
        .await
        .unwrap()
        .is_none());
    // Neither is a forget of a grant that has moved on; one that lands is,
    // and the history outlives the connection.
    assert!(!f
        .store
        .delete_connection_at(id, row.generation - 1, &[event(EventKind::Forgotten)])
        .await
        .unwrap());
    assert!(f
        .store
        .delete_connection_at(id, row.generation, &[event(EventKind::Revoked)])
        .await
        .unwrap());
    use EventKind::*;
    assert_eq!(
        history(&f.store, None, 50).await,
        [Revoked, Rotated, Refreshed, Authorized, Authorized]
    );
    // Pages: by id and by time.
    let all = f
        .store
        .events(
            "keap",
            "default",
            &EventQuery {
                before: None,
                after: None,
                limit: 50,
            },
        )
        .await
        .unwrap();
    assert_eq!(all[2].duration_ms, Some(42));
    assert_eq!(all[0].duration_ms, None);
    assert_eq!(history(&f.store, None, 2).await, [Revoked, Rotated]);
    assert_eq!(
        history(&f.store, Some(Before::Id(all[1].id)), 2).await,
        [Refreshed, Authorized]
    );
    assert_eq!(
        history(&f.store, Some(Before::Time(all[4].at)), 50).await,
        []
    );
    // Events alone; the purge takes only what is older than the cutoff.
    let old = NewEvent::new(
        ("keap", "default"),
        Utc::now() - Duration::days(100),
        EventKind::BearerMisuse,
    );
    f.store.record_events(&[old]).await;
    assert_eq!(history(&f.store, None, 50).await.len(), 6);
    let purged = f
        .store
        .purge_events(Utc::now() - Duration::days(90))
        .await
        .unwrap();
    assert_eq!(purged, 1);
    assert_eq!(history(&f.store, None, 50).await.len(), 5);
    assert!(f
        .store
        .events(
            "keap",
            "other",
            &EventQuery {
                before: None,
                after: None,
                limit: 50
            }
        )
        .await
        .unwrap()
        .is_empty());
}

/// A connection the daemon obtains itself gets one token-less row, due at
/// once; a second call (another daemon starting) and a stored grant are
/// left as they are.
async fn ensure_connection_inserts_once_and_never_overwrites(kind: Kind) {
    let Some(f) = Fixture::new(kind, "ensure_connection", Some(key(7))).await else {
        return;
    };
    let now = Utc::now();
    let row = f
        .store
        .ensure_connection("m2m", "default", now, "not yet")
        .await
        .unwrap()
        .expect("the row");
    assert_eq!(row.state, ConnState::Retrying);
    assert_eq!(row.last_error.as_deref(), Some("not yet"));
    assert!(row.refresh_token.is_none());
    assert!(row.access_token.expose_secret().is_empty());
    assert!(row.expires_at <= now && row.next_attempt_at.is_none());
    assert!(row.unreadable.is_none(), "{:?}", row.unreadable);
    let again = f
        .store
        .ensure_connection("m2m", "default", now + Duration::seconds(5), "other")
        .await
        .unwrap()
        .unwrap();
    assert_eq!((again.id, again.generation), (row.id, row.generation));
    assert_eq!(again.last_error.as_deref(), Some("not yet"));
    let (id, generation) = authorize(&f.store, "1").await;
    let kept = f
        .store
        .ensure_connection("keap", "default", now, "not yet")
        .await
        .unwrap()
        .unwrap();
    assert_eq!((kept.id, kept.generation), (id, generation));
    assert_eq!(kept.state, ConnState::Active);
    assert_eq!(kept.access_token.expose_secret(), "access-1");
}

/// What a grant keeps beside its tokens is written with it: a commit
/// without meta keeps what is stored, one with meta replaces it, a new
/// authorization replaces it, and `migrate-storage` copies it.
async fn grant_meta_is_written_with_its_grant_and_copied(kind: Kind) {
    let Some(f) = Fixture::new(kind, "grant_meta", Some(key(1))).await else {
        return;
    };
    let (access, refresh) = (SecretString::from("a1"), SecretString::from("r1"));
    let mut meta = GrantMeta::default();
    meta.extra
        .insert("instance_url".into(), "https://na1.example".into());
    let end = chrono::DateTime::from_timestamp_millis(1_900_000_000_123).unwrap();
    meta.refresh_token_expires_at = Some(end);
    meta.refresh_token_cap_at = Some(end);
    let (row, _) = f
        .store
        .save_authorized(
            "keap",
            "default",
            &NewGrant {
                meta: Some(&meta),
                ..grant(&access, &refresh)
            },
            &[],
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.meta, meta);
    let id = row.id;
    let read = leased(&f.store, id, "a", "a1").await;
    let CommitOutcome::Committed { row, .. } =
        commit(&f.store, id, ("a", "a1"), read.generation, "2", true).await
    else {
        panic!("commit");
    };
    assert_eq!(row.meta, meta, "a commit without meta keeps it");
    let mut newer = meta.clone();
    newer.refresh_token_expires_at = None;
    newer.extra.insert("realmId".into(), "42".into());
    let read = leased(&f.store, id, "a", "a2").await;
    let (a3, r3) = (SecretString::from("a3"), SecretString::from("r3"));
    let CommitOutcome::Committed { row, .. } = f
        .store
        .commit_refresh(
            id,
            ("keap", "default"),
            "a",
            "a2",
            read.generation,
            &NewGrant {
                meta: Some(&newer),
                ..grant(&a3, &r3)
            },
            &[],
            &[],
        )
        .await
        .unwrap()
    else {
        panic!("commit");
    };
    assert_eq!(row.meta, newer);
    assert_eq!(
        f.store.load_connection(id).await.unwrap().unwrap().meta,
        newer
    );
    // migrate-storage copies it (to SQLite, from either backend).
    let to = Fixture::new(Kind::Sqlite, "grant_meta_copy", Some(key(1)))
        .await
        .unwrap();
    tokenkeeper::store::migrate::copy(&f.store, &to.store, "copy", false)
        .await
        .unwrap();
    let mut copied = None;
    to.store
        .each_connection(|r| copied = Some(r.meta))
        .await
        .unwrap();
    assert_eq!(copied, Some(newer));
    // A new authorization without meta clears it.
    let (row, _) = f
        .store
        .save_authorized("keap", "default", &grant(&a3, &r3), &[], &[])
        .await
        .unwrap();
    assert_eq!(row.meta, GrantMeta::default());
}

/// One `#[tokio::test]` per contract test and backend.
macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(super::Kind::Sqlite).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(super::Kind::Postgres).await
                }
            )*
        }
    };
}

conformance!(
    a_lease_refuses_a_second_owner_until_taken_over_as_seen,
    concurrent_takers_get_exactly_one_lease,
    a_commit_lands_only_at_the_generation_read_and_ends_the_lease,
    a_refresh_superseded_by_a_new_authorization_writes_nothing,
    a_stalled_holder_still_lands_a_rotation_nobody_else_stored,
    a_conditional_authorization_never_overwrites_a_working_grant,
    fingerprints_are_kept_in_order_and_bounded,
    a_pending_authorization_is_taken_once_by_its_browser,
    expired_pending_authorizations_are_purged_and_live_ones_kept,
    sealed_values_are_bound_to_their_place_and_key,
    heartbeats_count_the_other_daemons,
    events_land_only_with_the_write_they_record,
    ensure_connection_inserts_once_and_never_overwrites,
    grant_meta_is_written_with_its_grant_and_copied,
);
