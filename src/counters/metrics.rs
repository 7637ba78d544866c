//! The counter stores' metrics.

crate::telemetry::catalog! {
    /// Counter store writes that failed, by store (redis, embedded) and kind (retryable,
    /// permanent).
    counter COUNTER_ERRORS_TOTAL = "flagstream_store_write_errors_total";
    /// Commands the pipeline sent to Redis; one Lua call counts once.
    counter REDIS_COMMANDS_TOTAL = "flagstream_redis_commands_total" from zero;
}

/// Whether a failed counter store write may succeed when tried again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteFailure {
    /// A connection or timeout problem: tried again.
    Retryable,
    /// The store refused the write itself.
    Permanent,
}

impl WriteFailure {
    const ALL: [Self; 2] = [Self::Retryable, Self::Permanent];

    fn label(self) -> &'static str {
        match self {
            Self::Retryable => "retryable",
            Self::Permanent => "permanent",
        }
    }
}

/// Counts a failed write to the store of that kind (`redis`, `embedded`).
pub fn write_failed(store: &'static str, failure: WriteFailure) {
    metrics::counter!(COUNTER_ERRORS_TOTAL, "store" => store, "kind" => failure.label())
        .increment(1);
}

/// Exports the write failures of both stores at zero (a dashboard tells "none" from "no data").
pub fn start_at_zero() {
    for store in ["redis", "embedded"] {
        for failure in WriteFailure::ALL {
            metrics::counter!(COUNTER_ERRORS_TOTAL, "store" => store, "kind" => failure.label())
                .absolute(0);
        }
    }
}
