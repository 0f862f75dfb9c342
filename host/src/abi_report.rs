//! Reading abi_stable's layout report: when a plugin's ABI differs from the host's, abi_stable
//! hands the loader a report of hundreds of lines (both root-module layouts, then per checked
//! type an error count, the path of fields that led to it, both layouts and
//! `Error:`/`Expected:`/`Found:` blocks). Only as text, so this module reads that text and
//! says the real cause in one line.

use capvirt_plugin_api::ABI_VERSION;

/// One line out of abi_stable's layout report (hundreds of lines: both root-module layouts,
/// then, per checked type, an error count, the path of fields that led to it, the expected and
/// found layouts and `Error:`/`Expected:`/`Found:` blocks). abi_stable hands the report over
/// only as text, so this reads that text: the type and field that differ, each error with its
/// expected and found values, the fields or variants only one side has, and the
/// capvirt-plugin-api version the plugin was built against.
pub(crate) fn describe<'a>(report: &'a str) -> String {
    // Each side's capvirt-plugin-api version, from the root module layouts at the top.
    let (this, other) = report.split_once("To <other>:").unwrap_or(("", ""));
    let version = |layout: &'a str| -> Option<&'a str> {
        layout.split("package:'capvirt-plugin-api' version:'").nth(1).and_then(|rest| rest.split('\'').next())
    };
    let host = version(this).unwrap_or(ABI_VERSION);
    let rebuild = |built: Option<&str>| match built {
        Some(v) if v != host => {
            format!("the plugin was built against capvirt-plugin-api {v}; rebuild it against {host}")
        }
        Some(v) => format!(
            "the plugin was built against a modified capvirt-plugin-api {v}; rebuild it against the released {host}"
        ),
        None => format!("rebuild the plugin against capvirt-plugin-api {host}"),
    };
    let built = version(other);
    let Some(block) = first_failing_block(report) else {
        return format!("incompatible plugin ABI (abi_stable's layout check failed); {}", rebuild(built));
    };
    let (trace, rest) = block.split_once("Layout of expected type:").unwrap_or((block, ""));
    let frames: Vec<(&str, &str)> = trace
        .lines()
        .map(str::trim)
        .collect::<Vec<_>>()
        .windows(2)
        .filter_map(|w| Some((w[0].strip_prefix("field_name:")?, w[1].strip_prefix("type:")?)))
        .collect();
    let location = match frames.as_slice() {
        [.., (function, _), ("__returns", returned)] => {
            let owner = frames.iter().rev().nth(2).map_or("", |(_, t)| *t);
            format!("{returned} (returned by {owner}.{function})")
        }
        [.., (_, parent), (field, ty)] => format!("{ty} (field {parent}.{field})"),
        [(_, ty)] => (*ty).to_string(),
        [] => "the root module".to_string(),
    };
    let (expected_layout, errors) = rest.split_once("Layout of found type:").unwrap_or(("", rest));
    let (found_layout, errors) = errors.split_once("\nError:").map_or(("", errors), |(l, e)| (l, e));
    let mut causes = Vec::new();
    for error in format!("Error:{errors}").split("\nError:").map(|e| e.trim_start_matches("Error:")) {
        let (kind, rest) = error.split_once("\nExpected:").unwrap_or((error, ""));
        let (expected, found) = rest.split_once("\nFound:").unwrap_or((rest, ""));
        let (found, extra) = found.split_once("\nExtra:").unwrap_or((found, ""));
        let kind = if kind.trim().is_empty() { one_line(extra) } else { one_line(kind) };
        if kind.is_empty() {
            continue;
        }
        let value = |text: &str| {
            let text = one_line(text);
            if text.chars().count() > 80 {
                format!("{}…", text.chars().take(80).collect::<String>())
            } else {
                text
            }
        };
        if expected.trim().is_empty() {
            causes.push(kind);
        } else {
            causes.push(format!("{kind}, expected {}, found {}", value(expected), value(found)));
        }
    }
    let members = |layout: &str| -> Vec<String> {
        let variants = layout
            .lines()
            .find_map(|l| l.trim().strip_prefix("variants:\""))
            .map(|v| v.trim_end_matches('"').split(';').filter(|s| !s.is_empty()).map(String::from).collect());
        variants.unwrap_or_else(|| {
            // Direct fields only: nested layouts are indented further.
            let depth = layout.lines().find(|l| l.trim_start().starts_with("field_name:")).map(indent);
            layout
                .lines()
                .filter(|l| Some(indent(l)) == depth)
                .filter_map(|l| l.trim().strip_prefix("field_name:"))
                .map(String::from)
                .collect()
        })
    };
    let (expected_members, found_members) = (members(expected_layout), members(found_layout));
    let only = |a: &[String], b: &[String]| a.iter().filter(|m| !b.contains(m)).cloned().collect::<Vec<_>>().join(", ");
    let (added, missing) = (only(&found_members, &expected_members), only(&expected_members, &found_members));
    if !added.is_empty() {
        causes.push(format!("only in the plugin: {added}"));
    }
    if !missing.is_empty() {
        causes.push(format!("missing in the plugin: {missing}"));
    }
    format!("incompatible plugin ABI at {location}: {}; {}", causes.join("; "), rebuild(built))
}

/// The part of the report about the first type with errors (`N error(s)` with N > 0).
fn first_failing_block(report: &str) -> Option<&str> {
    let mut blocks = report.split("error(s)").skip(1);
    let mut counts = report
        .split("error(s)")
        .map(|before| before.rsplit('\n').next().and_then(|line| line.trim().parse::<usize>().ok()).unwrap_or(0));
    loop {
        let (count, block) = (counts.next()?, blocks.next()?);
        if count > 0 {
            return Some(block);
        }
    }
}

fn indent(line: &str) -> usize {
    line.len() - line.trim_start().len()
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_abi_refusal_names_the_real_cause_in_one_line() {
        let variant = describe(include_str!("testdata/abi-report-new-variant.txt"));
        assert_eq!(
            variant,
            format!(
                "incompatible plugin ABI at ErrorKind (field PluginError.kind): too many variants, expected 7, found 8; \
                 only in the plugin: Busy; the plugin was built against capvirt-plugin-api 1.1.0; rebuild it against \
                 1.0.0"
            )
        );
        let field = describe(include_str!("testdata/abi-report-new-field.txt"));
        assert_eq!(
            field,
            format!(
                "incompatible plugin ABI at Manifest (returned by PluginModule.manifest): incompatible type size, \
                 expected 272, found 280; too many fields, expected 8, found 9; only in the plugin: priority; the \
                 plugin was built against capvirt-plugin-api 1.1.0; rebuild it against 1.0.0"
            )
        );
        assert!(!field.contains('\n') && !variant.contains('\n'));
        assert_eq!(
            describe("something else entirely"),
            format!(
                "incompatible plugin ABI (abi_stable's layout check failed); rebuild the plugin against \
                 capvirt-plugin-api {ABI_VERSION}"
            )
        );
    }

    #[test]
    fn an_older_plugin_in_a_newer_host_names_what_it_lacks() {
        // Measured: the example plugin built against 1.0.0, loaded by a host built against a
        // copy bumped to 1.1.0 with one more `ErrorKind` variant (plugin-api/GUIDE.md, section 10).
        let report = include_str!("testdata/abi-report-missing-variant.txt");
        assert_eq!(
            describe(report),
            "incompatible plugin ABI at ErrorKind (field PluginError.kind): too many variants, expected 8, found 7; \
             missing in the plugin: Busy; the plugin was built against capvirt-plugin-api 1.0.0; rebuild it against \
             1.1.0"
        );
    }
}
