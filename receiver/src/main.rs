use clap::Parser;

fn main() -> std::process::ExitCode {
    std::process::ExitCode::from(lifeboat_receiver::run(lifeboat_receiver::Cli::parse()))
}
