"""The run: one training loop and what it needs.

state.py (Setup, Run, Progress) is at the bottom; loop.py builds, restores and fits; step.py takes
one optimizer step; validation.py, evaluation.py, resume.py, profiling.py and init_from.py are the
loop's helpers, each taking the state or the values it uses; launch.py and job.py start the
processes (ranks, sweep jobs) that run it, sweep.py records and ranks sweep jobs, lr_find.py is the
learning-rate range test.

May import: tasks, models, data and the leaves (errors, logging, trackers, checkpoint, run_lock,
distributed, ranks, signals, config, targets, optim, averaging, tables). Never cli or use.
"""
