//! The house is one-way: every `crate::` path in the library's code (comments
//! and `#[cfg(test)]` modules left out) must follow the import table of
//! `src/lib.rs` ("Who may import whom"), which is written out again here as
//! [`MAY_IMPORT`]. The server's submodules import each other without a
//! circle, and the table itself has no circle but the ones it names as
//! pending.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Module -> the modules of the crate it may import (besides its own
/// submodules). Keep in step with the table in `src/lib.rs`.
const MAY_IMPORT: &[(&str, &[&str])] = &[
    ("domain", &[]),
    ("lograte", &[]),
    ("stats", &[]),
    ("identity", &["domain"]),
    ("store", &["domain", "lograte", "stats"]),
    ("import", &["domain", "store", "lograte"]),
    ("federation", &["domain", "store", "lograte"]),
    ("audit", &["domain"]),
    ("receipt", &["domain"]),
    ("quota", &["domain"]),
    (
        "api",
        &[
            "domain",
            "identity",
            "store",
            "federation",
            "audit",
            "receipt",
            "quota",
            "lograte",
        ],
    ),
    ("rest", &["domain", "identity", "store", "api", "lograte"]),
    (
        "server",
        &[
            "domain",
            "identity",
            "store",
            "federation",
            "audit",
            "receipt",
            "quota",
            "lograte",
            "stats",
            "api",
            "rest",
            "config",
        ],
    ),
    (
        "config",
        &[
            "domain",
            "identity",
            "store",
            "federation",
            "import",
            "audit",
            "receipt",
            "quota",
        ],
    ),
    (
        "cli",
        &[
            "domain",
            "identity",
            "store",
            "federation",
            "import",
            "audit",
            "receipt",
            "quota",
            "lograte",
            "stats",
            "api",
            "rest",
            "server",
            "config",
        ],
    ),
];

/// Imports that run against the table today and are left to a later step of
/// issue 8, each with the reason. The test fails if one of them disappears
/// without being removed here (so the list only shrinks).
const PENDING: &[(&str, &str, &str)] = &[];

/// Submodules of `server` (every `src/server/*.rs` but `mod.rs`), which must
/// import each other without a circle.
fn server_parts(src: &Path) -> Vec<String> {
    let mut files = Vec::new();
    rust_files(&src.join("server"), &mut files);
    files
        .iter()
        .filter_map(|f| f.file_stem())
        .map(|s| s.to_string_lossy().into_owned())
        .filter(|s| s != "mod")
        .collect()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The module path of a source file: `src/server/tls.rs` -> `["server",
/// "tls"]`, `src/server/mod.rs` -> `["server"]`, `src/lib.rs` -> `[]`.
fn module_of(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).expect("under src");
    let mut parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    let last = parts.pop().expect("a file name");
    let stem = last.trim_end_matches(".rs");
    if !matches!(stem, "mod" | "lib" | "main") {
        parts.push(stem.to_owned());
    }
    parts
}

/// The code of a file without comments and without `#[cfg(test)]` modules.
fn code_of(text: &str) -> String {
    let mut out = String::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        let trimmed = line.trim_start();
        if trimmed.starts_with("#[cfg(test)]") {
            // Skip attributes up to the item; skip a `mod ... {` to its
            // closing brace at the same indentation.
            let indent = line.len() - trimmed.len();
            let item = lines
                .by_ref()
                .find(|next| !next.trim_start().starts_with("#["))
                .unwrap_or_default();
            if item.trim_start().starts_with("mod ") && item.trim_end().ends_with('{') {
                let close = format!("{}}}", " ".repeat(indent));
                for next in lines.by_ref() {
                    if next == close {
                        break;
                    }
                }
            }
            continue;
        }
        let code = match line.find("//") {
            // A `//` inside a string literal (a URL) cuts a line short: that
            // only hides text, it never invents an import.
            Some(at) => &line[..at],
            None => line,
        };
        out.push_str(code);
        out.push('\n');
    }
    out
}

fn ident(s: &str) -> &str {
    let end = s
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(s.len());
    &s[..end]
}

/// Every `crate::a::b` path of `code` as `(a, Some(b))` (`b` when it is a
/// plain name), grouped imports (`crate::{a, b::c}`) included.
fn crate_paths(code: &str) -> Vec<(String, Option<String>)> {
    paths_after(code, "crate::")
}

/// [`crate_paths`] for any root: `super::` gives a module's siblings.
fn paths_after(code: &str, root: &str) -> Vec<(String, Option<String>)> {
    let mut paths = Vec::new();
    let mut from = 0;
    while let Some(at) = code[from..].find(root).map(|at| from + at) {
        let before = code[..at].chars().next_back();
        from = at + root.len();
        let rest = &code[from..];
        if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':') {
            continue; // e.g. `some_crate::`, `super::super::`
        }
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 1;
            let mut end = 0;
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    _ => {}
                }
                if depth == 0 {
                    end = i;
                    break;
                }
            }
            let mut depth = 0;
            let mut start = 0;
            let inner = &group[..end];
            let mut items = Vec::new();
            for (i, c) in inner.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        items.push(&inner[start..i]);
                        start = i + 1;
                    }
                    _ => {}
                }
            }
            items.push(&inner[start..]);
            for item in items {
                let item = item.trim();
                let first = ident(item);
                if first.is_empty() {
                    continue;
                }
                let second = item[first.len()..]
                    .strip_prefix("::")
                    .map(ident)
                    .filter(|s| !s.is_empty());
                paths.push((first.to_owned(), second.map(str::to_owned)));
            }
        } else {
            let first = ident(rest);
            let second = rest[first.len()..]
                .strip_prefix("::")
                .map(ident)
                .filter(|s| !s.is_empty());
            paths.push((first.to_owned(), second.map(str::to_owned)));
        }
    }
    paths
}

/// The top-level modules of the library, from `src/lib.rs`'s `pub mod` lines.
fn top_modules(lib: &str) -> BTreeSet<String> {
    lib.lines()
        .filter_map(|l| l.trim().strip_prefix("pub mod "))
        .map(|l| l.trim_end_matches(';').trim().to_owned())
        .collect()
}

/// What each module imports: (from, to) -> the files that do it. Top-level
/// edges, and `server::x -> server::y` edges.
struct Imports {
    top: BTreeMap<(String, String), BTreeSet<String>>,
    server: BTreeMap<(String, String), BTreeSet<String>>,
}

fn imports(src: &Path) -> Imports {
    let lib = std::fs::read_to_string(src.join("lib.rs")).expect("read lib.rs");
    let modules = top_modules(&lib);
    let parts = server_parts(src);
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let mut found = Imports {
        top: BTreeMap::new(),
        server: BTreeMap::new(),
    };
    for file in files {
        let module = module_of(src, &file);
        let Some(from) = module.first() else {
            continue; // lib.rs: the crate root re-exports
        };
        if from == "main" {
            continue; // the binary may use anything of the library
        }
        assert!(
            modules.contains(from),
            "{} is in no module of lib.rs",
            file.display()
        );
        let text = std::fs::read_to_string(&file).expect("read source");
        let name = file.display().to_string();
        for (first, second) in crate_paths(&code_of(&text)) {
            // `crate::run` and other root items are the server's re-exports.
            let to = if modules.contains(&first) {
                first
            } else {
                "server".to_owned()
            };
            if &to != from {
                found
                    .top
                    .entry((from.clone(), to.clone()))
                    .or_default()
                    .insert(name.clone());
            }
            if from == "server"
                && to == "server"
                && let (Some(part), Some(target)) = (module.get(1), second)
                && parts.contains(&target)
                && *part != target
            {
                found
                    .server
                    .entry((part.clone(), target))
                    .or_default()
                    .insert(name.clone());
            }
        }
        // `super::x` from a server submodule names a sibling.
        if from == "server" && module.len() == 2 {
            for sibling in &parts {
                if code_of(&text).contains(&format!("super::{sibling}")) && module[1] != *sibling {
                    found
                        .server
                        .entry((module[1].clone(), sibling.clone()))
                        .or_default()
                        .insert(name.clone());
                }
            }
        }
    }
    found
}

fn src_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn allowed(from: &str, to: &str) -> bool {
    MAY_IMPORT.iter().any(|(m, may)| *m == from && may.contains(&to))
}

fn pending(from: &str, to: &str) -> bool {
    PENDING.iter().any(|(f, t, _)| *f == from && *t == to)
}

/// A circle in `edges`, if any (as the list of its nodes).
fn find_cycle(edges: &BTreeSet<(String, String)>) -> Option<Vec<String>> {
    let nodes: BTreeSet<&String> = edges.iter().flat_map(|(a, b)| [a, b]).collect();
    fn visit<'a>(
        node: &'a String,
        edges: &'a BTreeSet<(String, String)>,
        path: &mut Vec<&'a String>,
        done: &mut BTreeSet<&'a String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|n| *n == node) {
            return Some(path[at..].iter().map(|s| (*s).clone()).collect());
        }
        if done.contains(node) {
            return None;
        }
        path.push(node);
        for (_, next) in edges.iter().filter(|(a, _)| a == node) {
            if let Some(cycle) = visit(next, edges, path, done) {
                return Some(cycle);
            }
        }
        path.pop();
        done.insert(node);
        None
    }
    let mut done = BTreeSet::new();
    nodes
        .into_iter()
        .find_map(|node| visit(node, edges, &mut Vec::new(), &mut done))
}

#[test]
fn every_import_follows_the_table() {
    let found = imports(&src_dir());
    let modules = top_modules(&std::fs::read_to_string(src_dir().join("lib.rs")).expect("lib.rs"));
    for module in &modules {
        assert!(
            MAY_IMPORT.iter().any(|(m, _)| m == module),
            "module {module} is missing from MAY_IMPORT (and from the table in src/lib.rs)"
        );
    }
    let violations: Vec<String> = found
        .top
        .iter()
        .filter(|((from, to), _)| !allowed(from, to) && !pending(from, to))
        .map(|((from, to), files)| format!("{from} may not import {to} (in {files:?})"))
        .collect();
    assert!(
        violations.is_empty(),
        "imports against the table of src/lib.rs:\n{}",
        violations.join("\n")
    );
    for (from, to, why) in PENDING {
        assert!(
            found.top.contains_key(&((*from).to_owned(), (*to).to_owned())),
            "{from} no longer imports {to} ({why}): remove it from PENDING"
        );
    }
}

#[test]
fn the_named_rules_hold() {
    let found = imports(&src_dir());
    let from =
        |m: &str| -> Vec<&String> { found.top.keys().filter(|(f, _)| f == m).map(|(_, t)| t).collect() };
    assert!(from("domain").is_empty(), "domain imports {:?}", from("domain"));
    assert!(from("stats").is_empty(), "stats imports {:?}", from("stats"));
    assert!(
        from("identity").iter().all(|t| *t == "domain"),
        "identity imports {:?}",
        from("identity")
    );
    assert!(!from("api").iter().any(|t| *t == "server"), "api imports server");
    assert!(
        from("store")
            .iter()
            .all(|t| *t == "domain" || *t == "lograte" || *t == "stats" || pending("store", t)),
        "store imports {:?}",
        from("store")
    );
}

#[test]
fn server_parts_import_each_other_without_a_circle() {
    let found = imports(&src_dir());
    let edges: BTreeSet<(String, String)> = found.server.keys().cloned().collect();
    assert!(
        !edges.is_empty(),
        "the scan sees the server's submodules import each other"
    );
    assert_eq!(find_cycle(&edges), None, "server submodules: {edges:?}");
}

/// The command-line side (`src/cli/*.rs`) imports its own parts
/// (`super::x`, `crate::cli::x`) without a circle either: shared client
/// pieces live in `cli::client`, what the load generators share in
/// `cli::loadgen`, and the commands import them from there.
#[test]
fn cli_parts_import_each_other_without_a_circle() {
    let src = src_dir();
    let mut files = Vec::new();
    rust_files(&src.join("cli"), &mut files);
    let part = |f: &Path| f.file_stem().map(|s| s.to_string_lossy().into_owned());
    let parts: BTreeSet<String> = files
        .iter()
        .filter_map(|f| part(f))
        .filter(|p| p != "mod")
        .collect();
    let mut edges = BTreeSet::new();
    for file in &files {
        let Some(from) = part(file).filter(|p| p != "mod") else {
            continue;
        };
        let code = code_of(&std::fs::read_to_string(file).expect("read source"));
        let siblings = paths_after(&code, "super::").into_iter().map(|(first, _)| first);
        let by_crate = crate_paths(&code)
            .into_iter()
            .filter(|(first, _)| first == "cli")
            .filter_map(|(_, second)| second);
        for to in siblings.chain(by_crate) {
            if parts.contains(&to) && to != from {
                edges.insert((from.clone(), to));
            }
        }
    }
    assert!(
        edges.contains(&("bench".to_owned(), "client".to_owned())),
        "the scan sees the cli's parts import each other: {edges:?}"
    );
    assert_eq!(find_cycle(&edges), None, "cli parts: {edges:?}");
}

#[test]
fn the_table_is_one_way_but_for_pending_steps() {
    let edges: BTreeSet<(String, String)> = MAY_IMPORT
        .iter()
        .flat_map(|(from, may)| may.iter().map(move |to| ((*from).to_owned(), (*to).to_owned())))
        .filter(|(from, to)| !pending(from, to))
        .collect();
    assert_eq!(find_cycle(&edges), None);
}

#[test]
fn the_scanner_sees_grouped_imports_and_skips_comments_and_tests() {
    let code = code_of(
        "use crate::{domain::{self, Date}, store::Store};\n\
         // use crate::server::auth;\n\
         /// [`crate::cli`]\n\
         let x = crate::identity::scope::ALL; // crate::api\n\
         #[cfg(test)]\n\
         mod tests {\n    use crate::server::tls;\n}\n\
         fn after() { crate::quota::check() }\n",
    );
    assert_eq!(
        shown(crate_paths(&code)),
        ["domain::", "store::Store", "identity::scope", "quota::check"],
        "{code}"
    );
}

/// Paths as `a::b` (`a::` without a plain second name), to compare.
fn shown(paths: Vec<(String, Option<String>)>) -> Vec<String> {
    paths
        .into_iter()
        .map(|(a, b)| format!("{a}::{}", b.unwrap_or_default()))
        .collect()
}

#[test]
fn the_scanner_sees_sibling_imports() {
    let code = code_of(
        "use super::bench::{Bearer, client_tls};\nuse super::{client, token::Mint};\nuse super::super::x;\n",
    );
    assert_eq!(
        shown(paths_after(&code, "super::")),
        ["bench::", "client::", "token::Mint", "super::x"],
        "{code}"
    );
}
