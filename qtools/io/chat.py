"""The shape of a chat as chat templates take it: messages and tool schemas.

One check for every file that holds chats (a suite's cases, calibration data),
so a message a template cannot render ("tool_calls": 5, a role that is a
number) is refused where it is read, naming its line, never met as a
template's traceback later.
"""

from __future__ import annotations

from typing import Any


def _text(v) -> bool:
    return isinstance(v, str)


def _content_ok(content) -> bool:
    """A string, or a list of parts ({"type": "text", "text": ...}) as multimodal templates take."""
    return _text(content) or (isinstance(content, list) and all(
        isinstance(p, dict) and _text(p.get("type")) for p in content))


def _call_problem(call: Any) -> str | None:
    if not isinstance(call, dict):
        return "is not an object {function: {name, arguments}}"
    fn = call.get("function", call)
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        return "has no function name"
    args = fn.get("arguments")
    if args is not None and not isinstance(args, (dict, str)):
        return "has arguments that are neither an object nor a JSON string"
    return None


def messages_problem(messages: Any) -> str | None:
    """Why `messages` is not a chat a template can render, or None."""
    if not isinstance(messages, list) or not messages:
        return '"messages" must be a non-empty list'
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            return f"message {i} must be an object with a 'role'"
        if not isinstance(msg.get("role"), str) or not msg["role"]:
            return f"message {i} must be an object with a 'role' (a string)"
        calls = msg.get("tool_calls")
        if "content" not in msg and calls is None:
            return f"message {i} lacks 'content'"
        content = msg.get("content")
        if content is not None and not _content_ok(content):
            return f"message {i} 'content' must be a string"
        if content is None and calls is None:
            return f"message {i} 'content' is null and it has no 'tool_calls'"
        if calls is not None:
            if not isinstance(calls, list):
                return f"message {i} 'tool_calls' must be a list of calls {{function: {{name, arguments}}}}"
            for j, call in enumerate(calls):
                problem = _call_problem(call)
                if problem:
                    return f"message {i} tool call {j} {problem}"
        for key in ("name", "tool_call_id"):
            if key in msg and msg[key] is not None and not _text(msg[key]):
                return f"message {i} {key!r} must be a string"
    return None


def tools_problem(tools: Any) -> str | None:
    """Why `tools` is not a list of function schemas a template can render, or None."""
    if not isinstance(tools, list):
        return "'tools' must be a list of function schemas (objects)"
    for i, tool in enumerate(tools):
        fn = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            return f"tool {i} must be a function schema with a 'name' ({{\"type\": \"function\", \"function\": {{\"name\", ...}}}})"
    return None
