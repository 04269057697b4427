"""The docs' Python examples run as written.

Every ```python block of the README and of the guides below is executed, each in a fresh namespace
and in an empty temporary working directory (a reader who copies one block gets working code). A block
that cannot run as written (a placeholder path, hours of training) is marked in the page itself with
an HTML comment `<!-- not run: REASON -->` on the line before its fence; such blocks are reported as
skipped, and the marker must give a reason.
"""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# docs/serving.md's example talks to a running server; docs/method.md has no Python.
PAGES = (
    "README.md",
    "docs/bundled-model.md",
    "docs/drafters.md",
    "docs/benchmark.md",
    "docs/training.md",
    "docs/cost-model.md",
)

FENCE = re.compile(r"^```(\w*)\s*$")
NOT_RUN = re.compile(r"^<!--\s*not run:\s*(.*?)\s*-->\s*$")


def python_blocks(text: str) -> list[tuple[int, str, str | None]]:
    """(line number of the opening fence, code, reason it is not run or None) for each ```python block."""
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        start, lang = i, m.group(1)
        i += 1
        body = []
        while i < len(lines) and not FENCE.match(lines[i]):
            body.append(lines[i])
            i += 1
        if i == len(lines):
            raise AssertionError(f"line {start + 1}: unclosed code fence")
        i += 1  # the closing fence
        if lang != "python":
            continue
        prev = next((ln for ln in reversed(lines[:start]) if ln.strip()), "")
        skip = NOT_RUN.match(prev.strip())
        blocks.append((start + 1, "\n".join(body) + "\n", skip.group(1) if skip else None))
    return blocks


def test_block_extraction():
    text = "\n".join([
        "intro", "```bash", "echo no", "```", "", "```python", "x = 1", "```",
        "<!-- not run: needs a GPU -->", "", "```python", "y = 2", "```", "```json", "{}", "```",
    ])
    assert python_blocks(text) == [(6, "x = 1\n", None), (11, "y = 2\n", "needs a GPU")]
    with pytest.raises(AssertionError, match="unclosed"):
        python_blocks("```python\nx = 1\n")


def _cases():
    for page in PAGES:
        for line, code, reason in python_blocks((ROOT / page).read_text(encoding="utf-8")):
            marks = [pytest.mark.skip(reason=f"{page}:{line}: {reason}")] if reason is not None else []
            yield pytest.param(page, line, code, reason, id=f"{page}:{line}", marks=marks)


def test_pages_have_python_blocks():
    blocks = {page: python_blocks((ROOT / page).read_text(encoding="utf-8")) for page in PAGES}
    assert all(blocks.values()), {page: len(b) for page, b in blocks.items()}
    # The README's examples all run: none of them may be skipped.
    assert [b for b in blocks["README.md"] if b[2] is not None] == []


def shown_output(code: str) -> str | None:
    """The output a block shows: the comment lines right after its last line when that is a print()."""
    lines = code.rstrip("\n").splitlines()
    shown = []
    while lines and lines[-1].startswith("# "):
        shown.insert(0, lines.pop()[2:])
    if shown and lines and lines[-1].startswith("print("):
        return " ".join(shown)
    return None


def test_shown_output():
    assert shown_output("x = 1\nprint(x)\n# 1\n# 2\n") == "1 2"
    assert shown_output("x = 1  # one\nprint(x)\n") is None
    assert shown_output("x = 1\n# a remark\n") is None


@pytest.mark.parametrize(("page", "line", "code", "reason"), list(_cases()))
def test_python_block_runs_as_written(page, line, code, reason, tmp_path, monkeypatch):
    assert reason is None or reason, f"{page}:{line}: a not-run marker needs a reason"
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__main__"}
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        exec(compile(code, f"{page}:{line}", "exec"), namespace)
    expected = shown_output(code)
    if expected is not None:  # what the page says the block prints is what it prints
        assert " ".join(stdout.getvalue().split()) == " ".join(expected.split())


LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
DOC_NAME = re.compile(r"(?<![\w/.-])((?:docs/)?[\w-]+\.md)\b")


def anchors(text: str) -> set[str]:
    """GitHub's anchors for a page's headings (code blocks left out)."""
    out, fenced = set(), False
    for ln in text.splitlines():
        if FENCE.match(ln):
            fenced = not fenced
        elif not fenced and ln.startswith("#"):
            title = ln.lstrip("#").strip().lower()
            out.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return out


def _exists_exactly(path: Path) -> bool:
    """Exists under this exact spelling (a case-insensitive file system would accept METHOD.md)."""
    return path.exists() and path.name in {p.name for p in path.parent.iterdir()}


def link_problems(src: Path, root: Path = ROOT) -> list[str]:
    """Relative links to missing files or headings, and docs pages named in the text that do not exist
    under that name (`docs/METHOD.md` for docs/method.md)."""
    text = src.read_text(encoding="utf-8")
    bad = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        dest = (src.parent / path).resolve() if path else src
        if not _exists_exactly(dest):
            bad.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest.read_text(encoding="utf-8")):
            bad.append(f"{target}: no such heading")
    pages = {p.name.lower() for p in (root / "docs").glob("*.md")}
    for name in DOC_NAME.findall(text):
        if name.startswith("docs/"):
            ok = _exists_exactly(root / name)
        elif name.lower() in pages:  # a bare name that means one of the docs pages
            ok = _exists_exactly(src.parent / name) or _exists_exactly(root / "docs" / name)
        else:  # results.md, README.md of a model folder, ...: not a docs page
            continue
        if not ok:
            bad.append(f"{name}: no such page")
    return bad


@pytest.mark.parametrize("page", PAGES + ("docs/method.md",))
def test_links_and_cited_pages_exist(page):
    assert link_problems(ROOT / page) == []


def test_link_check_catches_wrong_names(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "method.md").write_text("# Method\n\n## Training (`amphista/training/`)\n")
    page = tmp_path / "docs" / "training.md"
    page.write_text("see docs/METHOD.md, [ok](method.md#training-amphistatraining), [gone](method.md#losses),\n"
                    "[missing](benchmark.md), METHOD.md, results.md and docs/method.md\n")
    assert link_problems(page, tmp_path) == [
        "method.md#losses: no such heading", "benchmark.md: no such file",
        "docs/METHOD.md: no such page", "METHOD.md: no such page",
    ]
