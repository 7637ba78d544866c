//! Identity end to end, against a real OpenID provider (`oidc-provider`, see
//! `harness::oidc`): parents sign in and act for their own children only; hostile tokens are
//! refused and audited; the provider's key rotation and outages are ridden out.

use std::time::Duration;

use flagstream::config::{ClaimNames, Config, OidcIssuerConfig, Role};
use flagstream::events::time::format_rfc3339;
use reqwest::Method;
use serde_json::{Value, json};

use crate::harness::client::{files, post_batch, send};
use crate::harness::oidc::{AUDIENCE, OidcProvider, base64url};
use crate::harness::wait::{now_ms, until};
use crate::harness::{Service, role_tokens};

/// The issuer settings for the test provider: its role claim values as the provider sends
/// them (`parent`), no leeway, and a short wait between forced key fetches.
pub fn issuer_config(provider: &OidcProvider) -> OidcIssuerConfig {
    OidcIssuerConfig {
        issuer: provider.issuer.clone(),
        audience: AUDIENCE.into(),
        algorithms: vec!["RS256".into()],
        leeway: Duration::ZERO,
        jwks_refresh: Duration::from_secs(3600),
        jwks_min_interval: Duration::from_millis(500),
        claims: ClaimNames::default(),
        roles: [("parent".to_owned(), Role::Guardian)].into(),
    }
}

/// A service that trusts `provider` and holds the static role tokens.
pub async fn service_trusting(
    provider: &OidcProvider,
    adjust: impl FnOnce(&mut Config),
) -> Service {
    let issuer = issuer_config(provider);
    Service::start_with(|config| {
        config.auth.tokens = role_tokens();
        config.auth.oidc = vec![issuer];
        adjust(config);
    })
    .await
}

async fn event(service: &Service, user: &str, id: &str) -> (String, String) {
    let at = format_rfc3339(now_ms());
    let batch =
        vec![json!({"event_id": id, "user_id": user, "type": "app_opened", "timestamp": at})];
    post_batch(service, batch).await.remove(0)
}

/// Files a data-subject request as `token` and returns the answer, which must be 202.
async fn file_request(service: &Service, token: &str, kind: &str, subject: &str) -> Value {
    let body = json!({"type": kind, "subject": subject});
    let (status, answer) = send(
        service,
        token,
        Method::POST,
        "/v1/privacy/requests",
        Some(body),
    )
    .await;
    assert_eq!(status, 202, "{kind} request for {subject}: {answer}");
    answer
}

/// The audit log's entries.
fn audit_entries(service: &Service) -> Vec<Value> {
    crate::harness::audit_entries(service.data_dir())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parent_signs_in_and_looks_after_both_children() {
    let provider = OidcProvider::start();
    let service = service_trusting(&provider, |config| {
        config.privacy.consent_required = true;
        config.privacy.consent_text_version = "2026-11".into();
    })
    .await;
    let parent = provider.sign_in("parent-a").await;

    let (status, me) = send(&service, &parent, Method::GET, "/v1/me", None).await;
    assert_eq!(status, 200, "{me}");
    assert_eq!(me["role"], "guardian");
    assert_eq!(me["children"], json!(["child-a1", "child-a2"]));
    assert_eq!(me["issuer"], provider.issuer.as_str());
    assert_eq!(me["subject"], "parent-a");
    assert!(
        me["name"].as_str().unwrap().starts_with("guardian:r_"),
        "{me}"
    );

    // Both children may be analysed; the ledger's guardian is the verified sign-in.
    for child in ["child-a1", "child-a2"] {
        let grant = json!({"subject": child, "scope": "analytics", "granted": true});
        let (status, entry) =
            send(&service, &parent, Method::POST, "/v1/consent", Some(grant)).await;
        assert_eq!(status, 201, "{entry}");
        assert_eq!(entry["method"], "oidc");
        assert_eq!(entry["issuer"], provider.issuer.as_str());
        assert_eq!(entry["text_version"], "2026-11");
        assert!(
            entry["guardian"].as_str().unwrap().starts_with("p1_"),
            "{entry}"
        );
    }
    assert_eq!(event(&service, "child-a1", "e-1").await.0, "ok");

    // Revoke analytics for the first child: its next events are not stored.
    let revoke = json!({"subject": "child-a1", "scope": "analytics", "granted": false});
    let (status, entry) = send(&service, &parent, Method::POST, "/v1/consent", Some(revoke)).await;
    assert_eq!(status, 201, "{entry}");
    assert_eq!(
        event(&service, "child-a1", "e-2").await,
        ("rejected".into(), "no_consent".into())
    );
    let (status, consents) =
        send(&service, &parent, Method::GET, "/v1/consent/child-a1", None).await;
    assert_eq!(status, 200, "{consents}");
    assert_eq!(consents["consents"]["analytics"]["granted"], false);
    assert_eq!(consents["history"].as_array().unwrap().len(), 2);

    // Erase the second child; ask for the first child's data.
    file_request(&service, &parent, "erasure", "child-a2").await;
    let access = file_request(&service, &parent, "access", "child-a1").await;
    let id = access["id"].as_str().unwrap().to_owned();

    let mine = until(
        Duration::from_secs(20),
        "both requests completed",
        || async {
            let (status, list) =
                send(&service, &parent, Method::GET, "/v1/privacy/requests", None).await;
            assert_eq!(status, 200, "{list}");
            let requests = list["requests"].as_array().unwrap().clone();
            if requests.len() == 2 && requests.iter().all(|r| r["status"] == "completed") {
                Ok(requests)
            } else {
                Err(list)
            }
        },
    )
    .await;
    assert!(mine.iter().all(|r| r["due"].is_string()), "{mine:?}");
    // The download: a zip of the NDJSON export and a summary in plain words.
    let export = service
        .http
        .get(service.url(&format!("/v1/privacy/requests/{id}/export")))
        .bearer_auth(&parent)
        .send()
        .await
        .unwrap();
    assert_eq!(export.status(), 200);
    assert_eq!(export.headers()["content-type"], "application/zip");
    let bytes = export.bytes().await.unwrap();
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(bytes.to_vec())).unwrap();
    let read = |zip: &mut zip::ZipArchive<_>, name: &str| {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut zip.by_name(name).unwrap(), &mut text).unwrap();
        text
    };
    let text = read(&mut zip, "export.ndjson");
    let summary = read(&mut zip, "summary.txt");
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        lines.iter().filter(|l| l["kind"] == "event").count(),
        1,
        "the one stored event of the child is exported: {text}"
    );
    let consents: Vec<&Value> = lines.iter().filter(|l| l["kind"] == "consent").collect();
    assert_eq!(consents.len(), 2, "the consent history is exported: {text}");
    assert!(consents.iter().all(|c| c["method"] == "oidc"), "{text}");
    for expected in [
        "Events stored: 1",
        "- app_opened: 1",
        "analytics granted (by the guardian, signed in)",
        "analytics revoked (by the guardian, signed in)",
        "This download is deleted on",
    ] {
        assert!(
            summary.contains(expected),
            "{expected:?} not in:\n{summary}"
        );
    }
    assert!(!text.contains("child-a1") && !summary.contains("child-a1"));

    // Another parent sees none of it.
    let other = provider.sign_in("parent-b").await;
    let (status, list) = send(&service, &other, Method::GET, "/v1/privacy/requests", None).await;
    assert_eq!(status, 200);
    assert_eq!(list["requests"], json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_familys_child_is_refused_on_every_endpoint_and_audited() {
    let provider = OidcProvider::start();
    let service = service_trusting(&provider, |_| {}).await;
    let parent_a = provider.sign_in("parent-a").await;
    let parent_b = provider.sign_in("parent-b").await;
    // A request of parent A's, to be reached by parent B.
    let access = file_request(&service, &parent_a, "access", "child-a1").await;
    let id = access["id"].as_str().unwrap().to_owned();
    let grant = json!({"subject": "child-a1", "scope": "analytics", "granted": true});
    let erase = json!({"type": "erasure", "subject": "child-a1"});
    let ask = json!({"type": "access", "subject": "child-a1"});
    let request_path = format!("/v1/privacy/requests/{id}");
    let export_path = format!("{request_path}/export");
    // Every endpoint that takes a child (or a request about one), as parent B.
    let table: [(Method, &str, Option<Value>, u16); 6] = [
        (Method::POST, "/v1/consent", Some(grant), 403),
        (Method::GET, "/v1/consent/child-a1", None, 403),
        (Method::POST, "/v1/privacy/requests", Some(erase), 403),
        (Method::POST, "/v1/privacy/requests", Some(ask), 403),
        (Method::GET, &request_path, None, 404),
        (Method::GET, &export_path, None, 404),
    ];
    for (method, path, body, expected) in table {
        let (status, answer) = send(&service, &parent_b, method.clone(), path, body).await;
        assert_eq!(
            status, expected,
            "{method} {path} as another parent: {answer}"
        );
        if expected == 403 {
            assert!(
                answer["error_description"]
                    .as_str()
                    .unwrap()
                    .contains("/v1/me"),
                "{answer}"
            );
        }
    }
    // Parent B's own child is theirs to decide for.
    let own = json!({"subject": "child-b1", "scope": "analytics", "granted": true});
    assert_eq!(
        send(&service, &parent_b, Method::POST, "/v1/consent", Some(own))
            .await
            .0,
        201
    );
    // A guardian cannot name another guardian as the one who decided.
    let forged = json!({"subject": "child-b1", "scope": "analytics", "granted": false,
        "guardian_id": "parent-a"});
    let (status, answer) = send(
        &service,
        &parent_b,
        Method::POST,
        "/v1/consent",
        Some(forged),
    )
    .await;
    assert_eq!(status, 400, "{answer}");

    let refused: Vec<Value> = audit_entries(&service)
        .into_iter()
        .filter(|e| e["status"] == 403 && e["role"] == "guardian")
        .collect();
    assert_eq!(
        refused.len(),
        4,
        "every refused attempt is audited: {refused:?}"
    );
    for entry in &refused {
        assert!(
            entry["who"].as_str().unwrap().starts_with("guardian:r_"),
            "{entry}"
        );
        assert!(
            entry["detail"].as_str().unwrap().starts_with("r_"),
            "{entry}"
        );
    }
    let log = audit_entries(&service)
        .iter()
        .map(Value::to_string)
        .collect::<String>();
    for raw in ["child-a1", "child-b1", "parent-a", "parent-b"] {
        assert!(!log.contains(raw), "the audit log names {raw}: {log}");
    }
}

/// The payload of a JWT, decoded (for building forgeries out of real tokens).
fn payload(token: &str) -> Value {
    use base64::Engine as _;
    let part = token.split('.').nth(1).unwrap();
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part)
        .unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

fn header(token: &str) -> Value {
    use base64::Engine as _;
    let part = token.split('.').next().unwrap();
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part)
        .unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

fn encode(value: &Value) -> String {
    base64url(&serde_json::to_vec(value).unwrap())
}

/// `token` with its header or payload replaced, its signature kept.
fn with_parts(token: &str, header: Option<&Value>, payload: Option<&Value>) -> String {
    let parts: Vec<&str> = token.split('.').collect();
    format!(
        "{}.{}.{}",
        header.map_or(parts[0].to_owned(), encode),
        payload.map_or(parts[1].to_owned(), encode),
        parts[2]
    )
}

fn hs256(key: &[u8], message: &str) -> String {
    use hmac::Mac as _;
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(key).unwrap();
    mac.update(message.as_bytes());
    base64url(&mac.finalize().into_bytes())
}

async fn status_and_challenge(service: &Service, token: &str) -> (u16, String, Value) {
    let response = service
        .http
        .get(service.url("/v1/me"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let challenge = response
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    (status, challenge, response.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_tokens_are_refused_and_audited() {
    let provider = OidcProvider::start();
    let stranger = OidcProvider::start();
    let service = service_trusting(&provider, |_| {}).await;
    let real = provider.sign_in("parent-b").await;
    assert_eq!(status_and_challenge(&service, &real).await.0, 200);

    let mut claims = payload(&real);
    let mut head = header(&real);
    let unsigned = {
        let none = json!({"alg": "none", "typ": "at+jwt"});
        format!("{}.{}.", encode(&none), encode(&claims))
    };
    // HS256 keyed with the provider's published RSA key (the classic confusion attack).
    let hmac_with_public_key = {
        let jwks = provider.jwks().await;
        let public = serde_json::to_vec(&jwks["keys"][0]).unwrap();
        let forged_head = json!({"alg": "HS256", "typ": "at+jwt", "kid": head["kid"]});
        let message = format!("{}.{}", encode(&forged_head), encode(&claims));
        format!("{message}.{}", hs256(&public, &message))
    };
    claims["children"] = json!(["child-b1", "child-a1"]);
    let tampered = with_parts(&real, None, Some(&claims));
    claims = payload(&real);
    claims["iss"] = json!(stranger.issuer);
    let other_issuer_claimed = with_parts(&real, None, Some(&claims));
    head["alg"] = json!("RS512");
    let algorithm_swapped = with_parts(&real, Some(&head), None);
    let wrong_audience = provider.sign_in_for("parent-b", "https://other.test").await;
    let unconfigured = stranger.sign_in("parent-b").await;
    let not_yet_valid = provider.client_token("early").await;
    let expiring = provider.client_token("expiring").await;
    let oversized = format!("{real}{}", "A".repeat(64 * 1024));
    let garbage = "eyJhbGciOiJSUzI1NiJ9.not-json.sig".to_owned();
    // Past the 1 s lifetime (no leeway is configured).
    until(
        Duration::from_secs(10),
        "the expiring token expired",
        || {
            let exp = payload(&expiring)["exp"].as_i64().unwrap();
            std::future::ready(if now_ms() / 1000 > exp {
                Ok(())
            } else {
                Err(exp)
            })
        },
    )
    .await;

    let table: [(&str, &str, &str); 11] = [
        ("alg none", &unsigned, "well-formed"),
        (
            "HS256 keyed with the public key",
            &hmac_with_public_key,
            "not allowed",
        ),
        ("tampered payload", &tampered, "signature"),
        (
            "iss rewritten to another issuer",
            &other_issuer_claimed,
            "not trusted",
        ),
        ("algorithm swapped", &algorithm_swapped, "not allowed"),
        ("wrong audience", &wrong_audience, "audience"),
        (
            "from an unconfigured provider",
            &unconfigured,
            "not trusted",
        ),
        ("not yet valid", &not_yet_valid, "not valid yet"),
        ("expired", &expiring, "expired"),
        ("64 KiB", &oversized, "longer than"),
        ("garbage", &garbage, "well-formed"),
    ];
    for (case, token, why) in table {
        let (status, challenge, body) = status_and_challenge(&service, token).await;
        assert_eq!(status, 401, "{case}: {body}");
        assert!(
            challenge.starts_with("Bearer realm=\"flagstream\", error=\"invalid_token\""),
            "{case}: {challenge}"
        );
        let description = body["error_description"].as_str().unwrap();
        assert!(description.contains(why), "{case}: {description}");
        assert!(challenge.contains(description), "{case}: {challenge}");
    }
    // A real token that names no role is valid but may do nothing.
    let nobody = provider.sign_in("nobody-n").await;
    let (status, challenge, body) = status_and_challenge(&service, &nobody).await;
    assert_eq!(status, 403, "{body}");
    assert!(challenge.contains("insufficient_scope"), "{challenge}");

    let refused = audit_entries(&service)
        .into_iter()
        .filter(|e| e["action"] == "auth.refused")
        .count();
    assert_eq!(refused, 12, "every refused token is audited");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_rotation_and_provider_outages_are_ridden_out() {
    let mut provider = OidcProvider::start();
    let service = service_trusting(&provider, |_| {}).await;
    let before = provider.sign_in("parent-a").await;
    assert_eq!(status_and_challenge(&service, &before).await.0, 200);

    // The provider rotates: the new key signs, the old one stays published.
    let new_kid = provider.rotate().await;
    let after = provider.sign_in("parent-a").await;
    assert_eq!(header(&after)["kid"], new_kid.as_str());
    assert_eq!(
        status_and_challenge(&service, &before).await.0,
        200,
        "old tokens keep working"
    );
    // Accepted once flagstream fetched the keys again: at once, or after jwks_min_interval
    // when a forced fetch (the start's race with the first token) was just made.
    until(
        Duration::from_secs(10),
        "the new key is accepted",
        || async {
            let (status, _, body) = status_and_challenge(&service, &after).await;
            if status == 200 { Ok(()) } else { Err(body) }
        },
    )
    .await;

    // Another rotation, then an outage before flagstream saw the new key.
    let newest_kid = provider.rotate().await;
    let newest = provider.sign_in("parent-a").await;
    assert_eq!(header(&newest)["kid"], newest_kid.as_str());
    provider.stop();
    // The first tokens of the unknown key make flagstream fetch again (at most once per
    // jwks_min_interval): that fetch fails, and the token is refused.
    until(
        Duration::from_secs(10),
        "a key fetch failed during the outage",
        || async {
            let (status, challenge, body) = status_and_challenge(&service, &newest).await;
            assert_eq!(
                status, 401,
                "an unknown key while the provider is down: {body}"
            );
            assert!(challenge.contains("invalid_token"), "{challenge}");
            assert!(
                body["error_description"]
                    .as_str()
                    .unwrap()
                    .contains("signing key"),
                "{body}"
            );
            let metrics = service.get_text("/metrics").await;
            let failed = metrics.lines().find(|l| {
                l.starts_with("flagstream_oidc_key_fetches_total")
                    && l.contains(&provider.issuer)
                    && l.contains("outcome=\"failed\"")
            });
            match failed {
                Some(_) => Ok(()),
                None => Err("no failed fetch counted yet"),
            }
        },
    )
    .await;
    for token in [&before, &after] {
        assert_eq!(
            status_and_challenge(&service, token).await.0,
            200,
            "cached keys keep serving while the provider is down"
        );
    }

    // The provider comes back: the newest key is fetched on its next token (once the
    // forced-fetch interval has passed).
    provider.resume();
    until(
        Duration::from_secs(10),
        "the newest key was fetched",
        || async {
            let (status, _, body) = status_and_challenge(&service, &newest).await;
            if status == 200 { Ok(()) } else { Err(body) }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ledger_journal_and_audit_log_hold_no_identity_in_clear() {
    let provider = OidcProvider::start();
    let service = service_trusting(&provider, |_| {}).await;
    let parent = provider.sign_in("parent-a").await;
    let grant = json!({"subject": "child-a1", "scope": "experiments", "granted": true});
    let (status, entry) = send(&service, &parent, Method::POST, "/v1/consent", Some(grant)).await;
    assert_eq!(status, 201);
    let access = json!({"type": "access", "subject": "child-a1"});
    let (status, access) = send(
        &service,
        &parent,
        Method::POST,
        "/v1/privacy/requests",
        Some(access),
    )
    .await;
    assert_eq!(status, 202);
    let path = format!("/v1/privacy/requests/{}", access["id"].as_str().unwrap());
    until(Duration::from_secs(20), "the export is made", || async {
        let (_, state) = send(&service, &parent, Method::GET, &path, None).await;
        if state["status"] == "completed" {
            Ok(())
        } else {
            Err(state)
        }
    })
    .await;
    let (_, me) = send(&service, &parent, Method::GET, "/v1/me", None).await;
    let child = entry["subject"].as_str().unwrap().to_owned();
    let guardian = entry["guardian"].as_str().unwrap().to_owned();
    let requester = me["name"]
        .as_str()
        .unwrap()
        .trim_start_matches("guardian:")
        .to_owned();
    // The ledger, the journal, the export and the audit log are sealed: neither the raw ids
    // nor the pseudonyms and references that stand for the child and the parent are in any
    // file in clear.
    let data = service.data_dir().to_path_buf();
    let mut seen = Vec::new();
    for (path, bytes) in files(&data) {
        let text = String::from_utf8_lossy(&bytes);
        for needle in ["child-a1", "parent-a", "Ana", &child, &guardian, &requester] {
            assert!(!text.contains(needle), "{path} holds {needle:?}");
        }
        assert!(
            !text.contains(&format!("{}#", provider.issuer)),
            "{path} holds the guardian's issuer#subject"
        );
        seen.push(path);
    }
    for expected in [
        "consent/ledger",
        "privacy/requests",
        "audit/audit.sealed",
        ".sealed",
    ] {
        assert!(
            seen.iter().any(|path| path.contains(expected)),
            "{expected} was scanned: {seen:?}"
        );
    }
    // Opened with the data keys, they hold pseudonyms and references only: no raw id, no
    // name, no issuer#subject inside the seal either.
    let sealer = std::sync::Arc::new(crate::harness::data_sealer(&data));
    let mut opened = String::new();
    for journal in ["consent/ledger", "privacy/requests"] {
        let (_, records) = flagstream::privacy::journal::Journal::<Value>::open(
            &data.join(journal),
            sealer.clone(),
        )
        .expect("the journal opens with the data keys");
        assert!(!records.is_empty(), "{journal} holds the records");
        opened.extend(records.iter().map(Value::to_string));
    }
    let export = files(&data.join("privacy/exports"))
        .into_iter()
        .find(|(name, _)| name.ends_with(".sealed"))
        .expect("the sealed export");
    let mut plain = Vec::new();
    let text = sealer
        .open(&export.1, &mut plain)
        .expect("the export opens");
    opened.push_str(&String::from_utf8_lossy(text));
    opened.extend(
        crate::harness::audit_entries(&data)
            .iter()
            .map(Value::to_string),
    );
    assert!(
        opened.contains(&child),
        "the records name the child by pseudonym"
    );
    for needle in ["child-a1", "parent-a", "Ana"] {
        assert!(!opened.contains(needle), "a sealed record holds {needle:?}");
    }
    assert!(!opened.contains(&format!("{}#", provider.issuer)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn school_admins_and_researchers_act_within_their_sign_in() {
    let provider = OidcProvider::start();
    let service = service_trusting(&provider, |config| {
        config.pipeline.segments = vec!["school_id".into(), "class_id".into()];
    })
    .await;
    // school-1: class 4A with 6 children, 4B with 3; school-2: class 9Z with 8.
    let at = format_rfc3339(now_ms() - 60_000);
    let mut batch = Vec::new();
    for (school, class, children) in [
        ("school-1", "4A", 6),
        ("school-1", "4B", 3),
        ("school-2", "9Z", 8),
    ] {
        for child in 0..children {
            batch.push(
                json!({"event_id": format!("{class}-{child}"), "type": "app_opened",
                "user_id": format!("child-{class}-{child}"), "timestamp": at,
                "context": {"school_id": school, "class_id": class}}),
            );
        }
    }
    let results = post_batch(&service, batch).await;
    assert!(results.iter().all(|r| r.0 == "ok"), "{results:?}");
    let sql = |token: String, text: &'static str| {
        let service = &service;
        async move {
            send(
                service,
                &token,
                Method::POST,
                "/v1/sql",
                Some(json!({"sql": text})),
            )
            .await
        }
    };
    let by_class = "SELECT class_id, count(DISTINCT subject) AS children FROM events GROUP BY class_id ORDER BY class_id";

    // The head of school-1 (the school comes from the verified claim): their school only,
    // and not the class of 3.
    let head = provider.sign_in("head-s").await;
    let (status, answer) = until(
        Duration::from_secs(10),
        "the events are in the SQL window",
        || {
            let query = sql(head.clone(), by_class);
            async move {
                let (status, answer) = query.await;
                if answer["rows"]
                    .as_array()
                    .is_some_and(|rows| !rows.is_empty())
                {
                    Ok((status, answer))
                } else {
                    Err(answer)
                }
            }
        },
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["rows"], json!([{"class_id": "4A", "children": 6}]));

    // A researcher: every school, in groups of enough children; no row-level output.
    let researcher = provider.sign_in("researcher-r").await;
    let (status, answer) = sql(researcher.clone(), by_class).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        answer["rows"],
        json!([{"class_id": "4A", "children": 6}, {"class_id": "9Z", "children": 8}])
    );
    for row_level in [
        "SELECT subject FROM events",
        "SELECT * FROM events",
        "SELECT min(subject) AS s FROM events",
    ] {
        let (status, answer) = send(
            &service,
            &researcher,
            Method::POST,
            "/v1/sql",
            Some(json!({"sql": row_level})),
        )
        .await;
        assert_eq!(status, 403, "{row_level}: {answer}");
    }
    // Exposures (a child's first exposure is not an aggregate) are not in their session.
    let (status, answer) = sql(researcher.clone(), "SELECT count(*) AS n FROM exposures").await;
    assert_eq!(status, 400, "{answer}");
    assert!(
        answer["error_description"]
            .as_str()
            .unwrap()
            .contains("not found"),
        "{answer}"
    );
    // The head files requests for the children of their school only (as its recent events
    // place them), and sees only the requests they filed.
    let request = |subject: &str| json!({"type": "access", "subject": subject});
    let (status, filed) = send(
        &service,
        &head,
        Method::POST,
        "/v1/privacy/requests",
        Some(request("child-4A-0")),
    )
    .await;
    assert_eq!(status, 202, "{filed}");
    for elsewhere in ["child-9Z-0", "child-never-seen"] {
        let (status, answer) = send(
            &service,
            &head,
            Method::POST,
            "/v1/privacy/requests",
            Some(request(elsewhere)),
        )
        .await;
        assert_eq!(status, 403, "{elsewhere}: {answer}");
    }
    let (status, mine) = send(&service, &head, Method::GET, "/v1/privacy/requests", None).await;
    assert_eq!(status, 200);
    assert_eq!(mine["requests"].as_array().unwrap().len(), 1, "{mine}");
    assert_eq!(mine["requests"][0]["id"], filed["id"]);
    let (status, _) = send(
        &service,
        &researcher,
        Method::POST,
        "/v1/privacy/requests",
        Some(request("child-4A-0")),
    )
    .await;
    assert_eq!(status, 403, "a researcher files no request");

    // Neither may read experiment results or decide for a child.
    for token in [&head, &researcher] {
        let (status, _) = send(&service, token, Method::GET, "/v1/experiments", None).await;
        assert_eq!(status, 403);
        let grant = json!({"subject": "child-4A-0", "scope": "analytics", "granted": true});
        let (status, _) = send(&service, token, Method::POST, "/v1/consent", Some(grant)).await;
        assert_eq!(status, 403);
    }
    // A refusal for a role is audited under the caller's name and role.
    let refused_roles: Vec<Value> = audit_entries(&service)
        .into_iter()
        .filter(|e| e["action"] == "auth.refused" && e["status"] == 403)
        .collect();
    for role in ["school_admin", "researcher"] {
        assert!(
            refused_roles.iter().any(|e| e["role"] == role
                && e["who"]
                    .as_str()
                    .unwrap()
                    .starts_with(&format!("{role}:r_"))),
            "{role}: {refused_roles:?}"
        );
    }
    // Every researcher query is audited, refused ones too.
    let audited: Vec<Value> = audit_entries(&service)
        .into_iter()
        .filter(|e| e["role"] == "researcher" && e["action"] == "sql.adhoc")
        .collect();
    assert_eq!(audited.len(), 5, "{audited:?}");
    assert_eq!(audited.iter().filter(|e| e["status"] == 403).count(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issuer_keys_are_fetched_again_on_schedule() {
    let provider = OidcProvider::start();
    let mut issuer = issuer_config(&provider);
    issuer.jwks_refresh = Duration::from_millis(300);
    let service = Service::start_with(|config| {
        config.auth.tokens = role_tokens();
        config.auth.oidc = vec![issuer];
    })
    .await;
    let keys_held = |count: f64, what: &'static str| {
        let (service, issuer) = (&service, provider.issuer.clone());
        until(Duration::from_secs(10), what, move || {
            let issuer = issuer.clone();
            async move {
                let metrics = service.get_text("/metrics").await;
                let held = metrics
                    .lines()
                    .find(|l| l.starts_with("flagstream_oidc_keys{") && l.contains(&issuer))
                    .and_then(|l| l.rsplit(' ').next())
                    .and_then(|v| v.parse::<f64>().ok());
                if held == Some(count) {
                    Ok(())
                } else {
                    Err(format!("{held:?}"))
                }
            }
        })
    };
    keys_held(1.0, "the first key set is held").await;
    // The provider rotates; no token names the new key, yet the schedule picks it up.
    provider.rotate().await;
    keys_held(2.0, "the rotated key set is held").await;
    let metrics = service.get_text("/metrics").await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("flagstream_oidc_key_fetches_total")
                && l.contains("reason=\"schedule\"")
                && l.contains("outcome=\"ok\"")),
        "scheduled fetches are counted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_document_declares_the_openid_connect_scheme() {
    let service = Service::start().await;
    let (status, doc) = service.get_json("/openapi.json").await;
    assert_eq!(status, 200);
    let scheme = &doc["components"]["securitySchemes"]["oidc"];
    assert_eq!(scheme["type"], "openIdConnect", "{scheme}");
    assert!(
        scheme["openIdConnectUrl"]
            .as_str()
            .unwrap()
            .ends_with("/.well-known/openid-configuration")
    );
    for (path, method) in [
        ("/v1/me", "get"),
        ("/v1/consent", "post"),
        ("/v1/privacy/requests", "get"),
        ("/v1/privacy/requests/{id}/export", "get"),
        ("/v1/sql", "post"),
    ] {
        let security = doc["paths"][path][method]["security"].to_string();
        assert!(security.contains("oidc"), "{method} {path}: {security}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_down_at_start_is_picked_up_once_it_answers() {
    let mut provider = OidcProvider::start();
    let token = provider.sign_in("parent-a").await;
    provider.stop();
    let service = service_trusting(&provider, |_| {}).await;
    let (status, challenge, body) = status_and_challenge(&service, &token).await;
    assert_eq!(status, 401, "{body}");
    assert!(challenge.contains("invalid_token"), "{challenge}");
    assert!(
        body["error_description"]
            .as_str()
            .unwrap()
            .contains("could not be fetched yet"),
        "{body}"
    );
    // The service answers everything else meanwhile.
    assert_eq!(service.get_json("/healthz").await.0, 200);
    provider.resume();
    until(
        Duration::from_secs(10),
        "the provider's keys were fetched",
        || async {
            let (status, _, body) = status_and_challenge(&service, &token).await;
            if status == 200 { Ok(()) } else { Err(body) }
        },
    )
    .await;
}
