// The server's services over gRPC-web, with the signed-in token.

import { createClient, type Client, type Interceptor, ConnectError, Code } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-web";
import { TaskService } from "./gen/taskmesh/v1/task_pb";
import { WorkspaceService } from "./gen/taskmesh/v1/workspace_pb";

const TOKEN_KEY = "taskmesh.token";
const WORKSPACE_KEY = "taskmesh.workspace";

export const session = {
  token: (): string => localStorage.getItem(TOKEN_KEY) ?? "",
  workspace: (): string => localStorage.getItem(WORKSPACE_KEY) ?? "",
  signIn(token: string) {
    localStorage.setItem(TOKEN_KEY, token.trim());
  },
  chooseWorkspace(id: string) {
    localStorage.setItem(WORKSPACE_KEY, id);
  },
  signOut() {
    localStorage.removeItem(TOKEN_KEY);
    localStorage.removeItem(WORKSPACE_KEY);
  },
};

const bearer: Interceptor = (next) => (req) => {
  const token = session.token();
  if (token) req.header.set("authorization", `Bearer ${token}`);
  return next(req);
};

const transport = createGrpcWebTransport({
  baseUrl: window.location.origin,
  interceptors: [bearer],
});

export const tasks: Client<typeof TaskService> = createClient(TaskService, transport);
export const workspaces: Client<typeof WorkspaceService> = createClient(WorkspaceService, transport);

/** A one-line message for an error, naming the code. */
export function describe(e: unknown): string {
  const err = ConnectError.from(e);
  return `${Code[err.code] ?? "error"}: ${err.rawMessage}`;
}

export function isCode(e: unknown, code: Code): boolean {
  return ConnectError.from(e).code === code;
}

/** The state of the page's live streams, for the indicator. */
export type Live = "live" | "reconnecting" | "offline";
const liveListeners = new Set<(s: Live) => void>();
export function onLive(f: (s: Live) => void): () => void {
  liveListeners.add(f);
  return () => liveListeners.delete(f);
}
function setLive(s: Live) {
  liveListeners.forEach((f) => f(s));
}

/**
 * Follows a server stream, reconnecting after a break (not after a refusal),
 * until `signal` aborts. `open` gets the signal to pass to the call.
 */
export async function follow<T>(
  open: (signal: AbortSignal) => AsyncIterable<T>,
  each: (item: T) => void,
  signal: AbortSignal,
  onError: (message: string) => void,
): Promise<void> {
  let delay = 500;
  while (!signal.aborted) {
    try {
      setLive("live");
      for await (const item of open(signal)) {
        delay = 500;
        each(item);
      }
    } catch (e) {
      if (signal.aborted) return;
      const code = ConnectError.from(e).code;
      if (code !== Code.Unavailable && code !== Code.Unknown && code !== Code.Internal) {
        onError(describe(e));
        setLive("offline");
        return;
      }
      setLive("reconnecting");
      onError(`${describe(e)}; reconnecting`);
    }
    await new Promise((r) => setTimeout(r, delay));
    delay = Math.min(delay * 2, 10_000);
  }
}

export { Code };
