// How output reads: assistant text as (a little) Markdown, command output
// with its ANSI colours, JSON inputs pretty.

import type { ComponentChildren } from "preact";

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

function inline(text: string): ComponentChildren[] {
  return text.split(/(`[^`]+`|\*\*[^*]+\*\*)/g).map((part) =>
    part.startsWith("`") && part.endsWith("`") && part.length > 2 ? <code>{part.slice(1, -1)}</code>
    : part.startsWith("**") && part.endsWith("**") && part.length > 4 ? <strong>{part.slice(2, -2)}</strong>
    : part,
  );
}

/** Paragraphs, headings, bullet lists, fenced code and inline code. */
export function Markdown(props: { text: string }) {
  const blocks: ComponentChildren[] = [];
  const parts = props.text.split(/^```[^\n]*\n([\s\S]*?)^```\s*$/m);
  parts.forEach((part, i) => {
    if (i % 2 === 1) {
      blocks.push(<pre class="code">{part}</pre>);
      return;
    }
    for (const para of part.split(/\n{2,}/)) {
      const lines = para.split("\n").filter((l) => l.trim());
      if (!lines.length) continue;
      if (lines.every((l) => /^\s*[-*] /.test(l))) {
        blocks.push(<ul>{lines.map((l) => <li>{inline(l.replace(/^\s*[-*] /, ""))}</li>)}</ul>);
      } else if (/^#{1,6} /.test(lines[0]) && lines.length === 1) {
        blocks.push(<h4>{inline(lines[0].replace(/^#+ /, ""))}</h4>);
      } else {
        blocks.push(<p>{lines.flatMap((l, j) => (j ? [<br />, ...inline(l)] : inline(l)))}</p>);
      }
    }
  });
  return <div class="markdown">{blocks}</div>;
}

export function prettyJson(text: string): string {
  try {
    return JSON.stringify(JSON.parse(text), null, 2);
  } catch {
    return text;
  }
}
