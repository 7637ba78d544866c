//! Keys and sealing, a leaf every store uses: the versioned key rings of the pseudonymization
//! pepper and the data key ([`keys`]), and AES-256-GCM sealing of write-ahead log records
//! ([`seal`]). No component logic lives here.

pub mod keys;
pub mod seal;

pub use keys::{KeyError, KeyRing, to_hex};
pub use seal::Sealer;
