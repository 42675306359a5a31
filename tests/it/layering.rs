//! The crate's layering, as `src/lib.rs` states it (its "Layers" table), checked against the
//! sources: every `crate::<module>` path in non-test code under `src/` must reach a module
//! of the same layer or a lower one, every top-level module must be in the table, and no
//! modules may use each other in a circle. Comments and `#[cfg(test)]` modules are ignored
//! (tests may reach anywhere).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Module -> layer, from the table rows `//! | N | `a`, `b` | ... |` of lib.rs.
fn table() -> BTreeMap<String, u32> {
    let lib = std::fs::read_to_string(src().join("lib.rs")).unwrap();
    let mut layers = BTreeMap::new();
    for line in lib.lines() {
        let Some(row) = line.strip_prefix("//! | ") else {
            continue;
        };
        let mut cells = row.split(" | ");
        let Ok(layer) = cells.next().unwrap_or_default().trim().parse::<u32>() else {
            continue;
        };
        for module in cells.next().unwrap_or_default().split(',') {
            layers.insert(module.trim().trim_matches('`').to_string(), layer);
        }
    }
    assert!(!layers.is_empty(), "no layer table in src/lib.rs");
    layers
}

/// The text without comments (line and block) and without `#[cfg(test)]` modules.
fn code_of(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(i) = rest.find("/*") {
        out.push_str(&rest[..i]);
        rest = rest[i..].find("*/").map_or("", |j| &rest[i + j + 2..]);
    }
    out.push_str(rest);
    let no_comments: String = out
        .lines()
        .map(|l| l.find("//").map_or(l, |i| &l[..i]))
        .collect::<Vec<_>>()
        .join("\n");
    // Drop `#[cfg(test)] mod name { ... }` blocks, braces matched.
    let mut code = String::new();
    let mut rest = no_comments.as_str();
    while let Some(i) = rest.find("#[cfg(test)]") {
        code.push_str(&rest[..i]);
        let after = &rest[i + "#[cfg(test)]".len()..];
        let head = after.trim_start();
        let is_mod = head.starts_with("mod ") || head.starts_with("pub(crate) mod ");
        match (is_mod, after.find('{')) {
            (true, Some(open)) if !after[..open].contains(';') => {
                let mut depth = 0usize;
                let mut end = after.len();
                for (j, c) in after[open..].char_indices() {
                    match c {
                        '{' => depth += 1,
                        '}' => {
                            depth -= 1;
                            if depth == 0 {
                                end = open + j + 1;
                                break;
                            }
                        }
                        _ => {}
                    }
                }
                rest = &after[end..];
            }
            _ => rest = after,
        }
    }
    code.push_str(rest);
    code
}

/// The top-level modules a piece of code names through `crate::`.
fn uses(code: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        let after = &rest[i + "crate::".len()..];
        let word_start = i == 0 || {
            let before = rest[..i].chars().next_back().unwrap_or(' ');
            !(before.is_alphanumeric() || before == '_')
        };
        if word_start {
            if let Some(group) = after.strip_prefix('{') {
                let close = group.find('}').unwrap_or(group.len());
                for item in group[..close].split(',') {
                    let name = item.trim().split("::").next().unwrap_or_default();
                    if !name.is_empty() {
                        out.insert(name.to_string());
                    }
                }
            } else {
                let name: String = after
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    out.insert(name);
                }
            }
        }
        rest = after;
    }
    out
}

/// Module -> the modules it uses, over every non-test source file under `src/`.
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    fn walk(dir: &Path, files: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                if path.file_name().is_some_and(|n| n != "tests") {
                    walk(&path, files);
                }
            } else if path.extension().is_some_and(|e| e == "rs")
                && path.file_name().is_some_and(|n| n != "tests.rs")
            {
                files.push(path);
            }
        }
    }
    let root = src();
    let mut files = Vec::new();
    walk(&root, &mut files);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in files {
        let rel = file.strip_prefix(&root).unwrap();
        let first = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy();
        if first == "lib.rs" || first == "main.rs" {
            continue;
        }
        let module = first.trim_end_matches(".rs").to_string();
        let code = code_of(&std::fs::read_to_string(&file).unwrap());
        let used = uses(&code);
        let entry = graph.entry(module.clone()).or_default();
        entry.extend(
            used.into_iter()
                .filter(|u| *u != module && u != "self" && u != "super"),
        );
    }
    graph
}

/// Strongly connected components of more than one module.
fn cycles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<BTreeSet<String>> {
    // Reachability closure: small graphs (tens of modules), so plain repeated search.
    let reach = |from: &str| {
        let mut seen = BTreeSet::new();
        let mut todo = vec![from.to_string()];
        while let Some(m) = todo.pop() {
            for n in graph.get(&m).into_iter().flatten() {
                if seen.insert(n.clone()) {
                    todo.push(n.clone());
                }
            }
        }
        seen
    };
    let mut out: Vec<BTreeSet<String>> = Vec::new();
    for m in graph.keys() {
        let from_m = reach(m);
        if !from_m.contains(m) || out.iter().any(|c| c.contains(m)) {
            continue;
        }
        let component: BTreeSet<String> = from_m
            .into_iter()
            .filter(|n| reach(n).contains(m))
            .collect();
        out.push(component);
    }
    out
}

#[test]
fn modules_use_only_their_layer_and_below_and_never_each_other_in_a_circle() {
    let layers = table();
    let graph = graph();
    let mut problems = Vec::new();
    for (module, used) in &graph {
        let Some(own) = layers.get(module) else {
            problems.push(format!("{module} is not in lib.rs's layer table"));
            continue;
        };
        for u in used {
            match layers.get(u) {
                Some(theirs) if theirs > own => problems.push(format!(
                    "{module} (layer {own}) uses {u} (layer {theirs}): it reaches up"
                )),
                Some(_) => {}
                None if graph.contains_key(u) => {
                    problems.push(format!("{u} is not in lib.rs's layer table"))
                }
                None => {}
            }
        }
    }
    for cycle in cycles(&graph) {
        problems.push(format!(
            "modules that use each other in a circle: {cycle:?}"
        ));
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn the_layering_check_sees_imports_groups_and_cycles() {
    let code = code_of(
        "use crate::config::Config;\n// crate::gateway in a comment\n\
         use crate::{job, trust::quote};\nfn f() { crate::nats::connect(); }\n\
         #[cfg(test)]\nmod tests { use crate::app; }\n",
    );
    assert_eq!(
        uses(&code),
        ["config", "job", "nats", "trust"].map(String::from).into()
    );
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    g.insert("a".into(), ["b".to_string()].into());
    g.insert("b".into(), ["c".to_string()].into());
    g.insert("c".into(), ["a".to_string()].into());
    g.insert("d".into(), ["a".to_string()].into());
    assert_eq!(cycles(&g), vec![["a", "b", "c"].map(String::from).into()]);
}
