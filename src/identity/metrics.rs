//! Identity's metrics: tokens checked, and the issuers' keys.

crate::telemetry::catalog! {
    /// OpenID Connect access tokens checked, by issuer and outcome (accepted, or why not:
    /// expired, signature, audience...).
    counter OIDC_TOKENS_TOTAL = "flagstream_oidc_tokens_total";
    /// Fetches of an issuer's discovery document and keys, by issuer, reason (start,
    /// schedule, unknown_kid) and outcome (ok, failed, skipped: refused by the rate limit).
    counter OIDC_KEY_FETCHES_TOTAL = "flagstream_oidc_key_fetches_total";
    /// Keys held for each issuer (0 until its first fetch succeeds).
    gauge OIDC_KEYS = "flagstream_oidc_keys";
    /// When each issuer's keys were last fetched successfully (Unix seconds).
    gauge OIDC_KEYS_FETCHED_AT = "flagstream_oidc_keys_fetched_at_seconds" in Seconds;
}
