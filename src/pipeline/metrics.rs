//! The pipeline's metrics.

crate::telemetry::catalog! {
    /// Events the pipeline read from the write-ahead log.
    counter PIPELINE_EVENTS_TOTAL = "flagstream_pipeline_events_total" from zero;
    /// Stored events the pipeline could not read; counted, then skipped.
    counter PIPELINE_UNREADABLE_EVENTS_TOTAL = "flagstream_pipeline_unreadable_events_total" from zero;
    /// Epochs read by the pipeline whose counters are not in the store yet.
    gauge PIPELINE_PENDING_EPOCHS = "flagstream_pipeline_pending_epochs" from zero;
    /// How far the counters are behind the newest durable epoch.
    gauge PIPELINE_LAG_SECONDS = "flagstream_pipeline_lag_seconds" in Seconds from zero;
    /// From the end of a cell of the log to its counters being written, per cell and worker.
    histogram PIPELINE_FLUSH_LAG_SECONDS = "flagstream_pipeline_flush_lag_seconds" in Seconds;
    /// The last epoch whose counters are in the store on every worker (the checkpoint).
    gauge PIPELINE_CHECKPOINT_EPOCH = "flagstream_pipeline_checkpoint_epoch";
    /// 1 while the pipeline's dataflow runs; 0 while it waits for cluster peers or restarts.
    gauge PIPELINE_RUNNING = "flagstream_pipeline_running" from zero;
    /// Times the dataflow ended unexpectedly (in a cluster: a peer process was lost) and
    /// started again from its checkpoint.
    counter PIPELINE_RESTARTS_TOTAL = "flagstream_pipeline_restarts_total" from zero;
    /// Subjects with an experiment assignment in the pipeline's state.
    gauge PIPELINE_ASSIGNED_SUBJECTS = "flagstream_pipeline_assigned_subjects";
}
