//! `hw-sim`: serve a simulated site, or drive one (`ctl`).

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use hw_sim::Sim;
use hw_sim::config::SiteFile;
use std::path::PathBuf;

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
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Cmd::Serve { config, listen } => {
            let site = SiteFile::load(&config)?;
            let sim = Sim::start(&site, listen.as_deref())
                .await
                .context("starting the site")?;
            println!("hw-sim: control API {}", sim.control_url());
            tokio::signal::ctrl_c().await?;
            sim.stop().await;
            Ok(())
        }
    }
}
