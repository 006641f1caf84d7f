//! s3-failover-proxy: an S3 ingress that makes a restart of its one backend
//! invisible to clients.
//!
//! A request arrives on the S3 listener ([`server`], [`listener`]; each
//! connection is served on one of the [`lanes`], a thread with an event loop
//! of its own and its part of the backend pool; an idle
//! HTTP/1.1 connection holds no buffers between requests, [`keep_alive`],
//! and rests outside any task, [`resting`]; [`heap_trim`] gives the memory
//! they freed back to the system; a head with many fields or a large body
//! is served by a hyper connection of another kind, [`round_kind`], large
//! bodies in large reads within the [`read_budget`]; with
//! `listener.raw_http1`, plain GETs and HEADs skip hyper on the
//! [`raw_http1`] path: heads chosen by [`raw_head`], sent and answered by
//! [`raw_exchange`] on [`raw_backend`] connections, large bodies moved by
//! [`splice`], cut downloads resumed by [`raw_resume`])
//! and is handled by the [`proxy`]: it asks the [`gate`] for admission. While the
//! backend is Up the gate admits at once and the request streams to the
//! backend through the [`upstream`] connection pool (a response body that
//! arrives fast is read in large reads within the [`read_budget`]), its
//! body wrapped by
//! [`replay`] so a second attempt stays possible (within the
//! [`replay_memory`] budget) and sent as its [`delivery`]
//! allows (`Expect: 100-continue` honoured end to end; a connection answered
//! before the body ended is never reused). When an attempt fails, the
//! upstream error says whether any byte reached the backend; a refused
//! connect takes the gate Down at once, any other failure only once the
//! [`probe`] confirms the backend does not serve (slow is not dead, a silent
//! client is the client's fault). The request is then held (nothing sent),
//! replayed (idempotent, body still kept) or answered with an S3 error from
//! [`s3_error`]; a write whose answer was lost is first read back
//! ([`write_settle`], with a key [`settle_key`] checks at start) and
//! answered as stored when the backend has its bytes; a request that
//! crashes the backend twice is stopped by the [`quarantine`], and the
//! operations S3 servers take long to answer are
//! named in [`s3_operation`]. While Down, new requests wait in the gate's
//! bounded FIFO queue, each no longer than its signature allows
//! ([`signature_expiry`]), its outcome named in [`outcome`]; the probe asks the backend at a short interval whether
//! it serves again, and on its first yes the gate resumes and releases the
//! queue in arrival order, a few at a time (held requests for one object,
//! its [`object_lane`], one after the other). The [`admin`] listener pauses and
//! resumes the gate for planned switch-overs and reports status; [`drain`]
//! counts what is in flight; [`peer`] notices clients that leave while held;
//! [`headers`] does the RFC 9110 hop-by-hop and forwarding work ([`s3_header`]
//! names the S3 fields read on every request) and
//! [`request_target`] refuses targets the URI parser would cut; [`response`]
//! streams answers back ([`download_resume`] continues a download cut by a
//! crash once the backend is back) and [`access_log`] writes one line per
//! request and feeds [`metrics`]. On Kubernetes, [`kubernetes`] watches the
//! Service's EndpointSlices into the pure [`discovery`] index and moves the
//! [`backend_target`], which the upstream and the probe both follow, to the
//! usable pod, holding while none is; it also follows the pause Lease. TLS is
//! in [`tls`] (certificates), [`listener`] (HTTPS accept loop) and
//! [`connector`] (HTTPS to the backend). [`config`] reads the TOML file and
//! [`settings`] derives each component's settings from it, at start
//! ([`server`]) and when [`reload`] applies a changed file live; every file
//! the proxy trusts (config, certificates, keys, the [`admin_token`] that
//! guards `/admin/*`) is read through [`trusted_file`], which refuses
//! world-writable and oversized ones. [`shutdown`] moves every client
//! connection through the drain, and [`handover`] passes the listening
//! sockets to a new process for a hot upgrade on one host.

// Denied, not forbidden: one call into glibc (`heap_trim::trim`) is allowed
// by name; nothing else may use `unsafe`.
#![deny(unsafe_code)]

pub mod access_log;
pub mod admin;
pub mod admin_token;
pub mod backend_address;
pub mod backend_slots;
pub mod backend_target;
pub mod client_identity;
pub mod client_pace;
pub mod config;
pub mod connector;
pub mod delivery;
pub mod discovery;
pub mod download_resume;
pub mod drain;
pub mod gate;
pub mod h2_heads;
pub mod handover;
pub mod headers;
pub mod heap_trim;
pub mod keep_alive;
pub mod kubernetes;
pub mod lanes;
pub mod listener;
pub mod logging;
pub mod metrics;
pub mod object_lane;
pub mod outbound;
pub mod outcome;
pub mod peer;
pub mod probe;
pub mod proxy;
pub mod quarantine;
pub mod raw_backend;
pub mod raw_exchange;
pub mod raw_head;
pub mod raw_http1;
pub mod raw_resume;
pub mod read_budget;
pub mod reload;
pub mod replay;
pub mod replay_memory;
pub mod request_target;
pub mod response;
pub mod resting;
pub mod round_kind;
pub mod s3_error;
pub mod s3_header;
pub mod s3_operation;
pub mod send_timeout;
pub mod server;
pub mod settings;
pub mod settle_key;
pub mod shutdown;
pub mod signature_expiry;
pub mod splice;
pub mod tls;
pub mod trusted_file;
pub mod upstream;
pub mod write_settle;

pub use config::Config;
pub use server::{Listeners, run, run_with_reload};
