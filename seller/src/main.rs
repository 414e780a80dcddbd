/// mimalloc instead of glibc's malloc: the server allocates per request (hyper, rustls,
/// JSON, SQLite rows) from two workers and the database thread, and glibc's allocator
/// took 14% of its CPU per order in a profile of the seller_serve bench. Only this
/// binary: the agent and the libraries keep the system allocator.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    kooagent_seller::cli::main()
}
