"""The documentation: every relative link and anchor in README.md and
docs/*.md resolves (no network), the checker itself catches broken ones, and
the generated references (RPC methods and errors, the OpenAPI document)
match the code."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent


def script(name: str) -> ModuleType:
    """Import ``scripts/<name>.py`` (the scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(f"_script_{name}", ROOT / "scripts" /
                                                  f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_every_relative_link_and_anchor_resolves() -> None:
    links = script("check_links")
    files = links.default_files()
    assert ROOT / "README.md" in files and len(files) >= 7
    for name in ("deployment", "security", "rpc-api", "http-openapi", "http-api"):
        assert ROOT / "docs" / f"{name}.md" in files
    assert links.check(files) == []


def test_the_link_checker_finds_broken_links(tmp_path: Path) -> None:
    links = script("check_links")
    (tmp_path / "other.md").write_text("# Other page\n\n## Same\n\n## Same\n"
                                       '<a id="custom"></a>\n')
    page = tmp_path / "page.md"
    page.write_text(
        "# Title `code` & more!\n\n"
        "[ok](other.md) [ok](other.md#other-page) [ok](other.md#same-1) [ok](#title-code--more)\n"
        "[ok](other.md#custom) [external](https://example.com/nope) ![img](other.md)\n"
        "[ref]: other.md#same\n"
        "`[not a link](missing.md)`\n"
        "```\n[not a link either](missing.md)\n```\n"
        "[gone](missing.md) [bad anchor](other.md#nope) [bad local](#nope)\n"
        "[dir anchor](.#x)\n")
    problems = links.check([page])
    assert len(problems) == 4, problems
    assert any("missing.md: no such file" in p for p in problems)
    assert any("other.md#nope: no heading #nope" in p for p in problems)
    assert any("#nope: no heading #nope" in p and "other" not in p for p in problems)
    assert any("non-Markdown" in p for p in problems)
    assert links.slug("Every node: ledger replication") == "every-node-ledger-replication"
    assert links.slug("POST /api/auth/users/{user_id}") == "post-apiauthusersuser_id"


def test_generated_references_are_up_to_date() -> None:
    gen = script("gen_docs")
    for path, text in gen.outputs():
        assert path.read_text() == text, (
            f"{path.relative_to(ROOT)} is stale: run .venv/bin/python scripts/gen_docs.py")
    rpc = (ROOT / "docs" / "rpc-api.md").read_text()
    methods = gen.registered_methods()
    assert len(methods) >= 35
    for name in methods:  # every registered method has its own section
        assert f"### `{name}`" in rpc, name
    from p2pinfer import errors

    for cls in errors._all_subclasses(errors.P2PInferError):
        assert f"| {cls.code} | `{cls.__name__}` |" in rpc, cls.__name__
    http = (ROOT / "docs" / "http-openapi.md").read_text()
    from p2pinfer.web.openapi import openapi_document

    for path, ops in openapi_document(None)["paths"].items():
        for method in ops:
            assert f"### {method.upper()} {path}" in http
