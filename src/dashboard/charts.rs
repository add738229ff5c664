//! Chart geometry for server-rendered SVG: series in, rectangles, points,
//! ticks and labels out, in the coordinates of a fixed `viewBox` the page
//! scales to its width. The templates only print these numbers; colours are
//! CSS classes (no `style=`, so the strict CSP holds), and every bar or point
//! carries its value for a native tooltip and for tests.

/// The `viewBox` every chart draws in: wide enough for its labels, small
/// enough that text stays readable when a phone scales it down.
pub const WIDTH: f64 = 440.0;
pub const HEIGHT: f64 = 220.0;

/// The plot area inside the `viewBox`: room for the y labels on the left and
/// the x labels and axis title below.
const LEFT: f64 = 56.0;
const RIGHT: f64 = 8.0;
const TOP: f64 = 10.0;
const BOTTOM: f64 = 40.0;

/// One decimal is plenty for SVG coordinates and keeps the markup short.
fn r(v: f64) -> f64 {
    (v * 10.0).round() / 10.0
}

/// A labelled position on an axis.
#[derive(Debug, Clone, PartialEq)]
pub struct Tick {
    pub pos: f64,
    pub label: String,
}

/// The plot area's edges, for axis lines.
#[derive(Debug, Clone, PartialEq)]
pub struct Plot {
    pub left: f64,
    pub right: f64,
    pub top: f64,
    pub bottom: f64,
}

impl Plot {
    fn standard() -> Self {
        Plot { left: LEFT, right: WIDTH - RIGHT, top: TOP, bottom: HEIGHT - BOTTOM }
    }

    /// The middle of the x axis, for its title.
    pub fn mid_x(&self) -> f64 {
        r((self.left + self.right) / 2.0)
    }

    /// Where the y labels end (they are right-aligned against the axis).
    pub fn y_label_x(&self) -> f64 {
        r(self.left - 5.0)
    }

    /// The baseline of the x labels, under the axis.
    pub fn x_label_y(&self) -> f64 {
        r(self.bottom + 15.0)
    }

    /// The baseline of the x axis's title, under its labels.
    pub fn x_title_y(&self) -> f64 {
        r(self.bottom + 32.0)
    }

    /// The y axis's title is drawn rotated by -90°: its x is minus the
    /// middle of the axis.
    pub fn y_title_x(&self) -> f64 {
        r(-(self.top + self.bottom) / 2.0)
    }
}

/// A category on a time axis: `axis` is printed under the axis (None: this
/// bar gets no label, so labels do not collide), `title` in tooltips.
#[derive(Debug, Clone)]
pub struct Category {
    pub key: String,
    pub axis: Option<String>,
    pub title: String,
}

/// One series of a stacked bar chart: its name (legend, tooltip), its CSS
/// class (colour) and one value per category.
#[derive(Debug, Clone)]
pub struct Series {
    pub name: String,
    pub class: String,
    pub values: Vec<u64>,
}

/// A step for `max` split in about four: 1, 2 or 5 times a power of ten, at
/// least 1 (counts and milliseconds are whole numbers).
pub fn nice_step(max: u64) -> u64 {
    let rough = (max as f64 / 4.0).max(1.0);
    let magnitude = 10f64.powf(rough.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0].iter().map(|m| m * magnitude).find(|s| *s >= rough).unwrap_or(10.0 * magnitude);
    step.round().max(1.0) as u64
}

/// Ticks from 0 to the first multiple of the step at or above `max`; the
/// last tick is the top of the scale.
pub fn scale(max: u64) -> (u64, Vec<u64>) {
    let step = nice_step(max);
    let top = max.div_ceil(step).max(1) * step;
    (top, (0..=top / step).map(|i| i * step).collect())
}

/// A plain count as a tick label: 1200 → 1.2k.
pub fn count_label(n: u64) -> String {
    match n {
        n if n >= 1_000_000 => trim(n as f64 / 1_000_000.0, "M"),
        n if n >= 10_000 => trim(n as f64 / 1_000.0, "k"),
        n => n.to_string(),
    }
}

/// Milliseconds as an operator reads them (tick labels, lags, flush ages):
/// 250 ms, 1.5 s, 3 min.
pub fn millis_label(ms: u64) -> String {
    match ms {
        ms if ms < 1_000 => format!("{ms} ms"),
        ms if ms < 120_000 => trim(ms as f64 / 1_000.0, " s"),
        ms => trim(ms as f64 / 60_000.0, " min"),
    }
}

/// [`millis_label`] of a span that can come out negative (two clocks), read as 0.
pub fn signed_millis_label(ms: i64) -> String {
    millis_label(ms.max(0) as u64)
}

fn trim(v: f64, unit: &str) -> String {
    let text = format!("{v:.1}");
    format!("{}{unit}", text.strip_suffix(".0").unwrap_or(&text))
}

fn y_ticks(plot: &Plot, top: u64, ticks: &[u64], label: &dyn Fn(u64) -> String) -> Vec<Tick> {
    ticks.iter().map(|t| Tick { pos: r(y_of(plot, top, *t)), label: label(*t) }).collect()
}

fn y_of(plot: &Plot, top: u64, v: u64) -> f64 {
    plot.bottom - (plot.bottom - plot.top) * (v as f64 / top as f64)
}

/// One rectangle of a stacked bar.
#[derive(Debug, Clone, PartialEq)]
pub struct Segment {
    pub x: f64,
    pub y: f64,
    pub width: f64,
    pub height: f64,
    pub class: String,
    pub series: String,
    pub value: u64,
    pub title: String,
}

/// One category's bar: its segments bottom up (zero values left out).
#[derive(Debug, Clone, PartialEq)]
pub struct Bar {
    pub key: String,
    pub total: u64,
    pub segments: Vec<Segment>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LegendItem {
    pub name: String,
    pub class: String,
    pub total: u64,
}

/// Vertical bars over categories, stacked when there are several series.
#[derive(Debug, Clone)]
pub struct BarChart {
    pub plot: Plot,
    pub bars: Vec<Bar>,
    pub y_ticks: Vec<Tick>,
    pub x_ticks: Vec<Tick>,
    pub legend: Vec<LegendItem>,
    pub total: u64,
    /// Nothing to draw: the page shows the empty state instead.
    pub empty: bool,
}

impl BarChart {
    /// Stacks `series` (each with one value per category) into bars; `unit`
    /// names what is counted in tooltips ("sessions").
    pub fn stacked(categories: &[Category], series: &[Series], unit: &str) -> Self {
        let plot = Plot::standard();
        let totals: Vec<u64> =
            (0..categories.len()).map(|i| series.iter().map(|s| s.values.get(i).copied().unwrap_or(0)).sum()).collect();
        let max = totals.iter().copied().max().unwrap_or(0);
        let (top, ticks) = scale(max);
        let slot = (plot.right - plot.left) / categories.len().max(1) as f64;
        let width = r(slot * 0.8);
        let bars = categories
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let x = r(plot.left + slot * i as f64 + slot * 0.1);
                let mut below = 0;
                let segments = series
                    .iter()
                    .filter_map(|s| {
                        let value = s.values.get(i).copied().unwrap_or(0);
                        if value == 0 {
                            return None;
                        }
                        let y0 = y_of(&plot, top, below);
                        below += value;
                        let y1 = y_of(&plot, top, below);
                        let what = if series.len() > 1 { format!("{} {unit}", s.name) } else { unit.to_string() };
                        Some(Segment {
                            x,
                            y: r(y1),
                            width,
                            height: r(y0 - y1),
                            class: s.class.clone(),
                            series: s.name.clone(),
                            value,
                            title: format!("{}: {value} {what}", c.title),
                        })
                    })
                    .collect();
                Bar { key: c.key.clone(), total: totals[i], segments }
            })
            .collect();
        let x_ticks = categories
            .iter()
            .enumerate()
            .filter_map(|(i, c)| {
                c.axis.clone().map(|label| Tick { pos: r(plot.left + slot * (i as f64 + 0.5)), label })
            })
            .collect();
        let legend = series
            .iter()
            .map(|s| LegendItem { name: s.name.clone(), class: s.class.clone(), total: s.values.iter().sum() })
            .filter(|l| l.total > 0)
            .collect();
        let total = totals.iter().sum();
        BarChart {
            y_ticks: y_ticks(&plot, top, &ticks, &count_label),
            plot,
            bars,
            x_ticks,
            legend,
            total,
            empty: total == 0,
        }
    }
}

/// One row of a horizontal bar chart: its label above its bar, so a long
/// label (a job kind) never squeezes the bar, at any width.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub label: String,
    pub value: u64,
    /// The label's baseline, the bar's top and length, and where the value
    /// is written (just past the bar's end).
    pub y: f64,
    pub bar_y: f64,
    pub width: f64,
    pub value_x: f64,
    pub value_y: f64,
    pub title: String,
}

/// Horizontal bars, one per labelled row, longest scale at the right.
#[derive(Debug, Clone)]
pub struct HBarChart {
    pub plot: Plot,
    pub height: f64,
    pub bar_height: f64,
    pub rows: Vec<Row>,
    pub x_ticks: Vec<Tick>,
    pub total: u64,
    pub empty: bool,
}

/// A row: the label's line, then the bar.
const ROW_HEIGHT: f64 = 36.0;
const LABEL_LINE: f64 = 16.0;

impl HBarChart {
    /// `rows` as (label, value), drawn in the order given; the chart is as tall
    /// as its rows need.
    pub fn new(rows: &[(String, u64)], unit: &str) -> Self {
        let plot =
            Plot { left: 12.0, right: WIDTH - 40.0, top: TOP, bottom: TOP + ROW_HEIGHT * rows.len().max(1) as f64 };
        let max = rows.iter().map(|(_, v)| *v).max().unwrap_or(0);
        let (top, ticks) = scale(max);
        let span = plot.right - plot.left;
        let bar_height = ROW_HEIGHT - LABEL_LINE - 6.0;
        let rows: Vec<Row> = rows
            .iter()
            .enumerate()
            .map(|(i, (name, value))| {
                let row_top = plot.top + ROW_HEIGHT * i as f64;
                let bar_y = row_top + LABEL_LINE;
                let width = r(span * (*value as f64 / top as f64));
                Row {
                    label: name.clone(),
                    value: *value,
                    y: r(row_top + LABEL_LINE - 4.0),
                    bar_y: r(bar_y),
                    width,
                    value_x: r(plot.left + width + 4.0),
                    value_y: r(bar_y + bar_height - 3.0),
                    title: format!("{name}: {value} {unit}"),
                }
            })
            .collect();
        let x_ticks = ticks
            .iter()
            .map(|t| Tick { pos: r(plot.left + span * (*t as f64 / top as f64)), label: count_label(*t) })
            .collect();
        let total = rows.iter().map(|r| r.value).sum();
        HBarChart { height: r(plot.bottom + BOTTOM), bar_height, empty: total == 0, plot, rows, x_ticks, total }
    }
}

/// One point of a line chart.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    pub key: String,
    pub x: f64,
    pub y: f64,
    pub value: u64,
    pub title: String,
}

/// A line over categories; categories without a value are skipped, so the
/// line joins the points that exist.
#[derive(Debug, Clone)]
pub struct LineChart {
    pub plot: Plot,
    pub points: Vec<Point>,
    /// The `points` attribute of the polyline.
    pub path: String,
    pub y_ticks: Vec<Tick>,
    pub x_ticks: Vec<Tick>,
    pub max: u64,
    pub empty: bool,
}

impl LineChart {
    /// `values[i]` belongs to `categories[i]`; `describe` turns a value into
    /// its tooltip text ("1.5 s").
    pub fn new(categories: &[Category], values: &[Option<u64>], describe: fn(u64) -> String) -> Self {
        let plot = Plot::standard();
        let max = values.iter().flatten().copied().max().unwrap_or(0);
        let (top, ticks) = scale(max);
        let slot = (plot.right - plot.left) / categories.len().max(1) as f64;
        let points: Vec<Point> = categories
            .iter()
            .zip(values)
            .enumerate()
            .filter_map(|(i, (c, v))| {
                v.map(|value| Point {
                    key: c.key.clone(),
                    x: r(plot.left + slot * (i as f64 + 0.5)),
                    y: r(y_of(&plot, top, value)),
                    value,
                    title: format!("{}: {}", c.title, describe(value)),
                })
            })
            .collect();
        let path = points.iter().map(|p| format!("{},{}", p.x, p.y)).collect::<Vec<_>>().join(" ");
        let x_ticks = categories
            .iter()
            .enumerate()
            .filter_map(|(i, c)| {
                c.axis.clone().map(|label| Tick { pos: r(plot.left + slot * (i as f64 + 0.5)), label })
            })
            .collect();
        LineChart {
            y_ticks: y_ticks(&plot, top, &ticks, &describe),
            empty: points.is_empty(),
            plot,
            points,
            path,
            x_ticks,
            max,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cats(n: usize) -> Vec<Category> {
        (0..n)
            .map(|i| Category {
                key: i.to_string(),
                axis: (i % 2 == 0).then(|| format!("c{i}")),
                title: format!("cat {i}"),
            })
            .collect()
    }

    #[test]
    fn scales_end_on_a_round_step_at_or_above_the_maximum() {
        assert_eq!(nice_step(0), 1);
        assert_eq!(nice_step(7), 2);
        assert_eq!(nice_step(40), 10);
        assert_eq!(nice_step(1_234), 500);
        assert_eq!(scale(7), (8, vec![0, 2, 4, 6, 8]));
        assert_eq!(scale(0), (1, vec![0, 1]));
        let (top, _) = scale(1_000);
        assert_eq!(top, 1_000);
        assert_eq!(count_label(12_500), "12.5k");
        assert_eq!(count_label(2_000_000), "2M");
        assert_eq!(millis_label(250), "250 ms");
        assert_eq!(millis_label(1_500), "1.5 s");
        assert_eq!(millis_label(180_000), "3 min");
        assert_eq!(signed_millis_label(-5), "0 ms");
        assert_eq!(signed_millis_label(2_000), "2 s");
    }

    #[test]
    fn bars_are_as_tall_as_their_share_of_the_scale() {
        let s = Series { name: "sessions".into(), class: "s-sessions".into(), values: vec![2, 0, 8, 4] };
        let chart = BarChart::stacked(&cats(4), &[s], "sessions");
        let plot_h = chart.plot.bottom - chart.plot.top;
        assert_eq!(chart.total, 14);
        assert!(!chart.empty);
        // Scale 0..8: the 8 fills the plot, the 4 half of it, the 0 draws nothing.
        assert_eq!(chart.bars[2].segments[0].height, r(plot_h));
        assert_eq!(chart.bars[2].segments[0].y, chart.plot.top);
        assert_eq!(chart.bars[3].segments[0].height, r(plot_h / 2.0));
        assert!(chart.bars[1].segments.is_empty());
        // Bars go left to right without overlapping, inside the plot.
        let xs: Vec<f64> = chart.bars.iter().filter_map(|b| b.segments.first()).map(|s| s.x).collect();
        assert!(xs.windows(2).all(|w| w[0] < w[1]));
        assert!(chart
            .bars
            .iter()
            .flat_map(|b| &b.segments)
            .all(|s| s.x >= chart.plot.left && s.x + s.width <= chart.plot.right + 0.1));
        assert_eq!(chart.y_ticks.first().map(|t| (t.pos, t.label.as_str())), Some((chart.plot.bottom, "0")));
        assert_eq!(chart.y_ticks.last().map(|t| (t.pos, t.label.as_str())), Some((chart.plot.top, "8")));
        // Every other category is labelled, under its bar's middle.
        assert_eq!(chart.x_ticks.len(), 2);
        assert_eq!(chart.bars[0].segments[0].title, "cat 0: 2 sessions");
    }

    #[test]
    fn stacked_segments_sit_on_each_other_in_series_order() {
        let a = Series { name: "COMPLETED".into(), class: "s-completed".into(), values: vec![3, 1] };
        let b = Series { name: "FAILED".into(), class: "s-failed".into(), values: vec![1, 0] };
        let chart = BarChart::stacked(&cats(2), &[a, b], "runs");
        let bar = &chart.bars[0];
        assert_eq!(bar.total, 4);
        assert_eq!(bar.segments.len(), 2);
        let (low, high) = (&bar.segments[0], &bar.segments[1]);
        assert_eq!((low.series.as_str(), high.series.as_str()), ("COMPLETED", "FAILED"));
        assert_eq!(low.y + low.height, chart.plot.bottom);
        assert!((high.y + high.height - low.y).abs() < 0.11, "the upper segment starts where the lower ends");
        assert!((low.height - 3.0 * high.height).abs() < 0.3);
        assert_eq!(high.title, "cat 0: 1 FAILED runs");
        assert_eq!(
            chart.legend.iter().map(|l| (l.name.as_str(), l.total)).collect::<Vec<_>>(),
            [("COMPLETED", 4), ("FAILED", 1)]
        );
    }

    #[test]
    fn empty_series_make_an_empty_chart() {
        let s = Series { name: "sessions".into(), class: "s".into(), values: vec![0, 0, 0] };
        let chart = BarChart::stacked(&cats(3), &[s], "sessions");
        assert!(chart.empty);
        assert!(chart.legend.is_empty());
        assert!(BarChart::stacked(&[], &[], "sessions").empty);
        assert!(HBarChart::new(&[], "failures").empty);
        assert!(LineChart::new(&cats(3), &[None, None, None], millis_label).empty);
    }

    #[test]
    fn horizontal_bars_scale_to_the_longest() {
        let chart = HBarChart::new(&[("backfill".into(), 10), ("probe".into(), 5)], "failed jobs");
        let span = chart.plot.right - chart.plot.left;
        assert_eq!(chart.rows[0].width, r(span));
        assert_eq!(chart.rows[1].width, r(span / 2.0));
        assert!(chart.rows[0].bar_y < chart.rows[1].bar_y);
        assert_eq!(chart.total, 15);
        assert_eq!(chart.rows[1].title, "probe: 5 failed jobs");
        assert_eq!(chart.x_ticks.last().map(|t| t.label.as_str()), Some("10"));
    }

    #[test]
    fn a_line_joins_the_points_that_exist() {
        let chart = LineChart::new(&cats(4), &[Some(100), None, Some(400), Some(0)], millis_label);
        assert_eq!(chart.points.len(), 3);
        assert_eq!(chart.max, 400);
        // Scale 0..400 ms: 400 at the top, 0 on the axis.
        assert_eq!(chart.points[1].y, chart.plot.top);
        assert_eq!(chart.points[2].y, chart.plot.bottom);
        assert_eq!(chart.path.split(' ').count(), 3);
        assert_eq!(chart.points[0].title, "cat 0: 100 ms");
        assert_eq!(chart.y_ticks.last().map(|t| t.label.as_str()), Some("400 ms"));
    }
}
