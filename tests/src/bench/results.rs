//! Everything a run measured: the values of each metric per scale and
//! mode, what could not be measured and why, and notes for the report.

use std::collections::BTreeMap;

use serde_json::json;

use super::plan::{Metric, Mode, Scale};
use super::stats::Summary;

#[derive(Debug, Default)]
pub struct Results {
    values: BTreeMap<(Scale, Mode, Metric), Vec<f64>>,
    /// A scale and mode that yielded nothing, and why.
    unmeasured: BTreeMap<(Scale, Mode), String>,
    /// What the run noticed on the way (failed probes, connection
    /// failures), in order.
    pub notes: Vec<String>,
    /// The agents' open-files limit.
    pub nofile: Option<u64>,
}

impl Results {
    pub fn add(&mut self, scale: Scale, mode: Mode, metric: Metric, value: f64) {
        self.values
            .entry((scale, mode, metric))
            .or_default()
            .push(value);
    }

    pub fn summary(&self, scale: Scale, mode: Mode, metric: Metric) -> Option<Summary> {
        Summary::of(self.values.get(&(scale, mode, metric))?)
    }

    pub fn set_unmeasured(&mut self, scale: Scale, mode: Mode, why: String) {
        self.unmeasured.insert((scale, mode), why);
    }

    /// Why nothing was measured at `scale` under `mode`, if so.
    pub fn unmeasured(&self, scale: Scale, mode: Mode) -> Option<&str> {
        self.unmeasured.get(&(scale, mode)).map(String::as_str)
    }

    pub fn all_unmeasured(&self) -> impl Iterator<Item = (&(Scale, Mode), &String)> {
        self.unmeasured.iter()
    }

    /// Every value as measured, for the report's raw file.
    pub fn to_json(&self) -> serde_json::Value {
        let values: Vec<serde_json::Value> = self
            .values
            .iter()
            .map(|((scale, mode, metric), values)| {
                json!({
                    "pus": scale.pus,
                    "acls": scale.acls,
                    "targets": scale.targets,
                    "mode": mode.name(),
                    "metric": metric.name(),
                    "unit": format!("{:?}", metric.unit()),
                    "values": values,
                })
            })
            .collect();
        let unmeasured: Vec<serde_json::Value> = self
            .unmeasured
            .iter()
            .map(|((scale, mode), why)| {
                json!({
                    "pus": scale.pus,
                    "acls": scale.acls,
                    "targets": scale.targets,
                    "mode": mode.name(),
                    "why": why,
                })
            })
            .collect();
        json!({
            "values": values,
            "unmeasured": unmeasured,
            "notes": self.notes,
            "agent_open_files_limit": self.nofile,
        })
    }
}
