//! The one parser for `key=value,key=value` options (`--disk`, `--net`).

use std::collections::BTreeMap;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("{option} {input:?}: {what}")]
    Invalid {
        option: &'static str,
        input: String,
        what: String,
    },
}

/// Parsed options: each known key at most once.
pub struct Options {
    option: &'static str,
    input: String,
    values: BTreeMap<String, String>,
}

impl Options {
    /// Parses `input` for `option` (e.g. "--disk"), accepting only `known` keys.
    pub fn parse(option: &'static str, input: &str, known: &[&str]) -> Result<Self, Error> {
        let mut opts = Self {
            option,
            input: input.into(),
            values: BTreeMap::new(),
        };
        for item in input.split(',') {
            let Some((k, v)) = item.split_once('=') else {
                return Err(opts.err(format!("expected key=value, found {item:?}")));
            };
            if !known.contains(&k) {
                return Err(opts.err(format!("unknown key {k:?} (known: {})", known.join(", "))));
            }
            if v.is_empty() {
                return Err(opts.err(format!("{k}= needs a value")));
            }
            if opts.values.insert(k.into(), v.into()).is_some() {
                return Err(opts.err(format!("{k} given twice")));
            }
        }
        Ok(opts)
    }

    pub fn err(&self, what: String) -> Error {
        Error::Invalid {
            option: self.option,
            input: self.input.clone(),
            what,
        }
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.values.get(key).map(String::as_str)
    }

    pub fn required(&self, key: &str) -> Result<&str, Error> {
        self.get(key)
            .ok_or_else(|| self.err(format!("{key}= is required")))
    }

    /// An on/off switch, off when absent.
    pub fn switch(&self, key: &str) -> Result<bool, Error> {
        match self.get(key) {
            None | Some("off") => Ok(false),
            Some("on") => Ok(true),
            Some(other) => Err(self.err(format!("{key}= takes on or off, not {other:?}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_known_keys() {
        let o =
            Options::parse("--disk", "path=/a.img,ro=on,id=root", &["path", "ro", "id"]).unwrap();
        assert_eq!(o.required("path"), Ok("/a.img"));
        assert_eq!(o.switch("ro"), Ok(true));
        assert_eq!(o.switch("direct"), Ok(false));
        assert_eq!(o.get("id"), Some("root"));
    }

    #[test]
    fn rejects_malformed_input() {
        let known = &["path", "ro"];
        for bad in [
            "",
            "path",
            "path=",
            "size=1",
            "path=a,path=b",
            "path=a,,ro=on",
        ] {
            assert!(Options::parse("--disk", bad, known).is_err(), "{bad:?}");
        }
        let o = Options::parse("--disk", "ro=yes", known).unwrap();
        assert!(o.switch("ro").is_err());
        assert!(o.required("path").is_err());
    }

    #[test]
    fn errors_name_the_option_and_the_input() {
        let e = Options::parse("--net", "tap=t0,speed=10", &["tap"])
            .err()
            .unwrap();
        let msg = e.to_string();
        assert!(
            msg.starts_with("--net \"tap=t0,speed=10\": unknown key \"speed\""),
            "{msg}"
        );
    }
}
