//! End-to-end tests: each starts the real `kooagent` binary and talks to it as a client
//! would. Modules by capability.
mod harness;

mod daemon;
mod device;
mod docs;
mod license;
mod seller_server;
mod socket;
mod upstream;
mod usage;
