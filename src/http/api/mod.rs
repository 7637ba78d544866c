//! The handlers, one file per area of the API. A handler translates HTTP to a call of the
//! component it fronts and the answer back: parsing, authorization, audit and status codes
//! live here, the work below.

pub mod cohorts;
pub mod consent;
pub mod experiments;
pub mod flags;
pub mod ingest;
pub mod me;
pub mod ops;
pub mod requests;
pub mod retention;
pub mod sql;
pub mod stream;
