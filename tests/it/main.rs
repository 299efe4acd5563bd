//! The integration suite: one binary that starts real gateways on `127.0.0.1:0`, real
//! receivers that record what arrives, and the real `switchyard` binary for the CLI.
//! Guest plugins are built from source on first use (see `util::guest`).

mod cli;
mod cluster;
mod conformance;
mod crash;
mod durable;
mod edge;
mod manage;
mod observability;
mod outbound;
mod reload;
mod sandbox;
mod spine;
mod state;
mod store;
mod tools;
mod transform;
mod ui;
mod util;
