//! How model names are compared: what a client writes as `model`, the configuration's names
//! and aliases, and the names clusters report for their jobs.

/// Model names match when they are equal after dropping everything but letters and digits
/// and lower-casing (FIRST matches slugified names the same way).
pub fn normalize(name: &str) -> String {
    name.chars()
        .filter(|c| c.is_alphanumeric())
        .flat_map(char::to_lowercase)
        .collect()
}
