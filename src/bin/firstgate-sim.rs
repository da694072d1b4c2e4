//! `firstgate-sim`: the simulators as a standalone program, for manual testing and benchmarks
//! against a gateway started with `firstgate serve`.

use clap::{Parser, Subcommand};
use firstgate::sim::globus::{GlobusSim, Seed};
use firstgate::sim::vllm::{VllmSim, VllmSimConfig};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "firstgate-sim",
    version,
    about = "Simulators of vLLM and Globus for firstgate"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// A vLLM OpenAI-compatible server (`vllm serve`) that generates `tok0 tok1 …`.
    Vllm {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:8000")]
        listen: SocketAddr,
        /// A generative model to serve (repeatable).
        #[arg(long = "model")]
        models: Vec<String>,
        /// An embedding model to serve (repeatable).
        #[arg(long = "embedding-model")]
        embedding_models: Vec<String>,
        /// Require this bearer key, like `vllm serve --api-key`.
        #[arg(long, env = "VLLM_API_KEY")]
        api_key: Option<String>,
        /// Time to the first token, in milliseconds.
        #[arg(long, default_value_t = 50)]
        ttft_ms: u64,
        /// Time between tokens, in milliseconds.
        #[arg(long, default_value_t = 20)]
        itl_ms: u64,
        /// Prefill time per prompt token not found in the prefix cache, in microseconds
        /// (added to the time to first token; prefills are computed one after another, and
        /// those not started are reported as vLLM's waiting requests).
        #[arg(long, default_value_t = 0)]
        prefill_us_per_token: u64,
        /// KV-cache blocks of 16 tokens the prefix cache holds (0: no prefix caching).
        #[arg(long, default_value_t = 4096)]
        prefix_cache_blocks: usize,
        /// Seconds a kept-alive connection may wait for its next request before it is closed
        /// (vLLM's `VLLM_HTTP_TIMEOUT_KEEP_ALIVE`).
        #[arg(long, env = "VLLM_HTTP_TIMEOUT_KEEP_ALIVE", default_value_t = 5,
              value_parser = clap::value_parser!(u64).range(1..))]
        timeout_keep_alive: u64,
    },
    /// Globus Auth (introspection, token grants) and Groups (`my_groups`) on one port; set it
    /// as both `auth.globus.auth_url` and `groups_url`.
    Globus {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:18100")]
        listen: SocketAddr,
        /// Clients, groups and users with their tokens.
        #[arg(long, default_value = "conf/demo-users.yaml")]
        users: PathBuf,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Vllm {
            listen,
            models,
            embedding_models,
            api_key,
            ttft_ms,
            itl_ms,
            prefill_us_per_token,
            prefix_cache_blocks,
            timeout_keep_alive,
        } => {
            if models.is_empty() && embedding_models.is_empty() {
                anyhow::bail!("name at least one --model or --embedding-model to serve");
            }
            let cfg = VllmSimConfig {
                name: format!("vllm-sim {listen}"),
                models,
                embedding_models,
                api_key,
                ttft: Duration::from_millis(ttft_ms),
                itl: Duration::from_millis(itl_ms),
                prefill_per_token: Duration::from_micros(prefill_us_per_token),
                prefix_cache_blocks,
                keep_alive: Duration::from_secs(timeout_keep_alive),
                ..VllmSimConfig::default()
            };
            let sim = VllmSim::start(listen, cfg)
                .await
                .map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}"))?;
            eprintln!("simulated vLLM listening on http://{}", sim.addr());
            tokio::signal::ctrl_c().await?;
            sim.shutdown().await;
        }
        Command::Globus { listen, users } => {
            let seed = Seed::from_file(&users)?;
            let sim = GlobusSim::start(listen, seed)
                .await
                .map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}"))?;
            eprintln!("Globus stand-in listening on {}", sim.url());
            tokio::signal::ctrl_c().await?;
        }
    }
    Ok(())
}
