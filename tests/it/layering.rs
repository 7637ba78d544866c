//! The layering rule of ARCHITECTURE.md, checked on the source: each module uses only the
//! modules below it in [`LAYERS`] (so nothing below `http` imports it, nothing below `jobs`
//! imports the jobs), and the pure core (`events`, `flags`, the experiments' statistics)
//! reaches no runtime, web framework, Redis client or query engine. Each rule is also run on
//! a planted violation, so that a checker that can no longer see one fails here instead of
//! passing quietly.

use std::path::{Path, PathBuf};

/// Crates the pure core must not use.
const IMPURE: [&str; 7] = [
    "tokio",
    "axum",
    "redis",
    "datafusion",
    "hyper",
    "tower",
    "tower_http",
];

/// Files of the pure core, relative to `src/`: whole folders end with `/`.
const PURE: [&str; 4] = [
    "events/",
    "flags/",
    "experiments/stats.rs",
    "experiments/results.rs",
];

/// The modules from the bottom up: each may use those before it, never those after it.
/// `telemetry` is beside them all (its `catalog!` is a leaf every component uses; its
/// `install` is called by `http`).
const LAYERS: [&str; 14] = [
    "crypto",
    "events",
    "config",
    "identity",
    "flags",
    "wal",
    "counters",
    "privacy",
    "ingest",
    "pipeline",
    "sql",
    "experiments",
    "jobs",
    "http",
];

/// The layer of a file (relative to `src/`), or `None` for the crate root and telemetry.
fn layer_of(path: &str) -> Option<usize> {
    let module = path.split('/').next()?.trim_end_matches(".rs");
    LAYERS.iter().position(|layer| *layer == module)
}

/// One broken rule: the file, the line and what it reaches.
#[derive(Debug, PartialEq, Eq)]
struct Violation {
    file: String,
    line: usize,
    reaches: String,
}

/// Returns the path roots a line of code names (`tokio` in `tokio::spawn`, `crate::http` in
/// `use crate::http::error`), skipping comments and string contents.
fn roots(line: &str) -> Vec<String> {
    let code = strip(line);
    let mut found = Vec::new();
    let bytes = code.as_bytes();
    let ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let mut i = 0;
    while i < bytes.len() {
        if ident(bytes[i]) && (i == 0 || !(ident(bytes[i - 1]) || bytes[i - 1] == b':')) {
            let start = i;
            while i < bytes.len() && ident(bytes[i]) {
                i += 1;
            }
            if code[i..].starts_with("::") {
                let first = &code[start..i];
                let rest = &code[i + 2..];
                let second: String = rest
                    .bytes()
                    .take_while(|&b| ident(b))
                    .map(char::from)
                    .collect();
                found.push(match first {
                    "crate" | "flagstream" | "super" => format!("crate::{second}"),
                    _ => first.to_owned(),
                });
            } else if code[..start].trim_end().ends_with("use")
                && code[i..].trim_start().starts_with(';')
            {
                found.push(code[start..i].to_owned());
            }
        } else {
            i += 1;
        }
    }
    found
}

/// The code of a line: without a trailing `//` comment and with string contents blanked.
fn strip(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut in_string = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                in_string = !in_string;
                out.push(c);
            }
            '\\' if in_string => {
                chars.next();
            }
            '/' if !in_string && chars.peek() == Some(&'/') => break,
            _ if in_string => {}
            _ => out.push(c),
        }
    }
    out
}

/// Checks one file's text; `path` is relative to `src/`.
fn check(path: &str, text: &str) -> Vec<Violation> {
    let own = layer_of(path);
    let pure = PURE.iter().any(|p| {
        if p.ends_with('/') {
            path.starts_with(p)
        } else {
            path == *p
        }
    });
    let mut violations = Vec::new();
    for (n, line) in text.lines().enumerate() {
        for root in roots(line) {
            let above = root
                .strip_prefix("crate::")
                .and_then(|module| LAYERS.iter().position(|layer| *layer == module))
                .zip(own)
                .is_some_and(|(used, own)| used > own);
            let broken = above || (pure && IMPURE.contains(&root.as_str()));
            if broken {
                violations.push(Violation {
                    file: path.to_owned(),
                    line: n + 1,
                    reaches: root,
                });
            }
        }
    }
    violations
}

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("src/ is readable") {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn no_layer_reaches_above_itself() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    assert!(files.len() > 50, "found only {} source files", files.len());
    let mut violations = Vec::new();
    for file in &files {
        let relative = file
            .strip_prefix(&src)
            .unwrap()
            .to_string_lossy()
            .replace('\\', "/");
        let text = std::fs::read_to_string(file).unwrap();
        violations.extend(check(&relative, &text));
    }
    assert!(
        violations.is_empty(),
        "layering broken (see ARCHITECTURE.md, \"Layers\"):\n{}",
        violations
            .iter()
            .map(|v| format!("  src/{}:{} reaches {}", v.file, v.line, v.reaches))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[test]
fn the_checker_sees_planted_violations() {
    let reaches = |path: &str, text: &str| -> Vec<String> {
        check(path, text).into_iter().map(|v| v.reaches).collect()
    };
    // Below http, the HTTP layer in every spelling.
    assert_eq!(
        reaches("wal/mod.rs", "use crate::http::metrics::X;"),
        ["crate::http"]
    );
    assert_eq!(
        reaches("sql/feed.rs", "    let x = crate::http::error::f();"),
        ["crate::http"]
    );
    assert_eq!(
        reaches("ingest/mod.rs", "use super::http::error;"),
        ["crate::http"]
    );
    assert_eq!(
        reaches("privacy/x.rs", "use crate::jobs::Stop;"),
        ["crate::jobs"]
    );
    // The pure core: runtimes, frameworks, clients, engines.
    assert_eq!(
        reaches("flags/store.rs", "use tokio::sync::watch;"),
        ["tokio"]
    );
    assert_eq!(
        reaches("events/raw.rs", "fn f() { axum::serve(l, r); }"),
        ["axum"]
    );
    assert_eq!(
        reaches("experiments/stats.rs", "use datafusion::prelude::*;"),
        ["datafusion"]
    );
    assert_eq!(reaches("flags/logic.rs", "use redis;"), ["redis"]);
    // Allowed: the shell, components using tokio, comments and strings.
    assert!(reaches("http/api/sql.rs", "use crate::http::error::ApiError;").is_empty());
    assert!(reaches("jobs/upkeep.rs", "use crate::jobs::Stop;").is_empty());
    assert!(reaches("pipeline/dataflow.rs", "use crate::counters::CohortKey;").is_empty());
    assert!(reaches("wal/metrics.rs", "crate::telemetry::catalog! {").is_empty());
    assert!(reaches("main.rs", "use flagstream::http::run;").is_empty());
    assert!(reaches("wal/mod.rs", "use tokio::sync::mpsc;").is_empty());
    assert!(reaches("flags/store.rs", "// tokio::spawn was here").is_empty());
    assert!(reaches("events/raw.rs", r#"let s = "crate::http::x";"#).is_empty());
    assert!(reaches("flags/mod.rs", "use crate::events::Event; // not tokio::x").is_empty());
}
