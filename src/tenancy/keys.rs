//! Secret keys: generation, hashing for lookup, and sealing at rest.
//!
//! Authentication looks keys up by their SHA-256. The key itself is also kept,
//! sealed with XChaCha20-Poly1305 under the server master key, because tokens
//! minted by the official SDK are HS256-signed with the raw key.

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use uuid::Uuid;

use super::{EnvType, SecretKey};
use crate::ids::random_base62;

pub fn generate(env_type: EnvType) -> SecretKey {
    SecretKey::new(format!("{}{}", env_type.key_prefix(), random_base62(32)))
}

pub fn hash(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// Constant-time comparison of a presented key against a stored hash.
pub fn matches(key: &str, stored_hash: &[u8]) -> bool {
    hash(key).ct_eq(stored_hash).into()
}

/// What operators see in listings: enough to tell keys apart, not to use one.
pub fn hint(key: &SecretKey) -> String {
    let k = key.expose();
    let cut = k.char_indices().nth(12).map(|(i, _)| i).unwrap_or(k.len());
    format!("{}…", &k[..cut])
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("master key must be 64 hex characters")]
    BadMasterKey,
    #[error("sealed key could not be opened (wrong master key or corrupt row)")]
    Unseal,
}

/// The server master key that seals environment keys.
#[derive(Clone)]
pub struct MasterKey(XChaCha20Poly1305);

impl MasterKey {
    pub fn from_hex(hex_key: &str) -> Result<Self, KeyError> {
        let bytes = hex::decode(hex_key.trim()).map_err(|_| KeyError::BadMasterKey)?;
        if bytes.len() != 32 {
            return Err(KeyError::BadMasterKey);
        }
        Ok(MasterKey(XChaCha20Poly1305::new_from_slice(&bytes).map_err(|_| KeyError::BadMasterKey)?))
    }

    pub fn random() -> Self {
        let mut bytes = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut bytes);
        MasterKey(XChaCha20Poly1305::new(&bytes.into()))
    }

    /// Seals `key` bound to `env_id` (as associated data), so a sealed value
    /// copied onto another environment's row does not open.
    pub fn seal(&self, env_id: Uuid, key: &SecretKey) -> Vec<u8> {
        let mut nonce = [0u8; 24];
        rand::thread_rng().fill_bytes(&mut nonce);
        let payload = Payload { msg: key.expose().as_bytes(), aad: env_id.as_bytes() };
        // Encryption with a valid key and in-memory buffers cannot fail.
        let ct = self.0.encrypt(XNonce::from_slice(&nonce), payload).unwrap_or_default();
        let mut out = nonce.to_vec();
        out.extend_from_slice(&ct);
        out
    }

    pub fn unseal(&self, env_id: Uuid, sealed: &[u8]) -> Result<SecretKey, KeyError> {
        if sealed.len() < 24 {
            return Err(KeyError::Unseal);
        }
        let (nonce, ct) = sealed.split_at(24);
        let payload = Payload { msg: ct, aad: env_id.as_bytes() };
        let plain = self.0.decrypt(XNonce::from_slice(nonce), payload).map_err(|_| KeyError::Unseal)?;
        String::from_utf8(plain).map(SecretKey::new).map_err(|_| KeyError::Unseal)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_have_type_prefixes() {
        assert!(generate(EnvType::Dev).expose().starts_with("tr_dev_"));
        assert!(generate(EnvType::Staging).expose().starts_with("tr_stg_"));
        assert!(generate(EnvType::Prod).expose().starts_with("tr_prod_"));
    }

    #[test]
    fn hash_matches_only_its_key() {
        let k = generate(EnvType::Dev);
        let h = hash(k.expose());
        assert!(matches(k.expose(), &h));
        assert!(!matches("tr_dev_other", &h));
    }

    #[test]
    fn seal_round_trips_and_is_bound_to_the_environment() {
        let mk = MasterKey::random();
        let env = Uuid::new_v4();
        let k = generate(EnvType::Prod);
        let sealed = mk.seal(env, &k);
        assert!(!sealed.windows(k.expose().len()).any(|w| w == k.expose().as_bytes()));
        assert_eq!(mk.unseal(env, &sealed).unwrap(), k);
        assert!(mk.unseal(Uuid::new_v4(), &sealed).is_err());
        assert!(MasterKey::random().unseal(env, &sealed).is_err());
    }

    #[test]
    fn master_key_must_be_32_bytes_of_hex() {
        assert!(MasterKey::from_hex(&"ab".repeat(32)).is_ok());
        assert!(MasterKey::from_hex("abcd").is_err());
        assert!(MasterKey::from_hex(&"zz".repeat(32)).is_err());
    }
}
