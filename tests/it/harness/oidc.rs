//! A real OpenID provider for the identity tests: `oidc-provider` from the npm registry
//! (`tests/support/oidc`, installed by `npm ci` from its lockfile), run by Node.js on a
//! loopback port. Tokens come from real grants: authorization code with PKCE, driven over
//! HTTP as a browser would (following redirects, keeping cookies, signing in at the
//! provider's interaction page), and client credentials.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;

use base64::Engine as _;
use sha2::Digest as _;
use tempfile::TempDir;

use super::repo_path;

/// The resource (audience) the provider issues flagstream's access tokens for.
pub const AUDIENCE: &str = "https://flagstream.test";

/// The public client the people sign in with.
const CLIENT_ID: &str = "reading-app";
const REDIRECT_URI: &str = "http://127.0.0.1/callback";

fn support_dir() -> PathBuf {
    repo_path("tests/support/oidc")
}

/// Installs the provider's packages from the lockfile once per test run, when they are
/// missing (CI runs `npm ci` first).
fn installed() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = support_dir();
        if !dir.join("node_modules/oidc-provider").exists() {
            let status = Command::new("npm")
                .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
                .current_dir(&dir)
                .status()
                .expect("npm (Node.js) is needed for the identity tests");
            assert!(status.success(), "npm ci in {} failed", dir.display());
        }
        dir
    })
}

/// The provider process. Killed on drop.
pub struct OidcProvider {
    child: Option<Child>,
    /// The issuer identifier (`http://127.0.0.1:<port>`).
    pub issuer: String,
    port: u16,
    state: TempDir,
    skew_seconds: i64,
    http: reqwest::Client,
}

impl OidcProvider {
    /// Starts a provider on a free loopback port.
    pub fn start() -> Self {
        Self::start_skewed(0)
    }

    /// Starts a provider whose clock runs `skew_seconds` ahead (its tokens' `iat` and `nbf`
    /// lie in flagstream's future).
    pub fn start_skewed(skew_seconds: i64) -> Self {
        let state = tempfile::tempdir().expect("provider state dir");
        let mut provider = Self {
            child: None,
            issuer: String::new(),
            port: 0,
            state,
            skew_seconds,
            // A connection per request: Node closes idle keep-alive connections on its own
            // schedule, and a reused one can be half closed.
            http: reqwest::Client::builder()
                .pool_max_idle_per_host(0)
                .build()
                .expect("client"),
        };
        provider.spawn();
        provider
    }

    fn spawn(&mut self) {
        let dir = installed();
        let mut command = Command::new("node");
        command
            .arg(dir.join("provider.mjs"))
            .arg("--state")
            .arg(self.state.path())
            .args(["--clock-skew", &self.skew_seconds.to_string()])
            .stdout(Stdio::piped())
            .stderr(self.log_file());
        if self.port != 0 {
            command.args(["--port", &self.port.to_string()]);
        }
        let mut child = command.spawn().expect("node runs the provider");
        let mut line = String::new();
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
        stdout
            .read_line(&mut line)
            .expect("the provider prints its address");
        // Keep reading what else it prints, so that its writes never meet a closed pipe.
        std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
        let started: serde_json::Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("the provider did not start: {line:?}: {e}"));
        self.issuer = started["issuer"].as_str().expect("issuer").to_owned();
        self.port = started["port"].as_u64().expect("port") as u16;
        self.child = Some(child);
    }

    fn log_file(&self) -> std::fs::File {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.state.path().join("provider.log"))
            .expect("provider log")
    }

    /// What the provider printed on stderr (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.state.path().join("provider.log")).unwrap_or_default()
    }

    /// Stops the provider (an outage: its discovery document and keys are unreachable).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port with the same keys.
    pub fn resume(&mut self) {
        assert!(self.child.is_none(), "the provider is running");
        self.spawn();
    }

    /// Rotates the provider's signing key: a new key signs from now on, the old one stays
    /// published. Returns the new key id.
    pub async fn rotate(&self) -> String {
        let answer: serde_json::Value = self
            .http
            .post(format!("{}/admin/rotate", self.issuer))
            .send()
            .await
            .expect("rotate")
            .json()
            .await
            .expect("rotate answer");
        answer["kid"].as_str().expect("kid").to_owned()
    }

    /// The provider's published key set.
    pub async fn jwks(&self) -> serde_json::Value {
        let url = format!("{}/jwks", self.issuer);
        self.http
            .get(url)
            .send()
            .await
            .expect("jwks")
            .json()
            .await
            .expect("jwks json")
    }

    /// Signs `account` in through the authorization code flow with PKCE and returns its
    /// access token for flagstream.
    pub async fn sign_in(&self, account: &str) -> String {
        self.sign_in_for(account, AUDIENCE).await
    }

    /// Signs `account` in, as [`OidcProvider::sign_in`], for the resource `resource`.
    pub async fn sign_in_for(&self, account: &str, resource: &str) -> String {
        // A browser of its own: a new cookie jar, so no earlier sign-in is reused.
        let browser = reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .redirect(reqwest::redirect::Policy::none())
            .cookie_store(true)
            .build()
            .expect("client");
        let verifier = base64url(&rand_bytes());
        let challenge = base64url(&sha2::Sha256::digest(verifier.as_bytes()));
        let state = base64url(&rand_bytes()[..12]);
        let mut url = reqwest::Url::parse(&format!("{}/auth", self.issuer)).unwrap();
        url.query_pairs_mut()
            .append_pair("client_id", CLIENT_ID)
            .append_pair("response_type", "code")
            .append_pair("redirect_uri", REDIRECT_URI)
            .append_pair("scope", "openid flagstream")
            .append_pair("code_challenge", &challenge)
            .append_pair("code_challenge_method", "S256")
            .append_pair("resource", resource)
            .append_pair("state", &state);
        // Follow the redirects as a browser does; sign in and consent where the provider
        // asks; stop at the redirect back to the app, which carries the code.
        let mut next = url.to_string();
        let mut code = None;
        for _ in 0..12 {
            let response = browser.get(&next).send().await.expect("authorize");
            let redirect = location(&response, &next);
            if let Some(target) = redirect.as_ref().filter(|l| l.starts_with(REDIRECT_URI)) {
                let target = reqwest::Url::parse(target).unwrap();
                let pairs: std::collections::HashMap<_, _> =
                    target.query_pairs().into_owned().collect();
                assert_eq!(pairs.get("state"), Some(&state), "state round trip");
                code = Some(
                    pairs
                        .get("code")
                        .unwrap_or_else(|| panic!("no code: {target}"))
                        .clone(),
                );
                break;
            }
            let Some(target) = redirect else {
                panic!("the provider stopped at {next}: {}", response.status());
            };
            next = if target.contains("/interaction/") {
                let response = browser
                    .post(&target)
                    .form(&[("login", account)])
                    .send()
                    .await
                    .expect("interaction");
                location(&response, &target)
                    .unwrap_or_else(|| panic!("interaction at {target}: {}", response.status()))
            } else {
                target
            };
        }
        let code = code.expect("the flow ended with a code");
        let request = browser.post(format!("{}/token", self.issuer)).form(&[
            ("grant_type", "authorization_code"),
            ("code", &code),
            ("redirect_uri", REDIRECT_URI),
            ("code_verifier", &verifier),
            ("client_id", CLIENT_ID),
            ("resource", resource),
        ]);
        self.access_token(request).await
    }

    /// A client-credentials token of the confidential client `client` (`expiring`: lives
    /// 1 s; `early`: not valid for an hour).
    pub async fn client_token(&self, client: &str) -> String {
        let request = self
            .http
            .post(format!("{}/token", self.issuer))
            .basic_auth(client, Some(format!("{client}-secret")))
            .form(&[
                ("grant_type", "client_credentials"),
                ("resource", AUDIENCE),
                ("scope", "flagstream"),
            ]);
        self.access_token(request).await
    }

    /// The access token the token endpoint answers `request` with.
    async fn access_token(&self, request: reqwest::RequestBuilder) -> String {
        let answer: serde_json::Value = request
            .send()
            .await
            .unwrap_or_else(|e| panic!("token: {e:?}; provider log: {}", self.log()))
            .json()
            .await
            .expect("token answer");
        answer["access_token"]
            .as_str()
            .unwrap_or_else(|| panic!("no access token: {answer}"))
            .to_owned()
    }
}

impl Drop for OidcProvider {
    fn drop(&mut self) {
        self.stop();
    }
}

fn location(response: &reqwest::Response, base: &str) -> Option<String> {
    let value = response.headers().get(reqwest::header::LOCATION)?;
    let base = reqwest::Url::parse(base).ok()?;
    Some(base.join(value.to_str().ok()?).ok()?.to_string())
}

fn rand_bytes() -> [u8; 32] {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).expect("random bytes");
    bytes
}

/// Base64url without padding (JOSE's encoding).
pub fn base64url(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}
