//! `cargo xtask plugins [OUT_DIR]` builds the example plugins (Rust); `cargo xtask plugin
//! NAME [OUT_DIR]` builds one of any language (`js-transform`, `enrich-py`, …);
//! `cargo quickstart` (= `cargo xtask quickstart`) builds them into
//! `examples/quickstart/plugins.d` and runs the gateway on the quickstart config.

use std::path::PathBuf;
use std::process::{Command, ExitCode};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let root = xtask::workspace_root();
    let result = match args.first().map(String::as_str) {
        Some("plugins") => {
            let out = args
                .get(1)
                .map_or_else(|| root.join("target/plugins"), PathBuf::from);
            xtask::build_guests(xtask::PLUGINS, &out).map(|paths| {
                for p in paths {
                    println!("{}", p.display());
                }
            })
        }
        Some("plugin") if args.len() >= 2 => {
            let out = args
                .get(2)
                .map_or_else(|| root.join("target/plugins"), PathBuf::from);
            xtask::build_plugin(&args[1], &out).map(|path| println!("{}", path.display()))
        }
        Some("quickstart") => quickstart(&root, &args[1..]),
        _ => Err(
            "usage: cargo xtask plugins [OUT_DIR] | cargo xtask plugin NAME [OUT_DIR] | \
                  cargo xtask quickstart [-- SERVE ARGS]"
                .into(),
        ),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}

fn quickstart(root: &std::path::Path, extra: &[String]) -> Result<(), String> {
    let dir = root.join("examples/quickstart");
    xtask::build_guests(xtask::PLUGINS, &dir.join("plugins.d"))?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .current_dir(root)
        .args(["run", "-p", "switchyard", "--", "serve", "--config"])
        .arg(dir.join("switchyard.toml"))
        .args(extra)
        .status()
        .map_err(|e| format!("cannot run the gateway: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("the gateway exited with {status}"))
    }
}
