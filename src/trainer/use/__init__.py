"""What is done with a finished run: evaluate, predict, generate and export-model.

jobs.py holds each command's job and rebuilds a run from its checkpoint (checked first: a run from
elsewhere is data); predict.py prepares images as in training, export.py writes and checks the
exported files, fid.py scores a GAN in a classifier run's features.

May import: run (to rebuild a model as training built it), tasks, models, data and the leaves.
Never cli.
"""
