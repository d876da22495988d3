"""mt: recurrent encoder-decoder neural machine translation (train, translate, evaluate)."""

__version__ = "0.1.0"
