//! Outside tools the suite checks the gateway with, installed on first use from the
//! pinned list in `tests/tools/requirements.txt` into a virtualenv under the target dir.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The virtualenv with the pinned Python tools (schemathesis, standardwebhooks,
/// componentize-py), created or updated on first use.
pub fn python_env() -> &'static Path {
    static ENV: OnceLock<PathBuf> = OnceLock::new();
    ENV.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let requirements = root.join("tests/tools/requirements.txt");
        let wanted = std::fs::read_to_string(&requirements).expect("requirements file");
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join("target"));
        let venv = target.join("pytools");
        let stamp = venv.join("installed-requirements.txt");
        if std::fs::read_to_string(&stamp).ok().as_deref() == Some(wanted.as_str()) {
            return venv;
        }
        run(Command::new("python3").args(["-m", "venv"]).arg(&venv));
        run(Command::new(venv.join("bin/pip"))
            .args(["install", "--quiet", "--disable-pip-version-check", "-r"])
            .arg(&requirements));
        std::fs::write(&stamp, wanted).expect("write the install stamp");
        venv
    })
}

fn run(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
