//! `braid build --progress auto|tty|plain|rawjson|quiet`: how a followed
//! build's events reach standard error.
//!
//! - `tty`: the live view of `tty.rs`, redrawn at most every 150 ms with
//!   plain ANSI sequences (cursor up, clear to the end of the screen), as
//!   BuildKit's progressui draws; the last frame stays as the summary.
//! - `plain`: one line per event (`describe::event_line`), and each step's
//!   duration when it ends: `[linux/arm64] [2/5] RUN make  DONE 3.2s`.
//! - `rawjson`: each event as `braid logs --format json` prints it, one
//!   JSON object per line; braid's own lines as `{"type":"client",...}`.
//! - `quiet`: nothing but the result.
//!
//! `auto` is tty when standard error is a terminal, else plain (buildx's
//! rule).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use braid_shared::proto::{self, build_event::Kind};
use braid_shared::steps::{self, StepLine};

use crate::describe;
use crate::tty::Board;

/// The shortest time between two frames.
pub const FRAME: Duration = Duration::from_millis(150);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Tty,
    Plain,
    RawJson,
    Quiet,
}

impl Mode {
    /// The mode `--progress` (and `-q`) ask for; `auto` is tty on a terminal.
    pub fn choose(flag: &str, quiet: bool, terminal: bool) -> Mode {
        match flag {
            _ if quiet => Mode::Quiet,
            "quiet" => Mode::Quiet,
            "tty" => Mode::Tty,
            "rawjson" => Mode::RawJson,
            "auto" if terminal => Mode::Tty,
            _ => Mode::Plain,
        }
    }
}

/// One of braid's own lines (`#1 context ...`) in `mode`.
pub fn say(mode: Mode, line: &str) {
    match mode {
        Mode::Quiet => {}
        Mode::RawJson => errln!("{}", serde_json::json!({"type": "client", "text": line})),
        _ => errln!("{line}"),
    }
}

/// Prints a followed build's events in one mode.
pub struct Printer {
    pub mode: Mode,
    board: Board,
    /// Lines of the frame on screen.
    drawn: usize,
    last_frame: Option<Instant>,
    /// Plain mode: each platform's running step and when it started.
    open: HashMap<String, (String, f64)>,
}

fn now_seconds() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or_default()
}

fn event_seconds(e: &proto::BuildEvent) -> f64 {
    e.time.as_ref().map_or_else(now_seconds, |t| t.seconds as f64 + f64::from(t.nanos) / 1e9)
}

impl Printer {
    pub fn new(mode: Mode) -> Printer {
        Printer { mode, board: Board::default(), drawn: 0, last_frame: None, open: HashMap::new() }
    }

    /// One event of the build.
    pub fn event(&mut self, e: &proto::BuildEvent) {
        match self.mode {
            Mode::Quiet => {}
            Mode::RawJson => errln!("{}", crate::ops::event_json(e)),
            Mode::Tty => {
                self.board.apply(e);
                self.draw(false);
            }
            Mode::Plain => self.plain(e),
        }
    }

    fn plain(&mut self, e: &proto::BuildEvent) {
        let at = event_seconds(e);
        match &e.kind {
            Some(Kind::Log(l)) => {
                if let StepLine::Start { vertex: None, step } = steps::parse(&l.line) {
                    self.close_step(&l.platform, at, "DONE");
                    self.open.insert(l.platform.clone(), (step.label(), at));
                }
            }
            Some(Kind::Job(j)) if j.state != proto::JobState::Building as i32 => {
                let word = if j.state == proto::JobState::Failed as i32 { "ERROR" } else { "DONE" };
                self.close_step(&j.platform, at, word);
            }
            _ => {}
        }
        if let Some(line) = describe::event_line(e, false) {
            errln!("{line}");
        }
    }

    /// `[platform] STEP  DONE 3.2s` (`ERROR` when its job failed) for the
    /// step that was running.
    fn close_step(&mut self, platform: &str, at: f64, word: &str) {
        if let Some((label, started)) = self.open.remove(platform) {
            errln!("[{platform}] {label}  {word} {:.1}s", (at - started).max(0.0));
        }
    }

    /// Redraws the live view if a frame is due (`force`: now, the last).
    fn draw(&mut self, force: bool) {
        if !force && self.last_frame.is_some_and(|t| t.elapsed() < FRAME) {
            return;
        }
        self.last_frame = Some(Instant::now());
        // A terminal that says no size (0 columns) is taken as 80 wide.
        let width = terminal_size::terminal_size_of(std::io::stderr()).map_or(0, |(w, _)| usize::from(w.0));
        let frame = self.board.render(now_seconds(), if width < 20 { 80 } else { width });
        let mut text = String::new();
        if self.drawn > 0 {
            // To the start of the frame on screen, and clear from there.
            text.push_str(&format!("\x1b[{}F\x1b[J", self.drawn));
        }
        for line in &frame {
            text.push_str(line);
            text.push('\n');
        }
        self.drawn = frame.len();
        err!("{text}");
    }

    /// The live view's time moves on between events.
    pub fn tick(&mut self) {
        if self.mode == Mode::Tty {
            self.draw(false);
        }
    }

    /// The build ended: the last frame, left on screen.
    pub fn finish(&mut self) {
        if self.mode == Mode::Tty {
            self.draw(true);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_is_tty_only_on_a_terminal() {
        assert_eq!(Mode::choose("auto", false, true), Mode::Tty);
        assert_eq!(Mode::choose("auto", false, false), Mode::Plain);
        assert_eq!(Mode::choose("tty", false, false), Mode::Tty, "asked for, it is drawn anyway");
        assert_eq!(Mode::choose("rawjson", false, true), Mode::RawJson);
        assert_eq!(Mode::choose("plain", true, true), Mode::Quiet, "-q wins");
    }
}
