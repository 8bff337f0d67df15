//! The README's table of `serve` settings says what the one table of
//! settings in `src/config.rs` says: each row's flag, environment variable
//! and default (where the README gives a value) are the table's.

use reassigned::config::{SETTINGS, Setting};

/// The text between the first pair of backticks of `cell`.
fn code(cell: &str) -> Option<&str> {
    let start = cell.find('`')? + 1;
    let len = cell[start..].find('`')?;
    Some(&cell[start..start + len])
}

#[test]
fn the_readme_table_matches_the_settings() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).expect("README");
    let mut rows = 0;
    for line in readme.lines().filter(|l| l.starts_with("| `--")) {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let (Some(flag), Some(env)) = (code(cells[1]), code(cells[2])) else {
            continue;
        };
        let flag = flag.trim_start_matches("--");
        let Some(setting) = SETTINGS.iter().find(|s| s.flag == Some(flag)) else {
            // Flags of other commands (`bench`, `import`, ...) share the style.
            assert!(
                !env.starts_with("REASSIGNED_") || SETTINGS.iter().all(|s| s.env != Some(env)),
                "README row {line:?}: flag --{flag} is not the table's flag for {env}"
            );
            continue;
        };
        rows += 1;
        let env = env.split('=').next().unwrap_or_default();
        assert_eq!(setting.env, Some(env), "README row {line:?}");
        if let Some(default) = code(cells[3]) {
            let ours = Setting::default_text(setting).unwrap_or_default();
            // Numbers compare as numbers (`0.10` is `0.1`).
            let same = match (ours.parse::<f64>(), default.parse::<f64>()) {
                (Ok(a), Ok(b)) => a == b,
                _ => ours == default,
            };
            assert!(
                same,
                "README row {line:?}: default {default:?}, the table's {ours:?}"
            );
        }
    }
    assert!(rows >= 20, "only {rows} rows of settings found in the README");
}
