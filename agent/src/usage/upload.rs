//! Delivery to the marketplace's usage-data API: the client and the delivery loop are
//! `kooagent_edge::upload` (the seller server's usage relay delivers with them too); here
//! the agent's ledger becomes a delivery [`Sink`].

pub use kooagent_edge::upload::*;

use super::hours::HourRecord;
use super::ledger::{Ledger, LedgerError};
use super::state::Entry;

impl Sink for Ledger {
    type Error = LedgerError;
    fn pending(&self, limit: usize) -> Result<Vec<HourRecord>, LedgerError> {
        Ok(self.state().pending(limit))
    }
    fn delivered(
        &self,
        sns: Vec<String>,
        at: i64,
        upstream: &str,
        http: u16,
    ) -> Result<(), LedgerError> {
        self.mark(Entry::Delivered {
            sns,
            at,
            upstream: upstream.to_string(),
            http,
        })
    }
    fn parked(&self, sns: Vec<String>, at: i64, reason: String) -> Result<(), LedgerError> {
        self.mark(Entry::Parked { sns, at, reason })
    }
}
