//! Who is calling: verified OpenID Connect identities (parents, teachers, schools,
//! researchers) and the relations their tokens carry.
//!
//! - [`oidc`] fetches each trusted issuer's discovery document and keys, keeps them cached
//!   (they keep serving while the issuer is unreachable), and verifies access tokens with
//!   `jsonwebtoken` (signature, `iss`, `aud`, `exp`, `nbf`, the allowed algorithms);
//! - [`claims`] reads the role and relations out of verified claims, by the configured claim
//!   names (pure);
//! - [`principal`] is the caller as every handler sees it, static token or verified identity,
//!   and answers "may act for this child?", "may see this class?".

pub mod claims;
pub mod metrics;
pub mod oidc;
pub mod principal;

pub use claims::{ClaimError, Relations};
pub use oidc::{TokenError, Verified, Verifier};
pub use principal::{Identity, Principal};
