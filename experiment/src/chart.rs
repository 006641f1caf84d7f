//! The study's charts as SVG (plotters): one bar per operation over relative
//! time (green success, red failure) with each outage drawn as a segment on the
//! time axis and the time to first success after it, and an RTT percentile
//! curve. The chart data is computed by pure functions, tested on their own.

use std::path::Path;

use plotters::prelude::*;

use crate::stats::Stats;

/// One bar of the RTT chart.
#[derive(Debug, Clone, PartialEq)]
pub struct Bar {
    pub at_s: f64,
    pub rtt_ms: f64,
    pub ok: bool,
}

/// A marked stretch of the time axis.
#[derive(Debug, Clone, PartialEq)]
pub struct Span {
    pub from_s: f64,
    pub to_s: f64,
}

pub fn bars(stats: &Stats) -> Vec<Bar> {
    stats
        .operations
        .iter()
        .map(|op| Bar {
            at_s: op.start_ms / 1000.0,
            rtt_ms: op.rtt_ms,
            ok: op.ok,
        })
        .collect()
}

/// Outages from down to frontend-up (to the end of the run if never up).
pub fn outage_spans(stats: &Stats, run_end_s: f64) -> Vec<Span> {
    stats
        .outage_windows
        .iter()
        .map(|o| Span {
            from_s: o.down_ms / 1000.0,
            to_s: o.frontend_up_ms.map_or(run_end_s, |up| up / 1000.0),
        })
        .collect()
}

/// From each outage's start to the first success after it.
pub fn first_success_spans(stats: &Stats) -> Vec<Span> {
    stats
        .outages
        .iter()
        .filter_map(|m| {
            m.to_first_success_ms.map(|t| Span {
                from_s: m.down_ms / 1000.0,
                to_s: (m.down_ms + t) / 1000.0,
            })
        })
        .collect()
}

/// (percentile, RTT ms) points from p1 to p100.
pub fn percentile_curve(stats: &Stats) -> Vec<(f64, f64)> {
    let mut rtts: Vec<f64> = stats.operations.iter().map(|op| op.rtt_ms).collect();
    if rtts.is_empty() {
        return Vec::new();
    }
    rtts.sort_by(f64::total_cmp);
    (1..=100)
        .map(|p| {
            let index = ((f64::from(p) / 100.0) * rtts.len() as f64).ceil() as usize;
            (f64::from(p), rtts[index.clamp(1, rtts.len()) - 1])
        })
        .collect()
}

type ChartResult = Result<(), Box<dyn std::error::Error>>;

/// Writes the RTT-over-time chart.
pub fn rtt_svg(stats: &Stats, path: &Path) -> ChartResult {
    let bars = bars(stats);
    let end_s = bars
        .iter()
        .map(|b| b.at_s + b.rtt_ms / 1000.0)
        .fold(1.0, f64::max);
    let top_ms = bars.iter().map(|b| b.rtt_ms).fold(10.0, f64::max) * 1.1;
    let root = SVGBackend::new(path, (1200, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    let caption = format!(
        "{}: {} requests, {} failed, longest {:.0} ms",
        stats.label, stats.requests, stats.failed, stats.longest_rtt_ms
    );
    let mut chart = ChartBuilder::on(&root)
        .caption(caption, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..end_s, -top_ms * 0.06..top_ms)?;
    chart
        .configure_mesh()
        .x_desc("time since start (s)")
        .y_desc("RTT (ms)")
        .disable_x_mesh()
        .draw()?;
    let width = (end_s / 1200.0).max(0.02);
    chart
        .draw_series(bars.iter().map(|bar| {
            let color = if bar.ok { GREEN.mix(0.8) } else { RED.mix(0.9) };
            Rectangle::new(
                [(bar.at_s, 0.0), (bar.at_s + width, bar.rtt_ms)],
                color.filled(),
            )
        }))?
        .label("request (green: ok, red: failed)")
        .legend(|(x, y)| Rectangle::new([(x, y - 4), (x + 12, y + 4)], GREEN.filled()));
    let lane = -top_ms * 0.025;
    chart
        .draw_series(outage_spans(stats, end_s).into_iter().map(|span| {
            Rectangle::new(
                [
                    (span.from_s, lane - top_ms * 0.012),
                    (span.to_s, lane + top_ms * 0.012),
                ],
                RED.filled(),
            )
        }))?
        .label("outage: down to frontend-up")
        .legend(|(x, y)| Rectangle::new([(x, y - 2), (x + 12, y + 2)], RED.filled()));
    let lane = -top_ms * 0.05;
    chart
        .draw_series(first_success_spans(stats).into_iter().map(|span| {
            Rectangle::new(
                [
                    (span.from_s, lane - top_ms * 0.008),
                    (span.to_s, lane + top_ms * 0.008),
                ],
                BLUE.filled(),
            )
        }))?
        .label("down to first success")
        .legend(|(x, y)| Rectangle::new([(x, y - 2), (x + 12, y + 2)], BLUE.filled()));
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.3))
        .position(SeriesLabelPosition::UpperLeft)
        .draw()?;
    root.present()?;
    Ok(())
}

/// Writes RTT percentile curves, one per run (e.g. through the proxy and direct).
pub fn percentiles_svg(runs: &[&Stats], path: &Path) -> ChartResult {
    // Failed requests count in the curve (a fast failure is not a fast
    // success), so the legend says how many there were.
    let curves: Vec<(String, Vec<(f64, f64)>)> = runs
        .iter()
        .map(|s| {
            let label = format!("{} ({} of {} failed)", s.label, s.failed, s.requests);
            (label, percentile_curve(s))
        })
        .collect();
    let top_ms = curves
        .iter()
        .flat_map(|(_, c)| c.iter().map(|(_, y)| *y))
        .fold(10.0, f64::max);
    let root = SVGBackend::new(path, (800, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("RTT percentiles", ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..100f64, (0.5f64..top_ms * 1.5).log_scale())?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .y_desc("RTT (ms, log scale)")
        .draw()?;
    for (index, (label, curve)) in curves.into_iter().enumerate() {
        let color = Palette99::pick(index).to_rgba();
        chart
            .draw_series(LineSeries::new(curve, color.stroke_width(2)))?
            .label(label)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 14, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.3))
        .position(SeriesLabelPosition::UpperLeft)
        .draw()?;
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::{Operation, Outage, summarize};

    fn run() -> Stats {
        let op = |start: f64, rtt: f64, ok: bool| Operation {
            kind: "put".into(),
            start_ms: start,
            rtt_ms: rtt,
            ok,
            error: None,
        };
        summarize(
            "proxy",
            vec![
                op(0.0, 10.0, true),
                op(1000.0, 1500.0, true),
                op(1100.0, 5.0, false),
            ],
            vec![Outage {
                down_ms: 900.0,
                frontend_up_ms: Some(2400.0),
            }],
        )
    }

    #[test]
    fn bars_outages_and_first_success_are_placed_in_seconds() {
        let stats = run();
        assert_eq!(
            bars(&stats)[1],
            Bar {
                at_s: 1.0,
                rtt_ms: 1500.0,
                ok: true
            }
        );
        assert_eq!(
            outage_spans(&stats, 5.0),
            [Span {
                from_s: 0.9,
                to_s: 2.4
            }]
        );
        assert_eq!(
            first_success_spans(&stats),
            [Span {
                from_s: 0.9,
                to_s: 2.5
            }]
        );
    }

    #[test]
    fn the_percentile_curve_rises_to_the_longest_request() {
        let curve = percentile_curve(&run());
        assert_eq!(curve.len(), 100);
        assert_eq!(curve[99], (100.0, 1500.0));
        assert!(curve.windows(2).all(|w| w[0].1 <= w[1].1));
    }

    #[test]
    fn charts_are_written_as_svg() {
        let dir = tempfile::tempdir().unwrap();
        let stats = run();
        rtt_svg(&stats, &dir.path().join("rtt.svg")).unwrap();
        percentiles_svg(&[&stats], &dir.path().join("p.svg")).unwrap();
        let svg = std::fs::read_to_string(dir.path().join("rtt.svg")).unwrap();
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("#FF0000"), "the outage is drawn in red");
    }
}
