"""Shared helpers: compose configs the way the CLI does, run the real console scripts, and make
small offline datasets (a text file, an image folder, MNIST-format files)."""

from __future__ import annotations

import gzip
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from trainer.cli import CONFIG_DIR  # also registers the schemas and resolvers

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Test processes share the cores (pytest -n): one thread each, their child processes too,
    # or OpenMP threads spinning for cores the other worker holds slow both many times over.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
MODELS = ["cnn", "rnn", "transformer", "gan", "autoencoder"]
# The environment for a command that loads a model of tests/failing_model.py, and trusts it
# when it comes back from a saved run (only the project's own targets are trusted by default).
FAILING_MODELS = {"PYTHONPATH": f"{Path(__file__).parent}{os.pathsep}"
                                f"{os.environ.get('PYTHONPATH', '')}",
                  "TRAINER_TRUSTED_TARGETS": "failing_model"}


def compose_train(*overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=list(overrides))


def run_cli(*args: str, cwd: Path, timeout: float = 300, env: dict | None = None
            ) -> subprocess.CompletedProcess:
    """Run a console script (`train`, `evaluate`, `tensorboard`) the way a user types it."""
    return subprocess.run(list(args), cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def run_in_process(command: str, *args: str, cwd: Path, env: dict | None = None
                   ) -> subprocess.CompletedProcess:
    """A console script called in this process, as `run_cli` runs it in a new one, for a test
    that checks only its exit status and output: it saves the 2 s of a process importing torch.
    Tests of what only a process shows (signals, exit codes of a launcher, a traceback
    Python prints as it dies, settings a library reads from `env` when first imported) use
    `run_cli`."""
    import contextlib
    import io

    from trainer import cli

    entry = {"train": cli.train, "evaluate": cli.evaluate, "predict": cli.predict,
             "generate": cli.generate, "export-model": cli.export_model}[command]
    out, err = io.StringIO(), io.StringIO()
    saved_argv, saved_cwd, saved_env = sys.argv, Path.cwd(), dict(os.environ)
    sys.argv, status = [command, *args], 0
    os.environ.update(env or {})
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            entry()
    except SystemExit as exit_:
        status = exit_.code if isinstance(exit_.code, int) else 0 if exit_.code is None else 1
    finally:
        sys.argv = saved_argv
        os.chdir(saved_cwd)
        os.environ.clear()  # the command sets HYDRA_FULL_ERROR for itself
        os.environ.update(saved_env)
    return subprocess.CompletedProcess([command, *args], status, out.getvalue(), err.getvalue())


def assert_clean_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """A user error: non-zero exit, no traceback, and each fragment in the message: one line
    of stderr, starting `error: `."""
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    assert "Error in call to target" not in result.stderr, result.stderr
    messages = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(messages) == 1, result.stderr
    for fragment in fragments:
        assert fragment in messages[0], result.stderr


class Terminal:
    """stderr as tqdm sees a terminal: it draws its bars there."""

    def __init__(self) -> None:
        self.drawn: list[str] = []

    def write(self, text: str) -> None:
        self.drawn.append(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return True


def run_dirs(root: Path) -> list[Path]:
    """Run directories (those holding .hydra/) under root/outputs, oldest first."""
    return sorted(p.parent for p in (root / "outputs").rglob(".hydra") if p.parent.name != ".hydra")


@pytest.fixture(scope="session")
def finished_run_template(tmp_path_factory) -> Path:
    from trainer.run.loop import train

    run = tmp_path_factory.mktemp("finished") / "run"
    train(compose_train("debug=fast"), run)
    return run


@pytest.fixture
def finished_run(finished_run_template: Path, tmp_path: Path) -> Path:
    """A finished `debug=fast` run (trained once per session), this test's own copy."""
    return Path(shutil.copytree(finished_run_template, tmp_path / "run"))


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    """A small UTF-8 text with structure a character model can learn."""
    lines = [f"{name} says: the {thing} is {colour}.\n" for name in ("ANNA", "BORIS", "CLARA")
             for thing in ("sky", "sea", "grass", "rose") for colour in ("blue", "green", "red")]
    path = tmp_path / "corpus.txt"
    path.write_text("".join(lines) * 8 + "héllo wörld ✓\n", encoding="utf-8")
    return path


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """Two classes of 12x10 RGB images: bright squares and dark squares."""
    from PIL import Image

    root = tmp_path / "images"
    generator = torch.Generator().manual_seed(0)
    for label, base in (("bright", 200), ("dark", 40)):
        (root / label).mkdir(parents=True)
        for i in range(20):
            noise = torch.randint(0, 40, (10, 12, 3), generator=generator)
            pixels = (base + noise).clamp(0, 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(root / label / f"{i}.png")
    return root


@pytest.fixture
def mnist_root(tmp_path: Path) -> Path:
    """Tiny files in MNIST's own idx format, where torchvision's MNIST class looks for them."""
    return write_idx_dataset(tmp_path / "data", "MNIST")


def write_idx_dataset(root: Path, folder: str, train: int = 120, test: int = 40) -> Path:
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    for prefix, count in (("train", train), ("t10k", test)):
        labels = torch.arange(count) % 10
        images = torch.randint(0, 50, (count, 28, 28), generator=generator)
        for i, label in enumerate(labels.tolist()):  # a bright bar whose row is the label
            images[i, 2 + 2 * label : 4 + 2 * label, 4:24] = 250
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(
            struct.pack(">IIII", 2051, count, 28, 28) + bytes(images.to(torch.uint8).flatten()))
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(
            struct.pack(">II", 2049, count) + bytes(labels.to(torch.uint8)))
    return root


def shared_mnist(tmp_path: Path) -> Path:
    """The real MNIST from ../shared/data, laid out for torchvision; skips when absent."""
    source = SHARED_DATA / "mnist"
    if not source.is_dir():
        pytest.skip("../shared/data/mnist is absent (only the project's own machines have it)")
    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for gz in source.glob("*.gz"):
        (raw / gz.name).symlink_to(gz)
        (raw / gz.stem).write_bytes(gzip.decompress(gz.read_bytes()))
    return tmp_path / "data"


PYTHON = sys.executable
