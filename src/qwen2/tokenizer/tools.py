"""Tool definitions, tool calls and tool results in Qwen's two formats (SPEC.md section 6).

- "hermes" (Qwen2.5, built into its HF chat template; Qwen-Agent's nous prompt): tools as JSON lines
  inside <tools></tools> in the system prompt, calls as `<tool_call>\\n{"name": ..., "arguments": {...}}
  \\n</tool_call>` blocks (several per reply), results in a user turn as `<tool_response>\\n...\\n
  </tool_response>`, consecutive results merged into one turn.
- "qwen" (Qwen2 era, Qwen-Agent's default fncall prompt until commit b28fc76): a `# Tools` system block
  and the markers ✿FUNCTION✿ / ✿ARGS✿ / ✿RESULT✿ / ✿RETURN✿, all inside one assistant turn: the model
  writes `✿FUNCTION✿: name\\n✿ARGS✿: {...}`, stops at ✿RESULT✿, the caller inserts
  `\\n✿RESULT✿: result\\n✿RETURN✿: ` and the model writes its reply. English or Chinese prompt text.

Rendering returns `Part`s (text, loss mask, trusted) that chat.py turns into text or ids. `trusted` marks
the fixed format text, which may hold control tokens (Qwen2.5's tokenizer has `<tool_call>` etc. as added
tokens); tool schemas, arguments and results are never trusted, so they cannot inject a control token.

Departures: tool-call arguments given as a JSON string are parsed first, so both formats render an
object (the Qwen2.5 template would `tojson` the string again); in the qwen format the stop word
`\\n✿RESULT✿` is part of what the model learns to write (mask 1), the inserted result is not, and the
reply after ✿RETURN✿ is trained starting with its ": " (the prompt at generation time ends at ✿RETURN✿,
as Qwen-Agent does to keep ": " from merging with the next word).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, NamedTuple


class Part(NamedTuple):
    text: str
    mask: int = 0  # 1 where the model writes this text (trained on in SFT)
    trusted: bool = False  # fixed format text: may contain control tokens


class ToolCallParseError(ValueError):
    """Generated text holds a tool call that cannot be read (bad JSON, no name, unclosed block)."""


@dataclass
class ToolCall:
    name: str
    arguments: dict[str, Any] | str = field(default_factory=dict)  # str only for non-JSON qwen-format input

    def to_dict(self) -> dict:
        """OpenAI-style `tool_calls` entry, with arguments as a JSON string as that API sends them."""
        args = (
            self.arguments
            if isinstance(self.arguments, str)
            else json.dumps(self.arguments, ensure_ascii=False)
        )
        return {"type": "function", "function": {"name": self.name, "arguments": args}}


FN_NAME, FN_ARGS, FN_RESULT, FN_EXIT = "✿FUNCTION✿", "✿ARGS✿", "✿RESULT✿", "✿RETURN✿"
QWEN_STOP_WORDS = [FN_RESULT, FN_EXIT]  # generation stops here; the caller inserts the tool result
HERMES_STOP_WORDS: list[str] = []  # Qwen2.5 ends a tool-calling reply with <|im_end|> as usual

_HERMES_HEAD = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
_HERMES_TAIL = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": '
    "<args-json-object>}\n</tool_call>"
)

# Qwen-Agent's prompt text, per language (`{names}` = the tools' names joined by commas).
_QWEN_TEXT = {
    "en": {
        "head": "# Tools\n\n## You have access to the following tools:\n\n",
        "tool": "### {human}\n\n{name}: {description} Parameters: {parameters} {args_format}",
        "json_args": "Format the arguments as a JSON object.",
        "code_args": "Enclose the code within triple backticks (`) at the beginning and end of the code.",
        "single": (
            "## When you need to call a tool, please insert the following command in your reply, "
            "which can be called zero or multiple times according to your needs:\n\n"
            "✿FUNCTION✿: The tool to use, should be one of [{names}]\n✿ARGS✿: The input of the tool\n"
            "✿RESULT✿: Tool results\n"
            "✿RETURN✿: Reply based on tool results. Images need to be rendered as ![](url)"
        ),
        "parallel": (
            "## Insert the following command in your reply when you need to call N tools in parallel:\n\n"
            "✿FUNCTION✿: The name of tool 1, should be one of [{names}]\n✿ARGS✿: The input of tool 1\n"
            "✿FUNCTION✿: The name of tool 2\n✿ARGS✿: The input of tool 2\n...\n"
            "✿FUNCTION✿: The name of tool N\n✿ARGS✿: The input of tool N\n"
            "✿RESULT✿: The result of tool 1\n✿RESULT✿: The result of tool 2\n...\n"
            "✿RESULT✿: The result of tool N\n"
            "✿RETURN✿: Reply based on tool results. Images need to be rendered as ![](url)"
        ),
    },
    "zh": {
        "head": "# 工具\n\n## 你拥有如下工具：\n\n",
        "tool": "### {human}\n\n{name}: {description} 输入参数：{parameters} {args_format}",
        "json_args": "此工具的输入应为JSON对象。",
        "code_args": "此工具的输入应为Markdown代码块。",
        "single": (
            "## 你可以在回复中插入零次、一次或多次以下命令以调用工具：\n\n"
            "✿FUNCTION✿: 工具名称，必须是[{names}]之一。\n✿ARGS✿: 工具输入\n✿RESULT✿: 工具结果\n"
            "✿RETURN✿: 根据工具结果进行回复，需将图片用![](url)渲染出来"
        ),
        "parallel": (
            "## 你可以在回复中插入以下命令以并行调用N个工具：\n\n"
            "✿FUNCTION✿: 工具1的名称，必须是[{names}]之一\n✿ARGS✿: 工具1的输入\n"
            "✿FUNCTION✿: 工具2的名称\n✿ARGS✿: 工具2的输入\n...\n"
            "✿FUNCTION✿: 工具N的名称\n✿ARGS✿: 工具N的输入\n"
            "✿RESULT✿: 工具1的结果\n✿RESULT✿: 工具2的结果\n...\n✿RESULT✿: 工具N的结果\n"
            "✿RETURN✿: 根据工具结果进行回复，需将图片用![](url)渲染出来"
        ),
    },
}

FORMATS = ("hermes", "qwen")


def check_format(tool_format: str) -> None:
    if tool_format not in FORMATS:
        raise ValueError(f"tool_format must be one of {FORMATS}, got {tool_format!r}")


# ---- tools in the system prompt -----------------------------------------------------------------
def _function(tool: Any, where: str) -> dict:
    """A tool as its function schema: accepts {"type": "function", "function": {...}} or the bare schema."""
    fn = tool.get("function", tool) if isinstance(tool, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise ValueError(
            f"{where}: a tool must be a dict with a 'name' (or {{'type': 'function', 'function': {{...}}}})"
        )
    return fn


def tools_system_parts(
    tools: list, tool_format: str, system: str, lang: str = "en", parallel: bool = False
) -> list[Part]:
    """The system turn's body: `system` (may be "") followed by the tool block of `tool_format`."""
    check_format(tool_format)
    fns = [_function(t, f"tools[{i}]") for i, t in enumerate(tools)]
    if tool_format == "hermes":  # Qwen2.5's template: system + "\n\n# Tools...", even for an empty system
        parts = [Part(system), Part("\n\n", trusted=True)]
        parts.append(Part(_HERMES_HEAD, trusted=True))
        for tool, fn in zip(tools, fns):
            # As given (Qwen2.5's template writes `tool | tojson`), wrapped when a bare schema was passed.
            spec = tool if tool.get("type") == "function" else {"type": "function", "function": fn}
            parts += [Part("\n", trusted=True), Part(json.dumps(spec, ensure_ascii=False))]
        parts.append(Part(_HERMES_TAIL, trusted=True))
        return parts
    if lang not in _QWEN_TEXT:
        raise ValueError(f"lang must be one of {sorted(_QWEN_TEXT)} or 'auto', got {lang!r}")
    parts = (
        [Part(system), Part("\n\n", trusted=True)] if system else []
    )  # Qwen-Agent: "\n\n" only after a system
    text = _QWEN_TEXT[lang]
    descriptions = []
    for fn in fns:
        name = fn.get("name_for_model", fn["name"])
        args_format = fn.get("args_format", text["code_args" if name == "code_interpreter" else "json_args"])
        descriptions.append(
            text["tool"]
            .format(
                human=fn.get("name_for_human", fn["name"]),
                name=name,
                description=fn.get("description", ""),
                parameters=json.dumps(fn.get("parameters", {}), ensure_ascii=False),
                args_format=args_format,
            )
            .rstrip()
        )
    names = ",".join(fn.get("name_for_model", fn["name"]) for fn in fns)
    # Tool descriptions are caller data: one untrusted part, between the fixed (trusted) prompt text.
    parts += [Part(text["head"], trusted=True), Part("\n\n".join(descriptions) + "\n\n")]
    parts.append(Part(text["parallel" if parallel else "single"].replace("{names}", names)))
    return parts


# ---- calls and results in the conversation ------------------------------------------------------
def tool_call_from_message(call: Any, where: str) -> ToolCall:
    """An entry of a message's `tool_calls` (OpenAI style, or {"name", "arguments"}) as a ToolCall."""
    fn = call.get("function", call) if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise ValueError(
            f"{where}: a tool call must be a dict with a 'name' (or 'function': {{'name', 'arguments'}})"
        )
    args = fn.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            pass  # kept as text (qwen format: e.g. a code block); hermes refuses it below
    return ToolCall(fn["name"], args)


def hermes_call_parts(call: ToolCall, where: str) -> list[Part]:
    if not isinstance(call.arguments, dict):
        raise ValueError(
            f"{where}: arguments must be a JSON object for tool_format='hermes', got {call.arguments!r}"
        )
    # The exact bytes of Qwen2.5's template: name written raw, arguments with tojson (ensure_ascii=False).
    body = (
        '\n{"name": "'
        + call.name
        + '", "arguments": '
        + json.dumps(call.arguments, ensure_ascii=False)
        + "}\n"
    )
    return [Part("<tool_call>", 1, True), Part(body, 1), Part("</tool_call>", 1, True)]


def hermes_result_parts(content: str) -> list[Part]:
    return [
        Part("<tool_response>", trusted=True),
        Part("\n" + content + "\n"),
        Part("</tool_response>", trusted=True),
    ]


def qwen_call_text(call: ToolCall) -> str:
    args = (
        call.arguments if isinstance(call.arguments, str) else json.dumps(call.arguments, ensure_ascii=False)
    )
    if args.startswith("```"):
        args = "\n" + args  # Qwen-Agent: a code block starts on its own line
    return f"{FN_NAME}: {call.name}\n{FN_ARGS}: {args}"


# ---- parsing generated text ---------------------------------------------------------------------
_HERMES_BLOCK = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)


def _load_call(raw: str, k: int, name: str | None = None) -> ToolCall:
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ToolCallParseError(
            f"tool call {k}: invalid JSON ({e.msg} at char {e.pos}): {raw[:200]!r}"
        ) from None
    if name is not None:  # qwen format: the JSON is the arguments
        if not isinstance(obj, dict):
            raise ToolCallParseError(
                f"tool call {k} ({name}): arguments must be a JSON object, got {raw[:200]!r}"
            )
        return ToolCall(name, obj)
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        raise ToolCallParseError(
            f'tool call {k}: expected {{"name": ..., "arguments": {{...}}}}, got {raw[:200]!r}'
        )
    args = obj.get("arguments", {})
    if isinstance(args, str):  # some models write the arguments as a JSON string
        return _load_call(args, k, obj["name"])
    if not isinstance(args, dict):
        raise ToolCallParseError(
            f"tool call {k} ({obj['name']}): arguments must be a JSON object, got {args!r}"
        )
    return ToolCall(obj["name"], args)


def parse_tool_calls(text: str, tool_format: str = "hermes") -> tuple[str, list[ToolCall]]:
    """Split generated assistant text into (content, calls). Raises ToolCallParseError on a call that
    cannot be read; text with no call gives (text.strip(), [])."""
    check_format(tool_format)
    if tool_format == "hermes":
        calls = [_load_call(m.group(1).strip(), k) for k, m in enumerate(_HERMES_BLOCK.finditer(text))]
        rest = _HERMES_BLOCK.sub("", text)
        if "<tool_call>" in rest:
            raise ToolCallParseError(
                f"unclosed <tool_call> at char {text.rfind('<tool_call>')}: generation stopped early?"
            )
        return rest.strip(), calls

    for stop in QWEN_STOP_WORDS:  # everything from a stop word on is the caller's, not the model's
        text = text.split(stop)[0]
    content, *blocks = text.split(FN_NAME + ":")
    calls = []
    for k, block in enumerate(blocks):
        if FN_ARGS + ":" not in block:
            raise ToolCallParseError(f"tool call {k}: {FN_NAME} {block.strip()[:80]!r} has no {FN_ARGS}")
        name, args = (s.strip() for s in block.split(FN_ARGS + ":", 1))
        if not name:
            raise ToolCallParseError(f"tool call {k}: empty tool name after {FN_NAME}")
        calls.append(ToolCall(name, args) if args.startswith("```") else _load_call(args or "{}", k, name))
    return content.strip(), calls
