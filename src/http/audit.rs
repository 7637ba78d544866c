//! Auditing of HTTP actions: each audited handler records its caller, action and answer in
//! the audit log (`privacy::audit`).

use super::auth::Principal;
use super::error::ApiError;
use crate::ingest::now_ms;
pub use crate::privacy::audit::AuditLog;

/// Records audited actions under the caller's token name and role.
pub trait Audited {
    /// Records that `who` did `action` (with `detail`), answered with `status`.
    fn record(&self, who: &Principal, action: &str, detail: &str, status: u16);
}

impl Audited for AuditLog {
    fn record(&self, who: &Principal, action: &str, detail: &str, status: u16) {
        self.append(
            now_ms(),
            &who.name,
            who.role.as_str(),
            action,
            detail,
            status,
        );
    }
}

/// The status a handler's result answers with.
pub fn status_of<T>(result: &Result<T, ApiError>) -> u16 {
    match result {
        Ok(_) => 200,
        Err(err) => err.code().status().as_u16(),
    }
}

/// Records the answer to an audited action (its status) and returns the answer.
pub fn audited<T>(
    audit: &AuditLog,
    who: &Principal,
    action: &str,
    detail: &str,
    result: Result<T, ApiError>,
) -> Result<T, ApiError> {
    audit.record(who, action, detail, status_of(&result));
    result
}
