//! The CLI is the first user of the client crate: everything it asks the running agent goes
//! through `kooagent-client`, like the seller's software does.

pub use kooagent_client::{Client, ClientError};
