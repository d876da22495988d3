"""mt: recurrent encoder-decoder neural machine translation (train, translate, evaluate)."""

__version__ = "0.1.0"


def version_string(prog: str) -> str:
    """What every command prints for --version: its name, mt's version, torch's."""
    import torch

    return f"{prog} {__version__} (mt-rnn; torch {torch.__version__})"
