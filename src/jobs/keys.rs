//! The data key watcher: reads the data key file every `privacy.key_reload_interval` and
//! puts a rotation in force.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::Stop;
use crate::crypto::KeyRing;
use crate::crypto::Sealer;
use crate::privacy::metrics as privacy_metrics;
use crate::sql::table::RecentEvents;

/// What a rotation changes, and where the keys come from.
pub struct DataKeys {
    /// The data key file.
    pub file: PathBuf,
    /// How often it is read; zero never (keys given in the configuration).
    pub every: Duration,
    /// The write-ahead log's sealer, when the log is encrypted.
    pub sealer: Option<Arc<Sealer>>,
    /// The sealer of the consent ledger, the request journal and the access exports.
    pub records: Arc<Sealer>,
    /// The SQL window and segments.
    pub events: Arc<RecentEvents>,
}

/// Reads the data key file every `privacy.key_reload_interval` and puts a rotation in force:
/// the write-ahead log's sealer, the privacy records' sealer and the SQL segments use the
/// newest key from then on. A file
/// that does not parse, or changes a known version's key, is refused and the ring in force
/// stays.
pub async fn watch(keys: DataKeys, mut ring: KeyRing, mut stop: Stop) {
    let DataKeys {
        file,
        every,
        sealer,
        records,
        events,
    } = keys;
    if every.is_zero() {
        return;
    }
    privacy_metrics::data_key_in_force(ring.newest().0);
    let mut tick = tokio::time::interval(every);
    loop {
        if !stop.tick(&mut tick).await {
            return;
        }
        let Ok(text) = tokio::fs::read_to_string(&file).await else {
            continue;
        };
        let refuse = |why: String| {
            privacy_metrics::data_key_reloaded(false);
            tracing::error!(file = %file.display(), "data key file not taken: {why}; the keys in force stay");
        };
        let Ok(read) = KeyRing::parse(&text) else {
            refuse("it is not `<version> <64 hex>` lines".into());
            continue;
        };
        match ring.extended_with(&read) {
            Err(version) => refuse(format!(
                "it changes the key of version {version}, whose data would no longer open"
            )),
            Ok((_, false)) => {}
            Ok((rotated, true)) => {
                let missing = rotated.missing_from(&read);
                if !missing.is_empty() {
                    tracing::warn!(versions = ?missing, "data key versions left out of the file are kept in memory; data sealed with them will not open after a restart");
                }
                if let Some(sealer) = &sealer {
                    sealer.rotate(&rotated);
                }
                records.rotate(&rotated);
                events.rotate_keys(rotated.clone());
                ring = rotated;
                let newest = ring.newest().0;
                privacy_metrics::data_key_in_force(newest);
                privacy_metrics::data_key_reloaded(true);
                tracing::info!(
                    version = newest,
                    "data key rotated: new records and segments use it"
                );
            }
        }
    }
}
