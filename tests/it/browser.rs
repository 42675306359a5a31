//! A real browser for the tests: Debian's Chromium, headless, driven over the W3C WebDriver
//! protocol by its ChromeDriver (both from the `chromium` and `chromium-driver` packages,
//! which `scripts/test` installs when missing). Each [`Browser`] is its own ChromeDriver on a
//! free port, with a fresh profile, killed when dropped.

use std::process::Stdio;
use std::time::Duration;

use base64::Engine as _;
use serde_json::{Value, json};

const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const CHROMIUM: &str = "/usr/bin/chromium";
/// The key under which WebDriver returns an element reference.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

pub(crate) struct Browser {
    http: reqwest::Client,
    base: String,
    session: String,
    _driver: tokio::process::Child,
    profile: std::path::PathBuf,
}

/// An element of the page.
#[derive(Clone)]
pub(crate) struct Element(String);

impl Browser {
    /// Start ChromeDriver and a headless Chromium session.
    pub async fn start() -> Browser {
        assert!(
            std::path::Path::new(CHROMEDRIVER).exists() && std::path::Path::new(CHROMIUM).exists(),
            "the browser tests need Debian's chromium and chromium-driver packages \
             (scripts/test installs them: apt-get install chromium chromium-driver)"
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let driver = tokio::process::Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let http = reqwest::Client::new();
        let base = format!("http://127.0.0.1:{port}");
        // Ready when its status says so (it answers within a second or two).
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let ready = http
                .get(format!("{base}/status"))
                .send()
                .await
                .ok()
                .map(|r| r.json::<Value>());
            if let Some(body) = ready
                && body.await.ok().and_then(|b| b["value"]["ready"].as_bool()) == Some(true)
            {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "chromedriver did not start"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let profile = std::env::temp_dir().join(format!("llmw-chromium-{}", uuid::Uuid::new_v4()));
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--disable-quic", "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--hide-scrollbars",
                    "--window-size=1400,1000",
                    format!("--user-data-dir={}", profile.display()),
                ],
            },
        }}});
        let created: Value = http
            .post(format!("{base}/session"))
            .json(&caps)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let session = created["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no browser session: {created}"))
            .to_string();
        Browser {
            http,
            base,
            session,
            _driver: driver,
            profile,
        }
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let url = format!("{}/session/{}{path}", self.base, self.session);
        let mut request = self.http.request(method, url);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let answer: Value = request.send().await.unwrap().json().await.unwrap();
        if answer["value"].get("error").is_some() {
            panic!("WebDriver {path}: {}", answer["value"]);
        }
        answer["value"].clone()
    }

    /// Open `url` and wait for it to load.
    pub async fn goto(&self, url: &str) {
        self.call(reqwest::Method::POST, "/url", Some(json!({"url": url})))
            .await;
    }

    /// The page's address now.
    pub async fn url(&self) -> String {
        self.call(reqwest::Method::GET, "/url", None)
            .await
            .as_str()
            .unwrap()
            .to_string()
    }

    /// The first element `css` selects, if any.
    pub async fn find(&self, css: &str) -> Option<Element> {
        let url = format!("{}/session/{}/element", self.base, self.session);
        let answer: Value = self
            .http
            .post(url)
            .json(&json!({"using": "css selector", "value": css}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        answer["value"][ELEMENT]
            .as_str()
            .map(|id| Element(id.into()))
    }

    /// The element `css` selects (the test fails without one).
    pub async fn get(&self, css: &str) -> Element {
        self.find(css)
            .await
            .unwrap_or_else(|| panic!("no element {css}"))
    }

    /// Every element `css` selects.
    pub async fn all(&self, css: &str) -> Vec<Element> {
        let found = self
            .call(
                reqwest::Method::POST,
                "/elements",
                Some(json!({"using": "css selector", "value": css})),
            )
            .await;
        found
            .as_array()
            .unwrap()
            .iter()
            .map(|e| Element(e[ELEMENT].as_str().unwrap().into()))
            .collect()
    }

    /// The text a user sees in `element`.
    pub async fn text(&self, element: &Element) -> String {
        self.call(
            reqwest::Method::GET,
            &format!("/element/{}/text", element.0),
            None,
        )
        .await
        .as_str()
        .unwrap()
        .to_string()
    }

    /// The text of the element `css` selects.
    pub async fn text_of(&self, css: &str) -> String {
        let e = self.get(css).await;
        self.text(&e).await
    }

    pub async fn attribute(&self, element: &Element, name: &str) -> Option<String> {
        self.call(
            reqwest::Method::GET,
            &format!("/element/{}/attribute/{name}", element.0),
            None,
        )
        .await
        .as_str()
        .map(str::to_string)
    }

    pub async fn click(&self, element: &Element) {
        self.call(
            reqwest::Method::POST,
            &format!("/element/{}/click", element.0),
            Some(json!({})),
        )
        .await;
    }

    /// Type `text` into `element`.
    pub async fn type_into(&self, element: &Element, text: &str) {
        self.call(
            reqwest::Method::POST,
            &format!("/element/{}/value", element.0),
            Some(json!({"text": text})),
        )
        .await;
    }

    /// Run `script` in the page and return what it returns.
    pub async fn run(&self, script: &str) -> Value {
        self.call(
            reqwest::Method::POST,
            "/execute/sync",
            Some(json!({"script": script, "args": []})),
        )
        .await
    }

    /// Wait until `script` returns `true` (up to 30 s; a script that fails, as while a new
    /// page loads, counts as not yet).
    pub async fn wait_for(&self, what: &str, script: &str) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let url = format!("{}/session/{}/execute/sync", self.base, self.session);
            let answer = self
                .http
                .post(url)
                .json(&json!({"script": script, "args": []}))
                .send()
                .await;
            let value = match answer {
                Ok(r) => r.json::<Value>().await.ok().map(|v| v["value"].clone()),
                Err(_) => None,
            };
            if value == Some(json!(true)) {
                return;
            }
            assert!(tokio::time::Instant::now() < deadline, "waited for {what}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Resize the window so the whole page fits, and return a PNG of it.
    pub async fn screenshot_full(&self) -> Vec<u8> {
        let height = self
            .run("return document.documentElement.scrollHeight")
            .await
            .as_u64()
            .unwrap_or(1000);
        self.call(
            reqwest::Method::POST,
            "/window/rect",
            Some(json!({"width": 1400, "height": height + 40})),
        )
        .await;
        let png = self.call(reqwest::Method::GET, "/screenshot", None).await;
        base64::engine::general_purpose::STANDARD
            .decode(png.as_str().unwrap())
            .unwrap()
    }
}

impl Browser {
    /// End the session (Chromium exits), then the driver.
    pub async fn close(self) {
        let url = format!("{}/session/{}", self.base, self.session);
        let _ = self.http.delete(url).send().await;
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // The driver ends with the Child (kill_on_drop), and Chromium with it.
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}
