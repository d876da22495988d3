"""`mt-average`: average the weights of checkpoints into a new checkpoint (fairseq's
scripts/average_checkpoints.py).

    mt-average runs/x/checkpoints/step_00004400.pt runs/x/checkpoints/step_00004800.pt -o avg.pt
    mt-average --run runs/x --last 5 -o runs/x/checkpoints/avg5.pt   # the last 5 step files
    mt-translate -m runs/x/checkpoints/avg5.pt < test.en              # decode it like any checkpoint

Every input is loaded with the checks every loader applies (readable, finite, weights that fit
their own config and vocabulary), and all must share the first one's tokenizer and architecture:
a mismatch is one line naming the file, and nothing is written. The output holds the mean of the
weights (accumulated in float64) and the last input's other entries, without optimizer state, as
best.pt does, plus `averaged_steps` and `averaged_from`. It is written atomically: a kill or a
full disk never leaves a partial file. Written inside a run's checkpoints/, it decodes with that
run's shortlist. A run's own end-of-training average is `train.average_last`.

Exit status (as mt-train's): 0 done, 1 bad input (one `error:` line naming the file), 74 the
output could not be written, 130 Ctrl-C (nothing written).
"""
from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path
from typing import List, Optional

from mt import checkpoint as ckpt_io
from mt import version_string
from mt.interrupt import EXIT_ERROR, EXIT_IO
from mt.rundir import RunDir

log = logging.getLogger("mt.average")


def last_steps(run_dir: Path, n: int) -> List[Path]:
    """The newest n step_<N>.pt of a run (by step number), oldest first."""
    run = RunDir(Path(run_dir))
    if not run.checkpoints.is_dir():
        raise FileNotFoundError(f"{run.checkpoints}: no such folder (is {run_dir} a run directory?)")
    files = ckpt_io.RunCheckpoints(run.checkpoints, n).step_files()
    if len(files) < n:
        raise ValueError(f"{run.checkpoints} holds {len(files)} step checkpoints, fewer than --last {n} "
                         "(train.keep_checkpoints sets how many a run keeps)")
    return files[-n:]


def average_files(paths: List[Path], output: Path) -> dict:
    """Average `paths` into `output` (atomically); returns what was written."""
    averaged = ckpt_io.average_checkpoints([Path(p) for p in paths])
    ckpt_io.save(averaged, Path(output))
    log.info("averaged %d checkpoints (steps %s) -> %s", len(paths),
             ",".join(map(str, averaged["averaged_steps"])), output)
    return averaged


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="mt-average", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=version_string(p.prog))
    p.add_argument("inputs", nargs="*", type=Path, help="checkpoint files to average")
    p.add_argument("--run", type=Path, help="a run directory: average its last --last step checkpoints")
    p.add_argument("--last", type=int, help="with --run: how many of its newest step_<N>.pt")
    p.add_argument("-o", "--output", type=Path, required=True, help="the averaged checkpoint to write")
    args = p.parse_args(argv)
    if (args.run is None) != (args.last is None):
        p.error("--run and --last go together")
    if args.run is not None and args.inputs:
        p.error("give checkpoint files or --run/--last, not both")
    if args.run is None and not args.inputs:
        p.error("give the checkpoints to average (or --run DIR --last N)")
    if args.last is not None and args.last < 1:
        p.error(f"--last must be >= 1, got {args.last}")
    return args


def main(argv: Optional[List[str]] = None) -> None:
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="mt-average: %(message)s")
    try:
        paths = last_steps(args.run, args.last) if args.run is not None else args.inputs
        average_files(paths, args.output)
    except KeyboardInterrupt:  # nothing was written: the save is atomic
        print("mt-average: interrupted (SIGINT); nothing written", file=sys.stderr)
        sys.exit(130)
    except ckpt_io.CheckpointWriteError as e:
        print(f"mt-average: error: {e}", file=sys.stderr)
        sys.exit(EXIT_IO)
    except (ValueError, FileNotFoundError) as e:  # CheckpointError is a ValueError
        print(f"mt-average: error: {e}", file=sys.stderr)
        sys.exit(EXIT_ERROR)


if __name__ == "__main__":
    main()
