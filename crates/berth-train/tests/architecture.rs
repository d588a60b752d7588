//! The shape of berth-train's sources: the modules import each other without a cycle, and
//! the training loop names no task (tasks plug in through the `Objective` trait).
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Module path (`objectives::classify`) → source text, for every file under src/.
fn modules() -> BTreeMap<String, String> {
    fn walk(dir: &Path, prefix: &[String], out: &mut BTreeMap<String, String>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            let stem = p.file_stem().unwrap().to_string_lossy().into_owned();
            if p.is_dir() {
                let mut sub = prefix.to_vec();
                sub.push(stem);
                walk(&p, &sub, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                let mut path = prefix.to_vec();
                if stem != "mod" && stem != "lib" {
                    path.push(stem);
                }
                let text = std::fs::read_to_string(&p).unwrap();
                // Inline test modules have their own `super`: leave them out.
                let code = text.split("#[cfg(test)]").next().unwrap().to_string();
                out.insert(path.join("::"), code);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(&src(), &[], &mut out);
    out
}

/// Identifier paths in `text` outside comments: runs of `ident::ident::...`.
fn paths(text: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    for line in text.lines() {
        let code = line.split("//").next().unwrap_or("");
        let chars: Vec<char> = code.chars().collect();
        let mut i = 0;
        while i < chars.len() {
            if chars[i].is_alphanumeric() || chars[i] == '_' {
                let mut parts = vec![String::new()];
                while i < chars.len() {
                    let c = chars[i];
                    if c.is_alphanumeric() || c == '_' {
                        parts.last_mut().unwrap().push(c);
                        i += 1;
                    } else if code[code.char_indices().nth(i).unwrap().0..].starts_with("::") {
                        parts.push(String::new());
                        i += 2;
                    } else if c == '{' && parts.len() > 1 {
                        // `use a::{b, c}`: each item continues the path.
                        let close = chars[i..]
                            .iter()
                            .position(|&c| c == '}')
                            .map_or(chars.len(), |k| i + k);
                        let items: String = chars[i + 1..close].iter().collect();
                        parts.pop();
                        for item in items.split(',') {
                            let mut p = parts.clone();
                            p.extend(item.trim().split("::").map(str::to_string));
                            out.push(p);
                        }
                        i = close;
                        parts = vec![String::new()];
                        break;
                    } else {
                        break;
                    }
                }
                if parts.len() > 1 {
                    out.push(parts);
                }
            } else {
                i += 1;
            }
        }
    }
    out
}

/// Module → the other modules its code refers to (`crate::…`, `super::…`, or a child
/// module by name from its parent).
fn imports(mods: &BTreeMap<String, String>) -> BTreeMap<String, BTreeSet<String>> {
    let known: BTreeSet<&String> = mods.keys().collect();
    let resolve = |segments: &[String]| -> Option<String> {
        (1..=segments.len())
            .rev()
            .map(|k| segments[..k].join("::"))
            .find(|p| known.contains(p))
    };
    let mut graph = BTreeMap::new();
    for (name, text) in mods {
        let parent: Vec<String> = name.split("::").map(str::to_string).collect();
        let mut edges = BTreeSet::new();
        for p in paths(text) {
            let target = match p[0].as_str() {
                "crate" => resolve(&p[1..]),
                "super" => {
                    let mut full = parent[..parent.len().saturating_sub(1)].to_vec();
                    full.extend(p[1..].iter().cloned());
                    resolve(&full).or_else(|| {
                        Some(full[..(full.len() + 1).saturating_sub(p.len())].join("::"))
                    })
                }
                first => {
                    // A child module named from its parent (`classify::Classify` in mod.rs).
                    let mut full: Vec<String> = if name.is_empty() {
                        Vec::new()
                    } else {
                        parent.clone()
                    };
                    full.push(first.to_string());
                    known
                        .contains(&full.join("::"))
                        .then(|| resolve(&[full, p[1..].to_vec()].concat()))
                        .flatten()
                }
            };
            if let Some(t) = target {
                if &t != name && !t.is_empty() {
                    edges.insert(t);
                }
            }
        }
        graph.insert(name.clone(), edges);
    }
    graph
}

#[test]
fn modules_import_each_other_without_a_cycle() {
    let mods = modules();
    assert!(mods.contains_key("objectives::classify") && mods.contains_key("train_loop"));
    let graph = imports(&mods);
    // The seams are where they should be.
    assert!(graph["train_loop"].contains("objective"));
    assert!(graph["objectives::classify"].contains("objective"));
    assert!(graph["objectives"].contains("objectives::classify"));
    // Depth-first search for a back edge; the crate root only declares modules.
    fn visit(
        n: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        stack: &mut Vec<String>,
    ) {
        state.insert(n.to_string(), 1);
        stack.push(n.to_string());
        for m in graph.get(n).into_iter().flatten() {
            match state.get(m.as_str()).copied().unwrap_or(0) {
                0 => visit(m, graph, state, stack),
                1 => panic!("import cycle: {} -> {m}", stack.join(" -> ")),
                _ => {}
            }
        }
        stack.pop();
        state.insert(n.to_string(), 2);
    }
    let mut state = BTreeMap::new();
    for n in graph.keys().filter(|n| !n.is_empty()) {
        if state.get(n.as_str()).copied().unwrap_or(0) == 0 {
            visit(n, &graph, &mut state, &mut Vec::new());
        }
    }
    for (n, e) in &graph {
        println!(
            "{n:>24} -> {}",
            e.iter().cloned().collect::<Vec<_>>().join(", ")
        );
    }
}

#[test]
fn the_training_loop_names_no_task() {
    let text = std::fs::read_to_string(src().join("train_loop.rs")).unwrap();
    let words: BTreeSet<String> = text
        .split(|c: char| !c.is_alphanumeric() && c != '_')
        .map(str::to_lowercase)
        .collect();
    for task in [
        "classify",
        "ner",
        "qa",
        "embed",
        "rerank",
        "mlm",
        "rtd",
        "pretrain",
        "objectives",
        "electra",
        "generator",
        "tokenizer",
    ] {
        assert!(!words.contains(task), "train_loop.rs names {task:?}");
    }
}
