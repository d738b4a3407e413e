"""Bad input: one line naming the bad value and what is accepted, non-zero exit, no traceback,
and nothing already saved is lost."""

from __future__ import annotations

import pytest

from conftest import FAILING_MODELS, assert_clean_error, run_cli, run_dirs, run_in_process


@pytest.mark.parametrize(("args", "fragments"), [
    (["model=resnet"], ["error: model=resnet is not an option; choose one of autoencoder, cnn"]),
    (["data=imagenet"], ["data=imagenet is not an option", "digits", "shakespeare"]),
    (["optimizer=lion"], ["optimizer=lion is not an option", "adam, adamw, sgd"]),
    (["logger=[tensorboard,tb]"], ["logger=tb is not an option", "none, tensorboard, wandb"]),
    (["trainer.epoch=3"], ["unknown key trainer.epoch (did you mean trainer.epochs?); accepted: "
                           "epochs, max_steps"]),
    (["model.widht=3"], ["unknown key model.widht (did you mean model.width?)", "depth"]),
    (["modle=rnn"], ["unknown key modle (did you mean model?); accepted: model, data",
                     "experiment"]),
    # Given with +, which Hydra lets past the schema: refused all the same, not ignored.
    (["+trainer.epoch=3"], ["unknown key trainer.epoch (did you mean trainer.epochs?); accepted: "
                            "epochs, max_steps"]),
    (["+seeed=3"], ["unknown key seeed (did you mean seed?); accepted: model, data"]),
    (["trainer.epochs=many"], ["trainer.epochs=many", "Integer"]),
    (["model=cnn,rnn"], ["Ambiguous value for argument 'model=cnn,rnn'", "--multirun"]),
    (["model=["], ["the command line cannot be parsed"]),
    (["optimizer.lr=-0.1"], ["error: optimizer.lr=-0.1 is out of range: it must be > 0"]),
    (["optimizer.lr=0"], ["optimizer.lr=0 is out of range"]),
    (["data.batch_size=0"], ["data.batch_size=0 is out of range: it must be >= 1"]),
    (["model=rnn", "data=text", "data.path=/no/such/file.txt"],
     ["data.path='/no/such/file.txt' is not a file"]),
    (["data=text"], ["data.path is required here"]),
    (["data.val_fraction=0.5", "data.test_fraction=0.5"],
     ["data.val_fraction=0.5 + data.test_fraction=0.5 leave no training data"]),
    (["device=cuda"], ["device=cuda but no CUDA device is available", "device=cpu"]),
    (["device.precision=64"], ["device.precision='64' is not accepted: choose one of auto, 32"]),
    (["data=mnist", "data.root=empty", "data.download=false"],
     ["data=mnist: the files are not under", "train-images-idx3-ubyte.gz", "data.root"]),
    (["data=cifar10", "data.root=empty", "data.download=false"], ["data=cifar10", "cifar-10"]),
    (["device=cpu", "device.sync_batchnorm=true"], ["device.sync_batchnorm=true needs CUDA"]),
    (["device.nodes=2"], ["device.nodes=2 needs device.rdzv_endpoint=HOST:PORT"]),
    (["scheduler=step", "scheduler.step_size=0"], ["scheduler.step_size=0 is out of range"]),
    (["model=transformer", "model.heads=0"], ["model.heads=0 is out of range"]),
    (["optimizer=sgd", "optimizer.momentum=-1"], ["torch.optim.sgd.SGD cannot be built",
                                                      "momentum"]),
    # Refused before the data is read: the missing file is never looked for.
    (["model=gan", "data=text", "data.path=/no/such/file.txt"],
     ["error: model=gan cannot train on text data (data=text); it accepts image data: digits"]),
    (["model.depth=5"], ["error: model.depth=5: 5 conv blocks would halve a 8x8 image"]),
    # A real allocation failure, on any machine: 3.6 PB for the first layer's weights.
    (["model.width=100000000000000"], ["error: out of memory: this machine could not allocate "
                                       "3.6 PB more; the model alone does not fit: make it "
                                       "smaller (its model.* sizes)"]),
    (["model=transformer", "model.heads=3"], ["model.width=16 must be a multiple of"]),
    (["model=transformer", "model.lora_rank=-1"], ["model.lora_rank=-1 is out of range: it must "
                                                   "be >= 0 (0: no adapters)"]),
    (["trainer.keep_best=-1"], ["trainer.keep_best=-1 is out of range: it must be >= 0"]),
    (["trainer.overfit_batches=1000"], ["trainer.overfit_batches=1000: 16,000 samples, more "
                                            "than the 1,258 training samples"]),
    (["init_from=/no/such/run"], ["checkpoint /no/such/run/checkpoints/best.pt does not exist"]),
    (["trainer.profile=-1"], ["trainer.profile=-1 is out of range: it must be >= 0 (0 turns"]),
    (["trainer.ema_decay=1.5"], ["trainer.ema_decay=1.5 is out of range: it must be in (0, 1)"]),
    (["model=gan", "trainer.class_weights=balanced"],
     ["trainer.class_weights=balanced applies to classification only", "set it to null"]),
    (["model=gan", "trainer.label_smoothing=0.1"],
     ["trainer.label_smoothing=0.1 applies to classification only"]),
    (["model.whiten=true"], ["model.whiten=true needs model.residual=true"]),
    (["model.weights=DEFAULT"],
         ["model.weights=DEFAULT applies to a torchvision backbone only"]),
    (["hparams_search=classification", "hydra.sweeper.n_trials=0"],
     ["hydra.sweeper.n_trials=0 is not accepted: it takes an integer >= 1"]),
    (["hparams_search=classification", "hydra.sweeper.direction=up"],
     ["hydra.sweeper.direction=up is not accepted: choose one of minimize, maximize"]),
    (["hparams_search=classification", "hydra.sweeper.max_failure_rate=2"],
     ["hydra.sweeper.max_failure_rate=2 is out of range: it must be in [0, 1]"]),
    (["hparams_search=classification", "hydra.sweeper.params.model.depth=choice(1,2)"],
     ["give the search space without the prefix, as model.depth=choice(1,2)"]),
])
def test_bad_input_is_one_clear_line(tmp_path, args, fragments):
    assert_clean_error(run_in_process("train", "debug=fast", *args, cwd=tmp_path), *fragments)


@pytest.mark.parametrize("args", [["model=resnet"],  # the fast tier runs one process
                                  pytest.param(["optimizer.lr=-0.1"], marks=pytest.mark.slow),
                                  pytest.param(["model.depth=5"], marks=pytest.mark.slow)])
def test_the_train_command_itself_prints_one_line_for_bad_input(tmp_path, args):
    """The table above runs in this process; a few rows as the user's own process runs them (a
    mistake in composing, in checking and in building)."""
    in_process = run_in_process("train", "debug=fast", *args, cwd=tmp_path)
    by_itself = run_cli("train", "debug=fast", *args, cwd=tmp_path)
    assert_clean_error(by_itself)
    assert by_itself.returncode == in_process.returncode
    assert error_lines(by_itself) == error_lines(in_process)


def error_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error: ")]


def test_cnn_on_text_is_refused(tmp_path, text_file):
    result = run_in_process("train", "model=cnn", "data=text", f"data.path={text_file}",
                            cwd=tmp_path)
    assert_clean_error(result, "model=cnn cannot train on text data", "digits, mnist")


def test_divergence_stops_with_advice(tmp_path):
    result = run_in_process("train", "debug=fast", "optimizer=sgd", "optimizer.lr=1e12",
                            "trainer.grad_clip=0", cwd=tmp_path)
    assert_clean_error(result, "training diverged", "optimizer.lr")


@pytest.mark.slow  # two runs
def test_out_of_memory_in_a_step_says_what_to_change_and_keeps_last_pt(tmp_path):
    failing = ["model._target_=failing_model.CrashingCNN", "trainer.checkpoint_every=2"]
    result = run_cli("train", "debug=fast", *failing, cwd=tmp_path,
                     env={**FAILING_MODELS, "CRASH": "seed0:oom"})  # in step 3
    [run] = run_dirs(tmp_path)
    assert_clean_error(result, "error: out of memory: GPU 0 could not allocate 2 GiB more (of "
                       "79.15 GiB); lower data.batch_size=16 (with trainer.accumulate=K for the "
                       "same batch per step), or use a smaller model; its last.pt is kept: "
                       f"continue with train resume={run.relative_to(tmp_path)} and the changed "
                       "keys")
    resumed = run_in_process("train", f"resume={run}", "data.batch_size=8",
                             "trainer.accumulate=2", cwd=tmp_path,
                             env=FAILING_MODELS)  # no crash planned this time
    assert resumed.returncode == 0, resumed.stderr
    assert "at step 2" in resumed.stdout and (run / "metrics.json").is_file()


def test_a_monitor_that_names_no_metric_stops_the_run_before_its_first_step(tmp_path):
    result = run_in_process("train", "debug=fast", "trainer.monitor=val/accuracy",
                            "hydra.run.dir=run", cwd=tmp_path)
    assert_clean_error(result, "trainer.monitor='val/accuracy' is not a validation metric of "
                       "this task; choose one of val/acc, val/loss")
    assert "step 2/6" not in result.stdout + result.stderr  # not a step was taken


def test_resume_of_a_directory_that_is_not_a_run(tmp_path):
    result = run_in_process("train", "resume=outputs/typo", cwd=tmp_path)
    assert_clean_error(result, "'outputs/typo' is not a run directory")
    assert not (tmp_path / "outputs" / "typo").exists()


def test_corrupt_checkpoint_is_reported_and_nothing_is_lost(tmp_path, finished_run):
    run = finished_run
    last = run / "checkpoints" / "last.pt"
    last.write_bytes(b"not a checkpoint")
    best = (run / "checkpoints" / "best.pt").read_bytes()
    result = run_in_process("train", f"resume={run}", cwd=tmp_path)
    assert_clean_error(result, f"checkpoint {last} is corrupt or not a trainer checkpoint")
    assert (run / "checkpoints" / "best.pt").read_bytes() == best
    assert last.read_bytes() == b"not a checkpoint"
    assert (run / "metrics.json").is_file()


def test_resume_cannot_swap_the_model(tmp_path, finished_run):
    result = run_in_process("train", f"resume={finished_run}", "model=rnn", cwd=tmp_path)
    assert_clean_error(result, "model=rnn: a resumed run keeps its model")


def test_resume_names_the_model_key_that_changed_its_shape(tmp_path, finished_run):
    last = (finished_run / "checkpoints" / "last.pt").read_bytes()
    result = run_in_process("train", f"resume={finished_run}", "model.width=64", cwd=tmp_path)
    assert_clean_error(result, "does not match the configured model (model.width=64 differs "
                       "from the run's model")
    assert (finished_run / "checkpoints" / "last.pt").read_bytes() == last


def test_evaluate_with_a_mismatched_checkpoint(tmp_path, finished_run):
    import torch

    run = finished_run
    path = run / "checkpoints" / "best.pt"
    state = torch.load(path, weights_only=True)
    state["config"]["model"]["width"] = 8
    torch.save(state, path)
    result = run_in_process("evaluate", f"run_dir={run}", cwd=tmp_path)
    assert_clean_error(result, "does not match the configured model")


@pytest.mark.slow  # the fast tier has the allocation failure of the table
def test_out_of_memory_in_evaluate_says_what_to_change(tmp_path, finished_run):
    import torch

    path = finished_run / "checkpoints" / "best.pt"
    state = torch.load(path, weights_only=True)
    state["config"]["model"]["_target_"] = "failing_model.CrashingCNN"  # the same weights
    torch.save(state, path)
    result = run_in_process("evaluate", f"run_dir={finished_run}", cwd=tmp_path,
                            env={**FAILING_MODELS, "CRASH": "rank0:oom_eval"})
    assert_clean_error(result, "error: out of memory: GPU 0 could not allocate 2 GiB more (of "
                       "79.15 GiB); evaluate with a smaller batch (data.batch_size=N; the run's "
                       "is 16) or on another device (device=cpu)")


def test_a_checkpoint_the_run_lacks_is_named_with_those_it_has(tmp_path, finished_run):
    result = run_in_process("evaluate", f"run_dir={finished_run}", "checkpoint=best-step-7",
                            cwd=tmp_path)
    assert_clean_error(result, "checkpoint=best-step-7:", "does not exist; this run has best, last")


def test_evaluate_of_a_missing_run(tmp_path):
    assert_clean_error(run_in_process("evaluate", "run_dir=nowhere", cwd=tmp_path),
                       "'nowhere' is not a run directory")


def test_an_output_folder_that_cannot_be_written(tmp_path):
    (tmp_path / "afile").write_text("not a folder")
    result = run_in_process("train", "debug=fast", f"hydra.run.dir={tmp_path / 'afile' / 'run'}",
                            cwd=tmp_path)
    assert_clean_error(result, "cannot be created", "afile is not a folder")
