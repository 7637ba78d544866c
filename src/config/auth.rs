//! Access tokens and the roles they carry. Tokens are stored as SHA-256 digests, never in
//! clear; `flagstream hash-token` prints the digest to paste into the configuration.

use std::fmt;
use std::str::FromStr;

use sha2::{Digest, Sha256};
use toml::Value;

use super::value::ConfigValue;

/// What a token may do. `admin` may do everything.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// App installations: ingest and flag evaluation.
    Client,
    /// The product team: SQL, experiments, cohorts.
    Analyst,
    /// Privacy officers: consent ledger and data-subject requests.
    Privacy,
    /// Operators: everything.
    Admin,
}

impl Role {
    /// Returns the role's configuration name.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Client => "client",
            Role::Analyst => "analyst",
            Role::Privacy => "privacy",
            Role::Admin => "admin",
        }
    }

    /// Returns whether a holder of `self` may use an endpoint that requires `required`.
    pub fn permits(self, required: Role) -> bool {
        self == Role::Admin || self == required
    }
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "client" => Ok(Role::Client),
            "analyst" => Ok(Role::Analyst),
            "privacy" => Ok(Role::Privacy),
            "admin" => Ok(Role::Admin),
            other => Err(format!(
                "unknown role {other:?} (client, analyst, privacy or admin)"
            )),
        }
    }
}

/// The SHA-256 digest of a token.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct TokenHash(pub [u8; 32]);

impl TokenHash {
    /// Returns the digest of a presented token.
    pub fn of(token: &str) -> Self {
        Self(Sha256::digest(token.as_bytes()).into())
    }

    /// Returns the digest as lowercase hex.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl fmt::Debug for TokenHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.to_hex())
    }
}

impl FromStr for TokenHash {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.len() != 64 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err("sha256 must be 64 hexadecimal characters".into());
        }
        let mut digest = [0u8; 32];
        for (i, byte) in digest.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16)
                .map_err(|_| "sha256 must be hexadecimal".to_string())?;
        }
        Ok(Self(digest))
    }
}

/// One configured access token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenConfig {
    /// A label for logs and the audit trail (never the token itself).
    pub name: String,
    /// What the token may do.
    pub role: Role,
    /// SHA-256 of the token.
    pub sha256: TokenHash,
}

impl TokenConfig {
    fn parse_one(value: &Value) -> Result<Self, String> {
        let table = value
            .as_table()
            .ok_or("each token is a table with name, role and sha256")?;
        for key in table.keys() {
            if !matches!(key.as_str(), "name" | "role" | "sha256") {
                return Err(format!("unknown token key {key:?}"));
            }
        }
        let field = |key: &str| {
            table
                .get(key)
                .and_then(Value::as_str)
                .ok_or_else(|| format!("token needs a string {key:?}"))
        };
        let name = field("name")?.to_owned();
        if name.is_empty() {
            return Err("token name must not be empty".into());
        }
        let role = field("role").and_then(|r| r.parse::<Role>());
        let sha256 = field("sha256").and_then(|h| h.parse::<TokenHash>());
        match (role, sha256) {
            (Ok(role), Ok(sha256)) => Ok(Self { name, role, sha256 }),
            (role, sha256) => {
                let problems: Vec<String> =
                    [role.err(), sha256.err()].into_iter().flatten().collect();
                Err(format!("token {name:?}: {}", problems.join(", ")))
            }
        }
    }
}

impl ConfigValue for Vec<TokenConfig> {
    const KIND: &'static str = "array of {name, role, sha256}";
    fn parse(value: &Value) -> Result<Self, String> {
        // From the environment: an inline TOML array of tables.
        let array = super::value::inline_array(value)?;
        let mut tokens = Vec::with_capacity(array.len());
        let mut problems = Vec::new();
        for (i, item) in array.iter().enumerate() {
            match TokenConfig::parse_one(item) {
                Ok(token) => tokens.push(token),
                Err(e) => problems.push(format!("[{i}] {e}")),
            }
        }
        if problems.is_empty() {
            Ok(tokens)
        } else {
            Err(problems.join("; "))
        }
    }
    fn render(&self) -> Value {
        Value::Array(
            self.iter()
                .map(|t| {
                    let mut table = toml::Table::new();
                    table.insert("name".into(), Value::String(t.name.clone()));
                    table.insert("role".into(), Value::String(t.role.as_str().into()));
                    table.insert("sha256".into(), Value::String(t.sha256.to_hex()));
                    Value::Table(table)
                })
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_permits_everything_and_others_only_themselves() {
        assert!(Role::Admin.permits(Role::Privacy));
        assert!(Role::Analyst.permits(Role::Analyst));
        assert!(!Role::Client.permits(Role::Analyst));
        assert!(!Role::Analyst.permits(Role::Admin));
    }

    #[test]
    fn token_hash_round_trips_through_hex() {
        let hash = TokenHash::of("s3cret");
        assert_eq!(hash.to_hex().parse::<TokenHash>().unwrap(), hash);
        assert!("abc".parse::<TokenHash>().is_err());
        assert!("z".repeat(64).parse::<TokenHash>().is_err());
    }

    #[test]
    fn every_bad_token_is_reported() {
        let value: Value = toml::from_str::<toml::Table>(
            r#"t = [{name = "a", role = "root", sha256 = "00"}, {name = "b"}]"#,
        )
        .unwrap()["t"]
            .clone();
        let err = Vec::<TokenConfig>::parse(&value).unwrap_err();
        assert!(err.contains("[0]") && err.contains("unknown role"), "{err}");
        assert!(err.contains("[1]") && err.contains("\"role\""), "{err}");
    }
}
