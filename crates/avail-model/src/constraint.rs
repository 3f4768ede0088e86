//! Placement constraints over node tags: `zone == tokyo`, `rack != r1`,
//! `compliance in [pci, hipaa]`, `class not in [slow]`, `gpu exists`.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::ValidationError;

/// The comparison of a constraint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConstraintOp {
    /// The tag equals the value.
    Eq,
    /// The tag is absent or differs from the value.
    Ne,
    /// The tag is one of the values.
    In,
    /// The tag is absent or none of the values.
    NotIn,
    /// The tag is present, whatever its value.
    Exists,
    /// `key > v`: integers and versions compared part by part ("1.10" > "1.9").
    Gt,
    /// `key >= v`.
    Ge,
    /// `key < v`.
    Lt,
    /// `key <= v`.
    Le,
}

/// Compare two tag values as versions: dot-separated parts, numeric parts compared as
/// numbers, others as text ("1.10" > "1.9", "16" > "8"; decimals are not numbers here:
/// "2.25" > "2.5").
pub fn compare_values(a: &str, b: &str) -> std::cmp::Ordering {
    let mut pa = a.split('.');
    let mut pb = b.split('.');
    loop {
        match (pa.next(), pb.next()) {
            (None, None) => return std::cmp::Ordering::Equal,
            (None, Some(_)) => return std::cmp::Ordering::Less,
            (Some(_), None) => return std::cmp::Ordering::Greater,
            (Some(x), Some(y)) => {
                let o = match (x.parse::<u64>(), y.parse::<u64>()) {
                    (Ok(x), Ok(y)) => x.cmp(&y),
                    _ => x.cmp(y),
                };
                if o != std::cmp::Ordering::Equal {
                    return o;
                }
            }
        }
    }
}

/// A parsed hard constraint on a node's tags.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Constraint {
    /// Tag key.
    pub key: String,
    /// Comparison.
    pub op: ConstraintOp,
    /// Values compared with (one for `==`/`!=`, none for `exists`).
    pub values: Vec<String>,
}

fn valid_token(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
}

impl Constraint {
    /// Parse one constraint expression; the error message says what was expected.
    pub fn parse(expr: &str) -> Result<Constraint, String> {
        let expr = expr.trim();
        let bad = || {
            format!(
                "cannot parse constraint {expr:?}: expected `key == v`, `key != v`, `key in [a, b]`, `key not in [a, b]`, `key exists`, or `key >= v` (also >, <, <=; numbers or versions)"
            )
        };
        let (key, rest) = expr.split_once(char::is_whitespace).ok_or_else(bad)?;
        let rest = rest.trim();
        let (op, rhs) = if let Some(r) = rest.strip_prefix("==") {
            (ConstraintOp::Eq, r)
        } else if let Some(r) = rest.strip_prefix("!=") {
            (ConstraintOp::Ne, r)
        } else if let Some(r) = rest.strip_prefix("not in") {
            (ConstraintOp::NotIn, r)
        } else if let Some(r) = rest.strip_prefix("in") {
            (ConstraintOp::In, r)
        } else if rest == "exists" {
            (ConstraintOp::Exists, "")
        } else if let Some(r) = rest.strip_prefix(">=") {
            (ConstraintOp::Ge, r)
        } else if let Some(r) = rest.strip_prefix("<=") {
            (ConstraintOp::Le, r)
        } else if let Some(r) = rest.strip_prefix('>') {
            (ConstraintOp::Gt, r)
        } else if let Some(r) = rest.strip_prefix('<') {
            (ConstraintOp::Lt, r)
        } else {
            return Err(bad());
        };
        if !valid_token(key) {
            return Err(format!("constraint {expr:?}: bad tag key {key:?}"));
        }
        let rhs = rhs.trim();
        let values: Vec<String> = match op {
            ConstraintOp::Exists => vec![],
            ConstraintOp::Eq
            | ConstraintOp::Ne
            | ConstraintOp::Gt
            | ConstraintOp::Ge
            | ConstraintOp::Lt
            | ConstraintOp::Le => vec![rhs.to_string()],
            ConstraintOp::In | ConstraintOp::NotIn => {
                let inner = rhs
                    .strip_prefix('[')
                    .and_then(|r| r.strip_suffix(']'))
                    .ok_or_else(bad)?;
                inner
                    .split(',')
                    .map(|v| v.trim().to_string())
                    .filter(|v| !v.is_empty())
                    .collect()
            }
        };
        if op != ConstraintOp::Exists && values.is_empty() {
            return Err(bad());
        }
        if let Some(v) = values.iter().find(|v| !valid_token(v)) {
            return Err(format!("constraint {expr:?}: bad tag value {v:?}"));
        }
        Ok(Constraint {
            key: key.to_string(),
            op,
            values,
        })
    }

    /// Whether a node with these tags satisfies the constraint.
    pub fn matches(&self, tags: &BTreeMap<String, String>) -> bool {
        let v = tags.get(&self.key);
        match self.op {
            ConstraintOp::Eq => v == Some(&self.values[0]),
            ConstraintOp::Ne => v != Some(&self.values[0]),
            ConstraintOp::In => v.is_some_and(|v| self.values.contains(v)),
            ConstraintOp::NotIn => !v.is_some_and(|v| self.values.contains(v)),
            ConstraintOp::Exists => v.is_some(),
            ConstraintOp::Gt | ConstraintOp::Ge | ConstraintOp::Lt | ConstraintOp::Le => {
                v.is_some_and(|v| self.holds_for(v))
            }
        }
    }

    /// Whether a node whose tag `key` has `value` satisfies this constraint (for a node
    /// without the tag, see [`Constraint::matches`]).
    pub fn holds_for(&self, value: &str) -> bool {
        use std::cmp::Ordering::*;
        let c = || compare_values(value, &self.values[0]);
        match self.op {
            ConstraintOp::Eq => value == self.values[0],
            ConstraintOp::Ne => value != self.values[0],
            ConstraintOp::In => self.values.iter().any(|x| x == value),
            ConstraintOp::NotIn => !self.values.iter().any(|x| x == value),
            ConstraintOp::Exists => true,
            ConstraintOp::Gt => c() == Greater,
            ConstraintOp::Ge => c() != Less,
            ConstraintOp::Lt => c() == Less,
            ConstraintOp::Le => c() != Greater,
        }
    }

    /// Whether a node without the tag satisfies this constraint (`!=` and `not in` do).
    pub fn holds_without_tag(&self) -> bool {
        matches!(self.op, ConstraintOp::Ne | ConstraintOp::NotIn)
    }
}

impl fmt::Display for Constraint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.op {
            ConstraintOp::Eq => write!(f, "{} == {}", self.key, self.values[0]),
            ConstraintOp::Ne => write!(f, "{} != {}", self.key, self.values[0]),
            ConstraintOp::In => write!(f, "{} in [{}]", self.key, self.values.join(", ")),
            ConstraintOp::NotIn => write!(f, "{} not in [{}]", self.key, self.values.join(", ")),
            ConstraintOp::Exists => write!(f, "{} exists", self.key),
            ConstraintOp::Gt => write!(f, "{} > {}", self.key, self.values[0]),
            ConstraintOp::Ge => write!(f, "{} >= {}", self.key, self.values[0]),
            ConstraintOp::Lt => write!(f, "{} < {}", self.key, self.values[0]),
            ConstraintOp::Le => write!(f, "{} <= {}", self.key, self.values[0]),
        }
    }
}

/// Parse a `key=value` tag; keys and values are tokens of `[A-Za-z0-9-_./]`.
pub fn parse_tag(s: &str) -> Result<(String, String), ValidationError> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| ValidationError::new("tags", format!("tag {s:?} is not key=value")))?;
    let (k, v) = (k.trim(), v.trim());
    if !valid_token(k) || !valid_token(v) {
        return Err(ValidationError::new(
            "tags",
            format!("tag {s:?}: key and value must be 1-63 characters of [A-Za-z0-9-_./]"),
        ));
    }
    Ok((k.to_string(), v.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tags(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn parses_and_matches_every_form() {
        let t = tags(&[
            ("zone", "tokyo"),
            ("compliance", "pci"),
            ("cores", "16"),
            ("kernel", "6.10"),
        ]);
        for (e, want) in [
            ("zone == tokyo", true),
            ("zone != tokyo", false),
            ("rack != r1", true),
            ("compliance in [pci, hipaa]", true),
            ("compliance not in [pci]", false),
            ("rack not in [r1]", true),
            ("zone exists", true),
            ("gpu exists", false),
            ("cores >= 8", true),
            ("cores > 16", false),
            ("cores < 17", true),
            ("cores < 16", false),
            ("kernel >= 6.10", true),
            ("kernel > 6.9", true),
            ("kernel < 6.2", false),
            ("kernel <= 6.10", true),
            ("gpu > 1", false),
        ] {
            let c = Constraint::parse(e).unwrap();
            assert_eq!(c.matches(&t), want, "{e}");
            assert_eq!(
                Constraint::parse(&c.to_string()).unwrap(),
                c,
                "round trip {e}"
            );
        }
    }

    #[test]
    fn rejects_garbage() {
        for e in [
            "",
            "zone",
            "zone ~= x",
            "zone in pci",
            "zone in []",
            "zo ne == x y",
            "zone == ",
        ] {
            assert!(Constraint::parse(e).is_err(), "{e:?}");
        }
    }

    #[test]
    fn tags_parse() {
        assert_eq!(
            parse_tag("zone=tokyo").unwrap(),
            ("zone".into(), "tokyo".into())
        );
        assert!(parse_tag("zone").is_err());
        assert!(parse_tag("zone=").is_err());
    }
}
