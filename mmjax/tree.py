"""Parameter trees by name: `a/b/kernel` paths for nested dicts, and regex matching of names."""

from __future__ import annotations

import re

from flax import traverse_util


def flat(tree) -> dict[str, object]:
    return traverse_util.flatten_dict(tree, sep="/")


def unflat(flat_tree: dict[str, object]):
    return traverse_util.unflatten_dict(flat_tree, sep="/")


def match(pattern: str, names) -> list[str]:
    """Names (`a/b/kernel`) that a regex matches anywhere (re.search)."""
    regex = re.compile(pattern)
    return [n for n in names if regex.search(n)]


def under(names, prefix: str) -> list[str]:
    """Names inside the subtree `prefix` ('' = all)."""
    prefix = prefix.strip("/")
    return [n for n in names if not prefix or n == prefix or n.startswith(prefix + "/")]
