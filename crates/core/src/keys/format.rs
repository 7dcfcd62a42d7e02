//! The API key format (SPEC §1): `sg_<env>_<32 base62 body><6 base62 CRC32 of body>`.
//!
//! Owns generation (CSPRNG), the checksum that rejects typos and random strings
//! without touching storage, hashing, and the [`SecretKey`] type whose `Debug` and
//! `Display` never show the value. It must not look anything up.

use std::fmt;

use rand::Rng;
use sha2::{Digest, Sha256};

use crate::model::Env;

pub(crate) const BASE62: &[u8; 62] =
    b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
const BODY_LEN: usize = 32;
const CHECK_LEN: usize = 6;
/// Characters of a key shown in listings and audit rows.
pub const PREFIX_LEN: usize = 12;

/// A plaintext credential. Shown to its owner once; never logged.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretKey(String);

impl SecretKey {
    pub fn new(value: String) -> SecretKey {
        SecretKey(value)
    }

    /// The plaintext, for the one response that shows it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretKey(<redacted>)")
    }
}

impl fmt::Display for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// SHA-256 of a key: the only form of it that is stored.
pub type KeyHash = [u8; 32];

pub fn hash_key(key: &str) -> KeyHash {
    Sha256::digest(key.as_bytes()).into()
}

/// A fresh key of the given env, from the operating system's CSPRNG.
pub fn generate_key(env: Env) -> SecretKey {
    let mut rng = rand::rng();
    let body: String = (0..BODY_LEN)
        .map(|_| BASE62[rng.random_range(0..BASE62.len())] as char)
        .collect();
    let check = checksum(&body);
    let check = std::str::from_utf8(&check).expect("base62 is ascii");
    SecretKey(format!("sg_{}_{body}{check}", env.as_str()))
}

/// What a presented credential is, judged by its shape alone.
#[derive(Debug, PartialEq, Eq)]
pub enum KeyShape {
    /// A well-formed sandgate key with a valid checksum.
    Valid(Env),
    /// Looks like a sandgate key (`sg_live_`/`sg_test_`) but is malformed or fails the checksum.
    Corrupt,
    /// Not a sandgate key at all; another credential source may know it.
    Foreign,
}

pub fn classify(credential: &str) -> KeyShape {
    let (env, rest) = if let Some(rest) = credential.strip_prefix("sg_live_") {
        (Env::Live, rest)
    } else if let Some(rest) = credential.strip_prefix("sg_test_") {
        (Env::Test, rest)
    } else {
        return KeyShape::Foreign;
    };
    if rest.len() != BODY_LEN + CHECK_LEN || !rest.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return KeyShape::Corrupt;
    }
    let (body, check) = rest.split_at(BODY_LEN);
    if checksum(body) == check.as_bytes() {
        KeyShape::Valid(env)
    } else {
        KeyShape::Corrupt
    }
}

/// The listing prefix of a key, or of anything that starts like one.
pub fn prefix_of(credential: &str) -> Option<&str> {
    if credential.starts_with("sg_") && credential.is_char_boundary(PREFIX_LEN) {
        credential.get(..PREFIX_LEN)
    } else {
        None
    }
}

/// The CRC32 of `body` in base62; on the stack, as it is checked for every key presented.
fn checksum(body: &str) -> [u8; CHECK_LEN] {
    let mut out = [b'0'; CHECK_LEN];
    base62_digits(u128::from(crc32fast::hash(body.as_bytes())), &mut out);
    out
}

/// Writes `n` into `out` as base62, zero-padded on the left; returns what did
/// not fit (0 when all of it did).
pub(crate) fn base62_digits(mut n: u128, out: &mut [u8]) -> u128 {
    for slot in out.iter_mut().rev() {
        *slot = BASE62[(n % 62) as usize];
        n /= 62;
    }
    n
}

/// A random base62 identifier with a type prefix (`key_…`, `req_…`).
pub fn random_id(prefix: &str, len: usize) -> String {
    let mut rng = rand::rng();
    let mut id = String::with_capacity(prefix.len() + len);
    id.push_str(prefix);
    id.extend((0..len).map(|_| BASE62[rng.random_range(0..BASE62.len())] as char));
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_have_the_spec_shape() {
        let key = generate_key(Env::Live);
        let s = key.expose();
        assert!(s.starts_with("sg_live_"));
        assert_eq!(s.len(), 8 + 32 + 6);
        assert_eq!(classify(s), KeyShape::Valid(Env::Live));
        assert_eq!(prefix_of(s).unwrap().len(), 12);
        let test = generate_key(Env::Test);
        assert_eq!(classify(test.expose()), KeyShape::Valid(Env::Test));
        assert_ne!(generate_key(Env::Live), generate_key(Env::Live));
    }

    #[test]
    fn any_changed_character_fails_the_checksum() {
        let key = generate_key(Env::Live).expose().to_owned();
        for i in 8..key.len() {
            let mut bytes = key.clone().into_bytes();
            bytes[i] = if bytes[i] == b'a' { b'b' } else { b'a' };
            let changed = String::from_utf8(bytes).unwrap();
            assert_eq!(classify(&changed), KeyShape::Corrupt, "position {i}");
        }
    }

    #[test]
    fn shapes() {
        assert_eq!(classify("hello"), KeyShape::Foreign);
        assert_eq!(classify("sg_prod_abc"), KeyShape::Foreign);
        assert_eq!(classify("sg_live_short"), KeyShape::Corrupt);
        let key = generate_key(Env::Live).expose().to_owned();
        assert_eq!(classify(&format!("{key}x")), KeyShape::Corrupt);
    }

    #[test]
    fn secrets_do_not_print() {
        let key = generate_key(Env::Live);
        assert!(!format!("{key:?} {key}").contains(&key.expose()[8..]));
    }
}
