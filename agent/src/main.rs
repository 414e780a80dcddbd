//! The `kooagent` binary: the daemon (`run`), its CLI (a client of the socket), and the
//! tools that work without a daemon (`id`, `config show`, `bench`).

use std::process::ExitCode;

fn main() -> ExitCode {
    kooagent::cli::main()
}
