"""Which config keys change a run's outputs and which only its speed: the schema's `x-role`.

`output`: a rule's params or inputs (a change reruns what depends on it, so the outputs are a
clean run's with the new config); `tuning`: read by the jobs at run time or by a tool only
(threads, batch sizes, devices, pacing, prices: a change reruns nothing). A role on a section
covers its keys (e.g. filter.image_shape); every leaf of the schema has exactly one.
"""

from __future__ import annotations

from collections.abc import Iterator

from groundset.core.config import load_schema

OUTPUT, TUNING = "output", "tuning"


def _nodes(node: dict, prefix: str = "") -> Iterator[tuple[str, dict]]:
    """Every named node of a schema (object properties, recursively) by dotted config path."""
    for key, sub in node.get("properties", {}).items():
        path = f"{prefix}{key}"
        yield path, sub
        yield from _nodes(sub, path + ".")


def declared_roles() -> dict[str, set[str]]:
    """Every config key (or section) the schema gives a role (`x-role`), with that role."""
    return {path: {sub["x-role"]} for path, sub in _nodes(load_schema()) if "x-role" in sub}


def role_of(leaf: str, roles: dict[str, set[str]] | None = None) -> set[str]:
    """The roles of a config leaf: its own, or those of the nearest section named (a section's
    role covers its keys, e.g. filter.image_shape)."""
    roles = declared_roles() if roles is None else roles
    parts = leaf.split(".")
    for end in range(len(parts), 0, -1):
        found = roles.get(".".join(parts[:end]))
        if found:
            return found
    return set()


def keys_with_role(section: str, role: str) -> tuple[str, ...]:
    """The keys of a config section (dotted, relative to it) that the schema gives `role`."""
    start = f"{section}."
    return tuple(
        path.removeprefix(start)
        for path, roles in declared_roles().items()
        if path.startswith(start) and role in roles
    )


def keys_for(section: str, group: str, role: str = OUTPUT) -> tuple[str, ...]:
    """The keys of a config section (dotted, relative to it, in schema order) that the schema
    puts in the params of `group` (`x-params`: the job that reads them) with `role`."""
    start = f"{section}."
    return tuple(
        path.removeprefix(start)
        for path, sub in _nodes(load_schema())
        if path.startswith(start) and group in _groups(sub) and sub.get("x-role") == role
    )


def _groups(node: dict) -> list[str]:
    """The params groups a schema node names (`x-params`: one name or a list)."""
    groups = node.get("x-params", [])
    return [groups] if isinstance(groups, str) else groups
