// The dashboard: sign in with a token, then tasks (live), a task (live
// output, actions, approvals), a new task, and the daemons. Paths are deep
// links: /tasks/<id> reloads into the same view.

import { render } from "preact";
import { useEffect, useState } from "preact/hooks";
import { Code, describe, isCode, session, workspaces } from "./api";
import type { Workspace } from "./gen/taskmesh/v1/workspace_pb";
import { TaskList } from "./tasks";
import { TaskView } from "./task";
import { NewTask } from "./new";
import { Daemons } from "./daemons";
import { Tokens } from "./tokens";
import { Connection } from "./ui";
import { ErrorLine, Link, navigate } from "./ui";

/** Who is signed in: the workspaces the token sees, and whether it may change anything. */
export interface Me {
  workspaces: Workspace[];
  workspace: string;
  readOnly: boolean;
}

function SignIn(props: { error: string; onSignedIn: () => void }) {
  const [token, setToken] = useState("");
  return (
    <form
      class="signin"
      onSubmit={(e) => {
        e.preventDefault();
        session.signIn(token);
        props.onSignedIn();
      }}
    >
      <h1>taskmesh</h1>
      <p class="muted">Sign in with a user token (<code>tmu_…</code>, printed by <code>taskmesh serve</code> on its first start) or a read-only viewer token (<code>tmv_…</code>).</p>
      <label>
        Token
        <input name="token" type="password" autocomplete="off" value={token} onInput={(e) => setToken(e.currentTarget.value)} required />
      </label>
      <button type="submit">Sign in</button>
      <ErrorLine error={props.error} />
    </form>
  );
}

async function whoAmI(): Promise<Me> {
  const { workspaces: list } = await workspaces.listWorkspaces({});
  const saved = session.workspace();
  const workspace = list.find((w) => w.id === saved)?.id ?? list[0]?.id ?? "";
  // Only a user token may list tokens: a viewer is read-only.
  let readOnly = false;
  try {
    await workspaces.listTokens({ workspace });
  } catch (e) {
    readOnly = isCode(e, Code.PermissionDenied);
  }
  return { workspaces: list, workspace, readOnly };
}

function App() {
  const [path, setPath] = useState(location.pathname);
  const [me, setMe] = useState<Me | null>(null);
  const [error, setError] = useState("");
  const [attempt, setAttempt] = useState(0);

  useEffect(() => {
    const onPop = () => setPath(location.pathname);
    window.addEventListener("popstate", onPop);
    return () => window.removeEventListener("popstate", onPop);
  }, []);

  useEffect(() => {
    if (!session.token()) return;
    whoAmI().then(setMe, (e) => {
      setError(describe(e));
      if (isCode(e, Code.Unauthenticated)) session.signOut();
    });
  }, [attempt]);

  if (!session.token() || (!me && error)) {
    return <SignIn error={error} onSignedIn={() => { setError(""); setAttempt(attempt + 1); }} />;
  }
  if (!me) return <p class="muted">Loading…</p>;

  const chooseWorkspace = (id: string) => {
    session.chooseWorkspace(id);
    setMe({ ...me, workspace: id });
  };
  const task = path.match(/^\/tasks\/([^/]+)$/);
  let view;
  if (task) view = <TaskView id={decodeURIComponent(task[1])} me={me} />;
  else if (path === "/new" && !me.readOnly) view = <NewTask me={me} />;
  else if (path === "/daemons") view = <Daemons me={me} />;
  else if (path === "/tokens" && !me.readOnly) view = <Tokens me={me} />;
  else view = <TaskList me={me} />;

  return (
    <>
      <header>
        <Link href="/" class="brand">taskmesh</Link>
        <nav>
          <Link href="/">Tasks</Link>
          {!me.readOnly && <Link href="/new">New task</Link>}
          <Link href="/daemons">Daemons</Link>
          {!me.readOnly && <Link href="/tokens">Tokens</Link>}
        </nav>
        <Connection />
        {me.workspaces.length > 1 && (
          <select aria-label="Workspace" value={me.workspace} onChange={(e) => chooseWorkspace(e.currentTarget.value)}>
            {me.workspaces.map((w) => <option value={w.id}>{w.name}</option>)}
          </select>
        )}
        {me.readOnly && <span class="badge">read-only</span>}
        <button class="link" onClick={() => { session.signOut(); setMe(null); navigate("/"); }}>Sign out</button>
      </header>
      <main>{view}</main>
    </>
  );
}

render(<App />, document.getElementById("app")!);
