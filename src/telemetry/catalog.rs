//! The one way a component declares its metrics: each is written once, with its doc comment,
//! and that comment is both the Rust documentation of the name and the `# HELP` text
//! Prometheus shows. A metric marked `from zero` is exported at zero from the start, so a
//! dashboard or an alert can tell "no errors" from "no data".
//!
//! This module is a leaf: components use the macro, and `telemetry::install` calls the
//! `describe()` each component's catalog generates.

/// Declares a component's metrics.
///
/// ```ignore
/// crate::telemetry::catalog! {
///     /// Bytes written to the write-ahead log.
///     counter WAL_BYTES_TOTAL = "flagstream_wal_bytes_total" in Bytes;
///     /// Write or sync failures of the write-ahead log.
///     counter WAL_ERRORS_TOTAL = "flagstream_wal_errors_total" from zero;
/// }
/// ```
///
/// generates a `pub const` per metric and a `pub fn describe()` that describes them all.
macro_rules! catalog {
    ($(
        $(#[doc = $doc:literal])+
        $kind:ident $name:ident = $metric:literal $(in $unit:ident)? $(from $zero:ident)?;
    )*) => {
        $(
            $(#[doc = $doc])+
            pub const $name: &str = $metric;
        )*

        /// Describes this component's metrics to the recorder and exports the ones marked
        /// `from zero` at zero.
        pub fn describe() {
            $(
                $crate::telemetry::catalog!(@describe $kind $name [$($unit)?] concat!($($doc),+));
                $( $crate::telemetry::catalog!(@$zero $kind $name); )?
            )*
        }
    };
    (@describe counter $name:ident [$($unit:ident)?] $help:expr) => {
        ::metrics::describe_counter!($name, $(::metrics::Unit::$unit,)? $help.trim())
    };
    (@describe gauge $name:ident [$($unit:ident)?] $help:expr) => {
        ::metrics::describe_gauge!($name, $(::metrics::Unit::$unit,)? $help.trim())
    };
    (@describe histogram $name:ident [$($unit:ident)?] $help:expr) => {
        ::metrics::describe_histogram!($name, $(::metrics::Unit::$unit,)? $help.trim())
    };
    (@zero counter $name:ident) => {
        ::metrics::counter!($name).absolute(0)
    };
    (@zero gauge $name:ident) => {
        ::metrics::gauge!($name).increment(0.0)
    };
}

pub(crate) use catalog;
