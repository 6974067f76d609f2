"""`make colab-links`: point the README's Colab badges and every notebook's install cell at this
repository, and write each notebook's GPU run time under its title.

    python -m mnistlab.tools.colab [--remote origin] [--branch main] [--check]

pyproject.toml is the one source of truth: `[project.urls] Repository` (a GitHub https URL) and
`[tool.mnistlab] colab_branch`. `--remote origin` first copies that remote's URL into pyproject
(an ssh remote becomes its https form), so a fork's badges and install cells name the fork.
The run times come from the report's GPU run, report/metrics_h200.json. `--check` changes nothing
and fails when a file is out of date. Tooling: the teaching modules never import it.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import nbformat

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

INSTALL_ENV = "MNISTLAB_INSTALL_URL"
INSTALL_MARKER = "# Colab: install"  # how the install cell is recognised
TIMING_MARKER = "**Run time**"  # how the run-time line under each notebook's title is recognised
GPU_METRICS = Path("report/metrics_h200.json")
# A Colab badge link; group 1 is the notebook's path inside the repository.
BADGE = re.compile(
    r"https://colab\.research\.google\.com/github/[^)\s]+?/blob/[^)\s]+?/(notebooks/[^)\s/]+\.ipynb)"
)


@dataclass(frozen=True)
class Source:
    """Where the code lives: a GitHub repository and the branch the badges and installs use."""

    repository: str  # https://github.com/<owner>/<name>
    branch: str

    @property
    def slug(self) -> str:
        """'<owner>/<name>'."""
        return self.repository.removeprefix("https://github.com/")

    def badge_url(self, notebook: str) -> str:
        """Colab's link that opens `notebook` (a path in the repository) from this branch."""
        return f"https://colab.research.google.com/github/{self.slug}/blob/{self.branch}/{notebook}"

    @property
    def pip_source(self) -> str:
        """What the install cell gives pip by default: the branch of the repository."""
        return f"git+{self.repository}@{self.branch}"


def github_https(remote: str) -> str:
    """A git remote URL of a GitHub repository as https://github.com/<owner>/<name>.

    Accepts https (with or without `.git` or a user/token, which is dropped so that it never lands
    in the README), `git@github.com:owner/name.git` and `ssh://git@github.com/owner/name.git`.
    Colab opens notebooks from GitHub only, so any other host is refused.
    """
    match = re.fullmatch(
        r"(?:https?://(?:[^@/]+@)?|ssh://(?:[^@/]+@)?|git@)github\.com[:/]"
        r"(?P<owner>[\w.-]+)/(?P<name>[\w.-]+?)(?:\.git)?/?",
        remote.strip(),
    )
    if not match:
        raise ValueError(
            f"{remote!r} is not a GitHub repository URL; Colab's badges open notebooks from "
            "GitHub only (https://github.com/<owner>/<name> or git@github.com:<owner>/<name>.git)"
        )
    return f"https://github.com/{match['owner']}/{match['name']}"


def read_source(root: Path) -> Source:
    """The repository and branch recorded in root/pyproject.toml."""
    config = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))
    repository = config["project"]["urls"]["Repository"]
    if github_https(repository) != repository:
        raise ValueError(f"pyproject.toml: write Repository as {github_https(repository)!r}")
    return Source(repository, config["tool"]["mnistlab"]["colab_branch"])


def set_source(pyproject: str, repository: str, branch: str | None = None) -> str:
    """pyproject.toml's text with a new Repository URL (and colab_branch); nothing else changes."""

    def replace(text: str, key: str, value: str) -> str:
        new, n = re.subn(rf'(?m)^({key} = )"[^"]*"', rf'\g<1>"{value}"', text)
        if n != 1:
            raise ValueError(f'pyproject.toml: expected one line `{key} = "..."`, found {n}')
        return new

    pyproject = replace(pyproject, "Repository", repository)
    return replace(pyproject, "colab_branch", branch) if branch else pyproject


def remote_url(root: Path, remote: str) -> str:
    """`git remote get-url <remote>` in root."""
    git = subprocess.run(
        ["git", "-C", str(root), "remote", "get-url", remote], capture_output=True, text=True
    )
    if git.returncode != 0:
        raise ValueError(f"git remote {remote!r}: {git.stderr.strip()}")
    return git.stdout.strip()


def install_cell(source: Source) -> str:
    """The first code cell of every notebook: installs mnistlab under Colab, nothing elsewhere."""
    return f"""\
{INSTALL_MARKER} mnistlab (does nothing elsewhere). `make colab-links` writes this cell; set
# {INSTALL_ENV} to install from elsewhere (a pip requirement, a path, a git+file:// URL).
import os
import sys

if "google.colab" in sys.modules:
    repository = "{source.pip_source}"
    source = os.environ.get("{INSTALL_ENV}", repository)
    print(f"Installing mnistlab from {{source}}")
    # No --upgrade: pip keeps Colab's torch (the requirements are lower bounds).
    %pip install -q "{{source}}"
""".rstrip()


def format_seconds(seconds: float) -> str:
    """'46 s', or '3.6 min' from two minutes on."""
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def timing_line(metrics: dict, stem: str) -> str:
    """The run-time line written under a notebook's title, from the report's GPU run."""
    seconds = metrics["timing"]["notebook_seconds"]
    line = (
        f"{TIMING_MARKER} at full settings: {format_seconds(seconds[stem])} on a GPU "
        f"({metrics['environment']['device']}, the report's run: `{GPU_METRICS.as_posix()}`)"
    )
    first = min(seconds)
    if stem == first:
        return line + "."
    # The report runs the notebooks in order: the later ones load the models the first saved.
    return f"{line}, after notebook {first[:2]} saved the models it loads (a fresh runtime trains them first)."


def with_timing(markdown: str, line: str) -> str:
    """`markdown` (a notebook's first Markdown cell) with its run-time line replaced or added."""
    lines = markdown.split("\n")
    for i, old in enumerate(lines):
        if old.startswith(TIMING_MARKER):
            lines[i] = line
            return "\n".join(lines)
    # Added under the title line, as a paragraph of its own.
    return "\n".join([lines[0], "", line, *lines[1:]])


def rewrite_notebook(nb: nbformat.NotebookNode, source: Source, timing: str | None) -> None:
    """Rewrite the install cell and (given `timing`) the run-time line of one notebook in place."""
    code = [c for c in nb.cells if c.cell_type == "code"]
    if not code or not code[0].source.startswith(INSTALL_MARKER):
        raise ValueError(f"its first code cell does not start with {INSTALL_MARKER!r}")
    code[0].source = install_cell(source)
    if timing is not None:
        markdown = next(c for c in nb.cells if c.cell_type == "markdown")
        markdown.source = with_timing(markdown.source, timing)


def rewrite_readme(text: str, source: Source) -> str:
    """The README with every Colab badge link pointing at `source`."""
    return BADGE.sub(lambda m: source.badge_url(m[1]), text)


def notebooks(root: Path) -> list[Path]:
    """The assignment's notebooks, in order."""
    return sorted((root / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def render(root: Path) -> dict[Path, str]:
    """Every file `make colab-links` writes, as it should read now (path -> text)."""
    source = read_source(root)
    metrics_path = root / GPU_METRICS
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else None
    readme = root / "README.md"
    files = {readme: rewrite_readme(readme.read_text(encoding="utf-8"), source)}
    for path in notebooks(root):
        nb = nbformat.read(path, as_version=4)
        timing = timing_line(metrics, path.stem) if metrics else None
        try:
            rewrite_notebook(nb, source, timing)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None
        # nbformat writes the layout the notebooks are committed in (indent 1, sorted keys).
        files[path] = nbformat.writes(nb) + "\n"
    return files


def main(argv: list[str] | None = None) -> int:
    """Rewrite (or with --check, verify) the badges, install cells and run-time lines."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path("."), help="the repository checkout")
    parser.add_argument(
        "--remote", help="take the repository URL from this git remote (e.g. origin) first"
    )
    parser.add_argument("--branch", help="the branch badges and installs use (colab_branch)")
    parser.add_argument("--check", action="store_true", help="change nothing; fail if out of date")
    args = parser.parse_args(argv)

    try:
        return update(args.root, args.remote, args.branch, args.check)
    except ValueError as err:
        print(f"make colab-links: {err}", file=sys.stderr)
        return 2


def update(root: Path, remote: str | None, branch: str | None, check: bool) -> int:
    """main() after parsing: 0 when up to date or rewritten, 1 when --check finds stale files."""
    pyproject = root / "pyproject.toml"
    if remote or branch:
        repository = (
            github_https(remote_url(root, remote)) if remote else read_source(root).repository
        )
        text = pyproject.read_text(encoding="utf-8")
        new = set_source(text, repository, branch)
        if check and new != text:
            print(f"{pyproject} does not name {repository}", file=sys.stderr)
            return 1
        if new != text:
            pyproject.write_text(new, encoding="utf-8")
    stale = []
    for path, text in render(root).items():
        if path.read_text(encoding="utf-8") != text:
            stale.append(path)
            if not check:
                path.write_text(text, encoding="utf-8")
    source = read_source(root)
    if check:
        for path in stale:
            print(f"{path} is out of date: run `make colab-links`", file=sys.stderr)
        return 1 if stale else 0
    print(f"Colab badges and install cells point at {source.repository} ({source.branch})")
    for path in stale:
        print(f"  rewrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
