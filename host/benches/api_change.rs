//! What a management API change costs with many objects in force: the time
//! `Reloader::apply` takes to create, update and delete a destination (validate, persist in
//! the store, swap the config, routing and destinations in) while the config file holds N
//! sources, destinations and routes — the work of `POST/PATCH/DELETE /v1/destinations`
//! without the HTTP exchange. Release build, the embedded store in a temporary directory.
//!
//! Run with: `cargo bench -p switchyard --bench api_change [-- OBJECTS [RUNS]]`
//! (default 50,000 of each and 20 changes of each kind).

use std::time::{Duration, Instant};

use switchyard::Config;
use switchyard::managed::{Change, Kind, Object};

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
}
