//! End-to-end tests: each starts the real `kooagent` binary and talks to it as a client
//! would. Modules by capability.
mod harness;

mod agent_metrics;
mod authcode;
mod authcode_agent;
mod cached;
mod crash;
mod crash_model;
mod crash_trace;
mod daemon;
mod device;
mod docs;
mod freeze;
#[cfg(feature = "seller-server")]
mod guide;
mod image_prep;
mod license;
mod online;
#[cfg(feature = "seller-server")]
mod relay;
mod sdk;
#[cfg(feature = "seller-server")]
mod seller_call;
#[cfg(feature = "seller-server")]
mod seller_console;
#[cfg(feature = "seller-server")]
mod seller_hardening;
#[cfg(feature = "seller-server")]
mod seller_metrics;
#[cfg(feature = "seller-server")]
mod seller_scale;
#[cfg(feature = "seller-server")]
mod seller_server;
mod socket;
mod toolchain;
mod upstream;
mod usage;
#[cfg(feature = "seller-server")]
mod usage_relay;
