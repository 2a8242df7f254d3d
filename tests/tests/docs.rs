//! The documentation against the code and itself: every key `edge-agent
//! generate-config` prints has a row in docs/configuration.md, and every relative
//! link in the repository's Markdown files points at a file (and heading) that exists
//! inside the repository.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate is inside the workspace")
        .to_path_buf()
}

/// Every key of a TOML table as a dotted path. The tables under `profiles` are
/// user-named (`NAME`); an array of tables adds its tables' keys under its own name.
/// An empty table is a key of its own (`mqtt.users`).
fn key_paths(prefix: &str, table: &toml::Table, out: &mut BTreeSet<String>) {
    if table.is_empty() && !prefix.is_empty() {
        out.insert(prefix.to_string());
    }
    for (key, value) in table {
        let name = if prefix == "profiles" { "NAME" } else { key };
        let path = if prefix.is_empty() {
            name.to_string()
        } else {
            format!("{prefix}.{name}")
        };
        match value {
            toml::Value::Table(t) => key_paths(&path, t, out),
            toml::Value::Array(items)
                if !items.is_empty() && items.iter().all(|i| i.is_table()) =>
            {
                for item in items {
                    if let toml::Value::Table(t) = item {
                        key_paths(&path, t, out);
                    }
                }
            }
            _ => {
                out.insert(path);
            }
        }
    }
}

/// Keys the generated config shows commented out (`# [upstream]`, `# host = ...`,
/// `# token = ...`): a commented header starts a commented section until the next
/// real header; a commented `key = value` belongs to the commented section, else to
/// the real one.
fn commented_key_paths(text: &str, out: &mut BTreeSet<String>) {
    fn header(line: &str) -> Option<&str> {
        let inner = line.strip_prefix('[')?.strip_suffix(']')?;
        let inner = inner.trim_start_matches('[').trim_end_matches(']');
        inner
            .chars()
            .all(|c| c.is_ascii_lowercase() || c == '_' || c == '.')
            .then_some(inner)
    }
    let (mut section, mut commented) = (String::new(), None::<String>);
    for line in text.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix('#') {
            let rest = rest.trim();
            if let Some(h) = header(rest) {
                commented = Some(h.to_string());
            } else if let Some((key, _)) = rest.split_once(" = ") {
                let key = key.trim();
                if !key.is_empty() && key.chars().all(|c| c.is_ascii_lowercase() || c == '_') {
                    let section = commented.as_deref().unwrap_or(&section);
                    out.insert(if section.is_empty() {
                        key.to_string()
                    } else {
                        format!("{section}.{key}")
                    });
                }
            }
        } else if let Some(h) = header(line) {
            section = h.to_string();
            commented = None;
        }
    }
}

/// The `section.key` paths of `generated` that have no table row (a line starting
/// `| \`section.key\``) in `doc`.
fn undocumented(generated: &str, doc: &str) -> (BTreeSet<String>, Vec<String>) {
    let table: toml::Table = generated.parse().expect("generate-config is TOML");
    let mut keys = BTreeSet::new();
    key_paths("", &table, &mut keys);
    commented_key_paths(generated, &mut keys);
    let missing = keys
        .iter()
        .filter(|k| !doc.lines().any(|l| l.starts_with(&format!("| `{k}`"))))
        .cloned()
        .collect();
    (keys, missing)
}

#[test]
fn every_key_of_the_generated_config_has_a_row_in_docs_configuration() {
    let out = Command::new(env!("CARGO_BIN_EXE_edge-agent-under-test"))
        .arg("generate-config")
        .output()
        .expect("run generate-config");
    assert!(out.status.success(), "generate-config: {:?}", out.status);
    let generated = String::from_utf8(out.stdout).expect("UTF-8");
    let path = repo().join("docs/configuration.md");
    let doc =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let (keys, missing) = undocumented(&generated, &doc);
    // The parser sees active, commented, array and user-named keys alike.
    for k in [
        "gateway_id",
        "store.quota",
        "mqtt.users",
        "mqtt.broker_config",
        "upstream.host",
        "upstream.tls.client_key",
        "http.token",
        "http.hostnames",
        "buses.dsmr",
        "meters.accept_push",
        "profiles.NAME.registers.word_order",
        "alarms.above",
    ] {
        assert!(
            keys.contains(k),
            "{k} not among the generated keys {keys:?}"
        );
    }
    assert!(
        missing.is_empty(),
        "keys of `edge-agent generate-config` without a row `| `KEY` | default | meaning |` \
         in docs/configuration.md: {missing:?}"
    );
    println!("{} keys, each with a row", keys.len());
}

#[test]
fn a_key_without_a_row_is_named() {
    let generated = "gateway_id = \"gw\"\n[store]\npath = \"/x\"\n# quota = \"1GiB\"\n\
                     # [upstream]\n# host = \"h\"\n[[buses]]\nid = \"b\"\n";
    let doc = "| `gateway_id` | x | y |\n| `store.path` | x | y |\n| `buses.id` | | |\n\
               | `upstream.host` | | |\n";
    let (_, missing) = undocumented(generated, doc);
    assert_eq!(missing, ["store.quota"]);
}

/// GitHub's anchor of a heading: lower case, punctuation other than `-` and `_`
/// dropped, spaces as `-`.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

/// The lines of a Markdown file outside fenced code blocks.
fn prose(text: &str) -> Vec<&str> {
    let mut fenced = false;
    text.lines()
        .filter(|l| {
            if l.trim_start().starts_with("```") {
                fenced = !fenced;
                return false;
            }
            !fenced
        })
        .collect()
}

fn anchors(text: &str) -> BTreeSet<String> {
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut out = BTreeSet::new();
    for line in prose(text) {
        let Some(heading) = line.strip_prefix('#') else {
            continue;
        };
        let s = slug(heading.trim_start_matches('#'));
        let n = seen.entry(s.clone()).or_default();
        out.insert(if *n == 0 { s } else { format!("{s}-{n}") });
        *n += 1;
    }
    out
}

fn markdown_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if path.is_dir() {
            // Build output, git's own files and the vendored crate's upstream docs.
            if !matches!(name.as_ref(), "target" | ".git" | "vendor") {
                markdown_files(&path, out);
            }
        } else if name.ends_with(".md") {
            out.push(path);
        }
    }
}

/// The targets of the `[text](target)` links on a line.
fn link_targets(line: &str) -> Vec<&str> {
    line.match_indices("](")
        .filter_map(|(i, _)| {
            let rest = &line[i + 2..];
            let end = rest.find(')')?;
            rest[..end].split_whitespace().next()
        })
        .collect()
}

#[test]
fn relative_links_in_markdown_point_inside_the_repository_and_resolve() {
    let root = repo().canonicalize().expect("the repository");
    let mut files = Vec::new();
    markdown_files(&root, &mut files);
    assert!(files.iter().any(|f| f.ends_with("README.md")), "{files:?}");
    let mut broken = Vec::new();
    let mut checked = 0;
    for file in &files {
        let text = std::fs::read_to_string(file).expect("read a Markdown file");
        let shown = file
            .strip_prefix(&root)
            .unwrap_or(file)
            .display()
            .to_string();
        for (n, line) in prose(&text).into_iter().enumerate() {
            for target in link_targets(line) {
                if target.contains("://") || target.starts_with("mailto:") {
                    continue;
                }
                checked += 1;
                let (path, anchor) = match target.split_once('#') {
                    Some((p, a)) => (p, Some(a)),
                    None => (target, None),
                };
                let resolved = if path.is_empty() {
                    file.clone()
                } else {
                    file.parent().expect("a file's directory").join(path)
                };
                let Ok(resolved) = resolved.canonicalize() else {
                    broken.push(format!("{shown} (line {}): {target}: no such file", n + 1));
                    continue;
                };
                if !resolved.starts_with(&root) {
                    broken.push(format!("{shown}: {target}: outside the repository"));
                    continue;
                }
                if let Some(anchor) =
                    anchor.filter(|_| resolved.extension().is_some_and(|e| e == "md"))
                {
                    let target_text = std::fs::read_to_string(&resolved).unwrap_or_default();
                    if !anchors(&target_text).contains(anchor) {
                        broken.push(format!("{shown}: {target}: no heading #{anchor}"));
                    }
                }
            }
        }
    }
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
    println!("{checked} relative links in {} files resolve", files.len());
}

#[test]
fn headings_give_githubs_anchors() {
    assert_eq!(slug(" `[[buses]]`"), "buses");
    assert_eq!(
        slug(" Upstream sync (`bench sync`)"),
        "upstream-sync-bench-sync"
    );
    assert_eq!(
        slug(" DSMR P1 port (smart meters in the Netherlands, Belgium, Luxembourg)"),
        "dsmr-p1-port-smart-meters-in-the-netherlands-belgium-luxembourg"
    );
    let text = "# A\n## B\n```\n# not a heading\n```\n## B\n";
    let got: Vec<String> = anchors(text).into_iter().collect();
    assert_eq!(got, ["a", "b", "b-1"]);
    assert_eq!(
        link_targets("see [x](a.md#b) and [y](../c \"t\")"),
        ["a.md#b", "../c"]
    );
}
