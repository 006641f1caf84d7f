//! What a run recorded and the study's measures computed from it: RTT
//! percentiles, failures, and per outage the time to frontend-up, the time to
//! the first success, and the extra wait of requests held past frontend-up.
//! Pure functions over the record, unit-tested.

use serde::{Deserialize, Serialize};

/// One S3 operation of the workload. Times are milliseconds from the run start.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Operation {
    pub kind: String,
    pub start_ms: f64,
    pub rtt_ms: f64,
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Operation {
    pub fn end_ms(&self) -> f64 {
        self.start_ms + self.rtt_ms
    }
}

/// One backend outage: when it was taken down and when it served again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Outage {
    pub down_ms: f64,
    pub frontend_up_ms: Option<f64>,
}

/// RTT percentiles in milliseconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

/// The measures of one outage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutageMeasures {
    pub down_ms: f64,
    pub to_frontend_up_ms: Option<f64>,
    /// From going down to the end of the first successful operation sent after it.
    pub to_first_success_ms: Option<f64>,
    /// Operations that overlapped the outage.
    pub overlapping: usize,
    pub failed: usize,
    /// For successful overlapping operations ending after frontend-up: how long
    /// after frontend-up they ended.
    pub extra_wait_ms: Vec<f64>,
}

/// The whole stats file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    pub label: String,
    pub requests: usize,
    pub failed: usize,
    pub rtt_ms: Option<Percentiles>,
    pub extra_wait_after_frontend_up_ms: Option<Percentiles>,
    pub longest_rtt_ms: f64,
    pub outages: Vec<OutageMeasures>,
    pub operations: Vec<Operation>,
    pub outage_windows: Vec<Outage>,
}

/// Nearest-rank percentiles of `values`, or `None` when empty.
pub fn percentiles(values: &[f64]) -> Option<Percentiles> {
    if values.is_empty() {
        return None;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = |p: f64| {
        let index = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
        sorted[index.clamp(1, sorted.len()) - 1]
    };
    Some(Percentiles {
        p50: rank(50.0),
        p90: rank(90.0),
        p99: rank(99.0),
        max: sorted[sorted.len() - 1],
    })
}

/// The outage window an operation is judged against: down until frontend-up
/// (or, if the backend never came back, until the end of time).
fn overlaps(operation: &Operation, outage: &Outage) -> bool {
    let until = outage.frontend_up_ms.unwrap_or(f64::INFINITY);
    operation.start_ms < until && operation.end_ms() > outage.down_ms
}

pub fn measure_outage(outage: &Outage, operations: &[Operation]) -> OutageMeasures {
    let overlapping: Vec<&Operation> = operations
        .iter()
        .filter(|op| overlaps(op, outage))
        .collect();
    // Only requests sent after the backend went down: one that was already
    // answered as the crash happened says nothing about recovery.
    let to_first_success_ms = operations
        .iter()
        .filter(|op| op.ok && op.start_ms >= outage.down_ms)
        .map(|op| op.end_ms() - outage.down_ms)
        .min_by(f64::total_cmp);
    let extra_wait_ms = match outage.frontend_up_ms {
        Some(up) => overlapping
            .iter()
            .filter(|op| op.ok && op.end_ms() > up)
            .map(|op| op.end_ms() - up)
            .collect(),
        None => Vec::new(),
    };
    OutageMeasures {
        down_ms: outage.down_ms,
        to_frontend_up_ms: outage.frontend_up_ms.map(|up| up - outage.down_ms),
        to_first_success_ms,
        overlapping: overlapping.len(),
        failed: overlapping.iter().filter(|op| !op.ok).count(),
        extra_wait_ms,
    }
}

pub fn summarize(label: &str, operations: Vec<Operation>, outages: Vec<Outage>) -> Stats {
    let rtts: Vec<f64> = operations.iter().map(|op| op.rtt_ms).collect();
    let measures: Vec<OutageMeasures> = outages
        .iter()
        .map(|o| measure_outage(o, &operations))
        .collect();
    let extra: Vec<f64> = measures
        .iter()
        .flat_map(|m| m.extra_wait_ms.iter().copied())
        .collect();
    Stats {
        label: label.to_owned(),
        requests: operations.len(),
        failed: operations.iter().filter(|op| !op.ok).count(),
        rtt_ms: percentiles(&rtts),
        extra_wait_after_frontend_up_ms: percentiles(&extra),
        longest_rtt_ms: rtts.iter().copied().fold(0.0, f64::max),
        outages: measures,
        operations,
        outage_windows: outages,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(start: f64, rtt: f64, ok: bool) -> Operation {
        Operation {
            kind: "put".into(),
            start_ms: start,
            rtt_ms: rtt,
            ok,
            error: (!ok).then(|| "503".into()),
        }
    }

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let values: Vec<f64> = (1..=100).map(f64::from).collect();
        let p = percentiles(&values).unwrap();
        assert_eq!((p.p50, p.p90, p.p99, p.max), (50.0, 90.0, 99.0, 100.0));
        assert_eq!(percentiles(&[7.0]).unwrap().p99, 7.0);
        assert!(percentiles(&[]).is_none());
    }

    #[test]
    fn an_operation_held_through_an_outage_is_attributed_to_it() {
        let outage = Outage {
            down_ms: 1000.0,
            frontend_up_ms: Some(2500.0),
        };
        let operations = [
            op(900.0, 50.0, true),    // done before the outage
            op(990.0, 15.0, true),    // answered just as the backend went down
            op(1100.0, 1420.0, true), // held, released 20 ms after frontend-up
            op(1200.0, 1310.0, true), // held, released 10 ms after frontend-up
            op(1300.0, 5.0, false),   // failed during the outage
            op(3000.0, 10.0, true),   // after
        ];
        let measures = measure_outage(&outage, &operations);
        assert_eq!(measures.to_frontend_up_ms, Some(1500.0));
        assert_eq!(measures.overlapping, 4);
        assert_eq!(measures.failed, 1);
        assert_eq!(measures.extra_wait_ms, [20.0, 10.0]);
        assert_eq!(measures.to_first_success_ms, Some(1510.0));
    }

    #[test]
    fn a_backend_that_never_returns_has_no_frontend_up() {
        let outage = Outage {
            down_ms: 100.0,
            frontend_up_ms: None,
        };
        let measures = measure_outage(&outage, &[op(200.0, 10.0, false)]);
        assert_eq!(measures.to_frontend_up_ms, None);
        assert_eq!(measures.failed, 1);
        assert_eq!(measures.to_first_success_ms, None);
    }

    #[test]
    fn the_summary_counts_failures_and_the_longest_request() {
        let stats = summarize(
            "proxy",
            vec![
                op(0.0, 10.0, true),
                op(100.0, 2000.0, true),
                op(200.0, 1.0, false),
            ],
            vec![],
        );
        assert_eq!(stats.requests, 3);
        assert_eq!(stats.failed, 1);
        assert_eq!(stats.longest_rtt_ms, 2000.0);
        let json = serde_json::to_string(&stats).unwrap();
        let back: Stats = serde_json::from_str(&json).unwrap();
        assert_eq!(back, stats);
    }
}
