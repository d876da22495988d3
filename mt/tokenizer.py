"""The tokenizer stage: SentencePiece models, and the corpus encoded once into id arrays.

    tok = train_tokenizer(cfg.tokenizer, run.data, run.tokenizer)  # skipped when its stamp matches
    corpus = IdCorpus(run.ids, "train")                             # memory-mapped ids; run: mt.rundir.RunDir

The special ids are defined here, once, for the whole package. Models are trained with
SentencePiece's `identity` normalisation because `mt.data.normalize` already ran, and with byte
fallback so that every character survives: `decode(encode(x)) == x` for normalised `x`.
"""
from __future__ import annotations

import hashlib
import io
import itertools
import logging
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence

import numpy as np
import sentencepiece as spm

from mt import rundir
from mt.config import TokenizerConfig, to_container
from mt.data import DataError

log = logging.getLogger(__name__)

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
SPECIAL_PIECES = {"pad_piece": "<pad>", "unk_piece": "<unk>", "bos_piece": "<s>", "eos_piece": "</s>"}
# SentencePiece's pieces and scores depend on its thread count (1 thread against 2 differ in
# most scores on Multi30k), so a fixed count (SentencePiece's default), not the machine's cores:
# the same data and settings give the same model bytes on every machine and in every clone, and
# models trained there can be ensembled and averaged (mt.checkpoint compares tokenizer bytes).
SPM_THREADS = 16


class TokenizerError(ValueError):
    """SentencePiece cannot train with these settings on this data; one line naming the key."""


class Tokenizer:
    """Source and target SentencePiece processors (the same object when joint)."""

    def __init__(self, src_proto: bytes, tgt_proto: Optional[bytes] = None):
        self.src_proto, self.tgt_proto = src_proto, tgt_proto if tgt_proto is not None else src_proto
        self.joint = tgt_proto is None or tgt_proto == src_proto
        self.src = spm.SentencePieceProcessor(model_proto=self.src_proto)
        self.tgt = self.src if self.joint else spm.SentencePieceProcessor(model_proto=self.tgt_proto)
        for sp in (self.src, self.tgt):
            ids = (sp.pad_id(), sp.unk_id(), sp.bos_id(), sp.eos_id())
            if ids != (PAD_ID, UNK_ID, BOS_ID, EOS_ID):
                raise ValueError(f"SentencePiece model has special ids {ids}, mt needs "
                                 f"{(PAD_ID, UNK_ID, BOS_ID, EOS_ID)} (pad, unk, bos, eos)")

    @classmethod
    def from_dir(cls, path: Path) -> "Tokenizer":
        path = Path(path)
        if (path / "spm.model").is_file():
            return cls((path / "spm.model").read_bytes())
        if (path / "src.model").is_file():
            return cls((path / "src.model").read_bytes(), (path / "tgt.model").read_bytes())
        raise FileNotFoundError(f"no SentencePiece model in {path}: run the tokenizer stage")

    @property
    def src_vocab_size(self) -> int:
        return self.src.get_piece_size()

    @property
    def tgt_vocab_size(self) -> int:
        return self.tgt.get_piece_size()

    def fingerprint(self) -> str:
        """Identifies the vocabulary: a checkpoint records it and refuses a different one."""
        h = hashlib.sha256(self.src_proto)
        h.update(self.tgt_proto)
        return h.hexdigest()[:16]

    def checkpoint_record(self) -> Dict[str, Any]:
        """What a checkpoint keeps of the tokenizer: its models (Translator.from_path rebuilds it
        from them), fingerprint and vocabulary sizes (checked against the weights on load)."""
        return {"src": self.src_proto, "tgt": self.tgt_proto, "fingerprint": self.fingerprint(),
                "src_vocab": self.src_vocab_size, "tgt_vocab": self.tgt_vocab_size}

    def encode_src(self, lines: Sequence[str]) -> List[List[int]]:
        return self.src.encode(list(lines), out_type=int)

    def encode_tgt(self, lines: Sequence[str]) -> List[List[int]]:
        return self.tgt.encode(list(lines), out_type=int)

    def decode_tgt(self, ids: Sequence[int]) -> str:
        """Detokenise target ids; specials (pad/bos/eos) are dropped, never printed."""
        return self.tgt.decode([i for i in ids if i > EOS_ID or i == UNK_ID])

    def tgt_pieces(self, ids: Sequence[int]) -> List[str]:
        return [self.tgt.id_to_piece(int(i)) for i in ids]

    def src_pieces(self, ids: Sequence[int]) -> List[str]:
        return [self.src.id_to_piece(int(i)) for i in ids]


def _train_model(cfg: TokenizerConfig, sentences: Iterator[str], path: Path, where: str) -> None:
    first = next(sentences, None)
    if first is None:  # prepare refuses empty splits; SentencePiece would say only "no data"
        raise DataError(f"{where}: no sentences to train SentencePiece on: run the prepare stage again (force=true)")
    spm.set_random_generator_seed(cfg.seed)  # input sampling is reproducible
    model = io.BytesIO()  # written by us, so the model records no path (model_prefix stays empty)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=itertools.chain([first], sentences), model_writer=model,
            model_type=cfg.model_type, vocab_size=cfg.vocab_size, character_coverage=cfg.character_coverage,
            byte_fallback=cfg.byte_fallback and cfg.model_type in ("bpe", "unigram"),
            input_sentence_size=cfg.input_sentence_size, shuffle_input_sentence=True,
            normalization_rule_name="identity", remove_extra_whitespaces=False,
            pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, **SPECIAL_PIECES,
            hard_vocab_limit=False, num_threads=SPM_THREADS,
            minloglevel=2, train_extremely_large_corpus=False)
    except RuntimeError as e:  # the data and the vocabulary do not fit: the user's to fix
        raise TokenizerError(f"tokenizer.vocab_size={cfg.vocab_size}: SentencePiece cannot train "
                             f"{path.name} on {where}: {_spm_reason(e)}") from None
    rundir.write_bytes_atomic(path, model.getvalue())


def _spm_reason(e: RuntimeError) -> str:
    """SentencePiece's own sentence, without the C++ file and condition in front of it:
    'INTERNAL: src/trainer_interface.cc(638) [(...) <= (...)] Vocabulary size is smaller ...'."""
    text = " ".join(str(e).split())
    return re.sub(r"^\w+: \S+\(\d+\) \[.*?\] ", "", text) or text


def _sentences(ds, columns: Sequence[str]) -> Iterator[str]:
    for batch in ds.iter(batch_size=10_000):
        for column in columns:
            yield from (s for s in batch[column] if s)


# --- encoded corpus: flat int32 ids + per-sentence lengths, memory-mapped ----------------------

class IdCorpus:
    """Pre-encoded split: `src(i)`, `tgt(i)` give int32 id arrays (no BOS/EOS added)."""

    def __init__(self, ids_dir: Path, split: str):
        self.split = split
        self._data, self._offsets, self.lengths = {}, {}, {}
        for side in ("src", "tgt"):
            lengths = np.load(Path(ids_dir) / f"{split}.{side}.len.npy")
            self.lengths[side] = lengths
            self._offsets[side] = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
            bin_path = Path(ids_dir) / f"{split}.{side}.bin"
            size = bin_path.stat().st_size
            self._data[side] = (np.memmap(bin_path, dtype=np.int32, mode="r") if size
                                else np.zeros(0, dtype=np.int32))

    def __len__(self) -> int:
        return len(self.lengths["src"])

    def src(self, i: int) -> np.ndarray:
        o = self._offsets["src"]
        return self._data["src"][o[i]:o[i + 1]]

    def tgt(self, i: int) -> np.ndarray:
        o = self._offsets["tgt"]
        return self._data["tgt"][o[i]:o[i + 1]]


def encode_corpus(tok: Tokenizer, ds, ids_dir: Path, split: str) -> int:
    """Encode a prepared split chunk by chunk into ids_dir/<split>.{src,tgt}.{bin,len.npy}
    (SentencePiece encodes each chunk on every core; a bar on a terminal shows the progress)."""
    from tqdm import tqdm

    ids_dir.mkdir(parents=True, exist_ok=True)
    lengths: Dict[str, List[np.ndarray]] = {"src": [], "tgt": []}
    bar = tqdm(total=len(ds), unit="pairs", unit_scale=True, desc=f"tokenizer: encoding {split}",
               file=sys.stderr, disable=not sys.stderr.isatty() or len(ds) < 100_000)
    with open(ids_dir / f"{split}.src.bin", "wb") as fs, open(ids_dir / f"{split}.tgt.bin", "wb") as ft, bar:
        for batch in ds.iter(batch_size=10_000):
            for side, f, encode in (("src", fs, tok.encode_src), ("tgt", ft, tok.encode_tgt)):
                ids = encode(batch[side])
                lengths[side].append(np.fromiter(map(len, ids), dtype=np.int32, count=len(ids)))
                f.write(np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32).tobytes())
            bar.update(len(batch["src"]))
    for side in ("src", "tgt"):
        arr = np.concatenate(lengths[side]) if lengths[side] else np.zeros(0, dtype=np.int32)
        np.save(ids_dir / f"{split}.{side}.len.npy", arr)
    return len(ds)


# --- the stage ----------------------------------------------------------------------------------

def fingerprint(cfg: TokenizerConfig, data_fingerprint: str) -> str:
    """The settings and the prepared data they are trained on (prepare's own fingerprint)."""
    return rundir.fingerprint([to_container(cfg), data_fingerprint])


def train_tokenizer(cfg: TokenizerConfig, data_dir: Path, out_dir: Path, force: bool = False) -> Tokenizer:
    """Train the SentencePiece model(s) on the prepared train split and encode every split."""
    from mt.data import load_split

    data_stats = rundir.read_stamp(Path(data_dir) / rundir.DATA_STAMP)
    if data_stats is None:
        raise FileNotFoundError(f"{data_dir} holds no finished prepare stage: run the prepare stage first")
    stamp = fingerprint(cfg, data_stats["fingerprint"])
    out_dir = Path(out_dir)
    if not force and rundir.is_done(out_dir / rundir.TOKENIZER_STAMP, stamp):
        tok = Tokenizer.from_dir(out_dir)
        log.info("tokenizer: up to date (%s), skipped; vocabulary %d", out_dir, tok.src_vocab_size)
        return tok
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    train = load_split(data_dir, "train")
    sides = 2 if cfg.joint else 1
    sample = min(cfg.input_sentence_size or sides * len(train), sides * len(train))
    log.info("tokenizer: training SentencePiece %s (%s) on %s of %s sentences", cfg.model_type,
             "joint" if cfg.joint else "one per side", f"{sample:,}", f"{sides * len(train):,}")
    where = f"the train split in {data_dir}"
    if cfg.joint:
        _train_model(cfg, _sentences(train, ["src", "tgt"]), out_dir / "spm.model", where)
    else:
        _train_model(cfg, _sentences(train, ["src"]), out_dir / "src.model", f"{where} (source side)")
        _train_model(cfg, _sentences(train, ["tgt"]), out_dir / "tgt.model", f"{where} (target side)")
    tok = Tokenizer.from_dir(out_dir)
    vocab = (f"{tok.src_vocab_size} (joint)" if tok.joint
             else f"source {tok.src_vocab_size}, target {tok.tgt_vocab_size}")
    log.info("tokenizer: %s %s model, vocabulary %s", cfg.model_type,
             "joint" if cfg.joint else "separate", vocab)
    counts = {}
    for split in data_stats["splits"]:
        counts[split] = encode_corpus(tok, load_split(data_dir, split), out_dir / rundir.IDS, split)
        lengths = np.load(out_dir / rundir.IDS / f"{split}.tgt.len.npy")
        log.info("tokenizer: %s: %d pairs encoded, %d target pieces", split, counts[split],
                 int(lengths.sum()))
    rundir.write_stamp(out_dir / rundir.TOKENIZER_STAMP, stamp,  # last: its presence means done
                       src_vocab_size=tok.src_vocab_size, tgt_vocab_size=tok.tgt_vocab_size,
                       joint=tok.joint, pairs=counts)
    return tok
