//! The command line: `orproxy [serve]` and `orproxy check`. Each flag's doc comment is its help.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config::LogFormat;

/// orproxy: a routing daemon for LLM traffic.
///
/// With no config and no keys it serves the built-in `mock` backend on 127.0.0.1:8000.
/// Exit codes: 0 ok; 1 invalid config or a runtime failure; 2 usage error.
#[derive(Debug, Parser)]
#[command(name = "orproxy", version, args_conflicts_with_subcommands = true)]
pub struct Cli {
    /// What to do (default: serve).
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Flags of `serve`, accepted without the subcommand.
    #[command(flatten)]
    pub serve: ServeArgs,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon (the default).
    Serve(ServeArgs),
    /// Validate the config without binding ports; print every error as file:line:col: message.
    Check(CheckArgs),
}

/// Flags of `orproxy serve`; each wins over its config key.
#[derive(Debug, Clone, Default, Args)]
pub struct ServeArgs {
    /// Main config file [default: /etc/orproxy/config.yaml if it exists, else built-in defaults].
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Watched directory of *.rhai and *.yaml [default: rules_dir from config, else /etc/orproxy/rules if it exists].
    #[arg(long, value_name = "DIR")]
    pub rules_dir: Option<PathBuf>,
    /// Client API address [default: 127.0.0.1:8000].
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// Admin API address [default: 127.0.0.1:8001].
    #[arg(long, value_name = "ADDR")]
    pub admin_listen: Option<String>,
    /// Backend used when a model names none [default: openrouter if OPENROUTER_API_KEY is set, else mock].
    #[arg(long, value_name = "NAME")]
    pub default_backend: Option<String>,
    /// Replace every request's model by MODEL (selector syntax: [backend:]model).
    #[arg(long, value_name = "MODEL")]
    pub force_model: Option<String>,
    /// Log line format [default: text on a terminal, json otherwise].
    #[arg(long, value_enum, value_name = "FORMAT")]
    pub log_format: Option<LogFormat>,
}

/// Flags of `orproxy check`.
#[derive(Debug, Clone, Args)]
pub struct CheckArgs {
    /// Config file to check [default: /etc/orproxy/config.yaml if it exists].
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Rules directory to check with it [default: rules_dir from config, else /etc/orproxy/rules if it exists].
    #[arg(long, value_name = "DIR")]
    pub rules_dir: Option<PathBuf>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn serve_is_the_default_command() {
        let cli = Cli::try_parse_from(["orproxy", "--listen", "127.0.0.1:0"]).unwrap();
        assert!(cli.command.is_none());
        assert_eq!(cli.serve.listen.as_deref(), Some("127.0.0.1:0"));
        let cli = Cli::try_parse_from(["orproxy", "serve", "--force-model", "mock:x"]).unwrap();
        assert!(
            matches!(cli.command, Some(Command::Serve(a)) if a.force_model.as_deref() == Some("mock:x"))
        );
        assert!(Cli::try_parse_from(["orproxy", "--bogus"]).is_err());
    }
}
