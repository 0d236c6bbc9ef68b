"""panseal from Python: a compiled extension (PyO3) on the panseal Rust
library.

    import panseal
    with panseal.Client({"environment": "dev", "scope": "merchant-42",
                         "key_service": {"type": "local"},
                         "key_store": {"type": "memory"},
                         "audit": {"type": "memory"}}) as client:
        sealed = client.seal("4111 1111 1111 1111", "cards", "pan", "row-1")
        pan, needs_reseal = client.open(sealed, "cards", "pan", "row-1",
                                        principal="agent-7", purpose="refund")
        with pan:                       # a RevealedPan: wiped at the end
            print(pan)                  # ************1111
            buf = bytearray(19)
            n = pan.copy_into(buf)      # the digits, into memory you wipe
            ...
            buf[:] = bytes(len(buf))

`key_service` may also be `{"type": "keyd", ...}`, `{"type": "pkcs11",
"module": ..., "token": ..., "kek": ..., "pin_file": ...}` (or `pin_env`;
a PIN inline is refused) or `{"type": "aws-kms", "kek": ..., "region":
...}` (credentials from the AWS standard chain): README, "Using panseal
from C / Python / other languages".

A front end that must hold nothing able to open a stored PAN seals with
a scope's ingest *public* key only (write-only ingest, HPKE; no key
service, no credential):

    sealer = panseal.IngestSealer("PIK1/prod/merchant-42/1/BPq...")
    stored = sealer.seal("4111 1111 1111 1111", "cards", "pan", "row-1")
    # 134 characters, "I1..."; the key service admits or reveals it.

PANs: `Pan` and `RevealedPan` keep the digits in Rust memory, print only
masked (`str`, `repr`), and are wiped by `wipe()`, at the end of a `with`
block and when freed. The digits leave only into a caller's `bytearray`
(`copy_into`) or as an explicit `str` copy (`expose_digits()`), which
Python cannot wipe. A PAN given as `str` is Python's own immutable copy:
pass a `bytearray` (and wipe it) or a `Pan` to avoid one.

Errors: every failure raises a subclass of `PansealError` named for its
kind (`InvalidPan`, `DecryptionFailed`, `KeyServiceUnavailable`, ...);
`code` is the C ABI's `Result` code. No message contains a PAN.

Threads: a `Client` or `IngestSealer` may be shared by threads; every
call releases the GIL. `close()` (also at the end of a `with` block)
refuses new calls with `ClientClosed`, waits for the calls running on
other threads, then drops the client (its keys are wiped).
"""

from ._native import Client, IngestSealer, Pan, RevealedPan, mask, version
from .errors import (AuditError, BufferTooSmall, ClientClosed, ConfigError,
                     DecryptionFailed, InvalidArgument, InvalidContext, InvalidPan,
                     InvalidPublicKey, KeyDestroyed, KeyRefused, KeyServiceRefused,
                     KeyServiceUnavailable, KeyStoreError, MalformedCiphertext,
                     MalformedPublicKey, PansealError, PublicKeyNotPinned, Result)

__all__ = [
    "Client", "IngestSealer", "Pan", "RevealedPan", "mask", "version",
    "PansealError", "Result", "InvalidArgument", "InvalidPan", "InvalidContext",
    "MalformedCiphertext", "DecryptionFailed", "KeyRefused", "KeyDestroyed",
    "KeyServiceUnavailable", "KeyServiceRefused", "KeyStoreError", "AuditError",
    "ConfigError", "BufferTooSmall", "ClientClosed", "MalformedPublicKey",
    "InvalidPublicKey", "PublicKeyNotPinned",
]

# Constants of the C ABI's buffers, kept for code written against the
# ctypes wrapper (a revealed PAN fits PAN_BUFFER - 1 bytes).
SEALED_TEXT_BUFFER = 65
SEALED_BINARY_LEN = 48
PAN_BUFFER = 20
INDEX_BUFFER = 65
INGEST_TEXT_BUFFER = 135
INGEST_BINARY_LEN = 101
FINGERPRINT_BUFFER = 65
MASK_STYLES = {"last4": 0, "bin6": 1, "bin8": 2}
