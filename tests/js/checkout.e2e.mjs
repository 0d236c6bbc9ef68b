// The browser checkout, end to end, and the independent sealer.
//
//   node tests/js/checkout.e2e.mjs seal --key PIK1/... --in items.json --out sealed.json
//       Seals every {pan, row_key} of items.json ({table, column, items})
//       with the page's own module (tests/js/dist/checkout.mjs, @hpke/core
//       over Node's WebCrypto) and writes {"sealed": [text, ...]}.
//
//   node tests/js/checkout.e2e.mjs browser --url https://127.0.0.1:PORT \
//       --server-cert server.pem --card-file card.txt --screenshot docs/checkout.png --out result.json
//       Drives Debian's chromium (playwright-core, /usr/bin/chromium): opens
//       /checkout, posts garbage from the page, types the card number, pays,
//       and writes what it observed. Prints counts only, never the card.
//
// Driven by tests/browser_checkout.rs, which starts PostgreSQL, keyd and
// the payments_backend example and checks the database, logs and back
// office. Only 127.0.0.1 is contacted.

import { createHash, X509Certificate } from "node:crypto";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const BUNDLE = join(here, "dist/checkout.mjs");

function args(argv) {
  const out = { _: [] };
  for (let i = 0; i < argv.length; i++) {
    if (argv[i].startsWith("--")) out[argv[i].slice(2)] = argv[++i];
    else out._.push(argv[i]);
  }
  return out;
}

async function sealMode(a) {
  const { sealPan } = await import(BUNDLE);
  const input = JSON.parse(readFileSync(a.in, "utf8"));
  const sealed = [];
  for (const item of input.items) {
    sealed.push(await sealPan(a.key, item.pan, input.table, input.column, item.row_key));
  }
  writeFileSync(a.out, JSON.stringify({ sealed }));
  console.log(`sealed ${sealed.length} card numbers with @hpke/core`);
}

/** Every way the card's digits could appear in a body: plain, grouped by 4 with spaces or dashes. */
function variants(digits) {
  const groups = digits.match(/.{1,4}/g);
  return [digits, groups.join(" "), groups.join("-"), encodeURIComponent(groups.join(" "))];
}

async function browserMode(a) {
  const { chromium } = await import("playwright-core");
  const card = readFileSync(a["card-file"], "utf8").trim();
  const forms = variants(card);
  // Chromium trusts exactly this server key (SPKI pin), not every certificate.
  const spkiDer = new X509Certificate(readFileSync(a["server-cert"])).publicKey.export({
    type: "spki",
    format: "der",
  });
  const spki = createHash("sha256").update(spkiDer).digest("base64");
  const userDataDir = mkdtempSync(join(tmpdir(), "panseal-chromium-"));
  const context = await chromium.launchPersistentContext(userDataDir, {
    executablePath: "/usr/bin/chromium",
    headless: true,
    viewport: { width: 560, height: 420 },
    args: [
      "--headless",
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
      `--ignore-certificate-errors-spki-list=${spki}`,
    ],
  });
  const result = {
    requests: 0,
    requests_with_body: 0,
    requests_with_card: 0,
    non_loopback_requests: 0,
    posted_ciphertexts: [],
    garbage: [],
    console_with_card: 0,
    page_errors: [],
  };
  try {
    const page = context.pages()[0] || (await context.newPage());
    page.on("request", (req) => {
      result.requests += 1;
      const url = new URL(req.url());
      if (url.hostname !== "127.0.0.1") result.non_loopback_requests += 1;
      const body = req.postData();
      const text = `${req.url()}\n${JSON.stringify(req.headers())}\n${body ?? ""}`;
      if (body) result.requests_with_body += 1;
      if (forms.some((f) => text.includes(f))) result.requests_with_card += 1;
      if (body && req.method() === "POST" && url.pathname === "/checkout") {
        try {
          const j = JSON.parse(body);
          if (typeof j.card === "string") result.posted_ciphertexts.push(j.card);
        } catch {
          // garbage bodies are expected here
        }
      }
    });
    page.on("console", (msg) => {
      if (forms.some((f) => msg.text().includes(f))) result.console_with_card += 1;
    });
    page.on("pageerror", (e) => result.page_errors.push(String(e.message).slice(0, 200)));

    const garbageOrder = async () => {
      const resp = await page.goto(`${a.url}/checkout`);
      if (resp.status() !== 200) throw new Error(`GET /checkout: ${resp.status()}`);
      return page.locator("#checkout").getAttribute("data-order-id");
    };

    // 1. A page whose script posts garbage: every kind answers 400 with a reason.
    const garbageOrderId = await garbageOrder();
    result.garbage_order_id = garbageOrderId;
    const sealedLike = await page.evaluate(async () => {
      // A well-formed ciphertext whose bytes are random: the server cannot
      // tell (it holds no private key) unless its key tag is wrong.
      const b = crypto.getRandomValues(new Uint8Array(99));
      let s = "";
      for (const x of b) s += String.fromCharCode(x);
      return "I1" + btoa(s).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
    });
    const bodies = [
      ["not-json", "this is not json"],
      ["wrong-prefix", JSON.stringify({ order_id: garbageOrderId, card: "X1" + "A".repeat(132) })],
      ["truncated", JSON.stringify({ order_id: garbageOrderId, card: sealedLike.slice(0, 100) })],
      ["bad-alphabet", JSON.stringify({ order_id: garbageOrderId, card: "I1" + "*".repeat(132) })],
      ["unknown-key-tag", JSON.stringify({ order_id: garbageOrderId, card: sealedLike })],
      ["unknown-order", JSON.stringify({ order_id: "f".repeat(32), card: sealedLike })],
      ["extra-field", JSON.stringify({ order_id: garbageOrderId, card: sealedLike, pan: "x" })],
    ];
    for (const [label, body] of bodies) {
      const answer = await page.evaluate(async (body) => {
        const r = await fetch("/checkout", {
          method: "POST",
          headers: { "content-type": "application/json" },
          body,
        });
        return { status: r.status, body: await r.json().catch(() => null) };
      }, body);
      result.garbage.push({ label, status: answer.status, reason: answer.body?.reason ?? null });
    }

    // 2. The intended path: type the card, pay.
    const orderResp = await page.goto(`${a.url}/checkout`);
    result.page_headers = orderResp.headers();
    const form = page.locator("#checkout");
    result.order_id = await form.getAttribute("data-order-id");
    result.card_input_name = await page.locator("#card-number").getAttribute("name");
    await page.waitForFunction(() => !document.getElementById("pay").disabled);
    await page.locator("#card-number").pressSequentially(card.match(/.{1,4}/g).join(" "));
    await page.locator("#pay").click();
    await page.waitForFunction(
      () => document.getElementById("status").textContent.length > 0,
      null,
      { timeout: 15000 },
    );
    result.status_text = await page.locator("#status").textContent();
    result.status_has_card = forms.some((f) => result.status_text.includes(f));
    result.input_after = await page.locator("#card-number").inputValue();
    if (a.screenshot) await page.screenshot({ path: a.screenshot });
  } finally {
    await context.close();
    rmSync(userDataDir, { recursive: true, force: true });
  }
  writeFileSync(a.out, JSON.stringify(result, null, 1));
  console.log(
    `browser: ${result.requests} requests, ${result.requests_with_body} with a body, ` +
      `${result.requests_with_card} containing the card number; ` +
      `${result.garbage.length} garbage posts`,
  );
}

const a = args(process.argv.slice(2));
const mode = a._[0];
if (mode === "seal") await sealMode(a);
else if (mode === "browser") await browserMode(a);
else {
  console.error("usage: checkout.e2e.mjs seal|browser ...");
  process.exit(2);
}
