//! `olmo-train`: the OLMo trainer (issue 6). Not implemented yet; the binary says so instead of
//! pretending to train.

use std::process::ExitCode;

fn main() -> ExitCode {
    eprintln!(
        "olmo-train is not implemented yet in this build (see the trainer issue); nothing was run"
    );
    ExitCode::from(2)
}
