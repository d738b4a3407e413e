"""The `generate` command: text from a finished language-model run, seeded, streamed to stdout."""

from __future__ import annotations

import pytest

from conftest import assert_clean_error, compose_train, run_in_process
from trainer.run.loop import train


@pytest.fixture(scope="module", params=["rnn"])  # the transformer's decoding: test_text.py
def language_run(request, tmp_path_factory):
    """A finished char-level language model run on a small text (one per model and module)."""
    folder = tmp_path_factory.mktemp("language")
    corpus = folder / "corpus.txt"
    corpus.write_text("ANNA says: the sky is blue and the sea is green.\n" * 40)
    run = folder / "run"
    train(compose_train("debug=fast", "logger=none", f"model={request.param}", "data=text",
                        f"data.path={corpus}", "data.block_size=16"), run)
    return run


def test_generate_continues_the_prompt_and_a_seed_repeats_it(tmp_path, language_run):
    command = ["generate", f"run_dir={language_run}", "prompt=ANNA says: the", "length=40"]
    first = run_in_process(*command, "seed=3", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("ANNA says: the") and len(first.stdout) > 50
    assert run_in_process(*command, "seed=3", cwd=tmp_path).stdout == first.stdout
    assert run_in_process(*command, "seed=4", "top_k=3", cwd=tmp_path).stdout != first.stdout
    assert "Traceback" not in first.stderr


@pytest.mark.slow
def test_generate_without_a_prompt_starts_from_the_validation_text(tmp_path, language_run):
    result = run_in_process("generate", f"run_dir={language_run}", "length=10", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.rstrip("\n")) >= 10


@pytest.mark.slow
def test_generate_needs_its_data_only_for_the_default_prompt(tmp_path):
    """A run's tokenizer is in its checkpoint: with a prompt, generate works where the training
    text is not; without one it says that the text it would start from is missing."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("BORIS says: the road is long and the night is dark.\n" * 40)
    run = tmp_path / "run"
    train(compose_train("debug=fast", "logger=none", "model=rnn", "data=text",
                        f"data.path={corpus}", "data.tokenizer=bpe", "data.vocab_size=300",
                        "data.block_size=8"), run)
    command = ["generate", f"run_dir={run}", "prompt=BORIS says", "length=20", "seed=1"]
    before = run_in_process(*command, cwd=tmp_path)
    corpus.unlink()
    after = run_in_process(*command, cwd=tmp_path)
    assert after.returncode == 0 and after.stdout == before.stdout, after.stderr
    assert_clean_error(run_in_process("generate", f"run_dir={run}", cwd=tmp_path),
                       "give prompt=TEXT: without one, generate starts from the run's "
                       "validation text, and its data cannot be read here", "is not a file")


@pytest.mark.parametrize(("args", "fragment"), [
    (["prompt=the Ω"], "the character 'Ω' is not in this char tokenizer's vocabulary"),
    (["length=0"], "length=0 is out of range: it must be >= 1"),
    (["temperature=0"], "temperature=0.0 is out of range: it must be > 0"),
    (["prompt="], "prompt='' gives no tokens"),
    (["length=null"], "length=null: field 'length' is not Optional"),
    (["temperature=hot"], "temperature=hot: Value 'hot' of type 'str' could not be converted"),
])
@pytest.mark.slow
def test_bad_generate_input_is_one_clear_line(tmp_path, language_run, args, fragment):
    assert_clean_error(run_in_process("generate", f"run_dir={language_run}", *args, cwd=tmp_path),
                       fragment)


@pytest.mark.slow
def test_generate_refuses_a_run_that_is_not_a_language_model(tmp_path, finished_run):
    assert_clean_error(run_in_process("generate", f"run_dir={finished_run}", cwd=tmp_path),
                       "generate needs a language model")


@pytest.mark.slow
def test_predict_points_a_language_model_run_to_generate(tmp_path, language_run):
    assert_clean_error(run_in_process("predict", f"run_dir={language_run}", "inputs=x",
                                      cwd=tmp_path),
                       "is a language model: use generate")
