//! The PostgreSQL store: the same [`Store`] as [`super::SqliteStore`], on a server that
//! several gateways share.
//!
//! Selected by `[store] url = "postgres://…"` (or `SWITCHYARD_STORE_URL`). Migrations are
//! versioned and applied at open under an advisory lock, so instances starting together
//! do not race. Ingest answers only after the commit; events without an idempotency key
//! that arrive together are committed together (one `INSERT … FROM UNNEST`, see
//! `commit_ingest`), and each later step of an event is one statement.
//!
//! Several instances on one database (scale-out): every claim is a lease (`[store] lease`).
//! An accepted event is claimed by the instance that accepted it; while it holds the event
//! (queued in memory or in the pipeline) the instance renews the claim, and a sweeper in
//! every instance takes over queued events whose claim ran out (an instance died) with
//! `FOR UPDATE SKIP LOCKED`. Due deliveries are claimed the same way, so two instances
//! never attempt the same delivery at once. Processing an event twice is harmless:
//! delivery ids are derived from the event, and a delivery that exists is not inserted or
//! sent again. Managed objects carry a version that every instance polls (see
//! `crate::reload`), and destination states are read back by every dispatcher.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use deadpool_postgres::{Pool, Runtime};
use tokio_postgres::NoTls;
use tokio_postgres::Row;
use tokio_postgres::error::Severity;

use super::*;
use crate::event::{Body, Event};
use crate::pace;

/// The migrations, in order; `schema_version` holds how many ran.
const SCHEMA: &[&str] = &[
    // 1: everything the SQLite store has at its version 2.
    r#"
    CREATE TABLE events (
        id TEXT PRIMARY KEY,
        source TEXT NOT NULL,
        received_at BIGINT NOT NULL,
        method TEXT NOT NULL,
        path TEXT NOT NULL,
        query TEXT NOT NULL,
        headers TEXT NOT NULL,
        content_type TEXT,
        body BYTEA NOT NULL,
        status TEXT NOT NULL,
        run INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX events_queued ON events (received_at) WHERE status = 'queued';
    CREATE INDEX events_received ON events (received_at);
    CREATE TABLE idempotency (
        source TEXT NOT NULL,
        key TEXT NOT NULL,
        event_id TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        PRIMARY KEY (source, key)
    );
    CREATE TABLE route_outcomes (
        event_id TEXT NOT NULL,
        run INTEGER NOT NULL,
        route INTEGER NOT NULL,
        outcome TEXT NOT NULL,
        PRIMARY KEY (event_id, run, route)
    );
    CREATE TABLE deliveries (
        seq BIGSERIAL PRIMARY KEY,
        id TEXT NOT NULL UNIQUE,
        event_id TEXT NOT NULL,
        route INTEGER NOT NULL,
        destination TEXT NOT NULL,
        url TEXT NOT NULL,
        headers TEXT NOT NULL,
        body BYTEA NOT NULL,
        status TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at BIGINT,
        lease_until BIGINT,
        created_at BIGINT NOT NULL
    );
    CREATE INDEX deliveries_due ON deliveries (next_attempt_at) WHERE status = 'pending';
    CREATE INDEX deliveries_event ON deliveries (event_id);
    CREATE INDEX deliveries_status ON deliveries (status, seq);
    CREATE TABLE attempts (
        delivery_id TEXT NOT NULL,
        n INTEGER NOT NULL,
        at BIGINT NOT NULL,
        duration_ms BIGINT NOT NULL,
        status_code INTEGER,
        error TEXT,
        response TEXT,
        PRIMARY KEY (delivery_id, n)
    );
    CREATE TABLE destination_state (
        name TEXT PRIMARY KEY,
        state TEXT NOT NULL,
        consecutive_failures INTEGER NOT NULL,
        last_error TEXT
    );
    CREATE TABLE managed_objects (
        kind TEXT NOT NULL,
        name TEXT NOT NULL,
        body TEXT NOT NULL,
        updated_at BIGINT NOT NULL,
        PRIMARY KEY (kind, name)
    );
    -- The body's top-level `type` (or `event_type`) when it is a JSON object, else NULL.
    CREATE FUNCTION switchyard_event_type(body BYTEA) RETURNS TEXT AS $$
    DECLARE j JSONB;
    BEGIN
        j := convert_from(body, 'UTF8')::JSONB;
        IF jsonb_typeof(j) = 'object' THEN
            RETURN COALESCE(j ->> 'type', j ->> 'event_type');
        END IF;
        RETURN NULL;
    EXCEPTION WHEN others THEN
        RETURN NULL;
    END;
    $$ LANGUAGE plpgsql IMMUTABLE;
    "#,
    // 2: scale-out: claims on queued events, destination state epochs (see
    // `Store::record_destination_state`), and a version of the managed objects.
    r#"
    ALTER TABLE events ADD COLUMN lease_until BIGINT;
    ALTER TABLE destination_state ADD COLUMN epoch BIGINT NOT NULL DEFAULT 0;
    CREATE TABLE managed_version (version BIGINT NOT NULL);
    INSERT INTO managed_version (version) VALUES (0);
    "#,
    // 3: a delivery whose body is the event's own keeps no copy of it (see
    // `store::body_from_event`).
    "ALTER TABLE deliveries ADD COLUMN body_from_event BOOLEAN NOT NULL DEFAULT false;",
    // 4: as SQLite's version 5 — deliveries listed by status from an index of the
    // undelivered ones; queries on it repeat its `status <> 'delivered'` term.
    "DROP INDEX deliveries_status;
     CREATE INDEX deliveries_undelivered ON deliveries (status, seq) WHERE status <> 'delivered';",
    // 5: as SQLite's version 6 — the run of the event that made a delivery.
    "ALTER TABLE deliveries ADD COLUMN run INTEGER NOT NULL DEFAULT 0;",
    // 6: as SQLite's version 7 — routes failed in the event's latest run, on the event.
    "ALTER TABLE events ADD COLUMN failed_routes INTEGER NOT NULL DEFAULT 0;
     UPDATE events SET failed_routes = (SELECT COUNT(*) FROM route_outcomes o
         WHERE o.event_id = events.id AND o.run = events.run
           AND o.outcome::jsonb #>> '{result,result}' = 'failed')
     WHERE id IN (SELECT o.event_id FROM route_outcomes o
         WHERE o.outcome::jsonb #>> '{result,result}' = 'failed');
     CREATE INDEX events_dead_lettered ON events (received_at, id) WHERE failed_routes > 0;",
    // 7: as SQLite's version 8 — deliveries to a destination that is not ACTIVE are held.
    "UPDATE deliveries SET next_attempt_at = NULL WHERE status = 'pending'
         AND destination IN (SELECT name FROM destination_state WHERE state != 'active');",
    // 8: as SQLite's version 9 — idempotency keys are purged by age.
    "CREATE INDEX idempotency_created ON idempotency (created_at);",
    // 9: as SQLite's version 10 — attempts by time, for the per-minute counts.
    "CREATE INDEX attempts_at ON attempts (at);",
    // 10: as SQLite's version 11 — events by source and time, for lists by source; and
    // by time with the id (SQLite's rowid order stands in for it), so that a list or a
    // purge in (time, id) order needs no sort.
    "CREATE INDEX events_source ON events (source, received_at, id);
     DROP INDEX events_received;
     CREATE INDEX events_received ON events (received_at, id);",
    // 11: a field of the body, for lists filtered by one (`FieldMatch`): its text when the
    // body is a JSON object, else NULL.
    r#"CREATE FUNCTION switchyard_body_field(body BYTEA, path TEXT[]) RETURNS TEXT AS $$
    DECLARE j JSONB;
    BEGIN
        j := convert_from(body, 'UTF8')::JSONB;
        IF jsonb_typeof(j) = 'object' THEN
            RETURN j #>> path;
        END IF;
        RETURN NULL;
    EXCEPTION WHEN others THEN
        RETURN NULL;
    END;
    $$ LANGUAGE plpgsql IMMUTABLE;"#,
    // 12: as SQLite's version 12 — pending deliveries by destination and due time, for
    // claims that go destination by destination.
    "CREATE INDEX deliveries_destination_due ON deliveries (destination, next_attempt_at)
         WHERE status = 'pending';",
    // 13: a field of the body compared by its JSON type, as SQLite's `list_events` does
    // (`FieldMatch`): a string by its text, a number by its value (`num`, `equals` read as a
    // number, NULL if it is not one), `true`/`false`/`null` by name. Replaces 11's.
    r#"DROP FUNCTION switchyard_body_field(BYTEA, TEXT[]);
    CREATE FUNCTION switchyard_body_matches(body BYTEA, path TEXT[], equals TEXT, num NUMERIC)
    RETURNS BOOLEAN AS $$
    DECLARE j JSONB;
    BEGIN
        j := convert_from(body, 'UTF8')::JSONB;
        IF jsonb_typeof(j) <> 'object' THEN
            RETURN NULL;
        END IF;
        j := j #> path;
        RETURN CASE jsonb_typeof(j)
            WHEN 'string' THEN j #>> '{}' = equals
            WHEN 'number' THEN (j #>> '{}')::NUMERIC = num
            WHEN 'boolean' THEN j #>> '{}' = equals
            WHEN 'null' THEN equals = 'null'
        END;
    EXCEPTION WHEN others THEN
        RETURN NULL;
    END;
    $$ LANGUAGE plpgsql IMMUTABLE;"#,
    // 14: as SQLite's version 13 — held deliveries (no due time) out of
    // `deliveries_destination_due`, found by destination for a restart by `deliveries_held`.
    "DROP INDEX deliveries_destination_due;
     CREATE INDEX deliveries_destination_due ON deliveries (destination, next_attempt_at)
         WHERE status = 'pending' AND next_attempt_at IS NOT NULL;
     CREATE INDEX deliveries_held ON deliveries (destination)
         WHERE status = 'pending' AND next_attempt_at IS NULL;",
    // 15: a field of the body as JSON (NULL when the body is not a JSON object or lacks
    // it): the key of the indexes on body fields (`store.indexed_fields`, see `field_key`).
    r#"CREATE FUNCTION switchyard_body_value(body BYTEA, path TEXT[]) RETURNS JSONB AS $$
    DECLARE j JSONB;
    BEGIN
        j := convert_from(body, 'UTF8')::JSONB;
        IF jsonb_typeof(j) = 'object' THEN
            RETURN j #> path;
        END IF;
        RETURN NULL;
    EXCEPTION WHEN others THEN
        RETURN NULL;
    END;
    $$ LANGUAGE plpgsql IMMUTABLE;"#,
    // 16: a log of the managed objects' changes, so that an instance following the others
    // reads only what changed since the version it has seen (`Store::managed_changes`): each
    // row carries the version its last change brought, each deletion leaves the name
    // and its version in `managed_deleted` (until the name is made again). Kept by a
    // trigger, which moves the version too, so that no writer — an older binary, a hand
    // edit — can change an object unseen.
    r#"ALTER TABLE managed_objects ADD COLUMN version BIGINT NOT NULL DEFAULT 0;
    CREATE INDEX managed_objects_version ON managed_objects (version);
    CREATE TABLE managed_deleted (
        kind TEXT NOT NULL,
        name TEXT NOT NULL,
        version BIGINT NOT NULL,
        PRIMARY KEY (kind, name)
    );
    CREATE INDEX managed_deleted_version ON managed_deleted (version);
    CREATE FUNCTION switchyard_managed_changed() RETURNS TRIGGER AS $$
    DECLARE v BIGINT;
    BEGIN
        UPDATE managed_version SET version = version + 1 RETURNING version INTO v;
        IF TG_OP = 'DELETE' THEN
            INSERT INTO managed_deleted (kind, name, version) VALUES (OLD.kind, OLD.name, v)
                ON CONFLICT (kind, name) DO UPDATE SET version = excluded.version;
            RETURN OLD;
        END IF;
        DELETE FROM managed_deleted WHERE kind = NEW.kind AND name = NEW.name;
        NEW.version := v;
        RETURN NEW;
    END;
    $$ LANGUAGE plpgsql;
    CREATE TRIGGER managed_objects_changed BEFORE INSERT OR UPDATE OR DELETE ON managed_objects
        FOR EACH ROW EXECUTE FUNCTION switchyard_managed_changed();"#,
    // 17: rate limits shared by every instance (`Store::take_slot`): each destination's
    // and source's theoretical arrival time (ms) in a table all update, a step of the GCRA
    // at a time (`TAKE_SLOT`), `taken` saying whether the last step took its slot.
    // Unlogged: no WAL, so taking a slot is not a synced commit; after a crash of the
    // server it is empty, and each limit starts afresh (one burst). As SQLite's version
    // 14, deliveries put off by a limit are marked paced.
    "ALTER TABLE deliveries ADD COLUMN paced BOOLEAN NOT NULL DEFAULT false;
    CREATE UNLOGGED TABLE rate_limits (
        kind TEXT NOT NULL,
        name TEXT NOT NULL,
        tat DOUBLE PRECISION NOT NULL,
        taken BOOLEAN NOT NULL,
        PRIMARY KEY (kind, name)
    );",
    // 18: a body field's value is indexed only up to `FIELD_KEY_MAX` bytes of JSON: a
    // longer one made its event's insert fail (a B-tree entry holds ~2.7 KB), and with it
    // the rest of its ingest batch. The indexes made with the old function are dropped;
    // the next `index_fields` builds them anew, concurrently.
    r#"CREATE OR REPLACE FUNCTION switchyard_body_value(body BYTEA, path TEXT[]) RETURNS JSONB AS $$
    DECLARE j JSONB;
    BEGIN
        j := convert_from(body, 'UTF8')::JSONB;
        IF jsonb_typeof(j) = 'object' THEN
            j := j #> path;
            IF octet_length(j::TEXT) <= 1024 THEN
                RETURN j;
            END IF;
        END IF;
        RETURN NULL;
    EXCEPTION WHEN others THEN
        RETURN NULL;
    END;
    $$ LANGUAGE plpgsql IMMUTABLE;
    DO $$
    DECLARE r RECORD;
    BEGIN
        FOR r IN SELECT c.relname::TEXT AS name FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
                 WHERE i.indrelid = 'events'::regclass AND starts_with(c.relname::TEXT, 'events_field_')
        LOOP
            EXECUTE format('DROP INDEX %I', r.name);
        END LOOP;
    END $$;"#,
    // 19: what plugins keep from one event to the next (the WIT `state` interface), by
    // plugin and key — keys compared bytewise (`"C"`), as SQLite does, so that a listing
    // by prefix is a range of the key; every value expires (`Store::purge_state`).
    r#"CREATE TABLE plugin_state (
        plugin TEXT NOT NULL,
        key TEXT COLLATE "C" NOT NULL,
        value TEXT NOT NULL,
        expires_at BIGINT NOT NULL,
        PRIMARY KEY (plugin, key)
    );
    CREATE INDEX plugin_state_expires ON plugin_state (expires_at);"#,
    // 20: when each destination entered its state (ms), as SQLite's version 16.
    "ALTER TABLE destination_state ADD COLUMN since BIGINT NOT NULL DEFAULT 0;",
];

/// The longest JSON value of a body field (in bytes) that its index holds (migration 18):
/// a list by a longer one reads the bodies instead.
const FIELD_KEY_MAX: usize = 1024;

/// `Store::list_events` (see SQLite's `list_events_sql`): by `events_source` when a source
/// is given ($1), else by `events_received` or `events_dead_lettered`, each bound a range.
/// The type is read from the body where the body is a JSON object. With `indexed`, the key
/// of the field's index (`field_key`), only events whose field is the JSON value $13.
fn list_events_sql(by_source: bool, dead_lettered: bool, indexed: Option<&str>) -> String {
    let source = if by_source {
        "e.source = $1"
    } else {
        "$1::TEXT IS NULL"
    };
    let by_key = indexed.map_or(String::new(), |key| format!("AND {key} = $13::TEXT::JSONB"));
    let route_result = if dead_lettered {
        DEAD_LETTERED
    } else {
        ROUTE_RESULT
    };
    format!(
        "SELECT e.id, e.source, e.received_at, e.status, switchyard_event_type(e.body),
            (SELECT COUNT(*) FROM deliveries d WHERE d.event_id = e.id AND d.status = 'pending'),
            (SELECT COUNT(*) FROM deliveries d WHERE d.event_id = e.id AND d.status = 'delivered'),
            (SELECT COUNT(*) FROM deliveries d WHERE d.event_id = e.id AND d.status = 'failed'),
            e.failed_routes, octet_length(e.body) + octet_length(e.headers)
         FROM events e
         WHERE {source}
           {by_key}
           AND ($2::TEXT IS NULL OR e.status = $2)
           AND ($3::TEXT IS NULL OR switchyard_event_type(e.body) LIKE $3)
           AND ($10::TEXT[] IS NULL OR switchyard_body_matches(e.body, $10, $11, $12::TEXT::NUMERIC))
           AND e.received_at >= $4 AND e.received_at < $5
           AND (e.received_at, e.id) < ($6, $7)
           {route_result}
         ORDER BY e.received_at DESC, e.id DESC LIMIT $8"
    )
}

/// What the index on a body field (`store.indexed_fields`) holds of each event, besides its
/// time and id: the field's JSON value (`switchyard_body_value`). The path is written out,
/// as PostgreSQL uses an index on an expression only for the same expression.
fn field_key(path: &[String]) -> String {
    let keys: Vec<String> = path.iter().map(|k| format!("\"{k}\"")).collect();
    let path = format!("{{{}}}", keys.join(",")).replace('\'', "''");
    format!("switchyard_body_value(body, '{path}'::TEXT[])")
}

/// The index on a body field, named `name` (`field_index_name`), built while events go on
/// being written: by its key, then newest first as `events_source` is by source.
fn create_field_index(name: &str, path: &[String]) -> String {
    let key = field_key(path);
    format!(
        "CREATE INDEX CONCURRENTLY IF NOT EXISTS \"{name}\" ON events (({key}), received_at, id)"
    )
}

/// The JSON values a field equal to `field.equals` may be (see `FieldMatch`), each looked
/// up in its index in turn: the string, and the number, `true`, `false` or `null` it also
/// reads as (jsonb compares numbers by value).
fn field_keys(field: &FieldMatch) -> Vec<String> {
    let scalar = matches!(
        serde_json::from_str::<serde_json::Value>(&field.equals),
        Ok(serde_json::Value::Number(_) | serde_json::Value::Bool(_) | serde_json::Value::Null)
    );
    let text = serde_json::Value::String(field.equals.clone()).to_string();
    std::iter::once(text)
        .chain(scalar.then(|| field.equals.clone()))
        .collect()
}

/// Held by the instance changing the body field indexes (`Store::index_fields`).
const FIELD_INDEX_LOCK: i64 = 0x5357_4649_454c;

/// Makes the body field indexes those of `fields`: drops the others (and any whose
/// `CREATE INDEX CONCURRENTLY` was cut off), builds the missing ones. Concurrently: events
/// go on being written, and other instances work, meanwhile.
async fn sync_field_indexes(
    client: &deadpool_postgres::Client,
    fields: &[Vec<String>],
) -> Result<FieldIndexes, StoreError> {
    let existing: Vec<(String, bool)> = (client.query(FIELD_INDEXES, &[&FIELD_INDEX_PREFIX]))
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let wanted: Vec<(String, &Vec<String>)> = (fields.iter())
        .map(|path| (field_index_name(&field_key(path)), path))
        .collect();
    let mut changed = FieldIndexes::default();
    for (name, valid) in &existing {
        if !*valid || !wanted.iter().any(|(n, _)| n == name) {
            (client.batch_execute(&format!("DROP INDEX CONCURRENTLY IF EXISTS \"{name}\"")))
                .await?;
            changed.dropped += usize::from(*valid);
        }
    }
    for (name, path) in &wanted {
        if !existing.iter().any(|(n, valid)| n == name && *valid) {
            client
                .batch_execute(&create_field_index(name, path))
                .await?;
            changed.created.push(path.join("."));
        }
    }
    Ok(changed)
}

/// The store's body field indexes on `events`, and whether each is usable (one whose
/// `CREATE INDEX CONCURRENTLY` was cut off is not).
const FIELD_INDEXES: &str = "SELECT c.relname::TEXT, i.indisvalid FROM pg_index i
    JOIN pg_class c ON c.oid = i.indexrelid
    WHERE i.indrelid = 'events'::regclass AND starts_with(c.relname::TEXT, $1)";

/// A row of `list_events_sql`.
fn summary_from_row(r: &Row) -> EventSummary {
    let status: String = r.get(3);
    EventSummary {
        id: r.get(0),
        source: r.get(1),
        received_at: r.get::<_, i64>(2) as u64,
        status: if status == "queued" {
            EventStatus::Queued
        } else {
            EventStatus::Processed
        },
        event_type: r.get(4),
        pending: r.get::<_, i64>(5) as u64,
        delivered: r.get::<_, i64>(6) as u64,
        failed: r.get::<_, i64>(7) as u64,
        failed_routes: r.get::<_, i32>(8) as u64,
        queued_bytes: r.get::<_, i32>(9) as u64,
    }
}

/// What an event takes up in the queue (see SQLite's).
const QUEUED_BYTES: &str =
    "SELECT octet_length(body) + octet_length(headers) FROM events WHERE id = $1";

/// The filter of `list_events` on route results (see SQLite's), bound as $9 either way.
const DEAD_LETTERED: &str = "AND e.failed_routes > 0 AND $9::TEXT = 'failed'";
const ROUTE_RESULT: &str = "AND ($9::TEXT IS NULL OR EXISTS (SELECT 1 FROM route_outcomes o
    WHERE o.event_id = e.id AND o.run = e.run AND o.outcome::jsonb #>> '{result,result}' = $9))";

/// Deliveries in `seq` order: all of them, the delivered ones, or those of another status
/// (from `deliveries_undelivered`). Bound: status, after, limit.
const LIST_DELIVERIES_ALL: &str = "SELECT * FROM deliveries
    WHERE $1::TEXT IS NULL AND $4::TEXT IS NULL AND seq > $2 ORDER BY seq LIMIT $3";
const LIST_DELIVERIES_DELIVERED: &str = "SELECT * FROM deliveries
    WHERE status = $1 AND $4::TEXT IS NULL AND seq > $2 ORDER BY seq LIMIT $3";
/// As SQLite's: of one destination ($4) or all, walking `deliveries_undelivered`.
const LIST_DELIVERIES_UNDELIVERED: &str = "SELECT * FROM deliveries
    WHERE status = $1 AND status <> 'delivered' AND seq > $2
      AND ($4::TEXT IS NULL OR destination = $4) ORDER BY seq LIMIT $3";
/// When the oldest pending delivery was created: the first by `seq` (which follows
/// creation), one probe of `deliveries_undelivered`; `MIN(created_at)` read every pending
/// row.
const OLDEST_PENDING: &str = "SELECT created_at FROM deliveries
    WHERE status = 'pending' AND status <> 'delivered' ORDER BY seq LIMIT 1";
/// The start of an update that makes deliveries due at `$now` again, as a retry by hand
/// does — or held (no due time) while their destination is not ACTIVE (see `HOLD`).
macro_rules! due_again {
    ($now:literal) => {
        concat!(
            "UPDATE deliveries SET status = 'pending', lease_until = NULL,
                next_attempt_at = CASE WHEN EXISTS (SELECT 1 FROM destination_state s
                    WHERE s.name = deliveries.destination AND s.state != 'active')
                    THEN NULL ELSE ",
            $now,
            " END"
        )
    };
}

/// `Store::recover_deliveries`: the next failed deliveries from a cursor, by
/// `deliveries_undelivered`.
const RECOVER_LOOK: &str = "SELECT seq FROM deliveries
    WHERE status = 'failed' AND status <> 'delivered' AND seq > $1 ORDER BY seq LIMIT $2";
/// Pending and failed deliveries per destination.
const DELIVERY_COUNTS: &str = "SELECT destination, COUNT(*) FILTER (WHERE status = 'pending'),
        COUNT(*) FILTER (WHERE status = 'failed')
    FROM deliveries WHERE status IN ('pending', 'failed') AND status <> 'delivered'
    GROUP BY destination";

/// How often the sweeper looks for queued events whose claim ran out.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// The most events one sweep takes over.
const SWEEP_BATCH: usize = 256;

/// The most events one ingest commit takes.
const INGEST_BATCH: usize = 256;

/// Ingest commits in flight at once: while one waits for its commit, the next batch
/// gathers.
const INGEST_COMMITTERS: usize = 2;

/// An event to insert, and where to say whether its commit succeeded.
type IngestJob = (Event, tokio::sync::oneshot::Sender<Result<(), StoreError>>);

/// Group commit of ingest: takes whatever events arrived meanwhile (up to
/// `INGEST_BATCH`), inserts them with one statement (one commit, one WAL flush), and
/// answers each. Ends when the store is dropped.
async fn commit_ingest(
    pool: Pool,
    jobs: Arc<tokio::sync::Mutex<tokio::sync::mpsc::UnboundedReceiver<IngestJob>>>,
    lease: Duration,
) {
    loop {
        let mut batch = Vec::new();
        {
            let mut jobs = jobs.lock().await;
            if jobs.recv_many(&mut batch, INGEST_BATCH).await == 0 {
                return;
            }
        }
        let events: Vec<Event> = batch.iter().map(|(e, _)| e.clone()).collect();
        let failed = |e: &dyn std::fmt::Display| StoreError::Db(e.to_string());
        let results: Vec<Result<(), StoreError>> = match pool.get().await {
            Ok(client) => match insert_events(&client, &events, lease).await {
                Ok(()) => events.iter().map(|_| Ok(())).collect(),
                // The server refused the statement (an ERROR: the connection stands, and
                // nothing of it is stored; a FATAL, as at a crash, may come after the
                // commit): one event it cannot keep fails only itself, the others are
                // inserted anew.
                Err(e)
                    if (e.as_db_error())
                        .is_some_and(|db| db.parsed_severity() == Some(Severity::Error)) =>
                {
                    let e = StoreError::from(e);
                    if events.len() == 1 {
                        vec![Err(e)]
                    } else {
                        tracing::warn!(error = %e, "An ingest batch was refused; inserting its events one by one.");
                        let mut results = Vec::new();
                        for event in &events {
                            let one =
                                insert_events(&client, std::slice::from_ref(event), lease).await;
                            results.push(one.map_err(StoreError::from));
                        }
                        results
                    }
                }
                Err(e) => {
                    let e = StoreError::from(e);
                    let ids: Vec<&str> = events.iter().map(|e| e.id.as_str()).collect();
                    let stored = stored_after_all(&pool, &ids).await;
                    (events.iter())
                        .map(|event| match stored.contains(&event.id) {
                            true => Ok(()),
                            false => Err(failed(&e)),
                        })
                        .collect()
                }
            },
            // Nothing was sent.
            Err(e) => {
                let e = StoreError::from(e);
                events.iter().map(|_| Err(failed(&e))).collect()
            }
        };
        for ((_, reply), result) in batch.into_iter().zip(results) {
            let _ = reply.send(result);
        }
    }
}

/// After an insert of events `ids` that failed — perhaps only its answer was lost with
/// the connection, the commit having happened — which of them are stored after all: the
/// sender is told they are accepted (instead of `503` and a second copy when it tries
/// again without an idempotency key), and this instance processes them now (instead of
/// after their lease, when the sweep finds them). Asked on a new connection, a few times
/// while the database does not answer; none, if it never does. (A commit still under way
/// on the server is not seen: those events wait for their lease, as all did before.)
async fn stored_after_all(pool: &Pool, ids: &[&str]) -> HashSet<String> {
    for wait in [0, 200, 800].map(Duration::from_millis) {
        tokio::time::sleep(wait).await;
        let Ok(client) = pool.get().await else {
            continue;
        };
        match client
            .query("SELECT id FROM events WHERE id = ANY($1)", &[&ids])
            .await
        {
            Ok(rows) => {
                let stored: HashSet<String> = rows.iter().map(|r| r.get(0)).collect();
                if !stored.is_empty() {
                    tracing::info!(
                        events = stored.len(),
                        "An ingest commit's answer was lost, but the events are stored: accepted."
                    );
                }
                return stored;
            }
            Err(e) => tracing::debug!(error = %e, "Cannot look for events whose insert failed."),
        }
    }
    HashSet::new()
}

/// Inserts queued events, claimed by this instance for `lease`, with one statement.
async fn insert_events(
    client: &impl deadpool_postgres::GenericClient,
    events: &[Event],
    lease: Duration,
) -> Result<(), tokio_postgres::Error> {
    let col = |f: fn(&Event) -> String| events.iter().map(f).collect::<Vec<String>>();
    let received: Vec<i64> = events.iter().map(|e| e.received_at as i64).collect();
    let content_types: Vec<Option<String>> =
        events.iter().map(|e| e.content_type.clone()).collect();
    let bodies: Vec<&[u8]> = events.iter().map(|e| e.body.as_bytes()).collect();
    let runs: Vec<i32> = events.iter().map(|e| e.run as i32).collect();
    let until = (crate::delivery::now_ms() + lease.as_millis() as u64) as i64;
    let statement = client
        .prepare_cached(
            "INSERT INTO events (id, source, received_at, method, path, query, headers, content_type, body, status, run, lease_until)
             SELECT id, source, received_at, method, path, query, headers, content_type, body, 'queued', run, $11
             FROM UNNEST($1::TEXT[], $2::TEXT[], $3::BIGINT[], $4::TEXT[], $5::TEXT[], $6::TEXT[], $7::TEXT[],
                         $8::TEXT[], $9::BYTEA[], $10::INTEGER[])
                  AS t(id, source, received_at, method, path, query, headers, content_type, body, run)",
        )
        .await?;
    client
        .execute(
            &statement,
            &[
                &col(|e| e.id.clone()),
                &col(|e| e.source.clone()),
                &received,
                &col(|e| e.method.clone()),
                &col(|e| e.path.clone()),
                &col(|e| e.query.clone()),
                &col(|e| json(&e.headers)),
                &content_types,
                &bodies,
                &runs,
                &until,
            ],
        )
        .await?;
    Ok(())
}

/// Any advisory-lock key that is ours: serialises migrations across instances.
const MIGRATION_LOCK: i64 = 0x5357_4954_4348;

/// How long a connection attempt may take, unless the URL says (`connect_timeout`).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long data sent to the server may go unacknowledged before the connection is
/// dropped, unless the URL says (`tcp_user_timeout`; Linux). Without it a database that
/// stops answering — a network that drops packets rather than refusing them — holds every
/// statement in flight for the kernel's ~15 minutes of retransmissions, and ingest, the
/// pipeline and deliveries with it; with it they fail in seconds (ingest answers 503, the
/// rest is tried again) and the pool opens new connections once the server answers.
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(20);
/// A connection idle this long is probed (TCP keepalive), unless the URL says
/// (`keepalives_idle`): a server gone while a connection sits idle is noticed before it
/// is used, instead of two hours later.
const KEEPALIVES_IDLE: Duration = Duration::from_secs(30);

/// The connection settings of a `store.url`: the URL's, with the timeouts above where it
/// names none (one it sets to 0 stays off, as libpq has it).
fn connection_config(url: &str) -> Result<tokio_postgres::Config, StoreError> {
    let mut config: tokio_postgres::Config = url
        .parse()
        .map_err(|e| StoreError::Db(format!("invalid store url: {e}")))?;
    // (In a URL's query or a `key=value` string alike.)
    let names = |key: &str| url.contains(&format!("{key}=")) || url.contains(&format!("{key} ="));
    if !names("connect_timeout") {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    if !names("tcp_user_timeout") {
        config.tcp_user_timeout(TCP_USER_TIMEOUT);
    }
    if !names("keepalives_idle") {
        config.keepalives_idle(KEEPALIVES_IDLE);
    }
    Ok(config)
}

impl From<tokio_postgres::Error> for StoreError {
    fn from(e: tokio_postgres::Error) -> Self {
        StoreError::Db(match e.as_db_error() {
            Some(db) => format!("{}: {}", db.code().code(), db.message()),
            None => e.to_string(),
        })
    }
}

impl From<deadpool_postgres::PoolError> for StoreError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        StoreError::Db(format!("no database connection: {e}"))
    }
}

/// The PostgreSQL store.
pub struct PgStore {
    pool: Pool,
    queue: Arc<EventQueue>,
    /// Events (without an idempotency key) waiting for the next ingest batch.
    ingest: tokio::sync::mpsc::UnboundedSender<IngestJob>,
    /// How long a claim on an event lasts unless renewed.
    lease: Duration,
    /// How long an event listing may run (`LIST_BUDGET`).
    list_budget: Duration,
    /// The body fields indexed (`Store::index_fields`): a list by one looks it up.
    indexed: arc_swap::ArcSwap<std::collections::HashSet<Vec<String>>>,
}

impl PgStore {
    /// Stores an event for [`Store::insert_event`] (which holds its room in the queue and
    /// queues it once stored).
    async fn store_event(
        &self,
        event: &Event,
        idempotency: Option<Idempotency>,
    ) -> Result<Inserted, StoreError> {
        let Some(idem) = &idempotency else {
            // Without a key there is nothing to check: the event joins the next batch.
            let (reply, committed) = tokio::sync::oneshot::channel();
            self.ingest
                .send((event.clone(), reply))
                .map_err(|_| StoreError::Closed)?;
            committed.await.map_err(|_| StoreError::Closed)??;
            return Ok(Inserted::New);
        };
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let since = event.received_at.saturating_sub(idem.window_ms) as i64;
        // The row lock of the key makes concurrent repeats (on any instance) wait for the
        // first one's commit.
        tx.execute(
            "INSERT INTO idempotency (source, key, event_id, created_at) VALUES ($1, $2, $3, $4)
             ON CONFLICT (source, key) DO UPDATE SET event_id = idempotency.event_id",
            &[
                &event.source,
                &idem.key,
                &event.id,
                &(event.received_at as i64),
            ],
        )
        .await?;
        let row = tx
            .query_one(
                "SELECT event_id, created_at FROM idempotency WHERE source = $1 AND key = $2",
                &[&event.source, &idem.key],
            )
            .await?;
        let (existing, created_at): (String, i64) = (row.get(0), row.get(1));
        if existing != event.id {
            if created_at >= since {
                return Ok(Inserted::Duplicate(existing));
            }
            tx.execute(
                "UPDATE idempotency SET event_id = $3, created_at = $4 WHERE source = $1 AND key = $2",
                &[&event.source, &idem.key, &event.id, &(event.received_at as i64)],
            )
            .await?;
        }
        insert_events(&tx, std::slice::from_ref(event), self.lease).await?;
        if let Err(e) = tx.commit().await
            && !stored_after_all(&self.pool, &[&event.id])
                .await
                .contains(&event.id)
        {
            return Err(e.into());
        }
        Ok(Inserted::New)
    }

    /// Connects to `url`, migrates the database, takes over the queued events nobody holds
    /// (accepted before the last stop, or by an instance whose claims ran out), and starts
    /// the task that renews this instance's claims and sweeps for abandoned events. Claims
    /// on events last `lease` unless renewed.
    pub async fn open(url: &str, capacity: usize, lease: Duration) -> Result<Self, StoreError> {
        let manager = deadpool_postgres::Manager::new(connection_config(url)?, NoTls);
        let pool = Pool::builder(manager)
            .max_size(32)
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|e| StoreError::Db(format!("cannot make the connection pool: {e}")))?;
        let mut client = pool.get().await?;
        let tx = client.transaction().await?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .await?;
        tx.batch_execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            .await?;
        let version: i32 = tx
            .query_opt("SELECT version FROM schema_version", &[])
            .await?
            .map_or(0, |r| r.get(0));
        for (i, sql) in SCHEMA.iter().enumerate().skip(version as usize) {
            tx.batch_execute(sql).await?;
            tracing::info!(version = i + 1, "Store migrated.");
        }
        if (version as usize) < SCHEMA.len() {
            tx.execute("DELETE FROM schema_version", &[]).await?;
            tx.execute(
                "INSERT INTO schema_version (version) VALUES ($1)",
                &[&(SCHEMA.len() as i32)],
            )
            .await?;
        }
        tx.commit().await?;
        drop(client);
        let queue = Arc::new(EventQueue::new(Vec::new(), capacity));
        let resumed = sweep(&pool, &queue, lease).await?;
        if resumed > 0 {
            tracing::info!(
                events = resumed,
                "Taking over queued events that no running gateway holds."
            );
        }
        tokio::spawn(keep_claims(pool.clone(), Arc::downgrade(&queue), lease));
        let (ingest, jobs) = tokio::sync::mpsc::unbounded_channel();
        let jobs = Arc::new(tokio::sync::Mutex::new(jobs));
        for _ in 0..INGEST_COMMITTERS {
            tokio::spawn(commit_ingest(pool.clone(), jobs.clone(), lease));
        }
        Ok(Self {
            pool,
            queue,
            ingest,
            lease,
            list_budget: LIST_BUDGET,
            indexed: Default::default(),
        })
    }

    /// Refuses events (`QueueBytesFull`) once those waiting take up `max` bytes instead of
    /// `QUEUE_MAX_BYTES` (`server.queue_max_bytes`).
    pub fn with_queue_max_bytes(self, max: usize) -> Self {
        self.queue
            .max_bytes
            .store(max, std::sync::atomic::Ordering::Relaxed);
        self
    }

    /// Stops event listings after `budget` instead of `LIST_BUDGET` (tests).
    pub fn with_list_budget(mut self, budget: Duration) -> Self {
        self.list_budget = budget;
        self
    }

    /// An event whose outcome could not be recorded (the database went away, say) is still
    /// `queued` and claimed by this instance: it is queued here again after a pause that
    /// doubles with each failure in a row, its claim renewed then — instead of waiting for
    /// the claim to run out (`store.lease`) and a sweep to find it. The pause stays within
    /// half a lease, so that the claim has not run out meanwhile.
    /// After `complete_event` failed: see [`EventQueue::retry_later`]. The outcome's commit
    /// may have happened with only its answer lost (the connection broke): then the
    /// deliveries it leased to this gateway's pipeline, which will not send them, are
    /// released first — `leased`: their ids and the lease they were written with, which
    /// no later claim has — so that the dispatcher sends them now instead of when that
    /// lease runs out.
    fn retry_later(&self, event: Event, leased: Option<(Vec<String>, i64)>) {
        let (pool, lease) = (self.pool.clone(), self.lease);
        let leased = Arc::new(leased);
        self.queue
            .retry_later(event, RETRY_MAX.min(lease / 2), move |id, run| {
                let (pool, leased) = (pool.clone(), leased.clone());
                async move {
                    let client = pool.get().await?;
                    if let Some((ids, until)) = leased.as_ref() {
                        let released = client
                            .execute(
                                "UPDATE deliveries SET lease_until = NULL
                                 WHERE id = ANY($1) AND lease_until = $2
                                   AND status = 'pending' AND attempts = 0",
                                &[ids, until],
                            )
                            .await?;
                        if released > 0 {
                            tracing::info!(event_id = %id, deliveries = released,
                                "The event's outcome had been recorded; its deliveries go to the dispatcher.");
                        }
                    }
                    let until = (crate::delivery::now_ms() + lease.as_millis() as u64) as i64;
                    let claimed = client
                        .execute(
                            "UPDATE events SET lease_until = $3
                             WHERE id = $1 AND run = $2 AND status = 'queued'",
                            &[&id, &(run as i32), &until],
                        )
                        .await?;
                    Ok(claimed == 1)
                }
            });
    }

    fn lease_until(&self) -> i64 {
        (crate::delivery::now_ms() + self.lease.as_millis() as u64) as i64
    }

    /// `complete_event`'s one statement (one round trip, one commit): the event's status,
    /// and if it was still queued in this run, the route outcomes and the deliveries (those
    /// that exist already are left alone). Under the event row's lock: of two instances
    /// completing one run (one took the event over from the other, alive but slow), the
    /// second stores nothing.
    async fn record_completion(
        &self,
        event: &Event,
        outcomes: Vec<RouteOutcome>,
        deliveries: Vec<NewDelivery>,
        now: u64,
    ) -> Result<Completion, StoreError> {
        let client = self.pool.get().await?;
        let failed_routes = failed_routes(&outcomes) as i32;
        let routes: Vec<i32> = outcomes.iter().map(|o| o.route as i32).collect();
        let outcomes: Vec<String> = outcomes.iter().map(json).collect();
        let ds = &deliveries;
        let ids: Vec<&str> = ds.iter().map(|d| d.id.as_str()).collect();
        let d_routes: Vec<i32> = ds.iter().map(|d| d.route as i32).collect();
        let destinations: Vec<&str> = ds.iter().map(|d| d.destination.as_str()).collect();
        let urls: Vec<&str> = ds.iter().map(|d| d.url.as_str()).collect();
        let headers: Vec<String> = ds.iter().map(|d| json(&d.headers)).collect();
        let same: Vec<bool> = ds.iter().map(|d| body_from_event(event, d)).collect();
        let bodies: Vec<&[u8]> = ds
            .iter()
            .zip(&same)
            .map(|(d, same)| if *same { &[][..] } else { d.body.as_ref() })
            .collect();
        let statuses: Vec<&str> = ds.iter().map(|d| d.status.as_str()).collect();
        let next: Vec<Option<i64>> = ds
            .iter()
            .map(|d| (d.status == DeliveryStatus::Pending).then_some((now + d.delay_ms) as i64))
            .collect();
        let leases: Vec<Option<i64>> = ds.iter().map(|d| d.lease_until.map(|l| l as i64)).collect();
        let statement = client
            .prepare_cached(
                // (`IS TRUE`: the event is found by its key, never by scanning the
                // partial index of queued events, which the planner may otherwise take.)
                "WITH e AS (
                    UPDATE events SET status = 'processed', failed_routes = $16
                    WHERE id = $1 AND run = $2 AND (status = 'queued') IS TRUE
                    RETURNING 1
                 ), o AS (
                    INSERT INTO route_outcomes (event_id, run, route, outcome)
                    SELECT $1, $2, route, outcome FROM UNNEST($3::INTEGER[], $4::TEXT[]) AS t(route, outcome)
                    WHERE EXISTS (SELECT 1 FROM e)
                    ON CONFLICT (event_id, run, route) DO UPDATE SET outcome = excluded.outcome
                 ), d AS (
                    INSERT INTO deliveries (id, event_id, route, destination, url, headers, body, body_from_event,
                                            status, next_attempt_at, created_at, lease_until, run)
                    SELECT id, $1, route, destination, url, headers, body, same, status,
                           -- (Held while its destination is not active. A scalar lookup,
                           -- by key: the generic plan of an EXISTS scans every state.)
                           CASE WHEN (SELECT s.state != 'active' FROM destination_state s
                                      WHERE s.name = t.destination)
                                THEN NULL ELSE next_at END,
                           $5, lease, $2
                    FROM UNNEST($6::TEXT[], $7::INTEGER[], $8::TEXT[], $9::TEXT[], $10::TEXT[], $11::BYTEA[],
                                $15::BOOLEAN[], $12::TEXT[], $13::BIGINT[], $14::BIGINT[])
                         AS t(id, route, destination, url, headers, body, same, status, next_at, lease)
                    WHERE EXISTS (SELECT 1 FROM e)
                    ON CONFLICT (id) DO NOTHING
                    RETURNING id, lease_until
                 )
                 -- One row without an id says the run was queued (and is recorded now).
                 SELECT id FROM d WHERE lease_until IS NOT NULL
                 UNION ALL SELECT NULL FROM e",
            )
            .await?;
        // Planned once: left to itself, the server plans this statement afresh at every
        // call (a custom plan, which knows the arrays' lengths, always looks cheaper than
        // the generic one), which cost more of its CPU than running it. Sent in one go
        // with the statement: no round trip more.
        let (run, now) = (event.run as i32, now as i64);
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 16] = [
            &event.id,
            &run,
            &routes,
            &outcomes,
            &now,
            &ids,
            &d_routes,
            &destinations,
            &urls,
            &headers,
            &bodies,
            &statuses,
            &next,
            &leases,
            &same,
            &failed_routes,
        ];
        let (begin, rows, commit) = tokio::join!(
            client.batch_execute("BEGIN; SET LOCAL plan_cache_mode = force_generic_plan"),
            client.query(&statement, &params),
            client.batch_execute("COMMIT"),
        );
        begin?;
        let rows = rows?;
        commit?;
        let ids: Vec<Option<String>> = rows.iter().map(|r| r.get(0)).collect();
        if !ids.iter().any(Option::is_none) {
            return Ok(Completion::Stale);
        }
        let leased = ids.into_iter().flatten().collect();
        Ok(Completion::Recorded { leased })
    }

    async fn attempts_of(
        &self,
        client: &impl deadpool_postgres::GenericClient,
        d: &mut DeliveryRecord,
    ) -> Result<(), StoreError> {
        d.attempts = client
            .query(
                "SELECT at, duration_ms, status_code, error, response FROM attempts
                 WHERE delivery_id = $1 ORDER BY n",
                &[&d.id],
            )
            .await?
            .iter()
            .map(|r| Attempt {
                at: r.get::<_, i64>(0) as u64,
                duration_ms: r.get::<_, i64>(1) as u64,
                status_code: r.get::<_, Option<i32>>(2).map(|c| c as u16),
                error: r.get(3),
                response: r.get(4),
            })
            .collect();
        Ok(())
    }
}

/// Claims queued events that nobody holds (no claim, or one that ran out) for this
/// instance, as many as its queue has room for, and queues them. Returns how many.
async fn sweep(pool: &Pool, queue: &EventQueue, lease: Duration) -> Result<usize, StoreError> {
    let room = queue.room().min(SWEEP_BATCH);
    if room == 0 {
        return Ok(0);
    }
    let now = crate::delivery::now_ms();
    let client = pool.get().await?;
    let events: Vec<Event> = client
        .query(
            "UPDATE events SET lease_until = $1
             WHERE id IN (
                 SELECT id FROM events
                 WHERE status = 'queued' AND (lease_until IS NULL OR lease_until < $2)
                 ORDER BY received_at LIMIT $3
                 FOR UPDATE SKIP LOCKED)
             RETURNING *",
            &[
                &((now + lease.as_millis() as u64) as i64),
                &(now as i64),
                &(room as i64),
            ],
        )
        .await?
        .iter()
        .map(event_from_row)
        .collect();
    let mut events = events;
    events.sort_by(|a, b| (a.received_at, &a.id).cmp(&(b.received_at, &b.id)));
    let n = events.len();
    queue.adopt(events);
    Ok(n)
}

/// While the store is open or still holds events: renews the claims on the events this
/// instance holds (every third of a lease) and sweeps for abandoned ones (every second).
async fn keep_claims(pool: Pool, queue: std::sync::Weak<EventQueue>, lease: Duration) {
    let renew_every = lease / 3;
    let mut renewed = tokio::time::Instant::now();
    loop {
        let Some(queue) = queue.upgrade() else { return };
        if queue.finished() {
            return;
        }
        if renewed.elapsed() >= renew_every {
            renewed = tokio::time::Instant::now();
            let held = queue.held();
            if !held.is_empty() {
                let until = (crate::delivery::now_ms() + lease.as_millis() as u64) as i64;
                let renew = async {
                    pool.get()
                        .await?
                        .execute(
                            "UPDATE events SET lease_until = $1
                             WHERE id = ANY($2) AND status = 'queued'",
                            &[&until, &held],
                        )
                        .await?;
                    Ok::<_, StoreError>(())
                };
                if let Err(e) = renew.await {
                    tracing::warn!(error = %e, "Cannot renew the claims on queued events.");
                }
            }
        }
        let full = match sweep(&pool, &queue, lease).await {
            Ok(n) => n == SWEEP_BATCH,
            Err(e) => {
                tracing::warn!(error = %e, "Cannot look for abandoned queued events.");
                false
            }
        };
        drop(queue);
        if !full {
            tokio::time::sleep(SWEEP_INTERVAL.min(renew_every)).await;
        }
    }
}

/// A read-only transaction in which every statement sees one snapshot, for reads that take
/// more than one statement (an event with its deliveries and their attempts). Dropped, it
/// rolls back, which for a read is all it needs.
async fn snapshot(
    client: &mut deadpool_postgres::Object,
) -> Result<deadpool_postgres::Transaction<'_>, StoreError> {
    Ok(client
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await?)
}

fn event_from_row(r: &Row) -> Event {
    let headers: String = r.get("headers");
    let body: Vec<u8> = r.get("body");
    Event {
        id: r.get("id"),
        source: r.get("source"),
        received_at: r.get::<_, i64>("received_at") as u64,
        method: r.get("method"),
        path: r.get("path"),
        query: r.get("query"),
        headers: serde_json::from_str(&headers).unwrap_or_default(),
        content_type: r.get("content_type"),
        body: Body(Bytes::from(body)),
        metadata: Vec::new(),
        run: r.get::<_, i32>("run") as u32,
    }
}

fn delivery_from_row(r: &Row) -> DeliveryRecord {
    let status = DeliveryStatus::parse(r.get("status"));
    DeliveryRecord {
        id: r.get("id"),
        event_id: r.get("event_id"),
        route: r.get::<_, i32>("route") as usize,
        run: r.get::<_, i32>("run") as u32,
        destination: r.get("destination"),
        url: r.get("url"),
        next_attempt_at: match status {
            DeliveryStatus::Pending => r.get::<_, Option<i64>>("next_attempt_at").map(|v| v as u64),
            _ => None,
        },
        status,
        attempts: Vec::new(),
    }
}

fn json<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "null".into())
}

/// As SQLite's `DUE_WALK`: the due deliveries not leased at $1, earliest first, at most $2,
/// by `deliveries_due`.
const DUE_WALK: &str = "SELECT d.seq, d.destination, d.next_attempt_at FROM deliveries d
    LEFT JOIN destination_state s ON s.name = d.destination
    WHERE d.status = 'pending' AND d.next_attempt_at <= $1
      AND (d.lease_until IS NULL OR d.lease_until < $1)
      AND (s.state IS NULL OR s.state = 'active')
    ORDER BY d.next_attempt_at LIMIT $2";

/// `Store::take_slot`: one step of `pace::gcra` on the row of limit ($1 kind, $2 name),
/// under its lock, so that whichever instance asks each slot is taken once: asked at $3
/// (ms) with $4 between slots and $5 of burst, the slot is taken if it is free by $6 (ms:
/// now plus the limit's horizon). The SET expressions read the row as it was.
const TAKE_SLOT: &str = "INSERT INTO rate_limits AS r (kind, name, tat, taken)
    VALUES ($1, $2, $3::FLOAT8 + $4::FLOAT8, true)
    ON CONFLICT (kind, name) DO UPDATE SET
        taken = GREATEST(r.tat, $3::FLOAT8) - $5::FLOAT8 <= $6::FLOAT8,
        tat = CASE WHEN GREATEST(r.tat, $3::FLOAT8) - $5::FLOAT8 <= $6::FLOAT8
                   THEN GREATEST(r.tat, $3::FLOAT8) + $4::FLOAT8 ELSE r.tat END
    RETURNING tat, taken";

/// As SQLite's `NEXT_WALK`.
const NEXT_WALK: &str = "SELECT d.destination, d.next_attempt_at FROM deliveries d
    LEFT JOIN destination_state s ON s.name = d.destination
    WHERE d.status = 'pending' AND d.next_attempt_at IS NOT NULL
      AND (d.lease_until IS NULL OR d.lease_until < $1)
      AND (s.state IS NULL OR s.state = 'active')
    ORDER BY d.next_attempt_at LIMIT $2";

/// Leases until $1 the deliveries a walk chose ($2) that are still pending and not leased
/// at $3: another instance may have claimed some meanwhile (the row lock makes the second
/// claim see the first's lease and leave the row).
const CLAIM_WALKED: &str = "UPDATE deliveries SET lease_until = $1
    WHERE seq = ANY($2) AND status = 'pending' AND (lease_until IS NULL OR lease_until < $3)
    RETURNING id, event_id, destination, url, headers,
              CASE WHEN body_from_event THEN (SELECT e.body FROM events e WHERE e.id = deliveries.event_id) ELSE body END,
              attempts,
              (SELECT e.received_at FROM events e WHERE e.id = deliveries.event_id),
              paced";

/// The destinations with pending deliveries not held, by a skip-scan of
/// `deliveries_destination_due` (one probe each), as SQLite's `PENDING_DESTINATIONS`.
macro_rules! pending_destinations {
    () => {
        "WITH RECURSIVE dest(name) AS (
            SELECT MIN(destination) FROM deliveries
            WHERE status = 'pending' AND next_attempt_at IS NOT NULL
            UNION ALL
            SELECT (SELECT MIN(destination) FROM deliveries
                    WHERE status = 'pending' AND next_attempt_at IS NOT NULL
                      AND destination > dest.name)
            FROM dest WHERE dest.name IS NOT NULL)"
    };
}

/// `Store::claim_due` when a walk cannot (see `ClaimScope`): each ACTIVE destination's first due deliveries
/// in the order of `deliveries_destination_due` — due by $2, or by $5 for one outside the
/// known ($4, NULL: all), at most its room ($6 names, $7 counts; else the limit $3) —
/// then the earliest $3 of them all, leased until $1.
const CLAIM_DUE: &str = concat!(
    "UPDATE deliveries SET lease_until = $1
    WHERE seq IN (
        SELECT due.seq FROM (",
    pending_destinations!(),
    "
            SELECT x.seq, x.next_attempt_at FROM dest
            CROSS JOIN LATERAL (
                SELECT d.seq, d.next_attempt_at FROM deliveries d
                WHERE d.destination = dest.name AND d.status = 'pending'
                  AND d.next_attempt_at <= CASE WHEN $4::text[] IS NULL
                      OR dest.name = ANY($4::text[]) THEN $2::int8 ELSE $5::int8 END
                  AND (d.lease_until IS NULL OR d.lease_until < $2)
                ORDER BY d.next_attempt_at
                LIMIT COALESCE((SELECT r.n FROM unnest($6::text[], $7::int8[]) AS r(name, n)
                                WHERE r.name = dest.name), $3::int8)
                FOR UPDATE OF d SKIP LOCKED) x
            WHERE dest.name IS NOT NULL
              AND NOT EXISTS (SELECT 1 FROM destination_state s
                              WHERE s.name = dest.name AND s.state != 'active')
        ) due
        ORDER BY due.next_attempt_at LIMIT $3)
    RETURNING id, event_id, destination, url, headers,
              CASE WHEN body_from_event THEN (SELECT e.body FROM events e WHERE e.id = deliveries.event_id) ELSE body END,
              attempts,
              (SELECT e.received_at FROM events e WHERE e.id = deliveries.event_id),
              paced"
);

/// `Store::next_due_at`: each ACTIVE destination's first pending delivery not leased at $1,
/// plus $3 for one outside the known ($2), leaving out those with no room ($4).
const NEXT_DUE: &str = concat!(
    pending_destinations!(),
    "
    SELECT MIN(x.next_attempt_at + CASE WHEN $2::text[] IS NULL
                   OR dest.name = ANY($2::text[]) THEN 0 ELSE $3::int8 END)
    FROM dest
    CROSS JOIN LATERAL (
        SELECT d.next_attempt_at FROM deliveries d
        WHERE d.destination = dest.name AND d.status = 'pending'
          AND d.next_attempt_at IS NOT NULL
          AND (d.lease_until IS NULL OR d.lease_until < $1)
        ORDER BY d.next_attempt_at LIMIT 1) x
    WHERE dest.name IS NOT NULL AND NOT dest.name = ANY($4::text[])
      AND NOT EXISTS (SELECT 1 FROM destination_state s
                      WHERE s.name = dest.name AND s.state != 'active')"
);

/// A destination that is not ACTIVE holds its pending deliveries: they lose their due time,
/// so claims and `next_due_at` never walk past them however many wait (new ones are
/// inserted held too) ...
const HOLD: &str = "UPDATE deliveries SET next_attempt_at = NULL
    WHERE destination = $1 AND status = 'pending' AND next_attempt_at IS NOT NULL";

/// ... until a restart makes them all due at `now` ($1): the held ones (by
/// `deliveries_held`) and those due later.
const RELEASE_HELD: &str = "UPDATE deliveries SET next_attempt_at = $1, paced = false
    WHERE destination = $2 AND status = 'pending' AND next_attempt_at IS NULL";
const RELEASE_LATER: &str = "UPDATE deliveries SET next_attempt_at = $1, paced = false
    WHERE destination = $2 AND status = 'pending' AND next_attempt_at > $1";

#[async_trait]
impl Store for PgStore {
    async fn insert_event(
        &self,
        event: Event,
        idempotency: Option<Idempotency>,
    ) -> Result<Inserted, StoreError> {
        let storing = self.queue.accepting(&event)?;
        let inserted = self.store_event(&event, idempotency).await;
        storing.settle(&inserted, event);
        inserted
    }

    async fn next_event(&self) -> Option<Event> {
        self.queue.next().await
    }

    fn close(&self) {
        self.queue.close();
    }

    async fn complete_event(
        &self,
        event: &Event,
        outcomes: Vec<RouteOutcome>,
        deliveries: Vec<NewDelivery>,
        now: u64,
    ) -> Result<Completion, StoreError> {
        // (What the pipeline was to send, should the answer be lost: see `retry_later`.)
        let leased: Vec<String> = (deliveries.iter())
            .filter(|d| d.lease_until.is_some())
            .map(|d| d.id.clone())
            .collect();
        let until = deliveries.iter().find_map(|d| d.lease_until);
        let result = self
            .record_completion(event, outcomes, deliveries, now)
            .await;
        match &result {
            Ok(_) => self.queue.done(&event.id),
            Err(_) => self.retry_later(event.clone(), until.map(|l| (leased, l as i64))),
        }
        result
    }

    async fn replay(&self, event_id: &str) -> Result<bool, StoreError> {
        let client = self.pool.get().await?;
        // Refused, with nothing changed, when the queue has no room for it.
        let Some(bytes) = client
            .query_opt(QUEUED_BYTES, &[&event_id])
            .await?
            .map(|r| r.get::<_, i32>(0))
        else {
            return Ok(false);
        };
        self.queue.fits(1, bytes as usize)?;
        let row = client
            .query_opt(
                "UPDATE events SET status = 'queued', run = run + 1, lease_until = $2, failed_routes = 0
                 WHERE id = $1 RETURNING *",
                &[&event_id, &self.lease_until()],
            )
            .await?;
        match row {
            Some(r) => {
                self.queue.push(event_from_row(&r));
                Ok(true)
            }
            None => Ok(false),
        }
    }
    async fn claim_due(
        &self,
        now: u64,
        lease_until: u64,
        limit: usize,
        scope: &ClaimScope,
    ) -> Result<Vec<DueDelivery>, StoreError> {
        let client = self.pool.get().await?;
        // In due order, as long as what this claim may not take is not in the way.
        let walk = client.prepare_cached(DUE_WALK).await?;
        let walked = (client.query(&walk, &[&(now as i64), &(claim_walk(limit) as i64)]))
            .await?
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get::<_, i64>(2) as u64))
            .collect::<Vec<_>>();
        let rows = match scope.take_walked(walked, now, limit) {
            Some(seqs) => {
                let statement = client.prepare_cached(CLAIM_WALKED).await?;
                let seqs = &seqs;
                (client.query(&statement, &[&(lease_until as i64), seqs, &(now as i64)])).await?
            }
            None => {
                let orphaned = now.saturating_sub(scope.orphaned_after_ms) as i64;
                let (names, room) = scope.room_arrays();
                let statement = client.prepare_cached(CLAIM_DUE).await?;
                client
                    .query(
                        &statement,
                        &[
                            &(lease_until as i64),
                            &(now as i64),
                            &(limit as i64),
                            &scope.known.as_ref().map(Known::names),
                            &orphaned,
                            &names,
                            &room,
                        ],
                    )
                    .await?
            }
        };
        Ok(rows
            .iter()
            .map(|r| {
                let headers: String = r.get(4);
                let body: Vec<u8> = r.get(5);
                DueDelivery {
                    id: r.get(0),
                    event_id: r.get(1),
                    destination: r.get(2),
                    url: r.get(3),
                    headers: serde_json::from_str(&headers).unwrap_or_default(),
                    body: Bytes::from(body),
                    attempts: r.get::<_, i32>(6) as u32,
                    received_at: r.get::<_, Option<i64>>(7).unwrap_or(0) as u64,
                    lease_until,
                    paced: r.get(8),
                }
            })
            .collect())
    }

    async fn next_due_at(&self, now: u64, scope: &ClaimScope) -> Result<Option<u64>, StoreError> {
        let client = self.pool.get().await?;
        let walk = client.prepare_cached(NEXT_WALK).await?;
        let walked = (client.query(&walk, &[&(now as i64), &(NEXT_DUE_WALK as i64)]))
            .await?
            .iter()
            .map(|r| (r.get(0), r.get::<_, i64>(1) as u64))
            .collect::<Vec<_>>();
        if let Some(next) = scope.next_walked(walked) {
            return Ok(next);
        }
        let full: Vec<String> = (scope.room.iter())
            .filter(|(_, n)| **n == 0)
            .map(|(name, _)| name.clone())
            .collect();
        let statement = client.prepare_cached(NEXT_DUE).await?;
        let row = client
            .query_one(
                &statement,
                &[
                    &(now as i64),
                    &scope.known.as_ref().map(Known::names),
                    &(scope.orphaned_after_ms as i64),
                    &full,
                ],
            )
            .await?;
        Ok(row.get::<_, Option<i64>>(0).map(|v| v as u64))
    }

    async fn record_attempt(
        &self,
        delivery_id: &str,
        attempts_before: u32,
        attempt: Attempt,
        next: AttemptNext,
    ) -> Result<bool, StoreError> {
        let (status, next_at) = match next {
            AttemptNext::Delivered => ("delivered", None),
            AttemptNext::Failed => ("failed", None),
            AttemptNext::RetryAt(at) => ("pending", Some(at as i64)),
            AttemptNext::Hold => ("pending", None),
        };
        // One statement: the delivery and its attempt.
        let client = self.pool.get().await?;
        let statement = client
            .prepare_cached(
                "WITH u AS (
                    UPDATE deliveries SET attempts = attempts + 1, status = $1, next_attempt_at = $2,
                        lease_until = NULL, paced = false
                    WHERE id = $3 AND attempts = $9 RETURNING id, attempts
                 ), a AS (
                    INSERT INTO attempts (delivery_id, n, at, duration_ms, status_code, error, response)
                    SELECT id, attempts, $4, $5, $6, $7, $8 FROM u
                    ON CONFLICT (delivery_id, n) DO UPDATE SET at = excluded.at,
                        duration_ms = excluded.duration_ms, status_code = excluded.status_code,
                        error = excluded.error, response = excluded.response
                 )
                 SELECT attempts FROM u",
            )
            .await?;
        let rows = client
            .query(
                &statement,
                &[
                    &status,
                    &next_at,
                    &delivery_id,
                    &(attempt.at as i64),
                    &(attempt.duration_ms as i64),
                    &attempt.status_code.map(i32::from),
                    &attempt.error,
                    &attempt.response,
                    &(attempts_before as i32),
                ],
            )
            .await?;
        Ok(!rows.is_empty())
    }

    async fn record_destination_state(&self, s: &DestinationState) -> Result<(), StoreError> {
        let client = self.pool.get().await?;
        let statement = client
            .prepare_cached(
                "INSERT INTO destination_state (name, state, consecutive_failures, last_error, epoch, since)
                 VALUES ($1, $2, $3, $4, $5, $6)
                 ON CONFLICT (name) DO UPDATE SET state = excluded.state,
                     consecutive_failures = excluded.consecutive_failures,
                     last_error = excluded.last_error, since = excluded.since
                 WHERE destination_state.epoch = excluded.epoch",
            )
            .await?;
        let written = client
            .execute(
                &statement,
                &[
                    &s.name,
                    &s.state.as_str(),
                    &(s.consecutive_failures as i32),
                    &s.last_error,
                    &s.epoch,
                    &(s.since as i64),
                ],
            )
            .await?;
        // Not in the same transaction: if this fails, the deliveries stay due, which
        // claims skip (the destination is not active) — only more slowly.
        if written == 1 && s.state != DestinationHealth::Active {
            client.execute(HOLD, &[&s.name]).await?;
        }
        Ok(())
    }

    async fn destination_states(&self) -> Result<Vec<DestinationState>, StoreError> {
        let client = self.pool.get().await?;
        Ok(client
            .query(
                "SELECT name, state, consecutive_failures, last_error, epoch, since FROM destination_state",
                &[],
            )
            .await?
            .iter()
            .map(|r| DestinationState {
                name: r.get(0),
                state: DestinationHealth::parse(r.get(1)),
                consecutive_failures: r.get::<_, i32>(2) as u32,
                last_error: r.get(3),
                epoch: r.get(4),
                since: r.get::<_, i64>(5) as u64,
            })
            .collect())
    }

    async fn set_destination_state(
        &self,
        state: &DestinationState,
        now: u64,
    ) -> Result<i64, StoreError> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let epoch: i64 = tx
            .query_one(
                "INSERT INTO destination_state (name, state, consecutive_failures, last_error, epoch, since)
                 VALUES ($1, $2, $3, $4, 1, $5)
                 ON CONFLICT (name) DO UPDATE SET state = excluded.state,
                     consecutive_failures = excluded.consecutive_failures,
                     last_error = excluded.last_error, epoch = destination_state.epoch + 1,
                     since = excluded.since
                 RETURNING epoch",
                &[
                    &state.name,
                    &state.state.as_str(),
                    &(state.consecutive_failures as i32),
                    &state.last_error,
                    &(state.since as i64),
                ],
            )
            .await?
            .get(0);
        if state.state == DestinationHealth::Active {
            for sql in [RELEASE_HELD, RELEASE_LATER] {
                tx.execute(sql, &[&(now as i64), &state.name]).await?;
            }
            // Its rate limit starts afresh.
            let limit = Limit::Destination(&state.name);
            tx.execute(
                "DELETE FROM rate_limits WHERE kind = $1 AND name = $2",
                &[&limit.kind(), &limit.name()],
            )
            .await?;
        } else {
            tx.execute(HOLD, &[&state.name]).await?;
        }
        tx.commit().await?;
        Ok(epoch)
    }

    async fn delivery_counts(&self) -> Result<Vec<DeliveryCounts>, StoreError> {
        let client = self.pool.get().await?;
        Ok(client
            .query(DELIVERY_COUNTS, &[])
            .await?
            .iter()
            .map(|r| DeliveryCounts {
                destination: r.get(0),
                pending: r.get::<_, i64>(1) as u64,
                failed: r.get::<_, i64>(2) as u64,
            })
            .collect())
    }

    async fn managed_objects(&self) -> Result<Vec<ManagedObject>, StoreError> {
        let client = self.pool.get().await?;
        Ok(client
            .query(
                "SELECT kind, name, body FROM managed_objects ORDER BY kind, name",
                &[],
            )
            .await?
            .iter()
            .map(|r| ManagedObject {
                kind: r.get(0),
                name: r.get(1),
                body: r.get(2),
            })
            .collect())
    }

    async fn put_managed(&self, object: ManagedObject, now: u64) -> Result<(), StoreError> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        tx.execute(
            "INSERT INTO managed_objects (kind, name, body, updated_at) VALUES ($1, $2, $3, $4)
             ON CONFLICT (kind, name) DO UPDATE SET body = excluded.body, updated_at = excluded.updated_at",
            &[&object.kind, &object.name, &object.body, &(now as i64)],
        )
        .await?;
        // (The version moves by the trigger of migration 16.)
        tx.commit().await?;
        Ok(())
    }

    async fn delete_managed(&self, kind: &str, name: &str) -> Result<(), StoreError> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        tx.execute(
            "DELETE FROM managed_objects WHERE kind = $1 AND name = $2",
            &[&kind, &name],
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    fn shared(&self) -> bool {
        true
    }

    async fn managed_version(&self) -> Result<Option<i64>, StoreError> {
        let client = self.pool.get().await?;
        let row = client
            .query_one("SELECT version FROM managed_version", &[])
            .await?;
        Ok(Some(row.get(0)))
    }

    async fn managed_changes(&self, since: i64) -> Result<ManagedChanges, StoreError> {
        let mut client = self.pool.get().await?;
        // One snapshot: a change is in it exactly when its version is at most the one read
        // (changes take the version row's lock in turn, so they commit in version order).
        let tx = (client.build_transaction())
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await?;
        let version: i64 = tx
            .query_one("SELECT version FROM managed_version", &[])
            .await?
            .get(0);
        let changed = tx
            .query(
                "SELECT kind, name, body FROM managed_objects WHERE version > $1",
                &[&since],
            )
            .await?;
        let deleted = tx
            .query(
                "SELECT kind, name FROM managed_deleted WHERE version > $1",
                &[&since],
            )
            .await?;
        tx.commit().await?;
        Ok(ManagedChanges {
            version,
            changed: (changed.iter())
                .map(|r| ManagedObject {
                    kind: r.get(0),
                    name: r.get(1),
                    body: r.get(2),
                })
                .collect(),
            deleted: deleted.iter().map(|r| (r.get(0), r.get(1))).collect(),
        })
    }

    async fn get_event(&self, id: &str) -> Result<Option<EventRecord>, StoreError> {
        let mut client = self.pool.get().await?;
        let client = snapshot(&mut client).await?;
        let Some(row) = client
            .query_opt("SELECT * FROM events WHERE id = $1", &[&id])
            .await?
        else {
            return Ok(None);
        };
        let status: String = row.get("status");
        let routes = client
            .query(
                "SELECT outcome FROM route_outcomes WHERE event_id = $1 ORDER BY run, route",
                &[&id],
            )
            .await?
            .iter()
            .map(|r| {
                let text: String = r.get(0);
                serde_json::from_str(&text).unwrap_or(serde_json::Value::Null)
            })
            .collect();
        let mut deliveries: Vec<DeliveryRecord> = client
            .query(
                "SELECT * FROM deliveries WHERE event_id = $1 ORDER BY seq",
                &[&id],
            )
            .await?
            .iter()
            .map(delivery_from_row)
            .collect();
        for d in &mut deliveries {
            self.attempts_of(&client, d).await?;
        }
        Ok(Some(EventRecord {
            event: event_from_row(&row),
            status: if status == EventStatus::Queued.as_str() {
                EventStatus::Queued
            } else {
                EventStatus::Processed
            },
            routes,
            deliveries,
        }))
    }

    async fn list_deliveries(
        &self,
        status: Option<DeliveryStatus>,
        destination: Option<&str>,
        after: Option<i64>,
        limit: usize,
    ) -> Result<Vec<(i64, DeliveryRecord)>, StoreError> {
        let mut client = self.pool.get().await?;
        let client = snapshot(&mut client).await?;
        // As in SQLite: delivered ones, or all, in `seq` order; the others from
        // `deliveries_undelivered`.
        let sql = match status {
            None => LIST_DELIVERIES_ALL,
            Some(DeliveryStatus::Delivered) => LIST_DELIVERIES_DELIVERED,
            Some(_) => LIST_DELIVERIES_UNDELIVERED,
        };
        let rows = client
            .query(
                sql,
                &[
                    &status.map(DeliveryStatus::as_str),
                    &after.unwrap_or(0),
                    &(limit as i64),
                    &destination,
                ],
            )
            .await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in &rows {
            let mut d = delivery_from_row(r);
            self.attempts_of(&client, &mut d).await?;
            out.push((r.get::<_, i64>("seq"), d));
        }
        Ok(out)
    }

    async fn list_events(
        &self,
        filter: EventFilter,
        after: Option<(u64, String)>,
        limit: usize,
    ) -> Result<Vec<EventSummary>, StoreError> {
        let mut client = self.pool.get().await?;
        // Stopped at the listing's budget (see `LIST_BUDGET`).
        let tx = client.transaction().await?;
        tx.batch_execute(&format!(
            "SET LOCAL statement_timeout = {}",
            self.list_budget.as_millis().max(1)
        ))
        .await?;
        let indexed = (filter.field.as_ref())
            .filter(|f| self.indexed.load().contains(&f.path))
            .map(|f| (field_key(&f.path), field_keys(f)))
            // (A value the index cannot hold is looked for in the bodies.)
            .filter(|(_, keys)| keys.iter().all(|k| k.len() <= FIELD_KEY_MAX / 2));
        let sql = list_events_sql(
            filter.source.is_some(),
            filter.route_result == Some(RouteResultKind::Failed),
            indexed.as_ref().map(|(key, _)| key.as_str()),
        );
        // No bound is bound as the widest, so that each is a range of the index.
        let at = |t: u64| t.min(i64::MAX as u64) as i64;
        let (after_at, after_id) = match &after {
            Some((t, id)) => (at(*t), id.clone()),
            None => (i64::MAX, String::new()),
        };
        let bound = (
            filter.status.map(EventStatus::as_str),
            filter.since.map_or(i64::MIN, at),
            filter.until.map_or(i64::MAX, at),
            limit as i64,
            filter.route_result.map(RouteResultKind::as_str),
            filter.field.as_ref().map(|f| f.path.clone()),
            filter.field.as_ref().map(|f| f.equals.clone()),
            // Exact: PostgreSQL reads the JSON number as NUMERIC.
            (filter.field.as_ref())
                .filter(|f| f.number().is_some())
                .map(|f| f.equals.clone()),
        );
        let event_type = filter.event_type.as_deref().map(super::type_like);
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 12] = [
            &filter.source,
            &bound.0,
            &event_type,
            &bound.1,
            &bound.2,
            &after_at,
            &after_id,
            &bound.3,
            &bound.4,
            &bound.5,
            &bound.6,
            &bound.7,
        ];
        let too_slow = |e: tokio_postgres::Error| match e.code() {
            Some(&tokio_postgres::error::SqlState::QUERY_CANCELED) => {
                StoreError::TooSlow(self.list_budget)
            }
            _ => e.into(),
        };
        let runs = match &indexed {
            // One walk of the index per JSON value, merged.
            Some((_, keys)) => {
                let mut runs = Vec::with_capacity(keys.len());
                for key in keys {
                    let mut with_key = params.to_vec();
                    with_key.push(key);
                    let rows = tx.query(&sql, &with_key).await.map_err(too_slow)?;
                    runs.push(rows.iter().map(summary_from_row).collect());
                }
                runs
            }
            None => {
                let rows = tx.query(&sql, &params).await.map_err(too_slow)?;
                vec![rows.iter().map(summary_from_row).collect()]
            }
        };
        tx.commit().await?;
        Ok(newest_of(runs, limit))
    }

    async fn index_fields(&self, fields: Vec<Vec<String>>) -> Result<FieldIndexes, StoreError> {
        // Lists stop using an index before it is dropped.
        let kept = (self.indexed.load().iter())
            .filter(|path| fields.contains(path))
            .cloned()
            .collect();
        self.indexed.store(Arc::new(kept));
        let client = self.pool.get().await?;
        // One instance at a time (several may start together): another's index being
        // built looks like one a cut-off build left, which would be dropped. Tried, not
        // waited for inside a statement, whose snapshot the other's `CONCURRENTLY` build
        // would wait on in turn.
        while !(client.query_one("SELECT pg_try_advisory_lock($1)", &[&FIELD_INDEX_LOCK]))
            .await?
            .get::<_, bool>(0)
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let changed = sync_field_indexes(&client, &fields).await;
        let unlocked = client
            .execute("SELECT pg_advisory_unlock($1)", &[&FIELD_INDEX_LOCK])
            .await;
        let changed = changed?;
        unlocked?;
        self.indexed.store(Arc::new(fields.into_iter().collect()));
        Ok(changed)
    }

    async fn take_slot(&self, limit: Limit<'_>, now: u64, rate: f64) -> Result<u64, StoreError> {
        let client = self.pool.get().await?;
        let statement = client.prepare_cached(TAKE_SLOT).await?;
        let (step, tolerance) = (pace::interval(rate), pace::tolerance(rate));
        let row = client
            .query_one(
                &statement,
                &[
                    &limit.kind(),
                    &limit.name(),
                    &(now as f64),
                    &step,
                    // As `pace::slot` rounds.
                    &(tolerance + pace::ROUNDING),
                    &(now.saturating_add(limit.horizon()) as f64),
                ],
            )
            .await?;
        let (tat, taken): (f64, bool) = (row.get(0), row.get(1));
        // When the slot was allowed (`pace::gcra`'s first value): the arrival time it
        // moved on from, or the one it left as it was, less the burst.
        let allowed = if taken { tat - step } else { tat } - tolerance;
        debug_assert!(taken == (pace::slot(allowed, now) <= now.saturating_add(limit.horizon())));
        Ok(pace::slot(allowed, now))
    }

    async fn defer_delivery(&self, delivery_id: &str, until: u64) -> Result<bool, StoreError> {
        let client = self.pool.get().await?;
        let n = client
            .execute(
                "UPDATE deliveries SET next_attempt_at = $1, lease_until = NULL, paced = true
                 WHERE id = $2 AND status = 'pending'",
                &[&(until as i64), &delivery_id],
            )
            .await?;
        Ok(n == 1)
    }

    async fn retry_delivery(&self, id: &str, now: u64) -> Result<bool, StoreError> {
        let client = self.pool.get().await?;
        let n = client
            .execute(
                concat!(
                    due_again!("$1::BIGINT"),
                    " WHERE id = $2 AND status IN ('pending', 'failed')"
                ),
                &[&(now as i64), &id],
            )
            .await?;
        Ok(n == 1)
    }

    async fn recover_deliveries(
        &self,
        destination: &str,
        since: u64,
        until: u64,
        after: i64,
        now: u64,
        limit: usize,
    ) -> Result<(usize, Option<i64>), StoreError> {
        let [since, until, now] = [since, until, now].map(|t| t.min(i64::MAX as u64) as i64);
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        // The next failed deliveries from the cursor...
        let looked = tx.query(RECOVER_LOOK, &[&after, &(limit as i64)]).await?;
        let Some(last) = looked.last().map(|r| r.get::<_, i64>(0)) else {
            return Ok((0, None));
        };
        // ...and those of them to the destination and in the window due again (the status
        // test is checked again on a row another instance changed meanwhile).
        let changed = tx
            .execute(
                concat!(
                    due_again!("$5::BIGINT"),
                    " WHERE status = 'failed' AND status <> 'delivered' AND seq > $4
                       AND seq <= $6 AND destination = $1 AND created_at >= $2
                       AND created_at < $3"
                ),
                &[&destination, &since, &until, &after, &now, &last],
            )
            .await?;
        tx.commit().await?;
        Ok((changed as usize, (looked.len() == limit).then_some(last)))
    }

    async fn minute_stats(&self, since: u64) -> Result<Vec<MinuteStats>, StoreError> {
        let since = (since / 60_000 * 60_000) as i64;
        let client = self.pool.get().await?;
        let mut minutes: std::collections::BTreeMap<i64, MinuteStats> = Default::default();
        for r in client
            .query(
                "SELECT received_at / 60000 * 60000 AS m, COUNT(*) FROM events
                 WHERE received_at >= $1 GROUP BY m",
                &[&since],
            )
            .await?
        {
            let m: i64 = r.get(0);
            minute(&mut minutes, m).received = r.get::<_, i64>(1) as u64;
        }
        for r in client
            .query(
                "SELECT at / 60000 * 60000 AS m,
                        COUNT(*) FILTER (WHERE status_code BETWEEN 200 AND 299),
                        COUNT(*) FILTER (WHERE status_code IS NULL OR status_code NOT BETWEEN 200 AND 299)
                 FROM attempts WHERE at >= $1 GROUP BY m",
                &[&since],
            )
            .await?
        {
            let m: i64 = r.get(0);
            let entry = minute(&mut minutes, m);
            entry.delivered = r.get::<_, i64>(1) as u64;
            entry.failed = r.get::<_, i64>(2) as u64;
        }
        Ok(minutes.into_values().collect())
    }

    fn queue_depth(&self) -> usize {
        self.queue.len()
    }

    fn storing(&self) -> Option<(usize, Duration)> {
        self.queue.storing()
    }

    fn refused(&self) -> Option<(Duration, String)> {
        self.queue.refused()
    }

    fn queue_fits(&self, events: usize, bytes: usize) -> Result<(), StoreError> {
        self.queue.fits(events, bytes)
    }

    async fn backlog(&self) -> Result<(u64, Option<u64>), StoreError> {
        let client = self.pool.get().await?;
        let r = client
            .query_one(
                &format!(
                    "SELECT COUNT(*), ({OLDEST_PENDING}) FROM deliveries WHERE status = 'pending'"
                ),
                &[],
            )
            .await?;
        Ok((
            r.get::<_, i64>(0) as u64,
            r.get::<_, Option<i64>>(1).map(|v| v as u64),
        ))
    }

    async fn purge_idempotency(&self, before: u64, limit: usize) -> Result<usize, StoreError> {
        let before = before.min(i64::MAX as u64) as i64;
        let client = self.pool.get().await?;
        let n = client
            .execute(
                "DELETE FROM idempotency WHERE (source, key) IN (SELECT source, key
                     FROM idempotency WHERE created_at < $1 ORDER BY created_at LIMIT $2)",
                &[&before, &(limit as i64)],
            )
            .await?;
        Ok(n as usize)
    }

    async fn state_get(
        &self,
        plugin: &str,
        key: &str,
        now: u64,
    ) -> Result<Option<String>, StoreError> {
        let client = self.pool.get().await?;
        let row = client
            .query_opt(
                "SELECT value FROM plugin_state WHERE plugin = $1 AND key = $2 AND expires_at > $3",
                &[&plugin, &key, &sql_ms(now)],
            )
            .await?;
        Ok(row.map(|r| r.get(0)))
    }

    async fn state_put(
        &self,
        plugin: &str,
        key: &str,
        value: Option<String>,
        expires_at: u64,
    ) -> Result<(), StoreError> {
        let client = self.pool.get().await?;
        match value {
            Some(value) => {
                client
                    .execute(
                        "INSERT INTO plugin_state (plugin, key, value, expires_at)
                         VALUES ($1, $2, $3, $4) ON CONFLICT (plugin, key)
                         DO UPDATE SET value = excluded.value, expires_at = excluded.expires_at",
                        &[&plugin, &key, &value, &sql_ms(expires_at)],
                    )
                    .await?
            }
            None => {
                client
                    .execute(
                        "DELETE FROM plugin_state WHERE plugin = $1 AND key = $2",
                        &[&plugin, &key],
                    )
                    .await?
            }
        };
        Ok(())
    }

    async fn state_swap(
        &self,
        plugin: &str,
        key: &str,
        expected: Option<String>,
        value: String,
        expires_at: u64,
        now: u64,
    ) -> Result<bool, StoreError> {
        let client = self.pool.get().await?;
        let (expires_at, now) = (sql_ms(expires_at), sql_ms(now));
        // One statement each: the row's lock makes the check and the write one step
        // (a concurrent insert of the same key waits, then finds the row and checks it).
        let changed = match expected {
            None => {
                client
                    .execute(
                        "INSERT INTO plugin_state (plugin, key, value, expires_at)
                         VALUES ($1, $2, $3, $4) ON CONFLICT (plugin, key)
                         DO UPDATE SET value = excluded.value, expires_at = excluded.expires_at
                         WHERE plugin_state.expires_at <= $5",
                        &[&plugin, &key, &value, &expires_at, &now],
                    )
                    .await?
            }
            Some(expected) => {
                client
                    .execute(
                        "UPDATE plugin_state SET value = $3, expires_at = $4
                         WHERE plugin = $1 AND key = $2 AND value = $6 AND expires_at > $5",
                        &[&plugin, &key, &value, &expires_at, &now, &expected],
                    )
                    .await?
            }
        };
        Ok(changed == 1)
    }

    async fn state_list(
        &self,
        plugin: &str,
        prefix: &str,
        after: &str,
        limit: usize,
        now: u64,
    ) -> Result<Vec<StateEntry>, StoreError> {
        let end = prefix_end(prefix);
        let client = self.pool.get().await?;
        let rows = client
            .query(
                "SELECT key, value, expires_at FROM plugin_state
                 WHERE plugin = $1 AND key >= $2 AND key > $3
                   AND ($4::TEXT IS NULL OR key < $4::TEXT) AND starts_with(key, $2)
                   AND expires_at > $5
                 ORDER BY key LIMIT $6",
                &[
                    &plugin,
                    &prefix,
                    &after,
                    &end,
                    &sql_ms(now),
                    &(limit as i64),
                ],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| StateEntry {
                key: r.get(0),
                value: r.get(1),
                expires_at: r.get::<_, i64>(2) as u64,
            })
            .collect())
    }

    async fn state_remove_prefix(
        &self,
        plugin: &str,
        prefix: &str,
        limit: usize,
    ) -> Result<usize, StoreError> {
        let end = prefix_end(prefix);
        let client = self.pool.get().await?;
        let n = client
            .execute(
                "DELETE FROM plugin_state WHERE plugin = $1 AND key IN (SELECT key FROM plugin_state
                     WHERE plugin = $1 AND key >= $2 AND ($3::TEXT IS NULL OR key < $3::TEXT)
                       AND starts_with(key, $2)
                     ORDER BY key LIMIT $4)",
                &[&plugin, &prefix, &end, &(limit as i64)],
            )
            .await?;
        Ok(n as usize)
    }

    async fn purge_state(&self, now: u64, limit: usize) -> Result<usize, StoreError> {
        let client = self.pool.get().await?;
        let n = client
            .execute(
                "DELETE FROM plugin_state WHERE (plugin, key) IN (SELECT plugin, key
                     FROM plugin_state WHERE expires_at <= $1 ORDER BY expires_at LIMIT $2)",
                &[&sql_ms(now), &(limit as i64)],
            )
            .await?;
        Ok(n as usize)
    }

    async fn purge_events(
        &self,
        before: PurgeBefore,
        after: Option<PurgeCursor>,
        limit: usize,
    ) -> Result<(usize, Option<PurgeCursor>), StoreError> {
        let [end, delivered, failed] = before.bounds();
        let sources = before.sources_json();
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let (from_at, from_id) = match after {
            Some((at, id)) => (at as i64, id),
            None => (-1, String::new()),
        };
        // The next events from the cursor, oldest first by `events_received`, each with
        // whether retention lets it go (a batch is what is looked at: see SQLite's
        // `PURGE_LOOK`). $1 is the latest of $5 (delivered events), $6 (any settled
        // event) and the sources' own bounds in $7, which replace them for their events
        // (read once, as an init plan, however many sources it names).
        let looked = tx
            .query(
                "SELECT e.received_at, e.id,
                    e.status = 'processed'
                    AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.event_id = e.id
                        AND d.status = 'pending')
                    AND (e.received_at < COALESCE(((SELECT $7::TEXT::JSONB) -> e.source ->> 'failed')::BIGINT, $6)
                         OR (e.received_at < COALESCE(((SELECT $7::TEXT::JSONB) -> e.source ->> 'delivered')::BIGINT, $5)
                             AND e.failed_routes = 0
                             AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.event_id = e.id
                                 AND d.status = 'failed' AND d.run = e.run)))
                 FROM events e
                 WHERE e.received_at < $1 AND (e.received_at, e.id) > ($2, $3)
                 ORDER BY e.received_at, e.id LIMIT $4",
                &[
                    &end,
                    &from_at,
                    &from_id,
                    &(limit as i64),
                    &delivered,
                    &failed,
                    &sources,
                ],
            )
            .await?;
        let next = match looked.last() {
            Some(last) if looked.len() == limit => {
                Some((last.get::<_, i64>(0) as u64, last.get::<_, String>(1)))
            }
            _ => None,
        };
        let ids: Vec<String> = looked
            .iter()
            .filter(|r| r.get::<_, bool>(2))
            .map(|r| r.get(1))
            .collect();
        if ids.is_empty() {
            tx.commit().await?;
            return Ok((0, next));
        }
        delete_events(&tx, &ids).await?;
        tx.commit().await?;
        Ok((ids.len(), next))
    }

    async fn erase_events(&self, ids: Vec<String>, now: u64) -> Result<Erased, StoreError> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        // The events and every delivery of theirs locked first: a claim (`FOR UPDATE SKIP
        // LOCKED`) takes none of them meanwhile, and one made before shows as a lease.
        let events = (tx.query(
            "SELECT id, status = 'queued' FROM events WHERE id = ANY($1) ORDER BY id FOR UPDATE",
            &[&ids],
        ))
        .await?;
        let leased: std::collections::HashSet<String> = (tx.query(
            "SELECT event_id, status = 'pending' AND lease_until >= $2 FROM deliveries
             WHERE event_id = ANY($1) ORDER BY id FOR UPDATE",
            &[&ids, &(now as i64)],
        ))
        .await?
        .into_iter()
        .filter(|r| r.get::<_, Option<bool>>(1) == Some(true))
        .map(|r| r.get(0))
        .collect();
        let mut erased = Erased::default();
        for row in events {
            let id: String = row.get(0);
            match row.get::<_, bool>(1) || leased.contains(&id) {
                true => erased.busy.push(id),
                false => erased.erased.push(id),
            }
        }
        delete_events(&tx, &erased.erased).await?;
        tx.commit().await?;
        Ok(erased)
    }
}

/// Deletes these events with their attempts, deliveries and route outcomes (a purge, an
/// erasure), in the caller's transaction.
async fn delete_events(
    tx: &tokio_postgres::Transaction<'_>,
    ids: &[String],
) -> Result<(), StoreError> {
    if ids.is_empty() {
        return Ok(());
    }
    for delete in [
        "DELETE FROM attempts WHERE delivery_id IN (SELECT id FROM deliveries
             WHERE event_id = ANY($1))",
        "DELETE FROM deliveries WHERE event_id = ANY($1)",
        "DELETE FROM route_outcomes WHERE event_id = ANY($1)",
        "DELETE FROM events WHERE id = ANY($1)",
    ] {
        tx.execute(delete, &[&ids]).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_store_url_gets_timeouts_unless_it_names_its_own() {
        let c = connection_config("postgres://sy@127.0.0.1:5432/sy").unwrap();
        assert_eq!(c.get_connect_timeout(), Some(&CONNECT_TIMEOUT));
        assert_eq!(c.get_tcp_user_timeout(), Some(&TCP_USER_TIMEOUT));
        assert_eq!(c.get_keepalives_idle(), KEEPALIVES_IDLE);
        let c = connection_config(
            "postgres://sy@127.0.0.1:5432/sy?connect_timeout=3&tcp_user_timeout=0&keepalives_idle=7",
        )
        .unwrap();
        assert_eq!(c.get_connect_timeout(), Some(&Duration::from_secs(3)));
        assert_eq!(c.get_tcp_user_timeout(), None, "0: off, as asked");
        assert_eq!(c.get_keepalives_idle(), Duration::from_secs(7));
        let c = connection_config("host=127.0.0.1 user=sy connect_timeout=4").unwrap();
        assert_eq!(c.get_connect_timeout(), Some(&Duration::from_secs(4)));
        assert_eq!(c.get_tcp_user_timeout(), Some(&TCP_USER_TIMEOUT));
        assert!(connection_config("postgres://sy@127.0.0.1:5432/sy?connect_timeout=soon").is_err());
    }

    /// The listing queries can use `deliveries_undelivered` (sequential scans off, so the
    /// plan shows what is usable, not what an empty table makes cheapest).
    #[tokio::test(flavor = "multi_thread")]
    async fn deliveries_are_listed_from_the_intended_indexes() {
        let Some(server) = xtask::pg::PgServer::start() else {
            return;
        };
        let url = server.database("plans");
        PgStore::open(&url, 10, Duration::from_secs(30))
            .await
            .unwrap();
        let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(connection);
        client
            .batch_execute("SET enable_seqscan = off")
            .await
            .unwrap();
        let failed = explain(
            &client,
            LIST_DELIVERIES_UNDELIVERED,
            &[&"failed", &0i64, &10i64, &Some("fleet")],
        )
        .await;
        assert!(failed.contains("deliveries_undelivered"), "{failed}");
        let counts = explain(&client, DELIVERY_COUNTS, &[]).await;
        assert!(counts.contains("deliveries_undelivered"), "{counts}");
        let oldest = explain(&client, OLDEST_PENDING, &[]).await;
        assert!(oldest.contains("deliveries_undelivered"), "{oldest}");
        assert!(!oldest.contains("Sort"), "{oldest}");
        // Event lists walk an index in order within their bounds. (Events of 20 sources,
        // analyzed: on an empty table any index costs the same.)
        client
            .batch_execute(
                "INSERT INTO events (id, source, received_at, method, path, query, headers, body, status)
                 SELECT 'e' || n, 's' || (n % 20), n, 'POST', '/', '', '[]',
                     convert_to('{\"sim\":{\"iccid\":\"894' || n || '\"}}', 'UTF8'), 'processed'
                 FROM generate_series(1, 20000) AS n;",
            )
            .await
            .unwrap();
        let iccid = ["sim".to_string(), "iccid".to_string()];
        let index = field_index_name(&field_key(&iccid));
        client
            .batch_execute(&create_field_index(&index, &iccid))
            .await
            .unwrap();
        client.batch_execute("ANALYZE events;").await.unwrap();
        let none: Option<&str> = None;
        let no_path: Option<Vec<String>> = None;
        let key = field_key(&iccid);
        let list = |by_source, dead, indexed: Option<&'static str>| {
            let (client, no_path, key) = (&client, &no_path, &key);
            async move {
                let sql = list_events_sql(by_source, dead, indexed.map(|_| key.as_str()));
                let source = by_source.then_some("s7");
                let result = dead.then_some("failed");
                let params: [&(dyn tokio_postgres::types::ToSql + Sync); 13] = [
                    &source,
                    &none,
                    &none,
                    &0i64,
                    &i64::MAX,
                    &i64::MAX,
                    &"",
                    &50i64,
                    &result,
                    &no_path,
                    &none,
                    &none,
                    &indexed,
                ];
                let bound = 12 + usize::from(indexed.is_some());
                explain(client, &sql, &params[..bound]).await
            }
        };
        let by_source = list(true, false, None).await;
        assert!(by_source.contains("events_source"), "{by_source}");
        let all = list(false, false, None).await;
        assert!(all.contains("events_received"), "{all}");
        let dead = list(false, true, None).await;
        assert!(dead.contains("events_dead_lettered"), "{dead}");
        // By an indexed body field, one event's value: its index, with or without a source.
        let one = Some("\"89477\"");
        let by_field = [list(false, false, one).await, list(true, false, one).await];
        for p in &by_field {
            assert!(p.contains(&index), "{p}");
        }
        for p in [&by_source, &all, &dead].into_iter().chain(&by_field) {
            assert!(!p.contains("Sort"), "{p}");
        }
        let look = explain(&client, RECOVER_LOOK, &[&0i64, &10i64]).await;
        assert!(look.contains("deliveries_undelivered"), "{look}");
        assert!(!look.contains("Sort"), "{look}");
        // When a walk in due order is not enough, the dispatcher's queries probe each
        // destination once, then walk its due deliveries in order and stop early ...
        let known: Option<Vec<String>> = None;
        let (names, room) = (vec!["slow".to_string()], vec![0i64]);
        let claim = explain(
            &client,
            CLAIM_DUE,
            &[&0i64, &0i64, &10i64, &known, &0i64, &names, &room],
        )
        .await;
        let next = explain(&client, NEXT_DUE, &[&0i64, &known, &0i64, &names]).await;
        for p in [&claim, &next] {
            assert!(p.contains("deliveries_destination_due"), "{p}");
            assert!(!p.contains("Seq Scan on deliveries"), "{p}");
        }
        // ... after walking the due ones in order, which usually suffices.
        for sql in [DUE_WALK, NEXT_WALK] {
            let p = explain(&client, sql, &[&0i64, &10i64]).await;
            assert!(p.contains("deliveries_due"), "{p}");
            assert!(!p.contains("Sort"), "{p}");
        }
        // A restart finds its destination's held deliveries, and those due later, by index.
        // (Deliveries to 200 destinations, most delivered, a few held, analyzed.)
        client
            .batch_execute(
                "INSERT INTO deliveries (id, event_id, route, destination, url, headers, body,
                                         status, next_attempt_at, created_at)
                 SELECT 'd' || n, 'e' || n, 0, 'dest' || (n % 200), 'u', '[]', '\\x',
                        CASE WHEN n % 10 = 0 THEN 'pending' ELSE 'delivered' END,
                        CASE WHEN n % 30 = 0 THEN NULL ELSE n END, n
                 FROM generate_series(1, 20000) AS n;
                 ANALYZE deliveries;",
            )
            .await
            .unwrap();
        let held = explain(&client, RELEASE_HELD, &[&0i64, &"dest7"]).await;
        assert!(held.contains("deliveries_held"), "{held}");
        let later = explain(&client, RELEASE_LATER, &[&0i64, &"dest7"]).await;
        assert!(later.contains("deliveries_destination_due"), "{later}");
    }

    async fn explain(
        client: &tokio_postgres::Client,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> String {
        client
            .query(&format!("EXPLAIN {sql}"), params)
            .await
            .unwrap()
            .iter()
            .map(|r| r.get::<_, String>(0))
            .collect::<Vec<_>>()
            .join("\n")
    }
}
