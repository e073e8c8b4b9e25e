//! `hw-sim`: serve a simulated site, or drive one (`ctl`).

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use hw_sim::Sim;
use hw_sim::config::SiteFile;
use std::path::PathBuf;
use std::process::ExitCode;

mod ctl;

/// A simulated self-storage site: OSDP keypads, Modbus relay boards, a smart-lock API.
#[derive(Parser)]
#[command(name = "hw-sim", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start every device of a site file and the control API.
    Serve {
        /// Site file.
        #[arg(long, short, default_value = "config/sim.toml")]
        config: PathBuf,
        /// Control API address (default: the file's sim.control_listen).
        #[arg(long)]
        listen: Option<String>,
    },
    /// Drive a running simulator through its control API.
    Ctl(ctl::CtlArgs),
}

#[tokio::main]
async fn main() -> Result<ExitCode> {
    let cli = Cli::parse();
    // ctl's output is its results: keep library logs to warnings unless RUST_LOG says otherwise.
    let default_level = match cli.command {
        Cmd::Ctl(_) => "warn",
        _ => "info",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| default_level.into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Cmd::Ctl(args) => Ok(ctl::run(args).await),
        Cmd::Serve { config, listen } => {
            let site = SiteFile::load(&config)?;
            let sim = Sim::start(&site, listen.as_deref())
                .await
                .context("starting the site")?;
            println!("hw-sim: control API {}", sim.control_url());
            if let Some(l) = &sim.registry.locks {
                let a = l.address();
                let key = match (a["api_key"].as_str(), a["api_key_file"].as_str()) {
                    (Some(k), _) => format!("API key {k}"),
                    (None, Some(f)) => format!("API key from {f}"),
                    (None, None) => String::new(),
                };
                println!(
                    "hw-sim: lock API {} at {} ({key})",
                    l.id(),
                    a["url"].as_str().unwrap_or("?")
                );
            }
            tokio::signal::ctrl_c().await?;
            sim.stop().await;
            Ok(ExitCode::SUCCESS)
        }
    }
}
