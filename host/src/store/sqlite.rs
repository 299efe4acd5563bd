//! The embedded store: SQLite in WAL mode.
//!
//! All writes go through one writer thread that commits them in batches (group commit):
//! whatever arrived while the previous batch was being written goes into the next
//! transaction, so many requests share one fsync. The writes of a batch run straight in
//! its transaction; if one fails, the batch is rolled back and run again with each write in
//! a savepoint of its own, so one failing write does not undo the others (writes are `Fn`,
//! so running one twice does the same thing). Savepoints are not the common path because
//! they are dear: SQLite copies every page a write touches into a statement journal first,
//! and in a batch every write touches the same hot pages. Reads use a second connection.
//!
//! The fsync is not the writer's: SQLite runs with `synchronous = NORMAL` (a commit is
//! written to the WAL but not synced; checkpoints still sync), and a syncer thread
//! `fdatasync`s the WAL after each commit that carries a write which must be durable
//! before it is answered (`Durability::Synced`: an accepted event, an API change). The
//! writer meanwhile writes the next batch. Writes whose loss in a power cut only means
//! work done again (an event's outcome, an attempt, a claim: at least once) are answered
//! as soon as they are committed (`Durability::Lazy`); a later sync covers them too.
//! The queue of events for the pipeline is kept in memory and rebuilt from the `queued`
//! rows at open.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::oneshot;

use super::*;
use crate::event::{Body, Event};
use crate::pace::Slots;

/// How many writes one transaction takes at most.
const MAX_BATCH: usize = 1024;

const SCHEMA: &[&str] = &[
    // Version 1.
    r#"
    CREATE TABLE events (
        id TEXT PRIMARY KEY,
        source TEXT NOT NULL,
        received_at INTEGER NOT NULL,
        method TEXT NOT NULL,
        path TEXT NOT NULL,
        query TEXT NOT NULL,
        headers TEXT NOT NULL,
        content_type TEXT,
        body BLOB NOT NULL,
        status TEXT NOT NULL,
        run INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX events_queued ON events (received_at) WHERE status = 'queued';
    CREATE INDEX events_received ON events (received_at);
    CREATE TABLE idempotency (
        source TEXT NOT NULL,
        key TEXT NOT NULL,
        event_id TEXT NOT NULL,
        created_at INTEGER NOT NULL,
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
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL UNIQUE,
        event_id TEXT NOT NULL,
        route INTEGER NOT NULL,
        destination TEXT NOT NULL,
        url TEXT NOT NULL,
        headers TEXT NOT NULL,
        body BLOB NOT NULL,
        status TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at INTEGER,
        lease_until INTEGER,
        created_at INTEGER NOT NULL
    );
    CREATE INDEX deliveries_due ON deliveries (next_attempt_at) WHERE status = 'pending';
    CREATE INDEX deliveries_event ON deliveries (event_id);
    CREATE INDEX deliveries_status ON deliveries (status, seq);
    CREATE TABLE attempts (
        delivery_id TEXT NOT NULL,
        n INTEGER NOT NULL,
        at INTEGER NOT NULL,
        duration_ms INTEGER NOT NULL,
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
    "#,
    // 2: sources, destinations and routes made through the management API.
    r#"
    CREATE TABLE managed_objects (
        kind TEXT NOT NULL,
        name TEXT NOT NULL,
        body TEXT NOT NULL,
        updated_at INTEGER NOT NULL,
        PRIMARY KEY (kind, name)
    );
    "#,
    // Version 3: destination state epochs (see `Store::record_destination_state`).
    "ALTER TABLE destination_state ADD COLUMN epoch INTEGER NOT NULL DEFAULT 0;",
    // Version 4: a delivery whose body is the event's own keeps no copy of it (see
    // `store::body_from_event`).
    "ALTER TABLE deliveries ADD COLUMN body_from_event INTEGER NOT NULL DEFAULT 0;",
    // Version 5: deliveries are listed by status from an index of the ones not delivered
    // (few, and the ones looked for), not of all: a delivery that succeeds leaves the index
    // instead of moving to the delivered end of it, one index page less in most commits.
    // Queries on it repeat its `status != 'delivered'` term, which is how SQLite knows a
    // partial index applies.
    "DROP INDEX deliveries_status;
     CREATE INDEX deliveries_undelivered ON deliveries (status, seq) WHERE status != 'delivered';",
    // Version 6: the run of the event that made a delivery, so that a replay supersedes
    // the failures of earlier runs (see `Store::purge_events`).
    "ALTER TABLE deliveries ADD COLUMN run INTEGER NOT NULL DEFAULT 0;",
    // Version 7: how many routes failed (dead-lettered the event) in its latest run, kept
    // on the event so that listing dead letters and retention need not read every
    // outcome; the index holds only those events. Events already stored are counted once.
    "ALTER TABLE events ADD COLUMN failed_routes INTEGER NOT NULL DEFAULT 0;
     UPDATE events SET failed_routes = (SELECT COUNT(*) FROM route_outcomes o
         WHERE o.event_id = events.id AND o.run = events.run
           AND json_extract(o.outcome, '$.result.result') = 'failed')
     WHERE id IN (SELECT o.event_id FROM route_outcomes o
         WHERE json_extract(o.outcome, '$.result.result') = 'failed');
     CREATE INDEX events_dead_lettered ON events (received_at, id) WHERE failed_routes > 0;",
    // Version 8: deliveries to a destination that is not ACTIVE are held — no due time, so
    // the dispatcher's queries do not walk them (see `hold`); those stored before are held
    // now.
    "UPDATE deliveries SET next_attempt_at = NULL WHERE status = 'pending'
         AND destination IN (SELECT name FROM destination_state WHERE state != 'active');",
    // Version 9: idempotency keys are purged by age, a batch at a time, once past the
    // idempotency window (see `Store::purge_idempotency`).
    "CREATE INDEX idempotency_created ON idempotency (created_at);",
    // Version 10: attempts by time, for the per-minute counts (`Store::minute_stats`), which
    // otherwise read every attempt kept.
    "CREATE INDEX attempts_at ON attempts (at);",
    // Version 11: events by source and time, for event lists filtered by source (a rare
    // source, such as `delivery.notify_source`'s, was found by walking every event).
    "CREATE INDEX events_source ON events (source, received_at, id);",
    // Version 12: pending deliveries by destination and due time, besides due time alone:
    // a claim that a destination with a long backlog and a full lane stands in the way of
    // goes destination by destination (see `walk_due`) instead of walking past it.
    "CREATE INDEX deliveries_destination_due ON deliveries (destination, next_attempt_at)
         WHERE status = 'pending';",
    // Version 13: held deliveries (no due time) apart. Out of `deliveries_destination_due`,
    // a destination that holds its deliveries costs a claim that goes destination by
    // destination nothing (it was a probe each: ~3 ms a claim with 1,000 FAILED ones);
    // `deliveries_held` finds them by destination for a restart.
    "DROP INDEX deliveries_destination_due;
     CREATE INDEX deliveries_destination_due ON deliveries (destination, next_attempt_at)
         WHERE status = 'pending' AND next_attempt_at IS NOT NULL;
     CREATE INDEX deliveries_held ON deliveries (destination)
         WHERE status = 'pending' AND next_attempt_at IS NULL;",
    // Version 14: a delivery put off by its destination's rate limit is marked, so that it
    // is sent at its slot without taking another (`Store::defer_delivery`) — by whichever
    // claim finds it, after a restart too.
    "ALTER TABLE deliveries ADD COLUMN paced INTEGER NOT NULL DEFAULT 0;",
    // Version 15: what plugins keep from one event to the next (the WIT `state`
    // interface), by plugin and key; every value expires (`Store::purge_state`).
    "CREATE TABLE plugin_state (
        plugin TEXT NOT NULL,
        key TEXT NOT NULL,
        value TEXT NOT NULL,
        expires_at INTEGER NOT NULL,
        PRIMARY KEY (plugin, key)
    ) WITHOUT ROWID;
    CREATE INDEX plugin_state_expires ON plugin_state (expires_at);",
    // Version 16: when each destination entered its state (ms), so that `restart_after`
    // counts from when it became FAILED, across restarts of the gateway.
    "ALTER TABLE destination_state ADD COLUMN since INTEGER NOT NULL DEFAULT 0;",
];

/// `Store::list_events`: newest first, from the cursor (?6, ?7), within [?4, ?5). Walked by
/// `events_source` when a source is given (?1), else by `events_received`, or by
/// `events_dead_lettered` for dead letters: each bound is a range of the index, so a page
/// costs what it reads, however deep it is. The status (?2), the type (?3) and a field
/// (path ?10 equal to ?11; both read from each body that is JSON) are checked on each row
/// walked; the listing's budget bounds a rare one. With `indexed`, the key of the field's
/// index (`field_key`), the walk is that index's for one value (?13) instead, the source
/// checked on each row (`+` keeps SQLite from walking `events_source`).
fn list_events_sql(by_source: bool, dead_lettered: bool, indexed: Option<&str>) -> String {
    let source = match (by_source, indexed.is_some()) {
        (true, false) => "e.source = ?1",
        (true, true) => "+e.source = ?1",
        (false, _) => "?1 IS NULL",
    };
    let by_key = indexed.map_or(String::new(), |key| format!("AND {key} = ?13"));
    let route_result = if dead_lettered {
        DEAD_LETTERED
    } else {
        ROUTE_RESULT
    };
    let event_type = "CASE WHEN json_valid(CAST(e.body AS TEXT))
         THEN COALESCE(json_extract(CAST(e.body AS TEXT), '$.type'), json_extract(CAST(e.body AS TEXT), '$.event_type'))
         END";
    format!(
        "SELECT e.id, e.source, e.received_at, e.status, {event_type} AS event_type,
                (SELECT COUNT(*) FROM deliveries d WHERE d.event_id = e.id AND d.status = 'pending'),
                (SELECT COUNT(*) FROM deliveries d WHERE d.event_id = e.id AND d.status = 'delivered'),
                (SELECT COUNT(*) FROM deliveries d WHERE d.event_id = e.id AND d.status = 'failed'),
                e.failed_routes, length(e.body) + length(e.headers)
         FROM events e
         WHERE {source}
           {by_key}
           AND (?2 IS NULL OR e.status = ?2)
           AND (?3 IS NULL OR {event_type} GLOB ?3)
           AND (?10 IS NULL OR CASE WHEN json_valid(CAST(e.body AS TEXT))
                THEN CASE json_type(CAST(e.body AS TEXT), ?10)
                    WHEN 'text' THEN json_extract(CAST(e.body AS TEXT), ?10) = ?11
                    WHEN 'integer' THEN json_extract(CAST(e.body AS TEXT), ?10) = ?12
                    WHEN 'real' THEN json_extract(CAST(e.body AS TEXT), ?10) = ?12
                    WHEN 'true' THEN ?11 = 'true'
                    WHEN 'false' THEN ?11 = 'false'
                    WHEN 'null' THEN ?11 = 'null'
                END END)
           AND e.received_at >= ?4 AND e.received_at < ?5
           AND (e.received_at, e.id) < (?6, ?7)
           {route_result}
         ORDER BY e.received_at DESC, e.id DESC LIMIT ?8"
    )
}

/// A body field's path in SQLite's JSON path syntax, each key quoted: `$."data"."iccid"`.
fn sqlite_path(path: &[String]) -> String {
    let keys: String = path.iter().map(|k| format!(".\"{k}\"")).collect();
    format!("${keys}")
}

/// What the index on a body field (`store.indexed_fields`) holds of each event, besides
/// its time and id: the field's value as `json_extract` reads it (text or a number), its
/// name for `true`, `false` and `null` (which `json_extract` reads as 1, 0 and NULL), and
/// NULL when the body is not JSON or lacks it. The path is written out, as SQLite uses an
/// index on an expression only for the same expression.
fn field_key(path: &[String]) -> String {
    let path = sqlite_path(path).replace('\'', "''");
    format!(
        "(CASE WHEN json_valid(CAST(body AS TEXT)) THEN
            CASE json_type(CAST(body AS TEXT), '{path}')
                WHEN 'true' THEN 'true' WHEN 'false' THEN 'false' WHEN 'null' THEN 'null'
                ELSE json_extract(CAST(body AS TEXT), '{path}')
            END
        END)"
    )
}

/// The index on a body field, named `name` (`field_index_name`): by its key, then newest
/// first as `events_source` is by source.
fn create_field_index(name: &str, path: &[String]) -> String {
    let key = field_key(path);
    format!("CREATE INDEX \"{name}\" ON events ({key}, received_at, id)")
}

/// The keys under which a field equal to `field.equals` is found in its index (see
/// `field_key`), each walked in turn: the text (a string's, or `true`, `false`, `null`),
/// and the number it may also be.
fn field_keys(field: &FieldMatch) -> Vec<rusqlite::types::Value> {
    let text = rusqlite::types::Value::Text(field.equals.clone());
    std::iter::once(text)
        .chain(field.number().map(sql_number))
        .collect()
}

/// The store's body field indexes (`FIELD_INDEX_PREFIX` bound as ?1).
const FIELD_INDEXES: &str = "SELECT name FROM sqlite_master
    WHERE type = 'index' AND tbl_name = 'events' AND substr(name, 1, length(?1)) = ?1";

/// A row of `list_events_sql`.
fn summary_from_row(r: &rusqlite::Row) -> rusqlite::Result<EventSummary> {
    let status: String = r.get(3)?;
    let event_type: Option<rusqlite::types::Value> = r.get(4)?;
    Ok(EventSummary {
        id: r.get(0)?,
        source: r.get(1)?,
        received_at: r.get::<_, i64>(2)? as u64,
        status: if status == "queued" {
            EventStatus::Queued
        } else {
            EventStatus::Processed
        },
        event_type: match event_type {
            Some(rusqlite::types::Value::Text(t)) => Some(t),
            Some(rusqlite::types::Value::Integer(i)) => Some(i.to_string()),
            _ => None,
        },
        pending: r.get::<_, i64>(5)? as u64,
        delivered: r.get::<_, i64>(6)? as u64,
        failed: r.get::<_, i64>(7)? as u64,
        failed_routes: r.get::<_, i64>(8)? as u64,
        queued_bytes: r.get::<_, i64>(9)? as u64,
    })
}

/// A number `FieldMatch::equals` is compared with: whole numbers (up to 2^63) exactly,
/// others as SQLite reads JSON numbers, as doubles.
fn sql_number(n: serde_json::Number) -> rusqlite::types::Value {
    match n.as_i64() {
        Some(i) => rusqlite::types::Value::Integer(i),
        None => rusqlite::types::Value::Real(n.as_f64().unwrap_or(f64::NAN)),
    }
}

/// What an event takes up in the queue (`queued_size`, near enough: its headers as
/// stored), read without its body (SQLite keeps a blob's length in the row's header).
const QUEUED_BYTES: &str = "SELECT length(body) + length(headers) FROM events WHERE id = ?";

/// The filter of `list_events` on route results: dead letters from their own index, the
/// other results from the outcomes (bound as ?9 either way).
const DEAD_LETTERED: &str = "AND e.failed_routes > 0 AND ?9 = 'failed'";
const ROUTE_RESULT: &str = "AND (?9 IS NULL OR EXISTS (SELECT 1 FROM route_outcomes o
    WHERE o.event_id = e.id AND o.run = e.run AND json_extract(o.outcome, '$.result.result') = ?9))";

/// Deliveries in `seq` order: all of them, the delivered ones (most rows match), or those
/// of another status (from `deliveries_undelivered`). Bound: status, after, limit.
const LIST_DELIVERIES_ALL: &str = "SELECT * FROM deliveries
    WHERE ?1 IS NULL AND ?4 IS NULL AND seq > ?2 ORDER BY seq LIMIT ?3";
const LIST_DELIVERIES_DELIVERED: &str = "SELECT * FROM deliveries
    WHERE status = ?1 AND ?4 IS NULL AND seq > ?2 ORDER BY seq LIMIT ?3";
/// Pending, failed or skipped deliveries, of one destination (?4) or all, walking
/// `deliveries_undelivered` (few rows, where the others are delivered).
const LIST_DELIVERIES_UNDELIVERED: &str = "SELECT * FROM deliveries
    WHERE status = ?1 AND status != 'delivered' AND seq > ?2 AND (?4 IS NULL OR +destination = ?4)
    ORDER BY seq LIMIT ?3";
/// When the oldest pending delivery was created: the first by `seq` (which follows
/// creation), one probe of `deliveries_undelivered` (the repeated term selects it; without
/// it SQLite walks the table from its first row, delivered ones and all). `MIN(created_at)`
/// read every pending row: ~90 ms a scrape of `/metrics` with 380,000 waiting.
const OLDEST_PENDING: &str = "SELECT created_at FROM deliveries
    WHERE status = 'pending' AND status != 'delivered' ORDER BY seq LIMIT 1";
/// Pending and failed deliveries per destination.
const DELIVERY_COUNTS: &str = "SELECT destination, SUM(status = 'pending'), SUM(status = 'failed')
    FROM deliveries WHERE status IN ('pending', 'failed') AND status != 'delivered'
    GROUP BY destination";

/// Answers a write's caller, given how its commit (and sync, if it asked for one) went.
type Reply = Box<dyn FnOnce(Result<(), String>) + Send>;
type Job = (Durability, Box<dyn Write>);

/// A write the writer thread runs, and answers once the batch's outcome is known.
trait Write: Send {
    /// Runs the write's statements in the open transaction; false if it failed (what it
    /// did must then be undone). May run a second time after a rollback.
    fn run(&mut self, conn: &Connection) -> bool;
    /// The answer, from what the last run returned and how the commit went.
    fn into_reply(self: Box<Self>) -> Reply;
}

/// A write and its caller's channel.
struct Pending<F, R> {
    f: F,
    result: Option<rusqlite::Result<R>>,
    tx: oneshot::Sender<Result<R, StoreError>>,
}

impl<F, R> Write for Pending<F, R>
where
    F: Fn(&Connection) -> rusqlite::Result<R> + Send,
    R: Send + 'static,
{
    fn run(&mut self, conn: &Connection) -> bool {
        let result = (self.f)(conn);
        let ok = result.is_ok();
        self.result = Some(result);
        ok
    }

    fn into_reply(self: Box<Self>) -> Reply {
        let Pending { result, tx, .. } = *self;
        Box::new(move |commit| {
            let answer = match (result, commit) {
                (Some(Ok(v)), Ok(())) => Ok(v),
                (Some(Err(e)), _) => Err(StoreError::from(e)),
                (_, Err(e)) => Err(StoreError::Db(e)),
                (None, Ok(())) => Err(StoreError::Db("the write did not run".into())),
            };
            let _ = tx.send(answer);
        })
    }
}

/// When a write is answered.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Durability {
    /// Once its commit is synced to disk: it survives a power cut.
    Synced,
    /// Once it is committed: it survives a crash of the gateway, and a power cut too once
    /// a later synced write has been answered. For writes whose loss only means that work
    /// is done again.
    Lazy,
}

/// The SQLite store.
pub struct SqliteStore {
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
    readers: Arc<Readers>,
    /// How long an event listing may run (`LIST_BUDGET`).
    list_budget: Duration,
    /// The body fields indexed (`Store::index_fields`): a list by one walks its index.
    indexed: arc_swap::ArcSwap<HashSet<Vec<String>>>,
    queue: Arc<EventQueue>,
    /// Why the store stopped acknowledging writes (see `Store::fatal`), once it has.
    fatal: tokio::sync::watch::Sender<Option<String>>,
    /// The rate limits (`Store::take_slot`): in memory, since no other gateway shares
    /// this store.
    slots: Mutex<Slots>,
}

/// What `SqliteStore::backup` copied.
#[derive(Debug)]
pub struct Backup {
    /// The size of the copy.
    pub bytes: u64,
    pub events: u64,
    pub pending_deliveries: u64,
}

impl SqliteStore {
    /// Opens (creating if needed) `switchyard.db` in `data_dir`, migrates it, and queues
    /// the events that were accepted but not processed before the last stop.
    pub fn open(data_dir: &Path, capacity: usize) -> Result<Self, StoreError> {
        // A data dir made here is its owner's alone: the store holds the events' payloads
        // and the secrets of objects made through the API. (One that exists is left as is.)
        let mut dir = std::fs::DirBuilder::new();
        dir.recursive(true);
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut dir, 0o700);
        dir.create(data_dir)
            .map_err(|e| StoreError::Db(format!("cannot create {}: {e}", data_dir.display())))?;
        let path = data_dir.join("switchyard.db");
        let writer = Connection::open(&path)?;
        // `temp_store = MEMORY`: SQLite keeps the pages a savepoint (or a statement that may
        // abort half-way) may have to restore in a statement journal, which spills to a
        // temporary file past 64 KiB — group commits did when every write ran in a
        // savepoint, paying two `pwrite`s per page touched.
        writer.execute_batch(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA busy_timeout = 5000;
             PRAGMA temp_store = MEMORY;",
        )?;
        let reader_path = path.clone();
        let open_reader = move || {
            let reader = Connection::open(&reader_path)?;
            reader.execute_batch("PRAGMA busy_timeout = 5000;")?;
            Ok(reader)
        };
        Self::start(
            writer,
            Box::new(open_reader),
            capacity,
            Some(data_dir.join("switchyard.db-wal")),
        )
    }

    /// Copies the store in `data_dir` to `to`, while a gateway may be using it: the
    /// consistent snapshot of one read transaction (`VACUUM INTO`, which never starts over
    /// however busy the writer is, unlike SQLite's page-by-page backup), written beside
    /// `to` as `to.partial`, synced, checked (`PRAGMA quick_check`) and renamed into place,
    /// so that `to` is never a partial copy; only its owner may read it. Refuses to replace
    /// an existing `to`. (While it
    /// reads, the gateway's write-ahead log cannot be checkpointed past the snapshot, and
    /// grows.)
    pub fn backup(data_dir: &Path, to: &Path) -> anyhow::Result<Backup> {
        use anyhow::Context as _;
        let source = data_dir.join("switchyard.db");
        if !source.is_file() {
            anyhow::bail!("no store at {}", source.display());
        }
        if to.exists() {
            anyhow::bail!("{} exists: choose a new file", to.display());
        }
        let partial = PathBuf::from(format!("{}.partial", to.display()));
        let _ = std::fs::remove_file(&partial);
        // Created empty first (which `VACUUM INTO` accepts), readable by its owner alone:
        // the copy holds the events' payloads and the API's secrets, as the store does.
        let mut create = std::fs::OpenOptions::new();
        create.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut create, 0o600);
        create
            .open(&partial)
            .with_context(|| format!("cannot create {}", partial.display()))?;
        let conn =
            Connection::open_with_flags(&source, rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE)
                .with_context(|| format!("cannot open {}", source.display()))?;
        conn.execute_batch("PRAGMA busy_timeout = 5000;")?;
        let copied = conn
            .execute("VACUUM INTO ?1", [partial.to_string_lossy()])
            .with_context(|| format!("cannot write {}", partial.display()));
        drop(conn);
        let checked = copied.and_then(|_| {
            std::fs::File::open(&partial)
                .and_then(|f| f.sync_all())
                .with_context(|| format!("cannot sync {}", partial.display()))?;
            let copy =
                Connection::open_with_flags(&partial, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
            let check: String = copy.query_row("PRAGMA quick_check", [], |r| r.get(0))?;
            if check != "ok" {
                anyhow::bail!("the copy does not check out: {check}");
            }
            let count = |sql: &str| copy.query_row(sql, [], |r| r.get::<_, i64>(0));
            Ok(Backup {
                bytes: std::fs::metadata(&partial)?.len(),
                events: count("SELECT COUNT(*) FROM events")? as u64,
                pending_deliveries: count(
                    "SELECT COUNT(*) FROM deliveries WHERE status = 'pending'",
                )? as u64,
            })
        });
        let backup = match checked {
            Ok(b) => b,
            Err(e) => {
                let _ = std::fs::remove_file(&partial);
                return Err(e);
            }
        };
        std::fs::rename(&partial, to)
            .with_context(|| format!("cannot rename {} to {}", partial.display(), to.display()))?;
        // The rename itself survives a crash once the directory is synced.
        let dir = match to.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .with_context(|| format!("cannot sync {}", dir.display()))?;
        Ok(backup)
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

    /// A store in memory (shared by its two connections), for unit tests.
    pub fn open_in_memory(capacity: usize) -> Result<Self, StoreError> {
        let name = format!(
            "file:switchyard-{}?mode=memory&cache=shared",
            uuid::Uuid::now_v7()
        );
        let flags = rusqlite::OpenFlags::default() | rusqlite::OpenFlags::SQLITE_OPEN_URI;
        let writer = Connection::open_with_flags(&name, flags)?;
        let open_reader = move || Connection::open_with_flags(&name, flags);
        Self::start(writer, Box::new(open_reader), capacity, None)
    }

    /// `wal`: the WAL file the syncer syncs (`None` in memory).
    fn start(
        mut writer: Connection,
        open_reader: OpenReader,
        capacity: usize,
        wal: Option<PathBuf>,
    ) -> Result<Self, StoreError> {
        // Room for every statement each connection runs (rusqlite keeps 16): one evicted
        // from the cache is parsed again the next time.
        writer.set_prepared_statement_cache_capacity(64);
        migrate(&mut writer)?;
        let readers = Readers::open(open_reader)?;
        // One process owns the file: leases of a previous run are void.
        writer.execute(
            "UPDATE deliveries SET lease_until = NULL WHERE lease_until IS NOT NULL",
            [],
        )?;
        let queued = load_queued(&writer)?;
        let (tx, rx) = mpsc::channel::<Job>();
        let fatal = tokio::sync::watch::Sender::new(None);
        let failed = fatal.clone();
        // Thread names are kept under Linux's 15 characters, so `top -H` and `perf` tell
        // them apart.
        std::thread::Builder::new()
            .name("sqlite-writer".into())
            .spawn(move || write_loop(writer, rx, wal, failed))
            .map_err(|e| StoreError::Db(format!("cannot start the writer thread: {e}")))?;
        Ok(Self {
            jobs: Mutex::new(Some(tx)),
            readers,
            list_budget: LIST_BUDGET,
            indexed: Default::default(),
            queue: Arc::new(EventQueue::new(queued, capacity)),
            fatal,
            slots: Mutex::default(),
        })
    }

    fn lock_slots(&self) -> std::sync::MutexGuard<'_, Slots> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// An event whose outcome could not be recorded (e.g. the disk was full) is still
    /// `queued` in the file, but no longer in the pipeline's queue: it is queued again after
    /// a pause that doubles with each failure in a row (1 s, 2 s, … up to a minute), unless
    /// it was replayed or processed meanwhile or the store closed (the next start resumes
    /// it then). Without this it would wait for the next start.
    fn retry_later(&self, event: Event) {
        let readers = self.readers.clone();
        self.queue.retry_later(event, RETRY_MAX, move |id, run| {
            let readers = readers.clone();
            async move {
                readers
                    .run(None, move |conn| {
                        conn.query_row(
                            "SELECT 1 FROM events WHERE id = ? AND run = ? AND status = 'queued'",
                            params![id, run],
                            |_| Ok(()),
                        )
                        .optional()
                    })
                    .await
                    .map(|found| found.is_some())
            }
        });
    }

    /// Runs `f` in the writer's next transaction and answers once that transaction is
    /// committed and synced to disk.
    async fn write<R: Send + 'static>(
        &self,
        f: impl Fn(&Connection) -> rusqlite::Result<R> + Send + 'static,
    ) -> Result<R, StoreError> {
        self.write_with(Durability::Synced, f).await
    }

    /// As [`SqliteStore::write`], answered once committed (see [`Durability::Lazy`]).
    async fn write_lazy<R: Send + 'static>(
        &self,
        f: impl Fn(&Connection) -> rusqlite::Result<R> + Send + 'static,
    ) -> Result<R, StoreError> {
        self.write_with(Durability::Lazy, f).await
    }

    async fn write_with<R: Send + 'static>(
        &self,
        durability: Durability,
        f: impl Fn(&Connection) -> rusqlite::Result<R> + Send + 'static,
    ) -> Result<R, StoreError> {
        let (tx, rx) = oneshot::channel();
        let job: Job = (
            durability,
            Box::new(Pending {
                f,
                result: None,
                tx,
            }),
        );
        let sender = self.jobs.lock().unwrap_or_else(|e| e.into_inner()).clone();
        sender
            .ok_or(StoreError::Closed)?
            .send(job)
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Runs a read on the reading connection, off the async runtime, in one transaction:
    /// every statement of `f` sees the same snapshot, so an event read while an attempt is
    /// being recorded has either both the attempt and the delivery's new state or neither.
    async fn read<R: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<R> + Send + 'static,
    ) -> Result<R, StoreError> {
        self.read_within(None, f).await
    }

    /// As [`SqliteStore::read`], stopped (`StoreError::TooSlow`) if it runs past `budget`.
    async fn read_within<R: Send + 'static>(
        &self,
        budget: Option<Duration>,
        f: impl FnOnce(&Connection) -> rusqlite::Result<R> + Send + 'static,
    ) -> Result<R, StoreError> {
        self.readers
            .run(budget, move |conn| {
                let tx = conn.unchecked_transaction()?;
                let result = f(&tx)?;
                tx.commit()?;
                Ok(result)
            })
            .await
    }
}

/// Opens one more reading connection.
type OpenReader = Box<dyn Fn() -> rusqlite::Result<Connection> + Send + Sync>;

/// How many reads run at once, each on a connection of its own (WAL lets them run beside
/// the writer and each other).
const READERS: usize = 4;

/// How many SQLite VM instructions a read with a budget runs between looks at the clock
/// (a few microseconds' worth).
const PROGRESS_STEPS: std::ffi::c_int = 1000;

/// The reading connections. A read takes one for its duration, so a slow read (an event
/// list whose filter matches little of a large store) holds up only itself — not the
/// readiness probe, the metrics or an event's page.
struct Readers {
    idle: Mutex<Vec<Connection>>,
    free: Arc<tokio::sync::Semaphore>,
    open: OpenReader,
}

impl Readers {
    fn open(open: OpenReader) -> Result<Arc<Self>, StoreError> {
        let idle = (0..READERS)
            .map(|_| {
                let conn = open()?;
                conn.set_prepared_statement_cache_capacity(64);
                Ok(conn)
            })
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(Arc::new(Self {
            idle: Mutex::new(idle),
            free: Arc::new(tokio::sync::Semaphore::new(READERS)),
            open,
        }))
    }

    /// Runs `f` on an idle connection, off the async runtime (waiting for one if all are
    /// busy); interrupted, if it runs past `budget`, with `StoreError::TooSlow`.
    async fn run<R: Send + 'static>(
        self: &Arc<Self>,
        budget: Option<Duration>,
        f: impl FnOnce(&Connection) -> rusqlite::Result<R> + Send + 'static,
    ) -> Result<R, StoreError> {
        let permit = self.free.clone().acquire_owned().await;
        let pooled = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
        // The budget is kept by SQLite's progress handler, which the read's own thread
        // calls every thousand VM instructions: it stops the read at the deadline
        // wherever it is, and cannot touch the connection's next read (an interrupt from
        // outside can arrive before the read has started, or after it has handed the
        // connection back).
        let deadline = budget.map(|b| Instant::now() + b);
        let this = self.clone();
        let task = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            // A connection lost with a read that panicked (or could not clear its budget) is
            // replaced, here: opening one is file I/O.
            let mut conn = match pooled {
                Some(conn) => conn,
                None => (this.open)()?,
            };
            let Some(deadline) = deadline else {
                let result = f(&conn);
                this.give_back(conn);
                return result;
            };
            conn.progress_handler(PROGRESS_STEPS, Some(move || Instant::now() >= deadline))?;
            let result = f(&conn);
            // A connection that still had the handler would stop every later read.
            conn.progress_handler(0, None::<fn() -> bool>)?;
            this.give_back(conn);
            result
        });
        let joined = task.await;
        match joined.map_err(|e| StoreError::Db(format!("read task failed: {e}")))? {
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::OperationInterrupted =>
            {
                Err(StoreError::TooSlow(budget.unwrap_or_default()))
            }
            result => result.map_err(StoreError::from),
        }
    }

    fn give_back(&self, conn: Connection) {
        self.idle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(conn);
    }
}

fn migrate(conn: &mut Connection) -> rusqlite::Result<()> {
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    for (i, sql) in SCHEMA.iter().enumerate().skip(version as usize) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", i as i64 + 1)?;
        tx.commit()?;
        tracing::info!(version = i + 1, "Store migrated.");
    }
    Ok(())
}

/// Runs a batch's writes in one transaction and commits it. If a write fails, the batch
/// is rolled back and run again with each write in a savepoint of its own, so that only
/// the failed writes are undone.
fn run_batch(conn: &Connection, batch: &mut [Job]) -> Result<(), String> {
    // Prepared once: parsing them again per batch shows when batches are small.
    let begin = |conn: &Connection| {
        conn.prepare_cached("BEGIN IMMEDIATE")?
            .execute([])
            .map(drop)
    };
    begin(conn).map_err(|e| e.to_string())?;
    if !batch.iter_mut().all(|(_, w)| w.run(conn)) {
        // (Some errors end the transaction themselves.)
        let again = if conn.is_autocommit() {
            begin(conn)
        } else {
            conn.execute_batch("ROLLBACK").and_then(|()| begin(conn))
        };
        if let Err(e) = again {
            let _ = conn.execute_batch("ROLLBACK");
            return Err(e.to_string());
        }
        for (_, w) in batch.iter_mut() {
            let saved = conn.execute_batch("SAVEPOINT job");
            if saved.is_ok() && !w.run(conn) {
                conn.execute_batch("ROLLBACK TO job")
                    .map_err(|e| e.to_string())?;
            }
            saved
                .and_then(|()| conn.execute_batch("RELEASE job"))
                .map_err(|e| e.to_string())?;
        }
    }
    conn.prepare_cached("COMMIT")
        .and_then(|mut commit| commit.execute([]))
        .map(drop)
        .map_err(|e| {
            let _ = conn.execute_batch("ROLLBACK");
            e.to_string()
        })
}

fn write_loop(
    conn: Connection,
    jobs: mpsc::Receiver<Job>,
    wal: Option<PathBuf>,
    fatal: tokio::sync::watch::Sender<Option<String>>,
) {
    let (to_syncer, synced) = mpsc::channel::<Vec<Reply>>();
    match wal {
        Some(wal) => {
            let spawned = std::thread::Builder::new()
                .name("sqlite-syncer".into())
                .spawn(move || sync_loop(&wal, synced, &fatal));
            if let Err(e) = spawned {
                tracing::error!(error = %e, "Cannot start the SQLite sync thread; commits sync themselves.");
                let _ = conn.execute_batch("PRAGMA synchronous = FULL");
            }
        }
        // In memory: nothing to sync.
        None => drop(synced),
    }
    while let Ok(first) = jobs.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let commit = run_batch(&conn, &mut batch);
        if commit.is_err() && !conn.is_autocommit() {
            // Whatever failed left a transaction open: the next batch needs a fresh one.
            let _ = conn.execute_batch("ROLLBACK");
        }
        let replies = batch.into_iter().map(|(d, w)| (d, w.into_reply()));
        if let Err(e) = &commit {
            tracing::error!(error = %e, "Store commit failed.");
        }
        let mut to_sync = Vec::new();
        for (durability, reply) in replies {
            if durability == Durability::Synced && commit.is_ok() {
                to_sync.push(reply);
            } else {
                reply(commit.clone());
            }
        }
        if !to_sync.is_empty()
            && let Err(mpsc::SendError(unsent)) = to_syncer.send(to_sync)
        {
            // No syncer (in memory, or it could not start): synchronous = FULL, or
            // nothing to sync.
            for reply in unsent {
                reply(Ok(()));
            }
        }
    }
}

/// Syncs the WAL for the commits the writer hands over, then answers their durable
/// writes: one `fdatasync` for everything that arrived while the previous one ran.
fn sync_loop(
    wal: &Path,
    commits: mpsc::Receiver<Vec<Reply>>,
    fatal: &tokio::sync::watch::Sender<Option<String>>,
) {
    let mut file: Option<std::fs::File> = None;
    let mut failed: Option<String> = None;
    while let Ok(mut replies) = commits.recv() {
        while let Ok(more) = commits.try_recv() {
            replies.extend(more);
        }
        let result = match &failed {
            // Once a sync has failed, no later one is trusted (see `Store::fatal`): the
            // writes waiting for it are refused until the gateway stops.
            Some(why) => Err(why.clone()),
            None => {
                if file.is_none() {
                    file = std::fs::File::options().read(true).open(wal).ok();
                }
                match &file {
                    Some(f) => f
                        .sync_data()
                        .map_err(|e| format!("cannot sync {}: {e}", wal.display())),
                    None => Err(format!("cannot open {} to sync it", wal.display())),
                }
            }
        };
        if let (Err(e), None) = (&result, &failed) {
            tracing::error!(error = %e, "Store sync failed: writes since the last good sync may \
                not be on disk, so no write is acknowledged from now on; the gateway stops.");
            failed = Some(format!("{e} (the store stopped acknowledging writes)"));
            fatal.send_replace(Some(e.clone()));
        }
        for reply in replies {
            reply(result.clone());
        }
    }
}

fn event_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Event> {
    let headers: String = r.get("headers")?;
    let body: Vec<u8> = r.get("body")?;
    Ok(Event {
        id: r.get("id")?,
        source: r.get("source")?,
        received_at: r.get::<_, i64>("received_at")? as u64,
        method: r.get("method")?,
        path: r.get("path")?,
        query: r.get("query")?,
        headers: serde_json::from_str(&headers).unwrap_or_default(),
        content_type: r.get("content_type")?,
        body: Body(Bytes::from(body)),
        metadata: Vec::new(),
        run: r.get::<_, i64>("run")? as u32,
    })
}

fn load_queued(conn: &Connection) -> rusqlite::Result<Vec<Event>> {
    let mut stmt =
        conn.prepare("SELECT * FROM events WHERE status = 'queued' ORDER BY received_at, id")?;
    stmt.query_map([], event_from_row)?.collect()
}

fn delivery_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<DeliveryRecord> {
    let status: String = r.get("status")?;
    let status = DeliveryStatus::parse(&status);
    Ok(DeliveryRecord {
        id: r.get("id")?,
        event_id: r.get("event_id")?,
        route: r.get::<_, i64>("route")? as usize,
        run: r.get::<_, i64>("run")? as u32,
        destination: r.get("destination")?,
        url: r.get("url")?,
        next_attempt_at: match status {
            DeliveryStatus::Pending => r
                .get::<_, Option<i64>>("next_attempt_at")?
                .map(|v| v as u64),
            _ => None,
        },
        status,
        attempts: Vec::new(),
    })
}

fn load_attempts(conn: &Connection, delivery: &mut DeliveryRecord) -> rusqlite::Result<()> {
    let mut stmt = conn.prepare_cached(
        "SELECT at, duration_ms, status_code, error, response FROM attempts WHERE delivery_id = ? ORDER BY n",
    )?;
    delivery.attempts = stmt
        .query_map([&delivery.id], |r| {
            Ok(Attempt {
                at: r.get::<_, i64>(0)? as u64,
                duration_ms: r.get::<_, i64>(1)? as u64,
                status_code: r.get::<_, Option<i64>>(2)?.map(|c| c as u16),
                error: r.get(3)?,
                response: r.get(4)?,
            })
        })?
        .collect::<rusqlite::Result<_>>()?;
    Ok(())
}

fn json<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "null".into())
}

#[async_trait]
impl Store for SqliteStore {
    async fn insert_event(
        &self,
        event: Event,
        idempotency: Option<Idempotency>,
    ) -> Result<Inserted, StoreError> {
        let storing = self.queue.accepting(&event)?;
        let row = event.clone();
        // Serialised here, not on the writer thread (see `complete_event`).
        let headers = json(&row.headers);
        let inserted = self
            .write(move |conn| {
                if let Some(idem) = &idempotency {
                    let since = row.received_at.saturating_sub(idem.window_ms) as i64;
                    let existing: Option<String> = conn
                        .prepare_cached("SELECT event_id FROM idempotency WHERE source = ? AND key = ? AND created_at >= ?")?
                        .query_row(params![row.source, idem.key, since], |r| r.get(0))
                        .optional()?;
                    if let Some(id) = existing {
                        return Ok(Inserted::Duplicate(id));
                    }
                    conn.prepare_cached(
                        "INSERT OR REPLACE INTO idempotency (source, key, event_id, created_at) VALUES (?, ?, ?, ?)",
                    )?
                    .execute(params![row.source, idem.key, row.id, row.received_at as i64])?;
                }
                conn.prepare_cached(
                    "INSERT INTO events (id, source, received_at, method, path, query, headers, content_type, body, status, run)
                     VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'queued', ?)",
                )?
                .execute(params![
                    row.id,
                    row.source,
                    row.received_at as i64,
                    row.method,
                    row.path,
                    row.query,
                    headers,
                    row.content_type,
                    row.body.as_bytes(),
                    row.run as i64,
                ])?;
                Ok(Inserted::New)
            })
            .await;
        storing.settle(&inserted, event);
        inserted
    }

    async fn next_event(&self) -> Option<Event> {
        self.queue.next().await
    }

    fn close(&self) {
        self.queue.close();
    }

    async fn fatal(&self) -> String {
        let mut failed = self.fatal.subscribe();
        let why = failed
            .wait_for(Option::is_some)
            .await
            .ok()
            .and_then(|why| why.clone());
        match why {
            Some(why) => why,
            // (The sender lives as long as the store: not reached.)
            None => std::future::pending().await,
        }
    }

    async fn complete_event(
        &self,
        event: &Event,
        outcomes: Vec<RouteOutcome>,
        deliveries: Vec<NewDelivery>,
        now: u64,
    ) -> Result<Completion, StoreError> {
        let (event_id, run) = (event.id.clone(), event.run);
        let failed_routes = failed_routes(&outcomes) as i64;
        // Serialised here, on the caller's thread: the writer thread is the one that
        // cannot be scaled out.
        let outcomes: Vec<(usize, String)> = outcomes.iter().map(|o| (o.route, json(o))).collect();
        let deliveries: Vec<(NewDelivery, String, bool)> = deliveries
            .into_iter()
            .map(|d| {
                let (headers, same) = (json(&d.headers), body_from_event(event, &d));
                (d, headers, same)
            })
            .collect();
        let result = self.write_lazy(move |conn| {
            let mut leased = Vec::new();
            // Only a run still queued is completed (see `Store::complete_event`).
            let queued = conn
                .prepare_cached(
                    "UPDATE events SET status = 'processed', failed_routes = ?
                     WHERE id = ? AND run = ? AND status = 'queued'",
                )?
                .execute(params![failed_routes, event_id, run as i64])?;
            if queued == 0 {
                return Ok(Completion::Stale);
            }
            for (route, outcome) in &outcomes {
                conn.prepare_cached(
                    "INSERT OR REPLACE INTO route_outcomes (event_id, run, route, outcome) VALUES (?, ?, ?, ?)",
                )?
                .execute(params![event_id, run as i64, *route as i64, outcome])?;
            }
            for (d, headers, same) in &deliveries {
                let next = (d.status == DeliveryStatus::Pending).then_some((now + d.delay_ms) as i64);
                let body: &[u8] = if *same { &[] } else { &d.body };
                let inserted = conn.prepare_cached(
                    "INSERT OR IGNORE INTO deliveries (id, event_id, route, destination, url, headers, body, body_from_event, status, next_attempt_at, created_at, lease_until, run)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9,
                             CASE WHEN EXISTS (SELECT 1 FROM destination_state WHERE name = ?4 AND state != 'active')
                                  THEN NULL ELSE ?10 END,
                             ?11, ?12, ?13)",
                )?
                .execute(params![
                    d.id,
                    event_id,
                    d.route as i64,
                    d.destination,
                    d.url,
                    headers,
                    body,
                    same,
                    d.status.as_str(),
                    next,
                    now as i64,
                    d.lease_until.map(|l| l as i64),
                    run as i64,
                ])?;
                if inserted == 1 && d.lease_until.is_some() {
                    leased.push(d.id.clone());
                }
            }
            Ok(Completion::Recorded { leased })
        })
        .await;
        match &result {
            Ok(_) => self.queue.done(&event.id),
            Err(_) => self.retry_later(event.clone()),
        }
        result
    }

    async fn replay(&self, event_id: &str) -> Result<bool, StoreError> {
        let id = event_id.to_string();
        let queue = self.queue.clone();
        let event = self
            .write(move |conn| {
                // Refused, with nothing changed, when the queue has no room for it.
                let bytes: Option<i64> = conn
                    .prepare_cached(QUEUED_BYTES)?
                    .query_row([&id], |r| r.get(0))
                    .optional()?;
                let Some(bytes) = bytes else {
                    return Ok(Ok(None));
                };
                if let Err(full) = queue.fits(1, bytes as usize) {
                    return Ok(Err(full));
                }
                let changed = conn
                    .prepare_cached(
                        "UPDATE events SET status = 'queued', run = run + 1, failed_routes = 0 WHERE id = ?",
                    )?
                    .execute([&id])?;
                if changed == 0 {
                    return Ok(Ok(None));
                }
                conn.prepare_cached("SELECT * FROM events WHERE id = ?")?
                    .query_row([&id], event_from_row)
                    .optional()
                    .map(Ok)
            })
            .await??;
        match event {
            Some(e) => {
                self.queue.push(e);
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
        let scope = scope.clone();
        self.write_lazy(move |conn| {
            let due = match walk_due(conn, now, limit, &scope)? {
                Some(due) => due,
                None => due_by_destination(conn, now, limit, &scope)?,
            };
            let seqs = serde_json::to_string(&due).unwrap_or_else(|_| "[]".into());
            let mut stmt = conn.prepare_cached(CLAIM)?;
            stmt.query_map(params![lease_until as i64, seqs], |r| {
                let headers: String = r.get(4)?;
                let body: Vec<u8> = r.get(5)?;
                Ok(DueDelivery {
                    id: r.get(0)?,
                    event_id: r.get(1)?,
                    destination: r.get(2)?,
                    url: r.get(3)?,
                    headers: serde_json::from_str(&headers).unwrap_or_default(),
                    body: Bytes::from(body),
                    attempts: r.get::<_, i64>(6)? as u32,
                    received_at: r.get::<_, Option<i64>>(7)?.unwrap_or(0) as u64,
                    lease_until,
                    paced: r.get(8)?,
                })
            })?
            .collect()
        })
        .await
    }

    async fn next_due_at(&self, now: u64, scope: &ClaimScope) -> Result<Option<u64>, StoreError> {
        let scope = scope.clone();
        self.read(move |conn| match walk_next_due(conn, now, &scope)? {
            Some(next) => Ok(next),
            None => next_due_by_destination(conn, now, &scope),
        })
        .await
    }

    async fn record_attempt(
        &self,
        delivery_id: &str,
        attempts_before: u32,
        attempt: Attempt,
        next: AttemptNext,
    ) -> Result<bool, StoreError> {
        let id = delivery_id.to_string();
        self.write_lazy(move |conn| {
            let n: Option<i64> = conn
                .prepare_cached("SELECT attempts FROM deliveries WHERE id = ?")?
                .query_row([&id], |r| r.get(0))
                .optional()?;
            let Some(n) = n.filter(|n| *n == i64::from(attempts_before)) else {
                return Ok(false);
            };
            conn.prepare_cached(
                "INSERT OR REPLACE INTO attempts (delivery_id, n, at, duration_ms, status_code, error, response)
                 VALUES (?, ?, ?, ?, ?, ?, ?)",
            )?
            .execute(params![
                id,
                n + 1,
                attempt.at as i64,
                attempt.duration_ms as i64,
                attempt.status_code.map(i64::from),
                attempt.error,
                attempt.response,
            ])?;
            let (status, next_at) = match next {
                AttemptNext::Delivered => ("delivered", None),
                AttemptNext::Failed => ("failed", None),
                AttemptNext::RetryAt(at) => ("pending", Some(at as i64)),
                AttemptNext::Hold => ("pending", None),
            };
            conn.prepare_cached(
                "UPDATE deliveries SET attempts = attempts + 1, status = ?, next_attempt_at = ?, lease_until = NULL,
                     paced = 0
                 WHERE id = ?",
            )?
            .execute(params![status, next_at, id])?;
            Ok(true)
        })
        .await
    }

    async fn record_destination_state(&self, state: &DestinationState) -> Result<(), StoreError> {
        let state = state.clone();
        self.write_lazy(move |conn| upsert_destination(conn, &state))
            .await
    }

    async fn destination_states(&self) -> Result<Vec<DestinationState>, StoreError> {
        self.read(|conn| {
            let mut stmt = conn.prepare(
                "SELECT name, state, consecutive_failures, last_error, epoch, since FROM destination_state",
            )?;
            stmt.query_map([], |r| {
                let state: String = r.get(1)?;
                Ok(DestinationState {
                    name: r.get(0)?,
                    state: DestinationHealth::parse(&state),
                    consecutive_failures: r.get::<_, i64>(2)? as u32,
                    last_error: r.get(3)?,
                    epoch: r.get(4)?,
                    since: r.get::<_, i64>(5)? as u64,
                })
            })?
            .collect()
        })
        .await
    }

    async fn set_destination_state(
        &self,
        state: &DestinationState,
        now: u64,
    ) -> Result<i64, StoreError> {
        let (name, active) = (state.name.clone(), state.state == DestinationHealth::Active);
        let state = state.clone();
        let epoch = self.write(move |conn| {
            let epoch: i64 = conn
                .prepare_cached(
                    "INSERT INTO destination_state (name, state, consecutive_failures, last_error, epoch, since)
                     VALUES (?, ?, ?, ?, 1, ?)
                     ON CONFLICT (name) DO UPDATE SET state = excluded.state,
                         consecutive_failures = excluded.consecutive_failures,
                         last_error = excluded.last_error, epoch = destination_state.epoch + 1,
                         since = excluded.since
                     RETURNING epoch",
                )?
                .query_row(
                    params![
                        state.name,
                        state.state.as_str(),
                        state.consecutive_failures as i64,
                        state.last_error,
                        state.since as i64
                    ],
                    |r| r.get(0),
                )?;
            if state.state == DestinationHealth::Active {
                release(conn, &state.name, now)?;
            } else {
                hold(conn, &state.name)?;
            }
            Ok(epoch)
        })
        .await;
        if epoch.is_ok() && active {
            self.lock_slots().forget(Limit::Destination(&name));
        }
        epoch
    }

    async fn delivery_counts(&self) -> Result<Vec<DeliveryCounts>, StoreError> {
        self.read(|conn| {
            let mut stmt = conn.prepare(DELIVERY_COUNTS)?;
            stmt.query_map([], |r| {
                Ok(DeliveryCounts {
                    destination: r.get(0)?,
                    pending: r.get::<_, i64>(1)? as u64,
                    failed: r.get::<_, i64>(2)? as u64,
                })
            })?
            .collect()
        })
        .await
    }

    async fn managed_objects(&self) -> Result<Vec<ManagedObject>, StoreError> {
        self.read(|conn| {
            conn.prepare("SELECT kind, name, body FROM managed_objects ORDER BY kind, name")?
                .query_map([], |r| {
                    Ok(ManagedObject {
                        kind: r.get(0)?,
                        name: r.get(1)?,
                        body: r.get(2)?,
                    })
                })?
                .collect()
        })
        .await
    }

    async fn put_managed(&self, object: ManagedObject, now: u64) -> Result<(), StoreError> {
        self.write(move |conn| {
            conn.execute(
                "INSERT INTO managed_objects (kind, name, body, updated_at) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (kind, name) DO UPDATE SET body = ?3, updated_at = ?4",
                rusqlite::params![object.kind, object.name, object.body, now as i64],
            )
            .map(|_| ())
        })
        .await
    }

    async fn delete_managed(&self, kind: &str, name: &str) -> Result<(), StoreError> {
        let (kind, name) = (kind.to_string(), name.to_string());
        self.write(move |conn| {
            conn.execute(
                "DELETE FROM managed_objects WHERE kind = ?1 AND name = ?2",
                [&kind, &name],
            )
            .map(|_| ())
        })
        .await
    }

    async fn get_event(&self, id: &str) -> Result<Option<EventRecord>, StoreError> {
        let id = id.to_string();
        self.read(move |conn| {
            let Some((event, status)) = conn
                .prepare_cached("SELECT * FROM events WHERE id = ?")?
                .query_row([&id], |r| {
                    let status: String = r.get("status")?;
                    Ok((event_from_row(r)?, status))
                })
                .optional()?
            else {
                return Ok(None);
            };
            let routes = conn
                .prepare_cached(
                    "SELECT outcome FROM route_outcomes WHERE event_id = ? ORDER BY run, route",
                )?
                .query_map([&id], |r| {
                    let text: String = r.get(0)?;
                    Ok(serde_json::from_str(&text).unwrap_or(serde_json::Value::Null))
                })?
                .collect::<rusqlite::Result<_>>()?;
            let mut deliveries: Vec<DeliveryRecord> = conn
                .prepare_cached("SELECT * FROM deliveries WHERE event_id = ? ORDER BY seq")?
                .query_map([&id], delivery_from_row)?
                .collect::<rusqlite::Result<_>>()?;
            for d in &mut deliveries {
                load_attempts(conn, d)?;
            }
            Ok(Some(EventRecord {
                event,
                status: if status == EventStatus::Queued.as_str() {
                    EventStatus::Queued
                } else {
                    EventStatus::Processed
                },
                routes,
                deliveries,
            }))
        })
        .await
    }

    async fn list_deliveries(
        &self,
        status: Option<DeliveryStatus>,
        destination: Option<&str>,
        after: Option<i64>,
        limit: usize,
    ) -> Result<Vec<(i64, DeliveryRecord)>, StoreError> {
        let destination = destination.map(str::to_string);
        self.read(move |conn| {
            // Delivered ones, or all, in `seq` order (most rows match); the others from
            // `deliveries_undelivered`.
            let sql = match status {
                None => LIST_DELIVERIES_ALL,
                Some(DeliveryStatus::Delivered) => LIST_DELIVERIES_DELIVERED,
                Some(_) => LIST_DELIVERIES_UNDELIVERED,
            };
            let rows: Vec<(i64, DeliveryRecord)> = conn
                .prepare_cached(sql)?
                .query_map(
                    params![
                        status.map(DeliveryStatus::as_str),
                        after.unwrap_or(0),
                        limit as i64,
                        destination
                    ],
                    |r| Ok((r.get::<_, i64>("seq")?, delivery_from_row(r)?)),
                )?
                .collect::<rusqlite::Result<_>>()?;
            let mut out = Vec::with_capacity(rows.len());
            for (seq, mut d) in rows {
                load_attempts(conn, &mut d)?;
                out.push((seq, d));
            }
            Ok(out)
        })
        .await
    }

    async fn list_events(
        &self,
        filter: EventFilter,
        after: Option<(u64, String)>,
        limit: usize,
    ) -> Result<Vec<EventSummary>, StoreError> {
        let indexed = (filter.field.as_ref())
            .filter(|f| self.indexed.load().contains(&f.path))
            .map(|f| (field_key(&f.path), field_keys(f)));
        self.read_within(Some(self.list_budget), move |conn| {
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
                filter.route_result.map(RouteResultKind::as_str),
                filter.field.as_ref().map(|f| sqlite_path(&f.path)),
                filter.field.as_ref().map(|f| f.equals.as_str()),
                (filter.field.as_ref())
                    .and_then(FieldMatch::number)
                    .map(sql_number),
            );
            let limit = limit as i64;
            let event_type = filter.event_type.as_deref().map(super::type_glob);
            let mut statement = conn.prepare_cached(&sql)?;
            let mut run = |key: Option<&rusqlite::types::Value>| {
                let mut params = params![
                    filter.source,
                    bound.0,
                    event_type,
                    bound.1,
                    bound.2,
                    after_at,
                    after_id,
                    limit,
                    bound.3,
                    bound.4,
                    bound.5,
                    bound.6,
                ]
                .to_vec();
                params.extend(key.map(|k| k as &dyn rusqlite::ToSql));
                statement
                    .query_map(&*params, summary_from_row)?
                    .collect::<rusqlite::Result<Vec<_>>>()
            };
            match &indexed {
                // One walk of the index per key, merged.
                Some((_, keys)) => {
                    let runs = keys.iter().map(|k| run(Some(k)));
                    Ok(newest_of(
                        runs.collect::<rusqlite::Result<_>>()?,
                        limit as usize,
                    ))
                }
                None => run(None),
            }
        })
        .await
    }

    async fn index_fields(&self, fields: Vec<Vec<String>>) -> Result<FieldIndexes, StoreError> {
        let wanted: Vec<(String, Vec<String>)> = (fields.iter())
            .map(|path| (field_index_name(&field_key(path)), path.clone()))
            .collect();
        // Lists stop using an index before it is dropped.
        let kept = (self.indexed.load().iter())
            .filter(|path| fields.contains(path))
            .cloned()
            .collect();
        self.indexed.store(Arc::new(kept));
        let changed = self
            .write(move |conn| {
                let existing: Vec<String> = conn
                    .prepare(FIELD_INDEXES)?
                    .query_map([FIELD_INDEX_PREFIX], |r| r.get(0))?
                    .collect::<rusqlite::Result<_>>()?;
                let mut changed = FieldIndexes::default();
                for name in &existing {
                    if !wanted.iter().any(|(n, _)| n == name) {
                        conn.execute_batch(&format!("DROP INDEX \"{name}\""))?;
                        changed.dropped += 1;
                    }
                }
                for (name, path) in &wanted {
                    if !existing.contains(name) {
                        conn.execute_batch(&create_field_index(name, path))?;
                        changed.created.push(path.join("."));
                    }
                }
                Ok(changed)
            })
            .await?;
        self.indexed.store(Arc::new(fields.into_iter().collect()));
        Ok(changed)
    }

    async fn take_slot(&self, limit: Limit<'_>, now: u64, rate: f64) -> Result<u64, StoreError> {
        Ok(self.lock_slots().take(limit, now, rate))
    }

    async fn defer_delivery(&self, delivery_id: &str, until: u64) -> Result<bool, StoreError> {
        let id = delivery_id.to_string();
        // Lost in a power cut, the lease runs out and the delivery is paced again.
        self.write_lazy(move |conn| {
            conn.prepare_cached(
                "UPDATE deliveries SET next_attempt_at = ?1, lease_until = NULL, paced = 1
                 WHERE id = ?2 AND status = 'pending'",
            )?
            .execute(params![until as i64, id])
            .map(|n| n == 1)
        })
        .await
    }

    async fn retry_delivery(&self, id: &str, now: u64) -> Result<bool, StoreError> {
        let id = id.to_string();
        self.write(move |conn| {
            conn.prepare_cached(concat!(
                due_again!("?1"),
                " WHERE id = ?2 AND status IN ('pending', 'failed')"
            ))?
            .execute(params![now as i64, id])
            .map(|n| n == 1)
        })
        .await
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
        let destination = destination.to_string();
        let [since, until, now] = [since, until, now].map(|t| t.min(i64::MAX as u64) as i64);
        self.write(move |conn| {
            let looked: Vec<i64> = conn
                .prepare_cached(RECOVER_LOOK)?
                .query_map(params![after, limit as i64], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()?;
            let Some(&last) = looked.last() else {
                return Ok((0, None));
            };
            let changed = conn.prepare_cached(RECOVER)?.execute(params![
                destination,
                since,
                until,
                after,
                now,
                last
            ])?;
            Ok((changed, (looked.len() == limit).then_some(last)))
        })
        .await
    }

    async fn minute_stats(&self, since: u64) -> Result<Vec<MinuteStats>, StoreError> {
        let since = (since / 60_000 * 60_000) as i64;
        self.read(move |conn| {
            let mut minutes: std::collections::BTreeMap<i64, MinuteStats> = Default::default();
            let mut rows = conn.prepare_cached(MINUTE_EVENTS)?;
            for row in
                rows.query_map([since], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)))?
            {
                let (m, n) = row?;
                minute(&mut minutes, m).received = n as u64;
            }
            let mut rows = conn.prepare_cached(MINUTE_ATTEMPTS)?;
            for row in rows.query_map([since], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, i64>(2)?,
                ))
            })? {
                let (m, ok, failed) = row?;
                let entry = minute(&mut minutes, m);
                entry.delivered = ok as u64;
                entry.failed = failed as u64;
            }
            Ok(minutes.into_values().collect())
        })
        .await
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
        self.read(|conn| {
            let pending: i64 = conn.query_row(
                "SELECT COUNT(*) FROM deliveries WHERE status = 'pending'",
                [],
                |r| r.get(0),
            )?;
            let oldest: Option<i64> = conn
                .query_row(OLDEST_PENDING, [], |r| r.get(0))
                .optional()?;
            Ok((pending as u64, oldest.map(|v| v as u64)))
        })
        .await
    }

    async fn purge_idempotency(&self, before: u64, limit: usize) -> Result<usize, StoreError> {
        let before = before.min(i64::MAX as u64) as i64;
        self.write(move |conn| {
            conn.prepare_cached(
                "DELETE FROM idempotency WHERE rowid IN (SELECT rowid FROM idempotency
                     WHERE created_at < ?1 ORDER BY created_at LIMIT ?2 + 0)",
            )?
            .execute(params![before, limit as i64])
        })
        .await
    }

    async fn state_get(
        &self,
        plugin: &str,
        key: &str,
        now: u64,
    ) -> Result<Option<String>, StoreError> {
        let (plugin, key) = (plugin.to_string(), key.to_string());
        self.read(move |conn| {
            conn.prepare_cached(
                "SELECT value FROM plugin_state WHERE plugin = ?1 AND key = ?2 AND expires_at > ?3",
            )?
            .query_row(params![plugin, key, sql_ms(now)], |r| r.get(0))
            .optional()
        })
        .await
    }

    async fn state_put(
        &self,
        plugin: &str,
        key: &str,
        value: Option<String>,
        expires_at: u64,
    ) -> Result<(), StoreError> {
        let (plugin, key) = (plugin.to_string(), key.to_string());
        self.write_lazy(move |conn| {
            match &value {
                Some(value) => conn
                    .prepare_cached(
                        "INSERT INTO plugin_state (plugin, key, value, expires_at)
                         VALUES (?1, ?2, ?3, ?4) ON CONFLICT (plugin, key)
                         DO UPDATE SET value = ?3, expires_at = ?4",
                    )?
                    .execute(params![plugin, key, value, sql_ms(expires_at)])?,
                None => conn
                    .prepare_cached("DELETE FROM plugin_state WHERE plugin = ?1 AND key = ?2")?
                    .execute(params![plugin, key])?,
            };
            Ok(())
        })
        .await
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
        let (plugin, key) = (plugin.to_string(), key.to_string());
        let (expires_at, now) = (sql_ms(expires_at), sql_ms(now));
        // (The writer runs one write at a time: the check and the write are one step.)
        self.write_lazy(move |conn| {
            let changed = match &expected {
                None => conn
                    .prepare_cached(
                        "INSERT INTO plugin_state (plugin, key, value, expires_at)
                         VALUES (?1, ?2, ?3, ?4) ON CONFLICT (plugin, key)
                         DO UPDATE SET value = ?3, expires_at = ?4 WHERE expires_at <= ?5",
                    )?
                    .execute(params![plugin, key, value, expires_at, now])?,
                Some(expected) => conn
                    .prepare_cached(
                        "UPDATE plugin_state SET value = ?3, expires_at = ?4
                         WHERE plugin = ?1 AND key = ?2 AND value = ?6 AND expires_at > ?5",
                    )?
                    .execute(params![plugin, key, value, expires_at, now, expected])?,
            };
            Ok(changed == 1)
        })
        .await
    }

    async fn state_list(
        &self,
        plugin: &str,
        prefix: &str,
        after: &str,
        limit: usize,
        now: u64,
    ) -> Result<Vec<StateEntry>, StoreError> {
        let (plugin, prefix, after) = (plugin.to_string(), prefix.to_string(), after.to_string());
        let end = prefix_end(&prefix);
        self.read(move |conn| {
            conn.prepare_cached(
                "SELECT key, value, expires_at FROM plugin_state
                 WHERE plugin = ?1 AND key >= ?2 AND key > ?3 AND (?4 IS NULL OR key < ?4)
                   AND substr(key, 1, length(?2)) = ?2 AND expires_at > ?5
                 ORDER BY key LIMIT ?6",
            )?
            .query_map(
                params![plugin, prefix, after, end, sql_ms(now), limit as i64],
                |r| {
                    Ok(StateEntry {
                        key: r.get(0)?,
                        value: r.get(1)?,
                        expires_at: r.get::<_, i64>(2)? as u64,
                    })
                },
            )?
            .collect()
        })
        .await
    }

    async fn state_remove_prefix(
        &self,
        plugin: &str,
        prefix: &str,
        limit: usize,
    ) -> Result<usize, StoreError> {
        let (plugin, prefix) = (plugin.to_string(), prefix.to_string());
        let end = prefix_end(&prefix);
        self.write(move |conn| {
            conn.prepare_cached(
                "DELETE FROM plugin_state WHERE plugin = ?1 AND key IN (SELECT key FROM plugin_state
                     WHERE plugin = ?1 AND key >= ?2 AND (?3 IS NULL OR key < ?3)
                       AND substr(key, 1, length(?2)) = ?2
                     ORDER BY key LIMIT ?4)",
            )?
            .execute(params![plugin, prefix, end, limit as i64])
        })
        .await
    }

    async fn purge_state(&self, now: u64, limit: usize) -> Result<usize, StoreError> {
        let now = sql_ms(now);
        self.write(move |conn| {
            conn.prepare_cached(
                "DELETE FROM plugin_state WHERE (plugin, key) IN (SELECT plugin, key
                     FROM plugin_state WHERE expires_at <= ?1 ORDER BY expires_at LIMIT ?2 + 0)",
            )?
            .execute(params![now, limit as i64])
        })
        .await
    }

    async fn purge_events(
        &self,
        before: PurgeBefore,
        after: Option<PurgeCursor>,
        limit: usize,
    ) -> Result<(usize, Option<PurgeCursor>), StoreError> {
        let [end, delivered, failed] = before.bounds();
        let sources = before.sources_json();
        self.write(move |conn| {
            let (from_at, from_id) = match &after {
                Some((at, id)) => (*at as i64, id.clone()),
                None => (-1, String::new()),
            };
            let looked: Vec<(i64, String, bool)> = conn
                .prepare_cached(PURGE_LOOK)?
                .query_map(
                    params![
                        end,
                        from_at,
                        from_id,
                        limit as i64,
                        delivered,
                        failed,
                        sources
                    ],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )?
                .collect::<rusqlite::Result<_>>()?;
            let next = match looked.last() {
                Some((at, id, _)) if looked.len() == limit => Some((*at as u64, id.clone())),
                _ => None,
            };
            let doomed: Vec<&String> = looked.iter().filter(|l| l.2).map(|l| &l.1).collect();
            if doomed.is_empty() {
                return Ok((0, next));
            }
            delete_events(conn, &doomed)?;
            Ok((doomed.len(), next))
        })
        .await
    }

    async fn erase_events(&self, ids: Vec<String>, now: u64) -> Result<Erased, StoreError> {
        let ids = serde_json::to_string(&ids).expect("strings serialize");
        self.write(move |conn| {
            let found: Vec<(String, bool)> = (conn.prepare_cached(ERASE_LOOK)?)
                .query_map(params![ids, now as i64], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<rusqlite::Result<_>>()?;
            let (busy, doomed): (Vec<_>, Vec<_>) = found.into_iter().partition(|(_, busy)| *busy);
            let erased: Vec<String> = doomed.into_iter().map(|(id, _)| id).collect();
            delete_events(conn, &erased.iter().collect::<Vec<_>>())?;
            Ok(Erased {
                erased,
                busy: busy.into_iter().map(|(id, _)| id).collect(),
            })
        })
        .await
    }
}

/// Deletes these events with their attempts, deliveries and route outcomes (a purge, an
/// erasure), in the caller's transaction.
fn delete_events(conn: &Connection, ids: &[&String]) -> rusqlite::Result<()> {
    if ids.is_empty() {
        return Ok(());
    }
    let ids = serde_json::to_string(ids).expect("strings serialize");
    for delete in [
        "DELETE FROM attempts WHERE delivery_id IN (SELECT id FROM deliveries
             WHERE event_id IN (SELECT value FROM json_each(?1)))",
        "DELETE FROM deliveries WHERE event_id IN (SELECT value FROM json_each(?1))",
        "DELETE FROM route_outcomes WHERE event_id IN (SELECT value FROM json_each(?1))",
        "DELETE FROM events WHERE id IN (SELECT value FROM json_each(?1))",
    ] {
        conn.prepare_cached(delete)?.execute([&ids])?;
    }
    Ok(())
}

/// `Store::erase_events`: each of the events (?1, a JSON array of ids) there is, and
/// whether it is busy — queued, or with a delivery leased at ?2.
const ERASE_LOOK: &str = "SELECT e.id, e.status = 'queued' OR EXISTS (SELECT 1 FROM deliveries d
        WHERE d.event_id = e.id AND d.status = 'pending' AND d.lease_until >= ?2)
    FROM events e WHERE e.id IN (SELECT value FROM json_each(?1))";

/// `Store::minute_stats`: events and attempts per minute from a time on, each read from
/// its index on time (not from every row kept).
const MINUTE_EVENTS: &str = "SELECT received_at / 60000 * 60000 AS m, COUNT(*) FROM events
    WHERE received_at >= ?1 GROUP BY m";
const MINUTE_ATTEMPTS: &str = "SELECT at / 60000 * 60000 AS m,
        SUM(status_code BETWEEN 200 AND 299),
        SUM(status_code IS NULL OR status_code NOT BETWEEN 200 AND 299)
    FROM attempts WHERE at >= ?1 GROUP BY m";

/// `Store::purge_events`: the next events from a cursor, oldest first by
/// `events_received`, each with whether retention lets it go. A batch is the events looked
/// at, kept ones included, so a transaction stays short however many old events are kept
/// (failed ones, with `retention.failed` unset; those of a long outage). ?1 is the latest
/// of ?5 (delivered events), ?6 (any settled event) and the sources' own bounds in ?7 (a
/// JSON object: `{"telemetry": {"delivered": ms, "failed": ms}}`), which replace ?5 and ?6
/// for their events.
const PURGE_LOOK: &str = "SELECT e.received_at, e.id,
      e.status = 'processed'
      AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.event_id = e.id AND d.status = 'pending')
      AND (e.received_at < COALESCE(json_extract(?7, '$.\"' || e.source || '\".failed'), ?6)
           OR (e.received_at < COALESCE(json_extract(?7, '$.\"' || e.source || '\".delivered'), ?5)
               AND e.failed_routes = 0
               AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.event_id = e.id
                   AND d.status = 'failed' AND d.run = e.run)))
    FROM events e
    WHERE e.received_at < ?1 AND (e.received_at > ?2 OR (e.received_at = ?2 AND e.id > ?3))
    ORDER BY e.received_at, e.id LIMIT ?4 + 0";

/// `Store::recover_deliveries`: the next failed deliveries from a cursor, by
/// `deliveries_undelivered` (the repeated term selects it).
const RECOVER_LOOK: &str = "SELECT seq FROM deliveries
    WHERE status = 'failed' AND status != 'delivered' AND seq > ?1 ORDER BY seq LIMIT ?2 + 0";
/// ...and those of them to the destination and in the window made due again (?4 < seq <=
/// ?6).
const RECOVER: &str = concat!(
    due_again!("?5"),
    " WHERE status = 'failed' AND status != 'delivered' AND seq > ?4 AND seq <= ?6
      AND destination = ?1 AND created_at >= ?2 AND created_at < ?3"
);

/// The start of an update that makes deliveries due at `$now` again, as a retry by hand
/// does — or held (no due time) while their destination is not ACTIVE (see `hold`).
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
use due_again;

/// The due deliveries not leased at ?1, earliest first, at most ?2, by `deliveries_due`
/// (passing the leased ones: those in flight), with their destinations and due times.
const DUE_WALK: &str = "SELECT d.seq, d.destination, d.next_attempt_at FROM deliveries d
    LEFT JOIN destination_state s ON s.name = d.destination
    WHERE d.status = 'pending' AND d.next_attempt_at <= ?1
      AND (d.lease_until IS NULL OR d.lease_until < ?1)
      AND (s.state IS NULL OR s.state = 'active')
    ORDER BY d.next_attempt_at LIMIT ?2 + 0";

/// The pending deliveries not leased at ?1, earliest due first, at most ?2.
const NEXT_WALK: &str = "SELECT d.destination, d.next_attempt_at FROM deliveries d
    LEFT JOIN destination_state s ON s.name = d.destination
    WHERE d.status = 'pending' AND d.next_attempt_at IS NOT NULL
      AND (d.lease_until IS NULL OR d.lease_until < ?1)
      AND (s.state IS NULL OR s.state = 'active')
    ORDER BY d.next_attempt_at LIMIT ?2 + 0";

/// A claim's deliveries found by walking the due ones in due order (`ClaimScope::take_walked`).
fn walk_due(
    conn: &Connection,
    now: u64,
    limit: usize,
    scope: &ClaimScope,
) -> rusqlite::Result<Option<Vec<i64>>> {
    let walked = conn
        .prepare_cached(DUE_WALK)?
        .query_map(params![now as i64, claim_walk(limit) as i64], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get::<_, i64>(2)? as u64))
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(scope.take_walked(walked, now, limit))
}

/// A claim's deliveries, destination by destination: each one's first due, at most its
/// room, then the earliest of them all. Costs a probe per destination with pending
/// deliveries, however many of theirs are due.
fn due_by_destination(
    conn: &Connection,
    now: u64,
    limit: usize,
    scope: &ClaimScope,
) -> rusqlite::Result<Vec<i64>> {
    let mut due: Vec<(i64, i64)> = Vec::new();
    let mut first = conn.prepare_cached(DUE_TO)?;
    for (name, earliest) in pending_destinations(conn)? {
        let take = scope.room_for(&name, limit);
        let by = now.checked_sub(scope.wait_for(&name));
        let (Some(by), true) = (by.filter(|by| earliest <= *by), take > 0) else {
            continue;
        };
        let rows = first.query_map(params![name, by as i64, now as i64, take as i64], |r| {
            Ok((r.get(1)?, r.get(0)?))
        })?;
        for row in rows {
            due.push(row?);
        }
    }
    due.sort_unstable();
    Ok(due.into_iter().take(limit).map(|d| d.1).collect())
}

/// `Store::next_due_at` from the pending deliveries in due order (`ClaimScope::next_walked`).
fn walk_next_due(
    conn: &Connection,
    now: u64,
    scope: &ClaimScope,
) -> rusqlite::Result<Option<Option<u64>>> {
    let walked = conn
        .prepare_cached(NEXT_WALK)?
        .query_map(params![now as i64, NEXT_DUE_WALK as i64], |r| {
            Ok((r.get(0)?, r.get::<_, i64>(1)? as u64))
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(scope.next_walked(walked))
}

/// `Store::next_due_at` destination by destination.
fn next_due_by_destination(
    conn: &Connection,
    now: u64,
    scope: &ClaimScope,
) -> rusqlite::Result<Option<u64>> {
    let mut first = conn.prepare_cached(DUE_TO)?;
    let mut next: Option<u64> = None;
    for (name, earliest) in pending_destinations(conn)? {
        if scope.room_for(&name, 1) == 0 {
            continue;
        }
        // Still ahead: that is when it is next due (were its first delivery leased, the
        // dispatcher only wakes once early). Already due: the first one not leased.
        let at: Option<i64> = if earliest > now {
            Some(earliest as i64)
        } else {
            first
                .query_row(params![name, i64::MAX, now as i64, 1], |r| r.get(1))
                .optional()?
        };
        if let Some(at) = at {
            let at = at as u64 + scope.wait_for(&name);
            next = Some(next.map_or(at, |n| n.min(at)));
        }
    }
    Ok(next)
}

/// The destinations with pending deliveries not held, by a skip-scan of
/// `deliveries_destination_due`: one probe each, however many deliveries each has waiting.
const PENDING_DESTINATIONS: &str = "WITH RECURSIVE dest(name) AS (
        SELECT (SELECT MIN(destination) FROM deliveries
                WHERE status = 'pending' AND next_attempt_at IS NOT NULL)
        UNION ALL
        SELECT (SELECT MIN(destination) FROM deliveries
                WHERE status = 'pending' AND next_attempt_at IS NOT NULL
                  AND destination > dest.name)
        FROM dest WHERE dest.name IS NOT NULL)
    SELECT name,
           (SELECT MIN(next_attempt_at) FROM deliveries
            WHERE destination = dest.name AND status = 'pending' AND next_attempt_at IS NOT NULL)
    FROM dest WHERE name IS NOT NULL";

/// The destinations with deliveries due some time, each with the earliest due time of them
/// (leased ones included): a destination whose earliest is still ahead has nothing to claim
/// and is not probed further.
fn pending_destinations(conn: &Connection) -> rusqlite::Result<Vec<(String, u64)>> {
    conn.prepare_cached(PENDING_DESTINATIONS)?
        .query_map([], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u64)))?
        .collect()
}

/// A destination's (?1) first deliveries due by ?2 and not leased at ?3, at most ?4, in
/// the order of `deliveries_destination_due`; none if the destination is not ACTIVE. The
/// walk passes only the destination's deliveries under way (leased), at most its lane.
/// (`LIMIT ?4 + 0`, not `LIMIT ?4`: SQLite plans with a bare bound limit's value and so
/// compiles the statement again whenever it is bound, i.e. at every claim.)
const DUE_TO: &str = "SELECT seq, next_attempt_at FROM deliveries
    WHERE destination = ?1 AND status = 'pending' AND next_attempt_at <= ?2
      AND (lease_until IS NULL OR lease_until < ?3)
      AND NOT EXISTS (SELECT 1 FROM destination_state s WHERE s.name = ?1 AND s.state != 'active')
    ORDER BY next_attempt_at LIMIT ?4 + 0";

/// `Store::claim_due`: leases the deliveries chosen (their `seq`s, a JSON array ?2) until ?1.
const CLAIM: &str = "UPDATE deliveries SET lease_until = ?1
    WHERE seq IN (SELECT value FROM json_each(?2))
    RETURNING id, event_id, destination, url, headers,
              CASE WHEN body_from_event THEN (SELECT e.body FROM events e WHERE e.id = deliveries.event_id) ELSE body END,
              attempts,
              (SELECT e.received_at FROM events e WHERE e.id = deliveries.event_id),
              paced";

/// A destination that is not ACTIVE holds its pending deliveries: they lose their due time,
/// so claims and `next_due_at` never walk past them however many wait (new ones are
/// inserted held too) ...
fn hold(conn: &Connection, destination: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "UPDATE deliveries SET next_attempt_at = NULL WHERE destination = ? AND status = 'pending'
         AND next_attempt_at IS NOT NULL",
    )?
    .execute([destination])?;
    Ok(())
}

/// ... until a restart makes them all due at `now`: the held ones (by `deliveries_held`)
/// and those due later.
fn release(conn: &Connection, destination: &str, now: u64) -> rusqlite::Result<()> {
    for sql in [RELEASE_HELD, RELEASE_LATER] {
        conn.prepare_cached(sql)?
            .execute(params![now as i64, destination])?;
    }
    Ok(())
}
const RELEASE_HELD: &str = "UPDATE deliveries SET next_attempt_at = ?1, paced = 0
    WHERE destination = ?2 AND status = 'pending' AND next_attempt_at IS NULL";
const RELEASE_LATER: &str = "UPDATE deliveries SET next_attempt_at = ?1, paced = 0
    WHERE destination = ?2 AND status = 'pending' AND next_attempt_at > ?1";

/// Writes a state decided by attempts, unless a restart began a newer epoch meanwhile;
/// a state that is not ACTIVE holds the destination's deliveries.
fn upsert_destination(conn: &Connection, s: &DestinationState) -> rusqlite::Result<()> {
    let written = conn
        .prepare_cached(
            "INSERT INTO destination_state (name, state, consecutive_failures, last_error, epoch, since)
         VALUES (?, ?, ?, ?, ?, ?)
         ON CONFLICT (name) DO UPDATE SET state = excluded.state,
             consecutive_failures = excluded.consecutive_failures, last_error = excluded.last_error,
             since = excluded.since
         WHERE destination_state.epoch = excluded.epoch",
        )?
        .execute(params![
            s.name,
            s.state.as_str(),
            s.consecutive_failures as i64,
            s.last_error,
            s.epoch,
            s.since as i64
        ])?;
    if written == 1 && s.state != DestinationHealth::Active {
        hold(conn, &s.name)?;
    }
    Ok(())
}

impl Drop for SqliteStore {
    fn drop(&mut self) {
        // Dropping the sender ends the writer thread once it has written what it has.
        self.jobs.lock().unwrap_or_else(|e| e.into_inner()).take();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(id: &str, source: &str) -> Event {
        Event {
            id: id.into(),
            source: source.into(),
            received_at: 1_000,
            method: "POST".into(),
            path: "/".into(),
            query: String::new(),
            headers: vec![("x-a".into(), "1".into())],
            content_type: Some("application/json".into()),
            body: Body(Bytes::from_static(b"{}")),
            metadata: vec![],
            run: 0,
        }
    }

    fn delivery(id: &str, destination: &str) -> NewDelivery {
        NewDelivery {
            lease_until: None,
            id: id.into(),
            route: 0,
            destination: destination.into(),
            url: "http://127.0.0.1:1/".into(),
            headers: vec![("webhook-id".into(), id.into())],
            body: Bytes::from_static(b"{}"),
            status: DeliveryStatus::Pending,
            delay_ms: 0,
        }
    }

    #[tokio::test]
    async fn queued_events_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = SqliteStore::open(dir.path(), 10).unwrap();
            store.insert_event(event("a", "s"), None).await.unwrap();
            store.insert_event(event("b", "s"), None).await.unwrap();
            let a = store.next_event().await.unwrap();
            store
                .complete_event(&a, vec![], vec![delivery("d1", "x")], 5)
                .await
                .unwrap();
        }
        let store = SqliteStore::open(dir.path(), 10).unwrap();
        store.close();
        let b = store.next_event().await.unwrap();
        assert_eq!(b.id, "b", "only the unprocessed event is queued again");
        assert_eq!(b.headers, vec![("x-a".to_string(), "1".to_string())]);
        assert!(store.next_event().await.is_none());
        let due = store
            .claim_due(10, 100, 10, &ClaimScope::any())
            .await
            .unwrap();
        assert_eq!(due.len(), 1, "the pending delivery is still there");
    }

    /// An outcome that cannot be recorded (here a trigger stands in for a full disk) does
    /// not leave its event waiting for the next start: it is handed out again, and once
    /// the store can write, processed. A replay meanwhile supersedes the failed run.
    #[tokio::test(start_paused = true)]
    async fn an_event_whose_outcome_was_not_recorded_is_handed_out_again() {
        let store = SqliteStore::open_in_memory(10).unwrap();
        // (Time is paused: waiting costs nothing, and a wait past any retry fails at once.)
        let next = || async {
            tokio::time::timeout(RETRY_MAX * 2, store.next_event())
                .await
                .expect("the event is handed out again")
                .unwrap()
        };
        let full = "CREATE TRIGGER disk_full BEFORE UPDATE OF status ON events
                    WHEN NEW.status = 'processed' BEGIN SELECT RAISE(ABORT, 'disk is full'); END";
        store.write(move |c| c.execute_batch(full)).await.unwrap();
        store.insert_event(event("a", "s"), None).await.unwrap();
        let a = store.next_event().await.unwrap();
        let failed = store.complete_event(&a, vec![], vec![delivery("d1", "x")], 5);
        assert!(failed.await.is_err());
        // Fails again: the pause doubles (1 s, then 2 s).
        let again = next().await;
        assert_eq!((again.id.as_str(), again.run), ("a", 0));
        assert!(
            store
                .complete_event(&again, vec![], vec![], 5)
                .await
                .is_err()
        );
        let started = tokio::time::Instant::now();
        let again = next().await;
        assert!(started.elapsed() >= Duration::from_secs(2));
        store
            .write(|c| c.execute_batch("DROP TRIGGER disk_full"))
            .await
            .unwrap();
        store
            .complete_event(&again, vec![], vec![delivery("d1", "x")], 5)
            .await
            .unwrap();
        let due = store
            .claim_due(10, 100, 10, &ClaimScope::any())
            .await
            .unwrap();
        assert_eq!(due.len(), 1, "the delivery was recorded");

        // A run that fails and is replayed before its retry: only the replay is processed.
        store.write(move |c| c.execute_batch(full)).await.unwrap();
        store.insert_event(event("b", "s"), None).await.unwrap();
        let b = store.next_event().await.unwrap();
        assert!(store.complete_event(&b, vec![], vec![], 5).await.is_err());
        store
            .write(|c| c.execute_batch("DROP TRIGGER disk_full"))
            .await
            .unwrap();
        assert!(store.replay("b").await.unwrap());
        let replayed = next().await;
        assert_eq!((replayed.id.as_str(), replayed.run), ("b", 1));
        store
            .complete_event(&replayed, vec![], vec![], 5)
            .await
            .unwrap();
        tokio::time::sleep(RETRY_MAX).await;
        store.close();
        assert!(
            store.next_event().await.is_none(),
            "the failed run was not handed out again"
        );
    }

    #[tokio::test]
    async fn a_claimed_delivery_is_leased_until_recorded() {
        let store = SqliteStore::open_in_memory(10).unwrap();
        store.insert_event(event("a", "s"), None).await.unwrap();
        let a = store.next_event().await.unwrap();
        store
            .complete_event(
                &a,
                vec![],
                vec![delivery("d1", "x"), delivery("d2", "y")],
                5,
            )
            .await
            .unwrap();
        assert_eq!(
            store
                .claim_due(10, 100, 10, &ClaimScope::any())
                .await
                .unwrap()
                .len(),
            2
        );
        assert!(
            store
                .claim_due(50, 150, 10, &ClaimScope::any())
                .await
                .unwrap()
                .is_empty(),
            "leased"
        );
        assert_eq!(
            store
                .claim_due(101, 200, 10, &ClaimScope::any())
                .await
                .unwrap()
                .len(),
            2,
            "lease ran out"
        );

        let failed = DestinationState {
            name: "y".into(),
            state: DestinationHealth::Failed,
            consecutive_failures: 5,
            last_error: None,
            epoch: 0,
            since: 0,
        };
        let attempt = Attempt {
            at: 101,
            duration_ms: 1,
            status_code: Some(503),
            error: None,
            response: None,
        };
        store
            .record_attempt("d2", 0, attempt, AttemptNext::RetryAt(300))
            .await
            .unwrap();
        store.record_destination_state(&failed).await.unwrap();
        assert_eq!(
            store.next_due_at(150, &ClaimScope::any()).await.unwrap(),
            None,
            "d1 is in flight (leased until 200; a claim finds it after); d2 is held"
        );
        assert_eq!(
            store.next_due_at(201, &ClaimScope::any()).await.unwrap(),
            Some(5)
        );
        assert!(
            store
                .claim_due(1000, 2000, 10, &ClaimScope::any())
                .await
                .unwrap()
                .iter()
                .all(|d| d.id != "d2"),
            "FAILED: held"
        );
        let active = DestinationState {
            state: DestinationHealth::Active,
            consecutive_failures: 0,
            ..failed
        };
        store.set_destination_state(&active, 1000).await.unwrap();
        let due = store
            .claim_due(1000, 2000, 10, &ClaimScope::any())
            .await
            .unwrap();
        assert!(due.iter().any(|d| d.id == "d2" && d.attempts == 1));
    }

    #[tokio::test]
    async fn idempotency_window() {
        let store = SqliteStore::open_in_memory(10).unwrap();
        let idem = |window_ms| {
            Some(Idempotency {
                key: "k".into(),
                window_ms,
            })
        };
        assert_eq!(
            store
                .insert_event(event("a", "s"), idem(100))
                .await
                .unwrap(),
            Inserted::New
        );
        assert_eq!(
            store
                .insert_event(event("b", "s"), idem(100))
                .await
                .unwrap(),
            Inserted::Duplicate("a".into())
        );
        assert_eq!(
            store
                .insert_event(event("c", "other"), idem(100))
                .await
                .unwrap(),
            Inserted::New,
            "keys are per source"
        );
        let mut later = event("d", "s");
        later.received_at = 1_200;
        assert_eq!(
            store.insert_event(later, idem(100)).await.unwrap(),
            Inserted::New,
            "outside the window"
        );
    }

    #[tokio::test]
    async fn many_concurrent_writes_share_commits() {
        let store = Arc::new(SqliteStore::open_in_memory(10_000).unwrap());
        let mut tasks = Vec::new();
        for i in 0..500 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                store.insert_event(event(&format!("e{i}"), "s"), None).await
            }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap().unwrap(), Inserted::New);
        }
        for i in 0..500 {
            assert!(store.get_event(&format!("e{i}")).await.unwrap().is_some());
        }
    }

    /// A write that fails undoes what it did and nothing else: the writes batched with it
    /// are committed. A slow first write holds the writer so that the others queue up and
    /// share the next batch.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_failing_write_undoes_only_itself() {
        let store = Arc::new(SqliteStore::open_in_memory(100).unwrap());
        let hold = {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .write(|_| {
                        std::thread::sleep(std::time::Duration::from_millis(200));
                        Ok(())
                    })
                    .await
            })
        };
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        let mut tasks = Vec::new();
        for i in 0..200usize {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                store
                    .write(move |conn| {
                        conn.execute(
                            "INSERT INTO managed_objects (kind, name, body, updated_at) VALUES ('t', ?1, '{}', 0)",
                            [i.to_string()],
                        )?;
                        if i % 3 == 0 {
                            // Fails after a change of its own, which must go with it.
                            conn.execute("INSERT INTO no_such_table VALUES (1)", [])?;
                        }
                        Ok(i)
                    })
                    .await
            }));
        }
        hold.await.unwrap().unwrap();
        let mut failed = 0;
        for (i, t) in tasks.into_iter().enumerate() {
            match t.await.unwrap() {
                Ok(v) => assert_eq!(v, i),
                Err(e) => {
                    assert_eq!(i % 3, 0, "{e}");
                    assert!(e.to_string().contains("no_such_table"), "{e}");
                    failed += 1;
                }
            }
        }
        assert_eq!(failed, 67);
        let names: Vec<usize> = store
            .managed_objects()
            .await
            .unwrap()
            .into_iter()
            .map(|o| o.name.parse().unwrap())
            .collect();
        assert_eq!(names.len(), 133);
        assert!(names.iter().all(|n| n % 3 != 0), "{names:?}");
    }

    /// The indexes the listing queries are meant to use: a partial index applies only when
    /// the query repeats its WHERE term, which an edit could silently lose.
    #[test]
    fn deliveries_are_listed_from_the_intended_indexes() {
        let mut conn = Connection::open_in_memory().unwrap();
        migrate(&mut conn).unwrap();
        let iccid = ["sim".to_string(), "iccid".to_string()];
        let index = field_index_name(&field_key(&iccid));
        conn.execute_batch(&create_field_index(&index, &iccid))
            .unwrap();
        let plan = |sql: &str| -> String {
            let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
            let n = stmt.parameter_count();
            let rows = stmt
                .query_map(
                    rusqlite::params_from_iter(vec![rusqlite::types::Null; n]),
                    |r| r.get::<_, String>(3),
                )
                .unwrap();
            rows.map(Result::unwrap).collect::<Vec<_>>().join("; ")
        };
        let undelivered = plan(LIST_DELIVERIES_UNDELIVERED);
        assert!(
            undelivered.contains("USING INDEX deliveries_undelivered (status=? AND seq>?)"),
            "{undelivered}"
        );
        let counts = plan(DELIVERY_COUNTS);
        assert!(counts.contains("deliveries_undelivered"), "{counts}");
        let look = plan(RECOVER_LOOK);
        assert_eq!(
            look,
            "SEARCH deliveries USING COVERING INDEX deliveries_undelivered (status=? AND seq>?)"
        );
        let recover = plan(RECOVER);
        assert!(
            recover.starts_with(
                "SEARCH deliveries USING INDEX deliveries_undelivered (status=? AND seq>? AND seq<?)"
            ),
            "{recover}"
        );
        let oldest = plan(OLDEST_PENDING);
        assert_eq!(
            oldest, "SEARCH deliveries USING INDEX deliveries_undelivered (status=?)",
            "no sort, no scan"
        );
        for sql in [LIST_DELIVERIES_ALL, LIST_DELIVERIES_DELIVERED] {
            let p = plan(sql);
            assert!(p.contains("INTEGER PRIMARY KEY (rowid>?)"), "{p}");
        }
        // Claims and the next due time walk the due deliveries in order and stop early (a
        // full scan here made an idle gateway with a long-FAILED destination busy); when a
        // full lane's backlog is in the way, they probe each destination once, then walk
        // its due deliveries in order (walking past that backlog stalled the writer).
        for sql in [DUE_WALK, NEXT_WALK] {
            let p = plan(sql);
            assert!(p.contains("d USING INDEX deliveries_due"), "{p}");
            assert!(!p.contains("TEMP B-TREE"), "no sort: {p}");
        }
        // (The skip-scan's two steps, and each destination's earliest due time.)
        let dests = plan(PENDING_DESTINATIONS);
        assert_eq!(
            dests
                .matches("USING COVERING INDEX deliveries_destination_due")
                .count(),
            3,
            "{dests}"
        );
        assert!(dests.contains("(destination>?)"), "{dests}");
        assert!(
            dests.contains("(destination=? AND next_attempt_at>?)"),
            "{dests}"
        );
        let due = plan(DUE_TO);
        assert!(
            due.starts_with(
                "SEARCH deliveries USING INDEX deliveries_destination_due (destination=? AND next_attempt_at<?)"
            ),
            "{due}"
        );
        assert!(!due.contains("TEMP B-TREE"), "no sort: {due}");
        let claim = plan(CLAIM);
        assert!(claim.contains("INTEGER PRIMARY KEY (rowid=?)"), "{claim}");
        // A restart finds its destination's held deliveries and those due later by index.
        let held = plan(RELEASE_HELD);
        assert!(
            held.contains("INDEX deliveries_held (destination=?)"),
            "{held}"
        );
        let later = plan(RELEASE_LATER);
        assert!(
            later
                .contains("INDEX deliveries_destination_due (destination=? AND next_attempt_at>?)"),
            "{later}"
        );
        let dead = plan(&list_events_sql(false, true, None));
        assert!(
            dead.contains("USING INDEX events_dead_lettered (received_at>? AND received_at<?)"),
            "{dead}"
        );
        let all = plan(&list_events_sql(false, false, None));
        assert!(
            all.starts_with(
                "SEARCH e USING INDEX events_received (received_at>? AND received_at<?)"
            ),
            "{all}"
        );
        let by_source = plan(&list_events_sql(true, false, None));
        assert!(
            by_source.starts_with(
                "SEARCH e USING INDEX events_source (source=? AND received_at>? AND received_at<?)"
            ),
            "{by_source}"
        );
        // (`events_received` has the rowid, not the id, after the time: ties within a
        // millisecond are sorted, page by page — "LAST TERM" — not the whole range.)
        // By an indexed body field, each list walks that index for one key, whatever else
        // it is filtered by.
        let key = field_key(&iccid);
        let mut by_field = Vec::new();
        for (by_source, dead_lettered) in
            [(false, false), (true, false), (false, true), (true, true)]
        {
            let p = plan(&list_events_sql(by_source, dead_lettered, Some(&key)));
            assert!(
                p.starts_with(&format!(
                    "SEARCH e USING INDEX {index} (<expr>=? AND received_at>? AND received_at<?)"
                )),
                "{p}"
            );
            by_field.push(p);
        }
        for p in [&dead, &all, &by_source].into_iter().chain(&by_field) {
            assert!(!p.contains("TEMP B-TREE FOR ORDER BY"), "no sort: {p}");
        }
        // Retention walks the events by age from its cursor, a batch at a time.
        let purge = plan(PURGE_LOOK);
        assert!(purge.contains("e USING INDEX events_received"), "{purge}");
        let events = plan(MINUTE_EVENTS);
        assert!(
            events.contains("USING COVERING INDEX events_received"),
            "{events}"
        );
        let attempts = plan(MINUTE_ATTEMPTS);
        assert!(attempts.contains("USING INDEX attempts_at"), "{attempts}");
    }

    /// A read that panics loses its connection, which the next reads replace: as many
    /// reads as there are connections still run at once.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_read_that_panics_loses_only_its_connection() {
        let store = SqliteStore::open_in_memory(10).unwrap();
        let panicked = store
            .read(|_| -> rusqlite::Result<()> { panic!("a bug in a read") })
            .await;
        assert!(
            matches!(&panicked, Err(StoreError::Db(e)) if e.contains("read task failed")),
            "{panicked:?}"
        );
        let reads = (0..READERS).map(|_| {
            store.read(|conn| {
                std::thread::sleep(Duration::from_millis(50));
                conn.query_row("SELECT COUNT(*) FROM events", [], |r| r.get::<_, i64>(0))
            })
        });
        for read in futures_util::future::join_all(reads).await {
            assert_eq!(read.unwrap(), 0);
        }
    }

    /// A read past its budget is interrupted and says so (a listing's budget).
    #[tokio::test(flavor = "multi_thread")]
    async fn a_read_past_its_budget_is_stopped() {
        let store = SqliteStore::open_in_memory(10).unwrap();
        let endless = store.read_within(Some(Duration::from_millis(100)), |conn| {
            conn.query_row(
                "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c)
                 SELECT COUNT(*) FROM c",
                [],
                |r| r.get::<_, i64>(0),
            )
        });
        let stopped = tokio::time::timeout(Duration::from_secs(10), endless).await;
        assert!(
            matches!(stopped, Ok(Err(StoreError::TooSlow(d))) if d == Duration::from_millis(100)),
            "{stopped:?}"
        );
        // The connection serves the next read.
        for _ in 0..READERS {
            store.destination_states().await.unwrap();
        }
    }

    /// A read that takes long (here: one that waits to be let go) holds up only itself:
    /// the others — the readiness probe's among them — run on other connections.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_slow_read_does_not_hold_up_the_others() {
        let store = Arc::new(SqliteStore::open_in_memory(10).unwrap());
        let (release, released) = std::sync::mpsc::channel::<()>();
        let slow = {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .read(move |conn| {
                        let _ = released.recv();
                        conn.query_row("SELECT COUNT(*) FROM events", [], |r| r.get::<_, i64>(0))
                    })
                    .await
            })
        };
        for _ in 0..2 * READERS {
            let states =
                tokio::time::timeout(Duration::from_secs(5), store.destination_states()).await;
            assert!(matches!(states, Ok(Ok(_))), "{states:?}");
        }
        assert!(!slow.is_finished());
        release.send(()).unwrap();
        assert_eq!(slow.await.unwrap().unwrap(), 0);
    }

    /// The dispatcher's statements run often; they must not be compiled again each time
    /// they are bound (as SQLite does when a bound value can change the plan).
    #[test]
    fn the_dispatchers_statements_are_not_recompiled_per_call() {
        let mut conn = Connection::open_in_memory().unwrap();
        migrate(&mut conn).unwrap();
        for sql in [DUE_WALK, NEXT_WALK, PENDING_DESTINATIONS, DUE_TO, CLAIM] {
            let mut stmt = conn.prepare(sql).unwrap();
            for i in 1..=3i64 {
                let params: Vec<rusqlite::types::Value> = (1..=stmt.parameter_count())
                    .map(|k| match (sql, k) {
                        (DUE_TO, 1) => format!("d{i}").into(),
                        (CLAIM, 2) => format!("[{i}]").into(),
                        _ => (i * 10 + k as i64).into(),
                    })
                    .collect();
                let mut rows = stmt.query(rusqlite::params_from_iter(params)).unwrap();
                while rows.next().unwrap().is_some() {}
            }
            let n = stmt.get_status(rusqlite::StatementStatus::RePrepare);
            assert_eq!(n, 0, "{sql}");
        }
    }

    /// Migration 7 counts the failed routes of events stored before it, so that retention
    /// keeps the dead letters it did not know about.
    #[test]
    fn migration_7_counts_dead_letters_already_stored() {
        let mut conn = Connection::open_in_memory().unwrap();
        for sql in &SCHEMA[..6] {
            conn.execute_batch(sql).unwrap();
        }
        conn.pragma_update(None, "user_version", 6).unwrap();
        conn.execute_batch(
            r#"INSERT INTO events (id, source, received_at, method, path, query, headers, body, status, run)
               VALUES ('dead', 's', 1, 'POST', '/', '', '[]', x'', 'processed', 1),
                      ('fine', 's', 2, 'POST', '/', '', '[]', x'', 'processed', 1);
               INSERT INTO route_outcomes (event_id, run, route, outcome) VALUES
                 ('dead', 1, 0, '{"result":{"result":"failed","error":"e"}}'),
                 ('dead', 1, 1, '{"result":{"result":"failed","error":"e"}}'),
                 ('dead', 1, 2, '{"result":{"result":"delivering","deliveries":1}}'),
                 ('fine', 0, 0, '{"result":{"result":"failed","error":"e"}}'),
                 ('fine', 1, 0, '{"result":{"result":"dropped","plugin":"p","reason":"r"}}');"#,
        )
        .unwrap();
        migrate(&mut conn).unwrap();
        let failed = |id: &str| -> i64 {
            conn.query_row("SELECT failed_routes FROM events WHERE id = ?", [id], |r| {
                r.get(0)
            })
            .unwrap()
        };
        assert_eq!(
            (failed("dead"), failed("fine")),
            (2, 0),
            "only the latest run counts"
        );
    }

    /// Migration 8 holds the deliveries that FAILED and DISABLED destinations had waiting.
    #[test]
    fn migration_8_holds_deliveries_already_waiting() {
        let mut conn = Connection::open_in_memory().unwrap();
        for sql in &SCHEMA[..7] {
            conn.execute_batch(sql).unwrap();
        }
        conn.pragma_update(None, "user_version", 7).unwrap();
        conn.execute_batch(
            "INSERT INTO destination_state (name, state, consecutive_failures) VALUES
                 ('down', 'failed', 5), ('gone', 'disabled', 1), ('up', 'active', 0);
             INSERT INTO deliveries (id, event_id, route, destination, url, headers, body, status,
                                     next_attempt_at, created_at) VALUES
                 ('d1', 'e', 0, 'down', 'u', '[]', x'', 'pending', 10, 1),
                 ('d2', 'e', 0, 'gone', 'u', '[]', x'', 'pending', 10, 1),
                 ('d3', 'e', 0, 'up', 'u', '[]', x'', 'pending', 10, 1),
                 ('d4', 'e', 0, 'new', 'u', '[]', x'', 'pending', 10, 1);",
        )
        .unwrap();
        migrate(&mut conn).unwrap();
        let due: Vec<(String, Option<i64>)> = conn
            .prepare("SELECT id, next_attempt_at FROM deliveries ORDER BY id")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        let due: Vec<(&str, Option<i64>)> = due.iter().map(|(id, at)| (id.as_str(), *at)).collect();
        assert_eq!(
            due,
            [
                ("d1", None),
                ("d2", None),
                ("d3", Some(10)),
                ("d4", Some(10))
            ]
        );
    }
}
