//! `provd:plugin/progress`.

use std::collections::HashSet;

use provd_bindings::progress as wit;
use provd_bindings::types::Error as WitError;

use crate::host::CallContext;
use crate::observe::ProgressEvent;

/// Distinct phases one invocation may report. Phases name steps of a
/// provisioning flow; a plugin inventing thousands is a bug or an attack on
/// whoever displays them.
pub(crate) const MAX_PHASES: usize = 64;
/// Longest phase name.
pub(crate) const MAX_PHASE_LEN: usize = 64;
/// Progress events forwarded per invocation; later ones are dropped, since a
/// plugin reporting in a tight loop would otherwise flood the observer.
pub(crate) const MAX_EVENTS: u64 = 100_000;

#[derive(Default)]
pub(crate) struct ProgressState {
    phases: HashSet<String>,
    events: u64,
}

fn check_phase(phase: &str) -> Result<(), String> {
    let ok_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || "-_.".contains(c);
    if phase.is_empty() || phase.len() > MAX_PHASE_LEN || !phase.chars().all(ok_char) {
        return Err(format!(
            "phase {phase:?}: use 1 to {MAX_PHASE_LEN} characters from a-z, 0-9, '-', '_', '.'"
        ));
    }
    Ok(())
}

/// `progress`'s view of a call: the call's context and the phases seen.
pub(crate) struct ProgressView<'a> {
    pub ctx: &'a mut CallContext,
    pub state: &'a mut ProgressState,
}

pub(crate) struct ProgressData;

impl wasmtime::component::HasData for ProgressData {
    type Data<'a> = ProgressView<'a>;
}

impl wit::Host for ProgressView<'_> {
    async fn report(
        &mut self,
        phase: String,
        done: u64,
        total: Option<u64>,
    ) -> wasmtime::Result<Result<(), WitError>> {
        self.ctx.step()?;
        let args = format!("{phase} {done}/{}", total.map(|t| t.to_string()).unwrap_or("?".into()));
        let result = self.report_call(phase, done, total);
        self.ctx.audit("progress", "report", args, &result);
        Ok(result)
    }
}

impl ProgressView<'_> {
    fn report_call(
        &mut self,
        phase: String,
        done: u64,
        total: Option<u64>,
    ) -> Result<(), WitError> {
        if let Err(problem) = check_phase(&phase) {
            return Err(WitError::InvalidInput(problem));
        }
        if let Some(total) = total
            && done > total
        {
            return Err(WitError::InvalidInput(format!(
                "phase {phase}: done ({done}) exceeds total ({total})"
            )));
        }
        let state = &mut *self.state;
        if !state.phases.contains(&phase) {
            if state.phases.len() >= MAX_PHASES {
                return Err(WitError::InvalidInput(format!(
                    "phase {phase}: at most {MAX_PHASES} distinct phases per request"
                )));
            }
            state.phases.insert(phase.clone());
        }
        state.events += 1;
        if state.events <= MAX_EVENTS {
            let event = ProgressEvent { plugin: self.ctx.plugin.clone(), phase, done, total };
            self.ctx.observer.progress(&event);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::check_phase;

    #[test]
    fn phase_names() {
        assert!(check_phase("fetch-images").is_ok());
        assert!(check_phase("step.2_b").is_ok());
        for bad in ["", "Fetch", "a b", "a/b", &"x".repeat(65)] {
            assert!(check_phase(bad).is_err(), "{bad:?}");
        }
    }
}
