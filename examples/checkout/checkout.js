// panseal browser checkout: seals the card number in the page with the
// scope's ingest public key (HPKE, RFC 9180; FORMAT.md §17) and posts only
// the 134-character ciphertext. An implementation of the ingest format
// independent of the Rust crate: @hpke/core over WebCrypto.
//
// The same module runs in the browser (bundled by tests/js/build.mjs and
// served by examples/payments_backend.rs as /checkout.js) and under Node
// (tests/js/checkout.e2e.mjs --seal-only, the independent-implementation
// check).

import {
  Aes256Gcm,
  CipherSuite,
  DhkemP256HkdfSha256,
  HkdfSha256,
} from "@hpke/core";

/** Binary length of an ingest ciphertext (FORMAT.md §17). */
export const INGEST_LEN = 101;
/** Text length: "I1" + unpadded base64url of bytes 2..101. */
export const INGEST_TEXT_LEN = 134;
const VERSION = 0x01;
const KIND_HPKE_P256 = 0x02;
const HEADER_LEN = 10;
const POINT_LEN = 65;
const PACKED_LEN = 10;
const TAG_LEN = 16;
const INFO_LABEL = "panseal ingest v1";
const KEY_TAG_LABEL = "panseal ingest key";
const NAME_RE = /^[A-Za-z0-9._:-]{1,64}$/;

/** A refusal with a fixed code; its message never quotes the input. */
export class CheckoutError extends Error {
  constructor(code) {
    super(code);
    this.name = "CheckoutError";
    this.code = code;
  }
}

const utf8 = (s) => new TextEncoder().encode(s);

function concat(...parts) {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

const B64URL =
  "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/** Unpadded base64url (RFC 4648 §5). */
export function base64url(bytes) {
  let out = "";
  let i = 0;
  for (; i + 3 <= bytes.length; i += 3) {
    const n = (bytes[i] << 16) | (bytes[i + 1] << 8) | bytes[i + 2];
    out += B64URL[n >> 18] + B64URL[(n >> 12) & 63] + B64URL[(n >> 6) & 63] + B64URL[n & 63];
  }
  const rest = bytes.length - i;
  if (rest === 1) {
    const n = bytes[i] << 16;
    out += B64URL[n >> 18] + B64URL[(n >> 12) & 63];
  } else if (rest === 2) {
    const n = (bytes[i] << 16) | (bytes[i + 1] << 8);
    out += B64URL[n >> 18] + B64URL[(n >> 12) & 63] + B64URL[(n >> 6) & 63];
  }
  return out;
}

/** Decodes unpadded, canonical base64url; throws CheckoutError otherwise. */
export function fromBase64url(text) {
  if (text.length % 4 === 1) throw new CheckoutError("public-key-text");
  const out = [];
  let acc = 0;
  let bits = 0;
  for (const ch of text) {
    const v = B64URL.indexOf(ch);
    if (v < 0) throw new CheckoutError("public-key-text");
    acc = (acc << 6) | v;
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      out.push((acc >> bits) & 0xff);
    }
  }
  if ((acc & ((1 << bits) - 1)) !== 0) throw new CheckoutError("public-key-text");
  return new Uint8Array(out);
}

/**
 * The card number as typed → its digits. Spaces and dashes are removed
 * (FORMAT.md §3 step 1); anything else, a length outside 12..19 (the
 * crate's default) or a failed Luhn check is refused.
 */
export function normalizePan(input) {
  const digits = String(input).replace(/[ -]/g, "");
  if (!/^[0-9]{12,19}$/.test(digits)) throw new CheckoutError("invalid-card-number");
  let sum = 0;
  for (let i = 0; i < digits.length; i++) {
    let d = digits.charCodeAt(digits.length - 1 - i) - 48;
    if (i % 2 === 1) {
      d *= 2;
      if (d > 9) d -= 9;
    }
    sum += d;
  }
  if (sum % 10 !== 0) throw new CheckoutError("invalid-card-number");
  return digits;
}

/** FORMAT.md §3: one nibble per digit, high nibble first, padded with 0xF to 10 bytes. */
export function packPan(digits) {
  const packed = new Uint8Array(PACKED_LEN).fill(0xff);
  for (let i = 0; i < digits.length; i++) {
    const d = digits.charCodeAt(i) - 48;
    const byte = i >> 1;
    packed[byte] = i % 2 === 0 ? (d << 4) | 0x0f : (packed[byte] & 0xf0) | d;
  }
  return packed;
}

/** FORMAT.md §2: u16be(len) || bytes, for table, column and row key. */
export function encodeContext(table, column, rowKey) {
  const parts = [];
  for (const [value, max] of [
    [table, 255],
    [column, 255],
    [rowKey, 512],
  ]) {
    const b = typeof value === "string" ? utf8(value) : value;
    if (b.length < 1 || b.length > max) throw new CheckoutError("context");
    parts.push(new Uint8Array([b.length >> 8, b.length & 0xff]), b);
  }
  return concat(...parts);
}

/** Parses `PIK1/<environment>/<scope>/<version>/<base64url point>`. */
export function parsePublicKey(text) {
  const parts = String(text).trim().split("/");
  if (parts.length !== 5 || parts[0] !== "PIK1") throw new CheckoutError("public-key-text");
  const [, environment, scope, versionText, pointText] = parts;
  if (!NAME_RE.test(environment) || !NAME_RE.test(scope)) {
    throw new CheckoutError("public-key-text");
  }
  if (!/^[0-9]{1,10}$/.test(versionText) || Number(versionText) > 0xffffffff) {
    throw new CheckoutError("public-key-text");
  }
  const point = fromBase64url(pointText);
  if (point.length !== POINT_LEN || point[0] !== 0x04) throw new CheckoutError("public-key");
  return { environment, scope, version: Number(versionText), point };
}

/** HPKE info (FORMAT.md §17): label || 0x00 || len(env) || env || len(scope) || scope || u32be(version). */
export function infoBytes(environment, scope, version) {
  const env = utf8(environment);
  const sc = utf8(scope);
  return concat(
    utf8(INFO_LABEL),
    new Uint8Array([0, env.length]),
    env,
    new Uint8Array([sc.length]),
    sc,
    u32be(version),
  );
}

function u32be(v) {
  return new Uint8Array([(v >>> 24) & 0xff, (v >>> 16) & 0xff, (v >>> 8) & 0xff, v & 0xff]);
}

/** SHA-256("panseal ingest key" || point)[0..4]. */
export async function keyTag(point) {
  const d = await crypto.subtle.digest("SHA-256", concat(utf8(KEY_TAG_LABEL), point));
  return new Uint8Array(d).slice(0, 4);
}

/** SHA-256 of the point, hex: the fingerprint a front end pins. */
export async function fingerprint(point) {
  const d = new Uint8Array(await crypto.subtle.digest("SHA-256", point));
  return Array.from(d, (b) => b.toString(16).padStart(2, "0")).join("");
}

const suite = new CipherSuite({
  kem: new DhkemP256HkdfSha256(),
  kdf: new HkdfSha256(),
  aead: new Aes256Gcm(),
});

/**
 * Seals card digits with the public key (text form or parsed) bound to
 * (table, column, rowKey); returns the 134-character text form. The packed
 * PAN is overwritten before returning.
 */
export async function sealPan(publicKey, digits, table, column, rowKey) {
  const key = typeof publicKey === "string" ? parsePublicKey(publicKey) : publicKey;
  const header = concat(
    new Uint8Array([VERSION, KIND_HPKE_P256]),
    await keyTag(key.point),
    u32be(key.version),
  );
  const aad = concat(header, encodeContext(table, column, rowKey));
  // deserializePublicKey imports the point into WebCrypto, which refuses
  // a point that is not on P-256.
  let recipientPublicKey;
  try {
    recipientPublicKey = await suite.kem.deserializePublicKey(key.point);
  } catch {
    throw new CheckoutError("public-key");
  }
  const packed = packPan(normalizePan(digits));
  let sealed;
  try {
    sealed = await suite.seal(
      { recipientPublicKey, info: infoBytes(key.environment, key.scope, key.version) },
      packed,
      aad,
    );
  } finally {
    packed.fill(0);
  }
  const enc = new Uint8Array(sealed.enc);
  const ct = new Uint8Array(sealed.ct); // ciphertext || tag
  if (enc.length !== POINT_LEN || ct.length !== PACKED_LEN + TAG_LEN) {
    throw new CheckoutError("seal");
  }
  const bytes = concat(header, enc, ct);
  if (bytes.length !== INGEST_LEN) throw new CheckoutError("seal");
  return "I1" + base64url(bytes.subarray(2));
}

/** Last four digits, for the confirmation the page shows (never sent). */
function lastFour(digits) {
  return digits.slice(-4);
}

/**
 * Wires the checkout form of `doc`: the card input has no `name`, so no
 * native submit could carry it (and the page's CSP forbids form
 * submission); the script seals and posts `{order_id, card}` only.
 */
export function mount(doc) {
  const form = doc.getElementById("checkout");
  if (!form) return;
  const input = doc.getElementById("card-number");
  const button = doc.getElementById("pay");
  const status = doc.getElementById("status");
  const { ingestKey, table, column, orderId } = form.dataset;
  const show = (text, kind) => {
    status.textContent = text;
    status.className = kind;
  };
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    button.disabled = true;
    let digits;
    try {
      digits = normalizePan(input.value);
    } catch {
      show("That card number is not valid.", "error");
      button.disabled = false;
      return;
    }
    try {
      const card = await sealPan(ingestKey, digits, table, column, orderId);
      const four = lastFour(digits);
      digits = "";
      input.value = "";
      const resp = await fetch("/checkout", {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify({ order_id: orderId, card }),
        credentials: "omit",
        cache: "no-store",
      });
      const answer = await resp.json().catch(() => ({}));
      if (resp.ok) {
        form.classList.add("done");
        show(`Payment received: order ${orderId}, card ending ${four}.`, "ok");
      } else {
        show(`Payment refused (${answer.reason || resp.status}).`, "error");
        button.disabled = false;
      }
    } catch (e) {
      show(`Payment failed (${e instanceof CheckoutError ? e.code : "network"}).`, "error");
      button.disabled = false;
    }
  });
  button.disabled = false;
}

if (typeof document !== "undefined") {
  mount(document);
}
