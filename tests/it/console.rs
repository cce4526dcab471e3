//! The operator console's thresholds: changed with the token through one
//! instance, followed by every instance through the control topic.

use std::time::{Duration, Instant};

use inferstream::tools::endpoint::Faults;

use crate::harness::*;
use crate::monitor::upload;
use crate::pipeline::MINUTE;
use crate::webdriver::{Browser, Element, ARROW_LEFT, ARROW_RIGHT};

const CONTROL: &str = "inferstream-control";

async fn thresholds(service: &ServiceProc, console: &str) -> serde_json::Value {
    let (status, body) = http_get(&format!("http://{console}/api/thresholds"))
        .await
        .unwrap_or_else(|e| panic!("console: {e}; log: {}", service.log_text()));
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// Waits until `service` logged a thresholds change to `threshold`.
async fn applied(service: &ServiceProc, threshold: f64) -> Duration {
    let start = Instant::now();
    let needle = format!("threshold={threshold}");
    while !service
        .log_all()
        .lines()
        .any(|l| l.contains("thresholds changed") && l.contains(&needle))
    {
        assert!(
            start.elapsed() < MINUTE,
            "no thresholds change to {threshold}; log: {}",
            service.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    start.elapsed()
}

/// A stack with the control topic (and with `truth` the ground-truth
/// topic, read by the service), and a service with the console on a free
/// port, token "s3cret"; the console's address.
async fn console_stack(truth: bool) -> (Stack, ServiceProc, String) {
    console_stack_with(truth, &[]).await
}

/// As [`console_stack`], with more `INFERSTREAM__…` overrides.
async fn console_stack_with(
    truth: bool,
    extra: &[(&'static str, &'static str)],
) -> (Stack, ServiceProc, String) {
    let stack = Stack::start(Faults::default()).await;
    stack
        .kafka
        .create_topic(CONTROL, 1, 1)
        .expect("create topic");
    let console = format!("127.0.0.1:{}", free_port());
    let mut env = vec![
        ("CONSOLE__ENABLED", "true"),
        ("CONSOLE__LISTEN", console.as_str()),
        ("CONSOLE__TOKEN", "s3cret"),
        ("CONSOLE__CONTROL_TOPIC", CONTROL),
    ];
    if truth {
        stack
            .kafka
            .create_topic("ground-truth", PARTITIONS, 1)
            .expect("create topic");
        env.push(("MONITOR__GROUND_TRUTH_TOPIC", "ground-truth"));
    }
    env.extend_from_slice(extra);
    let service = stack.service(&env).await;
    (stack, service, console)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_control_topic_that_does_not_exist_stops_the_start_with_its_name() {
    let stack = Stack::start(Faults::default()).await;
    let out = tokio::task::spawn_blocking({
        let env = stack.service_env(free_port());
        move || {
            std::process::Command::new(binary())
                .arg("run")
                .env_remove("RUST_LOG")
                .envs(env)
                .env("INFERSTREAM__CONSOLE__CONTROL_TOPIC", "no-such-topic")
                .output()
                .expect("run inferstream")
        }
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("console.control_topic")
            && stderr.contains("`no-such-topic` does not exist"),
        "{stderr}"
    );
}

/// 80 more images at 0.70 (after the first 40): all accepted, each
/// recorded with threshold 0.5.
async fn eighty_more_accepted_at_half(stack: &Stack, out: &mut Collector) {
    let second = upload(stack, 80, "after", |_| 0.70).await;
    stack.produce(&second).await;
    out.until("the next 80", MINUTE, |r| predictions_by_id(r).len() >= 120)
        .await;
    let after: Vec<&Out> = out
        .records
        .iter()
        .filter(|r| {
            r.value["key"]
                .as_str()
                .is_some_and(|k| k.starts_with("after/"))
        })
        .collect();
    assert_eq!(after.len(), 80);
    assert!(
        after
            .iter()
            .all(|r| r.topic == RESULTS && r.value["threshold"] == 0.5),
        "{}",
        summary(&out.records)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_threshold_applied_with_the_token_reaches_every_instance() {
    let (stack, a, console) = console_stack(false).await;
    // A second instance, without a console, following the control topic.
    let b = stack.service(&[("CONSOLE__CONTROL_TOPIC", CONTROL)]).await;
    assert!(!b.log_all().contains("console on"));
    let before = thresholds(&a, &console).await;
    assert_eq!(before["current"]["threshold"], 0.93);
    assert_eq!(before["current"]["by"], "configuration");

    // Images at 0.70 go to review at 0.93.
    let first = upload(&stack, 40, "before", |_| 0.70).await;
    stack.produce(&first).await;
    let mut out = stack.collector();
    out.until("the first 40", MINUTE, |r| predictions_by_id(r).len() >= 40)
        .await;
    assert_eq!(out.on(REVIEW).len(), 40, "{}", summary(&out.records));

    // Without the token, or with a wrong one, nothing changes.
    let url = format!("http://{console}/api/thresholds");
    let change = r#"{"threshold": 0.5, "by": "ops on call"}"#;
    for headers in [vec![], vec![("Authorization", "Bearer wrong")]] {
        let (status, _) = http_request("POST", &url, &headers, change).await.unwrap();
        assert_eq!(status, 403);
    }
    // Nonsense with the token is refused and changes nothing either.
    let (status, body) = http_request(
        "POST",
        &url,
        &[("Authorization", "Bearer s3cret")],
        r#"{"threshold": 0.5, "label_thresholds": {"cat": 0.2}}"#,
    )
    .await
    .unwrap();
    assert_eq!(
        (status, body.trim()),
        (400, "\"cat\" is not one of endpoint.labels")
    );
    assert_eq!(thresholds(&a, &console).await["current"]["threshold"], 0.93);

    // With the token: both instances route by 0.5.
    let (status, body) = http_request("POST", &url, &[("Authorization", "Bearer s3cret")], change)
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let (in_a, in_b) = futures::join!(applied(&a, 0.5), applied(&b, 0.5));
    eprintln!("console: threshold 0.93 -> 0.5 applied in {in_a:?} on the instance with the console, {in_b:?} on the other");
    let now = thresholds(&a, &console).await;
    assert_eq!(now["current"]["threshold"], 0.5);
    assert_eq!(now["current"]["by"], "ops on call");
    assert_eq!(now["history"].as_array().map(Vec::len), Some(1));

    eighty_more_accepted_at_half(&stack, &mut out).await;
    // Both instances classified some of them, by the new threshold.
    for s in [&a, &b] {
        let accepted = s
            .metric("inferstream_predictions_total", &["decision=\"accepted\""])
            .await;
        assert!(accepted > 0.0, "log: {}", s.log_text());
    }

    // The live view and the curve: what this instance predicted.
    let (status, page) = http_get(&format!("http://{console}/")).await.unwrap();
    assert_eq!(status, 200);
    assert!(page.contains("<title>inferstream console</title>") && page.contains("/api/live"));
    let (_, live) = http_get(&format!("http://{console}/api/live"))
        .await
        .unwrap();
    let live: serde_json::Value = serde_json::from_str(&live).unwrap();
    let made_here = a.metric("inferstream_predictions_total", &[]).await;
    let s = &live["summary"];
    assert_eq!(s["predictions"].as_f64(), Some(made_here), "{live}");
    assert_eq!(
        s["accepted"].as_f64().unwrap() + s["review"].as_f64().unwrap(),
        made_here
    );
    let binned: u64 = ["histogram_accepted", "histogram_review"]
        .iter()
        .flat_map(|h| s[h].as_array().unwrap().iter().map(|n| n.as_u64().unwrap()))
        .sum();
    assert_eq!(binned as f64, made_here);
    assert_eq!(live["thresholds"]["threshold"], 0.5);
    // Every image scored 0.70: thresholds up to 0.70 send none to review,
    // above it all of them.
    let (_, curve) = http_get(&format!("http://{console}/api/curve"))
        .await
        .unwrap();
    let curve: serde_json::Value = serde_json::from_str(&curve).unwrap();
    let share = |t: f64| {
        curve["curve"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| (p["threshold"].as_f64().unwrap() - t).abs() < 1e-9)
            .map(|p| p["review_share"].as_f64().unwrap())
            .unwrap()
    };
    assert_eq!((share(0.7), share(0.71)), (0.0, 1.0), "{curve}");
    assert_eq!(curve["threshold"], 0.5);
    let (status, _) = http_get(&format!("http://{console}/api/curve?label=cat"))
        .await
        .unwrap();
    assert_eq!(status, 404);

    // An instance started later reads the latest thresholds before it
    // consumes anything.
    let console_c = format!("127.0.0.1:{}", free_port());
    let c = stack
        .service(&[
            ("CONSOLE__ENABLED", "true"),
            ("CONSOLE__LISTEN", &console_c),
            ("CONSOLE__CONTROL_TOPIC", CONTROL),
        ])
        .await;
    assert_eq!(
        thresholds(&c, &console_c).await["current"]["threshold"],
        0.5
    );
    // It has no token: every change is refused.
    let (status, _) = http_request(
        "POST",
        &format!("http://{console_c}/api/thresholds"),
        &[("Authorization", "Bearer ")],
        change,
    )
    .await
    .unwrap();
    assert_eq!(status, 403);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reviewers_label_becomes_ground_truth_and_counts_in_accuracy() {
    let (stack, service, console) = console_stack(true).await;
    let end = Instant::now() + MINUTE;
    while !service
        .log_all()
        .contains("ground truth: reading true labels")
    {
        assert!(Instant::now() < end, "{}", service.log_text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Ten images the model is unsure of: all to review.
    let events = upload(&stack, 10, "unsure", |_| 0.6).await;
    stack.produce(&events).await;
    let mut out = stack.collector();
    out.until("10 predictions", MINUTE, |r| {
        predictions_by_id(r).len() >= 10
    })
    .await;

    let (status, body) = http_get(&format!("http://{console}/api/review"))
        .await
        .unwrap();
    assert_eq!(status, 200);
    let queue: serde_json::Value = serde_json::from_str(&body).unwrap();
    let reviews = queue["reviews"].as_array().unwrap();
    assert_eq!(reviews.len(), 10, "{body}");
    assert_eq!(queue["ground_truth"], true);

    // The image of a queued prediction, as it is in S3; nothing else.
    let first = &reviews[0];
    let id = first["id"].as_str().unwrap();
    let image_url = |id: &str| {
        format!(
            "http://{console}/api/review/image?id={}",
            id.replace('%', "%25")
                .replace(' ', "%20")
                .replace('/', "%2F")
                .replace('@', "%40")
                .replace('"', "%22")
        )
    };
    let (status, bytes) = http_request_bytes("GET", &image_url(id), &[], "")
        .await
        .unwrap();
    assert_eq!(status, 200);
    let in_s3 = stack
        .get_object(
            first["bucket"].as_str().unwrap(),
            first["key"].as_str().unwrap(),
        )
        .await;
    assert_eq!(bytes, in_s3);
    let (status, _) = http_get(&image_url("uploads/secret.png@1")).await.unwrap();
    assert_eq!(status, 404);

    // Labels: without the token refused; then one confirmed, one corrected.
    let label_url = format!("http://{console}/api/review/label");
    let predicted = |i: usize| reviews[i]["label"].as_str().unwrap().to_string();
    let other = |l: &str| {
        if l == "bicycle" {
            "motorcycle"
        } else {
            "bicycle"
        }
    };
    let answer = |i: usize, label: &str| {
        serde_json::json!({"id": reviews[i]["id"], "label": label, "by": "reviewer"}).to_string()
    };
    let (status, _) = http_request("POST", &label_url, &[], &answer(0, &predicted(0)))
        .await
        .unwrap();
    assert_eq!(status, 403);
    let auth = [("Authorization", "Bearer s3cret")];
    let (status, _) = http_request("POST", &label_url, &auth, &answer(0, "cat"))
        .await
        .unwrap();
    assert_eq!(status, 400);
    for (i, label) in [(0, predicted(0)), (1, other(&predicted(1)).to_string())] {
        let (status, body) = http_request("POST", &label_url, &auth, &answer(i, &label))
            .await
            .unwrap();
        assert_eq!(status, 200, "{body}");
    }
    // A second answer would not count: refused.
    let (status, body) = http_request("POST", &label_url, &auth, &answer(0, other(&predicted(0))))
        .await
        .unwrap();
    assert_eq!(status, 409, "{body}");
    service
        .wait_metric(
            "inferstream_judged_predictions_total",
            &["decision=\"review\""],
            MINUTE,
            |v| v >= 2.0,
        )
        .await;
    assert_eq!(
        service
            .metric(
                "inferstream_correct_predictions_total",
                &["decision=\"review\""]
            )
            .await,
        1.0
    );
    assert_eq!(service.metric("inferstream_accuracy", &[]).await, 0.5);
    let (_, body) = http_get(&format!("http://{console}/api/review"))
        .await
        .unwrap();
    let queue: serde_json::Value = serde_json::from_str(&body).unwrap();
    let reviewed: Vec<&serde_json::Value> = queue["reviews"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| !r["reviewed"].is_null())
        .collect();
    assert_eq!(reviewed.len(), 2, "{body}");
}

// ------------------------------------------------------------ in a browser

/// A screenshot that shows the page: `width` wide if given (the window's
/// frame takes some of its height), the header's colour, and more than a
/// few colours (not a blank window).
fn assert_page_drawn(png: &[u8], width: Option<u32>, header: bool) {
    let img = image::load_from_memory(png)
        .expect("screenshot is a PNG")
        .to_rgb8();
    if let Some(width) = width {
        assert_eq!(img.width(), width);
    }
    let colours: std::collections::HashSet<[u8; 3]> = img.pixels().map(|p| p.0).collect();
    assert!(colours.len() > 50, "{} colours: blank?", colours.len());
    if header {
        assert!(colours.contains(&[0x33, 0x33, 0x99]), "no header colour");
    }
}

/// The text of the element `css` selects, in the page.
async fn text_of(browser: &Browser, css: &str) -> String {
    let e = browser.find(css, MINUTE).await;
    browser.text(&e).await
}

/// Moves the slider `id` to `to` as a user does: a click on it, then
/// arrow keys (a step is 0.005).
async fn slide(browser: &Browser, slider: &Element, id: &str, to: f64) {
    browser.click(slider).await;
    let shown = format!("#{id}-value");
    let at: f64 = text_of(browser, &shown).await.parse().unwrap();
    let steps = ((at - to) / 0.005).round() as i64;
    let key = if steps > 0 { ARROW_LEFT } else { ARROW_RIGHT };
    browser.press(key, steps.unsigned_abs() as usize).await;
    assert_eq!(text_of(browser, &shown).await, format!("{to:.3}"));
}

#[tokio::test(flavor = "multi_thread")]
async fn in_the_browser_a_slider_moved_and_applied_reroutes_every_instance_within_5s() {
    let (stack, a, console) = console_stack(false).await;
    // A second instance, without a console, following the control topic.
    let b = stack.service(&[("CONSOLE__CONTROL_TOPIC", CONTROL)]).await;
    // 40 images at 0.70: to review at 0.93.
    let first = upload(&stack, 40, "before", |_| 0.70).await;
    stack.produce(&first).await;
    let mut out = stack.collector();
    out.until("the first 40", MINUTE, |r| predictions_by_id(r).len() >= 40)
        .await;
    assert_eq!(out.on(REVIEW).len(), 40, "{}", summary(&out.records));

    let (width, height) = (1280, 1000);
    let browser = Browser::start(width, height).await;
    browser.goto(&format!("http://{console}/")).await;
    let slider = browser.find("#threshold-default", MINUTE).await;
    browser
        .until(
            "the default slider at the threshold in force, and its effect",
            "document.getElementById('threshold-default-value').textContent === '0.930' \
             && document.getElementById('effect-threshold-default').textContent.startsWith('at 0.93: 100.0% of the last')",
            MINUTE,
        )
        .await;
    browser
        .until(
            "the live view counts what this instance predicted",
            "document.getElementById('review').textContent === '100.0%'",
            MINUTE,
        )
        .await;

    slide(&browser, &slider, "threshold-default", 0.5).await;
    let effect = text_of(&browser, "#effect-threshold-default").await;
    assert!(
        effect.starts_with("at 0.50: 0.0% of the last") && effect.ends_with("(now 0.93)"),
        "{effect}"
    );

    // Apply without the token: refused, nothing changes.
    let apply = browser.find("#apply", MINUTE).await;
    browser.click(&apply).await;
    browser
        .until(
            "the refusal shown",
            "document.getElementById('status').textContent.startsWith('403: changes need')",
            MINUTE,
        )
        .await;
    assert_eq!(thresholds(&a, &console).await["current"]["threshold"], 0.93);
    assert!(a
        .log_all()
        .contains("a change without the right token was refused"));

    // With the token: every instance routes by 0.5 within 5 s.
    let token = browser.find("#token", MINUTE).await;
    browser.type_into(&token, "s3cret").await;
    let by = browser.find("#by", MINUTE).await;
    browser.type_into(&by, "ops in the browser").await;
    browser.click(&apply).await;
    let (in_a, in_b) = futures::join!(applied(&a, 0.5), applied(&b, 0.5));
    eprintln!("console in a browser: threshold 0.93 -> 0.5 applied {in_a:?} after the click on the instance with the console, {in_b:?} on the other");
    for (name, took) in [("with the console", in_a), ("without", in_b)] {
        assert!(
            took <= Duration::from_secs(5),
            "the instance {name} applied the change after {took:?}, not within 5 s"
        );
    }
    browser
        .until(
            "the change confirmed",
            "document.getElementById('status').textContent === 'applied to every instance'",
            MINUTE,
        )
        .await;
    eighty_more_accepted_at_half(&stack, &mut out).await;
    for s in [&a, &b] {
        let accepted = s
            .metric("inferstream_predictions_total", &["decision=\"accepted\""])
            .await;
        assert!(accepted > 0.0, "log: {}", s.log_text());
    }
    // The page shows who changed what, and the accepted share move.
    browser
        .until(
            "the change in the history",
            "[...document.querySelectorAll('#history tr')].some(r => r.textContent.includes('ops in the browser') && r.textContent.includes('0.5'))",
            MINUTE,
        )
        .await;
    browser
        .until(
            "the accepted share above 0",
            "document.getElementById('accepted').textContent !== '0.0%'",
            MINUTE,
        )
        .await;
    assert_eq!(text_of(&browser, "#threshold-default-value").await, "0.500");
    let png = browser.screenshot("console.png").await;
    assert_page_drawn(&png, Some(width), true);
    browser.close().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn in_the_browser_a_reviewer_corrects_a_label_and_accuracy_changes() {
    let (stack, service, console) = console_stack(true).await;
    let events = upload(&stack, 10, "unsure", |_| 0.6).await;
    stack.produce(&events).await;
    let mut out = stack.collector();
    out.until("10 predictions", MINUTE, |r| {
        predictions_by_id(r).len() >= 10
    })
    .await;
    assert_eq!(
        service
            .metric("inferstream_judged_predictions_total", &[])
            .await,
        0.0
    );

    let (width, height) = (1280, 1400);
    let browser = Browser::start(width, height).await;
    browser.goto(&format!("http://{console}/")).await;
    browser
        .until(
            "10 cards, each with its image",
            "document.querySelectorAll('#queue .card').length === 10 && \
             [...document.querySelectorAll('#queue .card img')].every(i => i.complete && i.naturalWidth > 0)",
            MINUTE,
        )
        .await;
    let ids = browser
        .script(
            "const ids = [...document.querySelectorAll('[id]')].map((e) => e.id); \
             return ids.filter((id, i) => ids.indexOf(id) !== i);",
            serde_json::json!([]),
        )
        .await;
    assert_eq!(ids, serde_json::json!([]), "ids used twice in the page");
    // The card's prediction, from the page.
    let card_says = |i: usize| {
        let browser = &browser;
        async move {
            browser
                .script(
                    "const c = document.querySelectorAll('#queue .card')[arguments[0]]; \
                     return [c.dataset.id, c.children[2].textContent.split(' ')[0]];",
                    serde_json::json!([i]),
                )
                .await
        }
    };
    let first = card_says(0).await;
    let second = card_says(1).await;
    let labels = ["bicycle", "motorcycle"];
    let other = |l: &serde_json::Value| {
        if l == "bicycle" {
            "motorcycle"
        } else {
            "bicycle"
        }
    };

    // Without the token: the click is refused, nothing is written.
    let confirm_first = format!(
        "#queue .card:nth-child(1) button:nth-of-type({})",
        labels.iter().position(|l| first[1] == *l).unwrap() + 1
    );
    let button = browser.find(&confirm_first, MINUTE).await;
    browser.click(&button).await;
    browser
        .until(
            "the refusal on the card",
            "document.querySelector('#queue .card:nth-child(1) .result').textContent.startsWith('403: ')",
            MINUTE,
        )
        .await;
    assert!(stack.ends("ground-truth").values().all(|n| *n == 0));

    // With the token: the first confirmed with a click, the second
    // corrected with a key press on the highlighted card.
    let token = browser.find("#token", MINUTE).await;
    browser.type_into(&token, "s3cret").await;
    let by = browser.find("#by", MINUTE).await;
    browser.type_into(&by, "reviewer in the browser").await;
    browser.click(&button).await;
    browser
        .until(
            "the first card answered",
            &format!(
                "document.querySelector('#queue .card:nth-child(1) .result').textContent === '✓ {}'",
                first[1].as_str().unwrap()
            ),
            MINUTE,
        )
        .await;
    let corrected = other(&second[1]);
    let second_key = browser.find("#queue .card:nth-child(2) .key", MINUTE).await;
    browser.click(&second_key).await;
    browser
        .until(
            "the second card highlighted",
            "document.querySelector('#queue .card:nth-child(2)').classList.contains('current')",
            MINUTE,
        )
        .await;
    let digit = (labels.iter().position(|l| *l == corrected).unwrap() + 1).to_string();
    browser.press(&digit, 1).await;
    browser
        .until(
            "the second card answered",
            &format!(
                "document.querySelector('#queue .card:nth-child(2) .result').textContent === '✓ {corrected}'"
            ),
            MINUTE,
        )
        .await;

    // Two true labels on the ground-truth topic, as answered.
    let truth = stack.read_topic("ground-truth").await;
    let mut got: Vec<(String, String, String)> = truth
        .iter()
        .map(|r| {
            (
                r.value["id"].as_str().unwrap().to_string(),
                r.value["label"].as_str().unwrap().to_string(),
                r.value["by"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    got.sort();
    let mut want = vec![
        (
            first[0].as_str().unwrap().to_string(),
            first[1].as_str().unwrap().to_string(),
            "reviewer in the browser".to_string(),
        ),
        (
            second[0].as_str().unwrap().to_string(),
            corrected.to_string(),
            "reviewer in the browser".to_string(),
        ),
    ];
    want.sort();
    assert_eq!(got, want);
    // And the accuracy metric learns from them: one right, one wrong.
    service
        .wait_metric(
            "inferstream_judged_predictions_total",
            &["decision=\"review\""],
            MINUTE,
            |v| v >= 2.0,
        )
        .await;
    assert_eq!(service.metric("inferstream_accuracy", &[]).await, 0.5);

    // The threshold curve learnt from the answers: at 0.5 both judged
    // predictions would be accepted, one of them right.
    let slider = browser.find("#threshold-default", MINUTE).await;
    slide(&browser, &slider, "threshold-default", 0.5).await;
    browser
        .until(
            "the accuracy of what 0.5 would accept",
            "document.getElementById('effect-threshold-default').textContent.includes('of 2 judged it would accept, 50.0% right')",
            MINUTE,
        )
        .await;

    let review = browser.find("#reviews", MINUTE).await;
    let png = browser
        .element_screenshot(&review, "console-review.png")
        .await;
    assert_page_drawn(&png, None, false);
    let png = browser.screenshot("console-full.png").await;
    assert_page_drawn(&png, Some(width), true);
    browser.close().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_label_whose_reviewer_left_before_kafka_refused_it_can_be_given_again() {
    let (stack, service, console) = console_stack(true).await;
    let events = upload(&stack, 2, "unsure", |_| 0.6).await;
    stack.produce(&events).await;
    let mut out = stack.collector();
    out.until("2 predictions", MINUTE, |r| predictions_by_id(r).len() >= 2)
        .await;
    let (_, body) = http_get(&format!("http://{console}/api/review"))
        .await
        .unwrap();
    let queue: serde_json::Value = serde_json::from_str(&body).unwrap();
    let item = &queue["reviews"][0];
    let answer = serde_json::json!({"id": item["id"], "label": item["label"]}).to_string();
    let url = format!("http://{console}/api/review/label");
    let auth = [("Authorization", "Bearer s3cret")];

    // Kafka is down; the reviewer closes the page after a second.
    stack.kafka.broker_down(1).expect("broker down");
    let gone = tokio::time::timeout(
        Duration::from_secs(1),
        http_request("POST", &url, &auth, &answer),
    )
    .await;
    assert!(gone.is_err(), "answered with Kafka down: {gone:?}");
    // Kafka gives the label up (10 s): the answer is not taken.
    let end = Instant::now() + MINUTE;
    while !service
        .log_all()
        .contains("console: a reviewer's label was not written")
    {
        assert!(Instant::now() < end, "{}", service.log_text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stack.kafka.broker_up(1).expect("broker up");
    let (status, body) = http_request("POST", &url, &auth, &answer).await.unwrap();
    assert_eq!(status, 200, "{body}");
    let truth = stack.read_topic("ground-truth").await;
    assert_eq!(truth.len(), 1, "{truth:?}");
    assert_eq!(truth[0].value["id"], item["id"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn clients_that_send_nothing_or_too_much_cannot_hold_the_console() {
    let (_stack, service, console) = console_stack_with(false, &[("FETCH__TIMEOUT", "2s")]).await;
    // A body larger than any change is refused before it is read whole.
    let big = format!(r#"{{"threshold": 0.5, "by": "{}"}}"#, "x".repeat(20_000));
    let (status, _) = http_request(
        "POST",
        &format!("http://{console}/api/thresholds"),
        &[],
        &big,
    )
    .await
    .unwrap();
    assert_eq!(status, 413);

    // Idle connections do not keep the metrics server from answering a
    // liveness probe (it has no cap); they are closed after 30 s.
    let mut held = Vec::new();
    for _ in 0..70 {
        held.push(
            tokio::net::TcpStream::connect(service.metrics)
                .await
                .unwrap(),
        );
    }
    let (status, _) = http_get(&service.url("/healthz")).await.unwrap();
    assert_eq!(status, 200);
    let mut buf = [0u8; 16];
    for c in &held {
        assert!(
            matches!(c.try_read(&mut buf), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
            "an idle connection was closed before /healthz answered"
        );
    }
    drop(held);

    // More idle connections than the console holds: each is closed after
    // fetch.timeout + 30 s (32 s here) of silence, and a request made
    // meanwhile is answered then.
    let started = Instant::now();
    let mut idle = Vec::new();
    for _ in 0..70 {
        idle.push(tokio::net::TcpStream::connect(&console).await.unwrap());
    }
    let (status, _) = tokio::time::timeout(
        2 * MINUTE,
        http_get(&format!("http://{console}/api/thresholds")),
    )
    .await
    .expect("a request behind 70 idle connections is answered")
    .unwrap();
    assert_eq!(status, 200);
    let answered = started.elapsed();
    for mut c in idle.drain(..) {
        use tokio::io::AsyncReadExt;
        let mut buf = [0u8; 16];
        let read = tokio::time::timeout(MINUTE, c.read(&mut buf))
            .await
            .expect("an idle connection is closed");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    }
    eprintln!(
        "console: a request behind 70 idle connections answered after {answered:?}; all closed after {:?}",
        started.elapsed()
    );
    assert!(service.log_all().contains("console on"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_change_based_on_thresholds_changed_meanwhile_elsewhere_is_refused() {
    let stack = Stack::start(Faults::default()).await;
    stack
        .kafka
        .create_topic(CONTROL, 1, 1)
        .expect("create topic");
    let consoles = [
        format!("127.0.0.1:{}", free_port()),
        format!("127.0.0.1:{}", free_port()),
    ];
    let mut services = Vec::new();
    for console in &consoles {
        services.push(
            stack
                .service(&[
                    ("CONSOLE__ENABLED", "true"),
                    ("CONSOLE__LISTEN", console),
                    ("CONSOLE__TOKEN", "s3cret"),
                    ("CONSOLE__CONTROL_TOPIC", CONTROL),
                ])
                .await,
        );
    }
    let post = |console: &str, body: serde_json::Value| {
        let url = format!("http://{console}/api/thresholds");
        async move {
            http_request(
                "POST",
                &url,
                &[("Authorization", "Bearer s3cret")],
                &body.to_string(),
            )
            .await
            .unwrap()
        }
    };
    // Both start from the configuration's thresholds (at ""). One operator
    // applies on the first instance; another, a moment later, on the
    // second, from what it showed before: refused, not overwritten.
    let (status, body) = post(
        &consoles[0],
        serde_json::json!({"threshold": 0.6, "by": "first", "based_on": ""}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let first: serde_json::Value = serde_json::from_str(&body).unwrap();
    let (status, body) = post(
        &consoles[1],
        serde_json::json!({"threshold": 0.7, "by": "second", "based_on": ""}),
    )
    .await;
    assert_eq!(status, 409, "{body}");
    assert!(body.contains("changed meanwhile (first at"), "{body}");
    // Based on what is in force, it goes through.
    let (status, body) = post(
        &consoles[1],
        serde_json::json!({"threshold": 0.7, "by": "second", "based_on": first["at"]}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    for (s, console) in services.iter().zip(&consoles) {
        applied(s, 0.7).await;
        let now = thresholds(s, console).await;
        assert_eq!(now["current"]["by"], "second");
        let history: Vec<&str> = now["history"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["by"].as_str().unwrap())
            .collect();
        assert_eq!(history, ["first", "second"]);
    }
}
