//! The agent's module layering, checked from its source.
//!
//! Data flows one way through the agent: meters are read (acquire) or readings are
//! pushed in (ingest), the store keeps them, the broker, the upstream sync and the
//! analytics read from the store, the query layer answers questions over all of them,
//! the status server shows them, and the command line and the run wiring start it all.
//! A module may use the modules of its own layer (without a cycle) and of the layers
//! below it, never a module of a layer above it:
//!
//! | layer | modules |
//! |-------|---------|
//! | 0 leaves | `model`, `config::units`, `alloc`, `logging` |
//! | 1 pure derivations | `derive` |
//! | 2 input | `acquire`, `ingest` |
//! | 3 storage | `store` |
//! | 4 output | `broker`, `sync`, `analytics` |
//! | 5 questions and liveness | `query`, `service` |
//! | 6 presentation | `status` |
//! | 7 composition | `config` (the composed root config) |
//! | 8 pipeline | `pipeline` (starts the stages in order, stops them in reverse) |
//! | 9 wiring | `cli`, the crate root (`lib.rs`), and the tools `demo`, `sim`, `backfill`, `testkit`, `verify` |
//!
//! `ingest` (pushed readings) feeds the store as `acquire` does, so it sits beside
//! it: it reaches the store and the analytics' watermarks only through its own
//! traits (`ingest::sink`), which those stages implement, and its MQTT front end
//! lives in the broker (`broker::ingest`), its HTTP one in `status`.
//!
//! Each stage owns its config section (`acquire::config`, `store::config`, ...) and
//! imports only that and the leaf `config::units` (durations, sizes, config errors).
//! `config` composes every stage's section into the root `Config`, so it sits above
//! all of the stages, just below the wiring that runs them. `config::units` is a node
//! of its own: the stages' arrows into it point down.
//!
//! The graph's nodes are these top-level modules; its edges are the `crate::` paths
//! (`use crate::x::...`, `use crate::{x, y}`, `crate::x::f()`) in each file under
//! `agent/src`, comments and string literals left out. Paths into the crate root
//! that are not a module (`crate::run_with`) are edges to the crate root. Test and
//! tool code (items and modules under `#[cfg(test)]` or `#[cfg(feature = "tools")]`)
//! is left out: like the wiring, it may use every layer. Paths written with
//! `super::` stay inside their top-level module by convention: cross-module paths
//! are written `crate::`.
//!
//! `cargo test -p edge-agent --test module_graph -- --nocapture` prints the graph;
//! with `MODULE_GRAPH_SRC=<dir>` it checks the sources in `<dir>` instead.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The layers, lowest first. A node is a top-level module or one of `SUB_NODES`.
const LAYERS: &[&[&str]] = &[
    &["model", "config::units", "alloc", "logging"],
    &["derive"],
    &["acquire", "ingest"],
    &["store"],
    &["broker", "sync", "analytics"],
    &["query", "service"],
    &["status"],
    &["config"],
    &["pipeline"],
    &["cli", "lib", "demo", "sim", "backfill", "testkit", "verify"],
];

/// Submodules that are nodes of their own, apart from their parent module.
const SUB_NODES: &[&str] = &["config::units"];

fn layer_of(node: &str) -> Option<usize> {
    LAYERS.iter().position(|layer| layer.contains(&node))
}

/// One `crate::` reference: the file and line it is on, and the node it names.
#[derive(Debug, Clone)]
struct Reference {
    file: String,
    line: usize,
    target: String,
}

/// The node a file belongs to, from its path relative to `src`.
fn node_of_file(rel: &Path) -> String {
    let parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().trim_end_matches(".rs").to_string())
        .collect();
    for sub in SUB_NODES {
        let segs: Vec<&str> = sub.split("::").collect();
        if parts.len() >= segs.len() && parts.iter().zip(&segs).all(|(a, b)| a == b) {
            return sub.to_string();
        }
    }
    parts[0].clone()
}

/// The node a path (segments after `crate::`) names.
fn node_of_path(segments: &[String], modules: &BTreeSet<String>) -> String {
    for sub in SUB_NODES {
        let segs: Vec<&str> = sub.split("::").collect();
        if segments.len() >= segs.len() && segments.iter().zip(&segs).all(|(a, b)| a == b) {
            return sub.to_string();
        }
    }
    match segments.first() {
        Some(first) if modules.contains(first) => first.clone(),
        _ => "lib".to_string(),
    }
}

/// The text with comments blanked (newlines kept, so byte offsets keep their line).
/// String and char literals are kept as they are but their insides are not scanned
/// for comment starts.
fn strip_comments(src: &str) -> String {
    let b = src.as_bytes();
    let mut out = b.to_vec();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'/' if b.get(i + 1) == Some(&b'/') => {
                while i < b.len() && b[i] != b'\n' {
                    out[i] = b' ';
                    i += 1;
                }
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                let mut depth = 0usize;
                while i < b.len() {
                    if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
                        depth += 1;
                        out[i] = b' ';
                        out[i + 1] = b' ';
                        i += 2;
                    } else if b[i] == b'*' && b.get(i + 1) == Some(&b'/') {
                        depth -= 1;
                        out[i] = b' ';
                        out[i + 1] = b' ';
                        i += 2;
                        if depth == 0 {
                            break;
                        }
                    } else {
                        if b[i] != b'\n' {
                            out[i] = b' ';
                        }
                        i += 1;
                    }
                }
            }
            b'"' => {
                // A raw string's `r#"` is handled as a plain string: none here holds `"#`.
                i += 1;
                while i < b.len() && b[i] != b'"' {
                    if b[i] == b'\\' {
                        i += 1;
                    }
                    i += 1;
                }
                i += 1;
            }
            b'\'' if b.get(i + 2) == Some(&b'\'') || b.get(i + 1) == Some(&b'\\') => {
                // A char literal ('x' or '\n'); lifetimes ('a) are left alone.
                i += 1;
                while i < b.len() && b[i] != b'\'' {
                    if b[i] == b'\\' {
                        i += 1;
                    }
                    i += 1;
                }
                i += 1;
            }
            _ => i += 1,
        }
    }
    // Only ASCII bytes were replaced by ASCII spaces, outside multi-byte sequences.
    String::from_utf8(out).unwrap_or_default()
}

/// Blanks the items under `#[cfg(test)]` and `#[cfg(feature = "tools")]` (test and
/// tool code sits with the wiring, above every layer), and returns the names of the
/// out-of-line modules so left out (`#[cfg(test)] mod tests;`).
fn strip_test_and_tool_items(text: &str) -> (String, Vec<String>) {
    let b = text.as_bytes();
    let mut out = b.to_vec();
    let mut left_out = Vec::new();
    for attr in ["#[cfg(test)]", "#[cfg(feature = \"tools\")]"] {
        let mut from = 0;
        while let Some(pos) = text[from..].find(attr) {
            let start = from + pos;
            let mut i = start + attr.len();
            from = i;
            // Further attributes (`#[path = ...]`) belong to the same item.
            loop {
                while i < b.len() && b[i].is_ascii_whitespace() {
                    i += 1;
                }
                if b.get(i) == Some(&b'#') {
                    while i < b.len() && b[i] != b']' {
                        i += 1;
                    }
                    i += 1;
                } else {
                    break;
                }
            }
            let item = i;
            let mut depth = 0usize;
            while i < b.len() {
                if let Some(end) = skip_literal(b, i) {
                    i = end;
                    continue;
                }
                match b[i] {
                    b'{' => depth += 1,
                    b'}' => {
                        depth = depth.saturating_sub(1);
                        if depth == 0 {
                            i += 1;
                            break;
                        }
                    }
                    b';' if depth == 0 => {
                        i += 1;
                        break;
                    }
                    _ => {}
                }
                i += 1;
            }
            let head = text[item..i]
                .trim_start_matches("pub ")
                .trim_start_matches("pub(crate) ");
            if let Some(name) = head.strip_prefix("mod ").and_then(|r| r.strip_suffix(';')) {
                // `#[path = "x.rs"]` names the file, beside this one.
                let attrs = &text[start + attr.len()..item];
                match attrs.split('"').nth(1).filter(|_| attrs.contains("path")) {
                    Some(file) => left_out.push(format!("path:{file}")),
                    None => left_out.push(name.trim().to_string()),
                }
            }
            for c in &mut out[start..i] {
                if *c != b'\n' {
                    *c = b' ';
                }
            }
        }
    }
    (String::from_utf8(out).unwrap_or_default(), left_out)
}

/// The end of a string or char literal starting at `i`, if one starts there.
fn skip_literal(b: &[u8], mut i: usize) -> Option<usize> {
    let quote = match b[i] {
        b'"' => b'"',
        b'\'' if b.get(i + 2) == Some(&b'\'') || b.get(i + 1) == Some(&b'\\') => b'\'',
        _ => return None,
    };
    i += 1;
    while i < b.len() && b[i] != quote {
        if b[i] == b'\\' {
            i += 1;
        }
        i += 1;
    }
    Some(i + 1)
}

fn is_ident_byte(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_'
}

/// Parses a path or use tree at `i` (just after `crate::`), pushing every full path
/// it names (up to its first two segments) into `out`.
fn parse_tree(b: &[u8], mut i: usize, prefix: Vec<String>, out: &mut Vec<Vec<String>>) -> usize {
    let skip_ws = |mut i: usize| {
        while i < b.len() && b[i].is_ascii_whitespace() {
            i += 1;
        }
        i
    };
    let mut path = prefix;
    loop {
        i = skip_ws(i);
        if i < b.len() && b[i] == b'{' {
            i += 1;
            loop {
                i = skip_ws(i);
                if i >= b.len() {
                    return i;
                }
                if b[i] == b'}' {
                    return i + 1;
                }
                if b[i] == b',' {
                    i += 1;
                    continue;
                }
                let before = i;
                i = parse_tree(b, i, path.clone(), out);
                if i == before {
                    i += 1;
                }
            }
        }
        let start = i;
        while i < b.len() && is_ident_byte(b[i]) {
            i += 1;
        }
        if i == start {
            // `*` or something that is not a path segment: the path ends here.
            out.push(path);
            return i;
        }
        let seg = String::from_utf8_lossy(&b[start..i]).to_string();
        if seg != "self" && path.len() < 2 {
            path.push(seg);
        }
        let j = skip_ws(i);
        if b.get(j) == Some(&b':') && b.get(j + 1) == Some(&b':') {
            i = j + 2;
            continue;
        }
        out.push(path);
        return i;
    }
}

fn references_in(file: &str, src: &str, modules: &BTreeSet<String>) -> Vec<Reference> {
    let text = strip_comments(src);
    let b = text.as_bytes();
    let mut refs = Vec::new();
    let needle = b"crate::";
    let mut i = 0;
    while i + needle.len() <= b.len() {
        if let Some(end) = skip_literal(b, i) {
            i = end;
            continue;
        }
        if &b[i..i + needle.len()] == needle && (i == 0 || !is_ident_byte(b[i - 1])) {
            let line = 1 + b[..i].iter().filter(|&&c| c == b'\n').count();
            let mut paths = Vec::new();
            let end = parse_tree(b, i + needle.len(), Vec::new(), &mut paths);
            for p in paths {
                refs.push(Reference {
                    file: file.to_string(),
                    line,
                    target: node_of_path(&p, modules),
                });
            }
            i = end.max(i + needle.len());
        } else {
            i += 1;
        }
    }
    refs
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.expect("a directory entry").path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
}

/// Every edge of the product's graph (from, to) with the places that make it.
fn graph() -> BTreeMap<(String, String), Vec<Reference>> {
    // `MODULE_GRAPH_SRC` checks another tree's `agent/src` (an older commit's, say).
    let src = std::env::var_os("MODULE_GRAPH_SRC")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("src"));
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let modules: BTreeSet<String> = files
        .iter()
        .filter_map(|p| {
            let rel = p.strip_prefix(&src).ok()?;
            let first = rel.iter().next()?.to_string_lossy().to_string();
            Some(first.trim_end_matches(".rs").to_string())
        })
        .filter(|m| m != "lib" && m != "main")
        .collect();
    // Product code only: each file without its test and tool items, and the files of
    // test and tool modules (with their submodules) left out.
    let mut texts = BTreeMap::new();
    let mut left_out: Vec<PathBuf> = Vec::new();
    for path in &files {
        let text = std::fs::read_to_string(path)
            .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        let (text, gone) = strip_test_and_tool_items(&strip_comments(&text));
        let stem = path.file_stem().map(|s| s.to_string_lossy().to_string());
        let dir = match stem.as_deref() {
            Some("lib" | "mod" | "main") => path.parent().map(Path::to_path_buf),
            _ => Some(path.with_extension("")),
        }
        .expect("a file has a directory");
        for name in gone {
            if let Some(file) = name.strip_prefix("path:") {
                left_out.push(path.with_file_name(file));
            } else {
                left_out.push(dir.join(format!("{name}.rs")));
                left_out.push(dir.join(&name));
            }
        }
        texts.insert(path.clone(), text);
    }
    let mut edges: BTreeMap<(String, String), Vec<Reference>> = BTreeMap::new();
    for (path, text) in &texts {
        let rel = path.strip_prefix(&src).expect("under src");
        // main.rs is the binary's own crate: its `crate::` is not the library.
        if rel == Path::new("main.rs") || left_out.iter().any(|l| path.starts_with(l)) {
            continue;
        }
        let from = node_of_file(rel);
        let shown = format!("agent/src/{}", rel.display());
        for r in references_in(&shown, text, &modules) {
            if r.target != from {
                edges
                    .entry((from.clone(), r.target.clone()))
                    .or_default()
                    .push(r);
            }
        }
    }
    edges
}

/// The strongly connected components with more than one node (Tarjan).
fn cycles(nodes: &BTreeSet<String>, adj: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    struct State<'a> {
        adj: &'a BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<String, usize>,
        low: BTreeMap<String, usize>,
        stack: Vec<String>,
        on_stack: BTreeSet<String>,
        next: usize,
        out: Vec<Vec<String>>,
    }
    fn visit(s: &mut State, v: &str) {
        s.index.insert(v.to_string(), s.next);
        s.low.insert(v.to_string(), s.next);
        s.next += 1;
        s.stack.push(v.to_string());
        s.on_stack.insert(v.to_string());
        let succ: Vec<String> = s
            .adj
            .get(v)
            .map(|x| x.iter().cloned().collect())
            .unwrap_or_default();
        for w in succ {
            if !s.index.contains_key(&w) {
                visit(s, &w);
                let lw = s.low[&w];
                let lv = s.low.get_mut(v).expect("visited");
                *lv = (*lv).min(lw);
            } else if s.on_stack.contains(&w) {
                let iw = s.index[&w];
                let lv = s.low.get_mut(v).expect("visited");
                *lv = (*lv).min(iw);
            }
        }
        if s.low[v] == s.index[v] {
            let mut comp = Vec::new();
            loop {
                let w = s.stack.pop().expect("on the stack");
                s.on_stack.remove(&w);
                let done = w == v;
                comp.push(w);
                if done {
                    break;
                }
            }
            if comp.len() > 1 {
                comp.sort();
                s.out.push(comp);
            }
        }
    }
    let mut s = State {
        adj,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        next: 0,
        out: Vec::new(),
    };
    for n in nodes {
        if !s.index.contains_key(n) {
            visit(&mut s, n);
        }
    }
    s.out
}

fn places(refs: &[Reference]) -> String {
    let mut seen = Vec::new();
    for r in refs {
        let p = format!("{}:{}", r.file, r.line);
        if !seen.contains(&p) {
            seen.push(p);
        }
    }
    let more = seen.len().saturating_sub(3);
    let mut s = seen.into_iter().take(3).collect::<Vec<_>>().join(", ");
    if more > 0 {
        s.push_str(&format!(" and {more} more"));
    }
    s
}

#[test]
fn module_graph_has_no_cycles_and_follows_the_layers() {
    let edges = graph();
    let mut nodes = BTreeSet::new();
    let mut adj: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (from, to) in edges.keys() {
        nodes.insert(from.clone());
        nodes.insert(to.clone());
        adj.entry(from.clone()).or_default().insert(to.clone());
    }

    println!("module graph (each module, then the modules it imports):");
    for n in &nodes {
        let layer = layer_of(n).map_or("?".to_string(), |l| l.to_string());
        let to: Vec<&str> = adj
            .get(n)
            .map(|s| s.iter().map(String::as_str).collect())
            .unwrap_or_default();
        println!("  [{layer}] {n} -> {}", to.join(", "));
    }

    let mut problems = Vec::new();
    for n in &nodes {
        if layer_of(n).is_none() {
            problems.push(format!(
                "module `{n}` has no layer: add it to LAYERS in agent/tests/module_graph.rs"
            ));
        }
    }
    for ((from, to), refs) in &edges {
        if let (Some(lf), Some(lt)) = (layer_of(from), layer_of(to)) {
            if lt > lf {
                problems.push(format!(
                    "`{from}` (layer {lf}) imports `{to}` (layer {lt}), a higher layer, at {}",
                    places(refs)
                ));
            }
        }
    }
    for comp in cycles(&nodes, &adj) {
        let inside: Vec<String> = edges
            .iter()
            .filter(|((f, t), _)| comp.contains(f) && comp.contains(t))
            .map(|((f, t), refs)| format!("    {f} -> {t} at {}", places(refs)))
            .collect();
        problems.push(format!(
            "import cycle among {}:\n{}",
            comp.join(", "),
            inside.join("\n")
        ));
    }
    assert!(
        problems.is_empty(),
        "the module graph breaks the layering (see agent/tests/module_graph.rs):\n{}",
        problems.join("\n")
    );
}

#[test]
fn the_checker_sees_use_trees_and_inline_paths() {
    let modules: BTreeSet<String> = ["config", "store", "acquire"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let src = "use crate::{\n    config::{units::Bytes, Config},\n    store::Store,\n};\n\
               // crate::acquire in a comment is not an edge\n\
               let x = crate::acquire::read(\"crate::nothing\");\nlet y = crate::run_with;\n";
    let got: Vec<(usize, String)> = references_in("f.rs", src, &modules)
        .into_iter()
        .map(|r| (r.line, r.target))
        .collect();
    let want: Vec<(usize, String)> = vec![
        (1, "config::units".into()),
        (1, "config".into()),
        (1, "store".into()),
        (6, "acquire".into()),
        (7, "lib".into()),
    ];
    assert_eq!(got, want);
}
