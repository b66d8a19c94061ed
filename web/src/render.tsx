// How output reads: assistant text as Markdown, command output
// with its ANSI colours, JSON inputs pretty.

import type { ComponentChildren } from "preact";
import { useMemo } from "preact/hooks";
import { micromark } from "micromark";
import { gfm, gfmHtml } from "micromark-extension-gfm";
import hljs from "highlight.js/lib/core";
import bash from "highlight.js/lib/languages/bash";
import css from "highlight.js/lib/languages/css";
import go from "highlight.js/lib/languages/go";
import javascript from "highlight.js/lib/languages/javascript";
import json from "highlight.js/lib/languages/json";
import markdown from "highlight.js/lib/languages/markdown";
import python from "highlight.js/lib/languages/python";
import rust from "highlight.js/lib/languages/rust";
import sql from "highlight.js/lib/languages/sql";
import typescript from "highlight.js/lib/languages/typescript";
import xml from "highlight.js/lib/languages/xml";
import yaml from "highlight.js/lib/languages/yaml";

for (const [name, language] of Object.entries({ bash, css, go, javascript, json, markdown, python, rust, sql, typescript, xml, yaml })) {
  hljs.registerLanguage(name, language);
}

/** The highlight.js language of a file, by its extension. */
const LANGUAGES: Record<string, string> = {
  sh: "bash", bash: "bash", css: "css", go: "go", js: "javascript", mjs: "javascript", jsx: "javascript",
  json: "json", md: "markdown", py: "python", rs: "rust", sql: "sql", ts: "typescript", tsx: "typescript",
  html: "xml", xml: "xml", svg: "xml", yml: "yaml", yaml: "yaml", toml: "yaml",
};

const ANSI = /\x1b\[([0-9;]*)m/g;
const COLOURS = ["black", "red", "green", "yellow", "blue", "magenta", "cyan", "white"];

/** Text with SGR colour codes as coloured spans; other escapes dropped. */
export function Ansi(props: { text: string }) {
  const out: ComponentChildren[] = [];
  let cls: string[] = [];
  let last = 0;
  const push = (s: string) => {
    if (s) out.push(cls.length ? <span class={cls.join(" ")}>{s}</span> : s);
  };
  for (const m of props.text.matchAll(ANSI)) {
    push(props.text.slice(last, m.index));
    last = (m.index ?? 0) + m[0].length;
    for (const code of (m[1] || "0").split(";").map(Number)) {
      if (code === 0) cls = [];
      else if (code === 1) cls = [...cls, "ansi-bold"];
      else if (code >= 30 && code <= 37) cls = [...cls.filter((c) => !c.startsWith("ansi-fg")), `ansi-fg-${COLOURS[code - 30]}`];
      else if (code >= 90 && code <= 97) cls = [...cls.filter((c) => !c.startsWith("ansi-fg")), `ansi-fg-${COLOURS[code - 90]}`, "ansi-bright"];
    }
  }
  push(props.text.slice(last).replace(/\x1b\[[0-9;?]*[A-Za-z]/g, ""));
  return <>{out}</>;
}

/**
 * Assistant text as CommonMark with GitHub's extensions (tables, task lists,
 * strikethrough, autolinks). micromark is safe by default: raw HTML is shown
 * as text and links with dangerous protocols (javascript:, data:, …) lose
 * their target. Links open in a new tab, away from the dashboard.
 */
export function Markdown(props: { text: string }) {
  const html = useMemo(
    () => micromark(props.text, { extensions: [gfm()], htmlExtensions: [gfmHtml()] }),
    [props.text],
  );
  return (
    <div
      class="markdown"
      dangerouslySetInnerHTML={{ __html: html }}
      onClick={(e) => {
        const link = (e.target as HTMLElement).closest("a");
        const href = link?.getAttribute("href");
        if (!link || !href || href.startsWith("#")) return;
        e.preventDefault();
        window.open(link.href, "_blank", "noopener,noreferrer");
      }}
    />
  );
}

/** A line of code highlighted as `language`, as HTML (highlight.js escapes it). */
function highlighted(code: string, language: string | undefined): string | null {
  if (!language) return null;
  try {
    return hljs.highlight(code, { language, ignoreIllegals: true }).value;
  } catch {
    return null;
  }
}

/**
 * A unified diff: file headers, hunks, additions and removals coloured,
 * and the code itself highlighted by its file's language (a line at a
 * time, so a construct spanning lines may be coloured as plain text).
 */
export function Patch(props: { text: string }) {
  const lines = useMemo(() => {
    let language: string | undefined;
    return props.text.replace(/\n$/, "").split("\n").map((l) => {
      if (l.startsWith("diff --git")) {
        const ext = l.split("/").pop()?.split(".").pop()?.toLowerCase() ?? "";
        language = LANGUAGES[ext];
        return { cls: "file", text: l, html: null };
      }
      if (l.startsWith("+++") || l.startsWith("---") || l.startsWith("index ") || l.startsWith("new file") || l.startsWith("deleted file")) {
        return { cls: "meta", text: l, html: null };
      }
      if (l.startsWith("@@")) return { cls: "hunk", text: l, html: null };
      const mark = l[0] === "+" ? "add" : l[0] === "-" ? "del" : "";
      return { cls: mark, text: l, html: highlighted(l.slice(1), language), sign: l.slice(0, 1) };
    });
  }, [props.text]);
  return (
    <pre class="patch">
      {lines.map((l) => (
        <span class={`line ${l.cls}`}>
          {l.html !== null && "sign" in l
            ? <>{l.sign}<span dangerouslySetInnerHTML={{ __html: l.html }} /></>
            : l.text}
          {"\n"}
        </span>
      ))}
    </pre>
  );
}

export function prettyJson(text: string): string {
  try {
    return JSON.stringify(JSON.parse(text), null, 2);
  } catch {
    return text;
  }
}
