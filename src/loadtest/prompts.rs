//! The prompts of a load test: generated from a seed (varied lengths, like real traffic, and
//! the same for the same seed), or read from a JSONL file.

use anyhow::{bail, Context};
use serde_json::Value;
use std::path::Path;

/// One prompt: text (completions, embeddings, or a chat's one user message) or a chat's
/// whole `messages`.
#[derive(Debug, Clone)]
pub enum Prompt {
    Text(String),
    Messages(Value),
}

/// How many prompts a generated set has (workers take them in turn).
const GENERATED: usize = 512;

const TASKS: [&str; 6] = [
    "Summarize the following notes in three sentences:",
    "Answer the question using the context below.",
    "Rewrite this paragraph for a general audience:",
    "List the key findings in the text that follows.",
    "Explain the following log excerpt and suggest a fix:",
    "Translate the following text into French:",
];

const WORDS: [&str; 48] = [
    "the",
    "simulation",
    "of",
    "a",
    "cluster",
    "node",
    "ran",
    "for",
    "hours",
    "and",
    "produced",
    "results",
    "that",
    "were",
    "compared",
    "with",
    "experimental",
    "data",
    "from",
    "beamline",
    "measurements",
    "showing",
    "agreement",
    "within",
    "error",
    "bars",
    "while",
    "the",
    "model",
    "predicted",
    "higher",
    "energy",
    "in",
    "regions",
    "where",
    "turbulence",
    "dominates",
    "so",
    "we",
    "propose",
    "further",
    "runs",
    "at",
    "larger",
    "scale",
    "on",
    "GPU",
    "partitions",
];

/// `count` prompts from `seed`: with `tokens`, each about that long; otherwise of varied
/// lengths (most short, some medium, a few long, as chat traffic is).
pub fn generated(seed: u64, tokens: Option<usize>) -> Vec<Prompt> {
    let mut rng = fastrand::Rng::with_seed(seed);
    (0..GENERATED)
        .map(|_| {
            // About 4 tokens for 3 words with the common tokenizers.
            let words = match tokens {
                Some(n) => (n * 3 / 4).max(1),
                None => match rng.u32(0..100) {
                    0..=59 => rng.usize(15..120),
                    60..=89 => rng.usize(120..500),
                    _ => rng.usize(500..1500),
                },
            };
            let mut text = String::with_capacity(words * 8);
            if tokens.is_none() {
                text.push_str(TASKS[rng.usize(0..TASKS.len())]);
                text.push('\n');
            }
            for i in 0..words {
                if i > 0 {
                    text.push(if i % 17 == 0 { '.' } else { ' ' });
                    if i % 17 == 0 {
                        text.push(' ');
                    }
                }
                text.push_str(WORDS[rng.usize(0..WORDS.len())]);
            }
            Prompt::Text(text)
        })
        .collect()
}

/// Prompts from a JSONL file: one object per line with `"prompt": "..."` or
/// `"messages": [...]` (blank lines skipped).
pub fn from_file(path: &Path) -> anyhow::Result<Vec<Prompt>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("--prompts {}: cannot read it", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("--prompts {}:{}", path.display(), i + 1);
        let v: Value = serde_json::from_str(line).with_context(|| format!("{}: not JSON", at()))?;
        out.push(match (&v["prompt"], &v["messages"]) {
            (Value::String(p), _) => Prompt::Text(p.clone()),
            (_, Value::Array(m)) if !m.is_empty() => Prompt::Messages(Value::Array(m.clone())),
            _ => bail!(
                "{}: each line needs \"prompt\": \"...\" or \"messages\": [...]",
                at()
            ),
        });
    }
    if out.is_empty() {
        bail!("--prompts {}: no prompts in it", path.display());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(p: &[Prompt]) -> Vec<&str> {
        p.iter()
            .map(|p| match p {
                Prompt::Text(t) => t.as_str(),
                Prompt::Messages(_) => "",
            })
            .collect()
    }

    #[test]
    fn the_same_seed_gives_the_same_varied_prompts() {
        let a = generated(7, None);
        assert_eq!(texts(&a), texts(&generated(7, None)));
        assert_ne!(texts(&a), texts(&generated(8, None)));
        let lengths: Vec<usize> = texts(&a).iter().map(|t| t.split(' ').count()).collect();
        let (short, long) = (
            lengths.iter().filter(|&&n| n < 120).count(),
            lengths.iter().filter(|&&n| n >= 500).count(),
        );
        assert!(short > long && long > 0, "short {short}, long {long}");
    }

    #[test]
    fn a_fixed_length_is_about_that_many_tokens() {
        for p in texts(&generated(1, Some(400))) {
            assert_eq!(p.split_whitespace().count(), 300);
        }
    }

    #[test]
    fn a_bad_line_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.jsonl");
        std::fs::write(&path, "{\"prompt\": \"hi\"}\n\n{\"text\": 1}\n").unwrap();
        let e = from_file(&path).unwrap_err().to_string();
        assert!(e.contains("p.jsonl:3"), "{e}");
    }
}
