//! Access codes (PINs): validation and the keyed hash that is all we ever store.

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The site's secret key for PIN hashes. PINs are short, so an unkeyed hash would be
/// reversed by trying every code; with the key kept outside the database it cannot.
#[derive(Clone)]
pub struct PinKey([u8; 32]);

impl std::fmt::Debug for PinKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PinKey(..)")
    }
}

impl PinKey {
    /// Wraps 32 key bytes.
    pub fn new(bytes: [u8; 32]) -> Self {
        PinKey(bytes)
    }

    /// HMAC-SHA256 of the PIN under this key.
    pub fn hash(&self, pin: &str) -> [u8; 32] {
        // A key of any length is valid for HMAC: new_from_slice cannot fail here.
        let mut mac =
            <Hmac<Sha256> as Mac>::new_from_slice(&self.0).expect("HMAC takes any key length");
        mac.update(b"unitgate-pin-v1\0");
        mac.update(pin.as_bytes());
        mac.finalize().into_bytes().into()
    }
}

/// Checks that an access code is 4 to 10 ASCII digits. The message never echoes the code.
pub fn validate(pin: &str) -> Result<(), &'static str> {
    if (4..=10).contains(&pin.len()) && pin.bytes().all(|b| b.is_ascii_digit()) {
        Ok(())
    } else {
        Err("must be 4 to 10 digits")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validates_length_and_digits() {
        assert!(validate("1234").is_ok());
        assert!(validate("1234567890").is_ok());
        for bad in ["123", "12345678901", "12a4", "", " 1234", "１２３４"] {
            assert!(validate(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn hash_depends_on_key_and_pin() {
        let (a, b) = (PinKey::new([1; 32]), PinKey::new([2; 32]));
        assert_eq!(a.hash("1234"), a.hash("1234"));
        assert_ne!(a.hash("1234"), a.hash("1235"));
        assert_ne!(a.hash("1234"), b.hash("1234"));
        assert_eq!(format!("{a:?}"), "PinKey(..)");
    }
}
