//! Lookup tables: reference data a plugin reads by key through the `host.lookup` import —
//! a fleet's SIMs by ICCID with their customer and region, say — so that a route can tag
//! or route by what the sender's payload does not carry. `[tables]` names each one's file
//! (CSV with a header row, or a JSON object); they are read at start and again at each
//! reload (a change to one's file is one), held in memory, and shared by every plugin call
//! made under that config.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The most bytes a table's file may hold.
pub const MAX_TABLE_BYTES: u64 = 64 * 1024 * 1024;

/// The tables of a config, by name.
#[derive(Default)]
pub struct Tables {
    by_name: HashMap<String, Table>,
}

/// One table: each key's row as JSON text.
struct Table {
    rows: HashMap<String, String>,
    file: PathBuf,
}

impl std::fmt::Debug for Tables {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut names = f.debug_map();
        for (name, table) in &self.by_name {
            names.entry(
                name,
                &format_args!("{} rows from {}", table.rows.len(), table.file.display()),
            );
        }
        names.finish()
    }
}

impl Tables {
    /// Reads each named file (relative ones from `base_dir`); the name at fault and why.
    pub fn load(
        base_dir: &Path,
        files: &std::collections::BTreeMap<String, PathBuf>,
    ) -> Result<Self, (String, String)> {
        let mut by_name = HashMap::new();
        for (name, file) in files {
            let path = base_dir.join(file);
            let table = Table::load(&path)
                .map_err(|why| (name.clone(), format!("{}: {why}", path.display())))?;
            by_name.insert(name.clone(), table);
        }
        Ok(Tables { by_name })
    }

    /// The row of `key` in `table`, as JSON text; `None` when either is unknown.
    pub fn lookup(&self, table: &str, key: &str) -> Option<&str> {
        self.by_name.get(table)?.rows.get(key).map(String::as_str)
    }

    /// The tables' files (watched for changes, as the config file is).
    pub fn files(&self) -> impl Iterator<Item = &Path> {
        self.by_name.values().map(|t| t.file.as_path())
    }

    /// Each table's name and number of rows, sorted by name.
    pub fn sizes(&self) -> Vec<(&str, usize)> {
        (self.listing().into_iter())
            .map(|(name, _, rows)| (name, rows))
            .collect()
    }

    /// Each table's name, file and number of rows, sorted by name.
    pub fn listing(&self) -> Vec<(&str, &Path, usize)> {
        let mut tables: Vec<_> = (self.by_name.iter())
            .map(|(name, t)| (name.as_str(), t.file.as_path(), t.rows.len()))
            .collect();
        tables.sort();
        tables
    }
}

impl Table {
    /// A `.csv` file: a header row, then one row per key — the first column's value — as
    /// a JSON object of the row's columns by header (every value a string). A `.json`
    /// file: an object whose members are the keys and their rows (any JSON).
    fn load(path: &Path) -> Result<Self, String> {
        let bytes = crate::config::read_at_most(path, MAX_TABLE_BYTES)?;
        let rows = match path.extension().and_then(|e| e.to_str()) {
            Some(e) if e.eq_ignore_ascii_case("csv") => csv_rows(&bytes)?,
            Some(e) if e.eq_ignore_ascii_case("json") => json_rows(&bytes)?,
            _ => return Err("a table is a .csv or a .json file".into()),
        };
        Ok(Table {
            rows,
            file: path.to_path_buf(),
        })
    }
}

fn csv_rows(bytes: &[u8]) -> Result<HashMap<String, String>, String> {
    let mut reader = csv::ReaderBuilder::new()
        .trim(csv::Trim::All)
        .from_reader(bytes);
    let headers = reader
        .headers()
        .map_err(|e| format!("not CSV: {e}"))?
        .clone();
    if headers.is_empty() || headers.iter().any(str::is_empty) {
        return Err("the first row must name every column (the first one is the key)".into());
    }
    let mut rows = HashMap::new();
    for (i, record) in reader.records().enumerate() {
        let record = record.map_err(|e| format!("not CSV: {e}"))?;
        let key = record.get(0).unwrap_or_default().to_string();
        let row: serde_json::Map<String, serde_json::Value> = (headers.iter())
            .zip(record.iter())
            .map(|(h, v)| (h.to_string(), serde_json::Value::String(v.to_string())))
            .collect();
        if rows
            .insert(key.clone(), serde_json::Value::Object(row).to_string())
            .is_some()
        {
            return Err(format!("row {}: the key `{key}` is there twice", i + 2));
        }
    }
    Ok(rows)
}

fn json_rows(bytes: &[u8]) -> Result<HashMap<String, String>, String> {
    let value: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| format!("not JSON: {e}"))?;
    let serde_json::Value::Object(members) = value else {
        return Err("a JSON table is an object: each key's row under its name".into());
    };
    Ok(members
        .into_iter()
        .map(|(key, row)| (key, row.to_string()))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn tables_load_from_csv_and_json_and_say_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| std::fs::write(dir.path().join(name), text).unwrap();
        write(
            "sims.csv",
            "iccid, customer ,region\n8945000000000000001,acme,eu\n\"8945000000000000002\",\"globex, inc\",us\n",
        );
        write(
            "labels.json",
            r#"{"fleet": {"destination": "trucks", "priority": 2}, "x": "plain"}"#,
        );
        let files = BTreeMap::from([
            ("sims".to_string(), PathBuf::from("sims.csv")),
            ("labels".to_string(), dir.path().join("labels.json")),
        ]);
        let tables = Tables::load(dir.path(), &files).unwrap();
        assert_eq!(
            tables.lookup("sims", "8945000000000000002"),
            Some(r#"{"iccid":"8945000000000000002","customer":"globex, inc","region":"us"}"#)
        );
        assert_eq!(
            tables.lookup("labels", "fleet"),
            Some(r#"{"destination":"trucks","priority":2}"#)
        );
        assert_eq!(tables.lookup("labels", "x"), Some(r#""plain""#));
        assert_eq!(tables.lookup("sims", "nope"), None);
        assert_eq!(tables.lookup("nope", "fleet"), None);
        assert_eq!(tables.sizes(), [("labels", 2), ("sims", 2)]);

        let wrong = |name: &str, text: &str| {
            write(name, text);
            let files = BTreeMap::from([("t".to_string(), PathBuf::from(name))]);
            let (table, why) = Tables::load(dir.path(), &files).unwrap_err();
            assert_eq!(table, "t");
            why
        };
        assert!(
            wrong("twice.csv", "k,v\na,1\na,2\n").contains("row 3: the key `a` is there twice")
        );
        assert!(wrong("short.csv", "k,v\na,1,2\n").contains("not CSV"));
        assert!(wrong("list.json", "[1]").contains("a JSON table is an object"));
        assert!(wrong("bad.json", "{").contains("not JSON"));
        assert!(wrong("t.txt", "k,v").contains("a .csv or a .json file"));
        let files = BTreeMap::from([("t".to_string(), PathBuf::from("gone.csv"))]);
        let (_, why) = Tables::load(dir.path(), &files).unwrap_err();
        assert!(why.contains("gone.csv: cannot read it"), "{why}");
    }
}
