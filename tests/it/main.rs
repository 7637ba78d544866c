//! Integration tests: the real service on `127.0.0.1:0`, a real `redis-server`, real clients.
//! One test binary, so DataFusion is linked once.

mod cli;
mod deploy;
mod erasure;
mod experiments;
mod flags;
mod harness;
mod identity;
mod ingest;
mod layering;
mod ops;
mod peers;
mod pipeline;
mod privacy;
mod scoped;
mod sql;
mod stream;
