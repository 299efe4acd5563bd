//! Managed objects sealed at rest. With `store.encryption_key`, every source, destination
//! and route made through the management API is stored encrypted — their secrets (signing
//! keys, OAuth client secrets, senders' secrets) are never in the database as text — and
//! opened when read back. AES-256-GCM, the key the SHA-256 of the configured text, a
//! random nonce per write, the object's kind and name as associated data (a sealed body
//! copied onto another row does not open). `store.previous_encryption_keys` still open
//! what older keys sealed, and each reload seals again with the current key what it read
//! sealed with an older one, or as text: rotation is a config change and a reload.

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use sha2::Digest as _;

use crate::config::StoreConfig;
use crate::store::ManagedObject;

/// What a sealed body starts with (the rest is base64 of the nonce and the ciphertext).
const PREFIX: &str = "sealed:v1:";

/// The shortest `store.encryption_key` taken: a random key, not a password.
pub const MIN_KEY_CHARS: usize = 32;

/// The keys a config names: the one that seals, and those that still open.
pub struct Sealer {
    current: Option<LessSafeKey>,
    previous: Vec<LessSafeKey>,
}

/// How a stored body was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Found {
    /// Sealed with the current key.
    Current,
    /// As text, or sealed with a previous key: to be sealed again with the current one.
    Stale,
}

fn key(text: &str) -> LessSafeKey {
    let digest = sha2::Sha256::digest(text.as_bytes());
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &digest).expect("a 32-byte key"))
}

fn aad(object: &ManagedObject) -> String {
    format!("{}/{}", object.kind, object.name)
}

impl Sealer {
    pub fn new(store: &StoreConfig) -> Self {
        Self {
            current: store.encryption_key.as_deref().map(key),
            previous: store
                .previous_encryption_keys
                .iter()
                .map(|k| key(k))
                .collect(),
        }
    }

    /// Whether [`Sealer::seal`] seals (there is a current key) or keeps text.
    pub fn seals(&self) -> bool {
        self.current.is_some()
    }

    /// The object as it is to be stored: its body sealed, if there is a key.
    pub fn seal(&self, mut object: ManagedObject) -> ManagedObject {
        let Some(key) = &self.current else {
            return object;
        };
        let mut nonce = [0u8; NONCE_LEN];
        aws_lc_rs::rand::fill(&mut nonce).expect("the system's random numbers");
        let aad = aad(&object);
        let mut sealed = std::mem::take(&mut object.body).into_bytes();
        key.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad.as_bytes()),
            &mut sealed,
        )
        .expect("AES-GCM seals any body");
        let mut out = nonce.to_vec();
        out.extend(sealed);
        object.body = format!("{PREFIX}{}", STANDARD.encode(out));
        object
    }

    /// The object as stored, opened; and whether it should be sealed again. An error says
    /// why it cannot be opened (no key, or none of the keys).
    pub fn open(&self, mut object: ManagedObject) -> Result<(ManagedObject, Found), String> {
        let Some(sealed) = object.body.strip_prefix(PREFIX) else {
            let found = match self.current {
                Some(_) => Found::Stale,
                None => Found::Current,
            };
            return Ok((object, found));
        };
        let what = || format!("stored {} `{}`", object.kind, object.name);
        let bytes = STANDARD
            .decode(sealed)
            .ok()
            .filter(|b| b.len() > NONCE_LEN)
            .ok_or_else(|| format!("{} is sealed, but not readably", what()))?;
        if self.current.is_none() && self.previous.is_empty() {
            return Err(format!(
                "{} is sealed: set store.encryption_key to the key that sealed it",
                what()
            ));
        }
        let (nonce, sealed) = bytes.split_at(NONCE_LEN);
        let keys = (self.current.iter().map(|k| (k, Found::Current)))
            .chain(self.previous.iter().map(|k| (k, Found::Stale)));
        for (key, found) in keys {
            let mut buffer = sealed.to_vec();
            let nonce = Nonce::try_assume_unique_for_key(nonce).expect("NONCE_LEN bytes");
            if let Ok(plain) =
                key.open_in_place(nonce, Aad::from(aad(&object).as_bytes()), &mut buffer)
            {
                let Ok(body) = String::from_utf8(plain.to_vec()) else {
                    break;
                };
                object.body = body;
                return Ok((object, found));
            }
        }
        Err(format!(
            "{} does not open with store.encryption_key or store.previous_encryption_keys: \
             list the key that sealed it",
            what()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(current: Option<&str>, previous: &[&str]) -> StoreConfig {
        StoreConfig {
            encryption_key: current.map(str::to_string),
            previous_encryption_keys: previous.iter().map(|k| k.to_string()).collect(),
            ..StoreConfig::default()
        }
    }

    fn object(body: &str) -> ManagedObject {
        ManagedObject {
            kind: "destination".into(),
            name: "fleet".into(),
            body: body.into(),
        }
    }

    const ONE: &str = "one-0123456789abcdef0123456789abcdef";
    const TWO: &str = "two-0123456789abcdef0123456789abcdef";

    #[test]
    fn a_sealed_body_opens_with_its_key_only_and_on_its_own_row() {
        let body = r#"{"name":"fleet","signing":{"secret":"whsec_abc"}}"#;
        let sealed = Sealer::new(&store(Some(ONE), &[])).seal(object(body));
        assert!(sealed.body.starts_with(PREFIX), "{}", sealed.body);
        assert!(!sealed.body.contains("whsec_abc"));
        // A random nonce each time.
        let again = Sealer::new(&store(Some(ONE), &[])).seal(object(body));
        assert_ne!(sealed.body, again.body);

        let opened = Sealer::new(&store(Some(ONE), &[]))
            .open(sealed.clone())
            .unwrap();
        assert_eq!((opened.0.body.as_str(), opened.1), (body, Found::Current));
        // Rotated: the old key opens it, and says to seal it again.
        let rotated = Sealer::new(&store(Some(TWO), &[ONE]))
            .open(sealed.clone())
            .unwrap();
        assert_eq!((rotated.0.body.as_str(), rotated.1), (body, Found::Stale));
        let wrong = Sealer::new(&store(Some(TWO), &[]))
            .open(sealed.clone())
            .unwrap_err();
        assert!(wrong.contains("destination `fleet`"), "{wrong}");
        let none = Sealer::new(&store(None, &[]))
            .open(sealed.clone())
            .unwrap_err();
        assert!(none.contains("set store.encryption_key"), "{none}");
        // Copied onto another object's row, it does not open.
        let moved = ManagedObject {
            name: "other".into(),
            ..sealed
        };
        assert!(Sealer::new(&store(Some(ONE), &[])).open(moved).is_err());
    }

    #[test]
    fn text_is_kept_without_a_key_and_sealed_again_with_one() {
        let plain = object("{}");
        let without = Sealer::new(&store(None, &[]));
        assert_eq!(without.seal(plain.clone()), plain);
        assert_eq!(without.open(plain.clone()).unwrap().1, Found::Current);
        let with = Sealer::new(&store(Some(ONE), &[]));
        assert_eq!(with.open(plain.clone()).unwrap().1, Found::Stale);
        // Turned off: the old key, now only a previous one, opens what it sealed, to be
        // stored as text again.
        let off = Sealer::new(&store(None, &[ONE]));
        let (opened, found) = off.open(with.seal(plain.clone())).unwrap();
        assert_eq!((opened, found), (plain.clone(), Found::Stale));
        assert!(!off.seals());
        assert_eq!(off.seal(plain.clone()), plain);
    }
}
