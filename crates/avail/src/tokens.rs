//! `avail token create|list|revoke`: join tokens for new nodes.

use avail_client::Client;
use avail_model::token::{JoinTokenCreated, JoinTokenInfo, JoinTokenRequest};
use clap::Subcommand;

use crate::cli::{CliError, Format};
use crate::output;

/// Join token commands.
#[derive(Subcommand, Debug)]
pub enum TokenCmd {
    /// Create a join token; its secret is printed once.
    Create {
        /// Life, seconds, or with a unit: `90s`, `30m`, `1h`, `7d`.
        #[arg(long, default_value = "1h")]
        ttl: String,
        /// How many nodes may join with it.
        #[arg(long, default_value_t = 1)]
        uses: u32,
        /// What it is for.
        #[arg(long, default_value = "")]
        description: String,
    },
    /// List join tokens (no secrets).
    List,
    /// Revoke a join token by id.
    Revoke {
        /// Its id (`avail token list`).
        id: String,
    },
}

/// Seconds of `90s`, `30m`, `1h`, `7d` or a bare number of seconds.
pub fn parse_duration_s(s: &str) -> Result<u64, String> {
    let (num, unit) = match s.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 90s, 30m, 1h or 7d"))?;
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("{s:?}: the unit is one of s, m, h, d")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too long"))
}

/// Run a token command.
pub async fn run(c: &Client, cmd: TokenCmd, fmt: Format) -> Result<(), CliError> {
    match cmd {
        TokenCmd::Create {
            ttl,
            uses,
            description,
        } => {
            let ttl_s =
                parse_duration_s(&ttl).map_err(|e| CliError::invalid(format!("--ttl: {e}")))?;
            let req = JoinTokenRequest {
                ttl_s,
                uses,
                description,
            };
            let t: JoinTokenCreated = c.post("/v1/tokens", &req).await?;
            match fmt {
                Format::Json => output::json(&t),
                Format::Table => println!("{}", t.token),
            }
        }
        TokenCmd::List => {
            let list: Vec<JoinTokenInfo> = c.get("/v1/tokens").await?;
            match fmt {
                Format::Json => output::json(&list),
                Format::Table => {
                    let now = avail_server::now_ms();
                    let rows = list
                        .iter()
                        .map(|t| {
                            vec![
                                t.id.clone(),
                                t.uses_left.to_string(),
                                t.used.to_string(),
                                if t.expires_ms <= now {
                                    "expired".into()
                                } else {
                                    format!("in {}", output::age(t.expires_ms, now))
                                },
                                t.nodes.join(","),
                                t.description.clone(),
                            ]
                        })
                        .collect::<Vec<_>>();
                    output::table(
                        &["ID", "USES LEFT", "USED", "EXPIRES", "NODES", "DESCRIPTION"],
                        &rows,
                    );
                }
            }
        }
        TokenCmd::Revoke { id } => {
            let d: avail_model::api::Deleted = c.delete(&format!("/v1/tokens/{id}")).await?;
            match fmt {
                Format::Json => output::json(&d),
                Format::Table => println!("join token {id} revoked"),
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration_s("90"), Ok(90));
        assert_eq!(parse_duration_s("30m"), Ok(1800));
        assert_eq!(parse_duration_s("1h"), Ok(3600));
        assert_eq!(parse_duration_s("7d"), Ok(604_800));
        assert!(parse_duration_s("1y").is_err());
        assert!(parse_duration_s("h").is_err());
    }
}
