//! The AEAD step of format v1: the nonce generator, and AES-256-GCM under an
//! expanded key over the bytes `format` lays out (packed PAN, header,
//! associated data: `format::write::seal_v1`, `format::read::open_v1`).
//! Allocation-free for contexts whose associated data fits 256 bytes.

use std::cell::{Cell, RefCell};

use aes_gcm::aead::AeadInPlace;
use aes_gcm::{Aes256Gcm, Nonce, Tag};
use rand::rngs::adapter::ReseedingRng;
use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};
use rand_core::block::BlockRngCore;
use rand_core::OsRng;
use zeroize::Zeroize;

use crate::context::Context;
use crate::error::Error;
use crate::format::{self, SealedPan};
use crate::keys::KeyId;
use crate::pan::Pan;

/// Bytes of nonces between two reseeds from the OS (as `rand`'s
/// `ThreadRng`: 64 KiB, about 5,400 nonces).
const RESEED_AFTER: u64 = 64 * 1024;

/// The nonce generator's block function: ChaCha12 (`StdRng`), read out one
/// nonce (three words) per block. `ReseedingRng` checks for a `fork()`
/// before every block it generates, so with one nonce per block the check
/// runs before every nonce: no output buffered before a fork can be handed
/// out after it, in the parent or the child. (`rand`'s `ThreadRng` buffers
/// 64 words per block, so a child repeated the parent's next nonces.)
struct NonceCore(StdRng);

impl BlockRngCore for NonceCore {
    type Item = u32;
    type Results = [u32; 3];

    fn generate(&mut self, results: &mut [u32; 3]) {
        for word in results {
            *word = self.0.next_u32();
        }
    }
}

impl SeedableRng for NonceCore {
    type Seed = [u8; 32];

    fn from_seed(seed: [u8; 32]) -> Self {
        NonceCore(StdRng::from_seed(seed))
    }
}

/// Seeds the generator from the OS, and notes the process id each time:
/// `ReseedingRng` reseeds after a `fork()` (in both processes) and after
/// [`RESEED_AFTER`] bytes, so the thread's idea of its process is renewed
/// before the first nonce handed out after a fork.
struct Reseeder;

impl RngCore for Reseeder {
    fn next_u32(&mut self) -> u32 {
        PID.with(|p| p.set(std::process::id()));
        OsRng.next_u32()
    }

    fn next_u64(&mut self) -> u64 {
        PID.with(|p| p.set(std::process::id()));
        OsRng.next_u64()
    }

    fn fill_bytes(&mut self, dest: &mut [u8]) {
        PID.with(|p| p.set(std::process::id()));
        OsRng.fill_bytes(dest);
    }

    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand_core::Error> {
        PID.with(|p| p.set(std::process::id()));
        OsRng.try_fill_bytes(dest)
    }
}

type NonceRng = ReseedingRng<NonceCore, Reseeder>;

fn new_nonce_rng() -> RefCell<NonceRng> {
    let mut seed = [0u8; 32];
    OsRng.fill_bytes(&mut seed);
    let core = NonceCore::from_seed(seed);
    seed.zeroize();
    PID.with(|p| p.set(std::process::id()));
    RefCell::new(ReseedingRng::new(core, RESEED_AFTER, Reseeder))
}

thread_local! {
    static NONCES: RefCell<NonceRng> = new_nonce_rng();
    /// The id of the process this thread's generator was last seeded in.
    static PID: Cell<u32> = const { Cell::new(0) };
}

/// A 96-bit nonce from a thread-local CSPRNG (ChaCha12 seeded from the OS,
/// reseeded every 64 KiB and after every `fork()`), with the id of the
/// process it was drawn in: an OS call per nonce (`getrandom`, or `getpid`
/// to detect a fork) would cost more than the whole seal.
///
/// The process id is exact: a thread's generator is seeded (and the id
/// read) when the thread first seals, and again before its first nonce
/// after a `fork()` (registered with `pthread_atfork` by `rand`). A
/// caller compares it with the id its DEK was made in, so a forked child
/// never seals under its parent's DEK.
#[inline]
pub(crate) fn fresh_nonce() -> ([u8; format::NONCE_LEN], u32) {
    let mut nonce = [0u8; format::NONCE_LEN];
    let drawn = NONCES.try_with(|rng| match rng.try_borrow_mut() {
        Ok(mut rng) => {
            rng.fill_bytes(&mut nonce);
            true
        }
        Err(_) => false,
    });
    if drawn == Ok(true) {
        if let Ok(pid) = PID.try_with(Cell::get) {
            return (nonce, pid);
        }
    }
    // A thread being torn down (its thread-locals gone): straight from the
    // OS.
    OsRng.fill_bytes(&mut nonce);
    (nonce, std::process::id())
}

/// Seals `pan` bound to `context` under `cipher` (the DEK `id`).
#[inline]
pub(crate) fn seal_raw(
    cipher: &Aes256Gcm,
    id: KeyId,
    nonce: [u8; format::NONCE_LEN],
    pan: &Pan,
    context: &Context,
) -> SealedPan {
    let mut packed = [0u8; format::PACKED_LEN];
    format::write::pack_pan(pan, &mut packed);
    format::write::seal_v1(id, nonce, &mut packed, context.encoded(), |n, aad, buf| {
        encrypt(cipher, n, aad, buf)
    })
}

/// Seals 10 plaintext bytes as they are, as [`seal_raw`] seals a packed PAN
/// (through `hazmat`, for fuzzing the open path past the tag).
#[cfg(feature = "hazmat-test-keys")]
pub(crate) fn seal_packed(
    cipher: &Aes256Gcm,
    id: KeyId,
    nonce: [u8; format::NONCE_LEN],
    plaintext: &[u8; format::PACKED_LEN],
    context: &Context,
) -> SealedPan {
    let mut buf = *plaintext;
    format::write::seal_v1(id, nonce, &mut buf, context.encoded(), |n, aad, buf| {
        encrypt(cipher, n, aad, buf)
    })
}

/// AES-256-GCM in place; the tag.
#[inline(always)]
fn encrypt(
    cipher: &Aes256Gcm,
    nonce: &[u8; format::NONCE_LEN],
    aad: &[u8],
    buf: &mut [u8; format::PACKED_LEN],
) -> [u8; format::TAG_LEN] {
    // Encryption fails only for messages longer than GCM allows; 10 bytes
    // never are.
    cipher
        .encrypt_in_place_detached(Nonce::from_slice(nonce), aad, buf)
        .map(Into::into)
        .unwrap_or_default()
}

/// Opens a sealed PAN bound to `context` under `cipher`.
///
/// Every authentication failure is the opaque [`Error::Decryption`]; a
/// payload that authenticates but is not a packed PAN is
/// [`crate::FormatError::Payload`].
#[inline]
pub(crate) fn open_raw(
    cipher: &Aes256Gcm,
    sealed: &SealedPan,
    context: &Context,
) -> Result<Pan, Error> {
    format::read::open_v1(sealed, context.encoded(), |nonce, aad, buf, tag| {
        cipher
            .decrypt_in_place_detached(Nonce::from_slice(nonce), aad, buf, Tag::from_slice(tag))
            .is_ok()
    })
}

/// The AEAD of feature `fast-aead`: ring's AES-256-GCM over the same bytes
/// (`format::write::seal_v1`, `format::read::open_v1`), so either backend
/// opens what the other sealed.
#[cfg(feature = "fast-aead")]
pub(crate) mod fast {
    use ring::aead::{Aad, LessSafeKey, Nonce, Tag, UnboundKey, AES_256_GCM};

    use super::{Context, Error, KeyId, Pan, SealedPan};
    use crate::format;

    /// ring's expanded AES-256-GCM key for `key`. ring does not wipe it on
    /// drop (see the feature's documentation).
    pub(crate) fn key(key: &[u8; 32]) -> Option<LessSafeKey> {
        UnboundKey::new(&AES_256_GCM, key)
            .ok()
            .map(LessSafeKey::new)
    }

    /// As [`super::seal_raw`], with ring.
    #[inline]
    pub(crate) fn seal_raw(
        key: &LessSafeKey,
        id: KeyId,
        nonce: [u8; format::NONCE_LEN],
        pan: &Pan,
        context: &Context,
    ) -> SealedPan {
        let mut packed = [0u8; format::PACKED_LEN];
        format::write::pack_pan(pan, &mut packed);
        format::write::seal_v1(id, nonce, &mut packed, context.encoded(), |n, aad, buf| {
            // Fails only for messages longer than GCM allows.
            key.seal_in_place_separate_tag(Nonce::assume_unique_for_key(*n), Aad::from(aad), buf)
                .map(|tag| {
                    let mut out = [0u8; format::TAG_LEN];
                    out.copy_from_slice(tag.as_ref());
                    out
                })
                .unwrap_or_default()
        })
    }

    /// As [`super::open_raw`], with ring (whose tag check is constant-time).
    #[inline]
    pub(crate) fn open_raw(
        key: &LessSafeKey,
        sealed: &SealedPan,
        context: &Context,
    ) -> Result<Pan, Error> {
        format::read::open_v1(sealed, context.encoded(), |nonce, aad, buf, tag| {
            let (Ok(nonce), Ok(tag)) = (
                Nonce::try_assume_unique_for_key(nonce),
                <[u8; format::TAG_LEN]>::try_from(tag),
            ) else {
                return false;
            };
            key.open_in_place_separate_tag(nonce, Aad::from(aad), Tag::from(tag), buf, 0..)
                .is_ok()
        })
    }
}

#[cfg(test)]
mod tests {
    use aes_gcm::KeyInit;

    use super::*;

    fn cipher() -> Aes256Gcm {
        Aes256Gcm::new(&[7u8; 32].into())
    }

    #[test]
    fn seals_to_the_format_and_opens() {
        let pan = Pan::parse("4111111111111111").unwrap();
        let ctx = Context::new("cards", "pan", "42").unwrap();
        let id = KeyId::from_bytes([1, 2, 3, 4, 5, 6, 7, 8]);
        let sealed = seal_raw(&cipher(), id, [9u8; 12], &pan, &ctx);
        let bytes = sealed.as_bytes();
        assert_eq!(&bytes[..2], &[format::V1, format::ALG_AES256GCM_PACKED]);
        assert_eq!(&bytes[2..10], id.as_bytes());
        assert_eq!(&bytes[10..22], &[9u8; 12]);
        assert_eq!(open_raw(&cipher(), &sealed, &ctx).unwrap(), pan);
        let other = Context::new("cards", "pan", "43").unwrap();
        assert!(matches!(
            open_raw(&cipher(), &sealed, &other),
            Err(Error::Decryption)
        ));
    }

    /// Both AEAD backends produce the same bytes and open each other's
    /// ciphertexts; both refuse a flipped bit and another context.
    #[cfg(feature = "fast-aead")]
    #[test]
    fn backends_read_each_other() {
        let ring_key = fast::key(&[7u8; 32]).unwrap();
        let ctx = Context::new("cards", "pan", "0001234567").unwrap();
        let other = Context::new("cards", "pan", "0001234568").unwrap();
        let long = Context::new("t", "c", vec![b'r'; 400]).unwrap();
        let id = KeyId::from_bytes([8, 7, 6, 5, 4, 3, 2, 1]);
        let mut opened = 0;
        for (i, digits) in [
            "4111111111111111",
            "378282246310005",
            "6011000990139424",
            "4000000000000000006",
            "42424242",
        ]
        .iter()
        .enumerate()
        {
            let Ok(pan) =
                Pan::parse_with(digits, &crate::pan::PanRules::with_min_digits(8).unwrap())
            else {
                continue;
            };
            for ctx in [&ctx, &long] {
                let nonce = [i as u8; 12];
                let a = seal_raw(&cipher(), id, nonce, &pan, ctx);
                let b = fast::seal_raw(&ring_key, id, nonce, &pan, ctx);
                assert_eq!(a, b, "same bytes from both backends");
                assert_eq!(fast::open_raw(&ring_key, &a, ctx).unwrap(), pan);
                assert_eq!(open_raw(&cipher(), &b, ctx).unwrap(), pan);
                opened += 2;
                let (fresh, _) = fresh_nonce();
                let b = fast::seal_raw(&ring_key, id, fresh, &pan, ctx);
                assert_eq!(open_raw(&cipher(), &b, ctx).unwrap(), pan);
                let mut flipped: [u8; format::V1_LEN] = b.as_bytes().try_into().unwrap();
                flipped[47] ^= 1;
                let flipped = SealedPan::from_array(flipped);
                assert!(matches!(
                    fast::open_raw(&ring_key, &flipped, ctx),
                    Err(Error::Decryption)
                ));
                assert!(matches!(
                    open_raw(&cipher(), &flipped, ctx),
                    Err(Error::Decryption)
                ));
                assert!(matches!(
                    fast::open_raw(&ring_key, &b, &other),
                    Err(Error::Decryption)
                ));
            }
        }
        assert!(opened >= 16, "opened {opened}");
    }
}
