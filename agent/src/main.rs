use clap::Parser;

fn main() -> std::process::ExitCode {
    std::process::ExitCode::from(lifeboat_agent::main_with(lifeboat_agent::Cli::parse()))
}
