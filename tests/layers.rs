//! The layer rule of `src/lib.rs`: every import points down a layer, and no two modules import
//! each other, directly or around a loop. Read from the source itself (every `crate::` and
//! `super::` path outside comments), so an import that breaks the rule fails this test.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The layers, bottom first. A module may use its own layer and those below it.
const LAYERS: &[(&str, u8)] = &[
    ("core", 0),
    ("support", 0),
    ("ledger", 1),
    ("usage", 1),
    ("upstream", 2),
    ("gate", 3),
    ("ops", 4),
    ("sync", 4),
    ("cli", 5),
    ("admin", 5),
    ("fuzzing", 5),
];

/// A module as the path of its file below `src/`, without `.rs` (`gate/mod` is `gate`).
type Module = String;

fn rank(m: &str) -> Option<u8> {
    let top = m.split('/').next()?;
    LAYERS.iter().find(|(n, _)| *n == top).map(|(_, r)| *r)
}

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            sources(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

fn module_of(src: &Path, file: &Path) -> Module {
    let rel = file.strip_prefix(src).unwrap().with_extension("");
    let s = rel.to_string_lossy().replace('\\', "/");
    s.strip_suffix("/mod").map_or(s.clone(), str::to_string)
}

/// The file module a path names: the longest prefix of `segments` that is a module.
fn resolve(modules: &BTreeSet<Module>, segments: &[&str]) -> Option<Module> {
    (1..=segments.len())
        .rev()
        .map(|n| segments[..n].join("/"))
        .find(|m| modules.contains(m))
}

/// Every `crate::a::b` and `super::a` path in `text`, as the modules they name.
fn uses(modules: &BTreeSet<Module>, me: &str, is_mod_rs: bool, text: &str) -> BTreeSet<Module> {
    // `super::` in `gate/body.rs` is `gate`; a `mod.rs` has no `super::` uses of its own.
    let parent = me.rsplit_once('/').map_or("", |(p, _)| p);
    let mut found = BTreeSet::new();
    let mut in_tests = false;
    for line in text.lines() {
        let code = line.split("//").next().unwrap_or("");
        if line.trim_start().starts_with("#[cfg(test)]") {
            in_tests = true;
        }
        for (prefix, base) in [("crate::", ""), ("super::", parent)] {
            // `super::` inside a test module names the file itself.
            if prefix == "super::" && (in_tests || is_mod_rs) {
                continue;
            }
            let mut rest = code;
            while let Some(i) = rest.find(prefix) {
                let before = rest[..i].chars().last();
                rest = &rest[i + prefix.len()..];
                if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
                    continue;
                }
                let path: String = rest
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
                    .collect();
                let mut segments: Vec<&str> = base.split('/').filter(|s| !s.is_empty()).collect();
                segments.extend(path.split("::").filter(|s| !s.is_empty()));
                if let Some(m) = resolve(modules, &segments) {
                    found.insert(m);
                }
            }
        }
    }
    found.remove(me);
    // A folder's `mod.rs` declares and re-exports its children: those are not uses.
    if is_mod_rs {
        found.retain(|m| !m.starts_with(&format!("{me}/")));
    }
    found
}

fn graph() -> BTreeMap<Module, BTreeSet<Module>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let modules: BTreeSet<Module> = files.iter().map(|f| module_of(&src, f)).collect();
    files
        .iter()
        .filter(|f| !matches!(module_of(&src, f).as_str(), "lib" | "main"))
        .map(|f| {
            let me = module_of(&src, f);
            let is_mod_rs = f.file_name().is_some_and(|n| n == "mod.rs");
            let text = std::fs::read_to_string(f).unwrap();
            let used = uses(&modules, &me, is_mod_rs, &text);
            (me, used)
        })
        .collect()
}

#[test]
fn every_module_is_in_a_layer() {
    let unplaced: Vec<_> = graph().into_keys().filter(|m| rank(m).is_none()).collect();
    assert!(
        unplaced.is_empty(),
        "modules outside every layer (add them to LAYERS and to the layer list in src/lib.rs): {unplaced:?}"
    );
}

#[test]
fn imports_point_down() {
    let mut up = Vec::new();
    for (from, used) in graph() {
        for to in used {
            if let (Some(a), Some(b)) = (rank(&from), rank(&to)) {
                if b > a {
                    up.push(format!("{from} (layer {a}) uses {to} (layer {b})"));
                }
            }
        }
    }
    assert!(
        up.is_empty(),
        "imports that point up a layer:\n{}",
        up.join("\n")
    );
}

#[test]
fn no_import_cycle() {
    let g = graph();
    // Depth-first search; a back edge closes a cycle.
    fn visit(
        g: &BTreeMap<Module, BTreeSet<Module>>,
        m: &Module,
        stack: &mut Vec<Module>,
        done: &mut BTreeSet<Module>,
    ) -> Option<Vec<Module>> {
        if let Some(i) = stack.iter().position(|s| s == m) {
            let mut cycle = stack[i..].to_vec();
            cycle.push(m.clone());
            return Some(cycle);
        }
        if done.contains(m) {
            return None;
        }
        stack.push(m.clone());
        for next in g.get(m).into_iter().flatten() {
            if let Some(c) = visit(g, next, stack, done) {
                return Some(c);
            }
        }
        stack.pop();
        done.insert(m.clone());
        None
    }
    let mut done = BTreeSet::new();
    for m in g.keys() {
        if let Some(cycle) = visit(&g, m, &mut Vec::new(), &mut done) {
            panic!("import cycle: {}", cycle.join(" -> "));
        }
    }
}

/// The check can fail: a graph with an upward import and a loop is caught by the same code.
#[test]
fn the_checks_catch_an_upward_import_and_a_loop() {
    let modules: BTreeSet<Module> = ["core/table", "core/policy", "gate", "gate/body"]
        .into_iter()
        .map(String::from)
        .collect();
    let used = uses(
        &modules,
        "core/table",
        false,
        "use crate::gate::Gate;\nuse super::policy::check;\n// crate::gate in a comment\n",
    );
    assert_eq!(
        used,
        ["core/policy", "gate"]
            .into_iter()
            .map(String::from)
            .collect()
    );
    assert!(rank("gate") > rank("core/table"));
    let used = uses(
        &modules,
        "gate",
        true,
        "mod body;\npub use self::body::X;\nuse crate::gate::body::Y;\n",
    );
    assert!(
        used.is_empty(),
        "a folder's own children are not uses: {used:?}"
    );
}
