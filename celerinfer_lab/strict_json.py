"""Strict JSON for untrusted model files: what Python's json module and nlohmann/json both accept.

Python's json is lenient where the C++ reader's nlohmann/json is strict (NaN and Infinity
literals, numbers past a double, duplicate keys, lone surrogates, any nesting up to a
RecursionError). A model file must mean the same thing to both readers, so this parser refuses
what either would refuse, and nesting deeper than limits.MAX_NESTING (the C++ reader stops at the
same depth while parsing, so deep files never reach a recursive copy).
"""

from __future__ import annotations

import json
import math
from typing import Any

from .errors import ModelFileError
from .limits import MAX_NESTING


class _Refused(ValueError):
    """Raised inside the parser's hooks; turned into a ModelFileError naming the file."""


def _object(pairs: list[tuple[str, Any]]) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise _Refused(f"the key {_repeated_key(pairs)[:80]!r} appears twice in one object")
    return out


def _repeated_key(pairs: list[tuple[str, Any]]) -> str:
    """The key whose second occurrence comes first (one pass: a hostile object may have millions)."""
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            return key
        seen.add(key)
    raise ValueError("no key appears twice")


def _constant(name: str) -> Any:
    raise _Refused(f"{name} is not JSON (non-finite numbers cannot be written in a model file)")


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Refused(f"the number {text[:40]} overflows a double")
    return value


def _int(text: str) -> int:
    value = int(text)  # more than 4300 digits: ValueError, refused below
    try:
        float(value)
    except OverflowError:
        raise _Refused(f"the number {text[:40]}... overflows a double") from None
    return value


def parse_strict_json(raw: bytes, where: str) -> Any:
    """Parse ``raw`` (UTF-8, a leading byte-order mark skipped) or raise ModelFileError naming ``where``."""
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ModelFileError(f"{where}: not UTF-8 text at byte {exc.start} ({exc.reason}); not a model file") from None
    try:
        value = json.loads(
            text, object_pairs_hook=_object, parse_constant=_constant, parse_float=_float, parse_int=_int
        )
    except RecursionError:
        raise ModelFileError(f"{where}: JSON nested deeper than {MAX_NESTING} levels (limits.MAX_NESTING)") from None
    except json.JSONDecodeError as exc:
        raise ModelFileError(
            f"{where}: not valid JSON at line {exc.lineno} column {exc.colno} ({exc.msg}); "
            f"the file may be truncated or not a model file"
        ) from None
    except _Refused as exc:
        raise ModelFileError(f"{where}: not strict JSON: {exc}") from None
    except ValueError as exc:  # an integer of more than 4300 digits
        raise ModelFileError(f"{where}: not strict JSON: {exc}") from None
    _check_depth_and_strings(value, where)
    return value


def _check_depth_and_strings(value: Any, where: str) -> None:
    """Nesting at most MAX_NESTING (the top container is depth 1); no string with a lone surrogate."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            _check_string(item, where)
            continue
        if not isinstance(item, (dict, list)):
            continue
        if depth > MAX_NESTING:
            raise ModelFileError(f"{where}: JSON nested deeper than {MAX_NESTING} levels (limits.MAX_NESTING)")
        children = item.values() if isinstance(item, dict) else item
        if isinstance(item, dict):
            for key in item:
                _check_string(key, where)
        stack.extend((child, depth + 1) for child in children)


def _check_string(text: str, where: str) -> None:
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ModelFileError(
            f"{where}: not strict JSON: a string holds a lone UTF-16 surrogate ({text[:40]!r})"
        ) from None
