// A task: live output by kind, approvals to answer, the status timeline,
// usage and cost, the plan, and what can be done with it.

import { useEffect, useRef, useState } from "preact/hooks";
import { describe, follow, tasks as api, workspaces } from "./api";
import { DaemonState, type Daemon } from "./gen/taskmesh/v1/workspace_pb";
import {
  ApprovalState, CompletionAction, Decision, MessageKind, TaskStatus,
  type GetTaskDiffResponse, type GetTaskUsageResponse, type Task, type TaskChanges, type TaskEvent, type TaskMessage,
} from "./gen/taskmesh/v1/task_pb";
import type { Me } from "./main";
import { Ansi, Markdown, Patch, prettyJson } from "./render";
import { ErrorLine, Link, Status, When, navigate, statusName } from "./ui";

const FINISHED = [TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED, TaskStatus.INTERRUPTED];
const ACTIVE = [TaskStatus.QUEUED, TaskStatus.DISPATCHED, TaskStatus.RUNNING];
/** Most messages rendered at once; earlier ones come on request. */
const WINDOW = 2000;

function Message(props: { m: TaskMessage; decide?: (m: TaskMessage, allow: boolean) => void }) {
  const { m } = props;
  switch (m.kind) {
    case MessageKind.ASSISTANT:
      return <div class="msg assistant"><Markdown text={m.content} /></div>;
    case MessageKind.USER:
      return <div class="msg user"><span class="who">you</span> {m.content}</div>;
    case MessageKind.SYSTEM:
      return <div class="msg system">{m.content}</div>;
    case MessageKind.TOOL_USE:
      return (
        <details class="msg tool">
          <summary><span class="tool-name">{m.toolName || "tool"}</span> {m.content}</summary>
          <pre>{prettyJson(m.toolInputJson)}</pre>
        </details>
      );
    case MessageKind.TOOL_RESULT:
      return (
        <details class="msg tool-result">
          <summary>result{m.toolName ? ` of ${m.toolName}` : ""}: {m.content.split("\n")[0].slice(0, 120)}</summary>
          <pre><Ansi text={m.content} /></pre>
        </details>
      );
    case MessageKind.APPROVAL:
      return (
        <div class="msg approval">
          <strong>{m.toolName}</strong> asks to run:
          <pre>{prettyJson(m.toolInputJson)}</pre>
          {props.decide && (
            <div class="actions">
              <button class="allow" onClick={() => props.decide!(m, true)}>Allow</button>
              <button class="deny" onClick={() => props.decide!(m, false)}>Deny</button>
            </div>
          )}
        </div>
      );
    case MessageKind.STDERR:
      return <pre class="msg stderr"><Ansi text={m.content} /></pre>;
    default:
      return <pre class="msg stdout"><Ansi text={m.content} /></pre>;
  }
}

const ACTIONS: Record<number, string> = {
  [CompletionAction.PUSH]: "push the branch",
  [CompletionAction.MERGE]: "merge",
};

function completionText(task: Task): string {
  if (task.completionAction === CompletionAction.MERGE) return `merge into ${task.targetBranch || "the default branch"}`;
  return ACTIONS[task.completionAction] ?? "";
}

const plural = (n: number, one: string) => `${n} ${one}${n === 1 ? "" : "s"}`;

/** What the newest attempt changed: the summary, the completion's result, the files and the patch. */
function Changes(props: { diff: GetTaskDiffResponse }) {
  const c = props.diff.changes as TaskChanges;
  const lines = props.diff.patch.split("\n").length;
  return (
    <section class="changes" aria-label="Changes">
      <h3>Changes</h3>
      <p>
        <span class="mono">{c.branch}</span>: {plural(c.commits, "commit")}, {plural(c.filesChanged, "file")},{" "}
        <span class="add">+{c.insertions}</span> <span class="del">−{c.deletions}</span>
        <span class="muted"> (attempt {c.attempt}, {c.baseCommit.slice(0, 10)}..{c.headCommit.slice(0, 10)})</span>
      </p>
      {c.completionState && (
        <p class={`completion completion-${c.completionState}`}>{c.completionState === "ok" ? "✓" : "✗"} {c.completionDetail}</p>
      )}
      <table class="files">
        <tbody>
          {c.files.map((f) => (
            <tr>
              <td class="mono">{f.path}</td>
              {f.binary ? <td colSpan={2} class="muted">binary</td> : <><td class="add">+{f.insertions}</td><td class="del">−{f.deletions}</td></>}
            </tr>
          ))}
        </tbody>
      </table>
      {props.diff.patch && (
        <details open={lines <= 2000}>
          <summary>Patch ({plural(lines, "line")}{c.patchTruncated ? ", cut at 1 MiB" : ""})</summary>
          <Patch text={props.diff.patch} />
        </details>
      )}
    </section>
  );
}

export function TaskView(props: { id: string; me: Me }) {
  const [task, setTask] = useState<Task | null>(null);
  const [messages, setMessages] = useState<TaskMessage[]>([]);
  // Messages are shown from this index on (a long backlog is shown by its
  // end; earlier ones on request), so the page stays responsive at any size.
  const [from, setFrom] = useState(0);
  const [events, setEvents] = useState<TaskEvent[]>([]);
  const [usage, setUsage] = useState<GetTaskUsageResponse | null>(null);
  const [pending, setPending] = useState<Set<string>>(new Set());
  const [error, setError] = useState("");
  const [note, setNote] = useState("");
  const [text, setText] = useState("");
  const [daemons, setDaemons] = useState<Daemon[]>([]);
  const [reassignTo, setReassignTo] = useState("");
  const [diff, setDiff] = useState<GetTaskDiffResponse | null>(null);
  const last = useRef(0);
  // The seq after which loaded messages begin: a long task opens on its
  // last WINDOW messages, and earlier ones are fetched on request.
  const [base, setBase] = useState(0);
  const [loadingEarlier, setLoadingEarlier] = useState(false);

  useEffect(() => {
    const stop = new AbortController();
    setMessages([]);
    setFrom(0);
    // Messages arriving together render once a frame, not once each.
    let queued: TaskMessage[] = [];
    let frame = 0;
    const flush = () => {
      frame = 0;
      const batch = queued;
      queued = [];
      setMessages((ms) => {
        const all = ms.concat(batch);
        setFrom((f) => Math.max(f, all.length - WINDOW));
        return all;
      });
    };
    (async () => {
      try {
        const { task } = await api.getTask({ id: props.id }, { signal: stop.signal });
        last.current = Math.max(0, Number(task?.outputPrunedSeq ?? 0n), Number(task?.lastSeq ?? 0n) - WINDOW);
      } catch {
        last.current = 0;
      }
      setBase(last.current);
      await follow(
        (signal) => api.watchTask({ taskId: props.id, sinceSeq: BigInt(last.current), follow: true }, { signal }),
        (ev) => {
          setError("");
          if (ev.event.case === "task") setTask(ev.event.value);
          if (ev.event.case === "message") {
            const m = ev.event.value;
            if (Number(m.seq) <= last.current) return;
            last.current = Number(m.seq);
            queued.push(m);
            frame ||= requestAnimationFrame(flush);
          }
        },
        stop.signal,
        setError,
      );
    })();
    return () => {
      stop.abort();
      cancelAnimationFrame(frame);
    };
  }, [props.id]);

  /** Shows the WINDOW messages before the first shown: loaded ones, or fetched. */
  // Output up to this seq was removed by the server's retention.
  const pruned = Number(task?.outputPrunedSeq ?? 0n);
  const showEarlier = async () => {
    if (from > 0) {
      setFrom(Math.max(0, from - WINDOW));
      return;
    }
    setLoadingEarlier(true);
    try {
      const since = Math.max(pruned, base - WINDOW);
      const earlier: TaskMessage[] = [];
      let after = since;
      while (after < base) {
        const page = await api.listTaskMessages({ taskId: props.id, sinceSeq: BigInt(after), limit: base - after });
        const fresh = page.messages.filter((m) => Number(m.seq) <= base);
        if (!fresh.length) break;
        earlier.push(...fresh);
        after = Number(fresh[fresh.length - 1].seq);
      }
      setMessages((ms) => earlier.concat(ms));
      setBase(since);
    } catch (e) {
      setError(describe(e));
    } finally {
      setLoadingEarlier(false);
    }
  };

  // Where a failed or interrupted task could run again.
  useEffect(() => {
    if (props.me.readOnly || (task?.status !== TaskStatus.FAILED && task?.status !== TaskStatus.INTERRUPTED)) return;
    workspaces.listDaemons({ workspace: task.workspaceId }).then(
      (r) => setDaemons(r.daemons.filter((d) => d.state === DaemonState.ONLINE)),
      () => {},
    );
  }, [task?.status]);

  // The timeline and usage follow the task's changes.
  useEffect(() => {
    if (!task) return;
    api.listTaskEvents({ taskId: task.id, pageSize: 1000 }).then((r) => setEvents(r.events), (e) => setError(describe(e)));
    api.getTaskUsage({ taskId: task.id }).then(setUsage, () => {});
    api.listApprovals({ taskId: task.id }).then(
      (r) => setPending(new Set(r.approvals.filter((a) => a.state === ApprovalState.PENDING).map((a) => a.id))),
      () => {},
    );
  }, [task?.version, task?.status, task?.pendingApprovals]);

  // What the work changed, once an attempt has ended (and after a retried
  // completion, whose result comes as an event).
  useEffect(() => {
    if (!task?.repository || !FINISHED.includes(task.status)) return;
    api.getTaskDiff({ id: task.id }).then(setDiff, () => setDiff(null));
  }, [task?.version, task?.status, events.length]);

  const act = (what: string, call: () => Promise<unknown>) => {
    setNote("");
    call().then(() => setNote(what), (e) => setError(describe(e)));
  };
  const decide = (m: TaskMessage, allow: boolean) => {
    const message = allow ? "" : prompt("Why not? (told to the agent)") ?? "";
    act(allow ? "allowed" : "denied", () =>
      api.decideApproval({ taskId: props.id, approvalId: m.approvalId, decision: allow ? Decision.ALLOW : Decision.DENY, message }),
    );
  };

  if (!task) return <><ErrorLine error={error} /><p class="muted">Loading…</p></>;
  const ro = props.me.readOnly;
  const finished = FINISHED.includes(task.status);
  const total = usage?.total;

  return (
    <article class="task">
      <h2>{task.name} <Status status={task.status} /> {task.pendingApprovals > 0 && <span class="badge ask">approval waiting</span>}</h2>
      <dl class="fields">
        <dt>id</dt><dd class="mono">{task.id}</dd>
        <dt>runtime</dt><dd>{task.runtime}{task.model && ` · ${task.model}`}{task.permissionMode && ` · ${task.permissionMode}`}</dd>
        <dt>attempt</dt><dd>{task.attempt || "-"}</dd>
        <dt>daemon</dt><dd class="mono">{task.daemonId || "-"}</dd>
        {task.statusReason && <><dt>reason</dt><dd>{task.statusReason}</dd></>}
        {task.repository && <><dt>repository</dt><dd>{task.repository}{task.branch && <> · <span class="mono">{task.branch}</span></>}</dd></>}
        {completionText(task) && <><dt>on completion</dt><dd>{completionText(task)}</dd></>}
        {task.parentTaskId && <><dt>parent</dt><dd><Link href={`/tasks/${task.parentTaskId}`}>{task.parentTaskId.slice(0, 8)}</Link></dd></>}
        <dt>created</dt><dd><When time={task.createTime} /> by {task.createdBy}</dd>
        {total && (total.inputTokens > 0n || total.outputTokens > 0n) && (
          <>
            <dt>usage</dt>
            <dd>
              {usage!.usage.map((u) => (
                <div>{u.model}: {String(u.inputTokens)} in, {String(u.outputTokens)} out, {String(u.cacheReadTokens)} cache read, {String(u.cacheWriteTokens)} cache write</div>
              ))}
              {usage!.costUsd > 0 && <div>${usage!.costUsd.toFixed(4)} over {usage!.turns} turns</div>}
            </dd>
          </>
        )}
      </dl>

      {!ro && (
        <div class="actions">
          {(task.status === TaskStatus.PENDING || finished) && <button onClick={() => act("started", () => api.startTask({ id: task.id }))}>Start</button>}
          {ACTIVE.includes(task.status) && <button onClick={() => act("stopping", () => api.stopTask({ id: task.id }))}>Stop</button>}
          {(task.status === TaskStatus.INTERRUPTED || task.status === TaskStatus.FAILED) && (
            <>
              <select aria-label="Reassign to" value={reassignTo} onChange={(e) => setReassignTo(e.currentTarget.value)}>
                <option value="">any daemon</option>
                {daemons.map((d) => <option value={d.id}>{d.hostname} ({d.id.slice(0, 8)})</option>)}
              </select>
              <button onClick={() => act("reassigned", () => api.reassignTask({ id: task.id, daemonId: reassignTo }))}>Reassign</button>
            </>
          )}
          {task.status === TaskStatus.COMPLETED && completionText(task) && (
            <button onClick={() => act("asked the daemon to run the completion action again", () => api.retryCompletion({ id: task.id }))}>Retry completion</button>
          )}
          <button class="danger" onClick={() => confirm(`Delete task “${task.name}” and its subtasks?`) && api.deleteTask({ id: task.id }).then(() => navigate("/"), (e) => setError(describe(e)))}>Delete</button>
        </div>
      )}
      <ErrorLine error={error} />
      {note && <p class="note">{note}</p>}

      <section class="output" aria-label="Output">
        {pruned > 0 && <p class="muted">Messages 1–{pruned} were removed by the server's retention.</p>}
        {from + base - pruned > 0 && (
          <button class="link earlier" disabled={loadingEarlier} onClick={showEarlier}>
            Show earlier messages ({from + base - pruned} not shown)
          </button>
        )}
        {messages.slice(from).map((m) => <Message key={String(m.seq)} m={m} decide={!ro && m.kind === MessageKind.APPROVAL && pending.has(m.approvalId) ? decide : undefined} />)}
        {messages.length === 0 && pruned === 0 && <p class="muted">No output yet.</p>}
      </section>

      {!ro && (
        <form
          class="send"
          onSubmit={(e) => {
            e.preventDefault();
            if (!text.trim()) return;
            const said = text;
            setText("");
            act(finished ? "continued" : "sent", () =>
              finished ? api.continueTask({ id: task.id, prompt: said }) : api.sendMessage({ taskId: task.id, text: said }));
          }}
        >
          <input name="message" value={text} onInput={(e) => setText(e.currentTarget.value)}
            placeholder={finished ? "Continue the task with a new prompt…" : "Send the agent a message…"} />
          <button type="submit">{finished ? "Continue" : "Send"}</button>
        </form>
      )}

      {diff?.changes && <Changes diff={diff} />}

      <section>
        <h3>Timeline</h3>
        <ol class="timeline">
          {events.map((e) => (
            e.fromStatus === e.toStatus
              ? <li><When time={e.createTime} /> {e.reason} <span class="muted">{e.actor}</span></li>
              : <li><When time={e.createTime} /> {e.fromStatus ? `${statusName(e.fromStatus)} → ` : ""}<strong>{statusName(e.toStatus)}</strong> <span class="muted">{e.actor}{e.reason && `: ${e.reason}`}</span></li>
          ))}
        </ol>
      </section>
      <section>
        <h3>Plan</h3>
        <pre class="plan">{task.plan}</pre>
      </section>
    </article>
  );
}
