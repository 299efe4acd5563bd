//! Builds guest plugins from source for `wasm32-wasip2`: the one mechanism used by the
//! quickstart (`cargo quickstart`), by `cargo xtask plugins`, and by the test suite.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The example plugins, shipped to users.
pub const PLUGINS: &[&str] = &[
    "event-filter",
    "iot-normalize",
    "tag-router",
    "metadata-inject",
];

/// Plugins that exist only to test the gateway.
pub const FIXTURES: &[&str] = &["misbehave", "wrong-world", "marker", "marker-v2"];

/// The guest target.
pub const TARGET: &str = "wasm32-wasip2";

/// The workspace root (the parent of this crate).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// Environment variables that a parent cargo (a build script, `cargo clippy`, a test run)
/// sets and that must not leak into the guest build.
const CARGO_ENV: &[&str] = &[
    "CARGO_ENCODED_RUSTFLAGS",
    "RUSTFLAGS",
    "CARGO_BUILD_TARGET",
    "CARGO_TARGET_DIR",
    "RUSTC_WRAPPER",
    "RUSTC_WORKSPACE_WRAPPER",
    "CARGO_PRIMARY_PACKAGE",
    "CARGO_MAKEFLAGS",
    "__CARGO_FIX_PLZ",
];

/// Builds `packages` in release mode for `wasm32-wasip2` into `<root>/target/guests` and
/// copies each component to `<out_dir>/<package>.wasm`. Returns the copied paths in the
/// order of `packages`.
pub fn build_guests(packages: &[&str], out_dir: &Path) -> Result<Vec<PathBuf>, String> {
    let root = workspace_root();
    let target_dir = root.join("target").join("guests");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&root)
        .args(["build", "--release", "--target", TARGET, "--target-dir"])
        .arg(&target_dir);
    for p in packages {
        cmd.args(["-p", p]);
    }
    for var in CARGO_ENV {
        cmd.env_remove(var);
    }
    let status = cmd
        .status()
        .map_err(|e| format!("cannot run cargo to build the plugins: {e}"))?;
    if !status.success() {
        return Err(format!(
            "building the plugins failed ({status}); is the {TARGET} target installed? \
             (`rustup target add {TARGET}`)"
        ));
    }
    std::fs::create_dir_all(out_dir)
        .map_err(|e| format!("cannot create {}: {e}", out_dir.display()))?;
    let built = target_dir.join(TARGET).join("release");
    packages
        .iter()
        .map(|p| {
            let from = built.join(format!("{}.wasm", p.replace('-', "_")));
            let to = out_dir.join(format!("{p}.wasm"));
            // Copy to a temporary name and rename, so a running gateway never sees a
            // half-written plugin.
            let tmp = out_dir.join(format!(".{p}.wasm.tmp"));
            std::fs::copy(&from, &tmp)
                .and_then(|_| std::fs::rename(&tmp, &to))
                .map_err(|e| format!("cannot copy {} to {}: {e}", from.display(), to.display()))?;
            Ok(to)
        })
        .collect()
}
