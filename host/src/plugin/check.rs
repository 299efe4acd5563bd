//! `plugin check`: whether a component fits the `switchyard:plugin` world, and if not, a
//! plain explanation of each mismatch (wrong export, unknown import, other version).

use std::path::Path;

use serde::Serialize;
use wasmtime::Engine;
use wasmtime::component::Component;

use super::PluginRuntime;
use super::bindings::{HANDLER_EXPORT, WIT_PACKAGE};

/// The result of checking one component file.
#[derive(Debug, Serialize)]
pub struct CheckReport {
    pub file: String,
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    pub imports: Vec<String>,
    pub exports: Vec<String>,
    pub problems: Vec<String>,
    /// Whether it exports `config-check`: a route's configuration of it is checked when
    /// it comes into force (since 0.1.4).
    pub checks_config: bool,
}

/// Checks a component file against the world this gateway implements.
pub fn check_component(runtime: &PluginRuntime, path: &Path) -> CheckReport {
    let file = path.display().to_string();
    let mut report = CheckReport {
        file,
        ok: false,
        sha256: None,
        imports: Vec::new(),
        exports: Vec::new(),
        problems: Vec::new(),
        checks_config: false,
    };
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) => {
            report.problems.push(format!("cannot read the file: {e}"));
            return report;
        }
    };
    let component = match Component::from_binary(runtime.engine(), &bytes) {
        Ok(c) => c,
        Err(e) => {
            report
                .problems
                .push(format!("not a valid WebAssembly component: {e:#}"));
            return report;
        }
    };
    let diagnosis = diagnose(runtime.engine(), &component);
    report.imports = diagnosis.imports;
    report.exports = diagnosis.exports;
    report.problems = diagnosis.problems;
    match runtime.load_bytes("check", &bytes) {
        Ok(loaded) => {
            report.sha256 = Some(loaded.sha256().to_string());
            report.checks_config = loaded.checks_config();
            report.ok = true;
        }
        Err(e) if report.problems.is_empty() => report.problems.push(format!("{e:#}")),
        Err(_) => {}
    }
    report
}

/// What is known about a component's fit from its imports and exports alone.
pub(super) struct Diagnosis {
    pub imports: Vec<String>,
    pub exports: Vec<String>,
    pub problems: Vec<String>,
}

pub(super) fn diagnose(engine: &Engine, component: &Component) -> Diagnosis {
    let ty = component.component_type();
    let imports: Vec<String> = ty.imports(engine).map(|(n, _)| n.to_string()).collect();
    let exports: Vec<String> = ty.exports(engine).map(|(n, _)| n.to_string()).collect();
    let mut problems = Vec::new();

    for name in &imports {
        if name.starts_with("wasi:") {
            continue;
        }
        match split_versioned(name) {
            Some(("switchyard:plugin", iface, version)) => {
                if !compatible(version) {
                    problems.push(format!(
                        "imports `{name}`, but this gateway implements {WIT_PACKAGE}: rebuild \
                         the plugin against wit/ of this version"
                    ));
                } else if !["host", "state", "http", "types"].contains(&iface) {
                    problems.push(format!(
                        "imports `{name}`, which is not an interface of {WIT_PACKAGE}"
                    ));
                }
            }
            _ => problems.push(format!(
                "imports `{name}`, which this gateway does not provide (plugins may import \
                 switchyard:plugin/host and WASI only)"
            )),
        }
    }

    // (An export of an earlier 0.1.x is called as this one: the linker matches it.)
    let calls = |e: &String| matches!(split_versioned(e), Some(("switchyard:plugin", "handler", v)) if compatible(v));
    if !exports.iter().any(calls) {
        let other_version = exports.iter().find(|e| {
            matches!(
                split_versioned(e),
                Some(("switchyard:plugin", "handler", _))
            )
        });
        problems.push(match other_version {
            Some(found) => format!(
                "exports `{found}`, but this gateway calls `{HANDLER_EXPORT}`: rebuild the plugin \
                 against wit/ of this version"
            ),
            None => format!(
                "does not export `{HANDLER_EXPORT}` (it exports: {})",
                if exports.is_empty() {
                    "nothing".to_string()
                } else {
                    exports.join(", ")
                }
            ),
        });
    }
    Diagnosis {
        imports,
        exports,
        problems,
    }
}

/// Splits `ns:pkg/iface@version` into (`ns:pkg`, `iface`, `version`).
fn split_versioned(name: &str) -> Option<(&str, &str, &str)> {
    let (path, version) = name.split_once('@')?;
    let (package, iface) = path.split_once('/')?;
    Some((package, iface, version))
}

/// Whether a version of our package links against this gateway's (0.1.x) under semver
/// rules (for 0.x versions, the minor number must match).
fn compatible(version: &str) -> bool {
    let mut parts = version.split('.');
    parts.next() == Some("0") && parts.next() == Some("1")
}
