//! The AEAD step of format v1: seal a packed PAN under an expanded AES-256-GCM
//! key with a given nonce, and open it. Allocation-free for contexts whose
//! associated data fits `AAD_STACK` bytes.

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
use crate::format::{self, SealedPan, V1_LEN};
use crate::keys::KeyId;
use crate::pan::Pan;

/// Largest associated data assembled on the stack; longer contexts use one
/// heap allocation.
const AAD_STACK: usize = 256;

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
pub(crate) fn seal_raw(
    cipher: &Aes256Gcm,
    id: KeyId,
    nonce: [u8; format::NONCE_LEN],
    pan: &Pan,
    context: &Context,
) -> SealedPan {
    let mut out = [0u8; V1_LEN];
    let mut header = [0u8; format::V1_HEADER_LEN];
    format::write::write_header(id, &mut header);
    out[..format::V1_HEADER_LEN].copy_from_slice(&header);
    out[format::NONCE_AT..format::CT_AT].copy_from_slice(&nonce);
    let mut packed = [0u8; format::PACKED_LEN];
    format::write::pack_pan(pan, &mut packed);
    // Encryption fails only for messages longer than GCM allows; 10 bytes
    // never are.
    let tag = with_aad(&header, context, |aad| {
        cipher.encrypt_in_place_detached(Nonce::from_slice(&nonce), aad, &mut packed)
    })
    .unwrap_or_default();
    out[format::CT_AT..format::TAG_AT].copy_from_slice(&packed);
    out[format::TAG_AT..].copy_from_slice(&tag);
    packed.zeroize();
    SealedPan::from_array(out)
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
    let mut out = [0u8; V1_LEN];
    let mut header = [0u8; format::V1_HEADER_LEN];
    format::write::write_header(id, &mut header);
    out[..format::V1_HEADER_LEN].copy_from_slice(&header);
    out[format::NONCE_AT..format::CT_AT].copy_from_slice(&nonce);
    let mut buf = *plaintext;
    // Encryption fails only for messages longer than GCM allows; 10 bytes
    // never are.
    let tag = with_aad(&header, context, |aad| {
        cipher.encrypt_in_place_detached(Nonce::from_slice(&nonce), aad, &mut buf)
    })
    .unwrap_or_default();
    out[format::CT_AT..format::TAG_AT].copy_from_slice(&buf);
    out[format::TAG_AT..].copy_from_slice(&tag);
    buf.zeroize();
    SealedPan::from_array(out)
}

/// Opens a sealed PAN bound to `context` under `cipher`.
///
/// Every authentication failure is the opaque [`Error::Decryption`]; a
/// payload that authenticates but is not a packed PAN is
/// [`crate::FormatError::Payload`].
pub(crate) fn open_raw(
    cipher: &Aes256Gcm,
    sealed: &SealedPan,
    context: &Context,
) -> Result<Pan, Error> {
    let mut packed = [0u8; format::PACKED_LEN];
    packed.copy_from_slice(sealed.ciphertext());
    let decrypted = with_aad(sealed.header(), context, |aad| {
        cipher.decrypt_in_place_detached(
            Nonce::from_slice(sealed.nonce()),
            aad,
            &mut packed,
            Tag::from_slice(sealed.tag()),
        )
    });
    if decrypted.is_err() {
        return Err(Error::Decryption);
    }
    let pan = format::read::unpack_pan(&packed);
    packed.zeroize();
    Ok(pan?)
}

/// Runs `f` with `header || context.encoded()` as one slice, on the stack
/// for the common short contexts.
fn with_aad<R>(header: &[u8], context: &Context, f: impl FnOnce(&[u8]) -> R) -> R {
    fn on_stack<const N: usize, R>(header: &[u8], enc: &[u8], f: impl FnOnce(&[u8]) -> R) -> R {
        let total = header.len() + enc.len();
        let mut buf = [0u8; N];
        buf[..header.len()].copy_from_slice(header);
        buf[header.len()..total].copy_from_slice(enc);
        f(&buf[..total])
    }
    let enc = context.encoded();
    let total = header.len() + enc.len();
    if total <= 48 {
        on_stack::<48, R>(header, enc, f)
    } else if total <= AAD_STACK {
        on_stack::<AAD_STACK, R>(header, enc, f)
    } else {
        let mut v = Vec::with_capacity(total);
        v.extend_from_slice(header);
        v.extend_from_slice(enc);
        f(&v)
    }
}
