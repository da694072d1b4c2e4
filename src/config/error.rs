//! Configuration errors that point at the file, line and field to fix.

use std::fmt;
use std::path::{Path, PathBuf};

/// A configuration problem, displayed as `file:line: field: what is wrong`.
#[derive(Debug)]
pub struct ConfigError {
    pub file: PathBuf,
    pub line: Option<usize>,
    pub field: Option<String>,
    pub message: String,
}

impl ConfigError {
    pub(super) fn io(path: &Path, e: std::io::Error) -> Self {
        ConfigError {
            file: path.to_path_buf(),
            line: None,
            field: None,
            message: format!("cannot read the file: {e}"),
        }
    }

    pub(super) fn syntax(path: &Path, source: &str, e: serde_yaml_ng::Error) -> Self {
        let mut line = e.location().map(|l| l.line());
        let mut message = e.to_string();
        // serde_yaml_ng appends " at line L column C"; the line is already in front.
        if let Some(i) = message.rfind(" at line ") {
            message.truncate(i);
        }
        // A duplicated key is reported where its block starts: point at the duplicate.
        // (serde says `duplicate field `k`` for a struct, `duplicate entry with key "k"` for a
        // map.)
        let duplicate = |marker: &str, close: char| {
            let rest = &message[message.find(marker)? + marker.len()..];
            rest.split(close).next().map(str::to_string)
        };
        if let Some(key) = duplicate("duplicate field `", '`')
            .or_else(|| duplicate("duplicate entry with key \"", '"'))
        {
            line = line
                .and_then(|from| duplicate_line(source, from, &key))
                .or(line);
        }
        ConfigError {
            file: path.to_path_buf(),
            line,
            field: None,
            message,
        }
    }
}

/// The line (1-based) of the second `key:` of the block that starts at line `from`.
fn duplicate_line(source: &str, from: usize, key: &str) -> Option<usize> {
    let starts_key = |text: &str| {
        let text = text.strip_prefix("- ").unwrap_or(text);
        [
            format!("{key}:"),
            format!("\"{key}\":"),
            format!("'{key}':"),
        ]
        .iter()
        .any(|k| text.starts_with(k.as_str()))
    };
    let mut indent = None;
    for (i, raw) in source.lines().enumerate().skip(from.saturating_sub(1)) {
        let text = raw.trim_start();
        if text.is_empty() || text.starts_with('#') {
            continue;
        }
        let at = raw.len() - text.len();
        match indent {
            Some(first) if at < first => return None,
            Some(first) if at == first && starts_key(text) => return Some(i + 1),
            None if starts_key(text) => indent = Some(at),
            _ => {}
        }
    }
    None
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if let Some(field) = &self.field {
            write!(f, ": {field}")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ConfigError {}

/// A semantic error found after parsing: the field path, the reason, and a piece of text
/// near the mistake that is used to find its line.
#[derive(Debug)]
pub(super) struct Invalid {
    field: String,
    message: String,
    near: Option<String>,
}

impl Invalid {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Invalid {
            field: field.into(),
            message: message.into(),
            near: None,
        }
    }

    pub fn near(mut self, text: &str) -> Self {
        self.near = Some(text.to_string());
        self
    }

    pub fn located(self, path: &Path, source: &str) -> ConfigError {
        let line = self.near.as_deref().and_then(|needle| {
            source
                .lines()
                .position(|l| !l.trim_start().starts_with('#') && l.contains(needle))
                .map(|i| i + 1)
        });
        ConfigError {
            file: path.to_path_buf(),
            line,
            field: Some(self.field),
            message: self.message,
        }
    }
}
