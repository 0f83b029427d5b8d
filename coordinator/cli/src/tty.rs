//! `--progress tty`: the live view, as buildx's tty mode draws it: one
//! block per platform (its agent, native or emulated, state and time), the
//! steps its builder announced (`steps::parse` reads them from the log
//! lines), finished ones collapsed to one line each and the running one
//! with its last few lines of output. Pure: `Board::apply` takes events,
//! `Board::render` returns a frame's lines for a time and a width;
//! `progress.rs` draws the frames.

use std::collections::VecDeque;

use braid_shared::proto::{self, build_event::Kind};
use braid_shared::steps::{self, StepLine};

use crate::describe::job_word;

/// Lines of the running step's output shown under it.
const TAIL: usize = 5;
/// Finished steps shown per platform (the earlier ones are counted).
const SHOWN_STEPS: usize = 4;
/// Steps remembered per platform.
const STEPS: usize = 512;

#[derive(Debug, Clone)]
struct StepRow {
    label: String,
    /// BuildKit's vertex, to match its DONE and ERROR lines.
    vertex: Option<u32>,
    started: f64,
    ended: Option<f64>,
    cached: bool,
    failed: bool,
}

#[derive(Debug, Clone, Default)]
struct Block {
    platform: String,
    agent: String,
    emulated: bool,
    state: i32,
    started: Option<f64>,
    ended: Option<f64>,
    steps: Vec<StepRow>,
    /// Steps forgotten past `STEPS`.
    dropped: usize,
    tail: VecDeque<String>,
}

impl Block {
    fn done(&self) -> bool {
        matches!(
            proto::JobState::try_from(self.state).unwrap_or_default(),
            proto::JobState::Pushed | proto::JobState::Verified | proto::JobState::Failed | proto::JobState::Cancelled
        )
    }

    fn close_running(&mut self, at: f64) {
        for s in self.steps.iter_mut().filter(|s| s.ended.is_none() && s.vertex.is_none()) {
            s.ended = Some(at);
        }
    }

    fn log(&mut self, line: &str, at: f64) {
        match steps::parse(line) {
            StepLine::Start { vertex, step } => {
                if vertex.is_none() {
                    self.close_running(at);
                }
                if self.steps.len() == STEPS {
                    self.steps.remove(0);
                    self.dropped += 1;
                }
                let label = step.label();
                self.steps.push(StepRow { label, vertex, started: at, ended: None, cached: false, failed: false });
                self.tail.clear();
            }
            // BuildKit shares a vertex between stages that do the same
            // (two FROM lines of one image): every row of it ends.
            StepLine::Done { vertex, cached, .. } => {
                for s in self.steps.iter_mut().filter(|s| s.vertex == Some(vertex) && s.ended.is_none()) {
                    s.ended = Some(at);
                    s.cached = cached;
                }
            }
            StepLine::Error { vertex, .. } => {
                if let Some(s) = self.steps.iter_mut().rev().find(|s| s.vertex == Some(vertex)) {
                    s.ended = Some(at);
                    s.failed = true;
                }
            }
            StepLine::Output { text, .. } => self.push_tail(&text),
            StepLine::Other => self.push_tail(line),
        }
    }

    fn push_tail(&mut self, line: &str) {
        if self.tail.len() == TAIL {
            self.tail.pop_front();
        }
        self.tail.push_back(line.to_owned());
    }
}

/// What the live view knows of a build.
#[derive(Debug, Default)]
pub struct Board {
    started: Option<f64>,
    blocks: Vec<Block>,
    /// The last notice (e.g. "waiting for an agent for linux/riscv64").
    notice: Option<String>,
    ended: Option<(f64, String)>,
}

fn seconds(t: &Option<prost_types::Timestamp>) -> Option<f64> {
    t.as_ref().map(|t| t.seconds as f64 + f64::from(t.nanos) / 1e9)
}

impl Board {
    fn block(&mut self, platform: &str) -> &mut Block {
        let at = match self.blocks.iter().position(|b| b.platform == platform) {
            Some(at) => at,
            None => {
                self.blocks.push(Block { platform: platform.to_owned(), ..Block::default() });
                self.blocks.len() - 1
            }
        };
        &mut self.blocks[at]
    }

    /// Takes one event of the build.
    pub fn apply(&mut self, e: &proto::BuildEvent) {
        let at = seconds(&e.time).unwrap_or_default();
        self.started.get_or_insert(at);
        match &e.kind {
            Some(Kind::Job(j)) => {
                let b = self.block(&j.platform);
                b.state = j.state;
                if !j.agent.is_empty() {
                    b.agent.clone_from(&j.agent);
                }
                b.emulated = j.emulated;
                if j.state == proto::JobState::Building as i32 {
                    b.started.get_or_insert(at);
                }
                if b.done() {
                    b.ended.get_or_insert(at);
                    b.close_running(at);
                    if j.state == proto::JobState::Failed as i32
                        && let Some(last) = b.steps.last_mut()
                    {
                        last.failed = true;
                    }
                }
            }
            Some(Kind::Log(l)) => {
                let b = self.block(&l.platform);
                b.started.get_or_insert(at);
                b.log(&l.line, at);
            }
            Some(Kind::Notice(n)) => self.notice = Some(n.text.clone()),
            Some(Kind::Build(b)) => {
                let state = proto::BuildState::try_from(b.state).unwrap_or_default();
                if matches!(
                    state,
                    proto::BuildState::Succeeded | proto::BuildState::Failed | proto::BuildState::Cancelled
                ) {
                    self.ended = Some((at, crate::describe::build_state_name(b.state).to_owned()));
                }
            }
            None => {}
        }
    }

    /// The frame at `now` (seconds since the epoch, as event times), each
    /// line at most `width` characters.
    pub fn render(&self, now: f64, width: usize) -> Vec<String> {
        let end = self.ended.as_ref().map_or(now, |(at, _)| *at);
        let total = (end - self.started.unwrap_or(end)).max(0.0);
        let done = self.blocks.iter().filter(|b| b.done()).count();
        let word = self.ended.as_ref().map_or("Building", |(_, w)| w.as_str());
        let mut lines = vec![format!("[+] {} {total:.1}s ({done}/{} platforms)", capitalized(word), self.blocks.len())];
        for b in &self.blocks {
            lines.extend(self.render_block(b, now, width));
        }
        if self.ended.is_none()
            && let Some(notice) = &self.notice
        {
            lines.push(format!(" => {notice}"));
        }
        lines.into_iter().map(|l| fit(&l, width)).collect()
    }

    fn render_block(&self, b: &Block, now: f64, width: usize) -> Vec<String> {
        let how = if b.emulated { "emulated" } else { "native" };
        let agent =
            if b.agent.is_empty() { "waiting for an agent".to_owned() } else { format!("on {} ({how})", b.agent) };
        let elapsed = b.started.map(|s| b.ended.unwrap_or(now) - s).unwrap_or(0.0).max(0.0);
        let mut lines = vec![format!(" => {} {agent}  {}  {elapsed:.1}s", b.platform, job_word(b.state))];
        // Finished: its last steps, one line each, no output.
        let finished = b.done() && !b.steps.iter().any(|s| s.failed);
        let running = if finished { None } else { b.steps.iter().rposition(|s| s.ended.is_none() || s.failed) };
        let shown_from = running.map_or(b.steps.len(), |r| r + 1).saturating_sub(SHOWN_STEPS + 1);
        let hidden = shown_from + b.dropped;
        if hidden > 0 {
            lines.push(format!("    ... {hidden} earlier steps"));
        }
        for s in &b.steps[shown_from..] {
            let time = s.ended.unwrap_or(now) - s.started;
            let mark = match (s.cached, s.failed, s.ended) {
                (_, true, _) => "ERROR ",
                (true, _, _) => "CACHED ",
                _ => "",
            };
            // The time stays whole at the end; a long step is cut before it.
            let time = format!("  {:.1}s", time.max(0.0));
            let room = width.saturating_sub(time.len()).max(8);
            lines.push(format!("{}{time}", fit(&format!("    {mark}{}", s.label), room)));
        }
        if running.is_some() {
            lines.extend(b.tail.iter().map(|l| format!("      {l}")));
        }
        lines
    }
}

fn capitalized(word: &str) -> String {
    let mut c = word.chars();
    c.next().map(|f| f.to_uppercase().chain(c).collect()).unwrap_or_default()
}

/// `line` cut to `width` characters (a wrapped line would break the
/// redraw, which counts lines).
fn fit(line: &str, width: usize) -> String {
    let line: String = line.chars().filter(|c| !c.is_control()).collect();
    if line.chars().count() <= width {
        return line;
    }
    line.chars().take(width.saturating_sub(1)).chain(std::iter::once('…')).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: i64, kind: Kind) -> proto::BuildEvent {
        proto::BuildEvent {
            time: Some(prost_types::Timestamp { seconds, nanos: 0 }),
            kind: Some(kind),
            ..Default::default()
        }
    }

    fn job(platform: &str, state: proto::JobState, agent: &str, emulated: bool) -> Kind {
        Kind::Job(proto::JobStateChanged {
            platform: platform.into(),
            state: state as i32,
            agent: agent.into(),
            emulated,
            ..Default::default()
        })
    }

    fn log(platform: &str, line: &str) -> Kind {
        Kind::Log(proto::LogLine { platform: platform.into(), line: line.into() })
    }

    /// A scripted build: buildah on amd64, BuildKit on arm64 (emulated).
    fn board() -> Board {
        let mut b = Board::default();
        for e in [
            at(100, job("linux/amd64", proto::JobState::Building, "a1", false)),
            at(100, job("linux/arm64", proto::JobState::Building, "a2", true)),
            at(101, log("linux/amd64", "STEP 1/3: FROM base")),
            at(102, log("linux/amd64", "STEP 2/3: RUN make")),
            at(102, log("linux/amd64", "cc -o app main.c")),
            at(101, log("linux/arm64", "#4 [1/2] FROM base")),
            at(101, log("linux/arm64", "#4 DONE 0.5s")),
            at(102, log("linux/arm64", "#5 [2/2] RUN make")),
            at(103, log("linux/arm64", "#5 0.512 compiling")),
        ] {
            b.apply(&e);
        }
        b
    }

    #[test]
    fn each_platform_shows_its_agent_step_and_output() {
        let frame = board().render(105.0, 80);
        assert_eq!(frame[0], "[+] Building 5.0s (0/2 platforms)");
        assert_eq!(frame[1], " => linux/amd64 on a1 (native)  building  5.0s");
        assert_eq!(frame[2], "    [1/3] FROM base  1.0s", "a finished step: one line, its time");
        assert_eq!(frame[3], "    [2/3] RUN make  3.0s", "the running step's time goes on");
        assert_eq!(frame[4], "      cc -o app main.c", "and its last lines");
        assert_eq!(frame[5], " => linux/arm64 on a2 (emulated)  building  5.0s");
        assert_eq!(frame[6], "    [1/2] FROM base  0.0s");
        assert_eq!(frame[7], "    [2/2] RUN make  3.0s");
        assert_eq!(frame[8], "      compiling", "BuildKit's output without its prefix");
        assert!(frame.iter().all(|l| l.chars().count() <= 80));
        let narrow = board().render(105.0, 20);
        assert_eq!(narrow[1], " => linux/amd64 on …");
        assert_eq!(narrow[3], "    [2/3] RUN…  3.0s", "a step is cut before its time");
    }

    #[test]
    fn finished_platforms_collapse_and_a_failure_keeps_its_step() {
        let mut b = board();
        b.apply(&at(106, log("linux/amd64", "STEP 3/3: COPY app /")));
        b.apply(&at(107, job("linux/amd64", proto::JobState::Pushed, "a1", false)));
        b.apply(&at(108, log("linux/arm64", "#5 ERROR: exit code: 2")));
        b.apply(&at(108, job("linux/arm64", proto::JobState::Failed, "a2", true)));
        b.apply(&at(
            108,
            Kind::Build(proto::BuildStateChanged { state: proto::BuildState::Failed as i32, ..Default::default() }),
        ));
        let frame = b.render(200.0, 80);
        assert_eq!(
            frame,
            [
                "[+] Failed 8.0s (2/2 platforms)",
                " => linux/amd64 on a1 (native)  pushed  7.0s",
                "    [1/3] FROM base  1.0s",
                "    [2/3] RUN make  4.0s",
                "    [3/3] COPY app /  1.0s",
                " => linux/arm64 on a2 (emulated)  failed  8.0s",
                "    [1/2] FROM base  0.0s",
                "    ERROR [2/2] RUN make  6.0s",
                "      compiling",
            ],
            "the final frame stays still: times stop when the build ended"
        );
    }

    #[test]
    fn long_builds_show_their_last_steps() {
        let mut b = Board::default();
        b.apply(&at(0, job("linux/amd64", proto::JobState::Building, "a1", false)));
        for i in 1..=9 {
            b.apply(&at(i, log("linux/amd64", &format!("STEP {i}/9: RUN step{i}"))));
        }
        let frame = b.render(10.0, 80);
        assert_eq!(frame[2], "    ... 4 earlier steps");
        assert_eq!(frame.len(), 2 + 1 + 5, "header, block, the hidden count, four finished and the running step");
        assert!(frame.last().unwrap().starts_with("    [9/9] RUN step9"));
    }
}
