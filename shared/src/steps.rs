//! What a builder's output says about its steps, read from the lines each
//! backend prints, for the live view and the failed-step excerpt:
//!
//! - buildah and podman: `STEP 2/5: RUN make`, `[2/3] STEP 4/5: RUN make`
//!   in a multi-stage build (the stage's number among the Dockerfile's
//!   stages, then the step among that stage's instructions, FROM first);
//! - Docker's BuildKit (`--progress=plain`): `#5 [2/5] RUN make`,
//!   `#8 [stage-1 4/5] RUN make` (the stage's name, or `stage-N` counted
//!   from 0; FROM, RUN, COPY, ADD and WORKDIR are steps), then `#5 DONE
//!   0.3s`, `#5 CACHED`, `#8 ERROR: ...` and `#5 0.054 output`;
//! - the Docker Engine's classic builder: `Step 4/10 : RUN make` (every
//!   instruction of the Dockerfile counted, global ARGs included).
//!
//! Also the builders' noise braid removes from a job's log: buildah's
//! warning about the automatic platform ARGs it sets itself (and says were
//! not consumed), and its "subprocess exited" line printed twice.

use crate::buildargs::is_automatic;

/// Which builder printed a step line: each numbers steps its own way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Flavor {
    /// buildah or podman.
    Buildah,
    /// BuildKit's plain progress.
    Buildkit,
    /// The Docker Engine's classic builder.
    Classic,
}

/// Which stage a step belongs to, as the builder names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StageRef {
    /// buildah's 1-based stage number in a multi-stage build.
    Number(u32),
    /// buildah's one-stage build.
    Single,
    /// BuildKit's stage name: the `AS` name or `stage-N`; none for a
    /// one-stage build.
    Name(Option<String>),
    /// The classic builder numbers steps across the whole Dockerfile.
    Whole,
}

/// One step a builder announced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub flavor: Flavor,
    pub stage: StageRef,
    /// 1-based, within the stage (across the Dockerfile for `Classic`).
    pub index: u32,
    pub total: u32,
    /// The instruction as the builder shows it, e.g. `RUN make`.
    pub instruction: String,
}

impl Step {
    /// The step as braid shows it, buildx's way: `[2/5] RUN make`, or
    /// `[stage-1 4/5] RUN make` in a multi-stage build.
    pub fn label(&self) -> String {
        let stage = match &self.stage {
            StageRef::Number(n) => format!("stage-{} ", n.saturating_sub(1)),
            StageRef::Name(Some(name)) => format!("{name} "),
            _ => String::new(),
        };
        format!("[{stage}{}/{}] {}", self.index, self.total, self.instruction)
    }

    /// The instruction's keyword, upper-case (`RUN`).
    pub fn keyword(&self) -> String {
        self.instruction.split_whitespace().next().unwrap_or_default().to_ascii_uppercase()
    }
}

/// What one line of a builder's output is.
#[derive(Debug, Clone, PartialEq)]
pub enum StepLine {
    /// A step starts (`vertex`: BuildKit's `#N`).
    Start { vertex: Option<u32>, step: Step },
    /// A BuildKit vertex finished (`#N DONE 0.3s`, `#N CACHED`).
    Done { vertex: u32, seconds: Option<f64>, cached: bool },
    /// A BuildKit vertex failed (`#N ERROR: message`).
    Error { vertex: u32, message: String },
    /// A BuildKit vertex's output (`#N 0.054 text`), without its prefix.
    Output { vertex: u32, text: String },
    /// Anything else: output of the running step, or the builder's own.
    Other,
}

/// Reads one line of builder output. Never panics.
pub fn parse(line: &str) -> StepLine {
    if let Some(start) = buildah_step(line) {
        return StepLine::Start { vertex: None, step: start };
    }
    if let Some(step) = classic_step(line) {
        return StepLine::Start { vertex: None, step };
    }
    buildkit_line(line).unwrap_or(StepLine::Other)
}

/// `a/b` as two positive numbers (blanks around them allowed: BuildKit pads).
fn fraction(s: &str) -> Option<(u32, u32)> {
    let (a, b) = s.split_once('/')?;
    let (a, b) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
    (a >= 1 && a <= b).then_some((a, b))
}

/// `[2/3] STEP 4/5: RUN make` or `STEP 4/5: RUN make`.
fn buildah_step(line: &str) -> Option<Step> {
    let (stage, rest) = match line.strip_prefix('[') {
        Some(r) => {
            let (inside, rest) = r.split_once("] ")?;
            (StageRef::Number(fraction(inside)?.0), rest)
        }
        None => (StageRef::Single, line),
    };
    let rest = rest.strip_prefix("STEP ")?;
    let (numbers, instruction) = rest.split_once(": ")?;
    let (index, total) = fraction(numbers)?;
    Some(Step { flavor: Flavor::Buildah, stage, index, total, instruction: instruction.trim().to_owned() })
}

/// `Step 4/10 : RUN make`.
fn classic_step(line: &str) -> Option<Step> {
    let rest = line.strip_prefix("Step ")?;
    let (numbers, instruction) = rest.split_once(" : ")?;
    let (index, total) = fraction(numbers)?;
    Some(Step { flavor: Flavor::Classic, stage: StageRef::Whole, index, total, instruction: instruction.to_owned() })
}

/// `#N ...` lines of BuildKit's plain progress.
fn buildkit_line(line: &str) -> Option<StepLine> {
    let rest = line.strip_prefix('#')?;
    let digits = rest.find(|c: char| !c.is_ascii_digit())?;
    let vertex: u32 = rest[..digits].parse().ok()?;
    let rest = rest[digits..].strip_prefix(' ')?;
    if let Some(inside) = rest.strip_prefix('[') {
        let (head, instruction) = inside.split_once("] ")?;
        if head == "internal" || head.starts_with("auth]") {
            return None;
        }
        let (stage, numbers) = match head.rsplit_once(' ') {
            Some((name, n)) if fraction(n).is_some() && !name.trim().is_empty() => (Some(name.trim().to_owned()), n),
            _ => (None, head),
        };
        let (index, total) = fraction(numbers)?;
        let step = Step {
            flavor: Flavor::Buildkit,
            stage: StageRef::Name(stage),
            index,
            total,
            instruction: instruction.to_owned(),
        };
        return Some(StepLine::Start { vertex: Some(vertex), step });
    }
    if rest == "CACHED" {
        return Some(StepLine::Done { vertex, seconds: None, cached: true });
    }
    if let Some(time) = rest.strip_prefix("DONE ") {
        let seconds = time.strip_suffix('s').and_then(|s| s.parse().ok());
        return Some(StepLine::Done { vertex, seconds, cached: false });
    }
    if let Some(message) = rest.strip_prefix("ERROR: ") {
        return Some(StepLine::Error { vertex, message: message.to_owned() });
    }
    // `#5 0.054 text`: the output of a RUN, after its time stamp.
    let (time, text) = rest.split_once(' ').unwrap_or((rest, ""));
    if time.contains('.') && time.parse::<f64>().is_ok() {
        return Some(StepLine::Output { vertex, text: text.to_owned() });
    }
    None
}

/// buildah's warning about build args no ARG consumed, without the
/// automatic platform ARGs: buildah 1.28 sets TARGETPLATFORM, TARGETOS,
/// TARGETARCH (and braid passes the others a FROM line uses) whether or
/// not the Dockerfile declares them, and names them here although nothing
/// is wrong. None drops the line (only automatic ones were named); Some
/// the line as it should read; lines of other kinds come back unchanged.
pub fn without_automatic_args(line: &str) -> Option<String> {
    const WARNING: &str = "[Warning] one or more build args were not consumed: [";
    let Some(list) = line.strip_prefix(WARNING).and_then(|l| l.strip_suffix(']')) else {
        return Some(line.to_owned());
    };
    let kept: Vec<&str> = list.split_whitespace().filter(|name| !is_automatic(name)).collect();
    (!kept.is_empty()).then(|| format!("{WARNING}{}]", kept.join(" ")))
}

/// buildah prints `subprocess exited with status N` twice when a RUN fails
/// (the step's error, then its log of it): true for the second one.
pub fn is_repeated_exit_line(line: &str, recent: &[String]) -> bool {
    line.starts_with("subprocess exited with status ") && recent.iter().rev().take(3).any(|l| l == line)
}

/// The builder's closing error report, held back from the job's log: the
/// failure message says it once. buildah ends with `Error: ...` (the
/// failure message itself); BuildKit, after `#N ERROR: ...`, repeats the
/// step's last lines and the error between `------` rules.
#[derive(Debug, Default)]
pub struct Epilogue {
    held: Vec<String>,
    buildkit_failed: bool,
}

/// Lines an epilogue holds at most; past that they go to the log.
const HELD_LINES: usize = 64;

impl Epilogue {
    /// Takes a line; returns the lines to log now.
    pub fn offer(&mut self, line: String) -> Vec<String> {
        let error = matches!(parse(&line), StepLine::Error { .. });
        self.buildkit_failed |= error;
        if self.held.len() >= HELD_LINES {
            let mut out = std::mem::take(&mut self.held);
            out.push(line);
            return out;
        }
        if self.buildkit_failed {
            // Other steps' own lines (`#9 CANCELED`) go on; the report waits.
            if error || !line.starts_with('#') {
                self.held.push(line);
                return Vec::new();
            }
            return vec![line];
        }
        if line.starts_with("Error: ") {
            self.held.push(line);
            return Vec::new();
        }
        let mut out = std::mem::take(&mut self.held);
        out.push(line);
        out
    }

    /// At the builder's exit: a failure drops the held report (its message
    /// is the job's failure message); otherwise the lines are logged.
    pub fn finish(self, failed: bool) -> Vec<String> {
        if failed { Vec::new() } else { self.held }
    }
}

/// Follows a builder's output: the steps it started and, when it fails,
/// which step failed.
#[derive(Debug, Default)]
pub struct Tracker {
    /// The last step started (buildah, classic).
    last: Option<Step>,
    /// BuildKit's steps by vertex (a bounded number: a Dockerfile's steps).
    vertices: Vec<(u32, Step)>,
    /// The step a BuildKit `#N ERROR` named, and its message.
    failed: Option<Step>,
    error: Option<String>,
}

/// Steps remembered per job (BuildKit vertices): more are not kept.
const TRACKED_STEPS: usize = 4096;

impl Tracker {
    pub fn observe(&mut self, line: &str) {
        match parse(line) {
            StepLine::Start { vertex, step } => {
                if let Some(v) = vertex
                    && self.vertices.len() < TRACKED_STEPS
                {
                    self.vertices.push((v, step.clone()));
                }
                self.last = Some(step);
            }
            StepLine::Error { vertex, message } => {
                if let Some((_, step)) = self.vertices.iter().rev().find(|(v, _)| *v == vertex) {
                    self.failed = Some(step.clone());
                }
                self.error.get_or_insert(message);
            }
            _ => {}
        }
    }

    /// The step that failed: the one BuildKit said failed, else the last
    /// one started.
    pub fn failed_step(&self) -> Option<&Step> {
        self.failed.as_ref().or(self.last.as_ref())
    }

    /// BuildKit's message for the step that failed (`#N ERROR: ...`).
    pub fn error_message(&self) -> Option<&str> {
        self.error.as_deref()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn start(line: &str) -> Step {
        match parse(line) {
            StepLine::Start { step, .. } => step,
            other => panic!("{line:?}: {other:?}"),
        }
    }

    #[test]
    fn each_builders_step_lines() {
        let s = start("STEP 2/5: RUN make");
        assert_eq!((s.flavor, s.stage.clone(), s.index, s.total), (Flavor::Buildah, StageRef::Single, 2, 5));
        assert_eq!(s.label(), "[2/5] RUN make");
        let s = start("[2/3] STEP 4/5: RUN echo failing; exit 2");
        assert_eq!((s.stage.clone(), s.index), (StageRef::Number(2), 4));
        assert_eq!(s.label(), "[stage-1 4/5] RUN echo failing; exit 2");
        let s = start("#8 [stage-1 4/5] RUN echo failing; exit 2");
        assert_eq!((s.flavor, s.stage.clone()), (Flavor::Buildkit, StageRef::Name(Some("stage-1".into()))));
        assert_eq!(s.label(), "[stage-1 4/5] RUN echo failing; exit 2");
        let s = start("#12 [ 3/12] COPY . .");
        assert_eq!((s.stage.clone(), s.index, s.total), (StageRef::Name(None), 3, 12));
        let s = start("#4 [build  2/3] RUN x");
        assert_eq!(s.stage, StageRef::Name(Some("build".into())));
        let s = start("Step 9/10 : RUN echo failing; exit 2");
        assert_eq!((s.flavor, s.index, s.total, s.keyword().as_str()), (Flavor::Classic, 9, 10, "RUN"));
        assert_eq!(parse("#1 [internal] load build definition from Dockerfile"), StepLine::Other);
        assert_eq!(parse("#5 DONE 0.3s"), StepLine::Done { vertex: 5, seconds: Some(0.3), cached: false });
        assert_eq!(parse("#5 CACHED"), StepLine::Done { vertex: 5, seconds: None, cached: true });
        assert_eq!(parse("#4 0.054 two"), StepLine::Output { vertex: 4, text: "two".into() });
        assert_eq!(
            parse("#8 ERROR: executor failed running [/bin/sh -c false]: exit code: 1"),
            StepLine::Error { vertex: 8, message: "executor failed running [/bin/sh -c false]: exit code: 1".into() }
        );
        for other in
            ["STEP x/5: RUN", "[2/3] STEP 6/5: RUN", "--> 6c1c74e8aec", "#", "#x [1/2] RUN", "Step 1/2 RUN", ""]
        {
            assert_eq!(parse(other), StepLine::Other, "{other:?}");
        }
    }

    #[test]
    fn the_failed_step_is_the_one_buildkit_names_or_the_last() {
        let mut t = Tracker::default();
        for line in
            ["#4 [stage-1 2/5] RUN sleep 1", "#5 [first 2/3] RUN echo", "#4 ERROR: exit code: 1", "#5 DONE 0.1s"]
        {
            t.observe(line);
        }
        assert_eq!(t.failed_step().unwrap().instruction, "RUN sleep 1");
        let mut t = Tracker::default();
        for line in ["[1/2] STEP 1/2: FROM a", "x", "[2/2] STEP 2/3: RUN false", "Error: building"] {
            t.observe(line);
        }
        assert_eq!(t.failed_step().unwrap().index, 2);
        assert_eq!(start("[1/2] STEP 3/4: RUN x").label(), "[stage-0 3/4] RUN x");
        assert!(Tracker::default().failed_step().is_none());
    }

    #[test]
    fn the_closing_report_is_held_and_dropped_on_failure() {
        let mut e = Epilogue::default();
        let mut logged = Vec::new();
        for line in ["failing", "subprocess exited with status 2", "Error: building at STEP \"RUN x\": exit status 2"] {
            logged.extend(e.offer(line.into()));
        }
        assert_eq!(logged, ["failing", "subprocess exited with status 2"]);
        assert!(e.finish(true).is_empty());
        let mut e = Epilogue::default();
        assert!(e.offer("Error: not the last".into()).is_empty());
        assert_eq!(e.offer("more".into()), ["Error: not the last", "more"], "a line after it releases it");
        let mut e = Epilogue::default();
        let mut logged = Vec::new();
        for line in [
            "#8 [2/2] RUN false",
            "#8 ERROR: exit code: 1",
            "#9 CANCELED",
            "------",
            " > [2/2] RUN false:",
            "exit code: 1",
        ] {
            logged.extend(e.offer(line.into()));
        }
        assert_eq!(logged, ["#8 [2/2] RUN false", "#9 CANCELED"]);
        assert_eq!(e.finish(false).len(), 4, "kept when the builder did not fail after all");
    }

    #[test]
    fn buildahs_warning_about_automatic_args_goes() {
        let w = "[Warning] one or more build args were not consumed: [TARGETARCH TARGETOS TARGETPLATFORM]";
        assert_eq!(without_automatic_args(w), None);
        let w = "[Warning] one or more build args were not consumed: [BUILDOS MINE TARGETOS]";
        assert_eq!(
            without_automatic_args(w).unwrap(),
            "[Warning] one or more build args were not consumed: [MINE]",
            "the user's own stay"
        );
        assert_eq!(without_automatic_args("plain").unwrap(), "plain");
        let recent = vec!["subprocess exited with status 2".to_owned()];
        assert!(is_repeated_exit_line("subprocess exited with status 2", &recent));
        assert!(!is_repeated_exit_line("subprocess exited with status 2", &[]));
        assert!(!is_repeated_exit_line("failing", &["failing".to_owned()]));
    }
}
