//! A request's id (`req_…`, or the client's own `X-Request-Id`), as everything
//! that keeps it holds it: the task-local of the request, its audit row.
//!
//! Held inline when short, as sandgate's own ids always are: a copy is a copy of
//! 32 bytes, with no allocation and no shared count. The audit writer drops the
//! rows it wrote on its own thread, so a heap-held id would be freed on another
//! thread than the one that made it, on every request: a cross-thread free that
//! takes the allocator's lock of the thread that made it.

use std::fmt;
use std::sync::Arc;

use rand::RngCore;

/// Ids up to this long are held inline.
const INLINE: usize = 30;

/// The random characters of a generated id, after `req_`.
const GENERATED_LEN: usize = 16;

#[derive(Clone)]
pub struct RequestId(Repr);

#[derive(Clone)]
enum Repr {
    Inline { len: u8, bytes: [u8; INLINE] },
    Shared(Arc<str>),
}

impl RequestId {
    pub fn new(id: &str) -> RequestId {
        if id.len() <= INLINE {
            let mut bytes = [0u8; INLINE];
            bytes[..id.len()].copy_from_slice(id.as_bytes());
            RequestId(Repr::Inline {
                len: id.len() as u8,
                bytes,
            })
        } else {
            RequestId(Repr::Shared(id.into()))
        }
    }

    /// A fresh `req_` and 16 random base62 characters.
    pub fn generate() -> RequestId {
        let mut random = [0u8; GENERATED_LEN];
        rand::rng().fill_bytes(&mut random);
        let mut bytes = [0u8; INLINE];
        bytes[..4].copy_from_slice(b"req_");
        for (slot, r) in bytes[4..].iter_mut().zip(random) {
            // 256 is not a multiple of 62: the first 8 characters come up a
            // little more often. An id needs to be unique, not uniform: 16
            // characters still carry over 94 bits.
            *slot = crate::keys::format::BASE62[usize::from(r) % 62];
        }
        RequestId(Repr::Inline {
            len: (4 + GENERATED_LEN) as u8,
            bytes,
        })
    }

    /// The id's bytes, without the UTF-8 check `as_str` makes of an inline id.
    pub fn as_bytes(&self) -> &[u8] {
        match &self.0 {
            Repr::Inline { len, bytes } => &bytes[..usize::from(*len)],
            Repr::Shared(id) => id.as_bytes(),
        }
    }

    pub fn as_str(&self) -> &str {
        match &self.0 {
            // Made from a whole `str`: always whole characters.
            Repr::Inline { .. } => std::str::from_utf8(self.as_bytes()).unwrap_or_default(),
            Repr::Shared(id) => id,
        }
    }
}

impl std::ops::Deref for RequestId {
    type Target = str;

    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl From<&str> for RequestId {
    fn from(id: &str) -> RequestId {
        RequestId::new(id)
    }
}

impl From<String> for RequestId {
    fn from(id: String) -> RequestId {
        RequestId::new(&id)
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl PartialEq for RequestId {
    fn eq(&self, other: &RequestId) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for RequestId {}

impl std::hash::Hash for RequestId {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_str().hash(state);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_read_back_as_given_short_or_long() {
        for id in [
            "",
            "abc-123",
            &"x".repeat(INLINE),
            &"y".repeat(INLINE + 1),
            &"z".repeat(128),
        ] {
            let held = RequestId::new(id);
            assert_eq!(held.as_str(), id);
            assert_eq!(held.clone().to_string(), id);
        }
        assert!(matches!(RequestId::new("abc").0, Repr::Inline { .. }));
        assert!(matches!(RequestId::new(&"a".repeat(64)).0, Repr::Shared(_)));
    }

    #[test]
    fn generated_ids_are_req_and_16_base62_characters_and_differ() {
        let ids: std::collections::HashSet<String> = (0..1000)
            .map(|_| RequestId::generate().to_string())
            .collect();
        assert_eq!(ids.len(), 1000);
        for id in &ids {
            let rest = id.strip_prefix("req_").expect("req_ prefix");
            assert_eq!(rest.len(), GENERATED_LEN);
            assert!(rest.bytes().all(|b| b.is_ascii_alphanumeric()), "{id}");
        }
        let seen: std::collections::HashSet<u8> =
            ids.iter().flat_map(|id| id.bytes().skip(4)).collect();
        assert_eq!(seen.len(), 62, "every base62 character comes up");
    }
}
