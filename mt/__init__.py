"""mt: recurrent encoder-decoder neural machine translation (train, translate, evaluate).

The Python API (the README shows it at work):

    import mt
    translator = mt.Translator.from_path("runs/multi30k_en_de", method="greedy")  # run dir or .pt
    hyps = translator.translate(["A dog runs.", "Two men ride bikes."])
    mt.score(hyps, ["Ein Hund rennt.", "Zwei Männer fahren Fahrrad."])  # BLEU, chrF, TER + signatures
    cfg = mt.compose_config(["recipe=multi30k_en_de_quick"]); mt.run(cfg, "runs/quick")  # train

Names are imported on first use, so `import mt` stays light (torch loads with the first model).
"""

__version__ = "0.1.0"

_EXPORTS = {
    "Translator": "mt.translate",     # load a checkpoint, translate lines (greedy, beam, sampling)
    "score": "mt.evaluate",           # sacreBLEU BLEU / chrF / TER with signatures
    "compose_config": "mt.config",    # a recipe's config, as mt-train composes it
    "run": "mt.pipeline",             # run a config's stages into a run directory
}
__all__ = ["__version__", "version_string", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'mt' has no attribute {name!r}")


def version_string(prog: str) -> str:
    """What every command prints for --version: its name, mt's version, torch's. From the
    installed metadata, not `import torch`: each command builds this string at start-up, and
    importing torch there cost mt-evaluate 2.5 of its 3.6 seconds."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        torch_version = version("torch")
    except PackageNotFoundError:
        torch_version = "not installed"
    return f"{prog} {__version__} (mt-rnn; torch {torch_version})"
