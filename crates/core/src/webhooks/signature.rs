//! The `Sandgate-Signature` header: `t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">`.

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The header value signing `body` at unix time `t` with `secret`.
pub fn signature_header(secret: &str, t: i64, body: &[u8]) -> String {
    let mut message = Vec::with_capacity(body.len() + 24);
    message.extend_from_slice(t.to_string().as_bytes());
    message.push(b'.');
    message.extend_from_slice(body);
    format!("t={t},v1={}", hmac_sha256_hex(secret.as_bytes(), &message))
}

pub fn hmac_sha256_hex(key: &[u8], message: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(message);
    mac.finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_matches_rfc_4231_test_case_2() {
        assert_eq!(
            hmac_sha256_hex(b"Jefe", b"what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn the_header_signs_timestamp_dot_body() {
        let header = signature_header("whsec_x", 1_700_000_000, b"{\"a\":1}");
        assert_eq!(
            header,
            format!(
                "t=1700000000,v1={}",
                hmac_sha256_hex(b"whsec_x", b"1700000000.{\"a\":1}")
            )
        );
    }
}
