// The dashboard in a real Chromium, against a running server with a daemon
// that offers `shell` and `claude` (the stand-in):
//   node test/dashboard.mjs URL USER_TOKEN VIEWER_TOKEN SCREENSHOT_DIR
// Signs in, creates a shell task from the form and watches its output
// live, reloads its deep link, pushes a task's work to a branch of
// DASHBOARD_REPO and shows its diff, answers a Claude permission request with
// Allow, messages a working agent, stops one, creates and revokes a token,
// shows the daemons, takes screenshots at desktop and phone width in both
// themes, and checks that a viewer token sees the same views without
// actions. It prints SEED and waits for `seeded` (1,000 tasks made), and
// RESTART while a task streams and waits for a line `restarted` on stdin: the runner restarts the server on the same address
// meanwhile, and the page must resume with no line lost or shown twice. Exits non-zero, saying what failed, on any miss.
import { chromium } from "playwright-core";
import { createHash, X509Certificate } from "node:crypto";
import { readFileSync } from "node:fs";
import { createInterface } from "node:readline";

// Lines from whoever runs this script (the Rust test answers RESTART).
const replies = createInterface({ input: process.stdin })[Symbol.asyncIterator]();

const [url, userToken, viewerToken, shots] = process.argv.slice(2);
if (!shots) {
  console.error("usage: node test/dashboard.mjs URL USER_TOKEN VIEWER_TOKEN SCREENSHOT_DIR");
  process.exit(2);
}
// Over HTTPS the browser is told to trust the server's key (the test's
// certificate, DASHBOARD_CERT); it ignores no other certificate error.
const trust = [];
if (process.env.DASHBOARD_CERT) {
  const cert = new X509Certificate(readFileSync(process.env.DASHBOARD_CERT));
  const spki = cert.publicKey.export({ type: "spki", format: "der" });
  trust.push(`--ignore-certificate-errors-spki-list=${createHash("sha256").update(spki).digest("base64")}`);
}
// Steps the runner cannot serve (DASHBOARD_SKIP=restart,seed).
const skip = (process.env.DASHBOARD_SKIP ?? "").split(",").filter(Boolean);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", ...trust],
});
const page = await (await browser.newContext({ viewport: { width: 1280, height: 800 } })).newPage();
const failures = [];
page.on("dialog", (d) => d.accept());
page.on("pageerror", (e) => failures.push(`page error: ${e.message}`));
const step = async (name, fn, key) => {
  if (key && skip.includes(key)) {
    console.log(`skipped here: ${name}`);
    return;
  }
  try {
    await fn();
    console.log(`ok: ${name}`);
  } catch (e) {
    await page.screenshot({ path: `${shots}/failed.png`, fullPage: true }).catch(() => {});
    console.error(`FAILED: ${name}: ${e.message}`);
    await browser.close();
    process.exit(1);
  }
};
const signIn = async (token) => {
  await page.goto(url);
  await page.getByLabel("Token").fill(token);
  await page.getByRole("button", { name: "Sign in" }).click();
};

await step("a wrong token is refused with a reason", async () => {
  await signIn("tmu_wrong");
  await page.getByRole("alert").filter({ hasText: "Unauthenticated" }).waitFor({ timeout: 10000 });
});

await step("sign in, an empty task list", async () => {
  await signIn(userToken);
  await page.getByText("No tasks yet").waitFor({ timeout: 10000 });
  await page.screenshot({ path: `${shots}/tasks-empty.png` });
});

let taskPath;
await step("create a shell task and watch its output live", async () => {
  await page.getByRole("link", { name: "New task" }).click();
  await page.getByLabel("Name").fill("hello");
  await page.getByLabel("Plan").fill("printf '\\033[32mgreen\\033[0m\\n'; echo hello from the browser");
  await page.screenshot({ path: `${shots}/new-task.png` });
  await page.getByRole("button", { name: "Create" }).click();
  await page.waitForURL(/\/tasks\//, { timeout: 10000 });
  taskPath = new URL(page.url()).pathname;
  await page.getByLabel("Output").getByText("hello from the browser").waitFor({ timeout: 20000 });
  await page.locator(".status-completed").first().waitFor({ timeout: 20000 });
  const green = await page.locator(".ansi-fg-green").first().textContent();
  if (green !== "green") throw new Error(`ANSI colour not rendered: ${green}`);
  await page.screenshot({ path: `${shots}/task-shell.png`, fullPage: true });
});

await step("the deep link reloads into the same view", async () => {
  await page.goto(url + taskPath);
  await page.getByLabel("Output").getByText("hello from the browser").waitFor({ timeout: 10000 });
  await page.getByRole("heading", { name: /hello/ }).waitFor();
});

await step("a failed task is reassigned to a chosen daemon", async () => {
  await page.getByRole("link", { name: "New task" }).click();
  await page.getByLabel("Name").fill("flaky");
  await page.getByLabel("Plan").fill("echo trying; exit 3");
  await page.getByRole("button", { name: "Create" }).click();
  await page.locator(".status-failed").first().waitFor({ timeout: 20000 });
  const chosen = page.getByLabel("Reassign to");
  await chosen.locator("option").nth(1).waitFor({ state: "attached", timeout: 10000 });
  await chosen.selectOption({ index: 1 });
  await page.getByRole("button", { name: "Reassign" }).click();
  await page.locator("dd", { hasText: /^2$/ }).waitFor({ timeout: 20000 });
});

await step("a task's work comes back: its branch pushed, the diff shown", async () => {
  if (!process.env.DASHBOARD_REPO) throw new Error("DASHBOARD_REPO names no repository");
  await page.getByRole("link", { name: "New task" }).click();
  await page.getByLabel("Name").fill("feature");
  await page.getByLabel("Plan").fill("printf 'fn main() {}\\n' > main.rs && git add main.rs && git commit -qm 'add main.rs'");
  await page.getByLabel("Repository").fill(process.env.DASHBOARD_REPO);
  await page.getByLabel("When the agent completes").selectOption("push");
  await page.getByRole("button", { name: "Create" }).click();
  const changes = page.getByLabel("Changes");
  await changes.getByText(/✓ pushed taskmesh\//).waitFor({ timeout: 20000 });
  await changes.getByRole("cell", { name: "main.rs" }).waitFor({ timeout: 5000 });
  await changes.locator(".patch .add", { hasText: "+fn main() {}" }).waitFor({ timeout: 5000 });
  // The code is highlighted as Rust (main.rs).
  await changes.locator(".patch .add .hljs-keyword", { hasText: "fn" }).waitFor({ timeout: 5000 });
  await page.getByText(/push done: pushed taskmesh\//).waitFor({ timeout: 10000 });
  await page.screenshot({ path: `${shots}/task-changes.png`, fullPage: true });
});

await step("the list shows the task, live", async () => {
  await page.getByRole("link", { name: "Tasks" }).click();
  await page.getByRole("link", { name: "hello" }).waitFor({ timeout: 10000 });
  await page.screenshot({ path: `${shots}/tasks.png` });
});

await step("a Claude permission request is answered with Allow", async () => {
  await page.getByRole("link", { name: "New task" }).click();
  await page.getByLabel("Name").fill("cleanup");
  await page.getByLabel("Plan").fill("run: rm -rf build");
  await page.getByLabel("Runtime").selectOption("claude");
  await page.getByLabel("Permission mode").selectOption("default");
  await page.getByRole("button", { name: "Create" }).click();
  await page.getByRole("button", { name: "Allow" }).waitFor({ timeout: 20000 });
  await page.screenshot({ path: `${shots}/task-approval.png`, fullPage: true });
  await page.getByRole("button", { name: "Allow" }).click();
  await page.getByLabel("Output").getByText(/^Done: ran rm -rf build/).waitFor({ timeout: 20000 });
  const tool = page.locator("details.msg.tool").filter({ hasText: "Bash" }).first();
  if (await tool.evaluate((d) => d.open)) throw new Error("the tool call is not folded");
  await tool.locator("summary").click();
  await tool.getByText('"command": "rm -rf build"').waitFor({ timeout: 5000 });
  await page.getByText(/over 1 turns/).waitFor({ timeout: 10000 });
  await page.screenshot({ path: `${shots}/task-claude.png`, fullPage: true });
});

const claudeTask = async (name, plan) => {
  await page.getByRole("link", { name: "New task" }).click();
  await page.getByLabel("Name").fill(name);
  await page.getByLabel("Plan").fill(plan);
  await page.getByLabel("Runtime").selectOption("claude");
  await page.getByRole("button", { name: "Create" }).click();
  await page.waitForURL(/\/tasks\//, { timeout: 10000 });
};

await step("assistant text renders as Markdown, safely", async () => {
  await claudeTask("notes", [
    "notes", "", "1. first", "2. second", "",
    "| file | lines |", "|---|---|", "| a.rs | 12 |", "",
    "See [the docs](https://example.com/docs) or [this](javascript:window.__xss=1).",
    '<img src=x onerror="window.__xss=1"> **bold** and `code`',
  ].join("\n"));
  const md = page.locator(".msg.assistant .markdown").filter({ hasText: "You said: notes" });
  await md.waitFor({ timeout: 20000 });
  if ((await md.locator("ol > li").allTextContents()).join("|") !== "first|second") throw new Error("no numbered list");
  await md.locator("table td", { hasText: "a.rs" }).waitFor({ timeout: 5000 });
  if ((await md.getByRole("link", { name: "the docs" }).getAttribute("href")) !== "https://example.com/docs") {
    throw new Error("the link lost its target");
  }
  if (await md.locator("img, a[href^='javascript']").count()) throw new Error("raw HTML or a javascript: link got through");
  await md.locator("strong", { hasText: "bold" }).waitFor({ timeout: 5000 });
  if (await page.evaluate(() => window.__xss)) throw new Error("script ran from agent output");
  await page.screenshot({ path: `${shots}/task-markdown.png`, fullPage: true });
});

await step("a message reaches the working agent, which answers", async () => {
  await claudeTask("conversation", "hold");
  await page.getByLabel("Output").getByText(/^holding/).waitFor({ timeout: 20000 });
  await page.getByPlaceholder("Send the agent a message…").fill("one more thing");
  await page.getByRole("button", { name: "Send" }).click();
  await page.getByLabel("Output").getByText(/^You said: one more thing/).waitFor({ timeout: 20000 });
  await page.locator(".status-completed").first().waitFor({ timeout: 20000 });
});

await step("stop a working agent", async () => {
  await claudeTask("stoppable", "hold");
  await page.getByLabel("Output").getByText(/^holding/).waitFor({ timeout: 20000 });
  await page.getByRole("button", { name: "Stop" }).click();
  await page.locator(".status-cancelled").first().waitFor({ timeout: 30000 });
});

await step("dark theme and a phone's width", async () => {
  await page.emulateMedia({ colorScheme: "dark" });
  await page.screenshot({ path: `${shots}/task-dark.png`, fullPage: true });
  await page.setViewportSize({ width: 390, height: 844 });
  await page.getByRole("link", { name: "Tasks" }).click();
  await page.getByRole("link", { name: "conversation" }).waitFor({ timeout: 10000 });
  await page.screenshot({ path: `${shots}/tasks-phone-dark.png`, fullPage: true });
  await page.emulateMedia({ colorScheme: "light" });
  await page.screenshot({ path: `${shots}/tasks-phone.png`, fullPage: true });
  await page.setViewportSize({ width: 1280, height: 800 });
});

await step("tokens: create one (shown once), revoke it", async () => {
  await page.getByRole("link", { name: "Tokens" }).click();
  await page.getByLabel("Name").fill("build-box");
  await page.getByRole("button", { name: "Create token" }).click();
  const secret = await page.locator(".secret code").textContent({ timeout: 10000 });
  if (!secret?.startsWith("tmd_")) throw new Error(`not a daemon token: ${secret}`);
  const row = page.getByRole("row").filter({ hasText: "build-box" });
  await row.getByRole("button", { name: "Revoke" }).click();
  await row.getByText("revoked").waitFor({ timeout: 10000 });
  await page.screenshot({ path: `${shots}/tokens.png` });
});

await step("the daemons view shows runtimes with versions", async () => {
  await page.getByRole("link", { name: "Daemons" }).click();
  await page.getByText("2.0.14 (Claude Code)").waitFor({ timeout: 10000 });
  await page.screenshot({ path: `${shots}/daemons.png` });
});

await step("a server restart while streaming loses and repeats no line", async () => {
  await page.getByRole("link", { name: "New task" }).click();
  await page.getByLabel("Name").fill("ticks");
  await page.getByLabel("Plan").fill('for i in $(seq 1 300); do echo "tick $i"; sleep 0.02; done');
  await page.getByRole("button", { name: "Create" }).click();
  await page.waitForURL(/\/tasks\//, { timeout: 10000 });
  await page.getByLabel("Output").getByText("tick 30", { exact: true }).waitFor({ timeout: 20000 });
  console.log("RESTART");
  const answer = await replies.next();
  if (answer.value !== "restarted") throw new Error(`the server was not restarted: ${answer.value}`);
  await page.getByLabel("Output").getByText("tick 300", { exact: true }).waitFor({ timeout: 60000 });
  await page.locator(".conn-live").waitFor({ timeout: 20000 });
  const shown = await page.locator(".output pre.msg").allTextContents();
  const want = Array.from({ length: 300 }, (_, i) => `tick ${i + 1}`);
  if (JSON.stringify(shown) !== JSON.stringify(want)) {
    throw new Error(`after the restart the page shows ${shown.length} lines: ${shown.filter((l, i) => l !== want[i]).slice(0, 5)}`);
  }
}, "restart");

await step("50,000 lines: the page stays responsive and shows the end", async () => {
  await page.getByRole("link", { name: "New task" }).click();
  await page.getByLabel("Name").fill("long");
  await page.getByLabel("Plan").fill("seq 1 50000");
  await page.getByRole("button", { name: "Create" }).click();
  await page.waitForURL(/\/tasks\//, { timeout: 10000 });
  const started = Date.now();
  let slowest = 0;
  const last = page.getByLabel("Output").getByText("50000", { exact: true });
  while (!(await last.isVisible())) {
    const t = Date.now();
    await page.evaluate(() => 1);
    slowest = Math.max(slowest, Date.now() - t);
    if (Date.now() - started > 120000) throw new Error("the last line never showed");
    await new Promise((r) => setTimeout(r, 100));
  }
  const took = Date.now() - started;
  console.log(`50,000 lines: the last one showed after ${took} ms; the page answered within ${slowest} ms at worst`);
  if (slowest > 2000) throw new Error(`the page froze for ${slowest} ms`);
  await page.getByRole("button", { name: /earlier messages/ }).waitFor();
  await page.reload();
  const reloaded = Date.now();
  await last.waitFor({ timeout: 60000 });
  console.log(`50,000 lines: a reload showed the end after ${Date.now() - reloaded} ms`);
  // Earlier output on request, in order, with nothing twice.
  await page.getByRole("button", { name: /earlier messages/ }).click();
  await page.getByLabel("Output").getByText("46001", { exact: true }).waitFor({ timeout: 20000 });
  const shown = await page.locator(".output pre.msg").allTextContents();
  const numbers = shown.map(Number);
  for (let i = 1; i < numbers.length; i++) {
    if (numbers[i] !== numbers[i - 1] + 1) throw new Error(`line ${numbers[i]} after ${numbers[i - 1]}`);
  }
  if (numbers[numbers.length - 1] !== 50000) throw new Error(`ends at ${numbers[numbers.length - 1]}`);
});

await step("1,000 tasks: the list's first paint", async () => {
  console.log("SEED");
  const answer = await replies.next();
  if (answer.value !== "seeded") throw new Error(`no tasks were seeded: ${answer.value}`);
  const started = Date.now();
  await page.goto(url + "/");
  // The first page paints as soon as it arrives; the rest follow.
  await page.getByRole("link", { name: "seeded 999", exact: true }).waitFor({ timeout: 30000 });
  const first = Date.now() - started;
  const rows = page.locator("table.tasks tbody tr");
  await page.waitForFunction(() => document.querySelectorAll("table.tasks tbody tr").length >= 1000, null, { timeout: 30000 });
  const all = Date.now() - started;
  console.log(`1,000 tasks: the newest showed ${first} ms after navigation, all ${await rows.count()} rows after ${all} ms`);
}, "seed");

await step("a viewer sees the views but no actions", async () => {
  await page.getByRole("button", { name: "Sign out" }).click();
  await signIn(viewerToken);
  await page.getByText("read-only").waitFor({ timeout: 10000 });
  if (await page.getByRole("link", { name: "New task" }).count()) throw new Error("a viewer may create tasks");
  if (await page.getByRole("link", { name: "Tokens" }).count()) throw new Error("a viewer sees tokens");
  await page.getByRole("link", { name: "hello" }).click();
  await page.getByLabel("Output").getByText("hello from the browser").waitFor({ timeout: 10000 });
  if (await page.getByRole("button", { name: "Delete" }).count()) throw new Error("a viewer may delete");
  if (await page.locator("form.send").count()) throw new Error("a viewer may send messages");
  await page.screenshot({ path: `${shots}/viewer.png` });
});

await browser.close();
process.stdin.destroy();
if (failures.length) {
  console.error(failures.join("\n"));
  process.exit(1);
}
console.log("dashboard: ok");
