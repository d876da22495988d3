"""The prepare stage: parallel text from any source -> normalised, filtered Arrow splits.

    stats = prepare(cfg.data, run.data)     # skipped when its stamp (stats.json) matches the config
    ds = load_split(run.data, "train")      # datasets.Dataset with columns src, tgt; run: mt.rundir.RunDir

Every source ends up as a `datasets.Dataset` with two string columns, `src` and `tgt`, and from
there one code path normalises, filters and saves it (Arrow on disk, memory-mapped when read back,
so millions of pairs never become Python lists):

    text   <path>/<split>.<lang>[.gz]   one sentence per line, one file per language
    tsv    <path>/<split>.tsv[.gz]      columns chosen by src_field / tgt_field
    jsonl  <path>/<split>.jsonl[.gz]    one object per line; dotted fields reach into dicts
    hub    datasets.load_dataset(path, hub_config, split=...)  (Hugging Face Hub or a local dir)

Filters (empty side, too long, length ratio, duplicates) apply to `cfg.filter_splits` only and
their counts are recorded in stats.json. The other (evaluation) splits keep every line, and the
untouched reference in a third column, `tgt_raw`, which is what BLEU is computed against. Bad input raises DataError with a one-line message.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import logging
import lzma
import os
import re
import shutil
import tempfile
import unicodedata
import zlib
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np

from mt import rundir
from mt.config import DataConfig, to_container

log = logging.getLogger(__name__)

BUILTIN_DIR = Path(__file__).resolve().parent / "corpora"
FORMAT = 2  # bump when the prepared layout changes: older outputs are then rebuilt
_CHUNK = 10_000  # rows per batch in map/filter passes
_PARALLEL_ROWS = 100_000  # splits at least this long are cleaned by several processes

# Characters that print as a space (or separate words) become an ASCII space; invisible
# format characters are dropped. ZWJ/ZWNJ are kept: they change spelling in several scripts.
_SPACES = re.compile("[\t\n\v\f\r\x1c-\x1f\x85\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]")
_INVISIBLE = re.compile("[\x00-\x08\x0e-\x1b\x7f\u00ad\u200b\u2060\ufeff]")
_RUNS = re.compile(" {2,}")


class DataError(ValueError):
    """Unusable input data; the message is one line naming the file, line, dataset or field.
    A ValueError, so that every command's one-line error handler reports it."""


def normalize(text: str) -> str:
    """NFC, unify space-like characters, drop invisible ones, collapse runs, trim."""
    text = unicodedata.normalize("NFC", text)
    text = _INVISIBLE.sub("", _SPACES.sub(" ", text))
    return _RUNS.sub(" ", text).strip()


def resolve_path(path: str) -> Path:
    """`builtin:NAME` -> the corpus shipped in the package; anything else -> a filesystem path."""
    if path.startswith("builtin:"):
        return BUILTIN_DIR / path[len("builtin:"):]
    return Path(path).expanduser()


# --- reading local files ------------------------------------------------------------------------

def _find(base: Path) -> Path:
    """`base` itself or `base.gz`; a missing file is a DataError naming the path."""
    for candidate in (base, base.with_name(base.name + ".gz")):
        if candidate.is_file():
            return candidate
    raise DataError(f"missing file: {base} (or {base.name}.gz)")


def read_lines(path: Path) -> Iterator[str]:
    """Lines of a UTF-8 file (plain or gzip), split on LF only so that U+2028, form feeds and
    other exotic separators inside a sentence never shift parallel lines out of step."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            for number, raw in enumerate(f, start=1):
                try:
                    yield raw.decode("utf-8").rstrip("\n").rstrip("\r")
                except UnicodeDecodeError as e:
                    raise DataError(f"{path}:{number}: invalid UTF-8 ({e.reason} at byte {e.start})") from None
    except (EOFError, OSError, zlib.error) as e:  # a truncated download, a .gz that is no gzip
        raise read_error(str(path), e) from None


_COMPRESSED = {".gz": "gzip", ".bz2": "bz2", ".xz": "xz", ".zst": "zstd", ".zip": "zip"}


def read_error(path: Optional[str], e: BaseException, where: Optional[str] = None) -> DataError:
    """One line for a file that cannot be read; a truncated or corrupt archive says so."""
    reason = " ".join(str(e).split()) or type(e).__name__
    fmt = _COMPRESSED.get(Path(path).suffix) if path else None
    if fmt and isinstance(e, (EOFError, OSError, zlib.error, lzma.LZMAError)):
        reason = f"truncated or corrupt {fmt} ({reason})"
    return DataError(": ".join(part for part in (where, path, reason) if part))


def unwrap_datasets_error(e: BaseException, path: Optional[str] = None, where: Optional[str] = None) -> DataError:
    """datasets wraps a reader's error in DatasetGenerationError (40 lines, no file name): the
    root cause instead, and the file that datasets' reader was reading when it raised."""
    from datasets.exceptions import DatasetsError

    while isinstance(e, DatasetsError) and (e.__cause__ or e.__context__) is not None:
        e = e.__cause__ or e.__context__
    tb, file = e.__traceback__, None
    while tb is not None:  # the readers (datasets/packaged_modules/*) loop over `file`
        value = tb.tb_frame.f_locals.get("file")
        if "packaged_modules" in tb.tb_frame.f_code.co_filename and isinstance(value, str):
            file = value.split("::")[-1]  # "gzip://train.jsonl::/data/train.jsonl.gz"
        tb = tb.tb_next
    return read_error(file or path, e, where)


def count_lines(path: Path) -> int:
    """Non-blank lines; reading them all checks the UTF-8 and the compression first."""
    return sum(1 for line in read_lines(path) if line.strip())


def _count_rest(lines: Iterator[str]) -> int:
    return sum(1 for _ in lines)


def _text_pairs(src_path: str, tgt_path: str) -> Iterator[Dict[str, str]]:
    """Zip two line-aligned files; different line counts name both files and both counts."""
    src_lines, tgt_lines = read_lines(Path(src_path)), read_lines(Path(tgt_path))
    n = 0
    while True:
        s, t = next(src_lines, None), next(tgt_lines, None)
        if s is None or t is None:
            if s is None and t is None:
                return
            n_src = n + (0 if s is None else 1 + _count_rest(src_lines))
            n_tgt = n + (0 if t is None else 1 + _count_rest(tgt_lines))
            raise DataError(f"line counts differ: {src_path} has {n_src} lines, {tgt_path} has {n_tgt}")
        n += 1
        yield {"src": s, "tgt": t}


# --- loading every source into Dataset(src, tgt) ------------------------------------------------

def _get_field(example: Dict[str, Any], dotted: str) -> Any:
    value: Any = example
    for part in dotted.split("."):
        value = value[part]
    return value


def _field_names(features: Any, prefix: str = "") -> List[str]:
    """Every reachable (dotted) field of a datasets.Features, for error messages."""
    names = []
    for key, feature in features.items():
        names.append(prefix + key)
        sub = getattr(feature, "languages", None)  # datasets.Translation
        if isinstance(feature, dict):
            names += _field_names(feature, prefix + key + ".")
        elif sub:
            names += [f"{prefix}{key}.{lang}" for lang in sub]
    return names


def _select_fields(ds, src_field: str, tgt_field: str, where: str):
    """Dataset with columns src, tgt taken from (possibly nested) fields of `ds`."""
    available = _field_names(ds.features)
    for f in (src_field, tgt_field):
        if f not in available:
            raise DataError(f"{where}: no field {f!r}; available: {', '.join(available)}")

    def pick(batch: Dict[str, list]) -> Dict[str, list]:
        rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
        return {"src": [_get_field(r, src_field) for r in rows],
                "tgt": [_get_field(r, tgt_field) for r in rows]}

    return ds.map(pick, batched=True, batch_size=_CHUNK, remove_columns=ds.column_names,
                  desc="fields")


def _load_hub(cfg: DataConfig, split: str):
    """A Hub split through datasets' persistent cache (data.hub_cache_dir, default datasets' own,
    e.g. ~/.cache/huggingface/datasets): downloaded once, then prepared again offline
    (HF_DATASETS_OFFLINE=1)."""
    import datasets
    from datasets.exceptions import DatasetNotFoundError

    cache_dir = str(Path(cfg.hub_cache_dir).expanduser()) if cfg.hub_cache_dir else None
    try:
        ds = datasets.load_dataset(cfg.path, cfg.hub_config, split=split, cache_dir=cache_dir)
    except DatasetNotFoundError as e:
        raise DataError(f"Hub dataset {cfg.path!r} not found: {str(e).splitlines()[0]}") from None
    except Exception as e:  # unknown config or split (the message lists the available ones), a bad file
        raise unwrap_datasets_error(e, where=f"{_hub_name(cfg)}, split {split!r}") from None
    return _select_fields(ds, cfg.src_field or cfg.src_lang, cfg.tgt_field or cfg.tgt_lang, _hub_name(cfg))


def _hub_name(cfg: DataConfig) -> str:
    return f"Hub dataset {cfg.path}" + (f" ({cfg.hub_config})" if cfg.hub_config else "")


def _load_tsv(cfg: DataConfig, path: Path, cache_dir: str):
    import datasets

    if not count_lines(path):  # prepare names the empty file (pandas: "No columns to parse")
        return datasets.Dataset.from_dict({"src": [], "tgt": []})
    first = next(read_lines(path), "")
    columns = first.split("\t") if cfg.tsv_header else [str(i) for i in range(len(first.split("\t")))]
    features = datasets.Features({c: datasets.Value("string") for c in columns})
    try:
        ds = datasets.load_dataset(
            "csv", data_files={"split": str(path)}, split="split", cache_dir=cache_dir,
            delimiter="\t", quoting=3, header=0 if cfg.tsv_header else None,
            column_names=columns, features=features, keep_default_na=False, na_filter=False)
    except Exception as e:  # pandas' parser error (the root cause) carries the line number
        raise unwrap_datasets_error(e, str(path)) from None
    return _select_fields(ds, cfg.src_field or "0", cfg.tgt_field or "1", str(path))


def _load_jsonl(cfg: DataConfig, path: Path, cache_dir: str):
    import datasets

    rows = 0
    for number, line in enumerate(read_lines(path), start=1):
        if line.strip():
            rows += 1
            try:
                json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{number}: invalid JSON ({e.msg})") from None
    if not rows:  # prepare names the empty file
        return datasets.Dataset.from_dict({"src": [], "tgt": []})
    try:
        ds = datasets.load_dataset("json", data_files={"split": str(path)}, split="split",
                                   cache_dir=cache_dir)
    except Exception as e:
        raise unwrap_datasets_error(e, str(path)) from None
    return _select_fields(ds, cfg.src_field or cfg.src_lang, cfg.tgt_field or cfg.tgt_lang, str(path))


def _load_text(cfg: DataConfig, base: Path, split: str, cache_dir: str):
    """Two line-aligned files streamed, _CHUNK pairs at a time, into an Arrow file in cache_dir
    (memory-mapped when read back: the corpus is never a Python list of all its lines)."""
    import datasets
    from datasets.arrow_writer import ArrowWriter

    src = _find(base / f"{split}.{cfg.src_lang}")
    tgt = _find(base / f"{split}.{cfg.tgt_lang}")
    path = str(Path(cache_dir) / f"{split}.{cfg.src_lang}-{cfg.tgt_lang}.arrow")
    features = datasets.Features({"src": datasets.Value("string"), "tgt": datasets.Value("string")})
    with ArrowWriter(features=features, path=path) as writer:
        chunk: Dict[str, List[str]] = {"src": [], "tgt": []}
        for pair in _text_pairs(str(src), str(tgt)):
            chunk["src"].append(pair["src"])
            chunk["tgt"].append(pair["tgt"])
            if len(chunk["src"]) == _CHUNK:
                writer.write_batch(chunk)
                chunk = {"src": [], "tgt": []}
        writer.write_batch(chunk)
        writer.finalize()
    return datasets.Dataset.from_file(path)


def source_splits(cfg: DataConfig) -> Dict[str, str]:
    """Our split name -> the name to read: `local_splits` for a local copy, else `splits`."""
    if not cfg.local_dir:
        return dict(cfg.splits)
    names = dict(cfg.local_splits if cfg.local_splits is not None else cfg.splits)
    if set(names) != set(cfg.splits):
        raise DataError(f"data.local_splits names {sorted(names)}, data.splits names {sorted(cfg.splits)}: "
                        "they must name the same splits")
    for split, name in names.items():
        if "[" in name:
            raise DataError(f"data.local_splits.{split}={name!r} is not a file name in data.local_dir "
                            f"(set data.local_splits.{split}=<name of {name}.{cfg.src_lang}>)")
    return names


def load_source(cfg: DataConfig, split: str, cache_dir: str):
    """Dataset(src, tgt) for one source split name, from whichever source the config names."""
    if cfg.local_dir:
        base = resolve_path(cfg.local_dir)
        if not base.is_dir():
            raise DataError(f"data.local_dir: no such directory: {base}")
        return _load_text(cfg, base, split, cache_dir)
    if cfg.source == "hub":
        return _load_hub(cfg, split)
    base = resolve_path(cfg.path)
    if not base.is_dir():
        raise DataError(f"data.path: no such directory: {base}")
    if cfg.source == "text":
        return _load_text(cfg, base, split, cache_dir)
    if cfg.source == "tsv":
        return _load_tsv(cfg, _find(base / f"{split}.tsv"), cache_dir)
    return _load_jsonl(cfg, _find(base / f"{split}.jsonl"), cache_dir)


def describe_source(cfg: DataConfig, split: str) -> str:
    """What load_source reads for a split, for messages: both files, the file, or the Hub split."""
    if cfg.local_dir or cfg.source == "text":
        base = resolve_path(cfg.local_dir or cfg.path)
        return " and ".join(str(_find(base / f"{split}.{lang}")) for lang in (cfg.src_lang, cfg.tgt_lang))
    if cfg.source == "hub":
        return f"{_hub_name(cfg)}, split {split!r}"
    return str(_find(resolve_path(cfg.path) / f"{split}.{cfg.source}"))


# --- normalisation and filters (one path for every source) -------------------------------------

REASONS = ("kept", "empty", "too_long", "ratio", "duplicate")


def _process(batch: Dict[str, list], normalize_text: bool, apply_filters: bool, max_words: int,
             max_ratio: float, dedup: bool) -> Dict[str, list]:
    """One chunk of pairs: normalised text, a filter code per pair (REASONS; duplicates are
    found afterwards, across chunks) and, with dedup, a 64-bit key of the pair."""
    src, tgt = batch["src"], batch["tgt"]
    if normalize_text:
        src, tgt = [normalize(s) for s in src], [normalize(t) for t in tgt]
    else:
        src = [s.replace("\t", " ").replace("\n", " ") for s in src]
        tgt = [t.replace("\t", " ").replace("\n", " ") for t in tgt]
    reasons, keys = [], []
    for s, t in zip(src, tgt):
        ns, nt = len(s.split()), len(t.split())
        reason = 0
        if not apply_filters:
            pass
        elif ns == 0 or nt == 0:
            reason = 1
        elif max_words and max(ns, nt) > max_words:
            reason = 2
        elif max_ratio and max(ns, nt) > max_ratio * min(ns, nt):
            reason = 3
        reasons.append(reason)
        if dedup:
            keys.append(int.from_bytes(hashlib.blake2b(f"{s}\t{t}".encode(), digest_size=8).digest(),
                                       "little", signed=True))
    out = {"src": src, "tgt": tgt, "reason": reasons}
    if dedup:
        out["key"] = keys
    if not apply_filters:  # evaluation splits keep the untouched reference for scoring
        out["tgt_raw"] = batch["tgt"]
    return out


def workers(cfg: DataConfig, rows: int) -> int:
    """Processes for a pass over `rows` pairs: data.num_proc (0 = every core this process may
    use), but one for small splits, where starting processes costs more than it saves."""
    if rows < _PARALLEL_ROWS:
        return 1
    return cfg.num_proc or available_cores()


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _column(ds, name: str) -> np.ndarray:
    """A whole int column as one array (ds[name] would build it row by row: 3x the cleaning time)."""
    return np.asarray(ds.select_columns([name]).with_format("numpy")[:][name], dtype=np.int64)


def _clean(ds, cfg: DataConfig, apply_filters: bool) -> Tuple[Any, Dict[str, int]]:
    dedup = apply_filters and cfg.dedup
    n_proc = workers(cfg, len(ds))
    ds = ds.map(_process, batched=True, batch_size=_CHUNK, load_from_cache_file=False, num_proc=n_proc if n_proc > 1 else None,
                fn_kwargs={"normalize_text": cfg.normalize, "apply_filters": apply_filters, "max_words": cfg.max_words,
                           "max_ratio": cfg.max_ratio, "dedup": dedup},
                desc=f"prepare: cleaning {len(ds):,} pairs")
    codes = _column(ds, "reason")
    if dedup:  # a pair that passed the filters is a duplicate when an earlier one has its key
        kept = np.flatnonzero(codes == 0)
        keys = _column(ds, "key")[kept]
        first = np.zeros(len(kept), dtype=bool)
        first[np.unique(keys, return_index=True)[1]] = True
        codes[kept[~first]] = REASONS.index("duplicate")
        ds = ds.remove_columns("key")
    counts = np.bincount(codes, minlength=len(REASONS))
    stats = {"read": int(len(codes)), **{r: int(c) for r, c in zip(REASONS, counts)}}
    ds = ds.select(np.flatnonzero(codes == 0)).remove_columns("reason")
    return ds, stats


# --- the stage ----------------------------------------------------------------------------------

def fingerprint(cfg: DataConfig) -> str:
    """Hash of the config and of the local input files' names, sizes and mtimes."""
    settings = {k: v for k, v in to_container(cfg).items()  # where and how fast, not what
                if k not in ("hub_cache_dir", "num_proc")}
    parts: List[Any] = [FORMAT, settings]
    local = cfg.local_dir or (cfg.path if cfg.source != "hub" else None)
    if local and resolve_path(local).is_dir():
        for f in sorted(resolve_path(local).iterdir()):
            if f.is_file():
                st = f.stat()
                parts.append([f.name, st.st_size, int(st.st_mtime)])
    return rundir.fingerprint(parts)


def _empty_split(cfg: DataConfig, split: str, source_split: str) -> DataError:
    # here, not as an IndexError or "no data" inside SentencePiece: train, valid and test are all used
    key = "data.local_splits" if cfg.local_dir and cfg.local_splits is not None else "data.splits"
    return DataError(f"{describe_source(cfg, source_split)}: empty, no sentence pairs for the {split} split: "
                     f"fill it or point {key}.{split} at other data")


def _all_filtered(cfg: DataConfig, split: str, source_split: str, stats: Dict[str, int]) -> DataError:
    keys = {"too_long": f"data.max_words={cfg.max_words}", "ratio": f"data.max_ratio={cfg.max_ratio}",
            "duplicate": f"data.dedup={str(cfg.dedup).lower()}"}
    counts = ", ".join([f"empty side: {stats['empty']}"] + [f"{keys[r]}: {stats[r]}" for r in keys])
    relax = [keys[r].split("=")[0] for r in ("too_long", "ratio") if stats[r]]
    advice = (f"relax {' or '.join(relax)} (0 = off)" if relax
              else "every pair has an empty side: check the files")
    return DataError(f"{describe_source(cfg, source_split)}: no {split} pairs left after the filters, "
                     f"0 of {stats['read']} kept (removed by {counts}); {advice}")


def prepare(cfg: DataConfig, out_dir: Path, force: bool = False) -> Dict[str, Any]:
    """Load, normalise, filter and save every split; returns (and writes) the statistics."""
    import datasets

    show_progress(datasets)
    out_dir = Path(out_dir)
    stamp, splits = fingerprint(cfg), source_splits(cfg)
    stamp_file = out_dir / rundir.DATA_STAMP  # stats.json: the counts are the stamp's record
    if not force and rundir.is_done(stamp_file, stamp):
        log.info("prepare: up to date (%s), skipped", out_dir)
        return rundir.read_stamp(stamp_file)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    all_stats: Dict[str, Dict[str, int]] = {}  # split -> its filter counts
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".cache-") as cache_dir:
        for split, source_split in splits.items():
            ds = load_source(cfg, source_split, cache_dir)
            if len(ds) == 0:
                raise _empty_split(cfg, split, source_split)
            ds, split_stats = _clean(ds, cfg, apply_filters=split in cfg.filter_splits)
            if split_stats["kept"] == 0:
                raise _all_filtered(cfg, split, source_split, split_stats)
            ds.save_to_disk(str(out_dir / split))
            all_stats[split] = split_stats
            removed = ", ".join(f"{r} {split_stats[r]}" for r in REASONS[1:] if split_stats[r])
            log.info("prepare: %s: %d pairs kept of %d%s", split, split_stats["kept"],
                     split_stats["read"], f" (removed: {removed})" if removed else "")
    return rundir.write_stamp(stamp_file, stamp, splits=all_stats)  # last: the stage is done


def show_progress(datasets) -> None:
    """datasets' progress bars on a terminal (a 2 M pair corpus takes minutes); none in logs,
    whose lines carry the counts."""
    import sys

    if sys.stderr.isatty():
        datasets.enable_progress_bars()
    else:
        datasets.disable_progress_bars()


def load_split(data_dir: Path, split: str):
    """The prepared split as a memory-mapped datasets.Dataset (columns src, tgt)."""
    import datasets

    path = Path(data_dir) / split
    if not path.is_dir():
        raise DataError(f"no prepared split {split!r} in {data_dir}: run the prepare stage")
    return datasets.load_from_disk(str(path))
