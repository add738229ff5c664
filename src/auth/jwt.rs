//! HS256 tokens: verification of caller tokens and minting of session tokens.
//!
//! The algorithm is pinned (no `none`, no asymmetric confusion), issuer and
//! audience are the Trigger.dev values the official SDK uses, and `exp` is required.

use base64::Engine;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::tenancy::SecretKey;

pub const ISSUER: &str = "https://id.trigger.dev";
pub const AUDIENCE: &str = "https://api.trigger.dev";
/// Session tokens minted at create live this long.
pub const SESSION_TOKEN_TTL_SECS: i64 = 3600;
/// Upper bound on clock leeway, whatever the configuration says.
pub const MAX_LEEWAY_SECS: u64 = 60;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    #[serde(default, rename = "pub")]
    pub public: bool,
    #[serde(default)]
    pub scopes: Vec<String>,
    pub exp: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<i64>,
    /// Not before: minted tokens carry their `iat` here, so a process whose
    /// clock runs behind the minter's by more than the leeway refuses them
    /// by name ("not yet valid") instead of the skew going unnoticed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<i64>,
    #[serde(default)]
    pub iss: String,
    #[serde(default)]
    pub aud: serde_json::Value,
    /// The run whose token minted this one (`POST /api/v1/auth/public-tokens`
    /// or a channel's initialize): the minted token writes `.out` as that run,
    /// so the run's hand-off fences it as it fences the run's own token. An
    /// extra claim: the official client ignores claims it does not know.
    #[serde(default, rename = "mintedBy", skip_serializing_if = "Option::is_none")]
    pub minted_by: Option<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("malformed token")]
    Malformed,
    #[error("invalid token: {0}")]
    Invalid(String),
    #[error("not a public token")]
    NotPublic,
    /// Genuine (its signature verified) but past `exp` by more than the leeway.
    #[error("token expired {0} s ago by this server's clock")]
    Expired(i64),
    /// Genuine but its `nbf` is more than the leeway ahead of this server's
    /// clock: the minter's clock runs ahead of ours.
    #[error("token not valid for another {0} s by this server's clock")]
    NotYetValid(i64),
}

/// Reads `sub` without verifying anything, to find which environment's key
/// verifies the token. Nothing read here is trusted until [`verify`] passes.
pub fn unverified_subject(token: &str) -> Result<Uuid, TokenError> {
    let mut parts = token.split('.');
    let (Some(_), Some(payload), Some(_), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err(TokenError::Malformed);
    };
    #[derive(Deserialize)]
    struct Sub {
        sub: String,
    }
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .map_err(|_| TokenError::Malformed)?;
    let sub: Sub = serde_json::from_slice(&bytes).map_err(|_| TokenError::Malformed)?;
    Uuid::parse_str(&sub.sub).map_err(|_| TokenError::Malformed)
}

pub fn verify(token: &str, key: &SecretKey, leeway_secs: u64) -> Result<Claims, TokenError> {
    let mut validation = Validation::new(Algorithm::HS256);
    validation.set_issuer(&[ISSUER]);
    validation.set_audience(&[AUDIENCE]);
    validation.set_required_spec_claims(&["exp", "sub", "iss", "aud"]);
    // Time is judged below, by this process's clock (see `crate::clock`);
    // the library would read the system clock itself.
    validation.validate_exp = false;
    validation.validate_nbf = false;
    let data = jsonwebtoken::decode::<Claims>(token, &DecodingKey::from_secret(key.expose().as_bytes()), &validation)
        .map_err(|e| TokenError::Invalid(e.to_string()))?;
    let claims = data.claims;
    let (now, leeway) = (crate::clock::now().timestamp(), leeway_secs.min(MAX_LEEWAY_SECS) as i64);
    if claims.exp < now - leeway {
        return Err(TokenError::Expired(now - claims.exp));
    }
    if let Some(nbf) = claims.nbf.filter(|nbf| *nbf > now + leeway) {
        return Err(TokenError::NotYetValid(nbf - now));
    }
    if !claims.public {
        return Err(TokenError::NotPublic);
    }
    Ok(claims)
}

/// Mints a public token for `env_id` carrying `scopes`, valid for `ttl_secs`.
pub fn mint(env_id: Uuid, key: &SecretKey, scopes: Vec<String>, ttl_secs: i64) -> String {
    mint_by(env_id, key, scopes, ttl_secs, None)
}

/// [`mint`] on behalf of the caller: `minted_by` is the run whose token asked
/// (None for a secret key), carried as the token's `mintedBy` claim.
pub fn mint_by(env_id: Uuid, key: &SecretKey, scopes: Vec<String>, ttl_secs: i64, minted_by: Option<&str>) -> String {
    let now = crate::clock::now().timestamp();
    let claims = Claims {
        sub: env_id.to_string(),
        public: true,
        scopes,
        exp: now + ttl_secs,
        iat: Some(now),
        nbf: Some(now),
        iss: ISSUER.into(),
        aud: serde_json::Value::String(AUDIENCE.into()),
        minted_by: minted_by.map(String::from),
    };
    // HS256 signing of a serialisable struct cannot fail.
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(key.expose().as_bytes()))
        .unwrap_or_default()
}

/// The token handed out with a session: read and write on that session only.
pub fn mint_session_token(env_id: Uuid, key: &SecretKey, session_key: &str) -> String {
    mint(
        env_id,
        key,
        vec![format!("read:sessions:{session_key}"), format!("write:sessions:{session_key}")],
        SESSION_TOKEN_TTL_SECS,
    )
}

/// How long the token handed to a worker with a run lives.
pub const RUN_TOKEN_TTL_SECS: i64 = 6 * 3600;

/// The token a worker gets with a run: that run, and its session's channels.
pub fn mint_run_token(
    env_id: Uuid,
    key: &SecretKey,
    run_friendly_id: &str,
    session_friendly_id: Option<&str>,
) -> String {
    let mut scopes = vec![format!("read:runs:{run_friendly_id}"), format!("write:runs:{run_friendly_id}")];
    if let Some(s) = session_friendly_id {
        scopes.push(format!("read:sessions:{s}"));
        scopes.push(format!("write:sessions:{s}"));
    }
    mint(env_id, key, scopes, RUN_TOKEN_TTL_SECS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> SecretKey {
        SecretKey::new("tr_dev_testkey".into())
    }

    #[test]
    fn minted_tokens_verify() {
        let env = Uuid::new_v4();
        let t = mint_session_token(env, &key(), "chat-1");
        assert_eq!(unverified_subject(&t).unwrap(), env);
        let c = verify(&t, &key(), 30).unwrap();
        assert_eq!(c.scopes, vec!["read:sessions:chat-1", "write:sessions:chat-1"]);
        assert!(verify(&t, &SecretKey::new("tr_dev_other".into()), 30).is_err());
    }

    #[test]
    fn a_token_minted_by_a_run_names_it_and_others_carry_no_claim() {
        let env = Uuid::new_v4();
        let by_run = mint_by(env, &key(), vec!["read:sessions:chat-1".into()], 60, Some("run_1"));
        assert_eq!(verify(&by_run, &key(), 30).unwrap().minted_by.as_deref(), Some("run_1"));
        let plain = mint(env, &key(), vec!["read:sessions:chat-1".into()], 60);
        assert_eq!(verify(&plain, &key(), 30).unwrap().minted_by, None);
        // Nothing on the wire for tokens no run minted: they read as before.
        let payload = plain.split('.').nth(1).unwrap();
        let json = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload).unwrap();
        assert!(!String::from_utf8(json).unwrap().contains("mintedBy"));
    }

    #[test]
    fn expired_tokens_fail_beyond_leeway() {
        let env = Uuid::new_v4();
        let t = mint(env, &key(), vec![], -120);
        assert!(verify(&t, &key(), 60).is_err());
        // Leeway is capped at 60 s however large the setting.
        assert!(verify(&t, &key(), 3600).is_err());
        let recent = mint(env, &key(), vec![], -10);
        assert!(verify(&recent, &key(), 30).is_ok());
    }

    #[test]
    fn time_failures_name_their_cause() {
        let env = Uuid::new_v4();
        assert!(
            matches!(verify(&mint(env, &key(), vec![], -120), &key(), 60), Err(TokenError::Expired(s)) if s >= 120)
        );
        let now = chrono::Utc::now().timestamp();
        let early = Claims {
            sub: env.to_string(),
            public: true,
            scopes: vec![],
            exp: now + 600,
            iat: Some(now + 90),
            nbf: Some(now + 90),
            iss: ISSUER.into(),
            aud: serde_json::Value::String(AUDIENCE.into()),
            minted_by: None,
        };
        let encode = |c: &Claims| {
            jsonwebtoken::encode(&Header::new(Algorithm::HS256), c, &EncodingKey::from_secret(b"tr_dev_testkey"))
                .unwrap()
        };
        assert!(matches!(verify(&encode(&early), &key(), 60), Err(TokenError::NotYetValid(s)) if s >= 89));
        let within = Claims { nbf: Some(now + 30), ..early.clone() };
        assert!(verify(&encode(&within), &key(), 60).is_ok());
        // A forged token's time is never reported: the signature fails first.
        let forged = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &early, &EncodingKey::from_secret(b"guess"));
        assert!(matches!(verify(&forged.unwrap(), &key(), 60), Err(TokenError::Invalid(_))));
    }

    #[test]
    fn alg_none_and_garbage_are_rejected() {
        let env = Uuid::new_v4();
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        let body = format!(
            r#"{{"sub":"{env}","pub":true,"scopes":["admin"],"exp":{},"iss":"{ISSUER}","aud":"{AUDIENCE}"}}"#,
            chrono::Utc::now().timestamp() + 600
        );
        let none = format!("{}.{}.", b64(r#"{"alg":"none","typ":"JWT"}"#), b64(&body));
        assert!(verify(&none, &key(), 30).is_err());
        assert!(unverified_subject("a.b").is_err());
        assert!(unverified_subject("not a token").is_err());
    }
}
