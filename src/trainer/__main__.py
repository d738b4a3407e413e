"""`python -m trainer ...` is `train ...`."""

from trainer.cli import train

if __name__ == "__main__":
    train()
