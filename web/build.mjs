// Bundles the dashboard into dist/: app.js and app.css (minified), and an
// index.html that names them by content hash, so they can be cached for
// good while index.html never is. The output is committed and embedded in
// the server binary; CI rebuilds it and fails if it differs.
import { build } from "esbuild";
import { createHash } from "node:crypto";
import { mkdirSync, readFileSync, writeFileSync } from "node:fs";

mkdirSync("dist", { recursive: true });
const result = await build({
  entryPoints: ["src/main.tsx"],
  bundle: true,
  minify: true,
  format: "iife",
  target: ["es2020"],
  jsx: "automatic",
  jsxImportSource: "preact",
  legalComments: "none",
  write: false,
  logLevel: "warning",
});
const js = result.outputFiles[0].contents;
const styles = await build({
  entryPoints: ["src/style.css"],
  minify: true,
  write: false,
  logLevel: "warning",
});
const css = styles.outputFiles[0].contents;
const hash = (bytes) => createHash("sha256").update(bytes).digest("hex").slice(0, 16);
writeFileSync("dist/app.js", js);
writeFileSync("dist/app.css", css);
writeFileSync(
  "dist/index.html",
  readFileSync("src/index.html", "utf8").replace("JS_HASH", hash(js)).replace("CSS_HASH", hash(css)),
);
console.log(`dist/app.js ${js.length} bytes, dist/app.css ${css.length} bytes`);
