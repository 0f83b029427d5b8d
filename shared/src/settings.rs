//! Layered settings: defaults, then a TOML file, then `BRAID_` environment
//! variables (`__` for nesting), then command-line flags.

use std::collections::HashMap;
use std::path::Path;

use serde::de::DeserializeOwned;

/// A settings file, variable or flag that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("settings: {0}")]
    Load(#[from] config::ConfigError),
    #[error("invalid setting {key}: {message}")]
    Invalid { key: &'static str, message: String },
}

/// A flag given on the command line, applied last.
pub type Override = (&'static str, config::Value);

/// Loads `T` from its defaults, `file`, the environment and `overrides`.
///
/// Only `BRAID_*` variables whose first part names one of `keys` are read, so
/// the agent's variables in a shared shell do not upset the coordinator.
pub fn load<T: DeserializeOwned>(
    file: Option<&Path>,
    keys: &[&str],
    list_keys: &[&str],
    overrides: Vec<Override>,
) -> Result<T, SettingsError> {
    load_from_env(file, keys, list_keys, overrides, std::env::vars())
}

fn load_from_env<T: DeserializeOwned>(
    file: Option<&Path>,
    keys: &[&str],
    list_keys: &[&str],
    overrides: Vec<Override>,
    vars: impl Iterator<Item = (String, String)>,
) -> Result<T, SettingsError> {
    let mut builder = config::Config::builder();
    if let Some(path) = file {
        builder = builder.add_source(config::File::from(path).format(config::FileFormat::Toml).required(true));
    }
    let env: HashMap<String, String> = vars
        .filter_map(|(name, value)| {
            let rest = name.strip_prefix("BRAID_")?.to_ascii_lowercase();
            let top = rest.split("__").next().unwrap_or_default();
            keys.contains(&top).then(|| (format!("BRAID_{}", rest.to_ascii_uppercase()), value))
        })
        .collect();
    let mut environment = config::Environment::with_prefix("BRAID")
        .prefix_separator("_")
        .separator("__")
        .try_parsing(true)
        .source(Some(env));
    if !list_keys.is_empty() {
        environment = environment.list_separator(",");
        for key in list_keys {
            environment = environment.with_list_parse_key(key);
        }
    }
    builder = builder.add_source(environment);
    for (key, value) in overrides {
        builder = builder.set_override(key, value)?;
    }
    Ok(builder.build()?.try_deserialize()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug)]
    #[serde(deny_unknown_fields, default)]
    struct Sample {
        listen: String,
        slots: u32,
        insecure_registries: Vec<String>,
    }

    impl Default for Sample {
        fn default() -> Self {
            Sample { listen: "127.0.0.1:1".into(), slots: 1, insecure_registries: vec![] }
        }
    }

    #[test]
    fn layers_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "slots = 4\nlisten = \"from-file\"\n").unwrap();
        let vars = [
            ("BRAID_SLOTS".to_owned(), "6".to_owned()),
            ("BRAID_INSECURE_REGISTRIES".to_owned(), "a:5000,b:5000".to_owned()),
            ("BRAID_COORDINATOR".to_owned(), "ignored: not a key here".to_owned()),
        ];
        let s: Sample = load_from_env(
            Some(&file),
            &["listen", "slots", "insecure_registries"],
            &["insecure_registries"],
            vec![("listen", "from-flag".into())],
            vars.into_iter(),
        )
        .unwrap();
        assert_eq!(s.listen, "from-flag");
        assert_eq!(s.slots, 6);
        assert_eq!(s.insecure_registries, ["a:5000", "b:5000"]);
    }

    #[test]
    fn unknown_file_keys_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "slotz = 4\n").unwrap();
        let e = load_from_env::<Sample>(Some(&file), &["slots"], &[], vec![], std::iter::empty()).unwrap_err();
        assert!(e.to_string().contains("slotz"), "{e}");
    }

    proptest::proptest! {
        /// Whatever a settings file holds, loading it returns, never panics.
        #[test]
        fn any_file_loads_or_fails_cleanly(contents in "\\PC{0,200}") {
            let dir = tempfile::tempdir().unwrap();
            let file = dir.path().join("c.toml");
            std::fs::write(&file, contents).unwrap();
            let _ = load_from_env::<Sample>(Some(&file), &["listen", "slots"], &[], vec![], std::iter::empty());
        }
    }
}
