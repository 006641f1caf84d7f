//! The code's layout, checked from its text: every file under `src/` opens
//! with a `//!` comment, the modules of `src/` import one another without a
//! cycle (a module that needs another's decision takes it from a third, as
//! `server` and `reload` both take their settings from `settings`), and
//! every dependency a manifest names is used by the code it builds.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Every `.rs` file below `dir`.
fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
    files.sort();
    files
}

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn src() -> PathBuf {
    root().join("src")
}

/// The top-level module a file under `src/` belongs to (`gate` for
/// `src/gate/machine.rs`); `None` for the crate roots.
fn module_of(file: &Path) -> Option<String> {
    let relative = file.strip_prefix(src()).unwrap();
    let first = relative.components().next()?.as_os_str().to_str()?;
    let name = first.strip_suffix(".rs").unwrap_or(first);
    (!matches!(name, "lib" | "main")).then(|| name.to_owned())
}

/// The code of a file without its comments and unit tests: what it imports
/// to run.
fn code(file: &Path) -> String {
    let text = with_tests(file);
    let code = text.split("#[cfg(test)]\nmod tests {").next().unwrap();
    code.to_owned()
}

/// The code of a file without its comments, unit tests included.
fn with_tests(file: &Path) -> String {
    let text = std::fs::read_to_string(file).unwrap();
    text.lines()
        .filter(|line| !line.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The modules `code` names through `crate::`: `crate::gate::Gate`, and
/// the first segment of every path in `crate::{a::B, c}`.
fn imports(code: &str, modules: &BTreeSet<String>) -> BTreeSet<String> {
    let mut named = BTreeSet::new();
    for (at, _) in code.match_indices("crate::") {
        let rest = &code[at + "crate::".len()..];
        let heads: Vec<&str> = match rest.strip_prefix('{') {
            Some(group) => group_heads(group),
            None => vec![identifier(rest)],
        };
        named.extend(
            heads
                .into_iter()
                .filter(|head| modules.contains(*head))
                .map(str::to_owned),
        );
    }
    named
}

/// The first identifier of each path in a `{...}` group (its text after
/// the opening brace).
fn group_heads(group: &str) -> Vec<&str> {
    let mut heads = vec![identifier(group.trim_start())];
    let mut depth = 1;
    for (at, c) in group.char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth == 1 => break,
            '}' => depth -= 1,
            ',' if depth == 1 => heads.push(identifier(group[at + 1..].trim_start())),
            _ => {}
        }
    }
    heads
}

fn identifier(text: &str) -> &str {
    let end = text
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(text.len());
    &text[..end]
}

/// A cycle in `graph`, as the modules along it, if there is one.
fn cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        module: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(start) = path.iter().position(|m| m == module) {
            let mut found = path[start..].to_vec();
            found.push(module.to_owned());
            return Some(found);
        }
        if done.contains(module) {
            return None;
        }
        path.push(module.to_owned());
        for next in graph.get(module).into_iter().flatten() {
            if let Some(found) = visit(next, graph, path, done) {
                return Some(found);
            }
        }
        path.pop();
        done.insert(module.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|module| visit(module, graph, &mut Vec::new(), &mut done))
}

#[test]
fn every_source_file_opens_with_a_module_comment() {
    for file in rust_files(&src()) {
        let text = std::fs::read_to_string(&file).unwrap();
        assert!(
            text.starts_with("//!"),
            "{} has no //! comment",
            file.display()
        );
    }
}

#[test]
fn the_modules_of_src_import_each_other_without_a_cycle() {
    let files: Vec<(String, PathBuf)> = rust_files(&src())
        .into_iter()
        .filter(|file| file.file_name().is_some_and(|name| name != "tests.rs"))
        .filter_map(|file| Some((module_of(&file)?, file)))
        .collect();
    let modules: BTreeSet<String> = files.iter().map(|(module, _)| module.clone()).collect();
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (module, file) in &files {
        let mut imported = imports(&code(file), &modules);
        imported.remove(module);
        graph.entry(module.clone()).or_default().extend(imported);
    }
    assert!(
        graph["reload"].contains("settings"),
        "the scan sees imports"
    );
    assert_eq!(cycle(&graph), None);
}

#[test]
fn a_cycle_is_found() {
    let modules: BTreeSet<String> = ["reload", "server"].map(str::to_owned).into();
    let mut graph = BTreeMap::new();
    graph.insert(
        "server".to_owned(),
        imports("use crate::{reload::{self, LiveParts}, x};", &modules),
    );
    graph.insert(
        "reload".to_owned(),
        imports("use crate::server;\n", &modules),
    );
    assert_eq!(
        cycle(&graph),
        Some(vec!["reload".into(), "server".into(), "reload".into()])
    );
}

/// The dependency names of one `[section]` of the manifest at `path`.
fn dependencies(path: &Path, section: &str) -> Vec<String> {
    let manifest = std::fs::read_to_string(path).unwrap();
    let header = format!("[{section}]");
    manifest
        .lines()
        .skip_while(|line| line.trim() != header)
        .skip(1)
        .take_while(|line| !line.starts_with('['))
        .filter_map(|line| line.split_once('=').map(|(name, _)| name.trim()))
        .filter(|name| !name.is_empty() && !name.starts_with('#'))
        .map(str::to_owned)
        .collect()
}

/// True when `files`, read by `read`, name the crate `dependency` (as a
/// path, a macro, or a string such as serde's `with = "humantime_serde"`).
fn used(dependency: &str, files: &[PathBuf], read: fn(&Path) -> String) -> bool {
    let name = dependency.replace('-', "_");
    let uses = [
        format!("{name}::"),
        format!("{name}!"),
        format!("\"{name}\""),
    ];
    files.iter().any(|file| {
        let code = read(file);
        uses.iter().any(|used| code.contains(used.as_str()))
    })
}

fn files_under(dirs: &[PathBuf]) -> Vec<PathBuf> {
    dirs.iter().flat_map(|dir| rust_files(dir)).collect()
}

#[test]
fn every_dependency_is_used() {
    let support = root().join("tests/support");
    let experiment = root().join("experiment");
    let tests: Vec<PathBuf> = rust_files(&root().join("tests"))
        .into_iter()
        .filter(|file| !file.starts_with(&support))
        .chain(rust_files(&src()))
        .collect();
    let crates = [
        (root().join("Cargo.toml"), vec![src()]),
        (support.join("Cargo.toml"), vec![support.clone()]),
        (
            experiment.join("Cargo.toml"),
            vec![experiment.join("src"), experiment.join("tests")],
        ),
    ];
    for (manifest, dirs) in crates {
        let files = files_under(&dirs);
        for dependency in dependencies(&manifest, "dependencies") {
            assert!(
                used(&dependency, &files, code),
                "{}: {dependency} is not used",
                manifest.display()
            );
        }
    }
    // Dev-dependencies serve the test files and the unit tests in src/.
    for dependency in dependencies(&root().join("Cargo.toml"), "dev-dependencies") {
        assert!(
            used(&dependency, &tests, with_tests),
            "Cargo.toml: [dev-dependencies] {dependency} is not used"
        );
    }
}
