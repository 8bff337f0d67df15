//! Which operators may publish, and for which numbers: the operators file
//! (`serve --operators FILE`), reloadable like the other access material.
//!
//! ```toml
//! # One table per operator, keyed by its certificate identity (the
//! # platform id of its client certificate: first URI SAN, else first DNS
//! # SAN, else the subject CN).
//! [operators."operator-a"]
//! prefixes = ["+1201", "+8613"]   # authoritative for these ranges
//! quarantine_days = 90             # disconnect -> earliest reissue (default 90)
//! ```
//!
//! A publication counts only for numbers under one of the publisher's
//! prefixes; any other item is refused with PERMISSION_DENIED and the
//! reason. Number portability is configuration, not inference: a ported
//! number's disconnect is published by the operator serving it, so that
//! operator needs the number's range (or the single number, a prefix of
//! all its digits) in its `prefixes`; nothing is inferred from a porting
//! database, and two operators may list overlapping prefixes (both are
//! then trusted there).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::domain::{PhoneNumber, Prefix};

/// Quarantine days of an operator that does not say.
pub const DEFAULT_QUARANTINE_DAYS: u32 = 90;

/// Longest quarantine accepted (ten years).
const MAX_QUARANTINE_DAYS: u32 = 3650;

/// The file as written.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    operators: BTreeMap<String, OperatorEntry>,
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct OperatorEntry {
    prefixes: Vec<String>,
    quarantine_days: Option<u32>,
}

/// One configured operator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Operator {
    /// Its certificate identity.
    pub id: String,
    /// The number ranges it is authoritative for.
    pub prefixes: Vec<Prefix>,
    /// Days from a disconnect to the earliest reissue.
    pub quarantine_days: u32,
}

impl Operator {
    /// True if `number` is under one of the operator's prefixes.
    pub fn covers(&self, number: PhoneNumber) -> bool {
        self.prefixes.iter().any(|p| number.has_prefix(p))
    }
}

/// Why an operators file is refused.
#[derive(Debug, thiserror::Error)]
#[error("operators file {path}: {reason}")]
pub struct OperatorsError {
    /// The file.
    pub path: PathBuf,
    /// What is wrong.
    pub reason: String,
}

/// The operators of one version of the file.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OperatorSet {
    by_id: BTreeMap<String, Arc<Operator>>,
}

impl OperatorSet {
    /// Parses and checks the TOML text of an operators file.
    pub fn parse(text: &str) -> Result<Self, String> {
        let file: File = toml::from_str(text).map_err(|e| e.to_string())?;
        let mut by_id = BTreeMap::new();
        for (id, entry) in file.operators {
            if id.is_empty() || id == crate::federation::REGISTER_SOURCE {
                return Err(format!("{id:?} cannot be an operator's identity"));
            }
            if entry.prefixes.is_empty() {
                return Err(format!("operator {id:?}: prefixes is empty"));
            }
            let prefixes = entry
                .prefixes
                .iter()
                .map(|p| Prefix::parse(p).map_err(|e| format!("operator {id:?}: prefix {p:?} {e}")))
                .collect::<Result<Vec<_>, _>>()?;
            let quarantine_days = entry.quarantine_days.unwrap_or(DEFAULT_QUARANTINE_DAYS);
            if quarantine_days > MAX_QUARANTINE_DAYS {
                return Err(format!(
                    "operator {id:?}: quarantine_days must be at most {MAX_QUARANTINE_DAYS}"
                ));
            }
            let operator = Operator {
                id: id.clone(),
                prefixes,
                quarantine_days,
            };
            by_id.insert(id, Arc::new(operator));
        }
        Ok(Self { by_id })
    }

    /// The operator with certificate identity `id`.
    pub fn get(&self, id: &str) -> Option<&Arc<Operator>> {
        self.by_id.get(id)
    }

    /// Every operator, by identity.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Operator>> {
        self.by_id.values()
    }
}

/// The operators in force: loaded from a file, swapped whole on reload
/// (a bad file keeps the previous set). Cheap to read per call.
#[derive(Debug)]
pub struct Operators {
    path: Option<PathBuf>,
    current: ArcSwap<OperatorSet>,
}

impl Operators {
    /// Loads `path`; a missing or bad file is an error (at start).
    pub fn load(path: &Path) -> Result<Self, OperatorsError> {
        let set = read(path)?;
        tracing::info!(operators = set.by_id.len(), "operators loaded");
        Ok(Self {
            path: Some(path.to_owned()),
            current: ArcSwap::from_pointee(set),
        })
    }

    /// No operators (no file configured): every publication is refused.
    pub fn none() -> Self {
        Self {
            path: None,
            current: ArcSwap::from_pointee(OperatorSet::default()),
        }
    }

    /// The set in force.
    pub fn current(&self) -> Arc<OperatorSet> {
        self.current.load_full()
    }

    /// The file, if configured.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Re-reads the file; on error the previous set stays in force.
    pub fn reload(&self) -> Result<(), OperatorsError> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let set = read(path)?;
        if set != **self.current.load() {
            tracing::info!(operators = set.by_id.len(), "operators reloaded");
            self.current.store(Arc::new(set));
        }
        Ok(())
    }
}

fn read(path: &Path) -> Result<OperatorSet, OperatorsError> {
    let err = |reason: String| OperatorsError {
        path: path.to_owned(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    OperatorSet::parse(&text).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_prefixes_and_defaults() {
        let set = OperatorSet::parse(
            r#"
            [operators."operator-a"]
            prefixes = ["+1201", "+8613"]
            [operators."operator-b"]
            prefixes = ["+44"]
            quarantine_days = 45
            "#,
        )
        .expect("parse");
        let a = set.get("operator-a").expect("a");
        assert_eq!(a.quarantine_days, DEFAULT_QUARANTINE_DAYS);
        assert!(a.covers(PhoneNumber::parse("+12015550123").expect("n")));
        assert!(!a.covers(PhoneNumber::parse("+12025550123").expect("n")));
        assert_eq!(set.get("operator-b").map(|b| b.quarantine_days), Some(45));
        assert!(set.get("operator-c").is_none());
    }

    #[test]
    fn refuses_bad_files() {
        for (text, says) in [
            ("[operators.x]\nprefixes = []", "prefixes is empty"),
            ("[operators.x]\nprefixes = [\"1201\"]", "prefix \"1201\""),
            (
                "[operators.x]\nprefixes = [\"+1\"]\nquarantine_days = 99999",
                "at most",
            ),
            ("[operators.register]\nprefixes = [\"+1\"]", "cannot be"),
            ("[operators.x]\nprefixes = [\"+1\"]\nextra = 1", "unknown field"),
        ] {
            let err = OperatorSet::parse(text).expect_err(text);
            assert!(err.contains(says), "{text}: {err}");
        }
    }
}
