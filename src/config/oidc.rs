//! OpenID Connect issuers whose access tokens flagstream accepts (`[[auth.oidc]]`): where the
//! issuer is, which audience and algorithms a token must have, and which claims carry the
//! role and the relations (claim names differ between identity providers).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use toml::Value;

use super::auth::Role;
use super::value::{ConfigValue, parse_tables};

/// The signature algorithms an issuer may be allowed: asymmetric only, so that no key
/// flagstream can read (a published public key) can ever make a valid signature.
pub const ALGORITHMS: [&str; 9] = [
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA",
];

/// The largest clock leeway an issuer may be given.
pub const MAX_LEEWAY: Duration = Duration::from_secs(300);

/// Which claims of an access token say what.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClaimNames {
    /// The claim holding the role (a string or an array of strings); a dotted path such as
    /// `realm_access.roles` reaches into objects (Keycloak).
    pub role: String,
    /// A guardian's children: their user ids, as the app sends them in events.
    pub children: String,
    /// A teacher's classes.
    pub classes: String,
    /// The children on a teacher's roster.
    pub roster: String,
    /// A school admin's school.
    pub school: String,
}

impl Default for ClaimNames {
    fn default() -> Self {
        Self {
            role: "flagstream_role".into(),
            children: "children".into(),
            classes: "classes".into(),
            roster: "roster".into(),
            school: "school".into(),
        }
    }
}

/// One trusted issuer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OidcIssuerConfig {
    /// The issuer identifier: its discovery document is at
    /// `<issuer>/.well-known/openid-configuration`, and tokens carry it as `iss`.
    pub issuer: String,
    /// The `aud` a token must carry (flagstream's resource or client id at that issuer).
    pub audience: String,
    /// The signature algorithms accepted (asymmetric only).
    pub algorithms: Vec<String>,
    /// Clock leeway for `exp` and `nbf`.
    pub leeway: Duration,
    /// How often the issuer's keys are fetched again on schedule.
    pub jwks_refresh: Duration,
    /// The shortest wait between two fetches caused by tokens with an unknown key id.
    pub jwks_min_interval: Duration,
    /// Which claims say what.
    pub claims: ClaimNames,
    /// Role claim values mapped to flagstream roles (`parent = "guardian"`); a value that
    /// is a role's own name needs no entry.
    pub roles: BTreeMap<String, Role>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    issuer: String,
    audience: String,
    #[serde(default)]
    algorithms: Option<Vec<String>>,
    #[serde(default)]
    leeway: Option<String>,
    #[serde(default)]
    jwks_refresh: Option<String>,
    #[serde(default)]
    jwks_min_interval: Option<String>,
    #[serde(default)]
    claims: Option<ClaimNames>,
    #[serde(default)]
    roles: Option<BTreeMap<String, String>>,
}

fn duration(name: &str, text: Option<&str>, default: Duration) -> Result<Duration, String> {
    match text {
        None => Ok(default),
        Some(text) => humantime::parse_duration(text.trim())
            .map_err(|err| format!("{name}: invalid duration {text:?}: {err}")),
    }
}

impl OidcIssuerConfig {
    fn parse_one(value: &Value) -> Result<Self, String> {
        let raw: Raw = value.clone().try_into().map_err(|err: toml::de::Error| {
            format!(
                "an issuer is a table {{issuer, audience, algorithms, leeway, jwks_refresh, \
                 jwks_min_interval, claims, roles}}: {}",
                err.message()
            )
        })?;
        let mut problems = Vec::new();
        let issuer = raw.issuer.trim_end_matches('/').to_owned();
        if let Err(problem) = check_issuer_url(&issuer) {
            problems.push(problem);
        }
        if raw.audience.trim().is_empty() {
            problems.push("audience must not be empty".to_owned());
        }
        let algorithms = raw.algorithms.unwrap_or_else(|| vec!["RS256".to_owned()]);
        if algorithms.is_empty() {
            problems.push("algorithms must name at least one algorithm".to_owned());
        }
        for algorithm in &algorithms {
            if !ALGORITHMS.contains(&algorithm.as_str()) {
                problems.push(format!(
                    "algorithm {algorithm:?} is not allowed (one of {})",
                    ALGORITHMS.join(", ")
                ));
            }
        }
        let durations = [
            ("leeway", raw.leeway, Duration::from_secs(30)),
            ("jwks_refresh", raw.jwks_refresh, Duration::from_secs(3600)),
            (
                "jwks_min_interval",
                raw.jwks_min_interval,
                Duration::from_secs(10),
            ),
        ]
        .map(|(name, text, default)| {
            duration(name, text.as_deref(), default).unwrap_or_else(|problem| {
                problems.push(problem);
                default
            })
        });
        let [leeway, jwks_refresh, jwks_min_interval] = durations;
        if leeway > MAX_LEEWAY {
            problems.push("leeway must be at most 5m".to_owned());
        }
        if jwks_refresh.is_zero() || jwks_min_interval.is_zero() {
            problems.push("jwks_refresh and jwks_min_interval must be more than zero".to_owned());
        }
        let mut roles = BTreeMap::new();
        for (value, role) in raw.roles.unwrap_or_default() {
            match role.parse::<Role>() {
                Ok(role) => {
                    roles.insert(value, role);
                }
                Err(problem) => problems.push(format!("roles.{value}: {problem}")),
            }
        }
        let claims = raw.claims.unwrap_or_default();
        if problems.is_empty() {
            Ok(Self {
                issuer,
                audience: raw.audience,
                algorithms,
                leeway,
                jwks_refresh,
                jwks_min_interval,
                claims,
                roles,
            })
        } else {
            Err(format!("issuer {:?}: {}", raw.issuer, problems.join(", ")))
        }
    }

    fn render_one(&self) -> Value {
        let humane = |d: &Duration| humantime::format_duration(*d).to_string();
        let raw = Raw {
            issuer: self.issuer.clone(),
            audience: self.audience.clone(),
            algorithms: Some(self.algorithms.clone()),
            leeway: Some(humane(&self.leeway)),
            jwks_refresh: Some(humane(&self.jwks_refresh)),
            jwks_min_interval: Some(humane(&self.jwks_min_interval)),
            claims: Some(self.claims.clone()),
            roles: Some(
                self.roles
                    .iter()
                    .map(|(value, role)| (value.clone(), role.as_str().to_owned()))
                    .collect(),
            ),
        };
        Value::try_from(raw).expect("an issuer renders as TOML")
    }
}

/// An issuer must be `https://`, or `http://` on a loopback address (tests, a local
/// provider): tokens are checked against keys fetched from it.
fn check_issuer_url(issuer: &str) -> Result<(), String> {
    if let Some(rest) = issuer.strip_prefix("https://") {
        if rest.is_empty() {
            return Err("issuer must name a host".to_owned());
        }
        return Ok(());
    }
    if let Some(rest) = issuer.strip_prefix("http://") {
        let host = rest.split(['/', ':']).next().unwrap_or_default();
        let host = if rest.starts_with('[') {
            rest.split(']')
                .next()
                .unwrap_or_default()
                .trim_start_matches('[')
        } else {
            host
        };
        let loopback = host == "localhost"
            || host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        if loopback {
            return Ok(());
        }
        return Err(format!(
            "issuer {issuer:?} must use https (plain http only on a loopback address)"
        ));
    }
    Err(format!("issuer {issuer:?} must be an https:// URL"))
}

impl ConfigValue for Vec<OidcIssuerConfig> {
    const KIND: &'static str = "array of {issuer, audience, algorithms, leeway, jwks_refresh, jwks_min_interval, claims, roles}";
    fn parse(value: &Value) -> Result<Self, String> {
        parse_tables(value, OidcIssuerConfig::parse_one)
    }
    fn render(&self) -> Value {
        Value::Array(self.iter().map(OidcIssuerConfig::render_one).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Vec<OidcIssuerConfig>, String> {
        let value = toml::from_str::<toml::Table>(&format!("t = [{text}]")).unwrap()["t"].clone();
        Vec::<OidcIssuerConfig>::parse(&value)
    }

    #[test]
    fn an_issuer_takes_defaults_and_round_trips() {
        let issuers = parse(
            r#"{issuer = "https://idp.example/realms/school/", audience = "flagstream",
                roles = {parent = "guardian"}, claims = {role = "realm_access.roles"}}"#,
        )
        .unwrap();
        let issuer = &issuers[0];
        assert_eq!(issuer.issuer, "https://idp.example/realms/school");
        assert_eq!(issuer.algorithms, ["RS256"]);
        assert_eq!(issuer.leeway, Duration::from_secs(30));
        assert_eq!(issuer.claims.role, "realm_access.roles");
        assert_eq!(issuer.claims.children, "children");
        assert_eq!(issuer.roles["parent"], Role::Guardian);
        assert_eq!(
            Vec::<OidcIssuerConfig>::parse(&issuers.render()).unwrap(),
            issuers
        );
    }

    #[test]
    fn every_bad_issuer_setting_is_reported() {
        for (bad, why) in [
            (
                r#"issuer = "http://idp.example", audience = "a""#,
                "must use https",
            ),
            (r#"issuer = "ftp://idp", audience = "a""#, "https:// URL"),
            (r#"issuer = "https://idp", audience = """#, "audience"),
            (
                r#"issuer = "https://idp", audience = "a", algorithms = ["HS256"]"#,
                "not allowed",
            ),
            (
                r#"issuer = "https://idp", audience = "a", algorithms = ["none"]"#,
                "not allowed",
            ),
            (
                r#"issuer = "https://idp", audience = "a", algorithms = []"#,
                "at least one",
            ),
            (
                r#"issuer = "https://idp", audience = "a", leeway = "1h""#,
                "at most 5m",
            ),
            (
                r#"issuer = "https://idp", audience = "a", leeway = "soon""#,
                "invalid duration",
            ),
            (
                r#"issuer = "https://idp", audience = "a", roles = {parent = "king"}"#,
                "unknown role",
            ),
            (
                r#"issuer = "https://idp", audience = "a", color = "red""#,
                "unknown field",
            ),
            (r#"audience = "a""#, "missing field"),
        ] {
            let err = parse(&format!("{{{bad}}}")).unwrap_err();
            assert!(err.contains(why), "{bad}: {err}");
        }
        // Listed twice (a trailing slash is the same issuer): refused where duplicate tokens
        // are, in the auth section's validation.
        let mut config = crate::config::Config::default();
        config.auth.oidc = parse(
            r#"{issuer = "https://idp", audience = "a"}, {issuer = "https://idp/", audience = "b"}"#,
        )
        .unwrap();
        let twice: Vec<String> = config.validate().iter().map(|p| p.to_string()).collect();
        assert!(
            twice.iter().any(|p| p.contains("listed twice")),
            "{twice:?}"
        );
        assert!(parse(r#"{issuer = "http://127.0.0.1:4000", audience = "a"}"#).is_ok());
        assert!(parse(r#"{issuer = "http://localhost:4000/x", audience = "a"}"#).is_ok());
    }
}
