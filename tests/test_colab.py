"""The Colab path: badges, install cells and pyproject agree, and notebooks run as in a fresh runtime."""

from __future__ import annotations

import difflib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest
import torch
from test_notebooks import shown_figures  # the report's test of what a reader sees

from mnistlab import train
from mnistlab.tools import colab

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).parents[1]
# What `make colab-links` reads and writes, copied to test it on a fork without touching this tree.
LINKED_FILES = ["pyproject.toml", "README.md", "notebooks", "report/metrics_h200.json"]


def disagreements(root: Path) -> list[str]:
    """Where the README badges, install cells and run-time lines disagree with pyproject and the
    report's GPU run, read here independently of mnistlab.tools.colab."""
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


def test_a_remote_colab_cannot_open_changes_nothing(linked_copy, capsys):
    root = linked_copy
    before = (root / "pyproject.toml").read_text()
    subprocess.run(
        ["git", "-C", str(root), "remote", "add", "origin", "/home/student/fork"], check=True
    )
    assert colab.main(["--root", str(root), "--remote", "origin"]) == 2
    assert colab.main(["--root", str(root), "--remote", "upstream"]) == 2
    assert "not a GitHub repository URL" in capsys.readouterr().err
    assert (root / "pyproject.toml").read_text() == before
    assert disagreements(root) == []


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


def test_progress_bars_are_notebook_friendly():
    """tqdm.auto draws one updating widget in Colab and Jupyter; plain tqdm prints line after line."""
    for path in sorted((ROOT / "src" / "mnistlab").glob("*.py")):
        plain = re.findall(r"^\s*(?:from tqdm import|import tqdm\b).*", path.read_text(), re.M)
        assert plain == [], f"{path.name}: use `from tqdm.auto import tqdm`"


# --- A Colab runtime, as far as one can be built offline ---------------------------------------

STANDIN = (
    '"""Stand-in for Colab\'s module: a Colab kernel has imported google.colab when it starts."""\n'
)


def fresh_runtime(folder: Path) -> Path:
    """A new virtual environment without mnistlab, whose interpreter imports google.colab at start.

    Colab's torch is preinstalled: here the project environment's packages (torch, papermill,
    ipykernel, ...) are made visible by a plain path line in a .pth file. Such a line adds the
    folder to sys.path without processing the .pth files inside it, so the editable install of
    mnistlab there stays invisible. Returns the interpreter.
    """
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True)
    python = folder / "bin" / "python"
    site = Path(
        subprocess.run(
            [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    (site / "google" / "colab").mkdir(parents=True)  # a namespace package: no google/__init__.py
    (site / "google" / "colab" / "__init__.py").write_text(STANDIN)
    # An `import` line in a .pth runs at interpreter start, like Colab's kernel importing the module.
    (site / "colab_standin.pth").write_text("import google.colab\n")
    (site / "preinstalled.pth").write_text(f"{Path(torch.__file__).parents[1]}\n")
    return python


def source_copy(folder: Path) -> Path:
    """This checkout's package as pip sees it (pyproject, README, src), without build leftovers."""
    folder.mkdir()
    for name in ["pyproject.toml", "README.md"]:
        shutil.copy(ROOT / name, folder / name)
    shutil.copytree(
        ROOT / "src", folder / "src", ignore=shutil.ignore_patterns("*.egg-info", "__pycache__")
    )
    return folder


def colab_env(install_from: Path, mnist_dir: Path, jupyter: Path) -> dict[str, str]:
    """The kernel's environment: the install cell pointed at `install_from`, pip kept offline."""
    leaks = (
        "MNISTLAB_",
        "PIP_",
        "JUPYTER",
        "PYTHONPATH",
        "PYTHONHOME",
        "PYTHONUSERBASE",
        "VIRTUAL_ENV",
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(leaks)}
    return env | {
        colab.INSTALL_ENV: str(install_from),
        "MNIST_DIR": str(mnist_dir),  # Colab downloads MNIST; this machine has no internet
        "JUPYTER_DATA_DIR": str(jupyter),  # no user-level kernel specs: the kernel is `python`'s
        # Offline pip, no config files, no wheel folders: every dependency must resolve from what
        # the runtime already has, or the install fails. PIP_NO_BUILD_ISOLATION=0 means
        # --no-build-isolation (pip's inverted *_NO_* variables), so setuptools is not fetched.
        "PIP_NO_INDEX": "1",
        "PIP_CONFIG_FILE": os.devnull,
        "PIP_NO_BUILD_ISOLATION": "0",
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
    }


PROBE = "import sys, mnistlab\nprint('PROBE', sys.executable, mnistlab.__file__)"


def run_like_colab(name: str, workdir: Path, mnist_dir: Path) -> tuple[nbformat.NotebookNode, Path]:
    """Execute notebooks/<name> in quick mode in a fresh runtime whose working folder is `workdir`.

    Returns the executed notebook and the runtime's interpreter.
    """
    python = fresh_runtime(workdir / "venv")
    env = colab_env(source_copy(workdir / "source"), mnist_dir, workdir / "jupyter")
    imports = subprocess.run(
        [python, "-c", "import mnistlab"], env=env, capture_output=True, text=True
    )
    assert "No module named 'mnistlab'" in imports.stderr, (
        "mnistlab must come from the install cell"
    )
    subprocess.run([python, "-c", "import google.colab, torch, papermill"], env=env, check=True)

    # A last cell, run after the notebook's own, says which interpreter and which mnistlab ran.
    nb = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(PROBE))
    source = workdir / name
    nbformat.write(nb, source)
    content = workdir / "content"  # Colab's working folder: ./data, ./checkpoints, ./report
    content.mkdir()
    executed = workdir / f"executed_{name}"
    run = subprocess.run(
        [python, "-m", "papermill", source, executed, "-p", "quick", "True", "--cwd", content],
        env=env,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr[-5000:]
    return nbformat.read(executed, as_version=4), python


def stdout(cell) -> str:
    """What a cell printed."""
    return "".join(o.get("text", "") for o in cell.outputs if o.get("name") == "stdout")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["01_classification.ipynb", "02_visualization.ipynb"])
def test_notebook_runs_in_a_fresh_colab_runtime(name, tmp_path, mnist_dir):
    start = time.perf_counter()
    nb, python = run_like_colab(name, tmp_path, mnist_dir)
    code = [c for c in nb.cells if c.cell_type == "code"]

    # The install cell ran (google.colab was imported) and installed this checkout.
    assert stdout(code[0]).startswith(f"Installing mnistlab from {tmp_path / 'source'}\n")
    probe = stdout(code[-1]).split()
    assert probe[0] == "PROBE" and Path(probe[1]) == python  # the kernel is the runtime's python
    installed = Path(probe[2])
    assert installed.is_relative_to(tmp_path / "venv"), installed  # not the editable checkout
    assert not list(installed.parents[1].glob("torch*")), "pip must not install torch over Colab's"

    # The device line comes first, with Colab's hint on a CPU.
    setup = next(c for c in code if "print(describe_device())" in c.source)
    gpu = torch.cuda.is_available()
    expected = f"GPU: {torch.cuda.get_device_name()}" if gpu else "CPU: this will be slow; Runtime"
    assert stdout(setup).startswith(expected)

    # A fresh runtime has no checkpoint: 02 trains the model it needs.
    if name.startswith("02"):
        assert "best.pt not found: training" in "".join(stdout(c) for c in code)
        assert (tmp_path / "content" / "checkpoints" / "best.pt").is_file()

    # Figures are shown as images, never as a Figure's text representation: each one saved.
    shown, as_text = shown_figures(nb)
    assert shown, f"{name} shows no figure"
    assert as_text == [], f"{name} prints figures as text"
    saved = sorted(p.stem for p in (tmp_path / "content" / "report" / "figures").glob("*.png"))
    assert sorted(shown) == saved
    print(f"{name}: {time.perf_counter() - start:.0f} s in a fresh runtime, {len(shown)} figures")
