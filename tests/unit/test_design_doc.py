"""docs/design.md must map the code as it is: every source file named, nothing named that is gone.

The rule reads the filesystem, so when a file is added, renamed or removed, the only thing to
update is the doc's "## Layout" section. Its fenced blocks are parsed line by line:

- a line at the left margin names folders (``engine/models/``) or top-level files
  (``launch.py``); the last folder named is the current one;
- a line indented by exactly two spaces names files of the current folder;
- the names come first, comma-separated, and end at the first run of two spaces (a description
  follows); lines indented deeper continue a description and name nothing.

Checked:

1. The ``.py`` files listed under the project's packages (read from pyproject.toml:
   ``[tool.setuptools.packages.find] include`` and ``py-modules``, i.e. protocol,
   tokenizer_proc, scheduler_proc, engine, prefill_worker, decode_worker, kvtransfer, bench and
   launch.py) are exactly the non-test ``.py`` files on disk, and the files listed under
   ``scripts/`` are exactly the files there. ``__init__.py`` and ``__main__.py`` are ignored in
   this comparison (the doc may list them, e.g. ``kvtransfer/__init__.py``, but need not).
2. Every folder and file the Layout names exists.
3. Every ``something.py`` the whole doc mentions exists: a name with a ``/`` relative to the
   repository root, a bare name as the name of some file of the repository.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "design.md"
IGNORED_NAMES = {"__init__.py", "__main__.py"}
LISTED_FOLDERS = ("scripts",)  # folders whose every file (not only .py) the Layout must list
SKIPPED_DIRS = {".git", ".venv", "__pycache__", "node_modules", "build", "dist"}

# A path-like token ending in .py that is not part of a longer token or a glob (``test_*.py``).
PY_MENTION = re.compile(r"(?<![\w*./-])([\w./-]*\w\.py)(?![\w])")


def _project_modules() -> tuple[list[str], list[str]]:
    """(package folders, top-level module files) as pyproject.toml declares them."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages = sorted({p.split(".")[0].rstrip("*") for p in config["packages"]["find"]["include"]})
    modules = [f"{m}.py" for m in config.get("py-modules", [])]
    assert packages, "pyproject.toml declares no packages"
    return packages, modules


def _is_test_file(path: Path) -> bool:
    return path.name.startswith("test_") or path.name == "conftest.py" or "tests" in path.parts


def _files_on_disk() -> set[str]:
    packages, modules = _project_modules()
    found = {m for m in modules if (ROOT / m).is_file()}
    for package in packages:
        for path in (ROOT / package).rglob("*.py"):
            rel = path.relative_to(ROOT)
            if path.name in IGNORED_NAMES or _is_test_file(rel):
                continue
            if SKIPPED_DIRS.isdisjoint(rel.parts):
                found.add(rel.as_posix())
    for folder in LISTED_FOLDERS:
        for path in (ROOT / folder).iterdir():
            if path.is_file() and not path.name.startswith("."):
                found.add(path.relative_to(ROOT).as_posix())
    return found


def _in_scope(rel: str) -> bool:
    packages, modules = _project_modules()
    top = rel.split("/")[0]
    if rel in modules:
        return True
    if top in LISTED_FOLDERS:
        return True
    return top in packages and rel.endswith(".py") and Path(rel).name not in IGNORED_NAMES


def _layout_section(text: str) -> str:
    match = re.search(r"^## Layout[ \t]*$(.*?)(?=^## |\Z)", text, re.MULTILINE | re.DOTALL)
    assert match, 'docs/design.md has no "## Layout" section'
    return match.group(1)


def _code_blocks(section: str) -> list[list[str]]:
    blocks = re.findall(r"^```[^\n]*\n(.*?)^```", section, re.MULTILINE | re.DOTALL)
    assert blocks, 'the "## Layout" section has no fenced block listing the files'
    return [block.splitlines() for block in blocks]


def _names(line: str) -> list[str]:
    """The comma-separated names at the start of a line, up to the first run of two spaces."""
    head = re.split(r"\s{2,}", line.strip(), maxsplit=1)[0]
    return [name.strip() for name in head.split(",") if name.strip()]


def parse_layout(text: str) -> tuple[set[str], set[str], list[str]]:
    """(folders, files, problems) named by the Layout section's blocks; paths are relative to
    the repository root, folders without their trailing slash."""
    folders: set[str] = set()
    files: set[str] = set()
    problems: list[str] = []
    for block in _code_blocks(_layout_section(text)):
        current: str | None = None
        for number, line in enumerate(block, 1):
            if not line.strip():
                continue
            indent = len(line) - len(line.lstrip(" "))
            if indent == 0:
                current = None
                for name in _names(line):
                    if name.endswith("/"):
                        current = name.rstrip("/")
                        folders.add(current)
                    else:
                        files.add(name)
            elif indent == 2:
                if current is None:
                    problems.append(f"layout line {number} lists files under no folder: {line.strip()!r}")
                    continue
                for name in _names(line):
                    if name.endswith("/"):
                        folders.add(f"{current}/{name.rstrip('/')}")
                    else:
                        files.add(f"{current}/{name}")
    return folders, files, problems


def _repository_file_names() -> set[str]:
    names = set()
    for path in ROOT.rglob("*.py"):
        if SKIPPED_DIRS.isdisjoint(path.relative_to(ROOT).parts):
            names.add(path.name)
    return names


def test_layout_lists_every_source_file_and_nothing_else() -> None:
    folders, files, problems = parse_layout(DOC.read_text())
    assert not problems, "\n".join(problems)
    listed = {f for f in files if _in_scope(f)}
    on_disk = _files_on_disk()
    missing = sorted(on_disk - listed)
    stale = sorted(listed - on_disk)
    assert not missing, (
        "docs/design.md, section Layout, does not list these files (add each under its folder): "
        + ", ".join(missing)
    )
    assert not stale, "docs/design.md, section Layout, lists files that do not exist: " + ", ".join(stale)


def test_layout_names_only_existing_paths() -> None:
    folders, files, _ = parse_layout(DOC.read_text())
    gone = [f"{d}/" for d in folders if not (ROOT / d).is_dir()]
    gone += [f for f in files if not (ROOT / f).exists()]
    gone.sort()
    assert not gone, "docs/design.md, section Layout, names paths that do not exist: " + ", ".join(gone)


def test_every_python_file_the_doc_mentions_exists() -> None:
    names = _repository_file_names()
    unknown = set()
    for mention in PY_MENTION.findall(DOC.read_text()):
        exists = (ROOT / mention).is_file() if "/" in mention else mention in names
        if not exists:
            unknown.add(mention)
    assert not unknown, "docs/design.md mentions files that do not exist: " + ", ".join(sorted(unknown))


def test_parse_layout_rule() -> None:
    """The parsing rule itself, on a small example."""
    text = (
        "## Layout\n\n```\nlaunch.py          the launcher\npkg/               a package\n"
        "  a.py, b.py       two files\n                     a continued description, c.py\n"
        "pkg/sub/\n  d.py             one more\n```\n\n## Next\n```\nother/\n  e.py\n```\n"
    )
    folders, files, problems = parse_layout(text)
    assert folders == {"pkg", "pkg/sub"}
    assert files == {"launch.py", "pkg/a.py", "pkg/b.py", "pkg/sub/d.py"}
    assert not problems
