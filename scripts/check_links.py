#!/usr/bin/env python3
"""Check that every relative link and anchor in README.md and docs/*.md resolves.

No network access: links to other sites (``http(s)://``, ``mailto:``) are
not fetched. A relative link must name an existing file or directory of the
checkout; a ``#fragment`` must be a heading of the target (or of the same
file), with GitHub's anchor rules (lower case, punctuation dropped, spaces
to hyphens, ``-1``, ``-2`` ... for repeated headings) or an explicit
``<a id=...>``. Links inside code blocks and code spans are not links.

Usage::

    .venv/bin/python scripts/check_links.py [FILE ...]   # exit 1 on a broken link
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

_FENCE = re.compile(r"^\s*(```|~~~)")
_INLINE_CODE = re.compile(r"(`+)(.+?)\1")
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_REF_DEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")
_HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
_HTML_ANCHOR = re.compile(r"<a\s+(?:[^>]*?\s)?(?:id|name)=\"([^\"]+)\"")
_EXTERNAL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def default_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _lines_outside_code(text: str) -> list[tuple[int, str]]:
    out = []
    fenced = False
    for number, line in enumerate(text.splitlines(), 1):
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            out.append((number, _INLINE_CODE.sub("", line)))
    return out


def slug(heading: str) -> str:
    """GitHub's anchor for a heading's text."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links: their text
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every fragment a link to ``path`` may name."""
    seen: dict[str, int] = {}
    out: set[str] = set()
    fenced = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if fenced:
            continue
        out.update(_HTML_ANCHOR.findall(line))
        m = _HEADING.match(line)
        if m is None:
            continue
        base = slug(m.group(2).replace("`", ""))
        count = seen.get(base, 0)
        seen[base] = count + 1
        out.add(base if count == 0 else f"{base}-{count}")
    return out


def links(path: Path) -> list[tuple[int, str]]:
    """``(line, target)`` of every link in ``path`` outside code."""
    found = []
    for number, line in _lines_outside_code(path.read_text(encoding="utf-8")):
        for m in _LINK.finditer(line):
            found.append((number, m.group(1)))
        ref = _REF_DEF.match(line)
        if ref is not None:
            found.append((number, ref.group(1)))
    return found


def check(files: list[Path]) -> list[str]:
    """Every broken link, as ``file:line: target: why``."""
    problems = []
    cache: dict[Path, set[str]] = {}
    for path in files:
        rel = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
        for number, target in links(path):
            if _EXTERNAL.match(target):
                continue
            file_part, _, fragment = target.partition("#")
            dest = path if not file_part else (path.parent / file_part).resolve()
            if not dest.exists():
                problems.append(f"{rel}:{number}: {target}: no such file")
                continue
            if not fragment:
                continue
            if dest.is_dir() or dest.suffix.lower() != ".md":
                problems.append(f"{rel}:{number}: {target}: a fragment on a non-Markdown target")
                continue
            if dest not in cache:
                cache[dest] = anchors(dest)
            if fragment not in cache[dest]:
                problems.append(f"{rel}:{number}: {target}: no heading #{fragment} in "
                                f"{dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest}")
    return problems


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    files = [Path(a).resolve() for a in args] or default_files()
    problems = check(files)
    for problem in problems:
        print(problem, file=sys.stderr)
    total = sum(len(links(f)) for f in files)
    print(f"checked {total} links in {len(files)} files: {len(problems)} broken")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
