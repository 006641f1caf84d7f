//! Outcomes as types: how a request, its stay in the hold queue, a replay, a
//! probe, an outage check, a quarantine decision and a reload ended.
//!
//! Each is a closed enum declared with [`labels!`], which gives it one
//! `as_str` (the name in log lines, JSON and metric labels) and one `ALL`
//! (every value, from which [`crate::metrics`] creates each labelled series
//! at zero), so a value cannot be logged under one name and counted under
//! another, or be missing from the exposition until it first happens. The
//! gate's [`crate::gate::DownReason`] and [`crate::gate::Phase`] are declared
//! the same way.

/// Declares an enum of label values: each variant with its name, and from
/// that one list `ALL`, `as_str` and `Display`.
macro_rules! labels {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident {
            $($(#[$variant_meta:meta])* $variant:ident => $label:literal,)+
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        $vis enum $name {
            $($(#[$variant_meta])* $variant,)+
        }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant,)+];

            /// The stable name for logs, JSON and metric labels.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $label,)+
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

pub(crate) use labels;

labels! {
    /// How one request ended, in its access-log line: `ok` (the backend's
    /// answer went out whole), a cut response, or why the proxy answered
    /// itself (one per [`crate::s3_error::ProxyError`]).
    pub enum RequestOutcome {
        Ok => "ok",
        /// The client left, or took nothing for `listener.send_timeout`,
        /// before the response ended.
        ResponseCut => "response_cut",
        /// The backend failed while the response streamed.
        ResponseAborted => "response_aborted",
        QueueFull => "queue_full",
        ClientShare => "client_share",
        HoldTimeout => "hold_timeout",
        FailFast => "fail_fast",
        NotReplayable => "not_replayable",
        BadGateway => "bad_gateway",
        ShuttingDown => "shutting_down",
        ClientGone => "client_gone",
        ClientBody => "client_body",
        ClientTimeout => "client_timeout",
        InvalidUri => "invalid_uri",
        TooManyConnections => "too_many_connections",
        /// Waited `backend.queue_timeout` for one of `backend.max_connections`.
        BackendBusy => "backend_busy",
        ExpectationFailed => "expectation_failed",
        Quarantined => "quarantined",
        SlowBackend => "slow_backend",
        /// Held until its signature was about to end (S3's
        /// `RequestTimeTooSkewed`, or an expired presigned URL).
        SignatureExpired => "signature_expired",
        /// Its response was lost in a backend failure; read back, the
        /// backend stores its bytes: answered the success it would have got.
        Settled => "settled",
    }
}

labels! {
    /// How a request that met the hold queue ended (`s3fp_hold_outcomes_total`).
    pub enum HoldOutcome {
        /// Held, released, answered by the backend.
        Released => "released",
        /// Held, released, then failed (the backend failed again and no
        /// replay was safe).
        ReleasedFailed => "released_failed",
        TimedOut => "timed_out",
        QueueFull => "queue_full",
        /// The client already held its share of the queue.
        ClientShare => "client_share",
        FailFast => "fail_fast",
        ClientGone => "client_gone",
        /// Still held when the shutdown grace ended: answered `503`.
        ShuttingDown => "shutting_down",
        /// Held until its signature was about to end: answered `403`.
        SignatureExpired => "signature_expired",
    }
}

impl HoldOutcome {
    /// How the hold queue figured in a request that ended with `outcome`,
    /// if it did; `was_held` when the request met the queue.
    pub fn of(outcome: RequestOutcome, was_held: bool) -> Option<HoldOutcome> {
        match outcome {
            RequestOutcome::QueueFull => Some(HoldOutcome::QueueFull),
            RequestOutcome::ClientShare => Some(HoldOutcome::ClientShare),
            RequestOutcome::FailFast => Some(HoldOutcome::FailFast),
            RequestOutcome::HoldTimeout => Some(HoldOutcome::TimedOut),
            // A request dropped while at the backend (an HTTP/2 stream
            // reset) was never in the queue.
            RequestOutcome::ClientGone if was_held => Some(HoldOutcome::ClientGone),
            RequestOutcome::ShuttingDown if was_held => Some(HoldOutcome::ShuttingDown),
            RequestOutcome::SignatureExpired => Some(HoldOutcome::SignatureExpired),
            RequestOutcome::Ok | RequestOutcome::Settled if was_held => Some(HoldOutcome::Released),
            _ if was_held => Some(HoldOutcome::ReleasedFailed),
            _ => None,
        }
    }

    /// True when the request waited in the queue (rather than being turned away).
    pub fn waited(self) -> bool {
        !matches!(
            self,
            HoldOutcome::QueueFull | HoldOutcome::ClientShare | HoldOutcome::FailFast
        )
    }
}

labels! {
    /// How one download cut by a backend failure ended
    /// (`s3fp_download_resumes_total`, [`crate::download_resume`]).
    pub enum ResumeOutcome {
        /// The rest came from the backend and went on to the client.
        Resumed => "resumed",
        /// The object changed while the backend was away (`412`, or another
        /// ETag): the client connection is aborted.
        Changed => "changed",
        /// The request or its first response could not be resumed (a signed
        /// `Range` or `If-Match`, no strong ETag, no length).
        NotResumable => "not_resumable",
        /// A resume was tried and failed (hold timeout, mismatched answer,
        /// backend failure, no resume left).
        Failed => "failed",
    }
}

labels! {
    /// How an ambiguous write was settled (`s3fp_write_settles_total`,
    /// [`crate::write_settle`]): a PutObject, UploadPart or
    /// CompleteMultipartUpload that reached a failing backend.
    pub enum SettleOutcome {
        /// The backend stores exactly the client's bytes: answered success.
        Stored => "stored",
        /// The original's own answer arrived once the backend resumed.
        Answered => "answered",
        /// Not stored: replayed if its body was kept, else `503`.
        Absent => "absent",
        /// Something else stored: replayed if kept, else `503`.
        Different => "different",
        /// Stored, but nothing proves the bytes equal: replayed if kept
        /// (not possible for a kept body with an MD5 ETag), else `503`.
        NoProof => "no_proof",
        /// The read-back got no usable answer (or the hold ended first).
        Failed => "failed",
    }
}

labels! {
    /// Whether a request that reached a failing backend was sent again.
    pub enum ReplayOutcome {
        Replayed => "replayed",
        /// Not idempotent, its body no longer kept, or out of replays.
        RefusedUnsafe => "refused_unsafe",
    }
}

labels! {
    /// What one probe of the backend saw.
    pub enum ProbeResult {
        /// Any HTTP answer but a gateway error.
        Serving => "serving",
        NotServing => "not_serving",
    }
}

impl ProbeResult {
    pub fn of(serving: bool) -> ProbeResult {
        match serving {
            true => ProbeResult::Serving,
            false => ProbeResult::NotServing,
        }
    }

    pub fn is_serving(self) -> bool {
        self == ProbeResult::Serving
    }
}

labels! {
    /// The verdict of the check that follows one request's failure.
    pub enum CheckVerdict {
        /// The backend serves: the failure stays that request's, no outage.
        Serving => "serving",
        /// The backend does not serve: the gate goes down.
        Down => "down",
    }
}

impl CheckVerdict {
    pub fn of(serving: bool) -> CheckVerdict {
        match serving {
            true => CheckVerdict::Serving,
            false => CheckVerdict::Down,
        }
    }
}

labels! {
    /// What the quarantine did with a poison request.
    pub enum QuarantineOutcome {
        /// In flight at two backend crashes: quarantined, not sent again.
        Quarantined => "quarantined",
        /// The same request again while quarantined: answered at once.
        Refused => "refused",
    }
}

labels! {
    /// How a configuration or certificate reload went.
    pub enum ReloadResult {
        Success => "success",
        /// Rejected; what was running stays in force.
        Failure => "failure",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_lists_every_value_once_under_its_own_name() {
        let names: Vec<&str> = RequestOutcome::ALL.iter().map(|o| o.as_str()).collect();
        let mut unique = names.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), names.len(), "{names:?}");
        assert_eq!(RequestOutcome::HoldTimeout.to_string(), "hold_timeout");
    }

    #[test]
    fn a_request_held_until_shutdown_counts_as_shutting_down() {
        assert_eq!(
            HoldOutcome::of(RequestOutcome::ShuttingDown, true),
            Some(HoldOutcome::ShuttingDown)
        );
    }

    #[test]
    fn a_request_its_client_dropped_at_the_backend_has_no_hold_outcome() {
        assert_eq!(HoldOutcome::of(RequestOutcome::ClientGone, false), None);
        assert_eq!(
            HoldOutcome::of(RequestOutcome::ClientGone, true),
            Some(HoldOutcome::ClientGone)
        );
    }

    #[test]
    fn only_requests_that_met_the_queue_have_a_hold_outcome() {
        assert_eq!(HoldOutcome::of(RequestOutcome::Ok, false), None);
        assert_eq!(
            HoldOutcome::of(RequestOutcome::Ok, true),
            Some(HoldOutcome::Released)
        );
        assert_eq!(
            HoldOutcome::of(RequestOutcome::BadGateway, true),
            Some(HoldOutcome::ReleasedFailed)
        );
    }
}
