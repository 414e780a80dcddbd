//! `kooagent-install`: installs the agent, its config and its boot integration.
//! The full installer is tracked by its own issue; this placeholder only reports that.

fn main() {
    eprintln!("kooagent-install: not implemented yet (see the installer issue)");
    std::process::exit(2);
}
