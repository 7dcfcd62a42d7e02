//! A batch of authentication attempts as one stored value.
//!
//! The audit writer appends attempts a few hundred at a time. Stored as rows, each
//! costs a b-tree insertion of ~150 bytes, most of them the same words again (the
//! method, the path, the key's id, prefix, tenant and env): that was most of the CPU
//! an authenticated request cost beyond an unauthenticated one. Stored as one value
//! per batch, every distinct text is written once in a table at the front and the
//! rows name it by number; a row is its time (a delta), a byte saying which texts
//! are the row before's, the numbers of the others, and its request id: ~15
//! bytes, and the batch is one insertion.
//!
//! Layout (all integers LEB128 varints): the version (`2`; `1` is still read);
//! the number of texts, then each as length + UTF-8; the number of rows, then
//! each row:
//! - the time in milliseconds as a zigzag delta from the row before (from 0 for
//!   the first);
//! - a byte with a bit for each of the eight texts (client IP, method, path, key
//!   id, key prefix, tenant, env, reason; bit 0 the first) that is the row
//!   before's, then, for each of the others in that order, `0` (none) or its
//!   index + 1;
//! - a byte: bit 0 the outcome (`1` denied), bit 1 set when the request id is
//!   sandgate's own shape (`req_` and 16 base62 characters) and follows as 12
//!   bytes (the characters as one base62 number, little-endian), else the id
//!   follows as length + UTF-8.
//!
//! So a typical row is ~15 bytes: fewer pages for the log and the database to
//! write, which is most of what a row costs. Version 1 rows write every text's
//! number, then the outcome byte and the id as length + UTF-8. Rows are the
//! batch's seqs in order, from its first.

use std::collections::HashMap;

use crate::audit::AuthAttempt;
use crate::model::{AuditRecord, Env, Outcome, Timestamp};
use crate::store::StoreError;

const VERSION: u64 = 2;

/// Per row: the texts, and the flags byte.
const TEXTS: usize = 8;
const DENIED: u8 = 1;
const PACKED_ID: u8 = 2;

/// The characters after `req_` of sandgate's own request ids.
const ID_DIGITS: usize = 16;
const ID_BYTES: usize = 12;

/// The batch's value. Its rows keep the order of `attempts`.
pub fn encode(attempts: &[AuthAttempt]) -> Vec<u8> {
    let mut texts = Texts::default();
    let mut rows = Vec::with_capacity(attempts.len() * 16);
    let mut prev_time = 0i64;
    let mut prev: Option<&AuthAttempt> = None;
    // The row before's text numbers; nothing is the same as the row before the first.
    let mut prev_refs = [u64::MAX; TEXTS];
    for a in attempts {
        let time = a.time.millis();
        push_varint(&mut rows, zigzag(time.wrapping_sub(prev_time)));
        prev_time = time;
        // Most rows repeat the row before's texts: compared (by address first)
        // before any is looked up, and a row of the same key as the row before
        // has its four texts without a look.
        let mut refs = prev_refs;
        let same_key = prev.is_some_and(|p| same_key(p, a));
        for (i, slot) in refs.iter_mut().enumerate() {
            let same = match prev {
                None => false,
                Some(_) if same_key && KEY_TEXTS.contains(&i) => true,
                Some(p) if i == 0 => p.client_ip == a.client_ip,
                Some(p) => same_text(text(p, i), text(a, i)),
            };
            if !same {
                *slot = if i == 0 {
                    texts.add(Some(&a.client_ip.to_string()))
                } else {
                    texts.add(text(a, i))
                };
            }
        }
        let same = (0..TEXTS).fold(0u8, |same, i| {
            same | (u8::from(refs[i] == prev_refs[i]) << i)
        });
        rows.push(same);
        for (i, r) in refs.iter().enumerate() {
            if same & (1 << i) == 0 {
                push_varint(&mut rows, *r);
            }
        }
        prev_refs = refs;
        prev = Some(a);
        let denied = match a.outcome {
            Outcome::Allowed => 0,
            Outcome::Denied => DENIED,
        };
        match packed_id(a.request_id.as_bytes()) {
            Some(n) => {
                rows.push(denied | PACKED_ID);
                rows.extend_from_slice(&n.to_le_bytes()[..ID_BYTES]);
            }
            None => {
                rows.push(denied);
                push_text(&mut rows, &a.request_id);
            }
        }
    }
    let mut out = Vec::with_capacity(rows.len() + texts.bytes + 16);
    push_varint(&mut out, VERSION);
    push_varint(&mut out, texts.list.len() as u64);
    for t in &texts.list {
        push_text(&mut out, t);
    }
    push_varint(&mut out, attempts.len() as u64);
    out.extend_from_slice(&rows);
    out
}

/// `req_` and 16 base62 characters, as one number (below 62^16 < 2^96).
fn packed_id(id: &[u8]) -> Option<u128> {
    let digits = id.strip_prefix(b"req_")?;
    if digits.len() != ID_DIGITS {
        return None;
    }
    digits.iter().try_fold(0u128, |n, &c| {
        let d = match c {
            b'0'..=b'9' => c - b'0',
            b'A'..=b'Z' => c - b'A' + 10,
            b'a'..=b'z' => c - b'a' + 36,
            _ => return None,
        };
        Some(n * 62 + u128::from(d))
    })
}

fn unpacked_id(n: u128) -> Result<String, StoreError> {
    let mut digits = [b'0'; ID_DIGITS];
    if crate::keys::format::base62_digits(n, &mut digits) != 0 {
        return Err(corrupt("request id out of range"));
    }
    let mut id = String::with_capacity(4 + ID_DIGITS);
    id.push_str("req_");
    id.extend(digits.iter().map(|&d| char::from(d)));
    Ok(id)
}

/// The rows of a batch whose first row is `first_seq`, as the audit listing shows
/// them (event `auth`).
pub fn decode(first_seq: i64, value: &[u8]) -> Result<Vec<AuditRecord>, StoreError> {
    let mut r = Reader { rest: value };
    let version = r.varint()?;
    if version != 1 && version != VERSION {
        return Err(corrupt(&format!("version {version}")));
    }
    let n_texts = r.varint()? as usize;
    let mut texts = Vec::with_capacity(n_texts.min(value.len()));
    for _ in 0..n_texts {
        texts.push(r.text()?);
    }
    let text = |i: u64| -> Result<Option<String>, StoreError> {
        match i {
            0 => Ok(None),
            i => texts
                .get(i as usize - 1)
                .map(|t| Some((*t).to_owned()))
                .ok_or_else(|| corrupt("text index")),
        }
    };
    let n_rows = r.varint()? as usize;
    let mut out = Vec::with_capacity(n_rows.min(value.len()));
    let mut time = 0i64;
    let mut prev_refs: Option<[u64; TEXTS]> = None;
    for i in 0..n_rows {
        time = time.wrapping_add(unzigzag(r.varint()?));
        let mut refs = [0u64; TEXTS];
        if version == 1 {
            for slot in &mut refs {
                *slot = r.varint()?;
            }
        } else {
            let same = r.byte()?;
            for (bit, slot) in refs.iter_mut().enumerate() {
                *slot = if same & (1 << bit) != 0 {
                    prev_refs.ok_or_else(|| corrupt("first row like the one before"))?[bit]
                } else {
                    r.varint()?
                };
            }
            prev_refs = Some(refs);
        }
        let flags = r.byte()?;
        let (outcome, packed) = match (version, flags) {
            (1, 0) | (2, 0 | PACKED_ID) => (Outcome::Allowed, flags == PACKED_ID),
            (1, DENIED) | (2, DENIED | 3) => (Outcome::Denied, flags == 3),
            (_, other) => return Err(corrupt(&format!("row flags {other}"))),
        };
        let request_id = if packed {
            let mut bytes = [0u8; 16];
            for b in &mut bytes[..ID_BYTES] {
                *b = r.byte()?;
            }
            unpacked_id(u128::from_le_bytes(bytes))?
        } else {
            r.text()?.to_owned()
        };
        let env = text(refs[6])?
            .map(|e| e.parse::<Env>())
            .transpose()
            .map_err(StoreError::Corrupt)?;
        out.push(AuditRecord {
            seq: first_seq + i as i64,
            time: Timestamp::from_millis(time),
            event: "auth".to_owned(),
            client_ip: text(refs[0])?,
            method: text(refs[1])?,
            path: text(refs[2])?,
            key_id: text(refs[3])?,
            key_prefix: text(refs[4])?,
            actor_key_id: None,
            tenant: text(refs[5])?,
            env,
            outcome,
            reason: text(refs[7])?,
            request_id: Some(request_id),
        });
    }
    if !r.rest.is_empty() {
        return Err(corrupt("trailing bytes"));
    }
    Ok(out)
}

/// The texts a row's key gives it (key id, prefix, tenant, env).
const KEY_TEXTS: std::ops::RangeInclusive<usize> = 3..=6;

/// Text `i` of a row (1 to 7: method, path, key id, key prefix, tenant, env,
/// reason; the client IP, 0, is an address).
fn text(a: &AuthAttempt, i: usize) -> Option<&str> {
    match i {
        1 => Some(&a.method),
        2 => Some(&a.path),
        3 => a.key_id(),
        4 => a.key_prefix(),
        5 => a.tenant(),
        6 => a.env().map(Env::as_str),
        _ => a.reason,
    }
}

/// Whether two rows' key texts are the same without reading them: the same
/// key, and nothing presented beside it.
fn same_key(a: &AuthAttempt, b: &AuthAttempt) -> bool {
    match (&a.key, &b.key) {
        (Some(x), Some(y)) => {
            std::sync::Arc::ptr_eq(x, y)
                && a.presented_prefix.is_none()
                && b.presented_prefix.is_none()
        }
        _ => false,
    }
}

fn same_text(a: Option<&str>, b: Option<&str>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => std::ptr::eq(a, b) || a == b,
        (a, b) => a.is_none() && b.is_none(),
    }
}

/// The distinct texts of a batch, numbered from 1 in the order first seen.
#[derive(Default)]
struct Texts {
    list: Vec<String>,
    by_text: HashMap<String, u64>,
    bytes: usize,
}

impl Texts {
    fn add(&mut self, text: Option<&str>) -> u64 {
        let Some(text) = text else { return 0 };
        if let Some(r) = self.by_text.get(text) {
            return *r;
        }
        self.list.push(text.to_owned());
        self.bytes += text.len() + 2;
        let r = self.list.len() as u64;
        self.by_text.insert(text.to_owned(), r);
        r
    }
}

fn zigzag(n: i64) -> u64 {
    ((n << 1) ^ (n >> 63)) as u64
}

fn unzigzag(n: u64) -> i64 {
    ((n >> 1) as i64) ^ -((n & 1) as i64)
}

pub(crate) fn push_varint(out: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

fn push_text(out: &mut Vec<u8>, text: &str) {
    push_varint(out, text.len() as u64);
    out.extend_from_slice(text.as_bytes());
}

fn corrupt(what: &str) -> StoreError {
    StoreError::Corrupt(format!("audit batch: {what}"))
}

struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn byte(&mut self) -> Result<u8, StoreError> {
        let (&b, rest) = self
            .rest
            .split_first()
            .ok_or_else(|| corrupt("truncated"))?;
        self.rest = rest;
        Ok(b)
    }

    fn varint(&mut self) -> Result<u64, StoreError> {
        let mut n = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            n |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(n);
            }
        }
        Err(corrupt("varint too long"))
    }

    fn text(&mut self) -> Result<&'a str, StoreError> {
        let len = self.varint()? as usize;
        if len > self.rest.len() {
            return Err(corrupt("truncated text"));
        }
        let (bytes, rest) = self.rest.split_at(len);
        self.rest = rest;
        std::str::from_utf8(bytes).map_err(|_| corrupt("text is not UTF-8"))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::principal::Principal;

    fn attempt(i: i64, key: Option<Arc<Principal>>) -> AuthAttempt {
        AuthAttempt {
            time: Timestamp::from_millis(1_700_000_000_000 + i * 3 - (i % 4) * 5),
            request_id: format!("req_{i:022}").into(),
            client_ip: if i % 7 == 6 {
                "2001:db8::1".parse().unwrap()
            } else {
                "127.0.0.1".parse().unwrap()
            },
            method: if i % 5 == 4 { "POST" } else { "GET" }.into(),
            path: if i % 3 == 0 {
                "/v1/auth/whoami".into()
            } else {
                format!("/v1/sandboxes/sbx_{i}").into()
            },
            key,
            presented_prefix: (i % 9 == 1).then(|| "sg_live_abcd".to_owned()),
            subject: (i % 11 == 2).then(|| "jwt:fingerprint".to_owned()),
            outcome: if i % 4 == 0 {
                Outcome::Denied
            } else {
                Outcome::Allowed
            },
            reason: (i % 4 == 0).then_some("missing_scope"),
        }
    }

    #[test]
    fn a_batch_decodes_to_the_rows_its_attempts_make() {
        let p = Arc::new(Principal {
            key_id: "key_1".into(),
            key_prefix: Some("sg_live_abcd".into()),
            tenant: "acme".into(),
            ..Principal::local_operator()
        });
        let attempts: Vec<AuthAttempt> = (0..300)
            .map(|i| attempt(i, (i % 6 != 5).then(|| Arc::clone(&p))))
            .collect();
        let value = encode(&attempts);
        let rows = decode(1000, &value).unwrap();
        let expected: Vec<AuditRecord> = attempts
            .iter()
            .enumerate()
            .map(|(i, a)| AuditRecord {
                seq: 1000 + i as i64,
                ..a.to_record()
            })
            .collect();
        assert_eq!(rows, expected);
        // The point of it: smaller than the rows' texts alone, though every path
        // here is a different one.
        let texts: usize = expected
            .iter()
            .map(|r| {
                [
                    &r.client_ip,
                    &r.method,
                    &r.path,
                    &r.key_id,
                    &r.key_prefix,
                    &r.tenant,
                    &r.request_id,
                ]
                .iter()
                .map(|t| t.as_ref().map_or(0, String::len))
                .sum::<usize>()
            })
            .sum();
        assert!(
            value.len() < texts,
            "{} bytes for {texts} of text",
            value.len()
        );
    }

    #[test]
    fn an_empty_batch_and_damaged_values() {
        assert_eq!(decode(1, &encode(&[])).unwrap(), []);
        let value = encode(&[attempt(1, None), attempt(2, None)]);
        for cut in 0..value.len() {
            assert!(decode(1, &value[..cut]).is_err(), "cut at {cut}");
        }
        let mut longer = value.clone();
        longer.push(0);
        assert!(decode(1, &longer).is_err());
        let mut other_version = value;
        other_version[0] = 3;
        assert!(decode(1, &other_version).is_err());
    }

    #[test]
    fn sandgate_request_ids_are_packed_and_any_other_id_kept_as_sent() {
        let ids: Vec<String> = (0..200)
            .map(|i| match i % 4 {
                0 => "req_0000000000000000".to_owned(),
                1 => "req_zzzzzzzzzzzzzzzz".to_owned(),
                2 => format!("client-{i}"),
                _ => crate::request_id::RequestId::generate().to_string(),
            })
            .chain(
                [
                    "req_",
                    "req_short",
                    "req_ABCDEFGHIJKLMNO!",
                    "req_ABCDEFGHIJKLMNOPQ",
                ]
                .map(String::from),
            )
            .collect();
        let attempts: Vec<AuthAttempt> = ids
            .iter()
            .enumerate()
            .map(|(i, id)| AuthAttempt {
                request_id: id.as_str().into(),
                ..attempt(i as i64, None)
            })
            .collect();
        let rows = decode(1, &encode(&attempts)).unwrap();
        let back: Vec<&str> = rows
            .iter()
            .map(|r| r.request_id.as_deref().unwrap())
            .collect();
        assert_eq!(back, ids);
        assert_eq!(packed_id(b"req_0000000000000000"), Some(0));
        assert_eq!(packed_id(b"req_ABCDEFGHIJKLMNO!"), None);
        assert!(unpacked_id(u128::from_le_bytes([0xff; 16]) >> 32).is_err());
    }

    #[test]
    fn a_row_of_a_steady_stream_is_about_fifteen_bytes() {
        let p = Arc::new(Principal {
            key_id: "key_0123456789abcdef".into(),
            key_prefix: Some("sg_live_abcd".into()),
            tenant: "acme".into(),
            ..Principal::local_operator()
        });
        let attempts: Vec<AuthAttempt> = (0..1000)
            .map(|i| AuthAttempt {
                time: Timestamp::from_millis(1_700_000_000_000 + i / 60),
                request_id: crate::request_id::RequestId::generate(),
                client_ip: "127.0.0.1".parse().unwrap(),
                method: "GET".into(),
                path: "/v1/auth/whoami".into(),
                key: Some(Arc::clone(&p)),
                presented_prefix: None,
                subject: None,
                outcome: Outcome::Allowed,
                reason: None,
            })
            .collect();
        let value = encode(&attempts);
        assert!(value.len() <= 1000 * 16, "{} bytes", value.len());
        assert_eq!(decode(1, &value).unwrap().len(), 1000);
    }

    /// A batch written by version 1 (before the row flags and packed ids).
    #[test]
    fn batches_of_the_first_version_still_read() {
        const V1: &[u8] = &[
            1, 8, 9, 49, 50, 55, 46, 48, 46, 48, 46, 49, 3, 71, 69, 84, 15, 47, 118, 49, 47, 97,
            117, 116, 104, 47, 119, 104, 111, 97, 109, 105, 5, 107, 101, 121, 95, 49, 12, 115, 103,
            95, 108, 105, 118, 101, 95, 97, 98, 99, 100, 4, 97, 99, 109, 101, 4, 108, 105, 118,
            101, 13, 109, 105, 115, 115, 105, 110, 103, 95, 115, 99, 111, 112, 101, 3, 128, 160,
            171, 254, 249, 98, 1, 2, 3, 4, 5, 6, 7, 0, 0, 20, 114, 101, 113, 95, 65, 98, 67, 100,
            69, 102, 71, 104, 73, 106, 75, 108, 77, 110, 79, 112, 14, 1, 2, 3, 0, 0, 0, 0, 8, 1,
            11, 99, 108, 105, 101, 110, 116, 45, 105, 100, 45, 49, 14, 1, 2, 3, 4, 5, 6, 7, 0, 0,
            20, 114, 101, 113, 95, 48, 48, 48, 48, 48, 48, 48, 48, 48, 48, 48, 48, 48, 48, 48, 57,
        ];
        let rows = decode(7, V1).unwrap();
        let summary: Vec<_> = rows
            .iter()
            .map(|r| {
                (
                    r.seq,
                    r.time.millis() - 1_700_000_000_000,
                    r.key_id.as_deref(),
                    r.tenant.as_deref(),
                    r.outcome,
                    r.reason.as_deref(),
                    r.request_id.as_deref(),
                )
            })
            .collect();
        assert_eq!(
            summary,
            [
                (
                    7,
                    0,
                    Some("key_1"),
                    Some("acme"),
                    Outcome::Allowed,
                    None,
                    Some("req_AbCdEfGhIjKlMnOp")
                ),
                (
                    8,
                    7,
                    None,
                    None,
                    Outcome::Denied,
                    Some("missing_scope"),
                    Some("client-id-1")
                ),
                (
                    9,
                    14,
                    Some("key_1"),
                    Some("acme"),
                    Outcome::Allowed,
                    None,
                    Some("req_0000000000000009")
                ),
            ]
        );
        assert!(
            rows.iter()
                .all(|r| r.path.as_deref() == Some("/v1/auth/whoami"))
        );
    }
}
