//! A headless Chromium driven over WebDriver (Debian's `chromium` and `chromium-driver`,
//! installed by `scripts/setup-test.sh`), with a fresh profile per test. Killed on drop.

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const CHROMIUM: &str = "/usr/bin/chromium";
pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

pub struct Browser {
    pub c: Client,
    driver: Child,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// Start chromedriver on a free port and open a session in a 1280×900 window.
    pub async fn start() -> Browser {
        assert!(
            std::path::Path::new(CHROMEDRIVER).exists() && std::path::Path::new(CHROMIUM).exists(),
            "the browser tests need Debian's chromium and chromium-driver: run scripts/setup-test.sh"
        );
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver starts");
        let mut lines = BufReader::new(driver.stdout.take().unwrap()).lines();
        loop {
            match lines.next() {
                Some(Ok(l)) if l.contains("started successfully") => break,
                Some(Ok(_)) => {}
                _ => panic!("chromedriver exited before it listened"),
            }
        }
        std::thread::spawn(move || for _ in lines {});
        let profile = tempfile::tempdir().unwrap();
        // reqwest and fantoccini bring both of rustls's providers: pick one for the process.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let caps = json!({
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu",
                    "--disable-background-networking", "--disable-component-update",
                    "--disable-dev-shm-usage", "--window-size=1280,900",
                    format!("--user-data-dir={}", profile.path().display()),
                ]
            }
        });
        let Value::Object(caps) = caps else {
            unreachable!()
        };
        let c = ClientBuilder::rustls()
            .unwrap()
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{port}"))
            .await
            .expect("a WebDriver session");
        Browser {
            c,
            driver,
            _profile: profile,
        }
    }

    pub async fn goto(&self, url: &str) {
        self.c.goto(url).await.unwrap();
    }

    /// Run `script` (a function body; `arguments[i]` are `args`) and return its value.
    pub async fn js(&self, script: &str, args: Vec<Value>) -> Value {
        self.c.execute(script, args).await.unwrap()
    }

    /// Poll `expr` (a JS expression) until it is truthy; its value. Panics with `what` after 15 s.
    pub async fn until(&self, expr: &str, what: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(15);
        let script = format!("try {{ return ({expr}); }} catch (e) {{ return null; }}");
        loop {
            let v = self.js(&script, vec![]).await;
            let truthy = match &v {
                Value::Null => false,
                Value::Bool(b) => *b,
                Value::String(s) => !s.is_empty(),
                Value::Number(n) => n.as_f64() != Some(0.0),
                _ => true,
            };
            if truthy {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for: {what} ({expr})"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The text of the first element matching `css` (innerText: what the person reads).
    pub async fn text(&self, css: &str) -> String {
        let v = self
            .js(
                "const e = document.querySelector(arguments[0]); return e ? e.innerText : null;",
                vec![json!(css)],
            )
            .await;
        v.as_str().unwrap_or_default().to_string()
    }

    /// Click the first element matching `css` once it is there (a page fills its tables after
    /// it loads), scrolled to the middle of the window first (as a person would see it; the
    /// sticky top bar covers the top edge).
    pub async fn click(&self, css: &str) {
        let present = format!("document.querySelector({}) !== null", json!(css));
        self.until(&present, css).await;
        self.js(
            "const e = document.querySelector(arguments[0]); if (e) e.scrollIntoView({block: 'center'});",
            vec![json!(css)],
        )
        .await;
        self.c
            .find(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("{css}: {e}"))
            .click()
            .await
            .unwrap_or_else(|e| panic!("click {css}: {e}"));
    }

    /// Clear the field `css` and type `text` into it, as a person would.
    pub async fn type_into(&self, css: &str, text: &str) {
        let e = self
            .c
            .find(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("{css}: {e}"));
        e.clear().await.unwrap();
        e.send_keys(text).await.unwrap();
    }

    /// How many elements match `css`.
    pub async fn count(&self, css: &str) -> usize {
        self.c.find_all(Locator::Css(css)).await.unwrap().len()
    }

    /// Whether a JavaScript dialog (alert, confirm) is open.
    pub async fn dialog_open(&self) -> bool {
        self.c.get_alert_text().await.is_ok()
    }

    /// The CSP violations the page recorded (app.js and holder.js keep them).
    pub async fn csp_violations(&self) -> Vec<Value> {
        self.js("return window.kgCspViolations || [];", vec![])
            .await
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// Save a screenshot under `$KEYGATE_SCREENSHOTS/` (a folder of the crate, e.g. `docs`)
    /// when that variable is set.
    pub async fn screenshot(&self, name: &str) {
        let Ok(dir) = std::env::var("KEYGATE_SCREENSHOTS") else {
            return;
        };
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
        std::fs::create_dir_all(&dir).unwrap();
        // As a person first sees the page: scrolled to the top left.
        self.js(
            "window.scrollTo(0, 0); for (const t of document.querySelectorAll('.table-wrap')) t.scrollLeft = 0;",
            vec![],
        )
        .await;
        let png = self.c.screenshot().await.unwrap();
        std::fs::write(dir.join(format!("{name}.png")), png).unwrap();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.driver.kill();
        let _ = self.driver.wait();
        // Chromium outlives a killed driver: end the browser processes of this test's own
        // profile, by their pid.
        let profile = self._profile.path().display().to_string();
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmd).contains(&profile) {
                let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            }
        }
    }
}
