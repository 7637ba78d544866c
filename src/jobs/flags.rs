//! The flag watcher: looks at the flag directory every `flags.reload_interval` and reloads it
//! when a file changed (the store keeps serving the flags in force meanwhile, and keeps them
//! when the new files are broken).

use std::sync::Arc;
use std::time::Duration;

use super::Stop;
use crate::flags::FlagStore;

/// Watches `store`'s directory every `every` until `stop`.
pub async fn watch(store: Arc<FlagStore>, every: Duration, mut stop: Stop) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick completes at once; the store was loaded at start.
    tick.tick().await;
    while stop.tick(&mut tick).await {
        let store = store.clone();
        if tokio::task::spawn_blocking(move || store.reload_if_changed())
            .await
            .is_err()
        {
            return;
        }
    }
}
