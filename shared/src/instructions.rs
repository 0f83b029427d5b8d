//! A Dockerfile's instructions with their line numbers and stages, read as
//! `dockerfile::scan` reads them (directives, continuations, comments,
//! here-documents): to find the instruction a builder's step names
//! (`steps::Step`) and show the lines around it as BuildKit does, and to
//! know which ARGs the Dockerfile declares or its FROM lines use.

use std::collections::BTreeSet;

use crate::dockerfile::{TooLarge, directive, heredoc, logical_line, shell_words, split_word};
use crate::limits;
use crate::steps::{Flavor, StageRef, Step};

/// One instruction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instruction {
    /// Upper-case: `RUN`.
    pub keyword: String,
    /// Its continuation lines joined, as builders show it.
    pub text: String,
    /// First and last line, 1-based (here-document bodies included).
    pub line: u32,
    pub end_line: u32,
    /// Its stage, 0-based; None for an ARG before the first FROM.
    pub stage: Option<usize>,
}

/// A Dockerfile, listed.
#[derive(Debug, Clone, Default)]
pub struct Listing {
    pub instructions: Vec<Instruction>,
    /// Each stage's `AS` name, in order.
    pub stages: Vec<Option<String>>,
    lines: Vec<String>,
}

/// The lines around a failed instruction, as BuildKit prints them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Excerpt {
    /// The instruction's first and last line.
    pub line: u32,
    pub end_line: u32,
    /// The number of `lines[0]`.
    pub first_line: u32,
    pub lines: Vec<String>,
}

impl Excerpt {
    /// BuildKit's shape: `Dockerfile:7`, a rule, ` %3d | >>> line` (the
    /// instruction's lines marked), a rule.
    pub fn render(&self, dockerfile: &str) -> Vec<String> {
        const RULE: &str = "--------------------";
        let mut out = vec![format!("{dockerfile}:{}", self.line), RULE.to_owned()];
        for (n, text) in (self.first_line..).zip(&self.lines) {
            let mark = if (self.line..=self.end_line).contains(&n) { ">>>" } else { "   " };
            out.push(format!(" {n:>3} | {mark} {text}"));
        }
        out.push(RULE.to_owned());
        out
    }
}

/// Lists a Dockerfile's instructions. Never panics.
pub fn list(bytes: &[u8]) -> Result<Listing, TooLarge> {
    if bytes.len() > limits::DOCKERFILE_BYTES {
        return Err(TooLarge);
    }
    let text = String::from_utf8_lossy(bytes);
    let lines: Vec<&str> = text.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l)).collect();
    let mut listing = Listing { lines: lines.iter().map(|l| (*l).to_owned()).collect(), ..Listing::default() };
    let mut escape = '\\';
    let mut i = 0;
    while let Some((key, value)) = lines.get(i).and_then(|l| directive(l)) {
        if key == "escape" && value == "`" {
            escape = '`';
        }
        i += 1;
    }
    while i < lines.len() {
        let start = i;
        let (logical, next) = logical_line(&lines, i, escape);
        i = next;
        let Some(logical) = logical else { continue };
        let (word, rest) = split_word(&logical);
        let keyword = word.to_ascii_uppercase();
        if matches!(keyword.as_str(), "RUN" | "COPY" | "ADD") {
            i = skip_heredocs(rest, &lines, i);
        }
        if keyword == "FROM" {
            listing.stages.push(stage_name(rest));
        }
        let stage = listing.stages.len().checked_sub(1);
        listing.instructions.push(Instruction {
            keyword,
            text: logical.trim().to_owned(),
            line: line_number(start),
            end_line: line_number(i.saturating_sub(1).max(start)),
            stage,
        });
    }
    Ok(listing)
}

fn line_number(index: usize) -> u32 {
    u32::try_from(index + 1).unwrap_or(u32::MAX)
}

/// Skips the bodies of the here-documents `rest` opens; the next index.
fn skip_heredocs(rest: &str, lines: &[&str], mut i: usize) -> usize {
    let words = shell_words(rest);
    let docs: Vec<(bool, String)> =
        words.iter().enumerate().filter_map(|(n, w)| heredoc(w, words.get(n + 1))).collect();
    for (strip_tabs, end) in docs {
        while let Some(line) = lines.get(i) {
            i += 1;
            let candidate = if strip_tabs { line.trim_start_matches('\t') } else { line };
            if candidate == end {
                break;
            }
        }
    }
    i
}

/// `FROM [--platform=...] image [AS name]`: the name, lower-cased as
/// BuildKit compares it.
fn stage_name(rest: &str) -> Option<String> {
    let words: Vec<&str> = rest.split_whitespace().collect();
    match words.as_slice() {
        [.., as_word, name] if as_word.eq_ignore_ascii_case("as") => Some(name.to_ascii_lowercase()),
        _ => None,
    }
}

/// BuildKit's steps: FROM, RUN, COPY, ADD and (with its file operations)
/// WORKDIR.
fn buildkit_step(keyword: &str, workdir: bool) -> bool {
    matches!(keyword, "FROM" | "RUN" | "COPY" | "ADD") || (workdir && keyword == "WORKDIR")
}

impl Listing {
    fn in_stage(&self, stage: usize) -> impl Iterator<Item = &Instruction> {
        self.instructions.iter().filter(move |i| i.stage == Some(stage))
    }

    /// The instruction a builder's step names, if the step's numbering fits
    /// this Dockerfile (its count of steps and the keyword agree); None
    /// rather than a wrong line.
    pub fn locate(&self, step: &Step) -> Option<&Instruction> {
        let index = usize::try_from(step.index).ok()?.checked_sub(1)?;
        let total = usize::try_from(step.total).ok()?;
        let keyword = step.keyword();
        fn fits<'a>(list: Vec<&'a Instruction>, index: usize, total: usize, keyword: &str) -> Option<&'a Instruction> {
            let found = *list.get(index)?;
            (list.len() == total && found.keyword == keyword).then_some(found)
        }
        match (&step.flavor, &step.stage) {
            (Flavor::Classic, _) | (_, StageRef::Whole) => {
                // The classic builder stops at --target: count to there.
                let found = self.instructions.get(index)?;
                (found.keyword == keyword).then_some(found)
            }
            (_, StageRef::Number(n)) => {
                let stage = usize::try_from(*n).ok()?.checked_sub(1)?;
                fits(self.in_stage(stage).collect(), index, total, &keyword)
            }
            (_, StageRef::Single) => fits(self.in_stage(0).collect(), index, total, &keyword),
            (_, StageRef::Name(name)) => {
                let stages: Vec<usize> = match name {
                    Some(name) => {
                        let name = name.to_ascii_lowercase();
                        let numbered = name.strip_prefix("stage-").and_then(|n| n.parse::<usize>().ok());
                        let named = self.stages.iter().position(|s| s.as_deref() == Some(name.as_str()));
                        named.or(numbered).into_iter().collect()
                    }
                    None => (0..self.stages.len()).collect(),
                };
                let mut found = stages.into_iter().flat_map(|s| {
                    [true, false].map(|workdir| {
                        let steps = self.in_stage(s).filter(|i| buildkit_step(&i.keyword, workdir)).collect();
                        fits(steps, index, total, &keyword)
                    })
                });
                found.find_map(|f| f)
            }
        }
    }

    /// The lines around `found`, padded as BuildKit pads them: two lines
    /// before and after a one-line instruction, one around a longer one.
    pub fn excerpt(&self, found: &Instruction) -> Excerpt {
        let count = self.lines.len().max(1);
        let (mut start, mut end) = (found.line as usize, (found.end_line as usize).min(count));
        let pad = if start == end { 4 } else { 2 };
        let mut p = 0;
        while p < pad {
            if start > 1 {
                start -= 1;
                p += 1;
            }
            if end != count {
                end += 1;
                p += 1;
            }
            p += 1;
        }
        let lines = self.lines[start.saturating_sub(1)..end.min(self.lines.len())]
            .iter()
            .take(limits::EXCERPT_LINES)
            .map(|l| crate::shorten(l, limits::EXCERPT_LINE_BYTES))
            .collect();
        Excerpt { line: found.line, end_line: found.end_line, first_line: line_number(start.saturating_sub(1)), lines }
    }

    /// Every name an ARG declares (global or in a stage), and every name a
    /// FROM line uses as `$NAME` or `${NAME}` (BuildKit and buildah take
    /// those undeclared for the automatic platform ARGs).
    pub fn arg_names(&self) -> BTreeSet<String> {
        let mut names = BTreeSet::new();
        for i in &self.instructions {
            let (_, rest) = split_word(&i.text);
            match i.keyword.as_str() {
                "ARG" => names.extend(rest.split_whitespace().map(|w| {
                    let name = w.split_once('=').map_or(w, |(n, _)| n);
                    name.trim_matches(['"', '\'']).to_owned()
                })),
                "FROM" => names.extend(variables(rest)),
                _ => {}
            }
        }
        names
    }
}

/// `$NAME` and `${NAME...}` in `text`.
fn variables(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        rest = &rest[at + 1..];
        let braced = rest.strip_prefix('{');
        let body = braced.unwrap_or(rest);
        let name: String = body.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
        if !name.is_empty() {
            out.push(name);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::steps::{StepLine, parse};

    const MULTI: &str = "ARG BASE=busybox\nFROM $BASE AS first\nARG TARGETARCH\nRUN echo one $TARGETARCH > /one\n\
COPY Dockerfile /df\n\nFROM --platform=${BUILDPLATFORM} $BASE\n# a comment\nRUN echo \\\n  two\n\
COPY --from=first /one /one\nRUN <<EOF\necho heredoc\nEOF\nRUN echo failing; exit 2\nRUN echo never\n";

    fn step(line: &str) -> Step {
        match parse(line) {
            StepLine::Start { step, .. } => step,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn instructions_carry_their_lines_and_stages() {
        let l = list(MULTI.as_bytes()).unwrap();
        assert_eq!(l.stages, [Some("first".to_owned()), None]);
        let run = l.instructions.iter().find(|i| i.text.starts_with("RUN echo   two")).unwrap();
        assert_eq!((run.line, run.end_line, run.stage), (9, 10, Some(1)), "a continuation spans its lines");
        let heredoc = l.instructions.iter().find(|i| i.text.starts_with("RUN <<EOF")).unwrap();
        assert_eq!((heredoc.line, heredoc.end_line), (12, 14), "a here-document's body is its instruction's");
        assert_eq!(l.instructions[0].stage, None, "a global ARG");
        let names: Vec<String> = l.arg_names().into_iter().collect();
        assert_eq!(names, ["BASE", "BUILDPLATFORM", "TARGETARCH"]);
    }

    /// Each builder's numbering of MULTI's steps, as buildah 1.28 and Docker
    /// 20.10's BuildKit and classic builder print it (checked by running
    /// them on it, without the here-document buildah 1.28 cannot read).
    #[test]
    fn each_builders_step_finds_the_failing_line() {
        let l = list(MULTI.as_bytes()).unwrap();
        for line in [
            "[2/2] STEP 5/6: RUN echo failing; exit 2",
            "#9 [stage-1 5/6] RUN echo failing; exit 2",
            "Step 10/11 : RUN echo failing; exit 2",
        ] {
            let found = l.locate(&step(line)).unwrap_or_else(|| panic!("{line}"));
            assert_eq!(found.line, 15, "{line}");
        }
        assert_eq!(l.locate(&step("[1/2] STEP 3/4: RUN echo one $TARGETARCH > /one")).unwrap().line, 4);
        assert_eq!(l.locate(&step("#5 [first 2/3] RUN echo one amd64 > /one")).unwrap().line, 4);
        // Numbering that does not fit this Dockerfile finds nothing.
        assert!(l.locate(&step("[2/2] STEP 5/9: RUN x")).is_none());
        assert!(l.locate(&step("[2/2] STEP 3/6: RUN x")).is_none(), "step 3 is a COPY");
        assert!(l.locate(&step("[9/9] STEP 1/1: FROM x")).is_none());
        let one = list(b"FROM a\nWORKDIR /w\nENV A=1\nRUN false\n").unwrap();
        assert_eq!(one.locate(&step("#6 [3/3] RUN false")).unwrap().line, 4);
        assert_eq!(one.locate(&step("STEP 4/4: RUN false")).unwrap().line, 4);
    }

    #[test]
    fn the_excerpt_is_padded_as_buildkit_pads_it() {
        let l = list(MULTI.as_bytes()).unwrap();
        let failing = l.instructions.iter().find(|i| i.line == 15).unwrap();
        let e = l.excerpt(failing);
        assert_eq!((e.first_line, e.lines.len()), (13, 5));
        assert_eq!(
            e.render("Dockerfile"),
            [
                "Dockerfile:15",
                "--------------------",
                "  13 |     echo heredoc",
                "  14 |     EOF",
                "  15 | >>> RUN echo failing; exit 2",
                "  16 |     RUN echo never",
                "  17 |     ",
                "--------------------",
            ]
        );
        let two = l.instructions.iter().find(|i| i.line == 9).unwrap();
        let e = l.excerpt(two);
        assert_eq!((e.first_line, e.lines.len()), (8, 4), "one line around a two-line instruction");
        let first = list(b"FROM a\nRUN x\n").unwrap();
        let e = first.excerpt(&first.instructions[0]);
        assert_eq!((e.first_line, e.lines.len()), (1, 3));
    }
}
