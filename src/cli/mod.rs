//! The binary's command bodies, outside the library: one module a command (`run`,
//! `check-config`, `healthcheck`, the tools `emulate`/`receive`/`demo`), the process-wide
//! pieces they share (logging, signals) and the runtime each async command runs on.
//!
//! `src/main.rs` parses the arguments and calls one of the functions re-exported here; each
//! returns the process's exit code.

mod check;
mod demo;
mod healthcheck;
mod logging;
mod run;
mod signals;
mod tools;

use std::future::Future;
use std::process::ExitCode;

pub use check::check_config;
pub use demo::DemoOptions;
pub use healthcheck::healthcheck;
pub use run::run;
pub use tools::{demo, emulate, receive};

/// Run a command that succeeds or fails on a multi-thread runtime: exit 0, or its error on one
/// line and exit 1.
fn runtime(command: impl Future<Output = anyhow::Result<()>>) -> ExitCode {
    block_on(async { command.await.map(|()| ExitCode::SUCCESS) })
}

/// Run a command that chooses its exit code; an error is printed on one line, exit 1.
fn block_on(command: impl Future<Output = anyhow::Result<ExitCode>>) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cfq-relay: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(command) {
        Ok(code) => code,
        Err(e) => {
            // `{:#}` prints the context chain on one line, without a backtrace.
            eprintln!("cfq-relay: {e:#}");
            ExitCode::FAILURE
        }
    }
}
