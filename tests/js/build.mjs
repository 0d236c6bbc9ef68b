// Bundles the checkout page's script (examples/checkout/checkout.js) with
// @hpke/core into tests/js/dist/checkout.mjs: one ES module that the
// payments_backend example serves as /checkout.js and that Node imports
// for the independent-implementation check.
//   node tests/js/build.mjs
import { build } from "esbuild";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
await build({
  entryPoints: [join(here, "../../examples/checkout/checkout.js")],
  outfile: join(here, "dist/checkout.mjs"),
  bundle: true,
  format: "esm",
  platform: "neutral",
  target: "es2020",
  // The entry point lives outside tests/js: resolve packages from here.
  nodePaths: [join(here, "node_modules")],
  legalComments: "eof",
  logLevel: "warning",
});
console.log("built tests/js/dist/checkout.mjs");
