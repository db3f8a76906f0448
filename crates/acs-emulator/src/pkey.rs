//! Profile keys shaped like ACS's: `@` and base64url text that only this instance can decode.
//!
//! Real PKeys are encrypted by the tenant, so a key from another tenant (or another emulator) is
//! well formed yet unreadable, and ACS answers it with a 500 `XTK-170036`, not a 404. To behave
//! the same, a key here carries the profile's id and a MAC under a secret drawn at start-up.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use sha2::Sha512;

type KeyMac = Hmac<Sha512>;

/// A nonce, the id masked under it, and a truncated MAC: 72 bytes, 96 characters of base64url,
/// within the 90 to 130 characters real PKeys have. The nonce makes every key look unrelated to
/// the others. A profile's usual key uses a nonce derived from its id, so ACS answers the same key
/// for it every time; [`KeyCodec::encode_alternate`] mints another valid key for the same
/// profile, as ACS can.
const NONCE_LEN: usize = 8;
const ID_LEN: usize = 8;
const TAG_LEN: usize = 56;

/// Mints and reads the keys of one emulator instance.
pub(crate) struct KeyCodec {
    secret: [u8; 32],
}

impl KeyCodec {
    pub(crate) fn new() -> Self {
        Self {
            secret: rand::random(),
        }
    }

    /// The profile's usual key.
    pub(crate) fn encode(&self, id: u64) -> String {
        let derived = self.mac(&[b"nonce", &id.to_be_bytes()]);
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&derived[..NONCE_LEN]);
        self.encode_with(id, nonce)
    }

    /// Another key for the same profile, different from every other.
    pub(crate) fn encode_alternate(&self, id: u64) -> String {
        self.encode_with(id, rand::random())
    }

    fn encode_with(&self, id: u64, nonce: [u8; NONCE_LEN]) -> String {
        let mut raw = Vec::with_capacity(NONCE_LEN + ID_LEN + TAG_LEN);
        raw.extend_from_slice(&nonce);
        raw.extend_from_slice(&self.masked(&nonce, id.to_be_bytes()));
        raw.extend_from_slice(&self.tag(&nonce, id)[..TAG_LEN]);
        format!("@{}", URL_SAFE_NO_PAD.encode(raw))
    }

    /// The id a key stands for, or `None` when this instance did not mint it.
    pub(crate) fn decode(&self, pkey: &str) -> Option<u64> {
        let raw = URL_SAFE_NO_PAD.decode(pkey.strip_prefix('@')?).ok()?;
        if raw.len() != NONCE_LEN + ID_LEN + TAG_LEN {
            return None;
        }
        let (nonce, rest) = raw.split_at(NONCE_LEN);
        let (masked_id, tag) = rest.split_at(ID_LEN);
        let id = u64::from_be_bytes(self.masked(nonce, masked_id.try_into().ok()?));
        // A plain comparison: timing attacks on a test emulator are no concern.
        (self.tag(nonce, id)[..TAG_LEN] == *tag).then_some(id)
    }

    /// XORs eight bytes with a mask derived from the nonce (its own inverse).
    fn masked(&self, nonce: &[u8], bytes: [u8; ID_LEN]) -> [u8; ID_LEN] {
        let mask = self.mac(&[b"mask", nonce]);
        std::array::from_fn(|i| bytes[i] ^ mask[i])
    }

    fn tag(&self, nonce: &[u8], id: u64) -> Vec<u8> {
        self.mac(&[b"tag", nonce, &id.to_be_bytes()])
    }

    fn mac(&self, parts: &[&[u8]]) -> Vec<u8> {
        let mut mac = match KeyMac::new_from_slice(&self.secret) {
            Ok(mac) => mac,
            Err(_) => unreachable!("HMAC takes keys of any length"),
        };
        for part in parts {
            mac.update(part);
        }
        mac.finalize().into_bytes().to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_look_like_acs_keys() {
        let codec = KeyCodec::new();
        let pkey = codec.encode(42);
        assert!(pkey.starts_with('@'));
        assert!((90..=130).contains(&pkey.len()), "{} chars", pkey.len());
        assert!(
            pkey[1..]
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        );
        assert_eq!(codec.decode(&pkey), Some(42));
        assert_eq!(codec.encode(42), pkey, "a profile's usual key is stable");
        assert_ne!(codec.encode(43)[..20], pkey[..20], "keys look unrelated");
        let other_key_same_profile = codec.encode_alternate(42);
        assert_ne!(pkey, other_key_same_profile);
        assert_eq!(codec.decode(&other_key_same_profile), Some(42));
    }

    #[test]
    fn keys_of_another_instance_and_garbage_do_not_decode() {
        let ours = KeyCodec::new();
        let theirs = KeyCodec::new();
        assert_eq!(ours.decode(&theirs.encode(1)), None);
        assert_eq!(ours.decode("@not-a-key"), None);
        assert_eq!(ours.decode("no-at-sign"), None);
    }
}
