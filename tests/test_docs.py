"""The documentation: the site builds with warnings as errors, and every Python example in it runs.

The examples
------------
Every ```python block of ``README.md`` and ``docs/*.md`` is one test (id
``README.md:3``: the page's third Python block). A page's blocks run in
order in one namespace, as a doctest session would; running one block
alone runs the page's earlier blocks first. Each page runs in a fresh copy
of a small directory of placeholders, its working directory:

- ``path/to/file1.h5ad``, ``path/to/file2.h5ad``: generated inputs (CSR X
  of 100 genes ``gene_0`` ... ``gene_99``; obs ``cell_type``, categorical,
  and ``batch``, int; a ``counts`` layer; a 16-column ``X_pca`` obsm);
- ``path/to/store``: those inputs converted. A page with a block that
  converts into ``"path/to/store"`` (``create_store_from_h5ads(`` and that
  path in one block) starts without it: its own conversion makes it.

A block that cannot run here is marked by an HTML comment on the line
before its fence (invisible on GitHub and on the site)::

    <!-- docs-test: skip (needs a GPU) -->
    <!-- docs-test: needs scvi (scvi-tools, Python 3.12) -->

``skip`` never runs the block; ``needs MODULE`` runs it where ``MODULE``
imports (``needs cuda``: where torch sees a GPU). Either is reported as a
skip with the reason in brackets. ```bash blocks are not run.
"""

from __future__ import annotations

import gc
import os
import re
import shutil
import subprocess
import sys
import textwrap
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

import arrayloaders
from arrayloaders import create_store_from_h5ads
from arrayloaders.example_data import make_example_adata

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^(?P<indent>[ \t]*)```python[ \t]*$")
MARKER = re.compile(r"<!--\s*docs-test:\s*(?:(?P<skip>skip)|needs\s+(?P<needs>[\w.]+))\s*\((?P<reason>[^)]*)\)\s*-->")
MARKER_START = re.compile(r"<!--\s*docs-test:")


# ---------------------------------------------------------------------- the site


def test_the_docs_build_with_warnings_as_errors(tmp_path):
    out = tmp_path / "html"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", "docs", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, f"sphinx-build failed:\n{done.stdout}\n{done.stderr}"
    names = [f"arrayloaders.{name}" for name in arrayloaders.__all__] + ["arrayloaders.lightning.StoreDataModule"]
    missing = [name for name in names if not (out / "generated" / f"{name}.html").is_file()]
    assert not missing, f"no API page for {missing}"
    for page in (ROOT / "docs").glob("*.md"):
        assert (out / f"{page.stem}.html").is_file(), f"{page.name} was not built"


def test_the_version_comes_from_the_package_metadata(monkeypatch):
    import importlib.metadata

    assert arrayloaders.__version__ == importlib.metadata.version("arrayloaders")
    assert "__version__" in dir(arrayloaders) and "__version__" not in arrayloaders.__all__

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    assert arrayloaders._version() == "0+unknown"  # a checkout on sys.path that is not installed


def test_the_readme_fits_on_a_few_screens_and_its_links_resolve():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 150, "README.md is longer than 150 lines: move the details to a page in docs/"
    links = re.findall(r"\]\(((?:docs/)?[\w./-]+\.(?:md|png))(?:#[\w-]*)?\)", text)
    assert "docs/getting-started.md" in links and "docs/benchmark.png" in links
    assert [link for link in links if not (ROOT / link).is_file()] == []


# ---------------------------------------------------------------------- the examples


@dataclass(frozen=True)
class Block:
    page: str  # the path relative to the repository: README.md, docs/loading.md
    number: int  # 1-based among the page's Python blocks
    line: int  # of the opening fence, 1-based
    code: str
    reason: str | None = None  # of its marker: why it is skipped (always, or where ``needs`` is missing)
    needs: str | None = None  # a module it needs (or "cuda")

    @property
    def id(self) -> str:
        return f"{Path(self.page).name}:{self.number}"


def python_blocks(text: str, page: str) -> list[Block]:
    """The ```python blocks of a Markdown page, with their markers."""
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if not fence:
            i += 1
            continue
        indent, start = fence["indent"], i
        closes = (j for j in range(i + 1, len(lines)) if lines[j].strip() == "```" and lines[j].startswith(indent))
        end = next(closes, None)
        assert end is not None, f"{page}:{start + 1}: a ```python block that is never closed"
        code = textwrap.dedent("\n".join(lines[start + 1 : end]))
        before = lines[start - 1] if start else ""
        marker = MARKER.search(before)
        assert marker or not MARKER_START.search(before), (
            f"{page}:{start}: a docs-test marker must read <!-- docs-test: skip (reason) --> or "
            f"<!-- docs-test: needs MODULE (reason) -->, not {before.strip()!r}"
        )
        reason = needs = None
        if marker:
            reason, needs = marker["reason"].strip(), marker["needs"]
            assert reason, f"{page}:{start}: a docs-test marker needs a reason in brackets"
        blocks.append(Block(page, len(blocks) + 1, start + 1, code, reason, needs))
        i = end + 1
    return blocks


BLOCKS = [block for page in PAGES for block in python_blocks(page.read_text(), page.relative_to(ROOT).as_posix())]


def test_every_page_with_examples_is_found():
    pages = {block.page for block in BLOCKS}
    assert "README.md" in pages and "docs/getting-started.md" in pages


def test_markers_are_read():
    text = (
        "```python\nx = 1\n```\n<!-- docs-test: skip (needs a GPU) -->\n```python\ny\n```\n\n"
        "  <!-- docs-test: needs scvi (scvi-tools, Python 3.12) -->\n  ```python\n  z = 2\n  ```\n"
    )
    blocks = python_blocks(text, "probe.md")
    assert [(b.number, b.line, b.code, b.reason, b.needs) for b in blocks] == [
        (1, 1, "x = 1", None, None),
        (2, 5, "y", "needs a GPU", None),
        (3, 10, "z = 2", "scvi-tools, Python 3.12", "scvi"),
    ]


@pytest.fixture(scope="module")
def placeholders(tmp_path_factory) -> Path:
    """The directory every page's examples start from (see the module's docstring)."""
    root = tmp_path_factory.mktemp("docs-placeholders")
    inputs = root / "path" / "to"
    inputs.mkdir(parents=True)
    rng = np.random.default_rng(0)
    paths = []
    for i, n in enumerate((240, 360)):
        adata = make_example_adata(n, 100, nnz_per_cell=12, n_cell_types=4, seed=i, name_prefix=f"file{i + 1}")
        adata.layers["counts"] = adata.X.copy()
        adata.obsm["X_pca"] = rng.standard_normal((n, 16)).astype(np.float32)
        paths.append(inputs / f"file{i + 1}.h5ad")
        adata.write_h5ad(paths[-1])
    create_store_from_h5ads(paths, inputs / "store", n_obs_per_file=256, progress=False)
    return root


@dataclass
class PageSession:
    """One page's namespace and working directory; its blocks run in order."""

    page: str
    workdir: Path
    namespace: dict = field(default_factory=lambda: {"__name__": "__docs__"})
    ran: int = 0  # blocks of the page done (run or skipped)
    failed: str | None = None

    def run_through(self, block: Block) -> None:
        for earlier in [b for b in BLOCKS if b.page == self.page and self.ran < b.number <= block.number]:
            if self.failed:
                pytest.fail(f"not run: {self.failed} failed, and this block runs in its namespace")
            self.ran = earlier.number
            reason = skip_reason(earlier)
            if reason:
                if earlier is block:
                    pytest.skip(f"{block.page}:{block.line}: {reason}")
                continue
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # examples may warn (a store not grouped by class ...)
                    exec(compile(earlier.code, f"{earlier.page}:{earlier.line}", "exec"), self.namespace)
            except BaseException:
                self.failed = f"{earlier.page}:{earlier.line}"
                raise

    def close(self) -> None:
        """Stop the workers the page's datasets and modules started."""
        for value in list(self.namespace.values()):
            if type(value).__module__.startswith("arrayloaders") and callable(getattr(value, "close", None)):
                value.close()
        self.namespace.clear()
        gc.collect()


def converts_into_the_store(block: Block) -> bool:
    """Whether the block makes ``path/to/store`` itself (its page then starts without it)."""
    return "create_store_from_h5ads(" in block.code and '"path/to/store"' in block.code


def skip_reason(block: Block) -> str | None:
    """Why the block does not run here, or ``None``."""
    if block.needs is None:
        return block.reason
    if block.needs == "cuda":
        import torch

        return None if torch.cuda.is_available() else block.reason
    try:
        __import__(block.needs)
    except ImportError:
        return block.reason
    return None


@pytest.fixture(scope="module")
def sessions(placeholders, tmp_path_factory):
    """The page whose blocks are running (one at a time: blocks run page by page), in its own directory."""
    home = os.getcwd()
    current: dict[str, PageSession] = {}

    def session(page: str) -> PageSession:
        if page not in current:
            for other in current.values():
                other.close()
            current.clear()
            workdir = tmp_path_factory.mktemp(Path(page).stem)
            shutil.copytree(placeholders, workdir, dirs_exist_ok=True)
            if any(b.page == page and converts_into_the_store(b) for b in BLOCKS):
                shutil.rmtree(workdir / "path" / "to" / "store")
            current[page] = PageSession(page, workdir)
        os.chdir(current[page].workdir)  # kept until the page is done: its datasets hold relative paths
        return current[page]

    yield session
    for s in current.values():
        s.close()
    os.chdir(home)


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_the_example_runs(block, sessions):
    session = sessions(block.page)
    try:
        session.run_through(block)
    finally:
        if block.number == max(b.number for b in BLOCKS if b.page == block.page):
            session.close()
