//! Typed configuration values: how each kind of setting is read from TOML or from an
//! environment string, how it is shown back (secrets redacted), and how `docs/config.md`
//! names its type.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use toml::Value;

/// A value that can appear in the configuration file or an environment variable.
pub trait ConfigValue: Sized {
    /// How `docs/config.md` names the type.
    const KIND: &'static str;

    /// Reads the value; environment variables arrive as `Value::String`.
    fn parse(value: &Value) -> Result<Self, String>;

    /// Shows the value as `flagstream config` prints it; secrets come out redacted.
    fn render(&self) -> Value;
}

fn as_str<'a>(value: &'a Value, expected: &str) -> Result<&'a str, String> {
    value
        .as_str()
        .ok_or_else(|| format!("expected {expected}, found {}", value.type_str()))
}

fn parse_from_str<T: FromStr>(value: &Value, expected: &str) -> Result<T, String>
where
    T::Err: fmt::Display,
{
    let text = as_str(value, expected)?;
    text.trim()
        .parse()
        .map_err(|err| format!("invalid {expected} {text:?}: {err}"))
}

impl ConfigValue for SocketAddr {
    const KIND: &'static str = "socket address";
    fn parse(value: &Value) -> Result<Self, String> {
        parse_from_str(value, "socket address (host:port)")
    }
    fn render(&self) -> Value {
        Value::String(self.to_string())
    }
}

impl ConfigValue for PathBuf {
    const KIND: &'static str = "path";
    fn parse(value: &Value) -> Result<Self, String> {
        let text = as_str(value, "path")?;
        if text.is_empty() {
            return Err("path must not be empty".into());
        }
        Ok(PathBuf::from(text))
    }
    fn render(&self) -> Value {
        Value::String(self.display().to_string())
    }
}

impl ConfigValue for String {
    const KIND: &'static str = "string";
    fn parse(value: &Value) -> Result<Self, String> {
        as_str(value, "string").map(str::to_owned)
    }
    fn render(&self) -> Value {
        Value::String(self.clone())
    }
}

/// Reads an array, also from an environment string holding an inline TOML array such as
/// `["a", "b"]`.
pub(crate) fn inline_array(value: &Value) -> Result<std::borrow::Cow<'_, [Value]>, String> {
    match value {
        Value::Array(array) => Ok(std::borrow::Cow::Borrowed(array.as_slice())),
        Value::String(text) => {
            let mut parsed = toml::from_str::<toml::Table>(&format!("list = {text}"))
                .map_err(|e| format!("invalid inline array: {}", e.message()))?;
            match parsed.remove("list") {
                Some(Value::Array(array)) => Ok(std::borrow::Cow::Owned(array)),
                _ => Err("expected an array".into()),
            }
        }
        other => Err(format!("expected array, found {}", other.type_str())),
    }
}

/// Reads every table of an array with `parse_one`, reporting every bad one by its index.
pub(crate) fn parse_tables<T>(
    value: &Value,
    parse_one: impl Fn(&Value) -> Result<T, String>,
) -> Result<Vec<T>, String> {
    let array = inline_array(value)?;
    let mut parsed = Vec::with_capacity(array.len());
    let mut problems = Vec::new();
    for (i, item) in array.iter().enumerate() {
        match parse_one(item) {
            Ok(one) => parsed.push(one),
            Err(e) => problems.push(format!("[{i}] {e}")),
        }
    }
    if problems.is_empty() {
        Ok(parsed)
    } else {
        Err(problems.join("; "))
    }
}

impl ConfigValue for Vec<String> {
    const KIND: &'static str = "array of strings";
    fn parse(value: &Value) -> Result<Self, String> {
        inline_array(value)?
            .iter()
            .map(|item| as_str(item, "string").map(str::to_owned))
            .collect()
    }
    fn render(&self) -> Value {
        Value::Array(self.iter().cloned().map(Value::String).collect())
    }
}

impl ConfigValue for bool {
    const KIND: &'static str = "boolean";
    fn parse(value: &Value) -> Result<Self, String> {
        match value {
            Value::Boolean(b) => Ok(*b),
            Value::String(s) => match s.trim() {
                "true" | "1" | "yes" | "on" => Ok(true),
                "false" | "0" | "no" | "off" => Ok(false),
                other => Err(format!("invalid boolean {other:?}")),
            },
            other => Err(format!("expected boolean, found {}", other.type_str())),
        }
    }
    fn render(&self) -> Value {
        Value::Boolean(*self)
    }
}

impl ConfigValue for usize {
    const KIND: &'static str = "integer";
    fn parse(value: &Value) -> Result<Self, String> {
        match value {
            Value::Integer(i) => {
                usize::try_from(*i).map_err(|_| format!("{i} is not a non-negative integer"))
            }
            Value::String(_) => parse_from_str(value, "non-negative integer"),
            other => Err(format!("expected integer, found {}", other.type_str())),
        }
    }
    fn render(&self) -> Value {
        Value::Integer(i64::try_from(*self).unwrap_or(i64::MAX))
    }
}

impl ConfigValue for Duration {
    const KIND: &'static str = "duration";
    fn parse(value: &Value) -> Result<Self, String> {
        let text = as_str(value, "duration such as \"500ms\", \"30s\" or \"7d\"")?;
        humantime::parse_duration(text.trim())
            .map_err(|err| format!("invalid duration {text:?}: {err}"))
    }
    fn render(&self) -> Value {
        Value::String(humantime::format_duration(*self).to_string())
    }
}

impl<T: ConfigValue> ConfigValue for Option<T> {
    const KIND: &'static str = T::KIND;
    fn parse(value: &Value) -> Result<Self, String> {
        match value {
            Value::String(s) if s.is_empty() || s == "none" => Ok(None),
            other => T::parse(other).map(Some),
        }
    }
    fn render(&self) -> Value {
        match self {
            Some(inner) => inner.render(),
            None => Value::String("none".into()),
        }
    }
}

/// A size in bytes, written as `512`, `64KiB`, `2MiB` or `1GiB`.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// Returns the size as `usize`, saturating on 32-bit targets.
    pub fn as_usize(self) -> usize {
        usize::try_from(self.0).unwrap_or(usize::MAX)
    }

    /// Builds a size from mebibytes.
    pub const fn mib(n: u64) -> Self {
        Self(n * 1024 * 1024)
    }

    /// Builds a size from kibibytes.
    pub const fn kib(n: u64) -> Self {
        Self(n * 1024)
    }
}

impl fmt::Debug for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(&str, u64); 3] = [("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)];
        for (unit, size) in UNITS {
            if self.0 >= size && self.0.is_multiple_of(size) {
                return write!(f, "{}{unit}", self.0 / size);
            }
        }
        write!(f, "{}B", self.0)
    }
}

impl FromStr for ByteSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (digits, unit) = s.split_at(split);
        let number: u64 = digits
            .parse()
            .map_err(|_| "expected a number followed by B, KiB, MiB or GiB".to_string())?;
        let multiplier: u64 = match unit.trim() {
            "" | "B" => 1,
            "KiB" | "KB" | "k" | "K" => 1 << 10,
            "MiB" | "MB" | "M" => 1 << 20,
            "GiB" | "GB" | "G" => 1 << 30,
            other => return Err(format!("unknown unit {other:?} (use B, KiB, MiB or GiB)")),
        };
        number
            .checked_mul(multiplier)
            .map(ByteSize)
            .ok_or_else(|| "size overflows 64 bits".to_string())
    }
}

impl ConfigValue for ByteSize {
    const KIND: &'static str = "byte size";
    fn parse(value: &Value) -> Result<Self, String> {
        match value {
            Value::Integer(i) => u64::try_from(*i)
                .map(ByteSize)
                .map_err(|_| format!("{i} is not a size")),
            Value::String(_) => parse_from_str(value, "byte size"),
            other => Err(format!("expected byte size, found {}", other.type_str())),
        }
    }
    fn render(&self) -> Value {
        Value::String(self.to_string())
    }
}

/// A Redis connection URL. Its password never appears in `Debug`, logs or `flagstream config`.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisUrl(String);

impl RedisUrl {
    /// Returns the URL with its password, for the Redis client only.
    pub fn expose(&self) -> &str {
        &self.0
    }

    fn redacted(&self) -> String {
        let Some((scheme, rest)) = self.0.split_once("://") else {
            return "[redacted]".into();
        };
        match rest.split_once('@') {
            Some((userinfo, host)) => {
                let user = userinfo.split(':').next().unwrap_or("");
                format!("{scheme}://{user}:[redacted]@{host}")
            }
            None => self.0.clone(),
        }
    }
}

impl fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl FromStr for RedisUrl {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        const SCHEMES: [&str; 4] = ["redis://", "rediss://", "unix://", "redis+unix://"];
        if !SCHEMES.iter().any(|scheme| s.starts_with(scheme)) {
            return Err("must start with redis://, rediss://, unix:// or redis+unix://".into());
        }
        Ok(Self(s.to_owned()))
    }
}

impl ConfigValue for RedisUrl {
    const KIND: &'static str = "Redis URL";
    fn parse(value: &Value) -> Result<Self, String> {
        parse_from_str(value, "Redis URL")
    }
    fn render(&self) -> Value {
        Value::String(self.redacted())
    }
}

/// A secret string: shown as `[redacted]` in `Debug`, logs and `flagstream config`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret (tests and programs that build a configuration).
    pub fn new(secret: impl Into<String>) -> Self {
        Self(secret.into())
    }

    /// Returns the secret itself, for the one place that uses it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl ConfigValue for Secret {
    const KIND: &'static str = "secret string";
    fn parse(value: &Value) -> Result<Self, String> {
        as_str(value, "string").map(|s| Secret(s.to_owned()))
    }
    fn render(&self) -> Value {
        Value::String("[redacted]".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_sizes_parse_and_print_in_binary_units() {
        assert_eq!("2MiB".parse::<ByteSize>().unwrap(), ByteSize::mib(2));
        assert_eq!("32 KiB".parse::<ByteSize>().unwrap(), ByteSize::kib(32));
        assert_eq!("100".parse::<ByteSize>().unwrap(), ByteSize(100));
        assert_eq!(ByteSize::mib(2).to_string(), "2MiB");
        assert_eq!(ByteSize(1500).to_string(), "1500B");
        assert!("12 parsecs".parse::<ByteSize>().is_err());
        assert!("99999999999999GiB".parse::<ByteSize>().is_err());
    }

    #[test]
    fn redis_password_is_redacted_everywhere_it_is_shown() {
        let url: RedisUrl = "redis://app:hunter2@cache:6379/0".parse().unwrap();
        assert_eq!(format!("{url:?}"), "redis://app:[redacted]@cache:6379/0");
        assert_eq!(
            url.render(),
            Value::String("redis://app:[redacted]@cache:6379/0".into())
        );
        assert_eq!(url.expose(), "redis://app:hunter2@cache:6379/0");
        assert!("http://cache".parse::<RedisUrl>().is_err());
    }

    #[test]
    fn environment_strings_parse_as_typed_values() {
        let s = |v: &str| Value::String(v.into());
        assert_eq!(usize::parse(&s("64")).unwrap(), 64);
        assert!(usize::parse(&s("-1")).is_err());
        assert!(bool::parse(&s("on")).unwrap());
        assert_eq!(
            Duration::parse(&s("1m 30s")).unwrap(),
            Duration::from_secs(90)
        );
        assert_eq!(Option::<SocketAddr>::parse(&s("none")).unwrap(), None);
    }
}
