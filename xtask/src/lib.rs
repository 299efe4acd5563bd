//! Builds guest plugins from source for `wasm32-wasip2`: the one mechanism used by the
//! quickstart (`cargo quickstart`), by `cargo xtask plugins`, and by the test suite. Also
//! the throwaway PostgreSQL server of the tests and benchmarks ([`pg`]).

use std::path::{Path, PathBuf};
use std::process::Command;

pub mod pg;

/// The example plugins, shipped to users.
pub const PLUGINS: &[&str] = &[
    "event-filter",
    "iot-normalize",
    "tag-router",
    "metadata-inject",
    "reshape",
    "change-filter",
    "enrich",
    "validate",
];

/// Plugins that exist only to test the gateway.
pub const FIXTURES: &[&str] = &[
    "misbehave",
    "wrong-world",
    "contract-0-1-0",
    "marker",
    "marker-v2",
];

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
    let built = target_dir.join(TARGET).join("release");
    packages
        .iter()
        .map(|p| {
            install(
                &built.join(format!("{}.wasm", p.replace('-', "_"))),
                out_dir,
                p,
            )
        })
        .collect()
}

/// Plugins in other languages, built by their own tools from `plugins/NAME`.
pub const JS_PLUGINS: &[&str] = &[
    "tag-router-js",
    "change-filter-js",
    "enrich-js",
    "js-transform",
];
pub const PYTHON_PLUGINS: &[&str] = &[
    "tag-router-py",
    "change-filter-py",
    "enrich-py",
    "py-transform",
];

/// Builds the plugin `plugins/NAME` of any language into `out_dir/NAME.wasm`: a Rust one
/// (one of [`PLUGINS`]) for wasm32-wasip2, a JavaScript or Python one with its pinned
/// tools (which need node and npm, or python3).
pub fn build_plugin(name: &str, out_dir: &Path) -> Result<PathBuf, String> {
    if JS_PLUGINS.contains(&name) {
        build_js(name, out_dir)
    } else if PYTHON_PLUGINS.contains(&name) {
        build_python(name, out_dir)
    } else if PLUGINS.contains(&name) {
        Ok(build_guests(&[name], out_dir)?.remove(0))
    } else {
        Err(format!(
            "no plugin `{name}`: one of {}",
            [PLUGINS, JS_PLUGINS, PYTHON_PLUGINS].concat().join(", ")
        ))
    }
}

/// The virtualenv (under `target/pytools`) with the pinned Python tools of
/// `tests/tools/requirements.txt`: componentize-py for Python plugins, schemathesis and
/// standardwebhooks for the tests. Created or updated when the pins change; one caller at
/// a time (tests call it from many threads).
pub fn python_env() -> Result<PathBuf, String> {
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let root = workspace_root();
    let requirements = root.join("tests/tools/requirements.txt");
    let wanted = std::fs::read_to_string(&requirements)
        .map_err(|e| format!("cannot read {}: {e}", requirements.display()))?;
    let venv = root.join("target/pytools");
    let stamp = venv.join("installed-requirements.txt");
    if std::fs::read_to_string(&stamp).ok().as_deref() == Some(wanted.as_str()) {
        return Ok(venv);
    }
    run(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
    run(Command::new(venv.join("bin/pip"))
        .args(["install", "--quiet", "--disable-pip-version-check", "-r"])
        .arg(&requirements))?;
    std::fs::write(&stamp, wanted).map_err(|e| format!("cannot write {}: {e}", stamp.display()))?;
    Ok(venv)
}

/// Builds the JavaScript plugin `plugins/NAME` with its own `package.json` (`npm ci` when
/// its `node_modules` is missing, then `npm run build`, which writes `dist/NAME.wasm`) and
/// copies it to `out_dir/NAME.wasm`. Skipped when the output is newer than the sources.
pub fn build_js(name: &str, out_dir: &Path) -> Result<PathBuf, String> {
    let dir = workspace_root().join("plugins").join(name);
    let to = out_dir.join(format!("{name}.wasm"));
    if fresh(&to, &[&dir, &workspace_root().join("wit")]) {
        return Ok(to);
    }
    if !dir.join("node_modules/.package-lock.json").exists() {
        run(Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
            .current_dir(&dir))?;
    }
    run(Command::new("npm")
        .args(["run", "--silent", "build"])
        .current_dir(&dir))?;
    install(
        &dir.join("dist").join(format!("{name}.wasm")),
        out_dir,
        name,
    )
}

/// Builds the Python plugin `plugins/NAME` (its `app.py`) with the pinned componentize-py
/// against `wit/`, into `out_dir/NAME.wasm`. Skipped when the output is newer than the
/// sources.
pub fn build_python(name: &str, out_dir: &Path) -> Result<PathBuf, String> {
    let root = workspace_root();
    let dir = root.join("plugins").join(name);
    let to = out_dir.join(format!("{name}.wasm"));
    if fresh(&to, &[&dir, &root.join("wit")]) {
        return Ok(to);
    }
    check_pins(&dir.join("requirements.txt"))?;
    let venv = python_env()?;
    std::fs::create_dir_all(out_dir)
        .map_err(|e| format!("cannot create {}: {e}", out_dir.display()))?;
    let tmp = out_dir.join(format!(".{name}.build.wasm"));
    run(Command::new(venv.join("bin/componentize-py"))
        .arg("-d")
        .arg(root.join("wit"))
        .args(["-w", "checked-plugin", "componentize", "app", "-o"])
        .arg(&tmp)
        .current_dir(&dir))?;
    std::fs::rename(&tmp, &to).map_err(|e| format!("cannot move {}: {e}", tmp.display()))?;
    Ok(to)
}

/// A plugin's own pins must be the ones the build uses.
fn check_pins(requirements: &Path) -> Result<(), String> {
    let tools = std::fs::read_to_string(workspace_root().join("tests/tools/requirements.txt"))
        .map_err(|e| e.to_string())?;
    let own = std::fs::read_to_string(requirements)
        .map_err(|e| format!("cannot read {}: {e}", requirements.display()))?;
    for pin in own
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        if !tools.lines().any(|l| l.trim() == pin) {
            return Err(format!(
                "{} pins `{pin}`, but tests/tools/requirements.txt does not; keep them equal",
                requirements.display()
            ));
        }
    }
    Ok(())
}

/// True when `output` exists and is newer than every file under `inputs` (skipping
/// `node_modules`, `dist` and build outputs).
fn fresh(output: &Path, inputs: &[&Path]) -> bool {
    fn newest(p: &Path) -> std::time::SystemTime {
        let Ok(meta) = std::fs::metadata(p) else {
            return std::time::SystemTime::UNIX_EPOCH;
        };
        if !meta.is_dir() {
            return meta.modified().unwrap_or(std::time::SystemTime::UNIX_EPOCH);
        }
        std::fs::read_dir(p)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| {
                let n = e.file_name();
                let n = n.to_string_lossy();
                !(n == "node_modules" || n == "dist" || n == "__pycache__" || n.ends_with(".wasm"))
            })
            .map(|e| newest(&e.path()))
            .max()
            .unwrap_or(std::time::SystemTime::UNIX_EPOCH)
    }
    let Ok(built) = std::fs::metadata(output).and_then(|m| m.modified()) else {
        return false;
    };
    inputs.iter().all(|i| newest(i) < built)
}

/// Copies a built component to `out_dir/NAME.wasm` under a temporary name first and
/// renames it, so a running gateway never sees a half-written plugin.
fn install(from: &Path, out_dir: &Path, name: &str) -> Result<PathBuf, String> {
    std::fs::create_dir_all(out_dir)
        .map_err(|e| format!("cannot create {}: {e}", out_dir.display()))?;
    let to = out_dir.join(format!("{name}.wasm"));
    // (One temporary file per process: test processes install the same plugin at once,
    // and a shared one could be renamed into place while another is writing it.)
    let tmp = out_dir.join(format!(".{name}.wasm.{}.tmp", std::process::id()));
    std::fs::copy(from, &tmp)
        .and_then(|_| std::fs::rename(&tmp, &to))
        .map_err(|e| format!("cannot copy {} to {}: {e}", from.display(), to.display()))?;
    Ok(to)
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd:?} failed ({}):\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}
