//! `inferstream report`: charts from data capture, as PNG and SVG.
//!
//! Reads data capture JSON Lines from S3 or a local directory, in either
//! format [`crate::pipeline::capture`] writes or as SageMaker itself writes
//! them (then the model's output is read with the configuration's labels
//! and thresholds), and draws three charts: confidence over time coloured
//! by decision with the threshold line, a histogram of confidences, and
//! accepted vs review counts per label.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Once;
use std::time::SystemTime;

use anyhow::{bail, Context as _};
use plotters::coord::Shift;

use crate::pipeline::monitor::{measure, Measures, Tally};
use plotters::prelude::*;
use serde::Deserialize;

const FONT: &str = "sans-serif";
static FONT_BYTES: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");
static REGISTER: Once = Once::new();

const ACCEPTED: RGBColor = RGBColor(0x2a, 0x9d, 0x5c);
const REVIEW: RGBColor = RGBColor(0xe0, 0x6c, 0x1f);
const THRESHOLD: RGBColor = RGBColor(0x33, 0x33, 0x99);
const SIZE: (u32, u32) = (1000, 600);

/// One captured prediction, as much as the charts need.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    /// Seconds since the Unix epoch.
    pub time: f64,
    pub label: String,
    pub confidence: f64,
    pub threshold: f64,
    pub accepted: bool,
    /// The prediction id, when captured with the prediction.
    pub id: Option<String>,
    /// Model Monitor's `eventId`, which ground truth names.
    pub event_id: Option<String>,
    /// The true label, once ground truth is joined ([`join_truth`]).
    pub actual: Option<String>,
    /// The image's size in bytes and type, when known.
    pub size: Option<u64>,
    pub content_type: Option<String>,
}

impl Point {
    /// As the monitor sees it.
    pub fn observation(&self) -> crate::pipeline::monitor::Observation<'_> {
        crate::pipeline::monitor::Observation {
            confidence: self.confidence,
            label: &self.label,
            review: !self.accepted,
            size: self.size,
            content_type: self.content_type.as_deref(),
        }
    }
}

/// The image type a key's extension names.
fn type_of_key(key: &str) -> Option<String> {
    let ext = key.rsplit_once('.')?.1.to_ascii_lowercase();
    let t = match ext.as_str() {
        "jpg" | "jpeg" => "image/jpeg",
        "png" => "image/png",
        "gif" => "image/gif",
        "webp" => "image/webp",
        "bmp" => "image/bmp",
        _ => return None,
    };
    Some(t.to_string())
}

#[derive(Deserialize)]
struct LinePrediction {
    processed_at: String,
    label: String,
    confidence: f64,
    threshold: f64,
    decision: String,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    key: Option<String>,
    #[serde(default)]
    size: Option<u64>,
}

/// How to read a model's output where no prediction was captured with it
/// (captures written by SageMaker): the classes in output order and the
/// thresholds, from the configuration.
#[derive(Debug, Clone)]
pub struct Interpretation {
    pub labels: Vec<String>,
    pub threshold: f64,
    pub label_thresholds: BTreeMap<String, f64>,
}

impl Interpretation {
    pub fn from_config(c: &crate::config::Config) -> Interpretation {
        Interpretation {
            labels: c.endpoint.labels.clone(),
            threshold: c.route.threshold,
            label_thresholds: c.route.label_thresholds.clone(),
        }
    }

    fn threshold_for(&self, label: &str) -> f64 {
        self.label_thresholds
            .get(label)
            .copied()
            .unwrap_or(self.threshold)
    }
}

/// Class scores from a model's answer: a JSON array, `{"prediction": [..]}`,
/// `{"predictions": [[..]]}`, `{"probabilities": [..]}`, or CSV numbers.
fn scores_of(text: &str) -> Option<Vec<f64>> {
    let text = text.trim();
    if let Ok(v) = serde_json::from_str::<serde_json::Value>(text) {
        let arr = match &v {
            serde_json::Value::Array(a) => match a.first() {
                Some(serde_json::Value::Array(inner)) => inner.clone(),
                _ => a.clone(),
            },
            serde_json::Value::Number(_) => vec![v.clone()],
            serde_json::Value::Object(o) => {
                let inner = ["probabilities", "prediction", "predictions", "scores"]
                    .iter()
                    .find_map(|k| o.get(*k))?;
                match inner {
                    serde_json::Value::Array(a) => match a.first() {
                        Some(serde_json::Value::Array(first)) => first.clone(),
                        _ => a.clone(),
                    },
                    _ => return None,
                }
            }
            _ => return None,
        };
        let scores: Option<Vec<f64>> = arr.iter().map(serde_json::Value::as_f64).collect();
        return scores.filter(|s| !s.is_empty());
    }
    let scores: Result<Vec<f64>, _> = text
        .split([',', '\n'])
        .filter(|t| !t.trim().is_empty())
        .map(|t| t.trim().parse::<f64>())
        .collect();
    scores.ok().filter(|s| !s.is_empty())
}

/// What was read: the points, and how many lines could not be used.
#[derive(Debug, Default)]
pub struct Loaded {
    pub points: Vec<Point>,
    pub objects: usize,
    pub bad_lines: usize,
}

impl Loaded {
    fn add_object(&mut self, text: &[u8], how: &Interpretation) {
        self.objects += 1;
        for line in text.split(|b| *b == b'\n') {
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            match parse_line(line, how) {
                Some(p) => self.points.push(p),
                None => self.bad_lines += 1,
            }
        }
    }
}

fn seconds(time: &str) -> Option<f64> {
    Some(
        humantime::parse_rfc3339_weak(time.trim_end_matches('Z'))
            .ok()?
            .duration_since(SystemTime::UNIX_EPOCH)
            .ok()?
            .as_secs_f64(),
    )
}

/// A captured prediction; `input_type` is the captured input's type.
fn from_prediction(v: &serde_json::Value, input_type: Option<&str>) -> Option<Point> {
    let p: LinePrediction = serde_json::from_value(v.clone()).ok()?;
    Some(Point {
        time: seconds(&p.processed_at)?,
        content_type: input_type
            .map(str::to_string)
            .or_else(|| p.key.as_deref().and_then(type_of_key)),
        label: p.label,
        confidence: p.confidence,
        threshold: p.threshold,
        accepted: p.decision == "accepted",
        event_id: p.id.as_deref().map(crate::record::event_id),
        id: p.id,
        size: p.size,
        actual: None,
    })
}

/// A line in inferstream's format, or in Model Monitor's (written by
/// inferstream, with its prediction, or by SageMaker, without).
fn parse_line(line: &[u8], how: &Interpretation) -> Option<Point> {
    let v: serde_json::Value = serde_json::from_slice(line).ok()?;
    if let Some(p) = v.get("prediction") {
        return from_prediction(p, v["endpoint_input"]["content_type"].as_str());
    }
    v.get("captureData")?;
    let input = &v["captureData"]["endpointInput"];
    let input_type = input["observedContentType"].as_str();
    if let Some(p) = v.get("inferstream") {
        return from_prediction(p, input_type);
    }
    let out = &v["captureData"]["endpointOutput"];
    let data = out["data"].as_str()?;
    let text = if out["encoding"].as_str() == Some("BASE64") {
        use base64::Engine as _;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(data)
            .ok()?;
        String::from_utf8(bytes).ok()?
    } else {
        data.to_string()
    };
    let scores = scores_of(&text)?;
    // One score: a binary model's probability of the second class.
    let (index, confidence) = if let [p] = scores[..] {
        if p >= 0.5 {
            (1, p)
        } else {
            (0, 1.0 - p)
        }
    } else {
        crate::pipeline::route::top(&scores)
    };
    let label = how
        .labels
        .get(index)
        .cloned()
        .unwrap_or_else(|| format!("class {index}"));
    let threshold = how.threshold_for(&label);
    // The input's size, from its base64 length.
    let size = (input["encoding"].as_str() == Some("BASE64"))
        .then(|| input["data"].as_str().map(|d| (d.len() / 4 * 3) as u64))
        .flatten();
    Some(Point {
        time: seconds(v["eventMetadata"]["inferenceTime"].as_str()?)?,
        label,
        confidence,
        threshold,
        accepted: confidence >= threshold,
        id: v["eventMetadata"]["inferenceId"]
            .as_str()
            .map(str::to_string),
        event_id: v["eventMetadata"]["eventId"].as_str().map(str::to_string),
        actual: None,
        size,
        content_type: input_type
            .filter(|t| t.starts_with("image/"))
            .map(str::to_string),
    })
}

/// Calls `each` with every `*.jsonl` file under `dir`, recursively, in
/// path order (or with `dir` itself, if it is a file).
fn each_file(dir: &Path, mut each: impl FnMut(&[u8])) -> anyhow::Result<()> {
    if dir.is_file() {
        let bytes = std::fs::read(dir).with_context(|| format!("cannot read {}", dir.display()))?;
        each(&bytes);
        return Ok(());
    }
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let entries = std::fs::read_dir(&d)
            .with_context(|| format!("cannot read directory {}", d.display()))?;
        for entry in entries {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "jsonl") {
                files.push(path);
            }
        }
    }
    files.sort();
    for path in files {
        let bytes =
            std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
        each(&bytes);
    }
    Ok(())
}

/// Reads every `*.jsonl` file under `dir`, recursively.
pub fn load_dir(dir: &Path, how: &Interpretation) -> anyhow::Result<Loaded> {
    let mut loaded = Loaded::default();
    each_file(dir, |bytes| loaded.add_object(bytes, how))?;
    Ok(loaded)
}

/// Calls `each` with every `*.jsonl` object under `s3://bucket/prefix`.
async fn each_s3_object(
    client: &aws_sdk_s3::Client,
    bucket: &str,
    prefix: &str,
    mut each: impl FnMut(&[u8]),
) -> anyhow::Result<()> {
    let list_prefix = if prefix.is_empty() {
        String::new()
    } else {
        format!("{prefix}/")
    };
    let mut pages = client
        .list_objects_v2()
        .bucket(bucket)
        .prefix(&list_prefix)
        .into_paginator()
        .send();
    while let Some(page) = pages.next().await {
        let page = page.map_err(|e| {
            anyhow::anyhow!(
                "cannot list s3://{bucket}/{list_prefix}: {}",
                crate::clients::aws::describe(&e)
            )
        })?;
        for obj in page.contents.unwrap_or_default() {
            let Some(key) = obj.key.filter(|k| k.ends_with(".jsonl")) else {
                continue;
            };
            let out = client
                .get_object()
                .bucket(bucket)
                .key(&key)
                .send()
                .await
                .map_err(|e| {
                    anyhow::anyhow!(
                        "cannot read s3://{bucket}/{key}: {}",
                        crate::clients::aws::describe(&e)
                    )
                })?;
            let bytes = out
                .body
                .collect()
                .await
                .with_context(|| format!("reading s3://{bucket}/{key}"))?
                .into_bytes();
            each(&bytes);
        }
    }
    Ok(())
}

/// Reads every `*.jsonl` object under `s3://bucket/prefix`.
pub async fn load_s3(
    client: &aws_sdk_s3::Client,
    bucket: &str,
    prefix: &str,
    how: &Interpretation,
) -> anyhow::Result<Loaded> {
    let mut loaded = Loaded::default();
    each_s3_object(client, bucket, prefix, |bytes| {
        loaded.add_object(bytes, how)
    })
    .await?;
    Ok(loaded)
}

/// Calls `each` with every `*.jsonl` object at `from`: `s3://bucket/prefix`
/// (with the S3 settings of `cfg`) or a local directory. `what` names the
/// option in errors.
async fn each_object(
    cfg: &crate::config::Config,
    from: &str,
    what: &str,
    each: impl FnMut(&[u8]),
) -> anyhow::Result<()> {
    if from.starts_with("s3://") {
        let Some((bucket, prefix)) = crate::config::parse_s3_url(from) else {
            bail!("{what} `{from}` is not s3://bucket/prefix");
        };
        let sdk = crate::clients::aws::sdk_config(cfg).await;
        let client = crate::clients::aws::s3_client(&sdk, cfg);
        each_s3_object(&client, &bucket, &prefix, each).await
    } else {
        each_file(Path::new(from), each)
    }
}

/// Reads the capture at `from`: `s3://bucket/prefix` (with the S3 settings
/// of `cfg`) or a local directory; SageMaker's own lines are read with
/// `cfg`'s labels and thresholds.
pub async fn load_capture(cfg: &crate::config::Config, from: &str) -> anyhow::Result<Loaded> {
    let how = Interpretation::from_config(cfg);
    let mut loaded = Loaded::default();
    each_object(cfg, from, "--from", |bytes| loaded.add_object(bytes, &how)).await?;
    Ok(loaded)
}

/// True labels read: by prediction id or event id, and how many lines
/// were not ground truth.
#[derive(Debug, Default)]
pub struct GroundTruthRead {
    pub labels: HashMap<String, String>,
    pub objects: usize,
    pub bad_lines: usize,
}

/// Reads ground truth at `from` as the service reads
/// `monitor.ground_truth_s3`: `*.jsonl` objects of Model Monitor
/// ground-truth lines or `{"id", "label"}` lines, in key order, the first
/// label of a key counting, lines over 64 KiB skipped.
pub async fn load_ground_truth(
    cfg: &crate::config::Config,
    from: &str,
) -> anyhow::Result<GroundTruthRead> {
    use crate::pipeline::truth_s3::Lines;
    let mut read = GroundTruthRead::default();
    each_object(cfg, from, "--ground-truth", |bytes| {
        read.objects += 1;
        let mut lines = Lines::default();
        let mut each = |line: Option<&[u8]>| match line
            .and_then(|l| crate::pipeline::truth::parse(l, &cfg.endpoint.labels))
        {
            Some((key, label)) => {
                read.labels.entry(key).or_insert(label);
            }
            None => read.bad_lines += 1,
        };
        lines.push(bytes, &mut each);
        lines.finish(&mut each);
    })
    .await?;
    if read.objects == 0 {
        bail!(
            "--ground-truth `{from}`: no *.jsonl objects there; give the prefix (or directory) the ground-truth objects are under"
        );
    }
    Ok(read)
}

/// Sets each point's true label from `truth` (by event id, else by
/// prediction id); a prediction captured twice (redelivered) is judged
/// once, as the service does. Returns how many were judged.
pub fn join_truth(points: &mut [Point], truth: &HashMap<String, String>) -> usize {
    let mut judged = 0;
    let mut done: std::collections::HashSet<String> = std::collections::HashSet::new();
    for p in points.iter_mut() {
        let key = p
            .event_id
            .as_ref()
            .filter(|e| truth.contains_key(*e))
            .or_else(|| p.id.as_ref().filter(|i| truth.contains_key(*i)));
        p.actual = match key {
            Some(k) if done.insert(k.clone()) => truth.get(k).cloned(),
            _ => None,
        };
        judged += usize::from(p.actual.is_some());
    }
    judged
}

/// Share right among `points` that have a true label, and how many have.
pub fn accuracy<'a>(points: impl IntoIterator<Item = &'a Point>) -> (f64, usize) {
    let (mut right, mut n) = (0usize, 0usize);
    for p in points {
        if let Some(actual) = &p.actual {
            n += 1;
            right += usize::from(*actual == p.label);
        }
    }
    (right as f64 / n.max(1) as f64, n)
}

/// For each threshold from `lowest` to 1 (by 0.005): the accuracy of the
/// judged predictions it would accept, and the share of all predictions
/// it would send to review.
pub fn threshold_curve(points: &[Point], lowest: f64) -> Vec<(f64, Option<f64>, f64)> {
    let lowest = if lowest.is_finite() {
        lowest.clamp(0.0, 1.0)
    } else {
        0.0
    };
    let finite = || points.iter().filter(|p| p.confidence.is_finite());
    let confidences: Vec<f64> = finite().map(|p| p.confidence).collect();
    let judged: Vec<(f64, bool)> = finite()
        .filter_map(|p| Some((p.confidence, *p.actual.as_ref()? == p.label)))
        .collect();
    let steps = ((1.0 - lowest) / 0.005).round() as usize;
    let thresholds = (0..=steps).map(|i| lowest + i as f64 * 0.005);
    crate::pipeline::recent::curve_of(&confidences, &judged, thresholds)
        .into_iter()
        .map(|p| (p.threshold, p.accepted_accuracy, p.review_share))
        .collect()
}

/// Writes the three charts as PNG and SVG into `out`; returns the files.
pub fn render(points: &[Point], out: &Path) -> anyhow::Result<Vec<PathBuf>> {
    render_with(points, out, None)
}

/// The fewest predictions a time bucket of the drift chart needs to be
/// drawn.
const DRIFT_MIN_POINTS: usize = 20;

/// Drift of the points against `baseline`, per time bucket: (bucket
/// middle, its measures).
pub fn drift_series(points: &[Point], baseline: &Tally) -> Vec<(f64, Measures)> {
    time_buckets(points)
        .into_iter()
        .filter(|(_, ps)| ps.len() >= DRIFT_MIN_POINTS)
        .map(|(t, ps)| {
            let mut tally = Tally::default();
            for p in ps {
                tally.add(&p.observation());
            }
            (t, measure(baseline, &tally))
        })
        .collect()
}

/// As [`render`]; with a baseline, also the drift chart; with points whose
/// true label is known ([`join_truth`]), also the accuracy chart and the
/// threshold curve.
pub fn render_with(
    points: &[Point],
    out: &Path,
    baseline: Option<&Tally>,
) -> anyhow::Result<Vec<PathBuf>> {
    if points.is_empty() {
        bail!("no captured predictions to plot");
    }
    REGISTER.call_once(|| {
        if plotters::style::register_font(FONT, FontStyle::Normal, FONT_BYTES).is_err() {
            tracing::warn!("the embedded font could not be loaded; charts will have no text");
        }
    });
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut written = Vec::new();
    let mut charts = vec![
        ("confidence-over-time", Chart::OverTime),
        ("confidence-histogram", Chart::Histogram),
        ("decisions-by-label", Chart::ByLabel),
    ];
    if let Some(b) = baseline {
        charts.push(("drift-over-time", Chart::Drift(b)));
    }
    if points.iter().any(|p| p.actual.is_some()) {
        charts.push(("accuracy-over-time", Chart::Accuracy));
        charts.push(("threshold-curve", Chart::ThresholdCurve));
    }
    for (name, chart) in charts {
        let png = out.join(format!("{name}.png"));
        let svg = out.join(format!("{name}.svg"));
        {
            let root = BitMapBackend::new(&png, SIZE).into_drawing_area();
            chart
                .draw(&root, points)
                .map_err(|e| anyhow::anyhow!("drawing {}: {e}", png.display()))?;
            root.present()
                .map_err(|e| anyhow::anyhow!("writing {}: {e}", png.display()))?;
        }
        {
            let root = SVGBackend::new(&svg, SIZE).into_drawing_area();
            chart
                .draw(&root, points)
                .map_err(|e| anyhow::anyhow!("drawing {}: {e}", svg.display()))?;
            root.present()
                .map_err(|e| anyhow::anyhow!("writing {}: {e}", svg.display()))?;
        }
        written.push(png);
        written.push(svg);
    }
    Ok(written)
}

#[derive(Clone, Copy)]
enum Chart<'a> {
    OverTime,
    Histogram,
    ByLabel,
    Drift(&'a Tally),
    Accuracy,
    ThresholdCurve,
}

type DrawResult<DB> = Result<(), DrawingAreaErrorKind<<DB as DrawingBackend>::ErrorType>>;

impl Chart<'_> {
    fn draw<DB: DrawingBackend>(
        &self,
        root: &DrawingArea<DB, Shift>,
        points: &[Point],
    ) -> DrawResult<DB> {
        root.fill(&WHITE)?;
        match self {
            Chart::OverTime => over_time(root, points),
            Chart::Histogram => histogram(root, points),
            Chart::ByLabel => by_label(root, points),
            Chart::Drift(b) => drift(root, points, b),
            Chart::Accuracy => accuracy_over_time(root, points),
            Chart::ThresholdCurve => threshold_curve_chart(root, points),
        }
    }
}

/// PSI of confidence and of the label mix per time bucket, with the 0.2
/// line above which a shift is likely.
fn drift<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    points: &[Point],
    baseline: &Tally,
) -> DrawResult<DB> {
    let series = drift_series(points, baseline);
    let axis = TimeAxis::of(points);
    let span = axis.span;
    let y_max = series
        .iter()
        .map(|(_, m)| m.confidence_psi.max(m.label_psi))
        .fold(0.3, f64::max)
        .min(10.0)
        * 1.1;
    let mut chart = ChartBuilder::on(root)
        .caption("Drift from the baseline", (FONT, 28))
        .margin(16)
        .x_label_area_size(50)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..span, 0.0..y_max)?;
    chart
        .configure_mesh()
        .x_desc(axis.desc())
        .y_desc("population stability index")
        .label_style((FONT, 15))
        .axis_desc_style((FONT, 17))
        .light_line_style(WHITE.mix(0.0))
        .draw()?;
    for (name, colour, pick) in [
        (
            "confidence",
            REVIEW,
            (|m: &Measures| m.confidence_psi) as fn(&Measures) -> f64,
        ),
        ("label mix", ACCEPTED, |m: &Measures| m.label_psi),
    ] {
        let line: Vec<(f64, f64)> = series
            .iter()
            .map(|(t, m)| (axis.x(*t), pick(m).min(y_max)))
            .collect();
        dotted_line(&mut chart, line, colour, format!("PSI of {name}"))?;
    }
    dashed_line(&mut chart, [(0.0, 0.2), (span, 0.2)], "0.2: a shift".into())?;
    legend(&mut chart, SeriesLabelPosition::UpperLeft)
}

/// A dashed reference line between two points (a threshold, a limit),
/// and its legend entry.
fn dashed_line<'a, DB: DrawingBackend + 'a>(
    chart: &mut ChartContext<
        'a,
        DB,
        Cartesian2d<plotters::coord::types::RangedCoordf64, plotters::coord::types::RangedCoordf64>,
    >,
    ends: [(f64, f64); 2],
    label: String,
) -> DrawResult<DB> {
    chart
        .draw_series(DashedLineSeries::new(
            ends.to_vec(),
            8,
            5,
            THRESHOLD.stroke_width(2),
        ))?
        .label(label)
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], THRESHOLD.stroke_width(2)));
    Ok(())
}

/// A line with a dot at each point, and its legend entry.
fn dotted_line<'a, DB: DrawingBackend + 'a>(
    chart: &mut ChartContext<
        'a,
        DB,
        Cartesian2d<plotters::coord::types::RangedCoordf64, plotters::coord::types::RangedCoordf64>,
    >,
    line: Vec<(f64, f64)>,
    colour: RGBColor,
    label: String,
) -> DrawResult<DB> {
    chart
        .draw_series(LineSeries::new(line.clone(), colour.stroke_width(2)))?
        .label(label)
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2)));
    chart.draw_series(
        line.into_iter()
            .map(|xy| Circle::new(xy, 3, colour.filled())),
    )?;
    Ok(())
}

/// The legend box, the same on every chart.
fn legend<'a, DB, CT>(
    chart: &mut ChartContext<'a, DB, CT>,
    position: SeriesLabelPosition,
) -> DrawResult<DB>
where
    DB: DrawingBackend + 'a,
    CT: plotters::coord::CoordTranslate,
{
    chart
        .configure_series_labels()
        .position(position)
        .label_font((FONT, 16))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.4))
        .draw()
}

/// The threshold most predictions were judged by.
fn main_threshold(points: &[Point]) -> f64 {
    let mut counts: BTreeMap<u64, usize> = BTreeMap::new();
    for p in points {
        *counts.entry(p.threshold.to_bits()).or_default() += 1;
    }
    counts
        .into_iter()
        .max_by_key(|(_, n)| *n)
        .map_or(0.0, |(bits, _)| f64::from_bits(bits))
}

fn time_label(secs: f64) -> String {
    let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs_f64(secs.max(0.0));
    humantime::format_rfc3339_seconds(t).to_string()
}

/// The time axis of the charts over time: seconds, minutes or hours since
/// the first point.
struct TimeAxis {
    t0: f64,
    unit: &'static str,
    per: f64,
    /// The axis length in units.
    span: f64,
}

impl TimeAxis {
    fn of(points: &[Point]) -> TimeAxis {
        let (t0, t1) = time_range(points);
        let (unit, per) = match t1 - t0 {
            s if s < 120.0 => ("seconds", 1.0),
            s if s < 7200.0 => ("minutes", 60.0),
            _ => ("hours", 3600.0),
        };
        TimeAxis {
            t0,
            unit,
            per,
            span: ((t1 - t0) / per).max(1e-3) * 1.02,
        }
    }

    fn x(&self, time: f64) -> f64 {
        (time - self.t0) / self.per
    }

    fn desc(&self) -> String {
        format!("{} since {}", self.unit, time_label(self.t0))
    }
}

/// The first and last time of `points` (infinite when there are none).
fn time_range(points: &[Point]) -> (f64, f64) {
    points
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), p| {
            (lo.min(p.time), hi.max(p.time))
        })
}

/// `points` in `BUCKETS` equal slices of their time range: (slice middle,
/// the points in it).
fn time_buckets(points: &[Point]) -> Vec<(f64, Vec<&Point>)> {
    const BUCKETS: usize = 30;
    let (t0, t1) = time_range(points);
    if !t0.is_finite() {
        return Vec::new();
    }
    let width = ((t1 - t0) / BUCKETS as f64).max(1e-9);
    let mut buckets: Vec<(f64, Vec<&Point>)> = (0..BUCKETS)
        .map(|i| (t0 + (i as f64 + 0.5) * width, Vec::new()))
        .collect();
    for p in points {
        let i = (((p.time - t0) / width) as usize).min(BUCKETS - 1);
        buckets[i].1.push(p);
    }
    buckets
}

/// Judged predictions a time bucket needs for its accuracy to be drawn.
const ACCURACY_MIN_POINTS: usize = 5;

/// Accuracy per time bucket: of all judged predictions, of the accepted
/// ones and of those sent to review.
fn accuracy_over_time<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    points: &[Point],
) -> DrawResult<DB> {
    let axis = TimeAxis::of(points);
    let buckets = time_buckets(points);
    let mut chart = ChartBuilder::on(root)
        .caption("Accuracy over time (ground truth)", (FONT, 28))
        .margin(16)
        .x_label_area_size(50)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..axis.span, 0.0..1.05)?;
    chart
        .configure_mesh()
        .x_desc(axis.desc())
        .y_desc("share of judged predictions right")
        .label_style((FONT, 15))
        .axis_desc_style((FONT, 17))
        .light_line_style(WHITE.mix(0.0))
        .draw()?;
    type Pick = fn(&Point) -> bool;
    let all: [(&str, RGBColor, Pick); 3] = [
        ("all", THRESHOLD, |_| true),
        ("accepted", ACCEPTED, |p| p.accepted),
        ("review", REVIEW, |p| !p.accepted),
    ];
    for (name, colour, pick) in all {
        let (total, n) = accuracy(points.iter().filter(|p| pick(p)));
        if n == 0 {
            continue;
        }
        let line: Vec<(f64, f64)> = buckets
            .iter()
            .filter_map(|(t, ps)| {
                let (acc, n) = accuracy(ps.iter().copied().filter(|p| pick(p)));
                (n >= ACCURACY_MIN_POINTS).then_some((axis.x(*t), acc))
            })
            .collect();
        dotted_line(
            &mut chart,
            line,
            colour,
            format!("{name}: {total:.3} of {n}"),
        )?;
    }
    legend(&mut chart, SeriesLabelPosition::LowerLeft)
}

/// Accuracy of what a threshold would accept and the share it would send
/// to review, for every threshold, with the one in use marked.
fn threshold_curve_chart<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    points: &[Point],
) -> DrawResult<DB> {
    let lowest = points
        .iter()
        .map(|p| p.confidence)
        .filter(|c| c.is_finite())
        .fold(1.0, f64::min)
        .clamp(0.0, 0.9);
    let lowest = (lowest * 10.0).floor() / 10.0;
    let curve = threshold_curve(points, lowest);
    let current = main_threshold(points);
    let mut chart = ChartBuilder::on(root)
        .caption(
            "Threshold: accuracy accepted and share to review",
            (FONT, 28),
        )
        .margin(16)
        .x_label_area_size(50)
        .y_label_area_size(70)
        .build_cartesian_2d(lowest..1.0, 0.0..1.05)?;
    chart
        .configure_mesh()
        .x_desc("confidence threshold")
        .y_desc("share")
        .label_style((FONT, 15))
        .axis_desc_style((FONT, 17))
        .light_line_style(WHITE.mix(0.0))
        .draw()?;
    let accepted: Vec<(f64, f64)> = curve
        .iter()
        .filter_map(|(t, acc, _)| acc.map(|a| (*t, a)))
        .collect();
    chart
        .draw_series(LineSeries::new(accepted, ACCEPTED.stroke_width(2)))?
        .label("accuracy of the predictions accepted")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], ACCEPTED.stroke_width(2)));
    let review: Vec<(f64, f64)> = curve.iter().map(|(t, _, r)| (*t, *r)).collect();
    chart
        .draw_series(LineSeries::new(review, REVIEW.stroke_width(2)))?
        .label("share sent to review")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], REVIEW.stroke_width(2)));
    dashed_line(
        &mut chart,
        [(current, 0.0), (current, 1.05)],
        format!("threshold in use {current:.3}"),
    )?;
    legend(&mut chart, SeriesLabelPosition::MiddleLeft)
}

fn over_time<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    points: &[Point],
) -> DrawResult<DB> {
    let axis = TimeAxis::of(points);
    let span = axis.span;
    let threshold = main_threshold(points);
    let y_min = points
        .iter()
        .map(|p| p.confidence)
        .fold(threshold, f64::min)
        .min(0.9);
    let y_min = (y_min * 10.0).floor() / 10.0;
    let mut chart = ChartBuilder::on(root)
        .caption("Confidence over time", (FONT, 28))
        .margin(16)
        .x_label_area_size(50)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..span, y_min..1.0)?;
    chart
        .configure_mesh()
        .x_desc(axis.desc())
        .y_desc("confidence of the top label")
        .label_style((FONT, 15))
        .axis_desc_style((FONT, 17))
        .light_line_style(WHITE.mix(0.0))
        .draw()?;
    for (accepted, colour, name) in [(true, ACCEPTED, "accepted"), (false, REVIEW, "review")] {
        let series: Vec<(f64, f64)> = points
            .iter()
            .filter(|p| p.accepted == accepted)
            .map(|p| (axis.x(p.time), p.confidence))
            .collect();
        let n = series.len();
        chart
            .draw_series(
                series
                    .into_iter()
                    .map(|xy| Circle::new(xy, 3, colour.mix(0.7).filled())),
            )?
            .label(format!("{name} ({n})"))
            .legend(move |(x, y)| Circle::new((x + 10, y), 4, colour.filled()));
    }
    dashed_line(
        &mut chart,
        [(0.0, threshold), (span, threshold)],
        format!("threshold {threshold}"),
    )?;
    legend(&mut chart, SeriesLabelPosition::LowerRight)
}

fn histogram<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    points: &[Point],
) -> DrawResult<DB> {
    const BINS: usize = 50;
    let mut accepted = [0u32; BINS];
    let mut review = [0u32; BINS];
    for p in points {
        let bin = ((p.confidence.clamp(0.0, 1.0) * BINS as f64) as usize).min(BINS - 1);
        if p.accepted {
            accepted[bin] += 1;
        } else {
            review[bin] += 1;
        }
    }
    let top = accepted
        .iter()
        .zip(&review)
        .map(|(a, r)| a + r)
        .max()
        .unwrap_or(1)
        .max(1);
    let threshold = main_threshold(points);
    let lowest = points
        .iter()
        .map(|p| p.confidence)
        .fold(threshold, f64::min);
    let x_min = ((lowest * 10.0).floor() / 10.0).clamp(0.0, 0.9);
    let mut chart = ChartBuilder::on(root)
        .caption("Distribution of confidence", (FONT, 28))
        .margin(16)
        .x_label_area_size(50)
        .y_label_area_size(70)
        .build_cartesian_2d(x_min..1.0, 0u32..top + top / 10 + 1)?;
    chart
        .configure_mesh()
        .x_desc("confidence of the top label")
        .y_desc("predictions")
        .label_style((FONT, 15))
        .axis_desc_style((FONT, 17))
        .light_line_style(WHITE.mix(0.0))
        .draw()?;
    let width = 1.0 / BINS as f64;
    // Stacked: review at the bottom, accepted on top.
    let review_bars = review
        .iter()
        .enumerate()
        .filter(|(_, n)| **n > 0)
        .map(|(i, n)| {
            let x = i as f64 * width;
            Rectangle::new([(x, 0), (x + width, *n)], REVIEW.filled())
        });
    chart
        .draw_series(review_bars)?
        .label(format!("review ({})", review.iter().sum::<u32>()))
        .legend(|(x, y)| Rectangle::new([(x, y - 5), (x + 14, y + 5)], REVIEW.filled()));
    let accepted_bars = accepted
        .iter()
        .enumerate()
        .filter(|(_, n)| **n > 0)
        .map(|(i, n)| {
            let x = i as f64 * width;
            Rectangle::new(
                [(x, review[i]), (x + width, review[i] + n)],
                ACCEPTED.filled(),
            )
        });
    chart
        .draw_series(accepted_bars)?
        .label(format!("accepted ({})", accepted.iter().sum::<u32>()))
        .legend(|(x, y)| Rectangle::new([(x, y - 5), (x + 14, y + 5)], ACCEPTED.filled()));
    let y_top = top + top / 10 + 1;
    chart
        .draw_series(DashedLineSeries::new(
            vec![(threshold, 0), (threshold, y_top)],
            8,
            5,
            THRESHOLD.stroke_width(2),
        ))?
        .label(format!("threshold {threshold}"))
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], THRESHOLD.stroke_width(2)));
    legend(&mut chart, SeriesLabelPosition::UpperLeft)
}

fn by_label<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, points: &[Point]) -> DrawResult<DB> {
    let mut counts: BTreeMap<&str, (u32, u32)> = BTreeMap::new();
    for p in points {
        let c = counts.entry(p.label.as_str()).or_default();
        if p.accepted {
            c.0 += 1;
        } else {
            c.1 += 1;
        }
    }
    let labels: Vec<&str> = counts.keys().copied().collect();
    let top = counts
        .values()
        .map(|(a, r)| *a.max(r))
        .max()
        .unwrap_or(1)
        .max(1);
    let n = labels.len();
    let mut chart = ChartBuilder::on(root)
        .caption("Accepted and review predictions by label", (FONT, 28))
        .margin(16)
        .x_label_area_size(50)
        .y_label_area_size(70)
        .build_cartesian_2d(-0.5..n as f64 - 0.5, 0u32..top + top / 10 + 1)?;
    let names = labels.clone();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(n.max(1) * 2 + 1)
        .x_label_formatter(&move |x: &f64| {
            let i = x.round();
            if (x - i).abs() < 1e-6 && i >= 0.0 {
                names
                    .get(i as usize)
                    .map(|s| s.to_string())
                    .unwrap_or_default()
            } else {
                String::new()
            }
        })
        .x_desc("label")
        .y_desc("predictions")
        .label_style((FONT, 15))
        .axis_desc_style((FONT, 17))
        .light_line_style(WHITE.mix(0.0))
        .draw()?;
    let bar = 0.35;
    let series = |accepted: bool| {
        labels
            .iter()
            .enumerate()
            .map(|(i, l)| {
                let (a, r) = counts[l];
                let x = i as f64;
                if accepted {
                    Rectangle::new([(x - bar, 0), (x, a)], ACCEPTED.filled())
                } else {
                    Rectangle::new([(x, 0), (x + bar, r)], REVIEW.filled())
                }
            })
            .collect::<Vec<_>>()
    };
    let total = |f: fn(&(u32, u32)) -> u32| counts.values().map(f).sum::<u32>();
    chart
        .draw_series(series(true))?
        .label(format!("accepted ({})", total(|c| c.0)))
        .legend(|(x, y)| Rectangle::new([(x, y - 5), (x + 14, y + 5)], ACCEPTED.filled()));
    chart
        .draw_series(series(false))?
        .label(format!("review ({})", total(|c| c.1)))
        .legend(|(x, y)| Rectangle::new([(x, y - 5), (x + 14, y + 5)], REVIEW.filled()));
    legend(&mut chart, SeriesLabelPosition::UpperRight)
}

/// `inferstream report`: reads the capture at `from` (s3://bucket/prefix,
/// with the S3 settings of the configuration at `path`, or a directory) and
/// writes the charts into `out`.
pub async fn command(
    path: Option<&Path>,
    from: &str,
    out: &Path,
    baseline: Option<&Path>,
    ground_truth: Option<&str>,
) -> std::process::ExitCode {
    use std::process::ExitCode;
    // Labels and thresholds read SageMaker's own captures; S3 settings
    // read s3:// captures.
    let cfg = match crate::tools::load_config(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let baseline = match baseline.map(crate::pipeline::monitor::Baseline::load) {
        None => None,
        Some(Ok(b)) => Some(b),
        Some(Err(e)) => {
            eprintln!("error: --baseline: {e}");
            return ExitCode::from(2);
        }
    };
    let mut loaded = match load_capture(&cfg, from).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    println!(
        "read {} predictions from {} capture objects in {}{}",
        loaded.points.len(),
        loaded.objects,
        from,
        if loaded.bad_lines > 0 {
            format!(
                " ({} lines were not capture records and were skipped)",
                loaded.bad_lines
            )
        } else {
            String::new()
        }
    );
    if let Some(gt) = ground_truth {
        let truth = match load_ground_truth(&cfg, gt).await {
            Ok(t) => t,
            Err(e) => {
                eprintln!("error: {e:#}");
                return ExitCode::FAILURE;
            }
        };
        let judged = join_truth(&mut loaded.points, &truth.labels);
        let share = |(acc, n): (f64, usize)| {
            if n == 0 {
                "none judged".to_string()
            } else {
                format!("{acc:.3} of {n}")
            }
        };
        let (all, _) = accuracy(&loaded.points);
        let accepted = share(accuracy(loaded.points.iter().filter(|p| p.accepted)));
        let review = share(accuracy(loaded.points.iter().filter(|p| !p.accepted)));
        println!(
            "read true labels of {} predictions from {} objects in {gt}{}; {judged} of {} predictions judged: \
             accuracy {all:.3} (accepted {accepted}, review {review})",
            truth.labels.len(),
            truth.objects,
            if truth.bad_lines > 0 {
                format!(" ({} lines were not ground truth and were skipped)", truth.bad_lines)
            } else {
                String::new()
            },
            loaded.points.len(),
        );
        if judged == 0 {
            eprintln!(
                "warning: no true label matched a captured prediction (by eventId or prediction id); \
                 no accuracy charts"
            );
        }
    }
    match render_with(&loaded.points, out, baseline.as_ref().map(|b| &b.tally)) {
        Ok(files) => {
            for f in files {
                println!("wrote {}", f.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn how() -> Interpretation {
        Interpretation {
            labels: vec!["bicycle".into(), "motorcycle".into()],
            threshold: 0.93,
            label_thresholds: BTreeMap::new(),
        }
    }

    #[test]
    fn captures_written_by_sagemaker_are_read_with_the_configured_labels() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/capture/sagemaker");
        let l = load_dir(&dir, &how()).unwrap();
        assert_eq!((l.objects, l.bad_lines), (2, 0));
        let mut points = l.points;
        points.sort_by(|a, b| a.time.total_cmp(&b.time));
        // AWS's documented line: one score, the second class's probability.
        assert_eq!(points[0].time, 1_644_859_549.0);
        assert_eq!(points[0].label, "bicycle");
        assert!((points[0].confidence - (1.0 - 0.0254181120544672)).abs() < 1e-12);
        assert!(points[0].accepted);
        // An image classifier's answer, base64-encoded by SageMaker.
        assert_eq!(points[1].label, "motorcycle");
        assert_eq!(points[1].confidence, 0.88);
        assert!(!points[1].accepted);
    }

    #[test]
    fn both_formats_inferstream_writes_are_read() {
        use crate::config::CaptureFormat;
        let p: crate::record::Prediction = serde_json::from_value(serde_json::json!({
            "schema": "inferstream.prediction.v1", "id": "u/k@e", "bucket": "u", "key": "k",
            "etag": "e", "version_id": null, "size": 1, "label": "motorcycle", "confidence": 0.61,
            "scores": {"bicycle": 0.39, "motorcycle": 0.61}, "threshold": 0.5, "decision": "accepted",
            "endpoint": "x", "variant": null, "event_time": null,
            "processed_at": "2026-11-25T10:00:00.000Z",
            "latency_ms": {"fetch": 1.0, "infer": 1.0, "total": 1.0},
            "source": {"topic": "t", "partition": 0, "offset": 1}
        }))
        .unwrap();
        for format in [CaptureFormat::Sagemaker, CaptureFormat::Inferstream] {
            let line = crate::pipeline::capture::render_line(&p, None, &how().labels, format);
            let mut l = Loaded::default();
            l.add_object(&line.bytes, &how());
            // The prediction's own threshold and decision, not the config's.
            assert_eq!(l.points.len(), 1, "{format:?}");
            assert_eq!((l.points[0].threshold, l.points[0].accepted), (0.5, true));
        }
    }

    #[test]
    fn lines_that_are_not_captures_are_counted_not_fatal() {
        let mut l = Loaded::default();
        l.add_object(
            b"{\"prediction\": {\"processed_at\": \"2026-11-24T10:00:00.000Z\", \"label\": \"bicycle\", \
              \"confidence\": 0.97, \"threshold\": 0.93, \"decision\": \"accepted\"}}\n\
              not json\n\n{\"prediction\": {}}\n",
            &how(),
        );
        assert_eq!(l.objects, 1);
        assert_eq!(l.points.len(), 1);
        assert_eq!(l.bad_lines, 2);
        assert!(l.points[0].accepted);
    }

    #[test]
    fn the_drift_chart_shows_a_shift_where_it_happened() {
        let point = |i: u32, confidence: f64| Point {
            time: 1_800_000_000.0 + f64::from(i),
            label: "bicycle".into(),
            confidence,
            threshold: 0.93,
            accepted: confidence >= 0.93,
            id: None,
            event_id: None,
            actual: None,
            size: None,
            content_type: None,
        };
        let mut baseline = Tally::default();
        for i in 0..100 {
            baseline.add(&point(i, if i % 10 == 0 { 0.7 } else { 0.98 }).observation());
        }
        let points: Vec<Point> = (0..3000)
            .map(|i| {
                point(
                    i,
                    if i >= 1500 {
                        0.55
                    } else if i % 10 == 0 {
                        0.7
                    } else {
                        0.98
                    },
                )
            })
            .collect();
        let series = drift_series(&points, &baseline);
        assert_eq!(series.len(), 30);
        assert!(series[..15].iter().all(|(_, m)| m.confidence_psi < 0.1));
        assert!(series[15..].iter().all(|(_, m)| m.confidence_psi > 0.2));
        let dir = tempfile::tempdir().unwrap();
        let files = render_with(&points, dir.path(), Some(&baseline)).unwrap();
        assert_eq!(files.len(), 8);
        assert!(dir.path().join("drift-over-time.svg").is_file());
    }

    #[test]
    fn ground_truth_is_joined_by_event_id_or_prediction_id() {
        let l = {
            let mut l = Loaded::default();
            l.add_object(
                br#"{"prediction": {"id": "uploads/a@1", "processed_at": "2026-12-01T10:00:00Z", "label": "bicycle", "confidence": 0.99, "threshold": 0.93, "decision": "accepted"}}
{"prediction": {"id": "uploads/b@1", "processed_at": "2026-12-01T10:00:01Z", "label": "bicycle", "confidence": 0.6, "threshold": 0.93, "decision": "review"}}
{"prediction": {"id": "uploads/c@1", "processed_at": "2026-12-01T10:00:02Z", "label": "motorcycle", "confidence": 0.95, "threshold": 0.93, "decision": "accepted"}}
{"prediction": {"id": "uploads/a@1", "processed_at": "2026-12-01T10:00:03Z", "label": "bicycle", "confidence": 0.99, "threshold": 0.93, "decision": "accepted"}}
"#,
                &how(),
            );
            l
        };
        let mut points = l.points;
        let truth: HashMap<String, String> = [
            // By the capture's eventId, as Model Monitor's ground truth names it.
            (
                crate::record::event_id("uploads/a@1"),
                "bicycle".to_string(),
            ),
            ("uploads/b@1".to_string(), "motorcycle".to_string()),
        ]
        .into();
        assert_eq!(join_truth(&mut points, &truth), 2);
        assert_eq!(points[0].actual.as_deref(), Some("bicycle"));
        assert_eq!(points[1].actual.as_deref(), Some("motorcycle"));
        assert_eq!(points[2].actual, None);
        // Captured twice (redelivered): judged once.
        assert_eq!(points[3].actual, None);
        assert_eq!(accuracy(&points), (0.5, 2));
        assert_eq!(accuracy(points.iter().filter(|p| p.accepted)), (1.0, 1));
    }

    #[tokio::test]
    async fn ground_truth_files_are_read_in_order_the_first_label_counting() {
        let cfg = crate::config::Config::from_toml_str("[alerts]\nenabled = false\n").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let err = load_ground_truth(&cfg, dir.path().to_str().unwrap())
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("no *.jsonl objects"), "{err}");
        std::fs::create_dir(dir.path().join("2026")).unwrap();
        std::fs::write(
            dir.path().join("2026/b.jsonl"),
            "{\"id\": \"x\", \"label\": \"motorcycle\"}\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("2026/a.jsonl"),
            format!(
                "{{\"id\": \"x\", \"label\": \"bicycle\"}}\nnot ground truth\n{}\n",
                "y".repeat(70_000)
            ),
        )
        .unwrap();
        std::fs::write(dir.path().join("2026/c.json.gz"), "ignored").unwrap();
        let read = load_ground_truth(&cfg, dir.path().to_str().unwrap())
            .await
            .unwrap();
        assert_eq!(read.objects, 2);
        assert_eq!(read.bad_lines, 2);
        assert_eq!(read.labels["x"], "bicycle");
        // A single file is read too.
        let one = dir.path().join("2026/b.jsonl");
        let read = load_ground_truth(&cfg, one.to_str().unwrap())
            .await
            .unwrap();
        assert_eq!(read.labels["x"], "motorcycle");
    }

    #[test]
    fn the_threshold_curve_trades_accuracy_for_review() {
        // Wrong answers are the unsure ones: below 0.8 half are wrong.
        let points: Vec<Point> = (0..100)
            .map(|i| {
                let confidence = 0.5 + f64::from(i) / 200.0;
                Point {
                    time: 1_800_000_000.0 + f64::from(i),
                    label: "bicycle".into(),
                    confidence,
                    threshold: 0.93,
                    accepted: confidence >= 0.93,
                    id: None,
                    event_id: None,
                    actual: Some(
                        if confidence < 0.8 && i % 2 == 0 {
                            "motorcycle"
                        } else {
                            "bicycle"
                        }
                        .into(),
                    ),
                    size: None,
                    content_type: None,
                }
            })
            .collect();
        let curve = threshold_curve(&points, 0.5);
        assert_eq!(curve.len(), 101);
        let at = |t: f64| {
            curve
                .iter()
                .find(|(x, _, _)| (x - t).abs() < 1e-9)
                .copied()
                .unwrap()
        };
        let (_, acc, review) = at(0.5);
        assert_eq!((acc, review), (Some(0.7), 0.0));
        let (_, acc, review) = at(0.8);
        assert_eq!(acc, Some(1.0));
        assert!((review - 0.6).abs() < 1e-9, "{review}");
        let dir = tempfile::tempdir().unwrap();
        let files = render(&points, dir.path()).unwrap();
        assert_eq!(files.len(), 10);
        assert!(dir.path().join("threshold-curve.svg").is_file());
        assert!(dir.path().join("accuracy-over-time.png").is_file());
    }

    #[test]
    fn renders_six_files() {
        let dir = tempfile::tempdir().unwrap();
        let points: Vec<Point> = (0..50)
            .map(|i| Point {
                time: 1_800_000_000.0 + f64::from(i) * 3.0,
                label: ["bicycle", "motorcycle"][i as usize % 2].into(),
                confidence: 0.5 + f64::from(i) / 100.0,
                threshold: 0.93,
                accepted: 0.5 + f64::from(i) / 100.0 >= 0.93,
                id: None,
                event_id: None,
                actual: None,
                size: None,
                content_type: None,
            })
            .collect();
        let files = render(&points, dir.path()).unwrap();
        assert_eq!(files.len(), 6);
        for f in files {
            assert!(
                std::fs::metadata(&f).unwrap().len() > 1000,
                "{}",
                f.display()
            );
        }
        assert!(render(&[], dir.path()).is_err());
    }
}
