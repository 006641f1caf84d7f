//! Which kind of hyper connection serves a round of an HTTP/1.1 client
//! connection ([`crate::keep_alive`]), chosen head by head by the watch that
//! follows the connection's bytes ([`crate::request_target::TargetWatch`]).
//!
//! hyper takes two of its settings for a whole connection, and each costs
//! every request what only a few need:
//! - `max_headers`: once set, hyper allocates and fills two arrays of that
//!   many field slots for every head it parses; unset, it parses into 100
//!   slots on the stack. At the proxy's default of 500 that was 6 000 of
//!   78 000 instructions per small GET (callgrind, `benches/small_requests.sh`
//!   against nginx). So a round is [`RoundKind::Common`] (hyper's default)
//!   until a head has more than [`COMMON_FIELDS`] fields (radosgw takes
//!   hundreds; `listener.max_headers` allows 500 by default) or does not
//!   come whole in one read (its fields are then counted by hyper as they
//!   come): that head and the rest of the round's connection go to a
//!   [`RoundKind::ManyFields`] round.
//! - `max_buf_size`: hyper's largest read is also its limit on a request
//!   head and on the response bytes it queues. A request whose
//!   `Content-Length` body is at least `listener.max_read_bytes` goes to a
//!   [`RoundKind::LargeBodies`] round, whose reads are that large, while the
//!   [`ReadBudget`] has room for one more connection's large reads; the first
//!   other head goes back.
//!
//! A switch happens only between requests: the watch holds the head that
//! needs another kind until hyper has answered every request before it,
//! the round ends, and the next one starts with the held bytes.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::read_budget::{READS_HELD, ReadBudget, Share};

/// Header fields per request head in a [`RoundKind::Common`] round: hyper's
/// own default (`DEFAULT_MAX_HEADERS` in hyper's `proto::h1::role`).
pub const COMMON_FIELDS: usize = 100;

/// The hyper settings of one round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoundKind {
    /// At most [`COMMON_FIELDS`] fields per head (fewer when
    /// `listener.max_headers` is lower), reads up to
    /// `listener.max_head_bytes`.
    Common,
    /// Up to `listener.max_headers` fields per head.
    ManyFields,
    /// Up to `listener.max_headers` fields, reads up to
    /// `listener.max_read_bytes`: requests with large bodies only.
    LargeBodies,
    /// Heads the raw path takes ([`crate::raw_head::is_raw`]), served
    /// without hyper (`listener.raw_http1`, [`crate::raw_http1`]); hyper
    /// serves what the raw path hands over with the settings of a
    /// [`RoundKind::Common`] round.
    Raw,
}

/// What the watch saw of a request head, as far as the kind of round goes.
#[derive(Debug, Clone, Copy)]
pub struct HeadSeen {
    /// Whole in one read (else its fields are hyper's to count).
    pub whole: bool,
    /// More than [`COMMON_FIELDS`] fields.
    pub many_fields: bool,
    /// Its `Content-Length` body, when it has one.
    pub content_length: Option<u64>,
    /// One the raw path takes ([`crate::raw_head::is_raw`]).
    pub raw: bool,
    /// An upload the raw path may take ([`crate::raw_head::raw_upload`]),
    /// when its body is large enough ([`RoundKinds::with_raw_uploads`]).
    pub raw_upload: bool,
}

/// Large request bodies read in rounds of their own, within a budget.
#[derive(Debug)]
pub struct LargeBodyReads {
    budget: Arc<ReadBudget>,
    /// What one connection's large reads take from the budget.
    share_bytes: usize,
    /// The smallest body read in a round of its own (`listener.max_read_bytes`).
    min_body: u64,
    /// Held while the connection may read large (hyper's buffer may grow).
    share: Option<Share>,
}

impl LargeBodyReads {
    /// Large reads of up to `max_read_bytes` within `budget`.
    pub fn new(budget: Arc<ReadBudget>, max_read_bytes: usize) -> LargeBodyReads {
        LargeBodyReads {
            budget,
            share_bytes: max_read_bytes.saturating_mul(READS_HELD),
            min_body: max_read_bytes as u64,
            share: None,
        }
    }

    /// Whether a body of `length` bytes is read large; takes the share
    /// that needs, if the budget has it.
    fn takes(&mut self, length: u64) -> bool {
        if length < self.min_body {
            return false;
        }
        if self.share.is_none() {
            self.share = self.budget.take(self.share_bytes);
        }
        self.share.is_some()
    }
}

/// The kind of round a connection is served in, and the switch to another.
#[derive(Debug)]
pub struct RoundKinds {
    kind: RoundKind,
    /// The kind the held head waits for.
    next: RoundKind,
    /// `listener.max_headers` is over [`COMMON_FIELDS`].
    many_fields: bool,
    large: Option<LargeBodyReads>,
    /// Heads the raw path takes are served in [`RoundKind::Raw`] rounds.
    raw: bool,
    /// The smallest upload body served in a raw round, in bytes.
    raw_uploads_from: Option<u64>,
    /// Read, not followed yet: from a head that needs a round of another
    /// kind on; followed when that round starts (`replay`).
    pub(crate) unfollowed: Vec<u8>,
    /// The round `unfollowed` waits for has started.
    pub(crate) replay: bool,
    /// hyper has everything before `unfollowed` and waits for more: the
    /// round may end (see [`RoundKinds::switch_signal`]).
    switch_due: Arc<AtomicBool>,
}

impl RoundKinds {
    /// Rounds for a listener that takes `max_headers` fields per head
    /// (`listener.max_headers`), with `large` body reads or not, with `raw`
    /// rounds or not (then the first round is raw); `None` when every round
    /// would be of one kind (the `ManyFields` one).
    pub fn new(max_headers: usize, large: Option<LargeBodyReads>, raw: bool) -> Option<RoundKinds> {
        let many_fields = max_headers > COMMON_FIELDS;
        if !many_fields && large.is_none() && !raw {
            return None;
        }
        let first = if raw {
            RoundKind::Raw
        } else {
            RoundKind::Common
        };
        Some(RoundKinds {
            kind: first,
            next: first,
            many_fields,
            large,
            raw,
            raw_uploads_from: None,
            unfollowed: Vec::new(),
            replay: false,
            switch_due: Arc::default(),
        })
    }

    /// With raw rounds, uploads ([`crate::raw_head::raw_upload`]) of at
    /// least `from` bytes are served in them too, their bodies spliced
    /// ([`crate::raw_http1`]).
    pub fn with_raw_uploads(mut self, from: u64) -> RoundKinds {
        self.raw_uploads_from = Some(from);
        self
    }

    /// The kind of the round being served.
    pub fn kind(&self) -> RoundKind {
        self.kind
    }

    /// The kind of round a head needs, when not this round's. (A
    /// `ManyFields` round keeps what it has: heads of many fields tend to
    /// come together, and a switch waits for every answer before it.)
    pub(crate) fn switch_for(&mut self, head: HeadSeen) -> Option<RoundKind> {
        let raw_upload = head.raw_upload
            && head
                .content_length
                .zip(self.raw_uploads_from)
                .is_some_and(|(length, from)| length >= from);
        if self.raw && (head.raw || raw_upload) {
            return self.switch_to(RoundKind::Raw);
        }
        let large = head.whole
            && head
                .content_length
                .zip(self.large.as_mut())
                .is_some_and(|(length, large)| large.takes(length));
        let many_fields = self.many_fields
            && (head.many_fields || !head.whole || self.kind == RoundKind::ManyFields);
        let kind = match (large, many_fields) {
            (true, _) => RoundKind::LargeBodies,
            (false, true) => RoundKind::ManyFields,
            (false, false) => RoundKind::Common,
        };
        self.switch_to(kind)
    }

    /// `kind`, when not this round's.
    fn switch_to(&mut self, kind: RoundKind) -> Option<RoundKind> {
        if kind == self.kind {
            return None;
        }
        self.next = kind;
        Some(kind)
    }

    /// Waiting for a round of another kind.
    pub(crate) fn switching(&self) -> bool {
        !self.unfollowed.is_empty() && !self.replay
    }

    /// The raw path handed its round to hyper (an outage, an answer it
    /// does not pass on): the round goes on as the [`RoundKind::Common`]
    /// one it is served as, so that the next head the raw path takes gets
    /// a raw round again ([`RoundKinds::switch_for`]) instead of waiting
    /// for the connection to rest.
    pub(crate) fn handed_over(&mut self) {
        if self.kind == RoundKind::Raw {
            self.kind = RoundKind::Common;
        }
    }

    /// The round the held head waits for starts: leaving a large round
    /// gives its share back.
    pub(crate) fn start_next(&mut self) {
        self.kind = self.next;
        if self.kind != RoundKind::LargeBodies
            && let Some(large) = self.large.as_mut()
        {
            large.share = None;
        }
        self.replay = true;
        self.switch_due.store(false, Ordering::Relaxed);
    }

    /// A flag set while the watch waits for a round of another kind: hyper
    /// has every byte before the head that needs it and asked for more.
    pub(crate) fn switch_signal(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.switch_due)
    }

    /// Tells the round it may end (see [`RoundKinds::switch_signal`]).
    pub(crate) fn switch_is_due(&self) {
        self.switch_due.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(fields: usize, whole: bool, content_length: Option<u64>) -> HeadSeen {
        HeadSeen {
            whole,
            many_fields: fields > COMMON_FIELDS,
            content_length,
            raw: false,
            raw_upload: false,
        }
    }

    #[test]
    fn with_the_raw_path_on_rounds_start_raw_and_go_back_for_raw_heads() {
        let mut rounds = RoundKinds::new(500, None, true).expect("raw rounds");
        assert_eq!(rounds.kind(), RoundKind::Raw);
        let raw = HeadSeen {
            raw: true,
            ..head(3, true, None)
        };
        assert_eq!(switched(&mut rounds, raw), None);
        assert_eq!(
            switched(&mut rounds, head(3, true, Some(5))),
            Some(RoundKind::Common)
        );
        assert_eq!(
            switched(&mut rounds, head(101, true, None)),
            Some(RoundKind::ManyFields)
        );
        assert_eq!(switched(&mut rounds, raw), Some(RoundKind::Raw));
    }

    #[test]
    fn uploads_from_the_raw_upload_size_on_stay_raw_smaller_ones_go_to_hyper() {
        let mut rounds = RoundKinds::new(100, None, true)
            .expect("raw rounds")
            .with_raw_uploads(1 << 20);
        let upload = |length| HeadSeen {
            raw_upload: true,
            ..head(3, true, Some(length))
        };
        assert_eq!(switched(&mut rounds, upload(1 << 20)), None);
        assert_eq!(
            switched(&mut rounds, upload((1 << 20) - 1)),
            Some(RoundKind::Common)
        );
        assert_eq!(switched(&mut rounds, upload(5 << 30)), Some(RoundKind::Raw));
        let mut without = RoundKinds::new(100, None, true).expect("raw rounds");
        assert_eq!(
            switched(&mut without, upload(5 << 30)),
            Some(RoundKind::Common)
        );
    }

    fn switched(rounds: &mut RoundKinds, seen: HeadSeen) -> Option<RoundKind> {
        let next = rounds.switch_for(seen);
        if next.is_some() {
            rounds.start_next();
        }
        next
    }

    #[test]
    fn a_head_of_many_fields_or_in_pieces_moves_to_a_many_fields_round_for_good() {
        let mut rounds = RoundKinds::new(500, None, false).expect("rounds differ");
        assert_eq!(rounds.kind(), RoundKind::Common);
        assert_eq!(switched(&mut rounds, head(100, true, None)), None);
        assert_eq!(
            switched(&mut rounds, head(101, true, None)),
            Some(RoundKind::ManyFields)
        );
        assert_eq!(switched(&mut rounds, head(3, true, None)), None);
        let mut rounds = RoundKinds::new(500, None, false).expect("rounds differ");
        assert_eq!(
            switched(&mut rounds, head(3, false, None)),
            Some(RoundKind::ManyFields)
        );
    }

    #[test]
    fn with_at_most_a_hundred_fields_allowed_every_round_is_common() {
        assert!(RoundKinds::new(100, None, false).is_none());
        let budget = Arc::new(ReadBudget::new(4 << 20, 512 << 10));
        let large = LargeBodyReads::new(Arc::clone(&budget), 512 << 10);
        let mut rounds = RoundKinds::new(64, Some(large), false).expect("large rounds");
        assert_eq!(switched(&mut rounds, head(101, false, None)), None);
        assert_eq!(
            switched(&mut rounds, head(3, true, Some(1 << 20))),
            Some(RoundKind::LargeBodies)
        );
        assert_eq!(
            switched(&mut rounds, head(3, true, None)),
            Some(RoundKind::Common)
        );
    }

    #[test]
    fn a_large_body_takes_a_share_and_gives_it_back_when_the_round_ends() {
        let budget = Arc::new(ReadBudget::new(3 * (512 << 10), 512 << 10));
        let large = LargeBodyReads::new(Arc::clone(&budget), 512 << 10);
        let mut rounds = RoundKinds::new(500, Some(large), false).expect("rounds differ");
        assert_eq!(
            switched(&mut rounds, head(3, true, Some((512 << 10) - 1))),
            None
        );
        assert_eq!(
            switched(&mut rounds, head(120, true, Some(512 << 10))),
            Some(RoundKind::LargeBodies)
        );
        assert!(budget.take(1).is_none(), "the share is taken");
        assert_eq!(switched(&mut rounds, head(3, true, Some(1 << 30))), None);
        assert_eq!(
            switched(&mut rounds, head(120, true, None)),
            Some(RoundKind::ManyFields)
        );
        assert!(budget.take(1).is_some(), "the share is back");
    }
}
