//! `--config FILE`: the command-line flags, written down in a TOML file.
//!
//! Each key is a long flag's name, with `-` or `_` between words, and means
//! exactly what the flag means (the file is turned into flags and parsed by
//! the same parser, so every check and every error is the flag's):
//!
//! ```toml
//! bind = ["0.0.0.0:8080", "unix:/run/app.sock"]
//! workers = "2:8"          # or 4
//! timeout = 30
//! max-requests = 10000
//! lock-always = true       # a switch: true sets it, false leaves it off
//! ```
//!
//! A flag given on the command line wins over the same key in the file
//! (gunicorn's rule). HUP reads the file again (see `main.rs`).

use std::ffi::OsString;
use std::path::Path;

use clap::{ArgAction, Command};

/// Flags that make no sense in a file: they are not settings of the server.
const NOT_SETTINGS: [&str; 5] = [
    "config",
    "check-config",
    "list-strategies",
    "help",
    "version",
];

/// Reads `path` and returns the flags it sets, as arguments (`--workers=4`),
/// leaving out those for which `on_command_line(id)` is true. `cmd` is the
/// program's clap command. Errors name the file and, where there is one,
/// the line and the key.
pub fn flags(
    path: &Path,
    cmd: &Command,
    on_command_line: impl Fn(&str) -> bool,
) -> Result<Vec<OsString>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{e}"))?;
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
        let line = e
            .span()
            .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
        let msg = e.message().trim().to_string();
        match line {
            Some(l) => format!("line {l}: {msg}"),
            None => msg,
        }
    })?;
    let settings: Vec<&clap::Arg> = cmd
        .get_arguments()
        .filter(|a| !a.is_hide_set() && a.get_long().is_some_and(|l| !NOT_SETTINGS.contains(&l)))
        .collect();
    let mut seen: Vec<&str> = Vec::new();
    let mut out = Vec::new();
    for (key, value) in &table {
        let long = key.replace('_', "-");
        let Some(arg) = settings
            .iter()
            .find(|a| a.get_long() == Some(long.as_str()))
        else {
            let names: Vec<&str> = settings.iter().filter_map(|a| a.get_long()).collect();
            return Err(format!(
                "unknown setting {key:?} (the settings are the long flags: {})",
                names.join(", ")
            ));
        };
        let long = arg.get_long().unwrap_or_default();
        if seen.contains(&long) {
            return Err(format!("{long:?} is set twice"));
        }
        seen.push(long);
        if on_command_line(arg.get_id().as_str()) {
            continue;
        }
        let flag = |v: &str| OsString::from(format!("--{long}={v}"));
        if !arg.get_action().takes_values() {
            match value {
                toml::Value::Boolean(true) => out.push(OsString::from(format!("--{long}"))),
                toml::Value::Boolean(false) => {}
                other => {
                    return Err(format!(
                        "{key:?} is a switch: true or false, not {}",
                        other.type_str()
                    ))
                }
            }
            continue;
        }
        let repeatable = matches!(arg.get_action(), ArgAction::Append);
        match value {
            toml::Value::Array(items) if repeatable => {
                for item in items {
                    out.push(flag(&scalar(key, item)?));
                }
            }
            toml::Value::Array(_) => {
                return Err(format!("{key:?} takes one value, not a list"));
            }
            v => out.push(flag(&scalar(key, v)?)),
        }
    }
    Ok(out)
}

/// A single value as the flag would be typed.
fn scalar(key: &str, v: &toml::Value) -> Result<String, String> {
    match v {
        toml::Value::String(s) => Ok(s.clone()),
        toml::Value::Integer(i) => Ok(i.to_string()),
        toml::Value::Float(f) => Ok(f.to_string()),
        toml::Value::Boolean(b) => Ok(b.to_string()),
        other => Err(format!(
            "{key:?}: expected a string or a number, not {}",
            other.type_str()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Arg;

    fn cmd() -> Command {
        Command::new("t")
            .arg(Arg::new("bind").long("bind").action(ArgAction::Append))
            .arg(Arg::new("workers").long("workers"))
            .arg(Arg::new("graceful_timeout").long("graceful-timeout"))
            .arg(
                Arg::new("lock_always")
                    .long("lock-always")
                    .action(ArgAction::SetTrue),
            )
            .arg(Arg::new("fault").long("fault").hide(true))
            .arg(Arg::new("config").long("config"))
    }

    fn file(text: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().expect("temp file");
        std::io::Write::write_all(&mut f, text.as_bytes()).expect("write");
        f
    }

    fn strings(v: Vec<OsString>) -> Vec<String> {
        v.into_iter()
            .map(|s| s.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn keys_become_the_flags_they_name() {
        let f = file(
            "bind = [\"127.0.0.1:0\", \"unix:/tmp/x.sock\"]\nworkers = 4\ngraceful_timeout = 2.5\nlock-always = true\n",
        );
        let got = strings(flags(f.path(), &cmd(), |_| false).expect("valid"));
        assert_eq!(
            got,
            [
                "--bind=127.0.0.1:0",
                "--bind=unix:/tmp/x.sock",
                "--graceful-timeout=2.5",
                "--lock-always",
                "--workers=4",
            ],
            "in key order, a list's values in its order"
        );
    }

    #[test]
    fn the_command_line_wins() {
        let f = file("workers = 4\nbind = \"127.0.0.1:0\"\n");
        let got = strings(flags(f.path(), &cmd(), |id| id == "workers").expect("valid"));
        assert_eq!(got, ["--bind=127.0.0.1:0"]);
    }

    #[test]
    fn a_false_switch_sets_nothing() {
        let f = file("lock-always = false\n");
        assert!(flags(f.path(), &cmd(), |_| false)
            .expect("valid")
            .is_empty());
    }

    #[test]
    fn mistakes_are_named() {
        let cases = [
            ("workers = 4\nworkers 5\n", "line 2"),
            ("wokers = 4\n", "unknown setting \"wokers\""),
            ("fault = \"boot-fail\"\n", "unknown setting \"fault\""),
            ("config = \"/x\"\n", "unknown setting \"config\""),
            ("workers = [1, 2]\n", "takes one value"),
            ("lock-always = \"yes\"\n", "is a switch"),
            ("workers = 4\nworkers_ = 1\n", "unknown setting"),
            ("workers = 4\n[pool]\nx = 1\n", "unknown setting \"pool\""),
            ("bind = { a = 1 }\n", "expected a string or a number"),
            ("workers = 4\nWORKERS = 4\n", "unknown setting \"WORKERS\""),
            ("graceful-timeout = 1\ngraceful_timeout = 2\n", "set twice"),
        ];
        for (text, want) in cases {
            let f = file(text);
            let err = flags(f.path(), &cmd(), |_| false).expect_err(text);
            assert!(err.contains(want), "{text:?}: {err}");
            assert!(!err.contains('\n'), "one line: {err}");
        }
        let missing = flags(Path::new("/nonexistent/prefork.toml"), &cmd(), |_| false)
            .expect_err("missing file");
        assert!(missing.contains("No such file"), "{missing}");
    }
}
