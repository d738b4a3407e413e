"""Plain nn.Modules that take their sizes as arguments and know nothing of Hydra or the loop.

Every model shares two size knobs, `width` and `depth`, so a sweep or the debug preset can shrink
any architecture with the same keys.
"""
