"""ChatML rendering to text, and to ids with an SFT loss mask (SPEC.md section 6).

Source: Qwen2-Instruct's chat template (the Jinja string `QWEN2_CHAT_TEMPLATE`, as in its
tokenizer_config.json): a default system turn "You are a helpful assistant." when the first message is
not a system message, then `<|im_start|>{role}\\n{content}<|im_end|>\\n` per message, then
`<|im_start|>assistant\\n` with `add_generation_prompt`. Tools follow Qwen2.5's template (hermes) or
Qwen-Agent (qwen), see tool_calls.py. `apply_chat_template` renders a checkpoint's own Jinja template the
way transformers does (sandboxed environment, trim_blocks, lstrip_blocks, its `tojson`).

How the safety holds: the structural tokens (`<|im_start|>`, `<|im_end|>`, and the tool format's own
markers) are inserted as control ids, while roles, message contents, tool schemas, arguments and
results are always encoded as text, so a message containing `<|im_end|>` cannot close its turn.

Departures: `render_chat` text is byte-identical to the template. `encode_chat` ids equal tokenizing that
text, except that each assistant reply is tokenized apart from its `<|im_start|>assistant\\n` header
(as at generation time, where the prompt ends with that header): the two differ only when a reply
starts with a line break, which whole-text tokenization would merge with the header's "\\n".
SFT loss mask (SPEC §6): 1 on each assistant reply's tokens and its `<|im_end|>`, 0 elsewhere
(system, user and tool turns, headers, the "\\n" after `<|im_end|>`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any

from qwen2.tokenizer.bpe import IM_END, IM_START, QWEN2_CHAT_TEMPLATE, Tokenizer  # noqa: F401 (re-exported)
from qwen2.tokenizer.tools import (
    FN_EXIT,
    FN_NAME,
    FN_RESULT,
    Part,
    check_format,
    hermes_call_parts,
    hermes_result_parts,
    qwen_call_text,
    tool_call_from_message,
    tools_system_parts,
)

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
ROLES = ("system", "user", "assistant", "tool")
_CJK = re.compile("[\u4e00-\u9fff]")


def _content(message: dict, i: int) -> str:
    content = message.get("content")
    if content is None and message["role"] == "assistant" and message.get("tool_calls"):
        return ""
    if not isinstance(content, str):
        raise ValueError(f"messages[{i}]['content'] must be a string, got {type(content).__name__}")
    return content


def _check(messages: list[dict]) -> None:
    if not messages:
        raise ValueError("messages is empty: give at least one {'role': ..., 'content': ...}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            role = m.get("role") if isinstance(m, dict) else m
            raise ValueError(f"messages[{i}]: 'role' must be one of {ROLES}, got {role!r}")
        _content(m, i)


@dataclass
class _Turn:
    role: str
    body: list[Part]
    closed: bool = True  # False: ends without <|im_end|>, the model continues it


def _turns(messages, tools, tool_format, system_prompt, lang, parallel_calls) -> list[_Turn]:
    """Messages -> ChatML turns.

    Tool calls and results are folded into the turns their format puts them in."""
    _check(messages)
    check_format(tool_format)
    turns: list[_Turn] = []
    first = 0
    system = system_prompt
    if messages[0]["role"] == "system":
        system, first = _content(messages[0], 0), 1
    if tools:
        if lang == "auto":
            lang = "zh" if any(_CJK.search(_content(m, i)) for i, m in enumerate(messages)) else "en"
        turns.append(
            _Turn("system", tools_system_parts(tools, tool_format, system or "", lang, parallel_calls))
        )
    elif system is not None:
        turns.append(_Turn("system", [Part(system)]))

    for i in range(first, len(messages)):
        m, role = messages[i], messages[i]["role"]
        content = _content(m, i)
        calls = [
            tool_call_from_message(c, f"messages[{i}].tool_calls[{j}]")
            for j, c in enumerate(m.get("tool_calls") or [])
        ]
        prev = turns[-1] if turns else _Turn("", [Part("")])
        after_result = prev.role == "assistant" and bool(prev.body) and prev.body[-1].text.endswith(FN_EXIT)
        if role == "tool" and tool_format == "hermes":
            if prev.role == "user" and prev.body[-1] == Part("</tool_response>", 0, True):
                prev.body += [Part("\n"), *hermes_result_parts(content)]  # consecutive results share a turn
            else:
                turns.append(_Turn("user", hermes_result_parts(content)))
            continue
        if role == "tool":  # qwen: the result goes inside the assistant turn that made the call
            if not (prev.role == "assistant" and any(FN_NAME in p.text for p in prev.body)):
                raise ValueError(
                    f"messages[{i}]: a tool result must follow an assistant message with tool_calls"
                )
            if after_result:  # a further (parallel) result: reopen the list of results
                prev.body[-1] = prev.body[-1]._replace(text=prev.body[-1].text[: -len("\n" + FN_EXIT)])
                prev.body.append(Part(f"\n{FN_RESULT}: {content}\n{FN_EXIT}"))
            else:  # the model writes the stop word; the caller inserts the result
                prev.body += [Part("\n" + FN_RESULT, 1), Part(f": {content}\n{FN_EXIT}")]
            continue
        if role != "assistant":
            turns.append(_Turn(role, [Part(content)]))
            continue
        if tool_format == "qwen" and after_result:  # the reply after ✿RETURN✿ continues the same turn
            body = prev.body
            body.append(Part(": " + content, 1))
        else:
            body = [Part(content, 1)] if content else []
            turns.append(_Turn("assistant", body))
        for j, call in enumerate(calls):
            where = f"messages[{i}].tool_calls[{j}]"
            sep = [Part("\n", 1)] if body else []  # calls follow the text on a new line, in both formats
            body += sep + (
                hermes_call_parts(call, where) if tool_format == "hermes" else [Part(qwen_call_text(call), 1)]
            )

    for k, turn in enumerate(turns):
        if turn.role == "assistant" and turn.body and turn.body[-1].text.endswith(FN_EXIT):
            if k == len(turns) - 1:
                turn.closed = False  # ends on a tool result: the model continues after ✿RETURN✿ (Qwen-Agent)
            else:
                turn.body.append(Part(": ", 1))  # closed by a later turn: an empty reply after ✿RETURN✿
    return turns


def chat_parts(
    messages: list[dict],
    add_generation_prompt: bool = False,
    tools: list | None = None,
    tool_format: str = "hermes",
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
    lang: str = "auto",
    parallel_calls: bool = False,
) -> list[Part]:
    """The whole conversation as Parts (text, loss mask, trusted); see render_chat for the arguments."""
    parts: list[Part] = []
    turns = _turns(messages, tools, tool_format, system_prompt, lang, parallel_calls)
    for turn in turns:
        parts += [Part(IM_START, 0, True), Part(turn.role + "\n"), *turn.body]
        if turn.closed:
            parts += [Part(IM_END, int(turn.role == "assistant"), True), Part("\n")]
    if (
        add_generation_prompt and turns[-1].closed
    ):  # an open (qwen-format) assistant turn is itself the prompt
        parts += [Part(IM_START, 0, True), Part("assistant\n")]
    return parts


def render_chat(
    tokenizer: Tokenizer | None,
    messages: list[dict],
    add_generation_prompt: bool = False,
    tools: list | None = None,
    tool_format: str = "hermes",
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
    lang: str = "auto",
    parallel_calls: bool = False,
) -> str:
    """Messages -> ChatML text, identical to Qwen2-Instruct's template (and Qwen2.5's with hermes tools).

    messages: [{"role": "system"|"user"|"assistant"|"tool", "content": str, "tool_calls": [...]}].
    system_prompt: used when messages[0] is not a system message (None: no default system turn).
    tools: function schemas, rendered into the system turn in `tool_format` ("hermes" or "qwen");
    lang ("en", "zh" or "auto": Chinese if any message has CJK text) and parallel_calls pick the qwen
    format's prompt text. `tokenizer` is unused by the text itself and may be None.
    """
    parts = chat_parts(
        messages, add_generation_prompt, tools, tool_format, system_prompt, lang, parallel_calls
    )
    return "".join(p.text for p in parts)


def encode_chat(
    tokenizer: Tokenizer,
    messages: list[dict],
    add_generation_prompt: bool = False,
    tools: list | None = None,
    tool_format: str = "hermes",
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
    lang: str = "auto",
    parallel_calls: bool = False,
) -> tuple[list[int], list[int]]:
    """Messages -> (ids, loss_mask): mask 1 exactly on what the assistant writes plus its <|im_end|>.

    Arguments as render_chat; `tokenizer.decode(ids) == NFC(render_chat(...))`.
    """
    _ = tokenizer.im_start_id, tokenizer.im_end_id  # a clear error if the tokenizer has no ChatML tokens
    parts = chat_parts(
        messages, add_generation_prompt, tools, tool_format, system_prompt, lang, parallel_calls
    )
    ids: list[int] = []
    mask: list[int] = []
    start = 0
    # Each run of equal mask is tokenized as one text, so a token never straddles a mask boundary.
    for end in range(1, len(parts) + 1):
        if end == len(parts) or parts[end].mask != parts[start].mask:
            run = tokenizer.encode_pieces((p.text, p.trusted) for p in parts[start:end])
            ids += run
            mask += [parts[start].mask] * len(run)
            start = end
    return ids, mask


# ---- a checkpoint's own Jinja template ----------------------------------------------------------
@lru_cache(maxsize=16)
def _compile(template: str):
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        # `{% generation %}...{% endgeneration %}` marks assistant text for transformers' assistant mask;
        # here it only renders its body (encode_chat computes the mask for ChatML instead).
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body).set_lineno(lineno)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # transformers' tojson: no HTML escaping, non-ASCII kept (Jinja's own filter escapes < > & ').
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def apply_chat_template(
    tokenizer: Tokenizer,
    messages: list[dict],
    add_generation_prompt: bool = False,
    tools: list | None = None,
    chat_template: str | None = None,
    tokenize: bool = False,
    **kwargs: Any,
) -> str | list[int]:
    """Render the checkpoint's chat template (or `chat_template`) like transformers' apply_chat_template.

    Returns the text, or with `tokenize=True` the ids, where control tokens come only from the template
    itself: control-token text inside messages, tools or kwargs stays text. Extra kwargs reach the template.
    """
    template = chat_template or tokenizer.chat_template
    if not template:
        raise ValueError(
            f"tokenizer {tokenizer.name} has no chat template (tokenizer_config.json 'chat_template' or "
            "chat_template.jinja): pass chat_template=..., or use render_chat for Qwen2's ChatML"
        )
    # transformers drops None-valued keys (OpenAI's content=None), which templates handle as missing.
    messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
    protect = _Protect(tokenizer, (messages, tools, kwargs)) if tokenize else None
    if protect:
        messages, tools, kwargs = protect.mark((messages, tools, kwargs))
    special = {k: v for k, v in (("eos_token", tokenizer.eos_token), ("pad_token", tokenizer.pad_token)) if v}
    text = _compile(template).render(
        messages=messages, tools=tools, add_generation_prompt=add_generation_prompt, **{**special, **kwargs}
    )
    if not tokenize:
        return text
    return tokenizer.encode_pieces(protect.pieces(text))


class _Protect:
    """Swap each control token inside caller data for one private-use character before rendering, so
    that after rendering the template's own control tokens can be told from the caller's."""

    def __init__(self, tokenizer: Tokenizer, data):
        tokens = sorted(tokenizer.control_tokens, key=len, reverse=True)
        used = set("".join(_strings(data)))
        # A private-use block that no input uses, so a caller's own character is never mistaken for a marker.
        base = next(
            (
                b
                for b in range(0x100000, 0x10FFFE - len(tokens), 4096)
                if not used & {chr(b + k) for k in range(len(tokens))}
            ),
            None,
        )
        if base is None:
            raise ValueError(
                "apply_chat_template(tokenize=True): inputs use every private-use block; "
                "cannot mark control tokens"
            )
        self.to_mark = {t: chr(base + k) for k, t in enumerate(tokens)}
        self.from_mark = {c: t for t, c in self.to_mark.items()}
        self.token_re = re.compile("|".join(map(re.escape, tokens))) if tokens else None
        self.mark_re = re.compile("([" + "".join(self.from_mark) + "])") if tokens else None

    def mark(self, obj):
        if isinstance(obj, str):
            return self.token_re.sub(lambda m: self.to_mark[m.group(0)], obj) if self.token_re else obj
        if isinstance(obj, dict):
            return {k: self.mark(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return type(obj)(self.mark(v) for v in obj)
        return obj

    def pieces(self, text: str):
        if self.mark_re is None:
            return [(text, True)]
        chunks = self.mark_re.split(text)  # [template text, marker, template text, ...]
        return [(self.from_mark[c], False) if k % 2 else (c, True) for k, c in enumerate(chunks)]


def _strings(obj):
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _strings(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _strings(v)
