"""YAML as the service reads every file a user hands it: configurations, job specs, cluster manifests.

`yaml.safe_load` already refuses Python tags, but it accepts three things that hurt here:
- **alias bombs.** A 600-byte file of nested aliases ("billion laughs") loads in microseconds as a few
  shared lists, then expands to billions of values in whatever walks it (validation, an error message
  quoting it). Aliases are kept (anchors are a normal way to share a block), but a document whose
  aliases would expand it beyond `MAX_VALUES` values, or that refers to itself, is refused.
- **duplicate keys.** The last value silently wins (`train: {epochs: 1}` then `train: {epochs: 5}`);
  Kubernetes' strict validation refuses them, and so does this loader, naming the key and its line.
  Keys merged in with `<<: *anchor` may be overridden, as YAML intends.
- **nesting beyond Python's recursion limit**, which would surface as a RecursionError traceback.

Every failure is a `YamlError` whose message names the line; callers prefix the file and raise their own
error kind (configuration, job spec, manifest, store record).
"""
from __future__ import annotations

from typing import Any

import yaml

from thalia_ray.errors import excerpt

MAX_VALUES = 100_000  # values a document may hold once its aliases are expanded (configs hold hundreds)
MERGE_TAG = "tag:yaml.org,2002:merge"


class YamlError(ValueError):
    """Text that is not acceptable YAML; the message says what and where (line, column)."""


class _Loader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (merged `<<` keys excepted)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == MERGE_TAG:
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key: SafeConstructor names it below
                continue
            if duplicate:
                raise YamlError(f"duplicate key {excerpt(key)} at line {key_node.start_mark.line + 1}: "
                                "each key may appear once (the last one would silently win)")
        return super().construct_mapping(node, deep=deep)


def _expanded_size(node: yaml.Node, sizes: dict[int, int], open_nodes: set[int]) -> int:
    """Values under `node` with every alias expanded, computed once per node (aliases share nodes)."""
    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in open_nodes:
        raise YamlError(f"the block at line {node.start_mark.line + 1} contains an alias (*name) of itself: "
                        "a recursive structure cannot be read")
    open_nodes.add(key)
    size = 1
    if isinstance(node, yaml.MappingNode):
        size += sum(_expanded_size(k, sizes, open_nodes) + _expanded_size(v, sizes, open_nodes) for k, v in node.value)
    elif isinstance(node, yaml.SequenceNode):
        size += sum(_expanded_size(item, sizes, open_nodes) for item in node.value)
    open_nodes.discard(key)
    sizes[key] = size
    if size > MAX_VALUES:
        raise YamlError(f"the block at line {node.start_mark.line + 1} expands to more than {MAX_VALUES:,} values "
                        "through its aliases (*name): refused; write the values out, or share fewer of them")
    return size


def _reason(err: yaml.YAMLError) -> str:
    """The parser's complaint and where, in one line (its default text spans several)."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or " ".join(str(err).split())
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark else problem


def load_all(text: str) -> list[Any]:
    """Every document of `text` (empty ones as None), checked as the module docstring says."""
    loader = _Loader(text)
    try:
        documents = []
        while loader.check_node():
            node = loader.get_node()
            _expanded_size(node, {}, set())
            documents.append(loader.construct_document(node))
        return documents
    except yaml.YAMLError as err:
        raise YamlError(_reason(err)) from None
    except RecursionError:
        raise YamlError("nested too deeply to read") from None
    finally:
        loader.dispose()


def load(text: str) -> Any:
    """The one document of `text` (None when it holds none: empty, or comments only)."""
    documents = load_all(text)
    if len(documents) > 1:
        raise YamlError(f"{len(documents)} documents (separated by ---) where one was expected")
    return documents[0] if documents else None
