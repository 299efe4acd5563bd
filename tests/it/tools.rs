//! Outside tools the suite checks the gateway with, installed on first use from the
//! pinned list in `tests/tools/requirements.txt` (see `xtask::python_env`).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The virtualenv with the pinned Python tools, created or updated on first use.
pub fn python_env() -> &'static Path {
    static ENV: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    match ENV.get_or_init(xtask::python_env) {
        Ok(p) => p,
        Err(e) => panic!("cannot install the Python test tools: {e}"),
    }
}
