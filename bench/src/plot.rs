//! PNG plots of results: completion-time CDFs per system, completion / bound against N, and
//! speeds relative to a baseline as grouped bars.

use std::path::Path;

use anyhow::{anyhow, Context};
use plotters::prelude::*;

/// Where the plots' font comes from (Debian's fonts-dejavu-core; the test command installs it).
const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

fn register_font() -> anyhow::Result<()> {
    static DONE: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    DONE.get_or_init(|| {
        let bytes = std::fs::read(FONT).map_err(|e| format!("{FONT}: {e} (install fonts-dejavu-core)"))?;
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).map_err(|_| format!("{FONT}: not a usable font"))
    })
    .clone()
    .map_err(|e| anyhow!(e))
}

const COLORS: [RGBColor; 6] = [
    RGBColor(0, 114, 178),
    RGBColor(213, 94, 0),
    RGBColor(0, 158, 115),
    RGBColor(204, 121, 167),
    RGBColor(86, 180, 233),
    RGBColor(230, 159, 0),
];

fn draw_err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("drawing the plot: {e:?}")
}

/// A white canvas of `size` pixels to be written to `path`.
fn canvas(path: &Path, size: (u32, u32)) -> anyhow::Result<DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>> {
    register_font()?;
    let root = BitMapBackend::new(path, size).into_drawing_area();
    root.fill(&WHITE).map_err(draw_err)?;
    Ok(root)
}

/// A chart on `root` with the plots' caption style, margins and axis label areas.
fn chart_on<'a, 'b>(
    root: &'a DrawingArea<BitMapBackend<'b>, plotters::coord::Shift>,
    title: &str,
) -> ChartBuilder<'a, 'b, BitMapBackend<'b>> {
    let mut builder = ChartBuilder::on(root);
    builder.caption(title, ("sans-serif", 20)).margin(15).x_label_area_size(45).y_label_area_size(55);
    builder
}

/// A CDF of per-node completion seconds for each system, with the lower bound as a vertical line.
pub fn completion_cdf(path: &Path, title: &str, systems: &[(String, Vec<f64>)], bound: f64) -> anyhow::Result<()> {
    let max_x = systems.iter().flat_map(|(_, v)| v.iter().copied()).fold(bound, f64::max) * 1.05;
    let root = canvas(path, (900, 560))?;
    let mut chart = chart_on(&root, title).build_cartesian_2d(0f64..max_x, 0f64..1.02f64).map_err(draw_err)?;
    chart
        .configure_mesh()
        .x_desc("seconds until the node has the whole blob")
        .y_desc("fraction of nodes done")
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(draw_err)?;
    for (k, (name, secs)) in systems.iter().enumerate() {
        let mut sorted = secs.clone();
        sorted.sort_by(|a, b| a.total_cmp(b));
        let n = sorted.len().max(1) as f64;
        let mut points = vec![(0.0, 0.0)];
        for (i, s) in sorted.iter().enumerate() {
            points.push((*s, i as f64 / n));
            points.push((*s, (i + 1) as f64 / n));
        }
        let color = COLORS[k % COLORS.len()];
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))
            .map_err(draw_err)?
            .label(name.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    chart
        .draw_series(LineSeries::new(vec![(bound, 0.0), (bound, 1.02)], BLACK.stroke_width(1)))
        .map_err(draw_err)?
        .label("lower bound")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK));
    legend(&mut chart, SeriesLabelPosition::LowerRight)?;
    root.present().with_context(|| format!("writing {}", path.display()))
}

/// Draws the series' names in a box at `position`.
fn legend<'a, C: plotters::coord::CoordTranslate>(
    chart: &mut ChartContext<'a, BitMapBackend<'a>, C>,
    position: SeriesLabelPosition,
) -> anyhow::Result<()> {
    chart
        .configure_series_labels()
        .position(position)
        .label_font(("sans-serif", 14))
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()
        .map_err(draw_err)
}

/// Completion / bound against the number of nodes, one line per series.
pub fn ratio_by_nodes(path: &Path, title: &str, series: &[(String, Vec<(usize, f64)>)]) -> anyhow::Result<()> {
    let max_n = series.iter().flat_map(|(_, v)| v.iter().map(|p| p.0)).max().unwrap_or(4).max(4) as f64;
    let max_y = series.iter().flat_map(|(_, v)| v.iter().map(|p| p.1)).fold(2.0, f64::max) * 1.1;
    let root = canvas(path, (900, 560))?;
    let mut chart = chart_on(&root, title).build_cartesian_2d((2f64..max_n * 1.3).log_scale(), 0f64..max_y).map_err(draw_err)?;
    chart
        .configure_mesh()
        .x_desc("nodes")
        .y_desc("completion / Kumar–Ross bound")
        .label_style(("sans-serif", 14))
        .x_label_formatter(&|x| format!("{x:.0}"))
        .draw()
        .map_err(draw_err)?;
    for (k, (name, points)) in series.iter().enumerate() {
        let color = COLORS[k % COLORS.len()];
        let pts: Vec<(f64, f64)> = points.iter().map(|(n, r)| (*n as f64, *r)).collect();
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
            .map_err(draw_err)?
            .label(name.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
        chart.draw_series(pts.into_iter().map(|p| Circle::new(p, 4, color.filled()))).map_err(draw_err)?;
    }
    chart.draw_series(LineSeries::new(vec![(2.0, 1.0), (max_n * 1.3, 1.0)], BLACK.stroke_width(1))).map_err(draw_err)?;
    legend(&mut chart, SeriesLabelPosition::UpperLeft)?;
    root.present().with_context(|| format!("writing {}", path.display()))
}

/// Grouped bars: for each of `groups` (measurements), one bar per series (system) of its value
/// (a speed relative to a baseline), with the baseline's 1.0 as a line.
pub fn speed_bars(path: &Path, title: &str, groups: &[&str], series: &[(String, Vec<f64>)]) -> anyhow::Result<()> {
    ratio_bars(path, title, "speed relative to native", groups, series, None, false)
}

/// Grouped bars: for each of `groups` (measurements), one bar per series (system) of its value
/// relative to a baseline (`y_desc` says which), with the baseline's 1.0 as a solid line,
/// `target`, if given, as a dashed one, and with `label_values` each bar's value above it.
pub fn ratio_bars(
    path: &Path,
    title: &str,
    y_desc: &str,
    groups: &[&str],
    series: &[(String, Vec<f64>)],
    target: Option<f64>,
    label_values: bool,
) -> anyhow::Result<()> {
    let max_y = series.iter().flat_map(|(_, v)| v.iter().copied()).filter(|v| v.is_finite()).fold(1.2, f64::max) * 1.15;
    let n = groups.len().max(1);
    let root = canvas(path, (1200, 560))?;
    let mut chart = chart_on(&root, title).build_cartesian_2d(0f64..n as f64, 0f64..max_y).map_err(draw_err)?;
    let names: Vec<String> = groups.iter().map(|g| g.to_string()).collect();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(n * 2 + 1)
        .x_label_formatter(&|x| {
            let i = x.floor() as usize;
            if (x - x.floor() - 0.5).abs() < 0.01 {
                names.get(i).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .y_desc(y_desc)
        .label_style(("sans-serif", 13))
        .draw()
        .map_err(draw_err)?;
    let width = 0.8 / series.len().max(1) as f64;
    for (k, (name, values)) in series.iter().enumerate() {
        let color = COLORS[k % COLORS.len()];
        let bars = values.iter().enumerate().filter(|(_, v)| v.is_finite()).map(|(g, v)| {
            let x0 = g as f64 + 0.1 + k as f64 * width;
            Rectangle::new([(x0, 0.0), (x0 + width * 0.9, *v)], color.filled())
        });
        chart
            .draw_series(bars)
            .map_err(draw_err)?
            .label(name.as_str())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 15, y + 5)], color.filled()));
        if label_values {
            // A label's anchor is its top left corner: raise it by about its own height.
            let labels = values.iter().enumerate().filter(|(_, v)| v.is_finite()).map(|(g, v)| {
                let x0 = g as f64 + 0.1 + k as f64 * width;
                Text::new(format!("{v:.2}×"), (x0 + width * 0.25, *v + max_y * 0.045), ("sans-serif", 13))
            });
            chart.draw_series(labels).map_err(draw_err)?;
        }
    }
    chart.draw_series(LineSeries::new(vec![(0.0, 1.0), (n as f64, 1.0)], BLACK.stroke_width(1))).map_err(draw_err)?;
    if let Some(t) = target {
        let dashes = (0..n * 20).map(|k| {
            let x0 = k as f64 / 20.0;
            PathElement::new(vec![(x0, t), (x0 + 0.025, t)], BLACK.stroke_width(1))
        });
        chart
            .draw_series(dashes)
            .map_err(draw_err)?
            .label(format!("target {t}×"))
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 8, y)], BLACK.stroke_width(1)));
    }
    legend(&mut chart, SeriesLabelPosition::UpperRight)?;
    root.present().with_context(|| format!("writing {}", path.display()))
}
