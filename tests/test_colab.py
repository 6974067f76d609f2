"""The Colab path: the README badges, install cells, run-time lines and pyproject agree; the device line."""

from __future__ import annotations

import difflib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import torch

from mnistlab import colab, train

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).parents[1]
# What `make colab-links` reads and writes, copied to test it on a fork without touching this tree.
LINKED_FILES = ["pyproject.toml", "README.md", "notebooks", "report/metrics_h200.json"]


def disagreements(root: Path) -> list[str]:
    """Where the README badges, install cells and run-time lines disagree with pyproject and the
    report's GPU run, read here independently of mnistlab.colab."""
    config = tomllib.loads((root / "pyproject.toml").read_text())
    repository = config["project"]["urls"]["Repository"]
    branch = config["tool"]["mnistlab"]["colab_branch"]
    gpu = json.loads((root / "report" / "metrics_h200.json").read_text())
    names = sorted(p.name for p in (root / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    problems = []

    readme = (root / "README.md").read_text()
    badges = re.findall(r"\(https://colab\.research\.google\.com/github/([^)]+)\)", readme)
    expected = [
        f"{repository.removeprefix('https://github.com/')}/blob/{branch}/notebooks/{n}"
        for n in names
    ]
    if sorted(badges) != expected:
        problems.append(f"README badges {badges} != {expected}")

    for name in names:
        cells = json.loads((root / "notebooks" / name).read_text())["cells"]
        install = "".join(next(c for c in cells if c["cell_type"] == "code")["source"])
        if f'repository = "git+{repository}@{branch}"' not in install:
            problems.append(f"{name}: the install cell does not install from {repository}@{branch}")
        title = "".join(next(c for c in cells if c["cell_type"] == "markdown")["source"])
        seconds = gpu["timing"]["notebook_seconds"][name.removesuffix(".ipynb")]
        duration = f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"
        if f"{duration} on a GPU ({gpu['environment']['device']}" not in title:
            problems.append(f"{name}: the first Markdown cell does not give its GPU run time")
    return problems


def test_badges_install_cells_pyproject_and_run_times_agree():
    assert disagreements(ROOT) == []
    # Byte for byte what `make colab-links` writes (the whole cells, not only the URLs).
    assert colab.main(["--root", str(ROOT), "--check"]) == 0


def test_install_cell_is_colab_only_and_keeps_colabs_torch():
    for path in colab.notebooks(ROOT):
        cell = nbformat.read(path, as_version=4).cells
        install = next(c for c in cell if c.cell_type == "code").source
        body = install.split('if "google.colab" in sys.modules:\n', 1)[1]
        # Everything but the imports happens inside the Colab branch.
        assert all(line.startswith("    ") for line in body.splitlines()), path.name
        assert '%pip install -q "{source}"' in install, path.name
        assert "--upgrade" not in install.replace("No --upgrade", ""), path.name
        assert "-U " not in install, path.name
    requirements = (ROOT / "requirements.txt").read_text().splitlines()
    pins = [r for r in requirements if r.strip() and not r.startswith("#") and ">=" not in r]
    assert pins == [], "requirements must be lower bounds only, so Colab keeps its torch"


@pytest.mark.parametrize(
    "remote",
    [
        "git@github.com:student/mnist-fork.git",
        "ssh://git@github.com/student/mnist-fork.git",
        "https://github.com/student/mnist-fork.git",
        "https://github.com/student/mnist-fork",
        "https://student:ghp_secret@github.com/student/mnist-fork.git",
    ],
)
def test_remote_urls_become_the_https_repository(remote):
    assert colab.github_https(remote) == "https://github.com/student/mnist-fork"


@pytest.mark.parametrize(
    "remote", ["git@gitlab.com:student/fork.git", "/home/student/fork", "github.com/student"]
)
def test_remotes_colab_cannot_open_are_refused(remote):
    with pytest.raises(ValueError, match="GitHub"):
        colab.github_https(remote)


@pytest.fixture
def linked_copy(tmp_path):
    """The files `make colab-links` touches, copied into a git checkout of their own."""
    for name in LINKED_FILES:
        source, target = ROOT / name, tmp_path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if source.is_dir() else shutil.copy)(source, target)
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    return tmp_path


def test_a_fork_points_everything_at_itself_and_only_those_lines_change(linked_copy):
    root = linked_copy
    before = {p: p.read_text() for p in [root / "pyproject.toml", root / "README.md"]}
    before |= {p: p.read_text() for p in colab.notebooks(root)}
    subprocess.run(
        [
            "git",
            "-C",
            str(root),
            "remote",
            "add",
            "origin",
            "git@github.com:student/mnist-fork.git",
        ],
        check=True,
    )
    assert colab.main(["--root", str(root), "--remote", "origin", "--branch", "dev"]) == 0

    assert colab.read_source(root) == colab.Source("https://github.com/student/mnist-fork", "dev")
    assert disagreements(root) == []
    assert colab.main(["--root", str(root), "--check"]) == 0  # idempotent

    def changed(path):
        diff = difflib.unified_diff(before[path].splitlines(), path.read_text().splitlines(), n=0)
        return [line for line in diff if line[:1] in "+-" and line[:3] not in ("+++", "---")]

    assert len(changed(root / "pyproject.toml")) == 2 * 2  # Repository and colab_branch
    readme = [line for line in changed(root / "README.md") if line.startswith("+")]
    assert len(readme) == len(colab.notebooks(root))  # one badge line per notebook
    assert all("/github/student/mnist-fork/blob/dev/notebooks/" in line for line in readme)
    for path in colab.notebooks(root):
        lines = changed(path)
        # Only the install cell's source line, and the JSON layout untouched.
        assert lines == [
            '-    "    repository = \\"git+https://github.com/mnistlab/mnistlab@main\\"\\n",',
            '+    "    repository = \\"git+https://github.com/student/mnist-fork@dev\\"\\n",',
        ], path.name


def test_an_edited_badge_or_install_cell_is_caught(linked_copy):
    root = linked_copy
    readme = root / "README.md"
    readme.write_text(
        readme.read_text().replace("/mnistlab/mnistlab/blob/", "/someone/else/blob/", 1)
    )
    assert len(disagreements(root)) == 1
    assert colab.main(["--root", str(root), "--check"]) == 1

    assert colab.main(["--root", str(root)]) == 0  # make colab-links repairs it
    assert disagreements(root) == []
    notebook = colab.notebooks(root)[1]
    notebook.write_text(
        notebook.read_text().replace("mnistlab/mnistlab@main", "mnistlab/mnistlab@old")
    )
    assert len(disagreements(root)) == 1
    assert colab.main(["--root", str(root), "--check"]) == 1


def test_run_time_lines_follow_the_gpu_report(linked_copy):
    root = linked_copy
    metrics_path = root / "report" / "metrics_h200.json"
    metrics = json.loads(metrics_path.read_text())
    metrics["timing"]["notebook_seconds"]["02_visualization"] = 1234.0
    metrics_path.write_text(json.dumps(metrics))
    assert any("02_visualization" in p for p in disagreements(root))
    assert colab.main(["--root", str(root)]) == 0
    assert disagreements(root) == []
    assert "20.6 min on a GPU" in (root / "notebooks" / "02_visualization.ipynb").read_text()


def test_device_line_names_the_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla T4")
    assert train.describe_device() == "GPU: Tesla T4"


def test_device_line_tells_a_colab_user_how_to_get_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    assert train.describe_device() == "CPU: this will be slow"
    monkeypatch.setitem(sys.modules, "google.colab", object())
    assert train.describe_device() == "CPU: this will be slow; Runtime > Change runtime type > GPU"


def test_every_notebook_prints_the_device_first():
    for path in colab.notebooks(ROOT):
        code = [c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]
        setup = next(i for i, s in enumerate(code) if "from mnistlab" in s)
        assert "print(describe_device())" in code[setup], path.name
        assert not any("describe_device" in s for s in code[:setup]), path.name
