fn main() -> std::process::ExitCode {
    trustwire::cli::main_with_args(std::env::args_os())
}
