//! The iptables + ipset fallback datapath (being written).

use super::{Counters, Datapath, DatapathKind, DatapathSettings, Result};
use crate::policy::{NetworkSettings, Pu};

pub struct IptablesDatapath {
    _settings: DatapathSettings,
}

impl IptablesDatapath {
    pub fn new(settings: DatapathSettings) -> Result<Self> {
        Ok(Self {
            _settings: settings,
        })
    }
}

impl Datapath for IptablesDatapath {
    fn kind(&self) -> DatapathKind {
        DatapathKind::Iptables
    }
    fn run(&mut self) -> Result<()> {
        todo!()
    }
    fn set_target_networks(&mut self, _networks: &NetworkSettings) -> Result<()> {
        todo!()
    }
    fn configure(&mut self, _version: u8, _pu: &Pu) -> Result<()> {
        todo!()
    }
    fn update(&mut self, _version: u8, _new: &Pu, _old: &Pu) -> Result<()> {
        todo!()
    }
    fn delete(&mut self, _version: u8, _pu: &Pu) -> Result<()> {
        todo!()
    }
    fn cleanup(&mut self) -> Result<()> {
        todo!()
    }
    fn counters(&self) -> Result<Counters> {
        todo!()
    }
}
