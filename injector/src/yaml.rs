//! Writes JSON values as block YAML that YAML 1.1 readers (kubectl, client-go) read back unchanged.
//!
//! Why not `serde_yaml_ng::to_string`: it follows YAML 1.2 and leaves strings such as `yes`, `on`,
//! `n` or `1_000` unquoted, which kubectl's YAML 1.1 decoder turns into booleans and numbers, so
//! `remora-injector inject … | kubectl apply -f -` would fail on perfectly good manifests. Here
//! a string goes unquoted only when it cannot be read as anything else under either version;
//! everything else is quoted (single quotes where no escape is needed, else double quotes), or
//! written as a literal block when it is tidy multi-line text.

use std::fmt::Write as _;

use serde_json::Value;

/// The document as block YAML, ending with a newline.
pub fn to_yaml(value: &Value) -> String {
    let mut out = String::new();
    if !write_block(&mut out, value, 0) {
        write_scalar(&mut out, value, 2);
        out.push('\n');
    }
    out
}

/// Writes a non-empty map or list as block lines at `indent`; anything else is left to the
/// caller (returns false).
fn write_block(out: &mut String, value: &Value, indent: usize) -> bool {
    match value {
        Value::Object(map) if !map.is_empty() => write_map(out, map, indent),
        Value::Array(items) if !items.is_empty() => write_sequence(out, items, indent),
        _ => return false,
    }
    true
}

fn write_map(out: &mut String, map: &serde_json::Map<String, Value>, indent: usize) {
    for (key, value) in map {
        push_indent(out, indent);
        // A key is never a block scalar: multi-line keys are quoted.
        if is_plain(key) {
            out.push_str(key);
        } else {
            write_quoted(out, key);
        }
        out.push(':');
        // A list stays at its key's indentation, as kubectl writes it; a map goes one level in.
        let block_indent = if value.is_array() { indent } else { indent + 2 };
        let mut block = String::new();
        if write_block(&mut block, value, block_indent) {
            out.push('\n');
            out.push_str(&block);
        } else {
            out.push(' ');
            write_scalar(out, value, indent + 2);
            out.push('\n');
        }
    }
}

fn write_sequence(out: &mut String, items: &[Value], indent: usize) {
    for item in items {
        push_indent(out, indent);
        out.push_str("- ");
        // A map or list item starts on the dash's line: render it one level in, then pull its
        // first line's indentation back to the dash.
        let mut block = String::new();
        if write_block(&mut block, item, indent + 2) {
            out.push_str(&block[indent + 2..]);
        } else {
            write_scalar(out, item, indent + 2);
            out.push('\n');
        }
    }
}

/// A scalar (or an empty map or list) on the current line; a literal block's lines get
/// `block_indent`.
fn write_scalar(out: &mut String, value: &Value, block_indent: usize) {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(flag) => out.push_str(if *flag { "true" } else { "false" }),
        Value::Number(number) => out.push_str(&number.to_string()),
        Value::String(text) if is_plain(text) => out.push_str(text),
        Value::String(text) if is_literal_block(text) => write_literal(out, text, block_indent),
        Value::String(text) => write_quoted(out, text),
        Value::Object(_) => out.push_str("{}"),
        Value::Array(_) => out.push_str("[]"),
    }
}

fn push_indent(out: &mut String, indent: usize) {
    out.extend(std::iter::repeat_n(' ', indent));
}

/// Words YAML 1.1 (or 1.2) reads as booleans or null, compared without case.
const NON_STRING_WORDS: [&str; 12] = [
    "y", "n", "yes", "no", "true", "false", "on", "off", "null", "~", "nan", "inf",
];

/// Whether `text` can be written without quotes and read back as this very string by a YAML 1.1
/// or 1.2 parser. Deliberately narrow: letters, digits and `-_./:@+=,` with single inner spaces
/// (no `: `, no ` #`), starting with a letter, `/`, `_`, or dashes then a letter (`--since`);
/// not a boolean or null word. A string starting with a digit passes only with a letter no
/// number, timestamp or hex form uses (`100m`, `64Mi`, `24h`): `1e3`, `0x1F`, `1_000`, `1:20`
/// or `2024-01-01` would be read as numbers or dates.
fn is_plain(text: &str) -> bool {
    let Some(first) = text.chars().next() else {
        return false;
    };
    let after_dashes = text.trim_start_matches('-');
    let starts_well = first.is_ascii_alphabetic()
        || first == '/'
        || first == '_'
        || (first == '-'
            && text.len() - after_dashes.len() <= 2
            && after_dashes.starts_with(|c: char| c.is_ascii_alphabetic()))
        || (first.is_ascii_digit()
            && text
                .chars()
                .any(|c| c.is_ascii_alphabetic() && !"abcdefABCDEFoOtTxXzZ".contains(c)));
    if !starts_well
        || NON_STRING_WORDS
            .iter()
            .any(|word| word.eq_ignore_ascii_case(text))
    {
        return false;
    }
    let allowed = |c: char| c.is_ascii_alphanumeric() || "-_./:@+=, ".contains(c);
    text.chars().all(allowed)
        && !text.ends_with([':', ' '])
        && !text.contains(": ")
        && !text.contains(" #")
        && !text.contains("  ")
}

/// Whether `text` reads well, and safely, as a `|` block: several lines of printable text with no
/// tabs, no carriage returns and no trailing blanks, the first line neither empty nor indented
/// (a block's indentation is taken from its first line).
fn is_literal_block(text: &str) -> bool {
    text.contains('\n')
        && !text.starts_with([' ', '\n'])
        && text
            .chars()
            .all(|c| c == '\n' || (is_printable(c) && c != '\t'))
        && text.split('\n').all(|line| !line.ends_with(' '))
}

fn write_literal(out: &mut String, text: &str, indent: usize) {
    // Chomping: `|-` no final newline, `|` exactly one, `|+` several (kept as empty lines).
    let (indicator, body) = match text.strip_suffix('\n') {
        None => ("|-", text),
        Some(body) if body.ends_with('\n') => ("|+", body),
        Some(body) => ("|", body),
    };
    out.push_str(indicator);
    for line in body.split('\n') {
        out.push('\n');
        if !line.is_empty() {
            push_indent(out, indent);
            out.push_str(line);
        }
    }
}

/// YAML's printable characters (`c-printable`), less the line and paragraph separators and NEL,
/// which some parsers take as line breaks.
fn is_printable(c: char) -> bool {
    matches!(c, '\t' | '\n' | ' '..='~' | '\u{a0}'..='\u{d7ff}' | '\u{e000}'..='\u{fffd}' | '\u{10000}'..)
        && !matches!(c, '\u{2028}' | '\u{2029}')
}

/// Single quotes where the text needs no escapes (only `'` is doubled), else double quotes.
fn write_quoted(out: &mut String, text: &str) {
    if text
        .chars()
        .all(|c| is_printable(c) && c != '\n' && c != '\t')
    {
        out.push('\'');
        out.push_str(&text.replace('\'', "''"));
        out.push('\'');
    } else {
        write_double_quoted(out, text);
    }
}

fn write_double_quoted(out: &mut String, text: &str) {
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            c if is_printable(c) => out.push(c),
            c => {
                // Only characters below U+10000 are unprintable, so four digits always do.
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn block_layout_reads_like_kubectl() {
        let value = json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "web", "labels": {}, "annotations": {"example.com/x": "yes"}},
            "spec": {
                "containers": [{"name": "web", "image": "nginx:1.27", "args": ["-c", "echo hi\necho bye\n"], "ports": []}],
                "matrix": [[1, 2], []],
                "nothing": null,
            },
        });
        assert_eq!(
            to_yaml(&value),
            "\
apiVersion: v1
kind: Pod
metadata:
  name: web
  labels: {}
  annotations:
    example.com/x: 'yes'
spec:
  containers:
  - name: web
    image: nginx:1.27
    args:
    - -c
    - |
      echo hi
      echo bye
    ports: []
  matrix:
  - - 1
    - 2
  - []
  nothing: null
"
        );
    }

    #[test]
    fn plain_only_where_nothing_else_could_be_read() {
        let cases: &[(&str, bool)] = &[
            ("nginx", true),
            ("ghcr.io/remora-mesh/remora-proxy:0.1.0", true),
            ("/run", true),
            ("remora.io/status", true),
            ("a b", true),
            ("yes", false),
            ("Y", false),
            ("oFF", false),
            ("Null", false),
            (".inf", false),
            ("100m", true),
            ("64Mi", true),
            ("24h", true),
            ("--since", true),
            ("-c", true),
            ("---a", false),
            ("-1", false),
            ("-.inf", false),
            ("- a", false),
            ("1e3", false),
            ("0x1F", false),
            ("1E", false),
            ("2001-12-14t21:59:43.10-05:00", false),
            ("1_000", false),
            ("1:20", false),
            ("", false),
            ("a: b", false),
            ("a:", false),
            ("a #b", false),
            ("trail ", false),
            ("two  spaces", false),
            ("<<", false),
            ("a\"b", false),
            ("é", false),
        ];
        for (text, plain) in cases {
            assert_eq!(is_plain(text), *plain, "{text:?}");
        }
    }

    #[test]
    fn every_string_reads_back_the_same() {
        let strings = [
            "yes",
            "",
            "~",
            "1_000",
            "line1\nline2",
            "line1\nline2\n",
            "ends\n\n\n",
            "\nlead",
            "  indented\nx",
            "x\n  indented\n",
            "bell\u{7}",
            "a\\b\"c",
            "x\r\ny",
            "sep\u{2028}x",
            "nel\u{85}x",
            "tab\tin",
            "trail \nx",
            "ünïcødé",
            "emoji 🦀",
            "it's",
            "'q'",
        ];
        let value = json!({
            "list": strings,
            "map": strings.iter().map(|s| (s.to_string(), json!(s))).collect::<serde_json::Map<_, _>>(),
        });
        let yaml = to_yaml(&value);
        let back: Value =
            serde_yaml_ng::from_str(&yaml).unwrap_or_else(|err| panic!("{err}\n{yaml}"));
        assert_eq!(back, value, "{yaml}");
    }
}
