//! Canonical JSON: sorted keys, no whitespace, one spelling per document.
//!
//! Written by hand rather than with `serde_json::to_string` because the order
//! of a `serde_json::Map` depends on a cargo feature (`preserve_order`) that
//! any crate in a build can switch on; signed bytes must not depend on that.

use serde_json::Value;

/// The canonical text of `value`.
pub(crate) fn to_string(value: &Value) -> String {
    let mut out = String::new();
    write(value, &mut out);
    out
}

fn write(value: &Value, out: &mut String) {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        // serde_json prints integers in their shortest decimal form; floats
        // never reach here from this crate (the manifest conversion refuses
        // them), and a parsed float makes the canonical check fail.
        Value::Number(n) => out.push_str(&n.to_string()),
        Value::String(s) => write_str(s, out),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write(item, out);
            }
            out.push(']');
        }
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
            out.push('{');
            for (i, (key, item)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_str(key, out);
                out.push(':');
                write(item, out);
            }
            out.push('}');
        }
    }
}

fn write_str(s: &str, out: &mut String) {
    // serde_json's escaping of a plain string: `"`, `\` and control
    // characters, nothing else. Serialising a &str cannot fail.
    match serde_json::to_string(s) {
        Ok(quoted) => out.push_str(&quoted),
        Err(_) => out.push_str("\"\""),
    }
}

/// Whether `bytes` are exactly the canonical form of the JSON they hold.
pub(crate) fn is_canonical(bytes: &[u8]) -> bool {
    // Any float, duplicate key, whitespace, reordering or alternative escape
    // makes the re-serialised text differ.
    match serde_json::from_slice::<Value>(bytes) {
        Ok(value) => {
            if has_float(&value) {
                return false;
            }
            to_string(&value).as_bytes() == bytes
        }
        Err(_) => false,
    }
}

fn has_float(value: &Value) -> bool {
    match value {
        Value::Number(n) => n.is_f64(),
        Value::Array(items) => items.iter().any(has_float),
        Value::Object(map) => map.values().any(has_float),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn keys_are_sorted_and_there_is_no_whitespace() {
        let v = json!({"b": 1, "a": [true, null, "x\ny"], "c": {"z": 1, "y": "é"}});
        assert_eq!(to_string(&v), r#"{"a":[true,null,"x\ny"],"b":1,"c":{"y":"é","z":1}}"#);
    }

    #[test]
    fn only_the_canonical_spelling_is_canonical() {
        assert!(is_canonical(br#"{"a":1,"b":"c"}"#));
        assert!(!is_canonical(br#"{"b":"c","a":1}"#));
        assert!(!is_canonical(br#"{"a": 1,"b":"c"}"#));
        assert!(!is_canonical(br#"{"a":1,"a":2}"#));
        assert!(!is_canonical(br#"{"a":1.0}"#));
        assert!(!is_canonical(br#"{"a":"\u0062"}"#));
        assert!(!is_canonical(b"{\"a\":1}\n"));
        assert!(!is_canonical(b"not json"));
    }
}
