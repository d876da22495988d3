"""`mt-train`: run a recipe's stages, prepare -> tokenizer -> train -> translate -> score.

    mt-train                                              # the default recipe (Multi30k en->de)
    mt-train recipe=multi30k_en_de tokenizer.vocab_size=4000
    mt-train recipe=multi30k_de_en stages=[prepare,tokenizer]
    mt-train -m recipe=multi30k_en_de train.lr=1e-3,3e-4  # Hydra multirun: one run dir per job

Everything a run makes lives in one directory, runs/<name> (multirun: runs/<name>/multirun/<job number>,
whose .hydra/overrides.yaml names the job's values); mt/rundir.py names every file:

    config.yaml                 the resolved config of the latest invocation
    mt.log                      the log of every invocation
    data/ -> runs/.cache/data/<fingerprint>/       prepared splits (Arrow), stats.json  <- prepare
    tokenizer/ -> runs/.cache/tokenizer/<fp>/      spm.model (or src/tgt.model), ids/   <- tokenizer
    checkpoints/{last,best}.pt  metrics.jsonl, tb/ (TensorBoard)                <- train
    test.hyp                    detokenised translations of the test split      <- translate
    test.scores.json            BLEU / chrF / TER with sacreBLEU signatures    <- score

Each stage is a plain function of (cfg, run_dir); it skips its work when its outputs exist and
were made from the same inputs (a stamp holds their fingerprint: mt.rundir), so a re-run resumes
where the last one stopped. `force=true` redoes the selected stages. Prepared data and tokenizers
live in a cache keyed by those fingerprints (`cache_dir`, default runs/.cache) and the run links
to them: runs and multirun jobs with the same data and tokenizer settings prepare them once.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import sys
from pathlib import Path
from typing import Any, Callable, Dict

from omegaconf import DictConfig, OmegaConf

from mt import rundir
from mt.config import CONF_DIR, ConfigError, register_configs, validate
from mt.interrupt import EXIT_DIVERGED, EXIT_ERROR, EXIT_IO, Interrupted, exit_code, on_sigterm
from mt.rundir import RunDir

log = logging.getLogger("mt")


def setup_logging(run_dir: Path | None = None, level: int = logging.INFO) -> None:
    """Log lines to stderr (stdout stays data) and, given a run dir, to run_dir/mt.log."""
    root = logging.getLogger("mt")
    for h in list(root.handlers):
        if getattr(h, "_mt", False):
            root.removeHandler(h)
            h.close()
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
    handlers = [logging.StreamHandler(sys.stderr)]
    if run_dir is not None:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(RunDir(run_dir).log, encoding="utf-8"))
    for h in handlers:
        h.setFormatter(fmt)
        h._mt = True  # type: ignore[attr-defined]
        root.addHandler(h)
    root.setLevel(level)
    root.propagate = False
    # a full disk must not add a traceback per log line to stderr: the failed write itself is reported
    logging.raiseExceptions = False


# --- stages -------------------------------------------------------------------------------------

def stage_prepare(cfg: DictConfig, run_dir: Path) -> Any:
    from mt.data import fingerprint, prepare

    entry = _cache_entry(cfg, "data", fingerprint(cfg.data))
    with _locked(entry):
        stats = prepare(cfg.data, entry, force=cfg.force)
    _link(RunDir(run_dir).data, entry)
    return stats


def _not_done(path: Path, stage: str) -> FileNotFoundError:
    return FileNotFoundError(f"{path} is missing: run the {stage} stage first (stages=[{stage},...])")


def _require(path: Path, stage: str) -> None:
    if not path.exists():
        raise _not_done(path, stage)


def stage_tokenizer(cfg: DictConfig, run_dir: Path) -> Any:
    from mt.tokenizer import fingerprint, train_tokenizer

    run = RunDir(run_dir)
    data = rundir.read_stamp(run.data_stamp)
    if data is None:
        raise _not_done(run.data_stamp, "prepare")
    entry = _cache_entry(cfg, "tokenizer", fingerprint(cfg.tokenizer, data["fingerprint"]))
    with _locked(entry):
        tok = train_tokenizer(cfg.tokenizer, run.data, entry, force=cfg.force)
    _link(run.tokenizer, entry)
    return tok


# --- the shared cache of prepared data and tokenizers ------------------------------------------
# cfg.cache_dir/<kind>/<fingerprint>/ holds one stage's output; a run's data/ and tokenizer/ are
# links to the entries its settings name, so a second run (or multirun job) with the same settings
# finds the stage done. An entry is built under a lock (parallel jobs wait, then reuse it), and
# it is complete only once its stamp file is written last, so a killed build is redone.

def _cache_entry(cfg: DictConfig, kind: str, fingerprint: str) -> Path:
    return Path(cfg.cache_dir).expanduser().absolute() / kind / fingerprint


@contextlib.contextmanager
def _locked(entry: Path):
    import fcntl

    entry.parent.mkdir(parents=True, exist_ok=True)
    with open(entry.parent / f"{entry.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _link(link: Path, entry: Path) -> None:
    """Point run_dir/<kind> at the cache entry (a relative link when both share a root)."""
    try:
        target = Path(os.path.relpath(entry, link.parent))
    except ValueError:  # different drives
        target = entry
    if link.is_symlink():
        if Path(os.readlink(link)) == target:
            return
        link.unlink()
    elif link.exists():  # a run made before the cache: its own copy goes, the link replaces it
        shutil.rmtree(link)
    link.parent.mkdir(parents=True, exist_ok=True)
    tmp = link.with_name(f".{link.name}.{os.getpid()}.link")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target, target_is_directory=True)
    os.replace(tmp, link)


def stage_train(cfg: DictConfig, run_dir: Path) -> Any:
    from mt.train import train

    _require(RunDir(run_dir).tokenizer_stamp, "tokenizer")
    return train(cfg, run_dir)


def stage_translate(cfg: DictConfig, run_dir: Path) -> Any:
    from mt.translate import translate_test

    _require(RunDir(run_dir).best, "train")
    return translate_test(cfg, run_dir)


def stage_score(cfg: DictConfig, run_dir: Path) -> Any:
    from mt.evaluate import score_test

    _require(RunDir(run_dir).hyp, "translate")
    return score_test(cfg, run_dir)


STAGE_FNS: Dict[str, Callable[[DictConfig, Path], Any]] = {
    "prepare": stage_prepare,
    "tokenizer": stage_tokenizer,
    "train": stage_train,
    "translate": stage_translate,
    "score": stage_score,
}


def run(cfg: DictConfig, run_dir: Path) -> Dict[str, Any]:
    """Run the selected stages in pipeline order; returns each stage's result by name.
    Under torchrun, rank 0 alone runs the stages other than train, the others wait."""
    from mt import distributed

    validate(cfg)
    run_dir = Path(run_dir)
    ctx = distributed.init(cfg.device) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else distributed.Context()
    setup_logging(run_dir if ctx.main else None, logging.INFO if ctx.main else logging.WARNING)
    if ctx.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        rundir.write_text_atomic(RunDir(run_dir).config, OmegaConf.to_yaml(cfg, resolve=True))
        log.info("run %s: stages %s", run_dir, ",".join(cfg.stages))
    results = {}
    for stage, fn in STAGE_FNS.items():
        if stage in cfg.stages:
            if stage == "train" or ctx.main:
                results[stage] = fn(cfg, run_dir)
            distributed.barrier(ctx)
    return results


# --- Hydra entry point (thin) -------------------------------------------------------------------

register_configs()


def _hydra_main(cfg: DictConfig) -> None:
    """Runs the stages; every way a run can stop short is one line on stderr and its exit code
    (README: "Exit codes"). Our own bugs still show their traceback."""
    from hydra.core.hydra_config import HydraConfig

    from mt.checkpoint import CheckpointWriteError
    from mt.data import DataError
    from mt.train import TrainingDiverged

    try:
        run(cfg, Path(HydraConfig.get().runtime.output_dir))
    except Interrupted as e:
        _fail(str(e), exit_code(e.signum), "")
    except KeyboardInterrupt:  # Ctrl-C outside the training loop: stages redo their unfinished work
        _fail("interrupted (SIGINT); run the same command to resume", exit_code(signal.SIGINT), "")
    except TrainingDiverged as e:
        _fail(str(e), EXIT_DIVERGED)
    except CheckpointWriteError as e:
        _fail(str(e), EXIT_IO)
    except (ConfigError, DataError, FileNotFoundError, ValueError) as e:
        _fail(str(e), EXIT_ERROR)  # the user's input, not our bug: no traceback
    except OSError as e:
        _fail(f"{e.filename or ''}{': ' if e.filename else ''}{e.strerror or e}", EXIT_IO)


def _fail(message: str, code: int, prefix: str = "error: ") -> None:
    print(f"mt-train: {prefix}{' '.join(message.split())}", file=sys.stderr)
    sys.exit(code)


def main() -> None:
    import hydra

    if "--version" in sys.argv[1:]:  # Hydra's own parser has no --version
        from mt import version_string

        print(version_string("mt-train"))
        return

    on_sigterm()  # SIGTERM, like Ctrl-C, stops with one line (the training loop saves first)
    hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")(_hydra_main)()


if __name__ == "__main__":
    main()
