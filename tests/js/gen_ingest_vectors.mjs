// Independent generator of tests/vectors/ingest_v1.json: an implementation
// of FORMAT.md §17 (ingest ciphertext, HPKE) written from the document
// alone, on @hpke/core (RFC 9180) under Node. Its own PAN packing (§3),
// context encoding (§2), header, key tag and info; nothing from the Rust
// crate. Deterministic: recipient keys from DeriveKeyPair(ikmR), the
// ephemeral key from DeriveKeyPair(ikmE) through the `ekm` test option.
//
//   npm ci --prefix tests/js
//   node tests/js/gen_ingest_vectors.mjs > tests/vectors/ingest_v1.json
//
// (`--check` compares with the committed file instead of printing.)

import { createHash } from "node:crypto";
import { readFileSync } from "node:fs";
import {
  Aes256Gcm,
  CipherSuite,
  DhkemP256HkdfSha256,
  HkdfSha256,
} from "@hpke/core";

const suite = new CipherSuite({
  kem: new DhkemP256HkdfSha256(),
  kdf: new HkdfSha256(),
  aead: new Aes256Gcm(),
});

const enc = new TextEncoder();
const hex = (b) => Buffer.from(b).toString("hex");
const cat = (...parts) => {
  const n = parts.reduce((a, p) => a + p.length, 0);
  const out = new Uint8Array(n);
  let o = 0;
  for (const p of parts) {
    out.set(p, o);
    o += p.length;
  }
  return out;
};
const u16 = (n) => Uint8Array.of(n >> 8, n & 0xff);
const u32 = (n) => Uint8Array.of(n >>> 24, (n >>> 16) & 0xff, (n >>> 8) & 0xff, n & 0xff);
const b64url = (b) => Buffer.from(b).toString("base64url");

// FORMAT §2: u16be(len) || table || u16be(len) || column || u16be(len) || row key.
function contextBytes(ctx) {
  const t = enc.encode(ctx.table);
  const c = enc.encode(ctx.column);
  const r = Buffer.from(ctx.row_key_hex, "hex");
  return cat(u16(t.length), t, u16(c.length), c, u16(r.length), r);
}

// FORMAT §3: one nibble per digit, high nibble first, padded with 0xF to 20.
function packPan(digits) {
  const nibbles = [...digits].map((d) => d.charCodeAt(0) - 48);
  while (nibbles.length < 20) nibbles.push(0xf);
  const out = new Uint8Array(10);
  for (let i = 0; i < 10; i++) out[i] = (nibbles[2 * i] << 4) | nibbles[2 * i + 1];
  return out;
}

// Luhn check digit for a prefix.
function luhn(prefix) {
  for (let d = 0; d < 10; d++) {
    const s = prefix + d;
    let sum = 0;
    for (let i = 0; i < s.length; i++) {
      let v = s.charCodeAt(s.length - 1 - i) - 48;
      if (i % 2 === 1) {
        v *= 2;
        if (v > 9) v -= 9;
      }
      sum += v;
    }
    if (sum % 10 === 0) return s;
  }
  throw new Error("unreachable");
}

// FORMAT §17: info = "panseal ingest v1" || 0x00 || u8 len(env) || env
// || u8 len(scope) || scope || u32be(version).
function infoBytes(env, scope, version) {
  const e = enc.encode(env);
  const s = enc.encode(scope);
  return cat(enc.encode("panseal ingest v1"), Uint8Array.of(0, e.length), e, Uint8Array.of(s.length), s, u32(version));
}

// Key tag = SHA-256("panseal ingest key" || 65-byte point)[0..4].
function keyTag(point) {
  return createHash("sha256").update(enc.encode("panseal ingest key")).update(point).digest().subarray(0, 4);
}

function header(point, version) {
  return cat(Uint8Array.of(0x01, 0x02), keyTag(point), u32(version));
}

const ikm = (label) => createHash("sha256").update(label).digest();

async function recipient(label) {
  const kp = await suite.kem.deriveKeyPair(ikm(label));
  const sk = new Uint8Array(await suite.kem.serializePrivateKey(kp.privateKey));
  const pk = new Uint8Array(await suite.kem.serializePublicKey(kp.publicKey));
  return { kp, sk, pk };
}

// Seals 10 plaintext bytes; `sealInfo` overrides the info (negative cases).
async function seal(r, env, scope, version, ctx, plaintext, ekmLabel, sealInfo) {
  const info = sealInfo ?? infoBytes(env, scope, version);
  const hdr = header(r.pk, version);
  const aad = cat(hdr, contextBytes(ctx));
  const sender = await suite.createSenderContext({
    recipientPublicKey: r.kp.publicKey,
    info,
    ekm: ikm(ekmLabel),
  });
  const ct = new Uint8Array(await sender.seal(plaintext, aad));
  const encap = new Uint8Array(sender.enc);
  const bytes = cat(hdr, encap, ct);
  if (bytes.length !== 101) throw new Error(`length ${bytes.length}`);
  return { info, aad, bytes };
}

const ENV = "test";
const SCOPE = "merchant-42";
const text = (bytes) => "I1" + b64url(bytes.subarray(2));

async function main() {
  const r1 = await recipient("panseal ingest vectors: recipient merchant-42 v1");
  const r3 = await recipient("panseal ingest vectors: recipient merchant-42 v3");
  const rOther = await recipient("panseal ingest vectors: recipient other v1");
  const key = (r, scope, version) => ({
    environment: ENV,
    scope,
    version,
    scalar_hex: hex(r.sk),
    public_key_hex: hex(r.pk),
    public_key_text: `PIK1/${ENV}/${scope}/${version}/${b64url(r.pk)}`,
    key_tag_hex: hex(keyTag(r.pk)),
  });
  const keys = {
    v1: key(r1, SCOPE, 1),
    v3: key(r3, SCOPE, 3),
    other: key(rOther, "other", 1),
  };
  const byName = { v1: r1, v3: r3, other: rOther };

  const textCtx = (row) => ({ table: "cards", column: "pan", row_key_hex: hex(enc.encode(row)) });
  const binCtx = { table: "payments", column: "card", row_key_hex: "00ff10a5" };
  const positives = [];
  const pans = [
    ["v1", luhn("411111111111"), textCtx("1")],
    ["v1", "4111111111111111", textCtx("42")],
    ["v1", "378282246310005", textCtx("43")],
    ["v1", luhn("601100000000000000"), binCtx],
    ["v3", luhn("1234567"), textCtx("44")],
    ["v3", "6011000990139424", binCtx],
  ];
  let i = 0;
  for (const [k, pan, ctx] of pans) {
    const r = byName[k];
    const { version } = keys[k];
    const s = await seal(r, ENV, SCOPE, version, ctx, packPan(pan), `ephemeral ${i}`);
    positives.push({
      name: `${pan.length}-digit PAN, key ${k}, ${ctx === binCtx ? "binary" : "text"} row key`,
      key: k,
      pan,
      context: ctx,
      ekm_hex: hex(ikm(`ephemeral ${i}`)),
      packed_hex: hex(packPan(pan)),
      info_hex: hex(s.info),
      aad_hex: hex(s.aad),
      ciphertext_hex: hex(s.bytes),
      text: text(s.bytes),
    });
    i++;
  }

  const base = await seal(r1, ENV, SCOPE, 1, textCtx("42"), packPan("4111111111111111"), "negative base");
  const flip = (at, mask = 0x01) => {
    const b = Uint8Array.from(base.bytes);
    b[at] ^= mask;
    return b;
  };
  const neg = [];
  const push = (name, expect, fields) => neg.push({ name, expect, key: "v1", context: textCtx("42"), ...fields });
  push("altered tag", "decryption", { ciphertext_hex: hex(flip(100)) });
  push("altered enc (x coordinate)", "decryption", { ciphertext_hex: hex(flip(20)) });
  push("altered enc (not a point)", "decryption", { ciphertext_hex: hex(flip(10, 0x04)) });
  push("altered ciphertext", "decryption", { ciphertext_hex: hex(flip(80)) });
  push("altered key version in header (names v0)", "key_mismatch", { ciphertext_hex: hex(flip(9)) });
  push("altered key tag", "key_mismatch", { ciphertext_hex: hex(flip(3)) });
  push("wrong context (another row)", "decryption", {
    ciphertext_hex: hex(base.bytes),
    context: textCtx("43"),
  });
  push("wrong context (another column)", "decryption", {
    ciphertext_hex: hex(base.bytes),
    context: { table: "cards", column: "pan2", row_key_hex: hex(enc.encode("42")) },
  });
  const wrongScope = await seal(r1, ENV, SCOPE, 1, textCtx("42"), packPan("4111111111111111"), "wrong scope", infoBytes(ENV, "merchant-43", 1));
  push("info names another scope", "decryption", { ciphertext_hex: hex(wrongScope.bytes) });
  const wrongEnv = await seal(r1, ENV, SCOPE, 1, textCtx("42"), packPan("4111111111111111"), "wrong env", infoBytes("prod", SCOPE, 1));
  push("info names another environment", "decryption", { ciphertext_hex: hex(wrongEnv.bytes) });
  const wrongVer = await seal(r1, ENV, SCOPE, 1, textCtx("42"), packPan("4111111111111111"), "wrong version", infoBytes(ENV, SCOPE, 2));
  push("info names another key version", "decryption", { ciphertext_hex: hex(wrongVer.bytes) });
  const otherScope = await seal(rOther, ENV, "other", 1, textCtx("42"), packPan("4111111111111111"), "other scope");
  push("sealed for another scope's key", "key_mismatch", { ciphertext_hex: hex(otherScope.bytes) });
  const badPayload = await seal(r1, ENV, SCOPE, 1, textCtx("42"), Uint8Array.from(Buffer.from("41111111111111a1ffff", "hex")), "bad payload");
  push("authenticates, payload not a packed PAN (nibble A)", "payload", { ciphertext_hex: hex(badPayload.bytes) });
  const badLuhn = await seal(r1, ENV, SCOPE, 1, textCtx("42"), packPan("4111111111111112"), "bad luhn");
  push("authenticates, payload fails Luhn", "payload", { ciphertext_hex: hex(badLuhn.bytes) });
  push("truncated (100 bytes)", "format", { ciphertext_hex: hex(base.bytes.subarray(0, 100)) });
  push("extended (102 bytes)", "format", { ciphertext_hex: hex(cat(base.bytes, Uint8Array.of(0))) });
  push("empty", "format", { ciphertext_hex: "" });
  push("unknown version byte", "format", { ciphertext_hex: hex(flip(0, 0x03)) });
  push("wrong kind byte (compact kind 0x01)", "format", { ciphertext_hex: hex(flip(1, 0x03)) });
  push("text: truncated", "format", { text: text(base.bytes).slice(0, 133) });
  push("text: bad prefix", "format", { text: "J1" + text(base.bytes).slice(2) });
  push("text: compact prefix", "format", { text: "P1" + text(base.bytes).slice(2) });
  push("text: non-base64url character", "format", { text: text(base.bytes).slice(0, 50) + "+" + text(base.bytes).slice(51) });
  // (99 bytes are exactly 132 base64url characters: no unused bits, so
  // every well-formed text has one encoding.)

  // Public keys that are not points of P-256.
  const pk = Uint8Array.from(r1.pk);
  const offCurve = Uint8Array.from(pk);
  offCurve[64] ^= 0x01;
  const publicNegatives = [
    { name: "y coordinate altered (off the curve)", public_key_hex: hex(offCurve) },
    { name: "compressed encoding (33 bytes)", public_key_hex: hex(cat(Uint8Array.of(0x02 | (pk[64] & 1)), pk.subarray(1, 33))) },
    { name: "identity / zero point", public_key_hex: hex(cat(Uint8Array.of(0x04), new Uint8Array(64))) },
    { name: "wrong prefix byte", public_key_hex: hex(cat(Uint8Array.of(0x05), pk.subarray(1))) },
    { name: "x at the field prime", public_key_hex: "04" + "ffffffff00000001000000000000000000000000ffffffffffffffffffffffff" + hex(pk.subarray(33)) },
    { name: "text form, off the curve", public_key_text: `PIK1/${ENV}/${SCOPE}/1/${b64url(offCurve)}` },
  ];

  return {
    description:
      "Ingest ciphertext vectors (FORMAT.md §17), generated by tests/js/gen_ingest_vectors.mjs with @hpke/core (independent of the Rust crate). Suite: HPKE base mode, DHKEM(P-256, HKDF-SHA256) 0x0010, HKDF-SHA256 0x0001, AES-256-GCM 0x0002.",
    generator: "tests/js/gen_ingest_vectors.mjs (@hpke/core 1.9.0)",
    keys,
    vectors: positives,
    negative: neg,
    public_key_negative: publicNegatives,
  };
}

const doc = JSON.stringify(await main(), null, 2) + "\n";
if (process.argv.includes("--check")) {
  const path = new URL("../vectors/ingest_v1.json", import.meta.url);
  if (readFileSync(path, "utf8") !== doc) {
    console.error("tests/vectors/ingest_v1.json differs from what the generator makes");
    process.exit(1);
  }
  console.error("ingest_v1.json reproduces");
} else {
  process.stdout.write(doc);
}
