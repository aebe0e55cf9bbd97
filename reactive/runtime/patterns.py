"""NATS subject / key patterns: validation, matching, and an index for many patterns."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Generic, TypeVar

__all__ = [
    "PatternIndex",
    "is_valid_execution_id",
    "matches_pattern",
    "validate_execution_id",
    "validate_key_pattern",
    "validate_subject",
]

T = TypeVar("T")

_ID_RE = re.compile(r"^[A-Za-z0-9_-]+$")
_TOKEN_RE = re.compile(r"^[A-Za-z0-9_\-=/]+$")
_SUBJECT_TOKEN_RE = re.compile(r"^[^\s.*>]+$")


def is_valid_execution_id(execution_id: object) -> bool:
    return isinstance(execution_id, str) and _ID_RE.match(execution_id) is not None


def validate_execution_id(execution_id: object) -> str:
    """Return ``execution_id`` if it is token-safe, else raise InvalidExecutionId."""
    from reactive.errors import InvalidExecutionId

    if not isinstance(execution_id, str):
        raise InvalidExecutionId(
            f"execution id must be a string, not {type(execution_id).__name__}: {execution_id!r}"
        )
    if not _ID_RE.match(execution_id):
        raise InvalidExecutionId(
            f"invalid execution id {execution_id!r}: use only letters, digits, '-' and '_' "
            "(no dots, wildcards, whitespace, and not empty)"
        )
    return execution_id


def _validate(
    pattern: str, token_re: re.Pattern[str], what: str, allow_wildcards: bool
) -> str | None:
    if not isinstance(pattern, str) or not pattern:
        return f"{what} must be a non-empty string, got {pattern!r}"
    tokens = pattern.split(".")
    for i, token in enumerate(tokens):
        if token == "":
            return f"{what} {pattern!r} has an empty token"
        if token in ("*", ">"):
            if not allow_wildcards:
                return f"{what} {pattern!r} must not contain wildcards"
            if token == ">" and i != len(tokens) - 1:
                return f"{what} {pattern!r}: '>' may only be the last token"
            continue
        if not token_re.match(token):
            return f"{what} {pattern!r} has an invalid token {token!r}"
    return None


def validate_key_pattern(pattern: str) -> str | None:
    """None if ``pattern`` is a valid KV key pattern, else the reason."""
    return _validate(pattern, _TOKEN_RE, "key pattern", True)


def validate_subject(subject: str, *, wildcards: bool = True) -> str | None:
    """None if ``subject`` is a valid NATS subject (pattern), else the reason."""
    return _validate(subject, _SUBJECT_TOKEN_RE, "subject", wildcards)


def matches_pattern(key: str, pattern: str) -> bool:
    """Whether ``key`` matches the NATS wildcard ``pattern`` ('*' one token, '>' the rest)."""
    if key == pattern:
        return True
    if "*" not in pattern and ">" not in pattern:
        return False  # a literal pattern matches only itself
    k = key.split(".")
    p = pattern.split(".")
    for i, token in enumerate(p):
        if token == ">":
            return len(k) > i
        if i >= len(k):
            return False
        if token != "*" and token != k[i]:
            return False
    return len(k) == len(p)


class _Node(Generic[T]):
    __slots__ = ("children", "full", "star", "tail", "values")

    def __init__(self) -> None:
        self.children: dict[str, _Node[T]] = {}
        self.star: _Node[T] | None = None
        self.tail: list[T] = []  # values of patterns ending in '>' here
        self.values: list[T] = []  # values of patterns ending exactly here
        self.full = False


class PatternIndex(Generic[T]):
    """Values stored under wildcard patterns, looked up by concrete key in time linear in its tokens.

    A lookup costs the same whether 1 or 10,000 patterns are indexed, as long as
    they do not match.
    """

    def __init__(self) -> None:
        self._root: _Node[T] = _Node()
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def add(self, pattern: str, value: T) -> None:
        node = self._root
        tokens = pattern.split(".")
        for i, token in enumerate(tokens):
            if token == ">" and i == len(tokens) - 1:
                node.tail.append(value)
                self._size += 1
                return
            if token == "*":
                if node.star is None:
                    node.star = _Node()
                node = node.star
            else:
                nxt = node.children.get(token)
                if nxt is None:
                    nxt = node.children[token] = _Node()
                node = nxt
        node.values.append(value)
        self._size += 1

    def match(self, key: str) -> list[T]:
        """Every value whose pattern matches ``key``, in insertion order per pattern."""
        out: list[T] = []
        tokens = key.split(".")
        n = len(tokens)
        stack: list[tuple[_Node[T], int]] = [(self._root, 0)]
        while stack:
            node, i = stack.pop()
            if i == n:
                out.extend(node.values)
                continue
            if node.tail:
                out.extend(node.tail)
            child = node.children.get(tokens[i])
            if child is not None:
                stack.append((child, i + 1))
            if node.star is not None:
                stack.append((node.star, i + 1))
        return out

    def extend(self, items: Iterable[tuple[str, T]]) -> None:
        for pattern, value in items:
            self.add(pattern, value)
