//! `switchyard plugin new`: writes a working plugin project for Rust, JavaScript or Python
//! from the templates in `plugins/templates/`, with the WIT contract, a sample event and a
//! test (`switchyard plugin run … --expect expected-verdict.json`).

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};

/// The languages a project can be scaffolded in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Lang {
    Rust,
    Js,
    Python,
}

const WIT: &str = include_str!("../../wit/plugin.wit");
const SAMPLE: &str = include_str!("../../examples/events/onomondo-location.json");

/// `(path in the project, template)`; `{{name}}` and `{{crate}}` are replaced.
fn files(lang: Lang) -> &'static [(&'static str, &'static str)] {
    match lang {
        Lang::Rust => &[
            (
                "Cargo.toml",
                include_str!("../../plugins/templates/rust/Cargo.toml.tmpl"),
            ),
            (
                "src/lib.rs",
                include_str!("../../plugins/templates/rust/lib.rs.tmpl"),
            ),
            (
                "test.sh",
                include_str!("../../plugins/templates/rust/test.sh.tmpl"),
            ),
            (".gitignore", "target/\n"),
        ],
        Lang::Js => &[
            (
                "package.json",
                include_str!("../../plugins/templates/js/package.json.tmpl"),
            ),
            (
                "plugin.js",
                include_str!("../../plugins/templates/js/plugin.js.tmpl"),
            ),
            (".gitignore", "node_modules/\ndist/\n"),
        ],
        Lang::Python => &[
            (
                "app.py",
                include_str!("../../plugins/templates/python/app.py.tmpl"),
            ),
            (
                "requirements.txt",
                include_str!("../../plugins/templates/python/requirements.txt.tmpl"),
            ),
            (
                "test.sh",
                include_str!("../../plugins/templates/python/test.sh.tmpl"),
            ),
            (".gitignore", "*.wasm\n__pycache__/\n"),
        ],
    }
}

/// How to build and test a project of `lang`, for its README and for the CLI's answer.
pub fn commands(lang: Lang) -> (&'static str, &'static str) {
    match lang {
        Lang::Rust => ("cargo build --release --target wasm32-wasip2", "./test.sh"),
        Lang::Js => ("npm install && npm run build", "npm test"),
        Lang::Python => (
            "pip install -r requirements.txt && componentize-py -d wit -w checked-plugin componentize app -o NAME.wasm",
            "./test.sh",
        ),
    }
}

/// Writes a new plugin project named `name` into `dir` (which must not exist or be empty).
/// Returns the files written.
pub fn new_plugin(lang: Lang, name: &str, dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let valid = name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    if !valid {
        bail!(
            "`{name}`: a plugin name is 1 to 64 lowercase letters, digits, `-` or `_`, starting with a letter"
        );
    }
    if dir.exists()
        && dir
            .read_dir()
            .map(|mut d| d.next().is_some())
            .unwrap_or(true)
    {
        bail!("{} exists and is not empty", dir.display());
    }
    let fill = |t: &str| {
        t.replace("{{name}}", name)
            .replace("{{crate}}", &name.replace('-', "_"))
    };
    let (build, test) = commands(lang);
    let expected = serde_json::json!({ "verdict": "continue", "metadata": [["seen-by", name]] });
    let readme = format!(
        "# {name}\n\nA Switchyard plugin ({lang:?}). It tags every JSON event with `seen-by = {name}` and drops\n\
         events whose `type` is `ping`. It takes no configuration, and says so when a route gives it\n\
         some (its `config-check`: the gateway asks before any event meets the route). `wit/plugin.wit`\n\
         is the contract (the world `checked-plugin` of `switchyard:plugin@0.1.4`); the bindings are\n\
         generated from it by the build.\n\n\
         Build:\n\n    {build}\n\nTest (runs `sample-event.json` through the plugin and compares the verdict with\n\
         `expected-verdict.json`):\n\n    {test}\n\n\
         Use it: copy the `.wasm` into the gateway's plugin directory as `{name}.wasm` and name it in a\n\
         route: `plugins = [{{ name = \"{name}\" }}]`. Then see what the route does with a payload,\n\
         nothing stored or sent (`SOURCE`: the route's source; the dashboard's Dry run page does the same):\n\n    \
         curl -H 'authorization: Bearer TOKEN' -H 'content-type: application/json' \\\n        \
         --data-binary @sample-event.json http://127.0.0.1:8080/v1/sources/SOURCE/dry-run\n",
        build = build.replace("NAME", name),
    );
    let mut written = Vec::new();
    let mut write = |rel: &str, text: &str| -> anyhow::Result<()> {
        let path = dir.join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("cannot create {}", parent.display()))?;
        }
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
        #[cfg(unix)]
        if rel.ends_with(".sh") {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
        }
        written.push(path);
        Ok(())
    };
    for (rel, template) in files(lang) {
        write(rel, &fill(template))?;
    }
    write("wit/plugin.wit", WIT)?;
    write("sample-event.json", SAMPLE)?;
    write(
        "expected-verdict.json",
        &format!("{}\n", serde_json::to_string_pretty(&expected)?),
    )?;
    write("README.md", &readme)?;
    Ok(written)
}
