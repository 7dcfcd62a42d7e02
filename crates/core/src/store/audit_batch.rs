//! A batch of authentication attempts as one stored value.
//!
//! The audit writer appends attempts a few hundred at a time. Stored as rows, each
//! costs a b-tree insertion of ~150 bytes, most of them the same words again (the
//! method, the path, the key's id, prefix, tenant and env): that was most of the CPU
//! an authenticated request cost beyond an unauthenticated one. Stored as one value
//! per batch, every distinct text is written once in a table at the front and the
//! rows name it by number; a row is its time (a delta), a few small numbers and its
//! request id, ~40 bytes, and the batch is one insertion.
//!
//! Layout (all integers LEB128 varints): version `1`; the number of texts, then each
//! as length + UTF-8; the number of rows, then each row: the time in milliseconds as
//! a zigzag delta from the row before (from 0 for the first), the texts of client
//! IP, method, path, key id, key prefix, tenant, env and reason as `0` (none) or
//! index + 1, the outcome (`0` allowed, `1` denied), and the request id as length +
//! UTF-8. Rows are the batch's seqs in order, from its first.

use std::collections::HashMap;

use crate::audit::AuthAttempt;
use crate::model::{AuditRecord, Env, Outcome, Timestamp};
use crate::store::StoreError;

const VERSION: u64 = 1;

/// The batch's value. Its rows keep the order of `attempts`.
pub fn encode(attempts: &[AuthAttempt]) -> Vec<u8> {
    let mut texts = Texts::default();
    let mut rows = Vec::with_capacity(attempts.len() * 40);
    let mut prev_time = 0i64;
    // Consecutive attempts mostly come from one address: write it out only when it
    // changes.
    let mut ip: Option<(std::net::IpAddr, u64)> = None;
    let mut prev: [Option<(&str, u64)>; 7] = [None; 7];
    for a in attempts {
        let time = a.time.millis();
        push_varint(&mut rows, zigzag(time.wrapping_sub(prev_time)));
        prev_time = time;
        let ip_ref = match ip {
            Some((addr, r)) if addr == a.client_ip => r,
            _ => {
                let r = texts.add(Some(&a.client_ip.to_string()));
                ip = Some((a.client_ip, r));
                r
            }
        };
        push_varint(&mut rows, ip_ref);
        let fields = [
            Some(&*a.method),
            Some(&*a.path),
            a.key_id(),
            a.key_prefix(),
            a.tenant(),
            a.env().map(Env::as_str),
            a.reason,
        ];
        for (text, prev) in fields.into_iter().zip(&mut prev) {
            // Most rows repeat the row before's texts: compare before hashing.
            let r = match *prev {
                Some((t, r)) if Some(t) == text => r,
                _ => {
                    let r = texts.add(text);
                    *prev = text.map(|t| (t, r));
                    r
                }
            };
            push_varint(&mut rows, r);
        }
        rows.push(match a.outcome {
            Outcome::Allowed => 0,
            Outcome::Denied => 1,
        });
        push_text(&mut rows, &a.request_id);
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

/// The rows of a batch whose first row is `first_seq`, as the audit listing shows
/// them (event `auth`).
pub fn decode(first_seq: i64, value: &[u8]) -> Result<Vec<AuditRecord>, StoreError> {
    let mut r = Reader { rest: value };
    let version = r.varint()?;
    if version != VERSION {
        return Err(corrupt(&format!("version {version}")));
    }
    let n_texts = r.varint()? as usize;
    let mut texts = Vec::with_capacity(n_texts.min(value.len()));
    for _ in 0..n_texts {
        texts.push(r.text()?);
    }
    let text = |r: &mut Reader<'_>| -> Result<Option<String>, StoreError> {
        match r.varint()? {
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
    for i in 0..n_rows {
        time = time.wrapping_add(unzigzag(r.varint()?));
        let client_ip = text(&mut r)?;
        let method = text(&mut r)?;
        let path = text(&mut r)?;
        let key_id = text(&mut r)?;
        let key_prefix = text(&mut r)?;
        let tenant = text(&mut r)?;
        let env = text(&mut r)?
            .map(|e| e.parse::<Env>())
            .transpose()
            .map_err(StoreError::Corrupt)?;
        let reason = text(&mut r)?;
        let outcome = match r.byte()? {
            0 => Outcome::Allowed,
            1 => Outcome::Denied,
            other => return Err(corrupt(&format!("outcome {other}"))),
        };
        let request_id = Some(r.text()?.to_owned());
        out.push(AuditRecord {
            seq: first_seq + i as i64,
            time: Timestamp::from_millis(time),
            event: "auth".to_owned(),
            client_ip,
            method,
            path,
            key_id,
            key_prefix,
            actor_key_id: None,
            tenant,
            env,
            outcome,
            reason,
            request_id,
        });
    }
    if !r.rest.is_empty() {
        return Err(corrupt("trailing bytes"));
    }
    Ok(out)
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
        other_version[0] = 2;
        assert!(decode(1, &other_version).is_err());
    }
}
