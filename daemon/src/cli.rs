//! The command line: `orproxy [serve]` and `orproxy check`. Each flag's doc comment is its help.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use orproxy_ledger::GroupBy;

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
    /// Show the route of a request (JSON from FILE or stdin) and what each rule changed; nothing is sent.
    Explain(ExplainArgs),
    /// Rule scripts: `orproxy rules test [DIR]`.
    #[command(subcommand)]
    Rules(RulesCommand),
    /// Cost report from the usage database, offline: requests, errors, tokens, cost, latency per group.
    Report(ReportArgs),
}

/// Flags of `orproxy report`.
#[derive(Debug, Clone, Args)]
pub struct ReportArgs {
    /// Usage database [default: database.path from the config, else $STATE_DIRECTORY/usage.db, else ./orproxy-data/usage.db, else the service's /var/lib/orproxy/usage.db].
    #[arg(long, value_name = "PATH")]
    pub db: Option<PathBuf>,
    /// Config file naming the database [default: /etc/orproxy/config.yaml if it exists].
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Start (YYYY-MM-DD, YYYY-MM-DDTHH:MM:SSZ or Unix seconds; UTC) [default: the beginning].
    #[arg(long, value_name = "TIME", value_parser = crate::report::parse_time)]
    pub from: Option<i64>,
    /// End, exclusive [default: none, rows dated later too].
    #[arg(long, value_name = "TIME", value_parser = crate::report::parse_time)]
    pub to: Option<i64>,
    /// model, backend, key, day or tag:NAME.
    #[arg(long, value_name = "GROUP", default_value = "model", value_parser = GroupBy::parse)]
    pub group_by: GroupBy,
    /// Output format.
    #[arg(long, value_enum, default_value = "table")]
    pub format: ReportFormat,
}

/// Output of `orproxy report`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ReportFormat {
    /// Aligned columns.
    Table,
    /// RFC 4180 CSV.
    Csv,
    /// One JSON document.
    Json,
}

/// `orproxy rules ...`.
#[derive(Debug, Subcommand)]
pub enum RulesCommand {
    /// Run the *.test.yaml cases beside the scripts; print a diff for each failure, exit 1 on any.
    Test(RulesTestArgs),
}

/// Flags of `orproxy rules test`.
#[derive(Debug, Clone, Args)]
pub struct RulesTestArgs {
    /// Directory of scripts and *.test.yaml cases [default: the rules directory].
    #[arg(value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// Config file giving the backends and aliases the cases route through.
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
}

/// Flags of `orproxy explain`.
#[derive(Debug, Clone, Args)]
pub struct ExplainArgs {
    /// The request body (JSON); `-` or nothing reads stdin.
    #[arg(value_name = "FILE")]
    pub file: Option<PathBuf>,
    /// Config file [default: /etc/orproxy/config.yaml if it exists].
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Rules directory [default: rules_dir from config, else /etc/orproxy/rules if it exists].
    #[arg(long, value_name = "DIR")]
    pub rules_dir: Option<PathBuf>,
    /// The proxy key name the request comes with.
    #[arg(long, value_name = "NAME")]
    pub key: Option<String>,
}

/// Flags of `orproxy serve`; each wins over its config key.
///
/// These doc comments are the single definition of the flags: `--help` prints them and the
/// README's flag table is generated from them (a test fails when the two drift apart).
#[derive(Debug, Clone, Default, Args)]
pub struct ServeArgs {
    /// Main config file [default: /etc/orproxy/config.yaml if it exists, else built-in defaults]
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Watched directory of *.rhai and *.yaml [default: rules_dir from config, else /etc/orproxy/rules if it exists]
    #[arg(long, value_name = "DIR")]
    pub rules_dir: Option<PathBuf>,
    /// Client API address [default: 127.0.0.1:8000]
    #[arg(long, value_name = "ADDR", value_parser = address)]
    pub listen: Option<String>,
    /// Admin API and /metrics address [default: 127.0.0.1:8001]
    #[arg(long, value_name = "ADDR", value_parser = address)]
    pub admin_listen: Option<String>,
    /// Backend used when a model names none [default: openrouter if OPENROUTER_API_KEY is set, else mock]
    #[arg(long, value_name = "NAME")]
    pub default_backend: Option<String>,
    /// Every request's model is replaced by MODEL (full selector syntax)
    #[arg(long, value_name = "MODEL", value_parser = model_selector)]
    pub force_model: Option<String>,
    /// Usage database [default: $STATE_DIRECTORY/usage.db, else ./orproxy-data/usage.db]
    #[arg(long, value_name = "PATH")]
    pub db: Option<PathBuf>,
    /// Log line format [default: text on a terminal, json otherwise]
    #[arg(
        long,
        value_enum,
        value_name = "text|json",
        hide_possible_values = true
    )]
    pub log_format: Option<LogFormat>,
}

/// Checks an `IP:PORT` flag value, so that a bad one is a usage error (exit 2).
fn address(text: &str) -> Result<String, String> {
    text.parse::<std::net::SocketAddr>()
        .map(|_| text.to_owned())
        .map_err(|_| format!("`{text}` is not an address (expected IP:PORT, e.g. 127.0.0.1:8000)"))
}

/// Checks a model selector flag value, so that a bad one is a usage error (exit 2).
fn model_selector(text: &str) -> Result<String, String> {
    crate::selector::parse_chain(text)
        .map(|_| text.to_owned())
        .map_err(|e| e.to_string())
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

    /// The README's flag table, generated from the flags' own help.
    fn flag_table() -> String {
        let mut table = String::from("| flag | meaning | default |\n|---|---|---|\n");
        let cli = Cli::command();
        let serve = cli.find_subcommand("serve").expect("serve exists");
        for arg in serve.get_arguments().filter(|a| a.get_long().is_some()) {
            let long = arg.get_long().unwrap_or_default();
            if long == "help" {
                continue;
            }
            let value = arg
                .get_value_names()
                .map(|v| format!(" {}", v[0]))
                .unwrap_or_default();
            let help = arg.get_help().map(ToString::to_string).unwrap_or_default();
            let (meaning, default) = match help.split_once(" [default: ") {
                Some((meaning, default)) => {
                    (meaning.to_owned(), default.trim_end_matches(']').to_owned())
                }
                None => (help, "none".to_owned()),
            };
            let flag = format!("--{long}{value}").replace('|', "\\|");
            table.push_str(&format!("| `{flag}` | {meaning} | {default} |\n"));
        }
        table
    }

    #[test]
    fn the_readme_flag_table_is_generated_from_the_help() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md");
        let readme = std::fs::read_to_string(&path).unwrap();
        let (begin, end) = ("<!-- flags:begin -->\n", "<!-- flags:end -->");
        let start = readme.find(begin).expect("README has a flags:begin marker") + begin.len();
        let stop = readme.find(end).expect("README has a flags:end marker");
        let expected = flag_table();
        if std::env::var_os("UPDATE_README").is_some() {
            std::fs::write(
                &path,
                format!("{}{expected}{}", &readme[..start], &readme[stop..]),
            )
            .unwrap();
            return;
        }
        assert!(
            readme[start..stop] == expected,
            "README flag table is stale: run `UPDATE_README=1 cargo test -p orproxy --lib cli`\n{expected}"
        );
    }

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

    #[test]
    fn bad_report_values_are_usage_errors() {
        for args in [
            ["--group-by", "nope"],
            ["--format", "xml"],
            ["--from", "2026-02-30"],
            ["--to", "yesterday"],
        ] {
            let error =
                Cli::try_parse_from(["orproxy", "report"].into_iter().chain(args)).unwrap_err();
            assert_eq!(error.exit_code(), 2, "{args:?}");
            assert!(error.to_string().contains(args[1]), "{error}");
        }
        let cli = Cli::try_parse_from(["orproxy", "report", "--from", "2026-02-28"]).unwrap();
        let Some(Command::Report(args)) = cli.command else {
            panic!("not a report");
        };
        assert_eq!(args.from, Some(1_772_236_800_000));
        assert_eq!(args.group_by, GroupBy::Model);
    }

    #[test]
    fn bad_flag_values_are_usage_errors() {
        for args in [
            ["--listen", "nonsense"],
            ["--listen", "127.0.0.1:99999"],
            ["--admin-listen", "bad"],
            ["--force-model", "mock:x?temperature=7"],
            ["--force-model", "mock:"],
        ] {
            let error = Cli::try_parse_from(["orproxy"].into_iter().chain(args))
                .err()
                .unwrap_or_else(|| panic!("{args:?} accepted"));
            assert_eq!(error.exit_code(), 2, "{args:?}");
            assert_eq!(error.kind(), clap::error::ErrorKind::ValueValidation);
        }
        let cli = Cli::try_parse_from([
            "orproxy",
            "serve",
            "--admin-listen",
            "[::1]:0",
            "--force-model",
            "mock:x?temperature=0.5|mock:y",
        ])
        .unwrap();
        let Some(Command::Serve(args)) = cli.command else {
            panic!("serve")
        };
        assert_eq!(args.admin_listen.as_deref(), Some("[::1]:0"));
    }
}
