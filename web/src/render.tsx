// How output reads: assistant text as Markdown, command output
// with its ANSI colours, JSON inputs pretty.

import type { ComponentChildren } from "preact";
import { useMemo } from "preact/hooks";
import { micromark } from "micromark";
import { gfm, gfmHtml } from "micromark-extension-gfm";

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

/** A unified diff, its lines coloured by what they are. */
export function Patch(props: { text: string }) {
  const lines = useMemo(() => props.text.replace(/\n$/, "").split("\n"), [props.text]);
  return (
    <pre class="patch">
      {lines.map((l) => {
        const cls = l.startsWith("diff --git") ? "file"
          : l.startsWith("+++") || l.startsWith("---") || l.startsWith("index ") ? "meta"
          : l.startsWith("@@") ? "hunk"
          : l.startsWith("+") ? "add"
          : l.startsWith("-") ? "del"
          : "";
        return cls ? <span class={cls}>{l}{"\n"}</span> : l + "\n";
      })}
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
