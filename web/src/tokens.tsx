// Tokens: the workspace's tokens; a new one is shown once, with a copy
// button; revoking one ends its open streams at once.

import { useEffect, useState } from "preact/hooks";
import { describe, workspaces } from "./api";
import { TokenKind, type Token } from "./gen/taskmesh/v1/workspace_pb";
import type { Me } from "./main";
import { ErrorLine, When } from "./ui";

const KINDS = [TokenKind.USER, TokenKind.VIEWER, TokenKind.DAEMON];
const kindName = (k: TokenKind) => (TokenKind[k] ?? "?").toLowerCase();

export function Tokens(props: { me: Me }) {
  const [tokens, setTokens] = useState<Token[]>([]);
  const [error, setError] = useState("");
  const [name, setName] = useState("");
  const [kind, setKind] = useState(TokenKind.DAEMON);
  const [secret, setSecret] = useState("");
  const load = () =>
    workspaces.listTokens({ workspace: props.me.workspace }).then((r) => setTokens(r.tokens), (e) => setError(describe(e)));
  useEffect(() => { load(); }, [props.me.workspace]);

  return (
    <section>
      <h2>Tokens</h2>
      <form
        class="inline"
        onSubmit={async (e) => {
          e.preventDefault();
          setError("");
          try {
            const r = await workspaces.createToken({ workspace: props.me.workspace, kind, name });
            setSecret(r.secret);
            setName("");
            load();
          } catch (e) {
            setError(describe(e));
          }
        }}
      >
        <label>Name <input name="token-name" value={name} onInput={(e) => setName(e.currentTarget.value)} placeholder="build-box-3" /></label>
        <label>Kind
          <select name="kind" value={kind} onChange={(e) => setKind(Number(e.currentTarget.value))}>
            {KINDS.map((k) => <option value={k}>{kindName(k)}</option>)}
          </select>
        </label>
        <button type="submit">Create token</button>
      </form>
      {secret && (
        <div class="secret" role="status">
          <p>The new token, shown this once:</p>
          <code>{secret}</code>{" "}
          <button onClick={() => navigator.clipboard?.writeText(secret)}>Copy</button>{" "}
          <button class="link" onClick={() => setSecret("")}>Done</button>
        </div>
      )}
      <ErrorLine error={error} />
      <table>
        <thead><tr><th>Name</th><th>Kind</th><th>User</th><th>Created</th><th>State</th><th></th></tr></thead>
        <tbody>
          {tokens.map((t) => (
            <tr>
              <td>{t.name || <span class="muted">-</span>}</td>
              <td>{kindName(t.kind)}</td>
              <td>{t.userName || "-"}</td>
              <td><When time={t.createTime} /></td>
              <td>{t.revokeTime ? <>revoked <When time={t.revokeTime} /></> : "active"}</td>
              <td>
                {!t.revokeTime && (
                  <button class="danger" onClick={() =>
                    confirm(`Revoke ${kindName(t.kind)} token “${t.name || t.id}”? Its open streams end at once.`) &&
                    workspaces.revokeToken({ id: t.id }).then(load, (e) => setError(describe(e)))}>Revoke</button>
                )}
              </td>
            </tr>
          ))}
        </tbody>
      </table>
    </section>
  );
}
