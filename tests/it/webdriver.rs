//! A small W3C WebDriver client: Debian's `chromedriver` driving headless
//! `chromium`, both installed by `make test`. Just what the console's
//! browser tests need: open a page, find, click, type, press keys, run a
//! script, take screenshots.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{json, Value};

use crate::harness::free_port;

/// The key WebDriver's element reference is sent under.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// WebDriver's codes for the arrow keys.
pub const ARROW_LEFT: &str = "\u{E012}";
pub const ARROW_RIGHT: &str = "\u{E014}";

fn program(var: &str, default: &str) -> PathBuf {
    let path = std::env::var_os(var).map_or_else(|| PathBuf::from(default), PathBuf::from);
    assert!(
        path.exists(),
        "{} not found (set {var}); run the tests with `make test`, which installs \
         Debian's chromium and chromium-driver",
        path.display()
    );
    path
}

/// Where the browser tests leave their screenshots (`make screenshots`
/// copies them into docs/images).
pub fn screenshot_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("screenshots");
    std::fs::create_dir_all(&dir).expect("create screenshot dir");
    dir
}

/// One headless Chromium, through its own chromedriver, closed on drop.
pub struct Browser {
    driver: Child,
    base: String,
    _profile: tempfile::TempDir,
}

/// An element of the page, as WebDriver names it.
#[derive(Clone, Debug)]
pub struct Element(String);

impl Browser {
    /// Starts chromedriver on a free port and a browser window of
    /// `width` × `height` CSS pixels.
    pub async fn start(width: u32, height: u32) -> Browser {
        let driver_bin = program("CHROMEDRIVER", "/usr/bin/chromedriver");
        let chromium = program("CHROMIUM", "/usr/bin/chromium");
        let port = free_port();
        let log = std::env::temp_dir().join(format!("chromedriver-{port}.log"));
        let driver = Command::new(&driver_bin)
            .arg(format!("--port={port}"))
            .arg(format!("--log-path={}", log.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let profile = tempfile::tempdir().expect("profile dir");
        let mut browser = Browser {
            driver,
            base: format!("http://127.0.0.1:{port}"),
            _profile: profile,
        };
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok((200, body)) = request("GET", &format!("{}/status", browser.base), "").await {
                if serde_json::from_str::<Value>(&body).is_ok_and(|v| v["value"]["ready"] == true) {
                    break;
                }
            }
            assert!(Instant::now() < end, "chromedriver did not start on {port}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // The flags keep Chromium off the network this machine does not
        // have (it would try Google's hosts) and out of the sandbox root
        // cannot use.
        let args = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            "--force-device-scale-factor=1",
            &format!("--window-size={width},{height}"),
            &format!("--user-data-dir={}", browser._profile.path().display()),
        ];
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": chromium, "args": args},
        }}});
        let session = browser.call("POST", "/session", caps).await;
        let id = session["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {session}"))
            .to_string();
        browser.base = format!("{}/session/{id}", browser.base);
        browser
    }

    /// One WebDriver command; panics with WebDriver's message on an error.
    async fn call(&self, method: &str, path: &str, body: Value) -> Value {
        match self.try_call(method, path, body).await {
            Ok(v) => v,
            Err(e) => panic!("webdriver {method} {path}: {e}"),
        }
    }

    async fn try_call(&self, method: &str, path: &str, body: Value) -> Result<Value, String> {
        let body = if method == "GET" || method == "DELETE" {
            String::new()
        } else {
            body.to_string()
        };
        let (status, answer) = request(method, &format!("{}{path}", self.base), &body)
            .await
            .map_err(|e| e.to_string())?;
        let v: Value = serde_json::from_str(&answer).map_err(|e| format!("{e}: {answer}"))?;
        if status == 200 {
            Ok(v["value"].clone())
        } else {
            Err(format!(
                "{status} {}: {}",
                v["value"]["error"], v["value"]["message"]
            ))
        }
    }

    pub async fn goto(&self, url: &str) {
        self.call("POST", "/url", json!({ "url": url })).await;
    }

    /// The first element `css` selects, waiting for it up to `deadline`.
    pub async fn find(&self, css: &str, deadline: Duration) -> Element {
        let end = Instant::now() + deadline;
        loop {
            let found = self
                .try_call(
                    "POST",
                    "/element",
                    json!({"using": "css selector", "value": css}),
                )
                .await;
            match found {
                Ok(v) => return Element(v[ELEMENT].as_str().expect("element id").to_string()),
                Err(e) => assert!(Instant::now() < end, "no element {css}: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn click(&self, e: &Element) {
        self.call("POST", &format!("/element/{}/click", e.0), json!({}))
            .await;
    }

    /// Types `text` into `e` as key presses (WebDriver key codes allowed).
    pub async fn type_into(&self, e: &Element, text: &str) {
        self.call(
            "POST",
            &format!("/element/{}/value", e.0),
            json!({ "text": text }),
        )
        .await;
    }

    /// Presses and releases `key` `times` times where the focus is.
    pub async fn press(&self, key: &str, times: usize) {
        let strokes: Vec<Value> = (0..times)
            .flat_map(|_| {
                [
                    json!({"type": "keyDown", "value": key}),
                    json!({"type": "keyUp", "value": key}),
                ]
            })
            .collect();
        self.call(
            "POST",
            "/actions",
            json!({"actions": [{"type": "key", "id": "keyboard", "actions": strokes}]}),
        )
        .await;
    }

    pub async fn text(&self, e: &Element) -> String {
        let v = self
            .call("GET", &format!("/element/{}/text", e.0), Value::Null)
            .await;
        v.as_str().unwrap_or_default().to_string()
    }

    /// Runs `script` (a function body; `arguments` holds `args`) in the page.
    pub async fn script(&self, script: &str, args: Value) -> Value {
        self.call(
            "POST",
            "/execute/sync",
            json!({ "script": script, "args": args }),
        )
        .await
    }

    /// Waits until the expression `js` is truthy in the page, up to
    /// `deadline`; returns its value.
    pub async fn until(&self, what: &str, js: &str, deadline: Duration) -> Value {
        let end = Instant::now() + deadline;
        let script = format!("return ({js});");
        loop {
            let v = self.script(&script, json!([])).await;
            if !(v.is_null() || v == false || v == "" || v == 0) {
                return v;
            }
            assert!(Instant::now() < end, "{what}: not within {deadline:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The window as a PNG, also saved as `name` in [`screenshot_dir`].
    pub async fn screenshot(&self, name: &str) -> Vec<u8> {
        let v = self.call("GET", "/screenshot", Value::Null).await;
        save(name, &v)
    }

    /// One element as a PNG, also saved as `name` in [`screenshot_dir`].
    pub async fn element_screenshot(&self, e: &Element, name: &str) -> Vec<u8> {
        let v = self
            .call("GET", &format!("/element/{}/screenshot", e.0), Value::Null)
            .await;
        save(name, &v)
    }

    /// Ends the session (and the browser), then chromedriver.
    pub async fn close(mut self) {
        let _ = self.try_call("DELETE", "", Value::Null).await;
        // Nothing left for `Drop` to end.
        self.base.clear();
    }
}

/// One HTTP/1.1 request. chromedriver keeps the connection open after
/// its answer (even when asked to close it), so the answer is read by its
/// Content-Length.
async fn request(method: &str, url: &str, body: &str) -> std::io::Result<(u16, String)> {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://").unwrap_or(url);
    let (host, path) = rest
        .split_once('/')
        .map_or((rest, "/".to_string()), |(h, p)| (h, format!("/{p}")));
    let mut s = tokio::io::BufReader::new(tokio::net::TcpStream::connect(host).await?);
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.get_mut().write_all(head.as_bytes()).await?;
    let mut status = None;
    let mut length = 0;
    loop {
        let mut line = String::new();
        if s.read_line(&mut line).await? == 0 {
            return Err(std::io::Error::other(
                "closed before the end of the headers",
            ));
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if status.is_none() {
            status = line.split_whitespace().nth(1).and_then(|c| c.parse().ok());
        } else if let Some((k, v)) = line.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                length = v.trim().parse().map_err(std::io::Error::other)?;
            }
        }
    }
    let mut answer = vec![0; length];
    s.read_exact(&mut answer).await?;
    let status = status.ok_or_else(|| std::io::Error::other("no status line"))?;
    Ok((status, String::from_utf8_lossy(&answer).to_string()))
}

fn save(name: &str, v: &Value) -> Vec<u8> {
    let png = base64::engine::general_purpose::STANDARD
        .decode(v.as_str().expect("base64 screenshot"))
        .expect("screenshot is base64");
    std::fs::write(screenshot_dir().join(name), &png).expect("write screenshot");
    png
}

impl Drop for Browser {
    /// After a failed test too: the session is ended (Chromium with it,
    /// which would outlive chromedriver), then chromedriver.
    fn drop(&mut self) {
        if self.base.contains("/session/") {
            delete_session(&self.base);
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// `DELETE <session>`, blocking (for `Drop`): waits up to 20 s for the
/// answer, which comes once Chromium has quit.
fn delete_session(session: &str) {
    use std::io::{Read, Write};
    let rest = session.strip_prefix("http://").unwrap_or(session);
    let Some((host, path)) = rest.split_once('/') else {
        return;
    };
    let Ok(mut s) = std::net::TcpStream::connect(host) else {
        return;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(20)));
    let head = format!("DELETE /{path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\n\r\n");
    if s.write_all(head.as_bytes()).is_ok() {
        let mut answer = [0u8; 1024];
        let _ = s.read(&mut answer);
    }
}
