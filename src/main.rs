//! `quickim`: one binary, four roles. Parses the command line, loads the configuration,
//! starts telemetry and hands over to [`roles`].

/// mimalloc instead of the C library's allocator: a send allocates on one runtime thread and
/// frees on another, which glibc's per-thread arenas pay for in locking and consolidation
/// (docs/benchmarks.md has what it saves per send and costs per idle connection).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod ops;
mod roles;

use clap::{Parser, Subcommand};
use quickim_shared::config::{Config, ConfigArgs, Role};

/// quickim — realtime message gateway (WebSocket, SSE, long-poll) with conversations, members
/// and lossless resume.
///
/// With no role, runs standalone: gateway + conversation service + message service in one
/// process, SQLite in the data directory, nothing else to install. The distributed roles talk
/// over NATS and store in PostgreSQL; run any number of each.
///
/// Every flag can also be set with its QUICKIM_* environment variable or in the TOML file
/// given by --config (flags win over the environment, which wins over the file).
#[derive(Parser)]
#[command(name = "quickim", version, verbatim_doc_comment)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    config: ConfigArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Everything in one process: SQLite file + in-process bus (the default)
    Standalone,
    /// Public API, /inner API and /notify; needs nats_url, jwt_secret, inner_key
    Gateway,
    /// Conversation service; needs nats_url and database_url (PostgreSQL)
    Conversation,
    /// Message service; needs nats_url and database_url (PostgreSQL)
    Message,
    /// Print the OpenAPI document of the HTTP API and exit
    Openapi,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let role = match cli.command {
        Some(Command::Openapi) => {
            #[allow(clippy::print_stdout)]
            {
                println!("{}", quickim_gateway::http::openapi::document_json());
            }
            return std::process::ExitCode::SUCCESS;
        }
        None | Some(Command::Standalone) => Role::Standalone,
        Some(Command::Gateway) => Role::Gateway,
        Some(Command::Conversation) => Role::Conversation,
        Some(Command::Message) => Role::Message,
    };
    let config = match Config::load(&cli.config, role) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("quickim: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("quickim: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(roles::run(role, config)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("quickim: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
