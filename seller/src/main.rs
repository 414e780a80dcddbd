fn main() -> std::process::ExitCode {
    kooagent_seller::cli::main()
}
