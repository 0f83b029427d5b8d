//! Layered settings: defaults, then a TOML file, then `BRAID_` environment
//! variables (`__` for nesting), then command-line flags.
//!
//! A binary defines its settings once, as one struct that is both its flags
//! (`clap::Args`: the flag, its help and its default) and the keys of the file
//! and the environment (`serde`): the keys, the list keys and the defaults are
//! all read from that struct, never written out again.

use std::collections::HashMap;
use std::path::Path;

use clap::parser::ValueSource;
use serde::Serialize;
use serde::de::DeserializeOwned;

/// A settings file, variable or flag that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("settings: {0}")]
    Load(#[from] config::ConfigError),
    #[error("invalid setting {key}: {message}")]
    Invalid { key: &'static str, message: String },
}

/// What a settings struct is: flags (with their defaults) and keys.
pub trait Settings: clap::Args + clap::FromArgMatches + Serialize + DeserializeOwned {}

impl<T: clap::Args + clap::FromArgMatches + Serialize + DeserializeOwned> Settings for T {}

/// Loads `T` from its defaults, `file`, the `BRAID_*` environment and the
/// flags given on the command line: `flags` as parsed from `matches`.
///
/// Only `BRAID_*` variables whose first part names a key of `T` are read, so
/// the agent's variables in a shared shell do not upset the coordinator.
pub fn load<T: Settings>(file: Option<&Path>, flags: &T, matches: &clap::ArgMatches) -> Result<T, SettingsError> {
    load_with_env(file, flags, matches, std::env::vars())
}

/// [`load`] with the environment given, for tests.
pub fn load_with_env<T: Settings>(
    file: Option<&Path>,
    flags: &T,
    matches: &clap::ArgMatches,
    vars: impl Iterator<Item = (String, String)>,
) -> Result<T, SettingsError> {
    let keys = keys::<T>();
    let command = T::augment_args(clap::Command::new("settings"));
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
    // A repeatable flag is a list key: its variable is comma-separated.
    let lists: Vec<&str> = command
        .get_arguments()
        .filter(|a| matches!(a.get_action(), clap::ArgAction::Append))
        .map(|a| a.get_id().as_str())
        .collect();
    if !lists.is_empty() {
        environment = environment.list_separator(",");
        for key in lists {
            environment = environment.with_list_parse_key(key);
        }
    }
    builder = builder.add_source(environment);
    // The flags win: only those given, so a flag's default never hides the
    // file or a variable.
    let given: Vec<&str> = matches
        .ids()
        .map(clap::Id::as_str)
        .filter(|id| keys.contains(id) && matches.value_source(id) == Some(ValueSource::CommandLine))
        .collect();
    if !given.is_empty() {
        let mut values = config::Source::collect(&config::Config::try_from(flags)?)?;
        for key in given {
            if let Some(value) = values.remove(key) {
                builder = builder.set_override(key, value)?;
            }
        }
    }
    Ok(builder.build()?.try_deserialize()?)
}

/// `T` when nothing is given: clap's `default_value`s are the one place each
/// default is written (and `--help` shows them).
pub fn defaults<T: clap::Args + clap::FromArgMatches>() -> Result<T, clap::Error> {
    let command = T::augment_args(clap::Command::new("defaults"));
    T::from_arg_matches(&command.try_get_matches_from(["defaults"])?)
}

/// The top-level keys `T` accepts, as its derived `Deserialize` names them.
pub fn keys<T: DeserializeOwned>() -> &'static [&'static str] {
    let mut fields: &'static [&'static str] = &[];
    // Fails by design once the field names are seen.
    let _ = T::deserialize(FieldNames(&mut fields));
    fields
}

/// What `command`'s `--help` fails to say about the settings `T`: a key with
/// no flag (unless it is one of `file_only` and the help names it), a hidden
/// flag, a flag without help text, or a flag taking a value whose help gives
/// no default. The binaries' tests assert it is empty.
pub fn help_gaps<T: Settings>(command: &mut clap::Command, file_only: &[&str]) -> Vec<String> {
    let help = command.render_long_help().to_string();
    let mut gaps = Vec::new();
    for key in keys::<T>() {
        let Some(arg) = command.get_arguments().find(|a| a.get_id() == key) else {
            if !(file_only.contains(key) && help.contains(key)) {
                gaps.push(format!("{key}: no flag, and --help does not name it"));
            }
            continue;
        };
        let Some(long) = arg.get_long().filter(|long| help.contains(&format!("--{long}"))) else {
            gaps.push(format!("{key}: no --flag in --help"));
            continue;
        };
        let text = arg.get_long_help().or(arg.get_help()).map(ToString::to_string).unwrap_or_default();
        if arg.is_hide_set() || text.trim().is_empty() {
            gaps.push(format!("--{long}: no help text"));
        }
        let takes_value = arg.get_num_args().is_none_or(|n| n.takes_values());
        let shows_default = !arg.get_default_values().is_empty() && !arg.is_hide_default_value_set();
        if takes_value && !shows_default && !text.contains("[default: ") {
            gaps.push(format!("--{long}: its help gives no default"));
        }
    }
    for arg in command.get_arguments() {
        if arg.get_help().is_none_or(|h| h.to_string().trim().is_empty()) {
            gaps.push(format!("{}: no help text", arg.get_id()));
        }
    }
    gaps
}

/// The keys of `T` an example settings file does not show, set (`key = `,
/// `[key.`) or commented out (`# key = `).
pub fn example_gaps<T: DeserializeOwned>(example: &str) -> Vec<&'static str> {
    let shown: Vec<&str> = example
        .lines()
        .map(|line| line.trim_start_matches(|c: char| c == '#' || c.is_whitespace()))
        .filter_map(|line| line.split_once(" =").map(|(key, _)| key).or_else(|| line.strip_prefix('[')))
        .collect();
    keys::<T>()
        .iter()
        .copied()
        .filter(|key| !shown.iter().any(|s| s == key || s.starts_with(&format!("{key}."))))
        .collect()
}

/// A deserializer that only records the field names a struct asks for.
struct FieldNames<'a>(&'a mut &'static [&'static str]);

impl<'de> serde::Deserializer<'de> for FieldNames<'_> {
    type Error = serde::de::value::Error;

    fn deserialize_any<V: serde::de::Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
        Err(serde::de::Error::custom("not a struct"))
    }

    fn deserialize_struct<V: serde::de::Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        _visitor: V,
    ) -> Result<V::Value, Self::Error> {
        *self.0 = fields;
        Err(serde::de::Error::custom("field names recorded"))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf option unit
        unit_struct newtype_struct seq tuple tuple_struct map enum identifier ignored_any
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, FromArgMatches};

    #[derive(clap::Parser, serde::Serialize, serde::Deserialize, Debug)]
    #[serde(deny_unknown_fields, default)]
    struct Sample {
        /// Where
        #[arg(long, default_value = "127.0.0.1:1")]
        listen: String,
        /// How many
        #[arg(long, default_value_t = 1)]
        slots: u32,
        /// Which
        #[arg(long = "insecure-registry")]
        insecure_registries: Vec<String>,
        /// Whether
        #[arg(long)]
        insecure: bool,
        /// Not a flag
        #[arg(skip)]
        table: std::collections::BTreeMap<String, String>,
    }

    impl Default for Sample {
        fn default() -> Self {
            defaults().unwrap()
        }
    }

    fn load_sample(file: Option<&Path>, args: &[&str], vars: &[(&str, &str)]) -> Result<Sample, SettingsError> {
        let matches = Sample::command().try_get_matches_from(std::iter::once("sample").chain(args.iter().copied()));
        let matches = matches.unwrap();
        let flags = Sample::from_arg_matches(&matches).unwrap();
        let vars = vars.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned()));
        load_with_env(file, &flags, &matches, vars.collect::<Vec<_>>().into_iter())
    }

    #[test]
    fn layers_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "slots = 4\nlisten = \"from-file\"\ninsecure = true\n[table]\na = \"b\"\n").unwrap();
        let vars = [
            ("BRAID_SLOTS", "6"),
            ("BRAID_INSECURE_REGISTRIES", "a:5000,b:5000"),
            ("BRAID_COORDINATOR", "ignored: not a key here"),
        ];
        let s = load_sample(Some(&file), &["--listen", "from-flag"], &vars).unwrap();
        assert_eq!(s.listen, "from-flag");
        assert_eq!(s.slots, 6, "a variable over the file, and a flag's default hides neither");
        assert_eq!(s.insecure_registries, ["a:5000", "b:5000"]);
        assert!(s.insecure, "an absent switch leaves the file's true");
        assert_eq!(s.table["a"], "b");
        let s = load_sample(Some(&file), &["--slots", "9", "--insecure-registry", "c:1"], &vars).unwrap();
        assert_eq!((s.slots, s.insecure_registries.as_slice()), (9, ["c:1".to_owned()].as_slice()));
        let s = load_sample(None, &[], &[]).unwrap();
        assert_eq!((s.listen.as_str(), s.slots, s.insecure), ("127.0.0.1:1", 1, false), "the flags' defaults");
    }

    #[test]
    fn keys_come_from_the_struct() {
        assert_eq!(keys::<Sample>(), ["listen", "slots", "insecure_registries", "insecure", "table"]);
    }

    #[test]
    fn gaps_in_help_and_examples_are_named() {
        let gaps = help_gaps::<Sample>(&mut Sample::command(), &[]);
        assert_eq!(
            gaps,
            ["--insecure-registry: its help gives no default", "table: no flag, and --help does not name it"]
        );
        let mut named = Sample::command().after_help("table: not a flag");
        assert_eq!(help_gaps::<Sample>(&mut named, &["table"]).len(), 1, "a file-only key named in --help");
        let example = "listen = \"x\"\n# slots = 1\n#insecure_registries = []\n[table.a]\n";
        assert_eq!(example_gaps::<Sample>(example), ["insecure"]);
    }

    #[test]
    fn unknown_keys_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "slotz = 4\n").unwrap();
        let e = load_sample(Some(&file), &[], &[]).unwrap_err();
        assert!(e.to_string().contains("slotz"), "{e}");
    }

    proptest::proptest! {
        /// Whatever a settings file holds, loading it returns, never panics.
        #[test]
        fn any_file_loads_or_fails_cleanly(contents in "\\PC{0,200}") {
            let dir = tempfile::tempdir().unwrap();
            let file = dir.path().join("c.toml");
            std::fs::write(&file, contents).unwrap();
            let _ = load_sample(Some(&file), &[], &[]);
        }
    }
}
