"""trainer.profile=N: a trace and an operator table of N steps, and the run unchanged by them."""

from __future__ import annotations

import json

from conftest import compose_train
from trainer.run.loop import train

RUN = ["debug=fast", "logger=none", "model.dropout=0"]


def test_a_profiled_run_writes_a_trace_and_the_operators_and_trains_the_same(tmp_path, caplog,
                                                                             capfd):
    caplog.set_level("INFO", logger="trainer")
    plain = train(compose_train(*RUN), tmp_path / "plain")
    profiled = train(compose_train(*RUN, "trainer.profile=2"), tmp_path / "profiled")
    assert profiled == plain

    folder = tmp_path / "profiled" / "profile"
    events = json.loads((folder / "trace.json").read_text())["traceEvents"]
    names = {event.get("name", "") for event in events}
    # Steps 1 and 2 warm the profiler up; steps 3 and 4 are recorded (its own count is 0-based).
    assert {"ProfilerStep#2", "ProfilerStep#3"} <= names
    assert not {"ProfilerStep#1", "ProfilerStep#4"} & names
    assert "aten::mkldnn_convolution" in names or "aten::convolution" in names
    assert "aten::convolution_backward" in (folder / "operators.txt").read_text()
    assert "profile of steps 3-4" in caplog.text
    assert "(no operator: Python, waiting for data)" in caplog.text
    assert not (tmp_path / "plain" / "profile").exists()
    assert "USDT" not in capfd.readouterr().err  # Kineto's tracepoint lines, printed from C++


def test_a_run_that_ends_in_the_warm_up_says_nothing_was_recorded(tmp_path, caplog):
    train(compose_train(*RUN, "trainer.profile=3", "trainer.max_steps=2"), tmp_path)
    assert "ended within the profiler's 2 warm-up steps; nothing was recorded" in caplog.text
    assert not (tmp_path / "profile").exists()


def test_a_profile_that_cannot_be_written_does_not_end_the_run(tmp_path, caplog):
    caplog.set_level("INFO", logger="trainer")
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "profile").write_text("a file where the folder would go")
    metrics = train(compose_train(*RUN, "trainer.profile=2"), tmp_path)
    assert "test/acc" in metrics
    assert "profile of steps 3-4" in caplog.text and "not written to" in caplog.text
    assert "aten::" in caplog.text  # the table is in the log all the same
