"""The layers of docs/architecture.md, enforced on the source.

- a role package (auth, gateway, inference, metrics, web) never imports
  another role package: what several roles share lives below them
  (``p2pinfer.prompts``, ``p2pinfer.health``, ``p2pinfer.grants``, ...);
- a role never imports the node: it is built with the node's
  ``p2pinfer.context.RoleContext`` and uses only that;
- the ledger never imports the node, at run time or for type checking;
- nothing below the roles imports a role package (the node loads the roles
  it runs by name, see ``node.ROLE_CLASSES``).

An import that must cross a line for a while is listed in ``KNOWN`` with
the reason it remains; the test fails on any other, and on a listed one
that is gone (so that the list only shrinks). It is empty.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "p2pinfer"
ROLES = {"auth", "gateway", "inference", "metrics", "web"}
# Layers above the roles: they compose roles and may import them (the node,
# the local swarm, and scaling, which watches the inference and metrics roles).
ABOVE = {"node", "swarm", "scaling"}

# (importing module, imported module): why it is still there.
KNOWN: dict[tuple[str, str], str] = {}


def imports_of(path: Path) -> list[str]:
    """Modules imported by ``path`` (relative to p2pinfer, dotted, without
    the ``p2pinfer.`` prefix), type-checking imports included."""
    rel = path.relative_to(ROOT)
    out: list[str] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(rel.parts[:-1])
                base = base[:len(base) - (node.level - 1)] if node.level > 1 else base
                module = ".".join([*base, *([node.module] if node.module else [])])
            elif (node.module or "").startswith("p2pinfer"):
                module = (node.module or "").removeprefix("p2pinfer").lstrip(".")
            else:
                continue
            if not module:  # from p2pinfer import x / from .. import x
                out.extend(alias.name for alias in node.names)
            else:
                out.append(module)
        elif isinstance(node, ast.Import):
            out.extend(a.name.removeprefix("p2pinfer.") for a in node.names
                       if a.name.startswith("p2pinfer."))
    return out


def crossings() -> dict[tuple[str, str], str]:
    found: dict[tuple[str, str], str] = {}
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        layer = rel.parts[0].removesuffix(".py")
        for module in imports_of(path):
            top = module.split(".")[0]
            key = (rel.as_posix(), module)
            if layer in ROLES and top in ROLES and top != layer:
                found[key] = "a role imports another role"
            elif layer in ROLES and top == "node":
                found[key] = "a role imports the node (roles take a RoleContext)"
            elif layer == "ledger" and top == "node":
                found[key] = "the ledger imports the node"
            elif layer not in ROLES and layer not in ABOVE and top in ROLES:
                found[key] = "a module below the roles imports a role"
    return found


def test_the_layers_hold() -> None:
    found = crossings()
    new = {k: v for k, v in found.items()
           if not any(k[0] == known[0] and k[1].startswith(known[1]) for known in KNOWN)}
    assert new == {}, "imports across the layers (docs/architecture.md):\n" + "\n".join(
        f"  {a} imports p2pinfer.{b}: {why}" for (a, b), why in sorted(new.items()))
    gone = [k for k in KNOWN if not any(f[0] == k[0] and f[1].startswith(k[1]) for f in found)]
    assert gone == [], f"no longer crossing, drop from KNOWN: {gone}"


def test_the_checker_sees_a_crossing(tmp_path: Path) -> None:
    """The checker's own control: relative, absolute and type-checking
    imports of another role are all seen."""
    gateway = imports_of(ROOT / "gateway" / "role.py")
    assert "prompts" in gateway and "context" in gateway  # the second under TYPE_CHECKING
    ledger = imports_of(ROOT / "ledger" / "ledger.py")
    assert "node" not in ledger, "the ledger imports the node"


def _members(protocol: type) -> set[str]:
    """The names a Protocol declares (properties, methods, attributes)."""
    names = {n for n in vars(protocol) if not n.startswith("_")}
    return names | set(getattr(protocol, "__annotations__", {}))


def test_the_node_and_the_fake_implement_the_role_context() -> None:
    """Every member of RoleContext exists on Node and on the test fake
    (mypy checks the types; this catches a member added to one side only),
    and the fake's metrics implement the Metrics Protocol."""
    from p2pinfer.context import Metrics, RoleContext
    from p2pinfer.metrics import NodeMetrics
    from p2pinfer.node import Node
    from p2pinfer.testing import FakeContext, RecordedMetrics

    wanted = _members(RoleContext)
    assert {"ledger", "rpc", "discovery", "metrics", "local_role", "serve"} <= wanted
    for cls in (Node, FakeContext):
        missing = {n for n in wanted if not hasattr(cls, n)
                   and n not in cls.__init__.__code__.co_names}
        assert missing == set(), f"{cls.__name__} lacks {sorted(missing)}"
    for cls in (NodeMetrics, RecordedMetrics):
        missing = {n for n in _members(Metrics) if not hasattr(cls, n)}
        assert missing == set(), f"{cls.__name__} lacks {sorted(missing)}"


def test_a_role_reaching_past_its_fake_context_is_told_what_is_missing() -> None:
    import pytest

    from p2pinfer.testing import FakeContext

    context = FakeContext()
    with pytest.raises(LookupError, match="no ledger"):
        _ = context.ledger
    assert context.is_member(context.peer_id) and not context.is_member("someone")


def test_one_table_of_roles() -> None:
    """The node roles are listed once (p2pinfer.grants.ROLES): the config
    accepts exactly those, and the node can load a class for each."""
    from p2pinfer import config, grants, node

    assert config.ROLES is grants.ROLES
    assert tuple(node.ROLE_CLASSES) == grants.ROLES
    for name in grants.ROLES:
        assert ROOT.joinpath(name, "role.py").exists()
