"""Verifiable instruction-following constraints (paper section 4.2, "Instruction Following": responses
are checked by code against the instruction's constraints; IFEval-style). Each constraint is a JSON
object {"type": ..., "value": ...}; check(text, constraint) -> bool."""

from __future__ import annotations

import json
import re


def _words(text: str) -> int:
    return len(re.findall(r"\w+", text))


def _json(text: str) -> bool:
    body = re.sub(r"^```(?:json)?\s*|\s*```$", "", text.strip())
    try:
        json.loads(body)
    except ValueError:
        return False
    return True


CHECKS = {
    "max_words": lambda t, v: _words(t) <= int(v),
    "min_words": lambda t, v: _words(t) >= int(v),
    "max_chars": lambda t, v: len(t) <= int(v),
    "keywords": lambda t, v: all(k.lower() in t.lower() for k in v),
    "forbidden_words": lambda t, v: not any(re.search(rf"\b{re.escape(k)}\b", t, re.I) for k in v),
    "json": lambda t, v: _json(t),
    "bullets": lambda t, v: len(re.findall(r"^\s*[-*] ", t, re.M)) == int(v),
    "lowercase": lambda t, v: t == t.lower(),
    "uppercase": lambda t, v: t == t.upper(),
    "ends_with": lambda t, v: t.rstrip().endswith(v),
    "starts_with": lambda t, v: t.lstrip().startswith(v),
    "paragraphs": lambda t, v: len([p for p in re.split(r"\n\s*\n", t.strip()) if p.strip()]) == int(v),
}


def validate(constraints, where: str) -> None:
    for c in constraints:
        if not isinstance(c, dict) or c.get("type") not in CHECKS:
            raise ValueError(f"{where}: constraint {c!r}: 'type' must be one of {', '.join(CHECKS)}")


def check(text: str, constraint: dict) -> bool:
    return bool(CHECKS[constraint["type"]](text, constraint.get("value")))
