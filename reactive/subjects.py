"""NATS subject / key patterns: validation, matching, and an index for many patterns."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Generic, TypeVar

__all__ = [
    "MAX_EXECUTION_ID_LENGTH",
    "MAX_KEY_LENGTH",
    "MAX_STORED_KEY_LENGTH",
    "MAX_SUBJECT_LENGTH",
    "PatternIndex",
    "is_valid_execution_id",
    "matches_pattern",
    "preview",
    "subjects_overlap",
    "validate_execution_id",
    "validate_key_pattern",
    "validate_subject",
]

T = TypeVar("T")

_ID_RE = re.compile(r"^[A-Za-z0-9_-]+$")
_TOKEN_RE = re.compile(r"^[A-Za-z0-9_\-=/]+$")
_SUBJECT_TOKEN_RE = re.compile(r"^[^\s.*>]+$")

# Lengths, bounded because ids and keys become parts of NATS subjects, and a NATS
# protocol line (a publish: its subject, its reply subject, two sizes) is at most
# 4,096 bytes by default: a longer one makes the server close the connection.
#
# An execution id: it is part of its key (``<workflow>.<id>``), its callback subject
# and the meta bucket's keys.
MAX_EXECUTION_ID_LENGTH = 256
# A key of a watched bucket (an execution's key, or an entity's in a bucket the
# engine only watches): the engine builds meta-bucket keys from it, such as
# ``fire.<workflow>.<rule>.<bucket>.<key>``.
MAX_KEY_LENGTH = 1024
# What a backend stores or reads at the most: the longest key the engine builds
# (from a key of MAX_KEY_LENGTH and names of a workflow's definition), with room.
MAX_STORED_KEY_LENGTH = 2048
# The longest subject a backend publishes to or requests on: a direct get of the
# longest stored key (``$JS.API.DIRECT.GET.KV_<bucket>.$KV.<bucket>.<key>``), with
# room left in the protocol line for the reply subject and the sizes.
MAX_SUBJECT_LENGTH = 3584


def preview(text: str, limit: int = 80) -> str:
    """``text`` for an error or a log line: whole when short, else its start and its length."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


def is_valid_execution_id(execution_id: object) -> bool:
    return (
        isinstance(execution_id, str)
        and len(execution_id) <= MAX_EXECUTION_ID_LENGTH
        and _ID_RE.match(execution_id) is not None
    )


def validate_execution_id(execution_id: object) -> str:
    """Return ``execution_id`` if it is token-safe, else raise InvalidExecutionId."""
    from reactive.errors import InvalidExecutionId

    if not isinstance(execution_id, str):
        raise InvalidExecutionId(
            f"execution id must be a string, not {type(execution_id).__name__}: {execution_id!r}"
        )
    if len(execution_id) > MAX_EXECUTION_ID_LENGTH:
        raise InvalidExecutionId(
            f"invalid execution id {preview(execution_id)}: longer than "
            f"{MAX_EXECUTION_ID_LENGTH} characters"
        )
    if not _ID_RE.match(execution_id):
        raise InvalidExecutionId(
            f"invalid execution id {preview(execution_id)}: use only letters, digits, '-' and '_' "
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


def subjects_overlap(a: str, b: str) -> bool:
    """Whether some subject matches both NATS wildcard patterns ``a`` and ``b``."""
    ta, tb = a.split("."), b.split(".")
    for i in range(max(len(ta), len(tb))):
        x = ta[i] if i < len(ta) else None
        y = tb[i] if i < len(tb) else None
        if x == ">":
            return y is not None
        if y == ">":
            return x is not None
        if x is None or y is None:
            return False
        if x != y and x != "*" and y != "*":
            return False
    return True


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
