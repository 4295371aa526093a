//! `init`: writes the commented example config (every key with its default) to the config path.

use anyhow::{Context as _, Result};

use super::Context;
use crate::cli::InitArgs;
use crate::error::ExitStatus;
use crate::settings;

/// The same text as `config.example.toml` in the repository.
pub const EXAMPLE_CONFIG: &str = include_str!("../../config.example.toml");

pub fn run(ctx: &Context, args: InitArgs) -> Result<ExitStatus> {
    let path = match &ctx.settings.config_path {
        Some(path) => path.clone(),
        None => settings::default_config_path(&settings::ProcessEnv)
            .context("neither XDG_CONFIG_HOME nor HOME is set: pass --config FILE")?,
    };
    if path.exists() && !args.force {
        return Err(crate::error::UsageError::new(format!(
            "{} already exists: edit it, or pass --force to overwrite it",
            path.display()
        ))
        .into());
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(&path, EXAMPLE_CONFIG).with_context(|| format!("writing {}", path.display()))?;
    ctx.printer.result(&serde_json::json!({ "config_path": path }), || format!("wrote {}", path.display()));
    Ok(ExitStatus::Success)
}
