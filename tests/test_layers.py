"""The layers of docs/architecture.md, enforced on the source.

- a role package (auth, gateway, inference, metrics, web) never imports
  another role package: what several roles share lives below them
  (``p2pinfer.prompts``, ``p2pinfer.health``, ``p2pinfer.grants``, ...);
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
    role = ROOT / "gateway" / "role.py"
    assert "prompts" in imports_of(role) and "credentials" in imports_of(role)
    ledger = imports_of(ROOT / "ledger" / "ledger.py")
    assert "node" not in ledger, "the ledger imports the node"
