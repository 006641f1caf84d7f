//! The outage experiment of the s3gw HA study, as a tool: an S3 workload
//! (PutObject every N ms, SDK retries off) against any endpoint while the
//! backend restarts; every operation and outage recorded ([`stats`]), charts
//! drawn ([`chart`]), the run itself in [`runner`]. The `demo` subcommand runs
//! it locally through the proxy and straight against the backend.

pub mod chart;
pub mod runner;
pub mod stats;
