//! `uturn-plot`: draws the benchmark curves (server CPU µs per relayed packet and p99 latency
//! against offered packets/s, one line per contestant) from the JSON lines `scripts/bench-compare.sh`
//! writes, into PNG files.

use std::collections::BTreeMap;
use std::path::PathBuf;

use clap::Parser;
use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};
use serde::Deserialize;

/// Benchmark chart drawer.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// JSON-lines results (one uturn-load report per line, with a "contestant" and a "scenario").
    results: PathBuf,
    /// Output directory for the PNG files.
    #[arg(long, default_value = "docs/img")]
    out: PathBuf,
    /// A TrueType font for labels.
    #[arg(long, default_value = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")]
    font: PathBuf,
}

#[derive(Deserialize)]
struct Row {
    contestant: String,
    scenario: String,
    offered_pps: u64,
    server_cpu_us_per_packet: Option<f64>,
    latency: Latency,
}

#[derive(Deserialize)]
struct Latency {
    p99_us: u64,
}

type Series = BTreeMap<String, Vec<(f64, f64)>>;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let font = std::fs::read(&args.font)?;
    let font: &'static [u8] = Box::leak(font.into_boxed_slice());
    register_font("sans-serif", FontStyle::Normal, font).map_err(|_| "bad font")?;
    std::fs::create_dir_all(&args.out)?;
    let mut by_scenario: BTreeMap<String, (Series, Series)> = BTreeMap::new();
    for line in std::fs::read_to_string(&args.results)?.lines().filter(|l| !l.trim().is_empty()) {
        // Other reports (max rate, allocations, memory) share the file; only traffic rows plot.
        let Ok(r) = serde_json::from_str::<Row>(line) else { continue };
        let (cpu, lat) = by_scenario.entry(r.scenario.clone()).or_default();
        if let Some(c) = r.server_cpu_us_per_packet {
            cpu.entry(r.contestant.clone()).or_default().push((r.offered_pps as f64 / 1000.0, c));
        }
        lat.entry(r.contestant).or_default().push((r.offered_pps as f64 / 1000.0, r.latency.p99_us as f64));
    }
    for (scenario, (cpu, lat)) in &by_scenario {
        let slug: String = scenario.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '-' }).collect();
        draw(
            &args.out.join(format!("cpu-{slug}.png")),
            &format!("{scenario}: server CPU per relayed packet"),
            "µs",
            cpu,
        )?;
        draw(&args.out.join(format!("p99-{slug}.png")), &format!("{scenario}: p99 latency"), "µs", lat)?;
    }
    Ok(())
}

fn draw(path: &PathBuf, title: &str, unit: &str, series: &Series) -> Result<(), Box<dyn std::error::Error>> {
    let root = BitMapBackend::new(path, (800, 480)).into_drawing_area();
    root.fill(&WHITE)?;
    let xmax = series.values().flatten().map(|p| p.0).fold(1.0, f64::max) * 1.05;
    let ymax = series.values().flatten().map(|p| p.1).fold(1.0, f64::max) * 1.15;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..xmax, 0.0..ymax)?;
    chart.configure_mesh().x_desc("offered load (k packets/s)").y_desc(unit).draw()?;
    let colors = [RGBColor(200, 40, 40), RGBColor(40, 90, 200), RGBColor(90, 90, 90), RGBColor(30, 150, 60)];
    for (i, (name, pts)) in series.iter().enumerate() {
        let mut pts = pts.clone();
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
        let color = colors[i % colors.len()];
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))?
            .label(name.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
        chart.draw_series(pts.iter().map(|p| Circle::new(*p, 4, color.filled())))?;
    }
    chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw()?;
    root.present()?;
    Ok(())
}
