//! The write-ahead log's metrics.

crate::telemetry::catalog! {
    /// Epochs (group commits) written to the write-ahead log.
    counter WAL_EPOCHS_TOTAL = "flagstream_wal_epochs_total";
    /// Bytes written to the write-ahead log.
    counter WAL_BYTES_TOTAL = "flagstream_wal_bytes_total" in Bytes;
    /// Appends waiting for the write-ahead log writer.
    gauge WAL_QUEUE_DEPTH = "flagstream_wal_queue_depth" from zero;
    /// Time of each fsync of the write-ahead log.
    histogram WAL_FSYNC_DURATION_SECONDS = "flagstream_wal_fsync_duration_seconds" in Seconds;
    /// Write or sync failures of the write-ahead log; after one, ingest stops acknowledging.
    counter WAL_ERRORS_TOTAL = "flagstream_wal_errors_total" from zero;
    /// Damaged write-ahead log records found by recovery.
    counter WAL_CORRUPT_RECORDS_TOTAL = "flagstream_wal_corrupt_records_total" from zero;
    /// Bytes of torn write-ahead log tails cut off by recovery.
    counter WAL_TRUNCATED_BYTES_TOTAL = "flagstream_wal_truncated_bytes_total" in Bytes from zero;
}
