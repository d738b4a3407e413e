"""Faults injected: a run killed with SIGKILL anywhere (in a step, in a validation, in a
checkpoint write) resumes to the same weights, bit for bit, as the run that was never killed; one
rank killed in a two-rank run stops the group; a sweep survives its failed and killed jobs."""

from __future__ import annotations

import multiprocessing
import random
import signal
from pathlib import Path

import inject_fault
import pytest
import torch
from omegaconf import OmegaConf

from conftest import MODELS, compose_train
from trainer.run import loop

pytestmark = pytest.mark.slow  # the full suite, not the fast tier
# Eight steps, a validation at steps 4 and 8, last.pt every 2 steps: checkpoint writes at steps
# 2, 4 (last and best), 6 and 8 (last, and best when it improved).
RUN = ["debug=fast", "logger=none", "trainer.max_steps=8", "trainer.val_every=4",
       "trainer.checkpoint_every=2"]
DROPOUT = {"transformer": ["model.dropout=0.2"], "rnn": ["model.dropout=0.2", "model.depth=2"]}
# (point, the calls it may die on): a step after last.pt exists, either validation (call 1 is
# the sanity check before the first step), a write of a checkpoint after the first.
POINTS = {"step": (3, 8), "validation": (2, 3), "write": (2, 5)}


# What a run imports only once it trains: the first optimizer imports torch._dynamo (over a
# second), the data its readers. Imported once in the fork server, not again in every child; a
# module that is not there (renamed) is passed over by the server and imported where it is used.
LAZY_IMPORTS = ["torch._dynamo", "torch.utils.data", "trainer.data.files", "trainer.data.images",
                "trainer.data.tokenize", "trainer.data.transforms"]


def weights_and_progress(run: Path) -> tuple[dict, dict]:
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    return state["model"], state["progress"]


@pytest.fixture(scope="module")
def processes():
    """Child processes forked from a server that has imported torch and the loop once, so each
    killed run costs its training, not a second of imports (a fork of this process, whose
    thread pools are running, could hang)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["inject_fault", *LAZY_IMPORTS])
    return context


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """Each configuration trained straight through once: {args: (metrics, run directory)}."""
    cache: dict[tuple[str, ...], tuple[dict, Path]] = {}

    def trained(args: list[str]) -> tuple[dict, Path]:
        if tuple(args) not in cache:
            run = tmp_path_factory.mktemp("reference")
            cache[tuple(args)] = loop.train(compose_train(*args), run), run
        return cache[tuple(args)]

    return trained


@pytest.fixture
def kill_and_resume(processes, references, tmp_path):
    """Kill a run of `args` with SIGKILL at a random `point`, resume it, and compare it with the
    run that was never killed: the same metrics and the same weights, bit for bit."""

    def check(point: str, args: list[str]) -> None:
        expected, reference = references(args)
        n = random.Random(" ".join([point, *args])).randint(*POINTS[point])
        cfg = compose_train(*args)
        run = tmp_path / "killed"
        child = processes.Process(target=inject_fault.train_and_die, args=(
            point, n, OmegaConf.to_container(cfg, resolve=True), str(run),
            multiprocessing.get_start_method()))
        child.start()
        child.join(timeout=300)
        assert child.exitcode == -signal.SIGKILL, f"not killed at {point} {n}"
        assert not (run / "metrics.json").exists()
        partial = list((run / "checkpoints").glob("*.partial"))
        assert bool(partial) == (point == "write")  # half a file, which resuming must never read

        cfg.resume = str(run)
        assert loop.train(cfg, run) == expected, f"killed at {point} {n}"
        (want, want_progress), (got, got_progress) = map(weights_and_progress, (reference, run))
        assert got_progress == want_progress
        assert all(torch.equal(want[k], v) for k, v in got.items()), f"killed at {point} {n}"
        assert checkpoint_names(run) == checkpoint_names(reference)

    return check


def checkpoint_names(run: Path) -> list[str]:
    return sorted(path.name for path in (run / "checkpoints").glob("*.pt"))


@pytest.mark.parametrize("point", list(POINTS))
@pytest.mark.parametrize("model", MODELS)
def test_a_run_killed_anywhere_resumes_bit_identical(kill_and_resume, model, point):
    kill_and_resume(point, [*RUN, f"model={model}", *DROPOUT.get(model, [])])


@pytest.mark.parametrize("point", ["validation", "write"])
def test_killed_while_keeping_the_best_checkpoints(kill_and_resume, point):
    # A validation every 2 steps, so copies are kept and dropped; last.pt from step 1 on.
    kill_and_resume(point, [*RUN, "trainer.val_every=2", "trainer.checkpoint_every=1",
                            "trainer.keep_best=2"])


@pytest.mark.parametrize("point", ["write"])
def test_killed_while_streaming_images_from_disk(kill_and_resume, image_folder, point):
    kill_and_resume(point, [*RUN, "data=image_folder", f"data.path={image_folder}",
                            "data.image_size=8", "data.in_memory=false", "data.batch_size=4",
                            "data.num_workers=1"])


@pytest.mark.parametrize("point", ["step", "validation"])
def test_killed_while_reading_memory_mapped_tokens(kill_and_resume, text_file, point):
    kill_and_resume(point, [*RUN, "model=transformer", "model.dropout=0.2", "data=text",
                            f"data.path={text_file}", "data.block_size=16", "data.batch_size=8"])
