//! What a management API change costs with many objects in force: the time
//! `Reloader::apply` takes to create, update and delete a destination (validate, persist in
//! the store, swap the config, routing and destinations in) while the config file holds N
//! sources, destinations and routes — the work of `POST/PATCH/DELETE /v1/destinations`
//! without the HTTP exchange. Release build, the embedded store in a temporary directory.
//!
//! Then a file reload with as many objects in the file; and what an instance on a shared
//! PostgreSQL store does to take in another instance's change to one of as many *managed*
//! objects (the store's read left out): parse and check them all and rebuild (as before
//! session 23), or take in the one change the store's log of changes hands it
//! (`Managed::following_changes`; session 23 compared every object's stored JSON instead).
//!
//! Run with: `cargo bench -p switchyard --bench api_change [-- OBJECTS [RUNS]]`
//! (default 50,000 of each and 20 changes of each kind).

use std::sync::Arc;
use std::time::{Duration, Instant};

use switchyard::Config;
use switchyard::managed::{Change, Kind, Managed, Object};
use switchyard::pipeline::Routing;
use switchyard::store::{ManagedChanges, ManagedObject};

fn median(mut times: Vec<Duration>) -> Duration {
    times.sort();
    times[times.len() / 2]
}

fn destination(name: &str, url: &str) -> Object {
    Object::Destination(
        serde_json::from_value(serde_json::json!({ "name": name, "url": url })).unwrap(),
    )
}

#[tokio::main]
async fn main() {
    let args: Vec<usize> = (std::env::args().skip(1))
        .filter(|a| !a.starts_with('-'))
        .map(|a| a.parse().expect("OBJECTS and RUNS are numbers"))
        .collect();
    let objects = args.first().copied().unwrap_or(50_000);
    let runs = args.get(1).copied().unwrap_or(20).max(1);

    let dir = tempfile::tempdir().unwrap();
    let mut text = String::from("[server]\nlisten = \"127.0.0.1:0\"\n");
    for i in 0..objects {
        text.push_str(&format!(
            "[[sources]]\nname = \"s-{i}\"\n[[destinations]]\nname = \"d-{i}\"\n\
             url = \"https://receiver.example/hooks/{i}\"\n[[routes]]\nsource = \"s-{i}\"\n\
             destinations = [\"d-{i}\"]\n"
        ));
    }
    let started = Instant::now();
    let config = Config::parse(&text, "bench", dir.path(), &|_| None).unwrap();
    let gateway = switchyard::Gateway::new(config).await.unwrap();
    println!(
        "{objects} sources, destinations and routes in the file: loaded and started in {:.2?}",
        started.elapsed()
    );
    let reloader = gateway.reloader();

    let (mut create, mut update, mut delete) = (Vec::new(), Vec::new(), Vec::new());
    let (mut source, mut route) = (Vec::new(), Vec::new());
    for i in 0..runs {
        let name = format!("api-{i}");
        let t = Instant::now();
        (reloader.apply(Change::Create(destination(&name, "https://a.example/in"))))
            .await
            .unwrap();
        create.push(t.elapsed());
        let t = Instant::now();
        (reloader.apply(Change::Update(destination(&name, "https://b.example/in"))))
            .await
            .unwrap();
        update.push(t.elapsed());
        let t = Instant::now();
        (reloader.apply(Change::Delete(Kind::Destination, name)))
            .await
            .unwrap();
        delete.push(t.elapsed());
        // A source and a route to one of the file's destinations, made then deleted.
        let name = format!("api-source-{i}");
        let t = Instant::now();
        let made = serde_json::json!({ "name": name });
        (reloader.apply(Change::Create(Object::Source(
            serde_json::from_value(made).unwrap(),
        ))))
        .await
        .unwrap();
        source.push(t.elapsed());
        let t = Instant::now();
        let made = serde_json::json!({ "name": name, "source": name, "destinations": ["d-0"] });
        (reloader.apply(Change::Create(Object::Route(
            serde_json::from_value(made).unwrap(),
        ))))
        .await
        .unwrap();
        route.push(t.elapsed());
        for kind in [Kind::Route, Kind::Source] {
            (reloader.apply(Change::Delete(kind, name.clone())))
                .await
                .unwrap();
        }
    }
    println!(
        "a destination, median of {runs}: create {:.2?}, update {:.2?}, delete {:.2?}",
        median(create),
        median(update),
        median(delete)
    );
    println!(
        "create, median of {runs}: a source {:.2?}, a route {:.2?}",
        median(source),
        median(route)
    );

    // A reload of the file (as at SIGHUP, a watched edit or `POST /v1/reload`) with one
    // destination's URL changed each time, and the same with nothing changed.
    let path = dir.path().join("switchyard.toml");
    let reloads = runs.min(5);
    let (mut edited, mut unchanged) = (Vec::new(), Vec::new());
    gateway.watch_config_file(path.clone(), std::sync::Arc::new(|_: &str| None));
    for i in 0..reloads {
        let url = format!("https://receiver.example/hooks/{}", objects / 2);
        let edit = text.replacen(&url, &format!("{url}?edit={i}"), 1);
        std::fs::write(&path, &edit).unwrap();
        let t = Instant::now();
        let report = reloader.reload("bench").await;
        edited.push(t.elapsed());
        assert_eq!(report.config, "applied", "{:?}", report.config_error);
        let t = Instant::now();
        reloader.reload("bench").await;
        unchanged.push(t.elapsed());
    }
    println!(
        "a file reload, median of {reloads}: one destination edited {:.2?}, nothing changed {:.2?}",
        median(edited),
        median(unchanged)
    );
    drop(gateway);
    follow(objects, reloads);
}

/// Another instance changed one managed destination among `objects` of each kind: what
/// taking it in costs, everything parsed again against only what changed.
fn follow(objects: usize, runs: usize) {
    let file = Config::parse("", "bench", std::path::Path::new("."), &|_| None).unwrap();
    let stored = |kind: &str, body: serde_json::Value| ManagedObject {
        kind: kind.into(),
        name: body["name"].as_str().unwrap().into(),
        body: body.to_string(),
    };
    let mut objects_now: Vec<ManagedObject> = (0..objects)
        .flat_map(|i| {
            [
                stored("source", serde_json::json!({ "name": format!("s-{i}") })),
                stored(
                    "destination",
                    serde_json::json!({ "name": format!("d-{i}"), "url": format!("https://receiver.example/hooks/{i}") }),
                ),
                stored(
                    "route",
                    serde_json::json!({ "name": format!("r-{i}"), "source": format!("s-{i}"), "destinations": [format!("d-{i}")] }),
                ),
            ]
        })
        .collect();
    let managed = Managed::from_stored(&objects_now);
    let config = managed.merged_with(&file, None).unwrap();
    let routing = Routing::from_config(Arc::new(config), None);

    let changed = objects_now.len() / 2 / 3 * 3 + 1; // a destination half-way
    objects_now[changed] = stored(
        "destination",
        serde_json::json!({ "name": objects_now[changed].name, "url": "https://moved.example/in" }),
    );
    // What the store's log of changes hands a follower: the one changed object.
    let log = ManagedChanges {
        version: 1,
        changed: vec![objects_now[changed].clone()],
        deleted: Vec::new(),
    };
    let (mut everything, mut what_changed, mut own) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs {
        let t = Instant::now();
        let all = Managed::from_stored(&objects_now);
        let config = all.merged_with(&file, None).unwrap();
        let rebuilt = Routing::from_config(Arc::new(config), Some(&routing));
        everything.push(t.elapsed());
        drop(rebuilt);

        let t = Instant::now();
        let (next, changed) = managed.following_changes(&log).unwrap().unwrap();
        let [(kind, name)] = changed.as_slice() else {
            panic!("one change: {changed:?}")
        };
        let config = next.merged_with(&file, Some((*kind, name))).unwrap();
        let patched = Routing::from_config(Arc::new(config), Some(&routing));
        what_changed.push(t.elapsed());
        drop(patched);

        // The version moved by this instance's own change: nothing to take in.
        let t = Instant::now();
        assert!(next.following_changes(&log).unwrap().is_none());
        own.push(t.elapsed());
    }
    println!(
        "another instance's change to a destination among {objects} managed objects of each kind, median of {runs}: all parsed and rebuilt {:.2?}, only the change {:.2?}; nothing changed (its own) {:.2?}",
        median(everything),
        median(what_changed),
        median(own)
    );
}
