//! End-to-end tests: each starts the real `kooagent` binary and talks to it as a client
//! would. Modules by capability.
mod harness;

mod agent_metrics;
mod authcode;
mod authcode_agent;
mod cached;
mod console_browser;
mod crash;
mod crash_model;
mod crash_trace;
mod daemon;
mod device;
mod docs;
mod freeze;
mod guide;
mod image_prep;
mod license;
mod online;
mod relay;
mod sdk;
mod seller_call;
mod seller_console;
mod seller_console_pages;
mod seller_hardening;
mod seller_metrics;
mod seller_scale;
mod seller_server;
mod socket;
mod toolchain;
mod tpm;
mod upstream;
mod usage;
mod usage_relay;
mod webdriver;
