"""The MCP client side the agent stand-ins share: start a stdio server,
initialize it and call one tool over newline-delimited JSON-RPC 2.0, as
Claude Code and Codex do."""

import json
import os
import subprocess


class McpError(Exception):
    pass


def call_tool(command, args, env, tool, arguments, client):
    """Answers (text, is_error) of one tools/call."""
    proc = subprocess.Popen([command, *args], env=dict(os.environ, **env),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def rpc(message):
        proc.stdin.write(json.dumps(message) + "\n")
        proc.stdin.flush()
        if "id" not in message:
            return None
        line = proc.stdout.readline()
        if not line:
            raise McpError("the MCP server closed its output")
        answer = json.loads(line)
        if answer.get("id") != message["id"]:
            raise McpError(f"answer id {answer.get('id')} for request {message['id']}")
        if "error" in answer:
            raise McpError(answer["error"]["message"])
        return answer["result"]

    try:
        init = rpc({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": client}})
        if "tools" not in init.get("capabilities", {}):
            raise McpError(f"the server offers no tools: {init}")
        rpc({"jsonrpc": "2.0", "method": "notifications/initialized"})
        names = [t["name"] for t in rpc({"jsonrpc": "2.0", "id": 2, "method": "tools/list"})["tools"]]
        if tool not in names:
            return f"no tool {tool} (the server has {', '.join(names)})", True
        result = rpc({"jsonrpc": "2.0", "id": 3, "method": "tools/call",
                      "params": {"name": tool, "arguments": arguments}})
        text = "".join(c["text"] for c in result["content"] if c["type"] == "text")
        return text, result.get("isError", False)
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)
