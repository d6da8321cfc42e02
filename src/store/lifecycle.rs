//! The storage contract's statements and transactions, written once for
//! both backends.
//!
//! Every statement here is in the SQL that SQLite (3.39 or later; sqlx
//! bundles its own) and PostgreSQL both speak: numbered parameters `$1`,
//! `$2`, ... (sqlx binds SQLite's `$N` to the N-th argument, as PostgreSQL
//! does), `ON CONFLICT ... DO UPDATE | DO NOTHING`, `RETURNING`,
//! `IS [NOT] DISTINCT FROM`, `CAST`. What the two do differently is how a
//! transaction keeps other writers off the row between what it reads and
//! what it writes; each backend says that in its [`Dialect`].
//!
//! Why macros rather than functions generic over `sqlx::Database`: every
//! such function would carry the same screenful of bounds (executors for
//! `&mut Connection`, `Encode + Type` for each bound type, `ColumnIndex`
//! and `Decode` for each read), which Rust does not let a trait alias
//! imply. Expanded once per backend, the code below is plain sqlx on a
//! concrete connection type, like [`super::events::events_sql`] and
//! [`super::migrate::dump_sql`]. The expansion uses the backend module's
//! imports, and its type's `pool` and `codec` fields.
//!
//! Must not: hold what only one backend does (its connection setup,
//! locks across processes, listening, backups, `changed`).

/// How a backend keeps other writers off a row inside a transaction.
pub(super) struct Dialect {
    /// Appended to a `SELECT` whose rows the transaction goes on to write:
    /// a row lock where there are row locks; nothing where the
    /// transaction's first write already holds the database's one write
    /// lock.
    pub for_update: &'static str,
    /// The transaction's first statement when it stores a grant by name
    /// (`$1` provider, `$2` account): it must also cover a row that does
    /// not exist yet, so that two first grants of one name take turns.
    pub lock_name: &'static str,
    /// The transaction's first statement when it writes a grant over row
    /// `$1`: locks the row and returns its generation (no row when gone).
    pub lock_generation: &'static str,
    /// The first statement of a transaction that reads every connection
    /// and writes some back (re-sealing): takes the write lock before the
    /// read where the read itself cannot lock rows.
    pub lock_all: Option<&'static str>,
    /// The first statement of an export's transaction, so that it reads
    /// all tables in one snapshot (none where a read transaction already
    /// is one).
    pub export_snapshot: Option<&'static str>,
    /// The first statement of an import's transaction: writers wait until
    /// it commits, so the emptiness it checks is what it replaces.
    pub import_lock: &'static str,
    /// Run after an import wrote its rows with their ids, so that new
    /// rows' ids continue after them.
    pub after_import: &'static [&'static str],
}

/// Expands, inside a backend's `impl Backend for ...`, every method of
/// the storage contract whose statements both backends share. `$d` names
/// the backend's [`Dialect`].
macro_rules! lifecycle_methods {
    ($d:ident) => {
        fn codec(&self) -> &Codec {
            &self.codec
        }

        async fn setting(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
            Ok(
                sqlx::query_scalar("SELECT value FROM installation WHERE name = $1")
                    .bind(name.to_owned())
                    .fetch_optional(&self.pool)
                    .await?,
            )
        }

        async fn reseal(
            &self,
            new: &SealKey,
            open: &(dyn Fn(&SealContext<'_>, Column, &str) -> Option<SecretString> + Sync),
            key_check: bool,
        ) -> Result<usize, StoreError> {
            let mut tx = self.pool.begin().await?;
            // Locked: a writer committing meanwhile waits, so no rotation
            // is overwritten with the value read here (and SQLite never
            // has to upgrade a read to a write, which fails when busy).
            if let Some(lock) = $d.lock_all {
                sqlx::query(lock).execute(&mut *tx).await?;
            }
            let rows = sqlx::query(&format!(
                "SELECT id, provider, account, generation, access_token, refresh_token FROM connections{}",
                $d.for_update
            ))
            .fetch_all(&mut *tx)
            .await?;
            let mut n = 0;
            for r in &rows {
                let provider: String = r.try_get("provider")?;
                let account: String = r.try_get("account")?;
                let ctx = SealContext {
                    provider: &provider,
                    account: &account,
                    generation: r.try_get("generation")?,
                };
                let access: String = r.try_get("access_token")?;
                let refresh: Option<String> = r.try_get("refresh_token")?;
                let Some((access, refresh)) =
                    codec::reseal_row(new, &ctx, (&access, refresh.as_deref()), open)
                else {
                    tracing::warn!(
                        provider = %provider,
                        account = %account,
                        "cannot re-seal this connection: its stored tokens do not open; left as they are"
                    );
                    continue;
                };
                sqlx::query(
                    "UPDATE connections SET access_token = $1, refresh_token = $2 WHERE id = $3",
                )
                .bind(access)
                .bind(refresh)
                .bind(r.try_get::<i64, _>("id")?)
                .execute(&mut *tx)
                .await?;
                n += 1;
            }
            let upsert = "INSERT INTO installation (name, value) VALUES ($1, $2) \
                          ON CONFLICT (name) DO UPDATE SET value = excluded.value";
            if key_check {
                sqlx::query("DELETE FROM pending_authorizations")
                    .execute(&mut *tx)
                    .await?;
                sqlx::query(upsert)
                    .bind("key_check")
                    .bind(
                        new.seal("tokenkeeper", codec::KEY_CHECK_CONTEXT)
                            .into_bytes(),
                    )
                    .execute(&mut *tx)
                    .await?;
            }
            sqlx::query(upsert)
                .bind("seal_format")
                .bind(codec::SEAL_FORMAT.as_bytes().to_vec())
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok(n)
        }

        async fn fingerprint_key(&self) -> Result<[u8; 32], StoreError> {
            let fresh: [u8; 32] = rand::random();
            sqlx::query(
                "INSERT INTO installation (name, value) VALUES ('fingerprint_key', $1) \
                 ON CONFLICT (name) DO NOTHING",
            )
            .bind(fresh.to_vec())
            .execute(&self.pool)
            .await?;
            let v: Vec<u8> =
                sqlx::query_scalar("SELECT value FROM installation WHERE name = 'fingerprint_key'")
                    .fetch_one(&self.pool)
                    .await?;
            v.try_into()
                .map_err(|_| StoreError::Corrupt("fingerprint key has the wrong length".into()))
        }

        async fn each_fingerprint(
            &self,
            mut f: impl FnMut(i64, Fingerprint),
        ) -> Result<(), StoreError> {
            let mut rows =
                sqlx::query("SELECT connection_id, kind, digest FROM token_fingerprints ORDER BY id")
                    .fetch(&self.pool);
            while let Some(r) = rows.try_next().await? {
                let fp = Fingerprint::from_stored(r.try_get("kind")?, r.try_get("digest")?)?;
                f(r.try_get("connection_id")?, fp);
            }
            Ok(())
        }

        async fn fingerprints_of(&self, connection_id: i64) -> Result<Vec<Fingerprint>, StoreError> {
            let rows = sqlx::query(
                "SELECT kind, digest FROM token_fingerprints WHERE connection_id = $1 ORDER BY id",
            )
            .bind(connection_id)
            .fetch_all(&self.pool)
            .await?;
            rows.iter()
                .map(|r| Fingerprint::from_stored(r.try_get("kind")?, r.try_get("digest")?))
                .collect()
        }

        async fn ping(&self) -> Result<(), StoreError> {
            sqlx::query("SELECT 1").execute(&self.pool).await?;
            Ok(())
        }

        async fn write_once(&self) -> Result<(), sqlx::Error> {
            sqlx::query(
                "INSERT INTO installation (name, value) VALUES ('write_probe', $1) \
                 ON CONFLICT (name) DO UPDATE SET value = installation.value",
            )
            .bind(vec![1u8])
            .execute(&self.pool)
            .await?;
            Ok(())
        }

        async fn insert_pending(&self, p: &PendingAuthorization) -> Result<(), StoreError> {
            sqlx::query(&format!(
                "INSERT INTO pending_authorizations ({PENDING_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
            ))
            .bind(p.state.clone())
            .bind(p.provider.clone())
            .bind(p.account.clone())
            .bind(
                p.pkce_verifier
                    .as_ref()
                    .map(|v| self.codec.seal_value(v, &codec::pending_context(&p.state))),
            )
            .bind(p.redirect_uri.clone())
            .bind(p.browser_hash.clone())
            .bind(to_ms(p.created_at))
            .bind(to_ms(p.expires_at))
            .execute(&self.pool)
            .await?;
            Ok(())
        }

        async fn purge_expired_pending(&self, now: DateTime<Utc>) -> Result<u64, StoreError> {
            let done = sqlx::query("DELETE FROM pending_authorizations WHERE expires_at < $1")
                .bind(to_ms(now))
                .execute(&self.pool)
                .await?;
            Ok(done.rows_affected())
        }

        async fn take_pending(
            &self,
            state: &str,
            browser_hash: Option<&str>,
            now: DateTime<Utc>,
        ) -> Result<PendingTake, StoreError> {
            self.purge_expired_pending(now).await?;
            let row = sqlx::query(&format!(
                "DELETE FROM pending_authorizations \
                 WHERE state = $1 AND (CAST($2 AS TEXT) IS NULL OR browser_hash = $2) \
                 RETURNING {PENDING_COLUMNS}"
            ))
            .bind(state.to_owned())
            .bind(browser_hash.map(str::to_owned))
            .fetch_optional(&self.pool)
            .await?;
            if let Some(r) = row {
                return self.codec.pending(&r, state).map(PendingTake::Taken);
            }
            if browser_hash.is_none() {
                return Ok(PendingTake::Unknown);
            }
            let exists = sqlx::query("SELECT 1 FROM pending_authorizations WHERE state = $1")
                .bind(state.to_owned())
                .fetch_optional(&self.pool)
                .await?;
            Ok(if exists.is_some() {
                PendingTake::OtherBrowser
            } else {
                PendingTake::Unknown
            })
        }

        async fn each_connection(&self, mut f: impl FnMut(ConnectionRow)) -> Result<(), StoreError> {
            let sql = format!("SELECT {COLUMNS} FROM connections ORDER BY provider, account");
            let mut rows = sqlx::query(&sql).fetch(&self.pool);
            while let Some(r) = rows.try_next().await? {
                if let Some(row) = self.codec.decode_or_skip(&r) {
                    f(row);
                }
            }
            Ok(())
        }

        async fn load_connection(&self, id: i64) -> Result<Option<ConnectionRow>, StoreError> {
            let row = sqlx::query(&format!("SELECT {COLUMNS} FROM connections WHERE id = $1"))
                .bind(id)
                .fetch_optional(&self.pool)
                .await?;
            Ok(row.as_ref().and_then(|r| self.codec.decode_or_skip(r)))
        }

        async fn versions(&self) -> Result<Vec<(i64, i64, String)>, StoreError> {
            let rows = sqlx::query("SELECT id, generation, state FROM connections")
                .fetch_all(&self.pool)
                .await?;
            rows.iter()
                .map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?)))
                .collect()
        }

        async fn save_discovery(
            &self,
            issuer: &str,
            document: &str,
            fetched_at: DateTime<Utc>,
        ) -> Result<(), StoreError> {
            sqlx::query(
                "INSERT INTO discovery (issuer, document, fetched_at) VALUES ($1, $2, $3) \
                 ON CONFLICT (issuer) DO UPDATE SET document = excluded.document, fetched_at = excluded.fetched_at",
            )
            .bind(issuer.to_owned())
            .bind(document.to_owned())
            .bind(to_ms(fetched_at))
            .execute(&self.pool)
            .await?;
            Ok(())
        }

        async fn load_discovery(
            &self,
            issuer: &str,
        ) -> Result<Option<(String, DateTime<Utc>)>, StoreError> {
            let row = sqlx::query("SELECT document, fetched_at FROM discovery WHERE issuer = $1")
                .bind(issuer.to_owned())
                .fetch_optional(&self.pool)
                .await?;
            row.map(|r| Ok((r.try_get("document")?, from_ms(r.try_get("fetched_at")?))))
                .transpose()
        }

        async fn save_authorized_if(
            &self,
            provider: &str,
            account: &str,
            g: &NewGrant<'_>,
            fps: &[Fingerprint],
            events: &[NewEvent],
            only_if_no_working_grant: bool,
        ) -> Result<(ConnectionRow, Option<SecretString>), StoreError> {
            let mut tx = self.pool.begin().await?;
            // Two stores of one name at once: the second waits here, then
            // sees the first's row, so the replaced token read below is
            // the one this write replaces.
            sqlx::query($d.lock_name)
                .bind(provider.to_owned())
                .bind(account.to_owned())
                .execute(&mut *tx)
                .await?;
            if only_if_no_working_grant {
                refuse_a_working_grant(&mut tx, provider, account).await?;
            }
            let current: Option<(i64, Option<String>)> = sqlx::query_as(&format!(
                "SELECT generation, refresh_token FROM connections WHERE provider = $1 AND account = $2{}",
                $d.for_update
            ))
            .bind(provider.to_owned())
            .bind(account.to_owned())
            .fetch_optional(&mut *tx)
            .await?;
            let generation = current.as_ref().map_or(1, |c| c.0 + 1);
            // A replaced token that no longer opens is not worth failing the
            // new authorization for: it is simply not revoked.
            let old = SealContext {
                provider,
                account,
                generation: generation - 1,
            };
            let replaced = current.and_then(|c| c.1).and_then(|v| {
                self.codec
                    .open_value(v, &old.column(Column::RefreshToken))
                    .ok()
            });
            let sealed = self.codec.seal_pair((provider, account), generation, g);
            let row = sqlx::query(&format!(
                "INSERT INTO connections (provider, account, state, access_token, refresh_token, token_type, scope, \
                     expires_at, issued_at, refreshed_at, refresh_token_issued_at, generation, created_at) \
                 VALUES ($1, $2, 'active', $3, $4, $5, $6, $7, $8, NULL, $8, 1, $8) \
                 ON CONFLICT (provider, account) DO UPDATE SET \
                     state = 'active', access_token = $3, refresh_token = $4, token_type = $5, scope = $6, \
                     expires_at = $7, issued_at = $8, refreshed_at = NULL, refresh_token_issued_at = $8, \
                     generation = connections.generation + 1, last_error = NULL, failures = 0, next_attempt_at = NULL, \
                     lease_owner = NULL, lease_until = NULL, attempt_id = NULL, attempt_started_at = NULL, \
                     interrupted_at = NULL \
                 RETURNING {COLUMNS}"
            ))
            .bind(provider.to_owned())
            .bind(account.to_owned())
            .bind(sealed.0)
            .bind(sealed.1)
            .bind(g.token_type.to_owned())
            .bind(g.scope.map(str::to_owned))
            .bind(to_ms(g.expires_at))
            .bind(to_ms(g.issued_at))
            .fetch_one(&mut *tx)
            .await?;
            let mut decoded = self.codec.decode(&row)?;
            // A new authorization replaces what the old grant kept beside its
            // tokens.
            let meta = g.meta.cloned().unwrap_or_default();
            write_meta(&mut tx, decoded.id, &meta).await?;
            decoded.meta = meta;
            record_fingerprints(&mut tx, decoded.id, fps, g.issued_at).await?;
            insert_events(&mut tx, events).await?;
            tx.commit().await?;
            Ok((decoded, replaced))
        }

        async fn ensure_connection(
            &self,
            provider: &str,
            account: &str,
            now: DateTime<Utc>,
            reason: &str,
        ) -> Result<Option<ConnectionRow>, StoreError> {
            let empty = SecretString::from(String::new());
            let placeholder = NewGrant {
                access_token: &empty,
                refresh_token: None,
                token_type: "Bearer",
                scope: None,
                issued_at: now,
                expires_at: now,
                meta: None,
            };
            let (sealed, _) = self.codec.seal_pair((provider, account), 1, &placeholder);
            sqlx::query(
                "INSERT INTO connections (provider, account, state, access_token, refresh_token, token_type, \
                     expires_at, issued_at, refresh_token_issued_at, generation, last_error, created_at) \
                 VALUES ($1, $2, 'retrying', $3, NULL, 'Bearer', $4, $4, $4, 1, $5, $4) \
                 ON CONFLICT (provider, account) DO NOTHING",
            )
            .bind(provider.to_owned())
            .bind(account.to_owned())
            .bind(sealed)
            .bind(to_ms(now))
            .bind(reason.to_owned())
            .execute(&self.pool)
            .await?;
            let row = sqlx::query(&format!(
                "SELECT {COLUMNS} FROM connections WHERE provider = $1 AND account = $2"
            ))
            .bind(provider.to_owned())
            .bind(account.to_owned())
            .fetch_optional(&self.pool)
            .await?;
            Ok(row.as_ref().and_then(|r| self.codec.decode_or_skip(r)))
        }

        async fn begin_refresh(
            &self,
            id: i64,
            owner: &str,
            attempt_id: &str,
            now: DateTime<Utc>,
            lease_until: DateTime<Utc>,
            takeover: Option<&LeaseSeen>,
        ) -> Result<BeginRefresh, StoreError> {
            // One conditional UPDATE: a concurrent taker waits for the write
            // lock, then evaluates the WHERE against the lease written here
            // and finds it taken. An unfinished attempt of another holder
            // means it died mid-refresh: remember when, so a later rejection
            // can say precisely why. In a transaction so that a row that
            // turns out unreadable is rolled back untouched (its state is
            // left as stored, so an unknown one still reads as unknown).
            let mut tx = self.pool.begin().await?;
            let row = sqlx::query(&format!(
                "UPDATE connections SET \
                     interrupted_at = CASE WHEN attempt_id IS NOT NULL AND lease_owner IS DISTINCT FROM $1 \
                                           THEN attempt_started_at ELSE interrupted_at END, \
                     lease_owner = $1, lease_until = $2, attempt_id = $3, attempt_started_at = $4, \
                     state = CASE WHEN state IN ('active', 'retrying', 'refreshing') THEN 'refreshing' ELSE state END \
                 WHERE id = $5 AND (lease_owner IS NULL OR lease_owner = $1 \
                     OR (lease_owner = $6 AND attempt_id IS NOT DISTINCT FROM $7 \
                         AND lease_until IS NOT DISTINCT FROM $8)) \
                 RETURNING {COLUMNS}"
            ))
            .bind(owner.to_owned())
            .bind(to_ms(lease_until))
            .bind(attempt_id.to_owned())
            .bind(to_ms(now))
            .bind(id)
            .bind(takeover.map(|t| t.owner.clone()))
            .bind(takeover.and_then(|t| t.attempt.clone()))
            .bind(takeover.and_then(|t| t.until_ms))
            .fetch_optional(&mut *tx)
            .await?;
            if let Some(row) = row {
                let decoded = self.codec.decode(&row)?;
                if decoded.unreadable.is_some() {
                    tx.rollback().await?;
                    return Ok(BeginRefresh::Unreadable(Box::new(decoded)));
                }
                tx.commit().await?;
                return Ok(BeginRefresh::Started(Box::new(decoded)));
            }
            tx.commit().await?;
            let holder = sqlx::query(
                "SELECT lease_owner, lease_until, attempt_id FROM connections WHERE id = $1",
            )
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
            Ok(match holder {
                None => BeginRefresh::Gone,
                Some(r) => BeginRefresh::Busy {
                    owner: r.try_get::<Option<String>, _>(0)?.unwrap_or_default(),
                    until: from_ms(r.try_get::<Option<i64>, _>(1)?.unwrap_or(0)),
                    attempt: r.try_get::<Option<String>, _>(2)?,
                },
            })
        }

        async fn renew_lease(
            &self,
            id: i64,
            owner: &str,
            attempt_id: &str,
            until: DateTime<Utc>,
        ) -> Result<bool, StoreError> {
            let done = sqlx::query(
                "UPDATE connections SET lease_until = $1 WHERE id = $2 AND lease_owner = $3 AND attempt_id = $4",
            )
            .bind(to_ms(until))
            .bind(id)
            .bind(owner.to_owned())
            .bind(attempt_id.to_owned())
            .execute(&self.pool)
            .await?;
            Ok(done.rows_affected() == 1)
        }

        async fn commit_refresh(
            &self,
            id: i64,
            name: (&str, &str),
            owner: &str,
            attempt_id: &str,
            base_generation: i64,
            g: &NewGrant<'_>,
            fps: &[Fingerprint],
            events: &[NewEvent],
        ) -> Result<CommitOutcome, StoreError> {
            // One transaction, the row locked from its first statement: the
            // generation read is the one the sealed values below are written
            // over, and the pair and the fingerprints of the new tokens
            // become durable together.
            let mut tx = self.pool.begin().await?;
            let current: Option<i64> = sqlx::query_scalar($d.lock_generation)
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?;
            let generation = current.map_or(1, |g| g + 1);
            let sealed = || self.codec.seal_pair(name, generation, g);
            let cas = format!(
                "UPDATE connections SET {GRANT_SET}, state = 'active', lease_owner = NULL, lease_until = NULL, \
                 attempt_id = NULL, attempt_started_at = NULL \
                 WHERE id = $7 AND lease_owner = $8 AND attempt_id = $9 AND generation = $10 RETURNING {COLUMNS}"
            );
            let row = bind_grant(sqlx::query(&cas), g, sealed())
                .bind(id)
                .bind(owner.to_owned())
                .bind(attempt_id.to_owned())
                .bind(base_generation)
                .fetch_optional(&mut *tx)
                .await?;
            let kept_lease = row.is_some();
            let row = match row {
                Some(row) => Some(row),
                None => {
                    // The lease is gone, but no newer grant was written: the
                    // pair the provider issued must not be lost.
                    let forced = format!(
                        "UPDATE connections SET {GRANT_SET}, \
                         state = CASE WHEN lease_owner IS NULL THEN 'active' ELSE state END \
                         WHERE id = $7 AND generation = $8 RETURNING {COLUMNS}"
                    );
                    bind_grant(sqlx::query(&forced), g, sealed())
                        .bind(id)
                        .bind(base_generation)
                        .fetch_optional(&mut *tx)
                        .await?
                }
            };
            if row.is_some() {
                let decoded = self.finish_commit(&mut tx, id, name, generation, g).await?;
                record_fingerprints(&mut tx, id, fps, g.issued_at).await?;
                insert_events(&mut tx, events).await?;
                tx.commit().await?;
                return Ok(CommitOutcome::Committed {
                    row: Box::new(decoded),
                    kept_lease,
                });
            }
            release_lease(&mut tx, id, owner, attempt_id).await?;
            let current = sqlx::query(&format!("SELECT {COLUMNS} FROM connections WHERE id = $1"))
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?;
            tx.commit().await?;
            let current = current.as_ref().map(|r| self.codec.decode(r)).transpose()?;
            Ok(CommitOutcome::Superseded(current.map(Box::new)))
        }

        async fn finish_attempt(
            &self,
            id: i64,
            owner: &str,
            attempt_id: &str,
            state: ConnState,
            last_error: Option<&str>,
            failures: u32,
            next_attempt_at: Option<DateTime<Utc>>,
        ) -> Result<Option<ConnectionRow>, StoreError> {
            let row = sqlx::query(&format!(
                "UPDATE connections SET state = $1, last_error = $2, failures = $3, next_attempt_at = $4, \
                     lease_owner = NULL, lease_until = NULL, attempt_id = NULL, attempt_started_at = NULL \
                 WHERE id = $5 AND lease_owner = $6 AND attempt_id = $7 RETURNING {COLUMNS}"
            ))
            .bind(state.as_str())
            .bind(last_error.map(str::to_owned))
            .bind(failures as i64)
            .bind(next_attempt_at.map(to_ms))
            .bind(id)
            .bind(owner.to_owned())
            .bind(attempt_id.to_owned())
            .fetch_optional(&self.pool)
            .await?;
            row.as_ref().map(|r| self.codec.decode(r)).transpose()
        }

        async fn reject_attempt(
            &self,
            id: i64,
            (owner, attempt_id): (&str, &str),
            generation: i64,
            reason: &str,
            failures: u32,
            events: &[NewEvent],
        ) -> Result<Option<ConnectionRow>, StoreError> {
            let mut tx = self.pool.begin().await?;
            let row = sqlx::query(&format!(
                "UPDATE connections SET state = 'authorization_required', last_error = $1, failures = $2, \
                     next_attempt_at = NULL, lease_owner = NULL, lease_until = NULL, attempt_id = NULL, \
                     attempt_started_at = NULL \
                 WHERE id = $3 AND lease_owner = $4 AND attempt_id = $5 AND generation = $6 RETURNING {COLUMNS}"
            ))
            .bind(reason.to_owned())
            .bind(failures as i64)
            .bind(id)
            .bind(owner.to_owned())
            .bind(attempt_id.to_owned())
            .bind(generation)
            .fetch_optional(&mut *tx)
            .await?;
            if row.is_none() {
                release_lease(&mut tx, id, owner, attempt_id).await?;
            } else {
                insert_events(&mut tx, events).await?;
            }
            tx.commit().await?;
            row.as_ref().map(|r| self.codec.decode(r)).transpose()
        }

        async fn mark_interrupted(
            &self,
            id: i64,
            dead_owner: Option<&str>,
            message: &str,
            events: &[NewEvent],
        ) -> Result<Option<ConnectionRow>, StoreError> {
            let mut tx = self.pool.begin().await?;
            let row = sqlx::query(&format!(
                "UPDATE connections SET interrupted_at = attempt_started_at, last_error = $1, \
                     state = CASE WHEN state = 'authorization_required' THEN state ELSE 'retrying' END, \
                     lease_owner = NULL, lease_until = NULL, attempt_id = NULL, attempt_started_at = NULL, \
                     next_attempt_at = NULL \
                 WHERE id = $2 AND attempt_id IS NOT NULL AND lease_owner IS NOT DISTINCT FROM $3 \
                 RETURNING {COLUMNS}"
            ))
            .bind(message.to_owned())
            .bind(id)
            .bind(dead_owner.map(str::to_owned))
            .fetch_optional(&mut *tx)
            .await?;
            if row.is_some() {
                insert_events(&mut tx, events).await?;
            }
            tx.commit().await?;
            row.as_ref().map(|r| self.codec.decode(r)).transpose()
        }

        async fn leave(&self, owner: &str) -> Result<(), StoreError> {
            sqlx::query("DELETE FROM processes WHERE owner = $1")
                .bind(owner.to_owned())
                .execute(&self.pool)
                .await?;
            Ok(())
        }

        async fn delete_connection(
            &self,
            provider: &str,
            account: &str,
            events: &[NewEvent],
        ) -> Result<Option<ConnectionRow>, StoreError> {
            let mut tx = self.pool.begin().await?;
            let row = sqlx::query(&format!(
                "DELETE FROM connections WHERE provider = $1 AND account = $2 RETURNING {COLUMNS}"
            ))
            .bind(provider.to_owned())
            .bind(account.to_owned())
            .fetch_optional(&mut *tx)
            .await?;
            let decoded = row.as_ref().map(|r| self.codec.decode(r)).transpose()?;
            if let Some(d) = &decoded {
                forget_fingerprints(&mut tx, d.id, events).await?;
            }
            tx.commit().await?;
            Ok(decoded)
        }

        async fn delete_connection_at(
            &self,
            id: i64,
            generation: i64,
            events: &[NewEvent],
        ) -> Result<bool, StoreError> {
            let mut tx = self.pool.begin().await?;
            let done = sqlx::query("DELETE FROM connections WHERE id = $1 AND generation = $2")
                .bind(id)
                .bind(generation)
                .execute(&mut *tx)
                .await?;
            if done.rows_affected() == 1 {
                forget_fingerprints(&mut tx, id, events).await?;
            }
            tx.commit().await?;
            Ok(done.rows_affected() == 1)
        }

        async fn record_events(&self, events: &[NewEvent]) -> Result<(), StoreError> {
            let mut tx = self.pool.begin().await?;
            insert_events(&mut tx, events).await?;
            tx.commit().await?;
            Ok(())
        }

        async fn events(
            &self,
            provider: &str,
            account: &str,
            q: &EventQuery,
        ) -> Result<Vec<Event>, StoreError> {
            let mut c = self.pool.acquire().await?;
            list_events(&mut c, provider, account, q).await
        }

        async fn purge_events(&self, before: DateTime<Utc>) -> Result<u64, StoreError> {
            let mut c = self.pool.acquire().await?;
            purge_events(&mut c, before).await
        }

        async fn export(&self) -> Result<Dump, StoreError> {
            let mut tx = self.pool.begin().await?;
            if let Some(snapshot) = $d.export_snapshot {
                sqlx::query(snapshot).execute(&mut *tx).await?;
            }
            let dump = read_dump(&mut tx).await?;
            tx.commit().await?;
            Ok(dump)
        }

        async fn import(&self, dump: &Dump, replace: bool, target: &str) -> Result<(), MigrateError> {
            let mut tx = self.pool.begin().await.map_err(StoreError::from)?;
            sqlx::query($d.import_lock)
                .execute(&mut *tx)
                .await
                .map_err(StoreError::from)?;
            check_empty(&mut tx, replace, target).await?;
            write_dump(&mut tx, dump).await?;
            for statement in $d.after_import {
                sqlx::query(statement)
                    .execute(&mut *tx)
                    .await
                    .map_err(StoreError::from)?;
            }
            tx.commit().await.map_err(StoreError::from)?;
            Ok(())
        }
    };
}
pub(super) use lifecycle_methods;

/// Expands, in a backend module, the helpers of [`lifecycle_methods`]
/// (for the backend type `$backend` over the sqlx database `$db`, with
/// the [`Dialect`] `$d`), the history's and `migrate-storage`'s statements.
macro_rules! lifecycle_helpers {
    ($backend:ident, $db:ty, $d:ident) => {
        super::events::events_sql!(<$db as sqlx::Database>::Connection);
        super::migrate::dump_sql!(<$db as sqlx::Database>::Connection);

        impl $backend {
            /// After a commit's write: writes what is kept beside the tokens
            /// (when given), re-seals a kept refresh token for the new
            /// generation (see [`Codec::reseal_kept`]) and returns the row.
            async fn finish_commit(
                &self,
                tx: &mut <$db as sqlx::Database>::Connection,
                id: i64,
                name: (&str, &str),
                generation: i64,
                g: &NewGrant<'_>,
            ) -> Result<ConnectionRow, StoreError> {
                if let Some(meta) = g.meta {
                    write_meta(tx, id, meta).await?;
                }
                if g.refresh_token.is_none() && self.codec.encrypted() {
                    let kept: Option<String> =
                        sqlx::query_scalar("SELECT refresh_token FROM connections WHERE id = $1")
                            .bind(id)
                            .fetch_one(&mut *tx)
                            .await?;
                    if let Some(v) = kept {
                        let resealed = self.codec.reseal_kept(name, generation, v)?;
                        sqlx::query("UPDATE connections SET refresh_token = $1 WHERE id = $2")
                            .bind(resealed)
                            .bind(id)
                            .execute(&mut *tx)
                            .await?;
                    }
                }
                let row = sqlx::query(&format!("SELECT {COLUMNS} FROM connections WHERE id = $1"))
                    .bind(id)
                    .fetch_one(&mut *tx)
                    .await?;
                self.codec.decode(&row)
            }
        }

        /// Columns written by a rotation, bound by [`bind_grant`] as $1..$6.
        const GRANT_SET: &str = "access_token = $1, refresh_token = COALESCE($2, refresh_token), token_type = $3, \
             scope = COALESCE($4, scope), expires_at = $5, issued_at = $6, refreshed_at = $6, \
             refresh_token_issued_at = CASE WHEN CAST($2 AS TEXT) IS NULL THEN refresh_token_issued_at ELSE $6 END, \
             generation = generation + 1, failures = 0, next_attempt_at = NULL, last_error = NULL, interrupted_at = NULL";

        /// A statement of this backend with its arguments.
        type Query<'q> = sqlx::query::Query<'q, $db, <$db as sqlx::Database>::Arguments<'q>>;

        /// Binds what [`GRANT_SET`] writes.
        fn bind_grant<'q>(
            q: Query<'q>,
            g: &NewGrant<'_>,
            sealed: (String, Option<String>),
        ) -> Query<'q> {
            q.bind(sealed.0)
                .bind(sealed.1)
                .bind(g.token_type.to_string())
                .bind(g.scope.map(str::to_string))
                .bind(to_ms(g.expires_at))
                .bind(to_ms(g.issued_at))
        }

        /// Lets go of a lease this attempt still holds, without touching the
        /// grant (a result that lost to a newer grant, a rejection that did).
        async fn release_lease(
            tx: &mut <$db as sqlx::Database>::Connection,
            id: i64,
            owner: &str,
            attempt_id: &str,
        ) -> Result<(), StoreError> {
            sqlx::query(
                "UPDATE connections SET lease_owner = NULL, lease_until = NULL, attempt_id = NULL, \
                     attempt_started_at = NULL, \
                     state = CASE WHEN state = 'refreshing' THEN 'active' ELSE state END \
                 WHERE id = $1 AND lease_owner = $2 AND attempt_id = $3",
            )
            .bind(id)
            .bind(owner.to_owned())
            .bind(attempt_id.to_owned())
            .execute(&mut *tx)
            .await?;
            Ok(())
        }

        /// Records fingerprints and drops the oldest beyond [`FINGERPRINTS_KEPT`].
        async fn record_fingerprints(
            tx: &mut <$db as sqlx::Database>::Connection,
            connection_id: i64,
            fps: &[Fingerprint],
            now: DateTime<Utc>,
        ) -> Result<(), StoreError> {
            for fp in fps {
                sqlx::query(
                    "INSERT INTO token_fingerprints (connection_id, kind, digest, created_at) \
                     VALUES ($1, $2, $3, $4)",
                )
                .bind(connection_id)
                .bind(fp.kind.as_str())
                .bind(fp.digest.to_vec())
                .bind(to_ms(now))
                .execute(&mut *tx)
                .await?;
                sqlx::query(
                    "DELETE FROM token_fingerprints WHERE connection_id = $1 AND kind = $2 AND id NOT IN \
                     (SELECT id FROM token_fingerprints WHERE connection_id = $1 AND kind = $2 \
                      ORDER BY id DESC LIMIT $3)",
                )
                .bind(connection_id)
                .bind(fp.kind.as_str())
                .bind(FINGERPRINTS_KEPT)
                .execute(&mut *tx)
                .await?;
            }
            Ok(())
        }

        /// After a connection's row is deleted: its fingerprints go, and
        /// the events of the deletion are recorded, in the same transaction.
        async fn forget_fingerprints(
            tx: &mut <$db as sqlx::Database>::Connection,
            id: i64,
            events: &[NewEvent],
        ) -> Result<(), StoreError> {
            sqlx::query("DELETE FROM token_fingerprints WHERE connection_id = $1")
                .bind(id)
                .execute(&mut *tx)
                .await?;
            insert_events(tx, events).await
        }

        /// Writes what is kept beside the tokens, inside the grant's transaction.
        async fn write_meta(
            tx: &mut <$db as sqlx::Database>::Connection,
            id: i64,
            meta: &GrantMeta,
        ) -> Result<(), StoreError> {
            sqlx::query(
                "UPDATE connections SET extra = $1, refresh_token_expires_at = $2, \
                 refresh_token_cap_at = $3 WHERE id = $4",
            )
            .bind(meta.extra_text())
            .bind(meta.refresh_token_expires_at.map(to_ms))
            .bind(meta.refresh_token_cap_at.map(to_ms))
            .bind(id)
            .execute(&mut *tx)
            .await?;
            Ok(())
        }

        /// The compare of [`Backend::save_authorized_if`], inside its
        /// transaction after the name's lock (so no other store of it
        /// interleaves); the transaction is dropped, so rolled back, on
        /// the error.
        async fn refuse_a_working_grant(
            tx: &mut sqlx::Transaction<'_, $db>,
            provider: &str,
            account: &str,
        ) -> Result<(), StoreError> {
            let state: Option<String> = sqlx::query_scalar(&format!(
                "SELECT state FROM connections WHERE provider = $1 AND account = $2{}",
                $d.for_update
            ))
            .bind(provider.to_owned())
            .bind(account.to_owned())
            .fetch_optional(&mut **tx)
            .await?;
            match state.as_deref() {
                None | Some("authorization_required") => Ok(()),
                Some(_) => Err(StoreError::WorkingGrantExists {
                    provider: provider.to_string(),
                    account: account.to_string(),
                }),
            }
        }

        /// The heartbeat's statements, on one connection `c` (see
        /// [`Backend::heartbeat`]); how many other processes are alive.
        async fn write_heartbeat(
            c: &mut <$db as sqlx::Database>::Connection,
            owner: &str,
            now: DateTime<Utc>,
            alive_since: DateTime<Utc>,
        ) -> Result<usize, StoreError> {
            sqlx::query(
                "INSERT INTO processes (owner, seen_at) VALUES ($1, $2) \
                 ON CONFLICT (owner) DO UPDATE SET seen_at = $2",
            )
            .bind(owner.to_owned())
            .bind(to_ms(now))
            .execute(&mut *c)
            .await?;
            sqlx::query("DELETE FROM processes WHERE seen_at < $1")
                .bind(to_ms(alive_since))
                .execute(&mut *c)
                .await?;
            let others: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM processes WHERE owner <> $1")
                .bind(owner.to_owned())
                .fetch_one(&mut *c)
                .await?;
            Ok(others.max(0) as usize)
        }
    };
}
pub(super) use lifecycle_helpers;

#[cfg(test)]
mod tests {
    use sqlx::Connection;

    /// The shared statements rest on sqlx binding SQLite's `$N` to the
    /// N-th argument, whatever order the parameters appear in and however
    /// often (SQLite alone would number them by first appearance).
    #[tokio::test]
    async fn sqlite_binds_dollar_n_to_the_nth_argument_as_postgres_does() {
        let mut c = sqlx::SqliteConnection::connect("sqlite::memory:")
            .await
            .unwrap();
        let got: String = sqlx::query_scalar("SELECT $3 || $1 || $2 || $1")
            .bind("a")
            .bind("b")
            .bind("c")
            .fetch_one(&mut c)
            .await
            .unwrap();
        assert_eq!(got, "caba");
        let _ = c.close().await;
    }
}
