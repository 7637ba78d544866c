//! The issuers' keys: each trusted OpenID Connect issuer's discovery document and key set,
//! fetched at start and then every `jwks_refresh` (every `jwks_min_interval` while no fetch
//! has succeeded yet, so a provider that was down at start is picked up soon). A failed fetch
//! keeps the keys held in force.

use std::sync::Arc;

use super::Stop;
use crate::identity::oidc::{FetchReason, Issuer};

/// Keeps `issuer`'s keys fresh until `stop`.
pub async fn refresh(issuer: Arc<Issuer>, mut stop: Stop) {
    let mut reason = FetchReason::Start;
    loop {
        let fetched = issuer.fetch(reason).await.is_ok();
        reason = FetchReason::Schedule;
        let wait = if fetched || issuer.key_count() > 0 {
            issuer.refresh_every()
        } else {
            issuer.retry_every()
        };
        tokio::select! {
            () = stop.stopped() => return,
            () = tokio::time::sleep(wait) => {}
        }
    }
}
