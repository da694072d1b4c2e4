//! How model names are compared: what a client writes as `model`, the configuration's names
//! and aliases, and the names clusters report for their jobs.

/// Model names match when they are equal after dropping everything but letters and digits
/// and lower-casing (FIRST matches slugified names the same way).
pub fn normalize(name: &str) -> String {
    if name.is_ascii() {
        // Every request's model goes through here: ASCII, the usual case, byte by byte.
        let mut out = String::with_capacity(name.len());
        for b in name.bytes().filter(u8::is_ascii_alphanumeric) {
            out.push(char::from(b.to_ascii_lowercase()));
        }
        return out;
    }
    normalize_unicode(name)
}

/// [`normalize`]'s rule for any text.
fn normalize_unicode(name: &str) -> String {
    name.chars()
        .filter(|c| c.is_alphanumeric())
        .flat_map(char::to_lowercase)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::{normalize, normalize_unicode};

    #[test]
    fn ascii_names_normalize_as_the_general_rule_does() {
        for name in [
            "Meta-Llama-3.1-8B-Instruct",
            "meta_llama/META llama",
            "",
            "a.B-c_9",
        ] {
            assert_eq!(normalize(name), normalize_unicode(name), "{name}");
        }
        assert_eq!(normalize("Meta-Llama-3.1-8B"), "metallama318b");
        assert_eq!(normalize("Ünïcode-Modell 7B"), "ünïcodemodell7b");
    }
}
