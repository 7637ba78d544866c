//! Access tokens and the roles they carry. Tokens are stored as SHA-256 digests, never in
//! clear; `flagstream hash-token` prints the digest to paste into the configuration.

use std::fmt;
use std::str::FromStr;

use sha2::{Digest, Sha256};
use toml::Value;

use super::value::ConfigValue;

/// What a caller may do. `admin` may do everything. The first four are the roles of static
/// tokens (app installations and operators); the others come from OpenID Connect tokens,
/// with the relations their claims carry (see `identity`).
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
    /// A parent or legal guardian: acts for the children their token names.
    Guardian,
    /// A teacher: sees the classes and the roster their token names.
    Teacher,
    /// A school's head or office: files requests for and reads aggregates of their school.
    SchoolAdmin,
    /// A researcher: aggregates only, over all schools.
    Researcher,
}

impl Role {
    /// Every role, in the order the documentation lists them.
    pub const ALL: [Role; 8] = [
        Role::Client,
        Role::Analyst,
        Role::Privacy,
        Role::Admin,
        Role::Guardian,
        Role::Teacher,
        Role::SchoolAdmin,
        Role::Researcher,
    ];

    /// Returns the role's configuration name.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Client => "client",
            Role::Analyst => "analyst",
            Role::Privacy => "privacy",
            Role::Admin => "admin",
            Role::Guardian => "guardian",
            Role::Teacher => "teacher",
            Role::SchoolAdmin => "school_admin",
            Role::Researcher => "researcher",
        }
    }

    /// Returns whether a holder of `self` may use an endpoint that requires `required`.
    pub fn permits(self, required: Role) -> bool {
        self == Role::Admin || self == required
    }

    /// Whether a static token may carry this role (the others need a verified identity).
    pub fn is_static(self) -> bool {
        matches!(
            self,
            Role::Client | Role::Analyst | Role::Privacy | Role::Admin
        )
    }
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL
            .into_iter()
            .find(|role| role.as_str() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Role::ALL.iter().map(|r| r.as_str()).collect();
                format!("unknown role {s:?} ({})", names.join(", "))
            })
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

/// The context keys a token's scope may name.
pub const SCOPE_KEYS: [&str; 2] = ["school_id", "class_id"];

/// What a scoped token sees: only the events whose context `key` (a school or a class) is
/// `value`, and only aggregates over groups of enough children.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TokenScope {
    /// `school_id` or `class_id`.
    pub key: &'static str,
    /// The school's or class's id.
    pub value: String,
}

impl FromStr for TokenScope {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (key, value) = s
            .split_once('=')
            .ok_or("a scope is `school_id=<id>` or `class_id=<id>`")?;
        let key = SCOPE_KEYS
            .iter()
            .find(|k| **k == key.trim())
            .ok_or_else(|| format!("a scope names school_id or class_id, not {key:?}"))?;
        let value = value.trim();
        if value.is_empty() || value.len() > 128 {
            return Err("a scope's id must have 1 to 128 characters".into());
        }
        Ok(Self {
            key,
            value: value.to_owned(),
        })
    }
}

impl fmt::Display for TokenScope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.key, self.value)
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
    /// For an analyst token of school staff: the school or class it is limited to.
    pub scope: Option<TokenScope>,
    /// For a client key: the project (app) it belongs to; `default` when not set.
    pub project: Option<String>,
}

/// The project of client keys that name none.
pub const DEFAULT_PROJECT: &str = "default";

/// Checks a project name: 1 to 64 of `a-z`, `0-9`, `-` and `_`.
pub fn check_project(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "project {name:?} must be 1 to 64 of a-z, 0-9, '-' and '_'"
        ))
    }
}

impl TokenConfig {
    fn parse_one(value: &Value) -> Result<Self, String> {
        let table = value
            .as_table()
            .ok_or("each token is a table with name, role and sha256 (and scope)")?;
        for key in table.keys() {
            if !matches!(
                key.as_str(),
                "name" | "role" | "sha256" | "scope" | "project"
            ) {
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
        let role = field("role")
            .and_then(|r| r.parse::<Role>())
            .and_then(|role| {
                if role.is_static() {
                    Ok(role)
                } else {
                    Err(format!(
                        "role {} comes from a signed-in identity ([[auth.oidc]]), not a static token",
                        role.as_str()
                    ))
                }
            });
        let sha256 = field("sha256").and_then(|h| h.parse::<TokenHash>());
        let scope = match table.get("scope") {
            None => Ok(None),
            Some(value) => value
                .as_str()
                .ok_or_else(|| "scope must be a string".to_owned())
                .and_then(|s| s.parse::<TokenScope>())
                .map(Some),
        };
        let scope = match (&role, scope) {
            (Ok(role), Ok(Some(_))) if *role != Role::Analyst => {
                Err("only analyst tokens may carry a scope".to_owned())
            }
            (_, scope) => scope,
        };
        let project = match table.get("project") {
            None => Ok(None),
            Some(value) => value
                .as_str()
                .ok_or_else(|| "project must be a string".to_owned())
                .and_then(|p| check_project(p).map(|()| Some(p.to_owned()))),
        };
        let project = match (&role, project) {
            (Ok(role), Ok(Some(_))) if *role != Role::Client => {
                Err("only client keys belong to a project".to_owned())
            }
            (_, project) => project,
        };
        match (role, sha256, scope, project) {
            (Ok(role), Ok(sha256), Ok(scope), Ok(project)) => Ok(Self {
                name,
                role,
                sha256,
                scope,
                project,
            }),
            (role, sha256, scope, project) => {
                let problems: Vec<String> = [role.err(), sha256.err(), scope.err(), project.err()]
                    .into_iter()
                    .flatten()
                    .collect();
                Err(format!("token {name:?}: {}", problems.join(", ")))
            }
        }
    }
}

impl ConfigValue for Vec<TokenConfig> {
    const KIND: &'static str = "array of {name, role, sha256, scope, project}";
    fn parse(value: &Value) -> Result<Self, String> {
        // From the environment: an inline TOML array of tables.
        super::value::parse_tables(value, TokenConfig::parse_one)
    }
    fn render(&self) -> Value {
        Value::Array(
            self.iter()
                .map(|t| {
                    let mut table = toml::Table::new();
                    table.insert("name".into(), Value::String(t.name.clone()));
                    table.insert("role".into(), Value::String(t.role.as_str().into()));
                    table.insert("sha256".into(), Value::String(t.sha256.to_hex()));
                    if let Some(scope) = &t.scope {
                        table.insert("scope".into(), Value::String(scope.to_string()));
                    }
                    if let Some(project) = &t.project {
                        table.insert("project".into(), Value::String(project.clone()));
                    }
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

    #[test]
    fn only_analyst_tokens_carry_a_school_or_class_scope() {
        let parse = |text: &str| {
            let value =
                toml::from_str::<toml::Table>(&format!("t = [{text}]")).unwrap()["t"].clone();
            Vec::<TokenConfig>::parse(&value)
        };
        let hash = "0".repeat(64);
        let tokens = parse(&format!(
            r#"{{name = "teacher", role = "analyst", sha256 = "{hash}", scope = "class_id=4B"}}"#
        ))
        .unwrap();
        assert_eq!(
            tokens[0].scope,
            Some(TokenScope {
                key: "class_id",
                value: "4B".into()
            })
        );
        assert_eq!(
            Vec::<TokenConfig>::parse(&tokens.render()).unwrap(),
            tokens,
            "round trip"
        );
        let app = parse(&format!(
            r#"{{name = "app", role = "client", sha256 = "{hash}", project = "reading-app"}}"#
        ))
        .unwrap();
        assert_eq!(app[0].project.as_deref(), Some("reading-app"));
        assert_eq!(Vec::<TokenConfig>::parse(&app.render()).unwrap(), app);
        for (bad, why) in [
            (r#"role = "client", scope = "school_id=s1""#, "only analyst"),
            (
                r#"role = "analyst", scope = "country=BR""#,
                "school_id or class_id",
            ),
            (r#"role = "analyst", scope = "school_id=""#, "1 to 128"),
            (r#"role = "analyst", scope = "school_id""#, "a scope is"),
            (r#"role = "analyst", scope = 7"#, "must be a string"),
            (r#"role = "analyst", project = "app""#, "only client keys"),
            (r#"role = "client", project = "Reading App""#, "a-z, 0-9"),
            (r#"role = "guardian""#, "signed-in identity"),
            (r#"role = "researcher""#, "signed-in identity"),
        ] {
            let err = parse(&format!(r#"{{name = "t", sha256 = "{hash}", {bad}}}"#)).unwrap_err();
            assert!(err.contains(why), "{bad}: {err}");
        }
    }
}
