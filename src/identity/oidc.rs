//! The OpenID Connect resource server: each trusted issuer's discovery document and keys,
//! fetched and cached, and access tokens verified against them.
//!
//! Keys are fetched at start, on schedule (`jwks_refresh`) and when a token names a key id
//! not held (at most once per `jwks_min_interval`, so forged key ids cannot make flagstream
//! hammer the issuer). A failed fetch keeps the keys held: tokens signed with them keep
//! working while the issuer is unreachable. JOSE is `jsonwebtoken`'s: signature, `iss`, `aud`,
//! `exp` and `nbf` (with the issuer's leeway), and the algorithm against the allowed list.

use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use jsonwebtoken::jwk::{Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use super::claims::{self, ClaimError, Relations};
use super::metrics::{OIDC_KEY_FETCHES_TOTAL, OIDC_KEYS, OIDC_KEYS_FETCHED_AT, OIDC_TOKENS_TOTAL};
use crate::config::{OidcIssuerConfig, Role};

/// The longest access token read (a real one is 1 to 4 KiB).
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// The largest discovery document or key set read.
const MAX_DOCUMENT_BYTES: usize = 512 * 1024;

/// How long one fetch from an issuer may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a token was refused. Each answers 401 (`invalid_token`), except [`TokenError::Claims`]
/// (a valid token that carries no usable role: 403).
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// Over [`MAX_TOKEN_BYTES`].
    #[error("the token is longer than {MAX_TOKEN_BYTES} bytes")]
    Oversized,
    /// Not a signed JWT (or signed with an algorithm no issuer may use, such as `none`).
    #[error("the token is not a well-formed signed JWT")]
    Malformed,
    /// Its `iss` is no configured issuer.
    #[error("the token's issuer is not trusted here")]
    UnknownIssuer,
    /// Its algorithm is not allowed for its issuer.
    #[error("the token's algorithm {0} is not allowed for its issuer")]
    Algorithm(String),
    /// No key of the issuer has the token's key id (after a refresh, where allowed).
    #[error("the token's signing key is not one of its issuer's published keys")]
    UnknownKey,
    /// The issuer's keys have never been fetched (the issuer was unreachable since start).
    #[error("the issuer's keys could not be fetched yet; try again shortly")]
    NoKeys,
    /// The signature does not verify.
    #[error("the token's signature is invalid")]
    Signature,
    /// Past `exp` (and the leeway).
    #[error("the token has expired")]
    Expired,
    /// Before `nbf` (and the leeway).
    #[error("the token is not valid yet")]
    NotYetValid,
    /// Its `aud` does not name flagstream.
    #[error("the token is not meant for this service (audience)")]
    Audience,
    /// Its `iss` does not match (checked again with the signature).
    #[error("the token's issuer does not match")]
    Issuer,
    /// A required claim (`exp`, `iss`, `aud`, `sub`) is missing or malformed.
    #[error("the token lacks a valid {0} claim")]
    MissingClaim(String),
    /// Valid, but its claims give no usable identity.
    #[error(transparent)]
    Claims(#[from] ClaimError),
}

impl TokenError {
    /// The label of `flagstream_oidc_tokens_total`.
    pub fn outcome(&self) -> &'static str {
        match self {
            TokenError::Oversized => "oversized",
            TokenError::Malformed => "malformed",
            TokenError::UnknownIssuer => "unknown_issuer",
            TokenError::Algorithm(_) => "algorithm",
            TokenError::UnknownKey => "unknown_key",
            TokenError::NoKeys => "no_keys",
            TokenError::Signature => "signature",
            TokenError::Expired => "expired",
            TokenError::NotYetValid => "not_yet_valid",
            TokenError::Audience => "audience",
            TokenError::Issuer => "issuer",
            TokenError::MissingClaim(_) => "missing_claim",
            TokenError::Claims(_) => "claims",
        }
    }
}

/// Why an issuer's keys could not be fetched.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The request failed or timed out.
    #[error("{url}: {source}")]
    Request {
        /// What was fetched.
        url: String,
        /// Why it failed.
        #[source]
        source: reqwest::Error,
    },
    /// The issuer answered with an error status.
    #[error("{url}: answered {status}")]
    Status {
        /// What was fetched.
        url: String,
        /// The status.
        status: u16,
    },
    /// The document is too large, not JSON, or not the right JSON.
    #[error("{url}: {problem}")]
    Document {
        /// What was fetched.
        url: String,
        /// What is wrong with it.
        problem: String,
    },
}

/// A token that verified: who it names and what it may do.
#[derive(Debug, Clone)]
pub struct Verified {
    /// The issuer, as configured.
    pub issuer: Arc<str>,
    /// The subject at that issuer.
    pub subject: String,
    /// The role its claims give.
    pub role: Role,
    /// Whom it is related to.
    pub relations: Relations,
}

/// One key of an issuer's set.
struct Key {
    kid: Option<String>,
    /// The algorithm the set pins the key to, if it does.
    algorithm: Option<Algorithm>,
    key: DecodingKey,
}

/// What an issuer published, as last fetched.
#[derive(Default)]
struct Published {
    jwks_uri: Option<String>,
    keys: Vec<Key>,
}

/// Why keys are being fetched (a label of the fetch counter).
#[derive(Debug, Clone, Copy)]
pub enum FetchReason {
    /// At start.
    Start,
    /// On schedule.
    Schedule,
    /// A token named a key id not held.
    UnknownKid,
}

impl FetchReason {
    fn as_str(self) -> &'static str {
        match self {
            FetchReason::Start => "start",
            FetchReason::Schedule => "schedule",
            FetchReason::UnknownKid => "unknown_kid",
        }
    }
}

/// One trusted issuer and its cached keys.
pub struct Issuer {
    config: OidcIssuerConfig,
    name: Arc<str>,
    algorithms: Vec<Algorithm>,
    published: ArcSwap<Published>,
    /// When keys were last fetched (or tried) because of an unknown key id; held across the
    /// fetch so that a burst of such tokens makes one fetch.
    last_forced: tokio::sync::Mutex<Option<Instant>>,
    http: reqwest::Client,
}

#[derive(Deserialize)]
struct Discovery {
    issuer: String,
    jwks_uri: String,
}

#[derive(Deserialize)]
struct KeySet {
    keys: Vec<serde_json::Value>,
}

/// The claims read before the signature is checked, only to find the issuer.
#[derive(Deserialize)]
struct Unverified {
    iss: Option<String>,
}

impl Issuer {
    fn new(config: &OidcIssuerConfig, http: reqwest::Client) -> Self {
        let algorithms = config
            .algorithms
            .iter()
            .map(|name| Algorithm::from_str(name).expect("validated algorithm names parse"))
            .collect();
        Self {
            name: config.issuer.as_str().into(),
            config: config.clone(),
            algorithms,
            published: ArcSwap::from_pointee(Published::default()),
            last_forced: tokio::sync::Mutex::new(None),
            http,
        }
    }

    /// The issuer identifier.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// How often its keys are fetched on schedule.
    pub fn refresh_every(&self) -> Duration {
        self.config.jwks_refresh
    }

    /// How soon a fetch is tried again while none has succeeded, and the shortest wait
    /// between fetches forced by unknown key ids.
    pub fn retry_every(&self) -> Duration {
        self.config.jwks_min_interval
    }

    /// How many keys are held.
    pub fn key_count(&self) -> usize {
        self.published.load().keys.len()
    }

    async fn get_json<T: serde::de::DeserializeOwned>(&self, url: &str) -> Result<T, FetchError> {
        let request = |source| FetchError::Request {
            url: url.to_owned(),
            source,
        };
        let document = |problem: String| FetchError::Document {
            url: url.to_owned(),
            problem,
        };
        let mut response = self
            .http
            .get(url)
            .header(reqwest::header::ACCEPT, "application/json")
            .send()
            .await
            .map_err(request)?;
        if !response.status().is_success() {
            return Err(FetchError::Status {
                url: url.to_owned(),
                status: response.status().as_u16(),
            });
        }
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(request)? {
            if body.len() + chunk.len() > MAX_DOCUMENT_BYTES {
                return Err(document(format!("larger than {MAX_DOCUMENT_BYTES} bytes")));
            }
            body.extend_from_slice(&chunk);
        }
        serde_json::from_slice(&body).map_err(|err| document(err.to_string()))
    }

    /// Fetches the discovery document (once it succeeded, its `jwks_uri` is kept) and the
    /// key set, and puts the keys in force. On failure the keys held stay in force.
    pub async fn fetch(&self, reason: FetchReason) -> Result<usize, FetchError> {
        let result = self.fetch_keys().await;
        let outcome = if result.is_ok() { "ok" } else { "failed" };
        metrics::counter!(OIDC_KEY_FETCHES_TOTAL, "issuer" => self.name.to_string(),
            "reason" => reason.as_str(), "outcome" => outcome)
        .increment(1);
        match &result {
            Ok(count) => {
                metrics::gauge!(OIDC_KEYS, "issuer" => self.name.to_string()).set(*count as f64);
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0.0, |d| d.as_secs_f64());
                metrics::gauge!(OIDC_KEYS_FETCHED_AT, "issuer" => self.name.to_string()).set(now);
            }
            Err(err) => {
                tracing::warn!(issuer = %self.name, reason = reason.as_str(), error = %err,
                    held = self.key_count(), "issuer keys not fetched; the keys held stay in force");
            }
        }
        result
    }

    async fn fetch_keys(&self) -> Result<usize, FetchError> {
        let held = self.published.load_full();
        let jwks_uri = match &held.jwks_uri {
            Some(uri) => uri.clone(),
            None => {
                let url = format!("{}/.well-known/openid-configuration", self.name);
                let discovery: Discovery = self.get_json(&url).await?;
                // OpenID Connect Discovery 1.0, section 4.3: the document must name the
                // issuer it was fetched for, exactly.
                if discovery.issuer.trim_end_matches('/') != &*self.name {
                    return Err(FetchError::Document {
                        url,
                        problem: format!(
                            "it names issuer {:?}, not the one configured",
                            discovery.issuer
                        ),
                    });
                }
                discovery.jwks_uri
            }
        };
        let set: KeySet = self.get_json(&jwks_uri).await?;
        let keys: Vec<Key> = set.keys.into_iter().filter_map(signing_key).collect();
        if keys.is_empty() {
            return Err(FetchError::Document {
                url: jwks_uri,
                problem: "no usable signing key".into(),
            });
        }
        let count = keys.len();
        self.published.store(Arc::new(Published {
            jwks_uri: Some(jwks_uri),
            keys,
        }));
        Ok(count)
    }

    /// The key for a token's `kid` and algorithm, fetching the set again (rate-limited) when
    /// the key id is not held.
    async fn key_for(
        &self,
        kid: Option<&str>,
        algorithm: Algorithm,
    ) -> Result<Arc<Published>, TokenError> {
        let published = self.published.load_full();
        if find(&published, kid, algorithm).is_some() {
            return Ok(published);
        }
        let mut last = self.last_forced.lock().await;
        // Another request may have fetched while this one waited.
        let published = self.published.load_full();
        if find(&published, kid, algorithm).is_some() {
            return Ok(published);
        }
        let allowed = last.is_none_or(|at| at.elapsed() >= self.config.jwks_min_interval);
        if allowed {
            *last = Some(Instant::now());
            let _ = self.fetch(FetchReason::UnknownKid).await;
        } else {
            metrics::counter!(OIDC_KEY_FETCHES_TOTAL, "issuer" => self.name.to_string(),
                "reason" => FetchReason::UnknownKid.as_str(), "outcome" => "skipped")
            .increment(1);
        }
        drop(last);
        let published = self.published.load_full();
        if find(&published, kid, algorithm).is_some() {
            Ok(published)
        } else if published.keys.is_empty() {
            Err(TokenError::NoKeys)
        } else {
            Err(TokenError::UnknownKey)
        }
    }

    async fn verify(
        &self,
        token: &str,
        algorithm: Algorithm,
        kid: Option<&str>,
    ) -> Result<Verified, TokenError> {
        if !self.algorithms.contains(&algorithm) {
            return Err(TokenError::Algorithm(format!("{algorithm:?}")));
        }
        let published = self.key_for(kid, algorithm).await?;
        let key = find(&published, kid, algorithm).ok_or(TokenError::UnknownKey)?;
        let mut validation = Validation::new(algorithm);
        validation.algorithms = vec![algorithm];
        validation.set_issuer(&[&*self.name]);
        validation.set_audience(&[&self.config.audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.leeway = self.config.leeway.as_secs();
        let data = jsonwebtoken::decode::<serde_json::Value>(token, &key.key, &validation)
            .map_err(token_error)?;
        let claims = data.claims;
        let subject = claims
            .get("sub")
            .and_then(serde_json::Value::as_str)
            .filter(|sub| !sub.is_empty())
            .ok_or_else(|| TokenError::MissingClaim("sub".into()))?
            .to_owned();
        let (role, relations) = claims::read(&claims, &self.config.claims, &self.config.roles)?;
        Ok(Verified {
            issuer: self.name.clone(),
            subject,
            role,
            relations,
        })
    }
}

/// The key of a set that verifies `algorithm` and has the token's `kid`; a token without a
/// `kid` may use the one key of its algorithm's family, when there is exactly one.
fn find<'a>(published: &'a Published, kid: Option<&str>, algorithm: Algorithm) -> Option<&'a Key> {
    let fits = |key: &&Key| {
        key.key.family() == algorithm.family()
            && key.algorithm.is_none_or(|pinned| pinned == algorithm)
    };
    match kid {
        Some(kid) => published
            .keys
            .iter()
            .filter(fits)
            .find(|key| key.kid.as_deref() == Some(kid)),
        None => {
            let mut candidates = published.keys.iter().filter(fits);
            let first = candidates.next();
            if candidates.next().is_some() {
                None
            } else {
                first
            }
        }
    }
}

/// A published key usable for signatures: asymmetric, not marked for encryption.
fn signing_key(value: serde_json::Value) -> Option<Key> {
    let jwk: Jwk = serde_json::from_value(value).ok()?;
    if matches!(jwk.common.public_key_use, Some(ref usage) if *usage != PublicKeyUse::Signature) {
        return None;
    }
    if matches!(
        jwk.algorithm,
        jsonwebtoken::jwk::AlgorithmParameters::OctetKey(_)
    ) {
        // A shared secret published as a key would let anyone sign.
        return None;
    }
    let algorithm = match jwk.common.key_algorithm {
        None => None,
        Some(pinned) => Some(Algorithm::from_str(&pinned.to_string()).ok()?),
    };
    let key = DecodingKey::from_jwk(&jwk).ok()?;
    Some(Key {
        kid: jwk.common.key_id.clone(),
        algorithm,
        key,
    })
}

fn token_error(err: jsonwebtoken::errors::Error) -> TokenError {
    use jsonwebtoken::errors::ErrorKind;
    match err.into_kind() {
        ErrorKind::InvalidSignature => TokenError::Signature,
        ErrorKind::ExpiredSignature => TokenError::Expired,
        ErrorKind::ImmatureSignature => TokenError::NotYetValid,
        ErrorKind::InvalidAudience => TokenError::Audience,
        ErrorKind::InvalidIssuer => TokenError::Issuer,
        ErrorKind::MissingRequiredClaim(claim) | ErrorKind::InvalidClaimFormat(claim) => {
            TokenError::MissingClaim(claim)
        }
        ErrorKind::InvalidAlgorithm => TokenError::Algorithm("of the key".into()),
        _ => TokenError::Malformed,
    }
}

/// Every trusted issuer; verifies access tokens.
pub struct Verifier {
    issuers: Vec<Arc<Issuer>>,
    by_name: BTreeMap<String, usize>,
}

impl Verifier {
    /// Builds the issuers of `configs` (nothing is fetched yet: see [`Verifier::fetch_all`]).
    pub fn new(configs: &[OidcIssuerConfig]) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .timeout(FETCH_TIMEOUT)
            .connect_timeout(FETCH_TIMEOUT)
            .redirect(reqwest::redirect::Policy::limited(3))
            .user_agent(concat!("flagstream/", env!("CARGO_PKG_VERSION")))
            .build()?;
        let issuers: Vec<Arc<Issuer>> = configs
            .iter()
            .map(|config| Arc::new(Issuer::new(config, http.clone())))
            .collect();
        let by_name = issuers
            .iter()
            .enumerate()
            .map(|(i, issuer)| (issuer.name.to_string(), i))
            .collect();
        Ok(Self { issuers, by_name })
    }

    /// The issuers.
    pub fn issuers(&self) -> &[Arc<Issuer>] {
        &self.issuers
    }

    /// Fetches every issuer's keys, logging failures (the issuers that failed are tried
    /// again on schedule and on their first token).
    pub async fn fetch_all(&self, reason: FetchReason) {
        for issuer in &self.issuers {
            let _ = issuer.fetch(reason).await;
        }
    }

    /// Verifies an access token and reads who it names.
    pub async fn verify(&self, token: &str) -> Result<Verified, TokenError> {
        let (issuer, result) = self.verify_inner(token).await;
        let outcome = match &result {
            Ok(_) => "accepted",
            Err(err) => err.outcome(),
        };
        metrics::counter!(OIDC_TOKENS_TOTAL, "issuer" => issuer, "outcome" => outcome).increment(1);
        result
    }

    async fn verify_inner(&self, token: &str) -> (String, Result<Verified, TokenError>) {
        let untrusted = || "untrusted".to_owned();
        if token.len() > MAX_TOKEN_BYTES {
            return (untrusted(), Err(TokenError::Oversized));
        }
        let Ok(header) = jsonwebtoken::decode_header(token) else {
            return (untrusted(), Err(TokenError::Malformed));
        };
        // Read `iss` only to pick the issuer whose keys and rules apply; everything is
        // checked again with the signature.
        let Ok(unverified) = jsonwebtoken::dangerous::insecure_decode::<Unverified>(token) else {
            return (untrusted(), Err(TokenError::Malformed));
        };
        let Some(issuer) = unverified
            .claims
            .iss
            .as_deref()
            .and_then(|iss| self.by_name.get(iss.trim_end_matches('/')))
            .map(|i| &self.issuers[*i])
        else {
            return (untrusted(), Err(TokenError::UnknownIssuer));
        };
        let result = issuer
            .verify(token, header.alg, header.kid.as_deref())
            .await;
        (issuer.name.to_string(), result)
    }
}
