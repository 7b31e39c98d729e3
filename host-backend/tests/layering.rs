//! The crate's module structure, checked: no import circle among host-backend's top-level
//! modules, and the RX ring has exactly one writer module.
//!
//! Reads the sources (no build tricks): every `crate::<module>` path in a file counts as a
//! dependency of the file's top-level module on `<module>`. Comments count too, on purpose:
//! a doc link to a module is a dependency a reader has to follow.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

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

fn src_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// The top-level module a source file belongs to (`None` for the crate root and binary).
fn top_module(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).unwrap();
    let first = rel.components().next()?.as_os_str().to_str()?.to_string();
    let name = first.strip_suffix(".rs").unwrap_or(&first).to_string();
    (name != "lib" && name != "main").then_some(name)
}

/// Top-level modules each module refers to through `crate::`.
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = src_dir();
    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in files {
        let Some(me) = top_module(&src, &f) else {
            continue;
        };
        let text = std::fs::read_to_string(&f).unwrap();
        let deps = g.entry(me.clone()).or_default();
        for (i, _) in text.match_indices("crate::") {
            // Skip `domsock_proto::...`-style paths of other crates.
            if text[..i].ends_with(|c: char| c.is_alphanumeric() || c == '_') {
                continue;
            }
            let rest = &text[i + "crate::".len()..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() && name != me {
                deps.insert(name);
            }
        }
    }
    g
}

fn find_cycle(g: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        n: &str,
        g: &BTreeMap<String, BTreeSet<String>>,
        stack: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(pos) = stack.iter().position(|s| s == n) {
            let mut c = stack[pos..].to_vec();
            c.push(n.to_string());
            return Some(c);
        }
        if done.contains(n) {
            return None;
        }
        stack.push(n.to_string());
        for d in g.get(n).into_iter().flatten() {
            if let Some(c) = visit(d, g, stack, done) {
                return Some(c);
            }
        }
        stack.pop();
        done.insert(n.to_string());
        None
    }
    let mut done = BTreeSet::new();
    for n in g.keys() {
        if let Some(c) = visit(n, g, &mut Vec::new(), &mut done) {
            return Some(c);
        }
    }
    None
}

#[test]
fn no_import_circle_among_modules() {
    let g = graph();
    // The check itself must see the structure it guards.
    assert!(g["engine"].contains("router"), "{g:?}");
    assert!(g["virtio"].contains("port"), "{g:?}");
    if let Some(c) = find_cycle(&g) {
        panic!("import circle: {}\ngraph: {g:#?}", c.join(" -> "));
    }
}

#[test]
fn a_cycle_is_found_when_there_is_one() {
    let mut g = graph();
    g.get_mut("port").unwrap().insert("router".into());
    assert!(find_cycle(&g).is_some());
}

#[test]
fn leaves_stay_leaves() {
    let g = graph();
    for leaf in ["port", "vm", "tunables", "metrics"] {
        let deps: Vec<_> = g[leaf]
            .iter()
            .filter(|d| !["metrics", "tunables", "policy"].contains(&d.as_str()))
            .collect();
        assert!(deps.is_empty(), "{leaf} depends on {deps:?}");
    }
}

#[test]
fn the_rx_ring_has_one_writer_module() {
    let src = src_dir();
    let mut files = Vec::new();
    sources(&src, &mut files);
    for f in files {
        let rel = f.strip_prefix(&src).unwrap().to_string_lossy().into_owned();
        let text = std::fs::read_to_string(&f).unwrap();
        // Used-ring writes: only the RX owner and the TX path (its own ring).
        if text.contains(".add_used(") {
            assert!(
                rel == "virtio/rx.rs" || rel == "engine/tx.rs",
                "{rel} writes a used ring"
            );
        }
        // Interrupts for RX: only the RX owner decides them (the TX path calls its helper).
        if text.contains("signal_used_queue") {
            assert_eq!(rel, "virtio/rx.rs", "{rel} signals a queue");
        }
        // The RX vring is handed to its port and to nobody else.
        if text.contains("vrings[RX_QUEUE]") {
            assert_eq!(rel, "engine/driver.rs", "{rel} touches the RX vring");
        }
    }
}
