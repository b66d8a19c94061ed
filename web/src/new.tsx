// A new task: name, plan, runtime (from what online daemons offer), model
// and permission mode for agents, repository, branch and completion action,
// parent, start now.

import { useEffect, useState } from "preact/hooks";
import { describe, tasks as api, workspaces } from "./api";
import { CompletionAction } from "./gen/taskmesh/v1/task_pb";
import { DaemonState } from "./gen/taskmesh/v1/workspace_pb";
import type { Me } from "./main";
import { ErrorLine, navigate } from "./ui";

const MODES = ["", "default", "acceptEdits", "plan", "bypassPermissions"];
const ACTIONS: Record<string, CompletionAction> = {
  none: CompletionAction.NONE,
  push: CompletionAction.PUSH,
  merge: CompletionAction.MERGE,
};

export function NewTask(props: { me: Me }) {
  const [runtimes, setRuntimes] = useState<string[]>(["shell"]);
  const [form, setForm] = useState({
    name: "", plan: "", runtime: "shell", model: "", permissionMode: "",
    repository: "", branch: "", completionAction: "none", targetBranch: "", parentTaskId: new URLSearchParams(location.search).get("parent") ?? "", start: true,
  });
  const [error, setError] = useState("");
  const [busy, setBusy] = useState(false);

  useEffect(() => {
    workspaces.listDaemons({ workspace: props.me.workspace }).then((r) => {
      const offered = new Set<string>(["shell"]);
      r.daemons.filter((d) => d.state === DaemonState.ONLINE).forEach((d) => d.runtimes.forEach((rt) => offered.add(rt.name)));
      setRuntimes([...offered].sort());
    }, (e) => setError(describe(e)));
  }, [props.me.workspace]);

  const set = (key: keyof typeof form) => (e: Event) => {
    const t = e.currentTarget as HTMLInputElement;
    setForm({ ...form, [key]: t.type === "checkbox" ? t.checked : t.value });
  };
  const agent = form.runtime !== "shell";

  return (
    <form
      class="new-task"
      onSubmit={async (e) => {
        e.preventDefault();
        setBusy(true);
        setError("");
        try {
          const { task } = await api.createTask({
            workspace: props.me.workspace, name: form.name, plan: form.plan, runtime: form.runtime,
            model: agent ? form.model : "", permissionMode: agent ? form.permissionMode : "",
            repository: form.repository, branch: form.repository ? form.branch : "", parentTaskId: form.parentTaskId,
            completionAction: form.repository ? ACTIONS[form.completionAction] : CompletionAction.NONE,
            targetBranch: form.repository && form.completionAction === "merge" ? form.targetBranch : "",
          });
          if (form.start) await api.startTask({ id: task!.id });
          navigate(`/tasks/${task!.id}`);
        } catch (e) {
          setError(describe(e));
        } finally {
          setBusy(false);
        }
      }}
    >
      <h2>New task</h2>
      <label>Name <input name="name" required value={form.name} onInput={set("name")} /></label>
      <label>Plan <textarea name="plan" rows={6} value={form.plan} onInput={set("plan")} placeholder="What the agent should do (for shell: the script)" /></label>
      <label>Runtime
        <select name="runtime" value={form.runtime} onChange={set("runtime")}>
          {runtimes.map((r) => <option value={r}>{r}</option>)}
        </select>
      </label>
      {agent && (
        <>
          <label>Model <input name="model" value={form.model} onInput={set("model")} placeholder="the daemon's default" /></label>
          <label>Permission mode
            <select name="permissionMode" value={form.permissionMode} onChange={set("permissionMode")}>
              {MODES.map((m) => <option value={m}>{m || "the daemon's default"}</option>)}
            </select>
          </label>
        </>
      )}
      <label>Repository <input name="repository" value={form.repository} onInput={set("repository")} placeholder="https://… or git@…" /></label>
      {form.repository && (
        <>
          <label>Branch <input name="branch" value={form.branch} onInput={set("branch")} placeholder="taskmesh/<short id>, made from the default branch" /></label>
          <label>When the agent completes
            <select name="completionAction" value={form.completionAction} onChange={set("completionAction")}>
              <option value="none">leave the work in the daemon's worktree</option>
              <option value="push">push the branch</option>
              <option value="merge">merge into a branch and push it</option>
            </select>
          </label>
          {form.completionAction === "merge" && (
            <label>Merge into <input name="targetBranch" value={form.targetBranch} onInput={set("targetBranch")} placeholder="the default branch" /></label>
          )}
        </>
      )}
      <label>Parent task <input name="parent" value={form.parentTaskId} onInput={set("parentTaskId")} placeholder="id, for a subtask" /></label>
      <label class="check"><input type="checkbox" name="start" checked={form.start} onChange={set("start")} /> Start now</label>
      <button type="submit" disabled={busy}>Create</button>
      <ErrorLine error={error} />
    </form>
  );
}
