"""Parameter-tree paths, one way for every tree the library walks (linen dicts, NNX state).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax


def path_names(path: Sequence[Any]) -> list[str]:
  """The names along a ``jax.tree_util`` key path: dict keys and sequence indices as
  strings; attribute keys (an NNX Variable's ``.value``) are skipped, so a linen params
  dict and an NNX state give the same names for the same layer."""
  names = []
  for key in path:
    if isinstance(key, jax.tree_util.DictKey):
      names.append(str(key.key))
    elif isinstance(key, jax.tree_util.SequenceKey):
      names.append(str(key.idx))
    elif not isinstance(key, jax.tree_util.GetAttrKey):
      names.append(str(getattr(key, "key", key)))
  return names


def flatten(tree) -> dict[str, Any]:
  """``{'fc1/kernel/sign': leaf, ...}`` of every leaf of ``tree``."""
  return {"/".join(path_names(p)): leaf
          for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _parts(path: str) -> list[str]:
  return path.split("/") if path else []


def get(tree, path: str):
  """The node of a nested dict at a '/'-separated module path (``''``: the tree)."""
  for part in _parts(path):
    tree = tree[part]
  return tree


def writable(tree: dict, path: str) -> dict:
  """The dict at ``path`` of ``tree``, for editing: every dict on the way (``tree``'s own
  entries down to it) is replaced in ``tree`` by a copy, so the caller's edits never
  reach the dicts ``tree`` shares with anyone; missing levels are created."""
  node = tree
  for part in _parts(path):
    node[part] = dict(node.get(part, {}))
    node = node[part]
  return node
