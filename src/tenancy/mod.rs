//! Tenancy: organization → project → environment. An environment is the unit every
//! row and query is scoped to, and owns the secret key callers authenticate with.

pub mod keys;
pub mod rotation;
pub mod store;

use std::fmt;

use uuid::Uuid;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnvType {
    Dev,
    Staging,
    Prod,
}

impl EnvType {
    pub fn as_str(self) -> &'static str {
        match self {
            EnvType::Dev => "dev",
            EnvType::Staging => "staging",
            EnvType::Prod => "prod",
        }
    }

    /// Prefix of this environment type's secret keys.
    pub fn key_prefix(self) -> &'static str {
        match self {
            EnvType::Dev => "tr_dev_",
            EnvType::Staging => "tr_stg_",
            EnvType::Prod => "tr_prod_",
        }
    }

    pub fn parse(s: &str) -> Option<EnvType> {
        match s {
            "dev" | "development" => Some(EnvType::Dev),
            "staging" | "stg" => Some(EnvType::Staging),
            "prod" | "production" => Some(EnvType::Prod),
            _ => None,
        }
    }
}

impl fmt::Display for EnvType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A secret that never prints itself.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretKey(String);

impl SecretKey {
    pub fn new(value: String) -> Self {
        SecretKey(value)
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretKey(…)")
    }
}

/// An authenticated environment, with its secret unsealed (needed to verify and
/// mint HS256 tokens).
#[derive(Debug, Clone)]
pub struct Environment {
    pub id: Uuid,
    pub organization_id: Uuid,
    pub project_id: Uuid,
    pub env_type: EnvType,
    pub secret_key: SecretKey,
}
