//! The platforms every agent ever known declared (connected, lost or
//! remembered in the store): a build for a platform none of them declared
//! is refused at submit; one whose agents are all offline waits, with a
//! notice saying who is known and when each was last seen.

use braid_shared::Platform;

use super::{Effect, Farm};
use crate::model::Declared;

/// Agents named in one notice or refusal.
const NAMED: usize = 8;

impl Farm {
    /// Takes back what agents declared (from the store); their platforms
    /// are metric labels again, as before the restart.
    pub fn restore_declared(&mut self, declared: Vec<(String, Declared)>) {
        for d in declared.iter().map(|(_, d)| d) {
            self.metrics.declare_platforms(d.platforms.iter().chain(&d.emulates).map(ToString::to_string));
        }
        self.declared.extend(declared);
    }

    /// Records what a connecting agent declares, or when a known one was
    /// last seen, and stores it.
    pub(super) fn note_declared(&mut self, name: &str, declared: Option<Declared>) {
        match &declared {
            Some(d) => self.declared.insert(name.to_owned(), d.clone()),
            None => self.declared.remove(name),
        };
        self.out.push(Effect::Declared { agent: name.to_owned(), declared });
    }

    /// Stores when a known agent was last heard of (its session ended or it
    /// was declared lost).
    pub(super) fn store_last_seen(&mut self, name: &str, seen_ms: i64) {
        if let Some(mut d) = self.declared.get(name).cloned()
            && d.last_seen_ms < seen_ms
        {
            d.last_seen_ms = seen_ms;
            self.note_declared(name, Some(d));
        }
    }

    /// When `name` was last heard of: now for a connected agent.
    fn last_seen(&self, name: &str, stored: i64) -> Option<i64> {
        match self.agents.get(name) {
            Some(a) if a.connected => None,
            Some(a) => Some(a.last_seen_ms.max(stored)),
            None => Some(stored),
        }
    }

    /// Why the build may not be queued: a platform no agent ever declared
    /// natively (or, if the build allows emulation, by emulation). None if
    /// every platform has some agent, connected or not.
    pub fn undeclared(&self, platforms: &[Platform], allow_emulation: bool) -> Option<String> {
        let mut refusals = Vec::new();
        for platform in platforms {
            // Submit asks this under the farm's lock: the common answer
            // stops at the first agent, and names are gathered only to refuse.
            let emulates = |d: &Declared| d.emulates.iter().any(|p| p.matches(platform));
            let native = self.declared.values().any(|d| d.platforms.iter().any(|p| p.matches(platform)));
            if native || (allow_emulation && self.declared.values().any(emulates)) {
                continue;
            }
            let emulators: Vec<&str> =
                self.declared.iter().filter(|(_, d)| emulates(d)).map(|(n, _)| n.as_str()).collect();
            if self.declared.is_empty() {
                refusals.push(format!(
                    "platform {platform}: no agent has ever connected to this coordinator; start an agent that \
                     builds it (braid-agent), then submit again"
                ));
                continue;
            }
            let mut why = format!("platform {platform}: no agent has ever declared it; {}", self.farm_platforms());
            if !emulators.is_empty() {
                why.push_str(&format!(
                    "; {} {} it: --allow-emulation would use {}",
                    names(&emulators),
                    if emulators.len() == 1 { "emulates" } else { "emulate" },
                    if emulators.len() == 1 { "it" } else { "them" },
                ));
            }
            refusals.push(why);
        }
        (!refusals.is_empty()).then(|| refusals.join("\n"))
    }

    /// "the farm has linux/amd64, linux/arm64 (by emulation: linux/arm/v7)".
    fn farm_platforms(&self) -> String {
        let mut native: Vec<String> = Vec::new();
        let mut emulated: Vec<String> = Vec::new();
        for d in self.declared.values() {
            native.extend(d.platforms.iter().map(ToString::to_string));
            emulated.extend(d.emulates.iter().map(ToString::to_string));
        }
        native.sort();
        native.dedup();
        emulated.sort();
        emulated.dedup();
        emulated.retain(|p| !native.contains(p));
        let mut s = format!("the farm has {}", if native.is_empty() { "none".into() } else { listed(&native) });
        if !emulated.is_empty() {
            s.push_str(&format!(" (by emulation: {})", listed(&emulated)));
        }
        s
    }

    /// The notice of a job no agent can take now: who is known for its
    /// platform and when each was last seen.
    pub(super) fn waiting_text(&self, platform: &Platform, allow_emulation: bool) -> String {
        let known: Vec<String> = self
            .declared
            .iter()
            .filter(|(_, d)| {
                d.platforms.iter().any(|p| p.matches(platform))
                    || (allow_emulation && d.emulates.iter().any(|p| p.matches(platform)))
            })
            .map(|(name, d)| match self.last_seen(name, d.last_seen_ms) {
                None => format!("{name} (connected)"),
                Some(ms) => format!("{name} (last seen {})", utc(ms)),
            })
            .collect();
        let mut text = format!("waiting for an agent for {platform}");
        if !known.is_empty() {
            let shown: Vec<&str> = known.iter().take(NAMED).map(String::as_str).collect();
            let more = known.len().saturating_sub(NAMED);
            text.push_str(&format!(
                ": {} {} known for it: {}{}",
                known.len(),
                if known.len() == 1 { "agent is" } else { "agents are" },
                shown.join(", "),
                if more > 0 { format!(" and {more} more") } else { String::new() }
            ));
        }
        text
    }
}

/// Platforms named in one refusal; the rest are counted.
const PLATFORMS_NAMED: usize = 32;

fn listed(platforms: &[String]) -> String {
    let mut s = platforms.iter().take(PLATFORMS_NAMED).cloned().collect::<Vec<_>>().join(", ");
    if platforms.len() > PLATFORMS_NAMED {
        s.push_str(&format!(" and {} more", platforms.len() - PLATFORMS_NAMED));
    }
    s
}

fn names(agents: &[&str]) -> String {
    let shown = agents.iter().take(NAMED).copied().collect::<Vec<_>>().join(", ");
    let more = agents.len().saturating_sub(NAMED);
    let noun = if agents.len() == 1 { "agent" } else { "agents" };
    if more > 0 { format!("{noun} {shown} and {more} more") } else { format!("{noun} {shown}") }
}

/// A farm time (ms since the epoch) as UTC ISO 8601, to the second.
pub fn utc(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(ms.div_euclid(1000))
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_else(|| format!("{ms} ms"))
}
