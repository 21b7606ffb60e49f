"""The user documentation stands on its own: every link resolves inside the repository, and it speaks by topic.

A user reads a clone of this repository and nothing else, so in README.md, CONTRIBUTING.md, RESULTS.md,
BENCHMARKS.md, RELIABILITY.md, dashboard/README.md and docs/*.md:

- A relative Markdown link (``[text](path)``, ``![alt](path)``, ``[ref]: path``) must name a file or folder that
  exists, without leaving the repository (``../`` above its root fails, as does an absolute path); a link to a
  heading (``file.md#anchor``, ``#anchor``) must name a heading of that file, slugged as GitHub does.
- A link to another site fails, except a plain citation of a paper (hosts ``arxiv.org`` and ``doi.org``) and
  ``localhost``/``127.0.0.1`` (a service the user runs, such as the dashboard); better still, cite a paper by
  title and arXiv id in the text. URLs inside code (commands such as ``pip install --index-url ...``) are not links.
- No path in the text, code included, climbs out of the repository (``../shared/...``), and no private project
  material is named (``DESIGN.md``, ``notes/*.md``) unless the repository has it.
- Nothing says "issue 5": a reader who has never seen the issue tracker learns nothing from it. The same holds
  for the ``--help`` of ``server_app.simulate`` and ``server_app.compare``, and a preset they name must exist.
- ``make help`` lists every target of the Makefile.

No network, no subprocess but one ``make help``.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted(
    [ROOT / n for n in ("README.md", "CONTRIBUTING.md", "RESULTS.md", "BENCHMARKS.md", "RELIABILITY.md")]
    + [ROOT / "dashboard" / "README.md"]
    + list((ROOT / "docs").glob("*.md"))
)
IDS = [str(p.relative_to(ROOT)) for p in DOCS]

CITATION_HOSTS = {"arxiv.org", "www.arxiv.org", "doi.org", "dx.doi.org"}
LOCAL_HOSTS = {"localhost", "127.0.0.1"}
ISSUE = re.compile(r"\b[Ii]ssues? #?\d+")
PRIVATE = re.compile(r"\bDESIGN\.md\b|\bnotes/[\w-]+\.md\b|(?<![\w.])/work/")

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,}).*?^ {0,3}\1[`~]*[ \t]*$", re.M | re.S)
CODE_SPAN = re.compile(r"(`+)(?!`).+?(?<!`)\1(?!`)", re.S)
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*(<[^>]*>|[^)\s]*)(?:\s+\"[^\"]*\")?\s*\)")
REF_DEF = re.compile(r"^ {0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)", re.M)
AUTOLINK = re.compile(r"<(https?://[^>\s]+)>|(?<![(<\w])(https?://[^\s)<>\]]+)")
CLIMB = re.compile(r"(?<![\w.])((?:\.\./)+[\w.\-/]*)")
HEADING = re.compile(r"^ {0,3}#{1,6}[ \t]+(.+?)[ \t#]*$", re.M)


def _prose(text: str) -> str:
    """The text without fenced code blocks and code spans (where URLs are commands, not links)."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def _links(text: str) -> list[str]:
    prose = _prose(text)
    found = [m.group(1) for m in INLINE_LINK.finditer(prose)] + [m.group(1) for m in REF_DEF.finditer(prose)]
    found = [t[1:-1] if t.startswith("<") and t.endswith(">") else t for t in found]
    return found + [a or b for a, b in AUTOLINK.findall(INLINE_LINK.sub(" ", prose))]


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: its text, lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading anchors by its text
    text = re.sub(r"<[^>]+>", "", text).lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(text: str) -> set[str]:
    seen: dict[str, int] = {}
    anchors = set()
    for m in HEADING.finditer(FENCE.sub("", text)):
        slug = _slug(m.group(1))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def _problems(doc: Path, text: str | None = None) -> list[str]:
    """What is wrong with ``doc`` (or with ``text``, read as if it were ``doc``)."""
    text = doc.read_text(encoding="utf-8") if text is None else text
    problems = []
    for target in _links(text):
        parts = urlsplit(target)
        if parts.scheme in ("http", "https"):
            host = (parts.hostname or "").lower()
            if host not in CITATION_HOSTS | LOCAL_HOSTS:
                problems.append(f"{target}: a link outside the repository (cite papers by title and arXiv id)")
            continue
        if parts.scheme or parts.netloc:
            problems.append(f"{target}: not a relative link into the repository")
            continue
        if parts.path.startswith("/"):
            problems.append(f"{target}: an absolute path; link relative to {doc.relative_to(ROOT)}")
            continue
        if not parts.path:  # a heading of this file
            if parts.fragment not in _anchors(text):
                problems.append(f"{target}: no such heading here")
            continue
        dest = (doc.parent / parts.path).resolve()
        if not dest.is_relative_to(ROOT):
            problems.append(f"{target}: leaves the repository")
        elif not dest.exists():
            problems.append(f"{target}: no such file in the repository")
        elif parts.fragment and dest.suffix == ".md" and parts.fragment not in _anchors(dest.read_text("utf-8")):
            problems.append(f"{target}: no heading #{parts.fragment} in {dest.relative_to(ROOT)}")
    for m in CLIMB.finditer(text):
        if not (doc.parent / m.group(1)).resolve().is_relative_to(ROOT):
            problems.append(f"{m.group(1)}: a path outside the repository")
    for m in PRIVATE.finditer(text):
        if m.group(0).startswith("/") or not (ROOT / m.group(0)).exists():
            problems.append(f"{m.group(0)}: not part of the repository")
    problems += [f"{m.group(0)!r}: say what it is about, not its tracker number" for m in ISSUE.finditer(text)]
    return problems


@pytest.mark.parametrize("doc", DOCS, ids=IDS)
def test_doc_stands_on_its_own(doc: Path) -> None:
    assert _problems(doc) == []


def test_the_docs_exist() -> None:
    """The list above is not empty by accident (a renamed folder would make every check pass)."""
    assert {"README.md", "docs/design.md", "docs/algorithms.md", "dashboard/README.md"} <= set(IDS)


def test_the_checks_catch_what_they_should() -> None:
    """Each rule fires on a bad link and stays quiet on a good one (a broken regex would pass everything)."""
    doc = ROOT / "docs" / "probe.md"  # read as if it were in docs/; never written
    good = "\n".join([
        "# A heading", "see [design](design.md#the-metrics-store), [top](#a-heading) and [up](../README.md)",
        "[arXiv](https://arxiv.org/abs/1710.06952) and `pip install --index-url https://example.com/simple x`",
        "open <http://localhost:8501>", "```", "curl https://example.com/in-a-fence", "```",
    ])
    assert _problems(doc, good) == []
    bad = {
        "[d](../../elsewhere/DESIGN.md)": 3,  # leaves the repository, climbs out in the text, private name
        "[n](nowhere.md)": 1,
        "[h](design.md#no-such-heading)": 1,
        "[a](/README.md)": 1,
        "[w](https://example.com/page)": 1,
        "see https://example.org/bare": 1,
        "`../../shared/notes/algorithms.md`": 2,
        "as issue 5 says": 1,
        "Issues 3 and 4": 1,
    }
    for line, count in bad.items():
        assert len(_problems(doc, line)) == count, (line, _problems(doc, line))


def test_cli_help_speaks_by_topic() -> None:
    from server_app import compare, simulate

    for module in (simulate, compare):
        text = module._parser().format_help()
        assert not ISSUE.search(text), text
        for preset in re.findall(r"configs/[\w.-]+\.toml", re.sub(r"-\n\s*", "-", text)):
            assert (ROOT / preset).is_file(), f"{module.__name__} --help names {preset}, which does not exist"


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_make_help_lists_every_target() -> None:
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    targets = {t for line in re.findall(r"^\.PHONY:(.*)$", makefile, re.M) for t in line.split()}
    out = subprocess.run(["make", "-s", "help"], cwd=ROOT, capture_output=True, text=True, timeout=30, check=True)
    listed = set(re.findall(r"^make ([\w-]+)", out.stdout, re.M))
    assert targets and targets <= listed, f"make help misses {sorted(targets - listed)}"
