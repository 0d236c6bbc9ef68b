"""panseal's exceptions: one class per kind of failure, all subclasses of
`PansealError`. `code` is the C ABI's result code (`Result`), so a code
means the same in C and in Python. No message ever contains a PAN."""

__all__ = [
    "Result", "PansealError", "InvalidArgument", "InvalidPan", "InvalidContext",
    "MalformedCiphertext", "DecryptionFailed", "KeyRefused", "KeyDestroyed",
    "KeyServiceUnavailable", "KeyServiceRefused", "KeyStoreError", "AuditError",
    "ConfigError", "BufferTooSmall", "ClientClosed", "MalformedPublicKey",
    "InvalidPublicKey", "PublicKeyNotPinned",
]


class Result:
    """Result codes of the C ABI (panseal_result); `PansealError.code`."""
    OK = 0
    NULL_ARGUMENT = 1
    INVALID_ARGUMENT = 2
    INVALID_PAN = 3
    INVALID_CONTEXT = 4
    MALFORMED_CIPHERTEXT = 5
    DECRYPTION_FAILED = 6
    KEY_REFUSED = 7
    KEY_DESTROYED = 8
    KEY_SERVICE_UNAVAILABLE = 9
    KEY_SERVICE_REFUSED = 10
    KEY_STORE_ERROR = 11
    AUDIT_ERROR = 12
    CONFIG_ERROR = 13
    BUFFER_TOO_SMALL = 14
    PANIC = 15
    CLIENT_CLOSED = 16
    MALFORMED_PUBLIC_KEY = 17
    INVALID_PUBLIC_KEY = 18
    PUBLIC_KEY_NOT_PINNED = 19


class PansealError(Exception):
    """A panseal call failed. `code` is a `Result` value, `message` the
    description (never containing a PAN); `retryable` says whether trying
    again later can help (the key service was unreachable or over quota)."""

    code = None

    def __init__(self, message, code=None):
        if code is not None:
            self.code = code
        super().__init__(f"{message} (code {self.code})")
        self.message = message

    @property
    def retryable(self):
        return self.code == Result.KEY_SERVICE_UNAVAILABLE


def _kind(name, code, doc, *bases):
    cls = type(name, (PansealError, *bases), {"code": code, "__doc__": doc,
                                              "__module__": "panseal"})
    _BY_CODE[code] = cls
    return cls


_BY_CODE = {}

InvalidArgument = _kind("InvalidArgument", Result.INVALID_ARGUMENT,
                        "An argument is malformed (bad UTF-8, unknown style, a wiped PAN).",
                        ValueError)
InvalidPan = _kind("InvalidPan", Result.INVALID_PAN,
                   "Not an acceptable PAN (Luhn, length, characters, track data).", ValueError)
InvalidContext = _kind("InvalidContext", Result.INVALID_CONTEXT,
                       "The context (table, column, row key) is not acceptable.", ValueError)
MalformedCiphertext = _kind("MalformedCiphertext", Result.MALFORMED_CIPHERTEXT,
                            "The ciphertext is malformed.", ValueError)
DecryptionFailed = _kind("DecryptionFailed", Result.DECRYPTION_FAILED,
                         "Authentication failed: altered, moved to another context, or "
                         "sealed under another key. No detail, by design.")
KeyRefused = _kind("KeyRefused", Result.KEY_REFUSED,
                   "The ciphertext's key is unknown, expired, or of another scope or "
                   "environment.")
KeyDestroyed = _kind("KeyDestroyed", Result.KEY_DESTROYED, "The ciphertext's key was destroyed.")
KeyServiceUnavailable = _kind("KeyServiceUnavailable", Result.KEY_SERVICE_UNAVAILABLE,
                              "The key service is unreachable or over quota: retry later.")
KeyServiceRefused = _kind("KeyServiceRefused", Result.KEY_SERVICE_REFUSED,
                          "The key service refused (permission, sealed, destroyed KEK, ...).")
KeyStoreError = _kind("KeyStoreError", Result.KEY_STORE_ERROR, "The key store failed.")
AuditError = _kind("AuditError", Result.AUDIT_ERROR,
                   "The audit sink failed or none is configured: opening refused.")
ConfigError = _kind("ConfigError", Result.CONFIG_ERROR, "The configuration is unusable.")
BufferTooSmall = _kind("BufferTooSmall", Result.BUFFER_TOO_SMALL,
                       "The output buffer is too small; nothing was written.", ValueError)
ClientClosed = _kind("ClientClosed", Result.CLIENT_CLOSED,
                     "The client (or sealer) was closed; nothing was done.")
MalformedPublicKey = _kind("MalformedPublicKey", Result.MALFORMED_PUBLIC_KEY,
                           "The ingest public key's text form is malformed.", ValueError)
InvalidPublicKey = _kind("InvalidPublicKey", Result.INVALID_PUBLIC_KEY,
                         "The ingest public key is not a point on P-256.", ValueError)
PublicKeyNotPinned = _kind("PublicKeyNotPinned", Result.PUBLIC_KEY_NOT_PINNED,
                           "The ingest public key is not the pinned one: refused.")


def _from_code(code, message):
    """The exception for a result code (called by the compiled module)."""
    cls = _BY_CODE.get(code)
    return cls(message) if cls else PansealError(message, code)
