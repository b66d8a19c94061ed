// Tasks: the workspace's tasks, live (ListTasks, then WatchTasks), filtered
// by status, runtime, daemon and text, subtasks under their parent.

import { useEffect, useMemo, useState } from "preact/hooks";
import { follow, tasks as api } from "./api";
import { TaskStatus, type Task } from "./gen/taskmesh/v1/task_pb";
import type { Me } from "./main";
import { ErrorLine, Link, Status, When, navigate, statusName } from "./ui";

const STATUSES = [
  TaskStatus.PENDING, TaskStatus.QUEUED, TaskStatus.DISPATCHED, TaskStatus.RUNNING,
  TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED, TaskStatus.INTERRUPTED,
];

export function TaskList(props: { me: Me }) {
  const [byId, setById] = useState<Map<string, Task>>(new Map());
  const [error, setError] = useState("");
  const [status, setStatus] = useState("");
  const [runtime, setRuntime] = useState("");
  const [daemon, setDaemon] = useState(new URLSearchParams(location.search).get("daemon") ?? "");
  const [text, setText] = useState("");
  const [current, setCurrent] = useState(-1);

  useEffect(() => {
    const stop = new AbortController();
    const all = new Map<string, Task>();
    const put = (t: Task) => all.set(t.id, t);
    (async () => {
      try {
        let pageToken = "";
        do {
          const page = await api.listTasks({ workspace: props.me.workspace, pageSize: 500, pageToken }, { signal: stop.signal });
          page.tasks.forEach(put);
          pageToken = page.nextPageToken;
          // Each page shows as it comes: the first paint does not wait for the rest.
          setById(new Map(all));
        } while (pageToken && all.size < 5000);
      } catch (e) {
        if (!stop.signal.aborted) setError(String(e));
      }
      await follow(
        (signal) => api.watchTasks({ workspace: props.me.workspace }, { signal }),
        (ev) => {
          if (!ev.task) return;
          if (ev.deleted) all.delete(ev.task.id);
          else put(ev.task);
          setById(new Map(all));
          setError("");
        },
        stop.signal,
        setError,
      );
    })();
    return () => stop.abort();
  }, [props.me.workspace]);

  const list = useMemo(() => [...byId.values()], [byId]);
  const runtimes = [...new Set(list.map((t) => t.runtime))].sort();
  const daemons = [...new Set(list.map((t) => t.daemonId).filter(Boolean))].sort();
  const needle = text.toLowerCase();
  const shown = (t: Task) =>
    (!status || statusName(t.status) === status) &&
    (!runtime || t.runtime === runtime) &&
    (!daemon || t.daemonId === daemon) &&
    (!needle || t.name.toLowerCase().includes(needle) || t.plan.toLowerCase().includes(needle) || t.id.startsWith(needle));
  // Parents first, newest first; each followed by its subtasks.
  const newest = (a: Task, b: Task) => Number(b.createTime?.seconds ?? 0) - Number(a.createTime?.seconds ?? 0);
  const children = new Map<string, Task[]>();
  for (const t of list) {
    if (t.parentTaskId && byId.has(t.parentTaskId)) {
      children.set(t.parentTaskId, [...(children.get(t.parentTaskId) ?? []), t]);
    }
  }
  const rows: { task: Task; depth: number }[] = [];
  const walk = (t: Task, depth: number) => {
    if (shown(t)) rows.push({ task: t, depth });
    (children.get(t.id) ?? []).sort(newest).forEach((c) => walk(c, depth + 1));
  };
  list.filter((t) => !t.parentTaskId || !byId.has(t.parentTaskId)).sort(newest).forEach((t) => walk(t, 0));

  // j/k or the arrows move through the list, Enter opens the task.
  useEffect(() => {
    const onKey = (e: KeyboardEvent) => {
      if ((e.target as HTMLElement).closest("input, select, textarea")) return;
      if (e.key === "j" || e.key === "ArrowDown") setCurrent((c) => Math.min(c + 1, rows.length - 1));
      else if (e.key === "k" || e.key === "ArrowUp") setCurrent((c) => Math.max(c - 1, 0));
      else if (e.key === "Enter" && rows[current]) navigate(`/tasks/${rows[current].task.id}`);
      else return;
      e.preventDefault();
    };
    window.addEventListener("keydown", onKey);
    return () => window.removeEventListener("keydown", onKey);
  });

  return (
    <section>
      <div class="filters">
        <select aria-label="Status" value={status} onChange={(e) => setStatus(e.currentTarget.value)}>
          <option value="">any status</option>
          {STATUSES.map((s) => <option value={statusName(s)}>{statusName(s)}</option>)}
        </select>
        <select aria-label="Runtime" value={runtime} onChange={(e) => setRuntime(e.currentTarget.value)}>
          <option value="">any runtime</option>
          {runtimes.map((r) => <option value={r}>{r}</option>)}
        </select>
        <select aria-label="Daemon" value={daemon} onChange={(e) => setDaemon(e.currentTarget.value)}>
          <option value="">any daemon</option>
          {daemons.map((d) => <option value={d}>{d.slice(0, 8)}</option>)}
        </select>
        <input type="search" placeholder="Search name, plan or id" value={text} onInput={(e) => setText(e.currentTarget.value)} />
        <span class="muted">{rows.length} of {list.length}</span>
      </div>
      <ErrorLine error={error} />
      <table class="tasks">
        <thead>
          <tr><th>Name</th><th>Status</th><th>Runtime</th><th>Daemon</th><th>Created</th><th>Updated</th></tr>
        </thead>
        <tbody>
          {rows.map(({ task: t, depth }, i) => (
            <tr key={t.id} class={`${t.pendingApprovals > 0 ? "asks" : ""} ${i === current ? "current" : ""}`}>
              <td style={{ paddingLeft: `${0.5 + depth * 1.5}rem` }}>
                {depth > 0 && <span class="muted">↳ </span>}
                <Link href={`/tasks/${t.id}`}>{t.name}</Link>
                {t.pendingApprovals > 0 && <span class="badge ask">approval waiting</span>}
              </td>
              <td><Status status={t.status} /></td>
              <td>{t.runtime}</td>
              <td class="mono">{t.daemonId.slice(0, 8) || "-"}</td>
              <td><When time={t.createTime} /></td>
              <td><When time={t.updateTime} /></td>
            </tr>
          ))}
        </tbody>
      </table>
      {list.length === 0 && !error && <p class="muted">No tasks yet{props.me.readOnly ? "." : <>: <Link href="/new">create one</Link>.</>}</p>}
    </section>
  );
}
