// Small pieces shared by the views.

import type { Timestamp } from "@bufbuild/protobuf/wkt";
import { useEffect, useState } from "preact/hooks";
import { onLive, type Live } from "./api";
import { TaskStatus } from "./gen/taskmesh/v1/task_pb";

export function navigate(path: string) {
  history.pushState(null, "", path);
  window.dispatchEvent(new PopStateEvent("popstate"));
}

export function Link(props: { href: string; children: preact.ComponentChildren; class?: string }) {
  return (
    <a
      href={props.href}
      class={props.class}
      onClick={(e) => {
        if (e.ctrlKey || e.metaKey || e.shiftKey) return;
        e.preventDefault();
        navigate(props.href);
      }}
    >
      {props.children}
    </a>
  );
}

export const statusName = (s: TaskStatus): string => (TaskStatus[s] ?? "UNKNOWN").toLowerCase();

export function Status(props: { status: TaskStatus }) {
  const name = statusName(props.status);
  return <span class={`status status-${name}`}>{name}</span>;
}

function seconds(t?: Timestamp): number | undefined {
  return t ? Number(t.seconds) + t.nanos / 1e9 : undefined;
}

/** "3m ago", with the exact time on hover. */
export function When(props: { time?: Timestamp }) {
  const s = seconds(props.time);
  if (s === undefined) return <span class="muted">-</span>;
  const ago = Date.now() / 1000 - s;
  const text =
    ago < 60 ? `${Math.max(0, Math.round(ago))}s ago`
    : ago < 3600 ? `${Math.round(ago / 60)}m ago`
    : ago < 86400 ? `${Math.round(ago / 3600)}h ago`
    : `${Math.round(ago / 86400)}d ago`;
  return <time dateTime={new Date(s * 1000).toISOString()} title={new Date(s * 1000).toLocaleString()}>{text}</time>;
}

export function ErrorLine(props: { error: string }) {
  return props.error ? <p class="error" role="alert">{props.error}</p> : null;
}

/** Live, reconnecting or offline: the state of the page's streams. */
export function Connection() {
  const [state, setState] = useState<Live>("live");
  useEffect(() => onLive(setState), []);
  return <span class={`conn conn-${state}`} role="status" title="the page's live updates">{state}</span>;
}
