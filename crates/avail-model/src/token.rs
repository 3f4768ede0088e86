//! Join tokens: what an administrator hands to a new node so that it may join once
//! (or a few times), for a while. The secret is shown once, at creation; the server
//! keeps only its hash.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::ValidationError;

/// Shortest and longest life of a join token, seconds (one minute to thirty days).
pub const TOKEN_TTL_RANGE_S: std::ops::RangeInclusive<u64> = 60..=30 * 24 * 3600;
/// Most joins one token allows.
pub const MAX_TOKEN_USES: u32 = 1000;

/// Create a join token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JoinTokenRequest {
    /// Life, seconds (60 to 2,592,000; default one hour).
    #[serde(default = "default_ttl_s")]
    pub ttl_s: u64,
    /// How many joins it allows (1 to 1,000; default 1).
    #[serde(default = "default_uses")]
    pub uses: u32,
    /// What it is for (at most 200 characters).
    #[serde(default)]
    pub description: String,
}

fn default_ttl_s() -> u64 {
    3600
}
fn default_uses() -> u32 {
    1
}

impl JoinTokenRequest {
    /// Check the fields; the error names the field.
    pub fn validate(&self) -> Result<(), ValidationError> {
        if !TOKEN_TTL_RANGE_S.contains(&self.ttl_s) {
            return Err(ValidationError::new(
                "ttl_s",
                format!(
                    "{} is out of range {}..={}",
                    self.ttl_s,
                    TOKEN_TTL_RANGE_S.start(),
                    TOKEN_TTL_RANGE_S.end()
                ),
            ));
        }
        if !(1..=MAX_TOKEN_USES).contains(&self.uses) {
            return Err(ValidationError::new(
                "uses",
                format!("{} is out of range 1..={MAX_TOKEN_USES}", self.uses),
            ));
        }
        if self.description.chars().count() > 200 || self.description.chars().any(char::is_control)
        {
            return Err(ValidationError::new(
                "description",
                "at most 200 printable characters",
            ));
        }
        Ok(())
    }
}

/// A token just created: the only time its secret is shown.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct JoinTokenCreated {
    /// The token to give the agent (`avj.<id>.<secret>`).
    pub token: String,
    /// What it looks like in lists.
    pub info: JoinTokenInfo,
}

/// A join token as listed (no secret).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct JoinTokenInfo {
    /// Its id (the public part of the token).
    pub id: String,
    /// What it is for.
    pub description: String,
    /// Created, ms since the Unix epoch.
    pub created_ms: u64,
    /// Expires, ms since the Unix epoch.
    pub expires_ms: u64,
    /// Joins left.
    pub uses_left: u32,
    /// Joins made with it.
    pub used: u32,
    /// The nodes that joined with it.
    #[serde(default)]
    pub nodes: Vec<String>,
}
