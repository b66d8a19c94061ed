// The workspace's daemons: state, host, runtimes with versions, slots and
// the last sign of life.

import { useEffect, useState } from "preact/hooks";
import { describe, workspaces } from "./api";
import { DaemonState, type Daemon } from "./gen/taskmesh/v1/workspace_pb";
import type { Me } from "./main";
import { ErrorLine, Link, When } from "./ui";

export function Daemons(props: { me: Me }) {
  const [daemons, setDaemons] = useState<Daemon[]>([]);
  const [error, setError] = useState("");
  useEffect(() => {
    const load = () => workspaces.listDaemons({ workspace: props.me.workspace }).then((r) => setDaemons(r.daemons), (e) => setError(describe(e)));
    load();
    const timer = setInterval(load, 5000);
    return () => clearInterval(timer);
  }, [props.me.workspace]);
  return (
    <section>
      <h2>Daemons</h2>
      <ErrorLine error={error} />
      <table>
        <thead><tr><th>Host</th><th>State</th><th>Runtimes</th><th>Running</th><th>Last seen</th><th>Id</th></tr></thead>
        <tbody>
          {daemons.map((d) => (
            <tr>
              <td>{d.hostname}</td>
              <td><span class={`state state-${DaemonState[d.state].toLowerCase()}`}>{DaemonState[d.state].toLowerCase()}</span></td>
              <td>{d.runtimes.map((r) => <span class="runtime" title={r.version}>{r.name} <span class="muted">{r.version}</span></span>)}</td>
              <td>{d.activeTasks}/{d.maxConcurrentTasks}</td>
              <td><When time={d.lastSeenTime} /></td>
              <td class="mono"><Link href={`/?daemon=${d.id}`}>{d.id.slice(0, 8)}</Link></td>
            </tr>
          ))}
        </tbody>
      </table>
      {daemons.length === 0 && !error && <p class="muted">No daemon has registered yet: <code>taskmesh daemon --server {location.origin} --token-file daemon.token</code></p>}
    </section>
  );
}
