"""Plain nn.Modules that take their sizes as arguments and know nothing of Hydra or the loop.

Every model shares two size knobs, `width` and `depth`, so a sweep or the debug preset can shrink
any architecture with the same keys.

May import: the leaves (errors) and each other; never data, tasks, run, use or cli.
"""
