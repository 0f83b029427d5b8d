//! Headless Chromium driven over the DevTools protocol, with no crate and
//! no network: `--remote-debugging-pipe` reads commands on fd 3 and writes
//! answers on fd 4 (NUL-terminated JSON); a shell maps those to the child's
//! stdin and stdout. Chromium runs in its own process group, killed (all of
//! it: zygote, renderers) when the `Browser` is dropped. Every call is
//! bounded in time.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use base64::Engine;
use serde_json::{Value, json};

/// How long one protocol call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

pub struct Browser {
    child: Child,
    input: ChildStdin,
    answers: Receiver<Value>,
    next_id: u64,
}

/// One tab, attached in flat mode (its commands carry the session id).
pub struct Tab {
    session: String,
}

/// An element's box in CSS pixels.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rect {
    pub x: f64,
    pub y: f64,
    pub width: f64,
    pub height: f64,
}

impl Browser {
    /// Starts Chromium with a fresh profile in `profile`; its stderr goes to `log`.
    pub fn start(profile: &Path, log: &Path) -> anyhow::Result<Browser> {
        let log = std::fs::File::create(log)?;
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(r#"exec "$@" 3<&0 4>&1 0</dev/null 1>&2"#)
            .arg("sh")
            .arg("chromium")
            .args([
                "--headless",
                "--remote-debugging-pipe",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--disable-quic",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-extensions",
                "--hide-scrollbars",
                "--window-size=1280,1000",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg("about:blank")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(log)
            .process_group(0)
            .spawn()
            .context("starting chromium")?;
        let input = child.stdin.take().context("chromium's command pipe")?;
        let output = child.stdout.take().context("chromium's answer pipe")?;
        let (tx, answers) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(output);
            let mut message = Vec::new();
            while reader.read_until(0, &mut message).is_ok_and(|n| n > 0) {
                if message.last() == Some(&0) {
                    message.pop();
                }
                if let Ok(v) = serde_json::from_slice::<Value>(&message)
                    && tx.send(v).is_err()
                {
                    break;
                }
                message.clear();
            }
        });
        Ok(Browser { child, input, answers, next_id: 0 })
    }

    /// One protocol command; its result, or the protocol's error.
    pub fn call(&mut self, session: Option<&str>, method: &str, params: Value) -> anyhow::Result<Value> {
        self.next_id += 1;
        let id = self.next_id;
        let mut message = json!({"id": id, "method": method, "params": params});
        if let Some(s) = session {
            message["sessionId"] = json!(s);
        }
        let mut bytes = serde_json::to_vec(&message)?;
        bytes.push(0);
        self.input.write_all(&bytes).with_context(|| format!("sending {method}"))?;
        self.input.flush()?;
        let deadline = Instant::now() + CALL_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.answers.recv_timeout(left) {
                Ok(v) if v["id"] == json!(id) => {
                    if let Some(e) = v.get("error") {
                        bail!("{method}: {e}");
                    }
                    return Ok(v["result"].clone());
                }
                Ok(_) => continue,
                Err(RecvTimeoutError::Timeout) => bail!("{method}: no answer within {CALL_TIMEOUT:?}"),
                Err(RecvTimeoutError::Disconnected) => bail!("{method}: chromium exited"),
            }
        }
    }

    /// A new tab of `width` x `height` CSS pixels, sending `headers` with every request.
    pub fn tab(&mut self, width: u32, height: u32, headers: &[(&str, &str)]) -> anyhow::Result<Tab> {
        let target = self.call(None, "Target.createTarget", json!({"url": "about:blank"}))?;
        let target_id = target["targetId"].as_str().context("targetId")?.to_owned();
        let attached = self.call(None, "Target.attachToTarget", json!({"targetId": target_id, "flatten": true}))?;
        let session = attached["sessionId"].as_str().context("sessionId")?.to_owned();
        let s = Some(session.as_str());
        self.call(s, "Page.enable", json!({}))?;
        self.call(
            s,
            "Emulation.setDeviceMetricsOverride",
            json!({"width": width, "height": height, "deviceScaleFactor": 1, "mobile": false}),
        )?;
        if !headers.is_empty() {
            self.call(s, "Network.enable", json!({}))?;
            let map: serde_json::Map<String, Value> = headers.iter().map(|(k, v)| (k.to_string(), json!(v))).collect();
            self.call(s, "Network.setExtraHTTPHeaders", json!({"headers": map}))?;
        }
        Ok(Tab { session })
    }

    /// Opens `url` in the tab and waits (bounded) until `ready` (a script
    /// expression) is true.
    pub fn open(&mut self, tab: &Tab, url: &str, ready: &str, timeout: Duration) -> anyhow::Result<()> {
        self.call(Some(&tab.session), "Page.navigate", json!({"url": url}))?;
        self.wait_for(tab, ready, timeout)
    }

    /// Waits until the expression is true in the tab, polling every 100 ms.
    pub fn wait_for(&mut self, tab: &Tab, expression: &str, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.eval(tab, expression).is_ok_and(|v| v == json!(true)) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("timed out after {timeout:?} waiting for `{expression}` in the page");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The value of a script expression (promises awaited).
    pub fn eval(&mut self, tab: &Tab, expression: &str) -> anyhow::Result<Value> {
        let r = self.call(
            Some(&tab.session),
            "Runtime.evaluate",
            json!({"expression": expression, "returnByValue": true, "awaitPromise": true}),
        )?;
        if let Some(e) = r.get("exceptionDetails") {
            bail!("`{expression}` threw: {e}");
        }
        Ok(r["result"]["value"].clone())
    }

    /// The bounding box of the first element matching `selector`.
    pub fn rect(&mut self, tab: &Tab, selector: &str) -> anyhow::Result<Rect> {
        let sel = serde_json::to_string(selector)?;
        let v = self.eval(
            tab,
            &format!(
                "(() => {{ const e = document.querySelector({sel}); if (!e) return null; \
                 const r = e.getBoundingClientRect(); return [r.x, r.y, r.width, r.height]; }})()"
            ),
        )?;
        let n = |i: usize| v[i].as_f64().with_context(|| format!("no element {selector}"));
        Ok(Rect { x: n(0)?, y: n(1)?, width: n(2)?, height: n(3)? })
    }

    /// A PNG of the page's region `clip`.
    pub fn screenshot(&mut self, tab: &Tab, clip: Rect) -> anyhow::Result<Vec<u8>> {
        let r = self.call(
            Some(&tab.session),
            "Page.captureScreenshot",
            json!({"format": "png", "clip": {"x": clip.x, "y": clip.y, "width": clip.width, "height": clip.height, "scale": 1}}),
        )?;
        let data = r["data"].as_str().context("screenshot data")?;
        Ok(base64::engine::general_purpose::STANDARD.decode(data)?)
    }
}

impl Drop for Browser {
    /// Kills Chromium's whole process group, then reaps the shell's child.
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-KILL", "--", &format!("-{}", self.child.id())]).status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
