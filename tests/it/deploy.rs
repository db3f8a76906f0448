//! The deployment in `deploy/` and the documentation agree with the binary and with themselves:
//! every flag and `CCPA_` variable the manifests name is one `ccpa-gateway serve` takes (and those
//! the runbook names, one `serve` or `records` takes), every metric the alerts and the dashboard
//! query is one `docs/operations.md` lists (the list is checked against what the gateway exports
//! in `tests/it/observability.rs`), and `docs/configuration.md`'s flag table is `serve --help`'s
//! list, both ways.
//!
//! The manifests' structure is checked by `.ci/run` (kustomize, the Kubernetes schemas,
//! hadolint, promtool); this is what those tools cannot know.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every file under `dir`, recursively.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(files_under(&path));
        } else {
            files.push(path);
        }
    }
    files
}

/// The words of `text` that start with `prefix` and go on with characters `more` accepts.
fn words(text: &str, prefix: &str, more: impl Fn(char) -> bool) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find(prefix) {
        // A word starts here only if what precedes it cannot be part of one.
        let before = rest[..at].chars().next_back();
        let tail = &rest[at + prefix.len()..];
        let length = tail.find(|c: char| !more(c)).unwrap_or(tail.len());
        if before.is_none_or(|c| !(c.is_ascii_alphanumeric() || c == '_' || c == '-')) && length > 0
        {
            found.insert(format!("{prefix}{}", &tail[..length]));
        }
        rest = &tail[length..];
    }
    found
}

/// The help of `ccpa-gateway <command...> --help`.
async fn help(command: &[&str]) -> String {
    let help = crate::common::cli::run(
        crate::common::cli::ccpa_gateway()
            .args(command)
            .arg("--help"),
    )
    .await;
    assert_eq!(help.code, 0, "{command:?}: {}", help.stderr);
    help.stdout
}

fn flags_in(text: &str) -> BTreeSet<String> {
    words(text, "--", |c| c.is_ascii_lowercase() || c == '-')
}

fn variables_in(text: &str) -> BTreeSet<String> {
    words(text, "CCPA_", |c| c.is_ascii_uppercase() || c == '_')
}

#[tokio::test]
async fn every_flag_and_variable_the_deployment_names_is_one_the_gateway_takes() {
    let serve = help(&["serve"]).await;
    let serve_flags = flags_in(&serve);
    let serve_variables = variables_in(&serve);
    assert!(serve_flags.contains("--drain-delay") && serve_variables.contains("CCPA_LEDGER"));
    // The runbook also tells operators to run `records` commands.
    let mut operator_flags = serve_flags.clone();
    let mut operator_variables = serve_variables.clone();
    for command in [
        &["records"][..],
        &["records", "export"],
        &["records", "drift"],
        &["records", "report"],
        &["records", "notifications"],
    ] {
        let text = help(command).await;
        operator_flags.extend(flags_in(&text));
        operator_variables.extend(variables_in(&text));
    }

    let mut checked = 0;
    for path in files_under(&root().join("deploy")) {
        let text = std::fs::read_to_string(&path).unwrap();
        // The manifests configure `serve`; the runbook, alerts and dashboard speak to operators.
        let (flags, variables, command) = if path.starts_with(root().join("deploy/kubernetes")) {
            (&serve_flags, &serve_variables, "serve")
        } else {
            (&operator_flags, &operator_variables, "serve or records")
        };
        // The YAML patch operations (`- op: add`) are not flags; flags are words of letters.
        for flag in flags_in(&text) {
            assert!(
                flags.contains(&flag),
                "{} names {flag}, which `ccpa-gateway {command}` does not take",
                path.display()
            );
            checked += 1;
        }
        for variable in variables_in(&text) {
            assert!(
                variables.contains(&variable),
                "{} names {variable}, which `ccpa-gateway {command}` does not read",
                path.display()
            );
            checked += 1;
        }
    }
    assert!(
        checked > 20,
        "only {checked} names found: is deploy/ there?"
    );
}

/// The metric names a PromQL expression uses: words of the gateway's families (`up` aside, the
/// scrape's own).
fn metrics_in(expr: &str) -> BTreeSet<String> {
    let metric = |c: char| c.is_ascii_alphanumeric() || c == '_';
    ["grpc_server_", "ccpa_", "process_"]
        .iter()
        .flat_map(|prefix| words(expr, prefix, metric))
        .map(|name| {
            // A histogram's series are its name with a suffix.
            ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix))
                .map_or(name.clone(), str::to_owned)
        })
        .collect()
}

/// The metrics the "Metrics and traces" section of `docs/operations.md` lists.
fn documented_metrics() -> BTreeSet<String> {
    let operations = std::fs::read_to_string(root().join("docs/operations.md")).unwrap();
    let start = operations
        .find("## Metrics and traces")
        .expect("docs/operations.md has a \"Metrics and traces\" section");
    let end = start + operations[start..].find("### Traces").unwrap();
    let section = &operations[start..end];
    let listed = metrics_in(section);
    assert!(listed.len() > 20, "{listed:?}");
    listed
}

#[test]
fn the_alerts_and_the_dashboard_query_only_metrics_the_gateway_exports() {
    let listed = documented_metrics();

    let alerts = std::fs::read_to_string(root().join("deploy/prometheus/alerts.yaml")).unwrap();
    let in_alerts = metrics_in(&alerts);
    assert!(in_alerts.len() >= 6, "{in_alerts:?}");
    for name in &in_alerts {
        assert!(
            listed.contains(name),
            "alerts.yaml queries {name}, not in docs/operations.md"
        );
    }

    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("deploy/grafana/ccpa-gateway.json")).unwrap(),
    )
    .expect("the dashboard is JSON");
    let mut in_dashboard = BTreeSet::new();
    let panels = dashboard["panels"].as_array().unwrap();
    for panel in panels {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().unwrap();
            let names = metrics_in(expr);
            assert!(
                !names.is_empty() || expr.contains("up{"),
                "{}: a query of no metric: {expr}",
                panel["title"]
            );
            in_dashboard.extend(names);
        }
    }
    for name in &in_dashboard {
        assert!(
            listed.contains(name),
            "the dashboard queries {name}, not in docs/operations.md"
        );
    }
    // What the issue asks the dashboard to show, each in a picture.
    for wanted in [
        "grpc_server_handled_total",
        "grpc_server_handling_seconds",
        "ccpa_acs_requests_total",
        "ccpa_ledger_pending_requests",
        "ccpa_ledger_overdue_requests",
        "ccpa_opt_out_time_to_honor_seconds",
        "ccpa_ims_token_requests_total",
        "ccpa_health_serving",
    ] {
        assert!(
            in_dashboard.contains(wanted),
            "the dashboard shows no {wanted}"
        );
    }
}

#[test]
fn every_alert_has_a_runbook_section() {
    let alerts = std::fs::read_to_string(root().join("deploy/prometheus/alerts.yaml")).unwrap();
    let runbook = std::fs::read_to_string(root().join("deploy/RUNBOOK.md")).unwrap();
    let names = words(&alerts, "alert: ", |c| c.is_ascii_alphanumeric());
    assert_eq!(names.len(), 9, "{names:?}");
    for name in names {
        let name = name.trim_start_matches("alert: ");
        assert!(
            runbook.contains(&format!("## {name}\n")),
            "RUNBOOK.md has no section for {name}"
        );
        assert!(
            alerts.contains(&format!(
                "runbook: deploy/RUNBOOK.md#{}",
                name.to_lowercase()
            )),
            "{name} does not point at its runbook section"
        );
        let section = &runbook[runbook.find(&format!("## {name}\n")).unwrap()..];
        for part in ["**For consumers:**", "**Look at:**", "**Do:**"] {
            let end = section[3..].find("\n## ").map_or(section.len(), |i| i + 3);
            assert!(
                section[..end].contains(part),
                "{name}'s runbook lacks {part}"
            );
        }
    }
}

/// The long flags in `text`, whole (`--http2-keepalive-interval`, digits included), and not a
/// Markdown table's `|---|`.
fn long_flags_in(text: &str) -> BTreeSet<String> {
    words(text, "--", |c| {
        c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'
    })
    .into_iter()
    .filter(|flag| flag[2..].starts_with(|c: char| c.is_ascii_lowercase()))
    .collect()
}

/// A flag as `--help` describes it: its environment variable and its default, if it has them.
#[derive(Debug, Default, PartialEq)]
struct Described {
    variable: Option<String>,
    default: Option<String>,
}

/// The flags of a command's `--help` (clap's long help: a flag's line is indented at most six
/// spaces, its description ten, and `[env: NAME=...]`, `[default: ...]` follow the description).
fn flags_of_help(help: &str) -> BTreeMap<String, Described> {
    let mut flags: BTreeMap<String, Described> = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in help.lines() {
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        if (1..=6).contains(&indent) && trimmed.starts_with('-') {
            let flag = long_flags_in(trimmed)
                .into_iter()
                .next()
                .unwrap_or_else(|| panic!("a flag's line without a long flag: {line}"));
            assert!(
                flags.insert(flag.clone(), Described::default()).is_none(),
                "{flag} twice"
            );
            current = Some(flag);
        } else if !line.is_empty() && !line.starts_with(' ') {
            // A heading ("Options:", "Opt-out ledger:") ends the flag before it.
            current = None;
        } else if let Some(flag) = &current {
            let described = flags.get_mut(flag).unwrap();
            if let Some(rest) = trimmed.strip_prefix("[env: ") {
                let end = rest.find(['=', ']']).unwrap();
                described.variable = Some(rest[..end].to_owned());
            } else if let Some(rest) = trimmed.strip_prefix("[default: ") {
                described.default = Some(rest.strip_suffix(']').unwrap().to_owned());
            }
        }
    }
    flags
}

/// The rows of the flag table under `heading` in a Markdown text: flag -> (variable, default).
/// Rows whose first cell is not a flag (a group's name) are skipped.
fn flag_table(text: &str, heading: &str) -> BTreeMap<String, (Option<String>, String)> {
    let start = text
        .find(heading)
        .unwrap_or_else(|| panic!("no {heading:?}"));
    let section = &text[start..];
    let section = &section[..section[heading.len()..]
        .find("\n## ")
        .map_or(section.len(), |end| end + heading.len())];
    let mut rows = BTreeMap::new();
    for line in section.lines().filter(|l| l.starts_with("| `--")) {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        assert!(cells.len() >= 6, "a row of four cells: {line}");
        let flag = cells[1].trim_matches('`').to_owned();
        let variable = cells[2].trim_matches('`');
        let variable = (!variable.is_empty()).then(|| variable.to_owned());
        let previous = rows.insert(flag.clone(), (variable, cells[3].to_owned()));
        assert!(previous.is_none(), "{flag} has two rows");
    }
    rows
}

#[tokio::test]
async fn the_configuration_doc_lists_every_flag_of_serve_with_its_variable_and_default() {
    let help = help(&["serve"]).await;
    let flags = flags_of_help(&help);
    let doc = std::fs::read_to_string(root().join("docs/configuration.md")).unwrap();
    let table = flag_table(&doc, "## The flags of `serve`");
    assert!(
        flags.len() > 40 && flags.contains_key("--ledger"),
        "{flags:?}"
    );

    for (flag, described) in &flags {
        if matches!(flag.as_str(), "--help" | "--version") {
            continue;
        }
        let Some((variable, default)) = table.get(flag) else {
            panic!("`serve --help` lists {flag}, which docs/configuration.md's table does not");
        };
        assert_eq!(
            variable, &described.variable,
            "{flag}: the variable in docs/configuration.md is not the one `serve --help` gives"
        );
        if let Some(value) = &described.default {
            assert!(
                default.contains(&format!("`{value}`")),
                "{flag}: `serve --help` gives the default {value}, docs/configuration.md says {default}"
            );
        }
    }
    for flag in table.keys() {
        assert!(
            flags.contains_key(flag),
            "docs/configuration.md's table lists {flag}, which `serve --help` does not"
        );
    }
    // Nor does the prose around the table name a flag `serve` does not take.
    for flag in long_flags_in(&doc) {
        assert!(
            flags.contains_key(&flag),
            "docs/configuration.md names {flag}, which `serve --help` does not list"
        );
    }
}
