"""Typed configuration: one small dataclass per component, registered with Hydra.

The dataclasses below are the single source of truth for every key and default. Choice fields are
annotated with ``Literal[...]``. OmegaConf 2.3 (the version Hydra 1.3 requires) cannot validate
``Literal``, so the schema handed to Hydra is a mirror of these classes with ``Literal`` replaced by
``str``, and :func:`validate` checks the choices, and every number's range (``RANGES``), after
composition. Struct mode comes with the structured schema, so a misspelled key fails at
composition with Hydra's message naming it.

    cfg = compose_config(["recipe=multi30k_en_de", "tokenizer.vocab_size=4000"])   # tests
    mt-train recipe=multi30k_en_de tokenizer.vocab_size=4000                      # shell
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional

from omegaconf import DictConfig, ListConfig, OmegaConf

# The config groups ship inside the package (a wheel holds real files); in a clone mt/conf is a
# link to the top-level conf/, whose recipe group is itself a link to recipes/: people read and
# edit conf/ and recipes/, and an installed package finds the same files next to its modules.
CONF_DIR = Path(__file__).resolve().parent / "conf"
STAGES = ("prepare", "tokenizer", "train", "translate", "score")


class ConfigError(ValueError):
    """A configuration value or combination that cannot work; the message names the key."""


@dataclass
class DataConfig:
    name: str = "multi30k_en_de"
    # Where the pairs come from. text: <path>/<split>.<lang>[.gz]; tsv: <path>/<split>.tsv[.gz];
    # jsonl: <path>/<split>.jsonl[.gz]; hub: datasets.load_dataset(path, hub_config, split=...).
    source: Literal["text", "tsv", "jsonl", "hub"] = "text"
    path: str = "builtin:multi30k"  # "builtin:NAME" = a corpus shipped inside the package
    hub_config: Optional[str] = None
    # Where Hub downloads are kept; null = datasets' own cache (HF_DATASETS_CACHE, by default
    # ~/.cache/huggingface/datasets). Either way persistent: a second prepare works offline.
    hub_cache_dir: Optional[str] = None
    # Read plain text files <local_dir>/<split>.<lang>[.gz] instead of `path` (any source): lets a
    # Hub recipe run offline from a local copy, whose split names are `local_splits`.
    local_dir: Optional[str] = None
    src_lang: str = "en"
    tgt_lang: str = "de"
    # Column of each side for hub/tsv/jsonl; dotted paths reach into dicts ("translation.en").
    # Default: the language code (jsonl/hub) or the column index "0" / "1" (tsv without header).
    src_field: Optional[str] = None
    tgt_field: Optional[str] = None
    tsv_header: bool = False
    # Our split name -> the source's split name (hub split syntax such as "train[:2000]" works).
    splits: Dict[str, str] = field(
        default_factory=lambda: {"train": "train", "valid": "valid", "test": "test2016"})
    # Our split name -> file name in local_dir; null = the same as `splits` (a text source's
    # names). Hub data configs set it, since Hub split slices such as "train[5000:]" are no files.
    local_splits: Optional[Dict[str, str]] = None
    normalize: bool = True  # NFC, no-break/zero-width spaces, whitespace runs, trimming
    max_words: int = 200  # drop pairs with a longer side (whitespace words); 0 = off
    max_ratio: float = 4.0  # drop pairs whose word-count ratio exceeds this; 0 = off
    dedup: bool = False  # drop exact duplicate pairs
    # Filters change what a split contains, so by default only the training data is filtered:
    # dropping test lines would change the BLEU that gets reported.
    filter_splits: List[str] = field(default_factory=lambda: ["train"])
    # Processes that clean a large split (and threads that encode it); 0 = every core.
    num_proc: int = 0


@dataclass
class TokenizerConfig:
    joint: bool = True  # one model for both sides (required for model.tie_embeddings=all)
    model_type: Literal["bpe", "unigram", "char", "word"] = "unigram"
    vocab_size: int = 8000  # per model
    character_coverage: float = 1.0
    byte_fallback: bool = True  # rare characters become byte pieces: decode(encode(x)) == x
    input_sentence_size: int = 2_000_000  # sample this many sentences to train on; 0 = all
    seed: int = 1234


@dataclass
class ModelConfig:
    cell: Literal["gru", "lstm", "rnn_tanh", "rnn_relu"] = "gru"
    emb_size: int = 256
    enc_hidden: int = 256  # per direction
    enc_layers: int = 1
    bidirectional: bool = True
    decoder: Literal["bahdanau", "luong"] = "bahdanau"  # where attention sits in the step
    dec_hidden: int = 512
    dec_layers: int = 1
    # bahdanau = additive (MLP); dot / general / concat = Luong's score functions
    attention: Literal["bahdanau", "dot", "general", "concat"] = "bahdanau"
    attn_size: int = 256  # hidden size of additive scores (bahdanau, concat)
    input_feeding: bool = True  # luong decoder: feed the previous attentional vector
    bridge: Literal["bridge", "zeros"] = "bridge"
    tie_embeddings: Literal["none", "decoder", "all"] = "none"
    dropout: float = 0.3  # between layers and before the output layer
    emb_dropout: float = 0.2
    # Word dropout (training only): each source and target input piece becomes <unk> with this
    # probability, so the model cannot lean on any one piece (Sennrich & Zhang 2019 for
    # low-resource RNNs). The reference the loss scores is never changed.
    word_dropout: float = 0.0


@dataclass
class TrainConfig:
    optimizer: Literal["adam", "adamw"] = "adam"
    lr: float = 1e-3
    betas: List[float] = field(default_factory=lambda: [0.9, 0.98])
    weight_decay: float = 0.0
    schedule: Literal["constant", "plateau", "inverse_sqrt"] = "plateau"
    warmup_steps: int = 0
    plateau_factor: float = 0.5
    plateau_patience: int = 2  # validations without improvement before the lr drops
    min_lr: float = 1e-5
    label_smoothing: float = 0.1
    clip_norm: float = 1.0  # 0 = off
    batch_tokens: int = 4096  # padded tokens (the longer side) per batch
    batch_size: int = 0  # > 0: fixed sentences per batch instead of batch_tokens
    bucket_batches: int = 100  # sort within pools of this many batches (less padding)
    accum_steps: int = 1
    max_len: int = 128  # training pairs with a longer side (in pieces) are skipped
    max_steps: int = 0  # 0 = no limit (likewise below)
    max_epochs: int = 0
    max_time: float = 0.0  # minutes of training, summed over resumes
    valid_every: int = 1000
    valid_max_sentences: int = 0  # 0 = the whole valid split
    valid_metric: Literal["bleu", "chrf", "loss"] = "bleu"
    patience: int = 0  # validations without improvement before stopping; 0 = off
    # > 1: keep the weights of the last N validations; when training stops, validate their
    # average and make it best.pt if it scores better (fairseq's average_checkpoints.py)
    average_last: int = 0
    # non-finite losses or gradients in a row before the run stops (each such update is skipped)
    max_nonfinite: int = 5
    # full checkpoints (with optimizer state) of the latest validations kept as step_*.pt besides last.pt;
    # resume falls back to them when last.pt cannot be read (at least train.average_last are kept)
    keep_checkpoints: int = 2
    # Scheduled sampling: probability of feeding the reference token, decaying over steps.
    teacher_forcing: float = 1.0
    tf_schedule: Literal["constant", "linear", "exponential", "inverse_sigmoid"] = "constant"
    tf_min: float = 0.0
    tf_decay_steps: int = 10000
    # auto: bf16 autocast where it is faster (CUDA with bf16; CPUs whose bf16 matrix products
    # measure at least 1.5x float32, e.g. with AMX), else fp32
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "fp32"
    # Hand-written backward passes (the same functions as autograd's path, tested against it):
    # the decoder's loop over steps (mt/decoder_loop.py; one-layer decoders that need a loop) and
    # the output layer + loss (mt/loss.py). auto = handwritten on CPU, where BENCHMARKS.md measures
    # them paying; autograd elsewhere (unmeasured there).
    decoder_backward: Literal["auto", "autograd", "handwritten"] = "auto"
    loss_backward: Literal["auto", "autograd", "handwritten"] = "auto"
    deterministic: bool = False
    threads: int = 0  # torch intra-op threads; 0 = torch's default
    log_every: int = 100


@dataclass
class DecodeConfig:
    method: Literal["greedy", "beam", "sample"] = "beam"
    beam_size: int = 5
    alpha: float = 0.6  # GNMT length penalty ((5 + len) / 6) ** alpha
    max_len_a: float = 1.5  # output at most a * src_len + b tokens
    max_len_b: int = 10
    n_best: int = 1
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 1234
    batch_size: int = 64  # sentences per batch
    min_len: int = 0  # > 0: EOS is blocked before this many tokens (benchmarks force a fixed length)
    # Speed options, each with its measured BLEU cost in BENCHMARKS.md; mt-translate's --int8,
    # --bf16 and --shortlist override them.
    int8: bool = False  # int8 dynamic quantization of every matrix product (CPU)
    bf16: bool = False  # bf16 matrix products under autocast, attention in float32 (pays with AMX)
    shortlist: int = 0  # score only the N most frequent target pieces + likely translations of the source's; 0 = off


@dataclass
class Config:
    name: str = "default"  # run directory: runs/<name>
    stages: List[str] = field(default_factory=lambda: list(STAGES))
    force: bool = False  # redo stages whose outputs already exist
    # Prepared splits and tokenizers, keyed by their fingerprints: runs and multirun jobs with the
    # same data and tokenizer settings share one copy (runs/<name>/data and /tokenizer link here).
    # Relative to the folder mt-train is started in.
    cache_dir: str = "runs/.cache"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 1234
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)


# --- allowed ranges ---------------------------------------------------------------------------
# Every int and float key (a list: each of its values), in interval notation: [ ] includes the
# bound, ( ) excludes it, "A or B" allows either. structured() and validate() refuse a value
# outside, naming key, value and range, so the loop never divides by a 0 nobody meant; a
# numeric key without an entry fails tests/test_config.py.
SEED = "[0, 4294967295]"  # SentencePiece takes a uint32 seed; numpy and torch accept the same
RANGES: Dict[str, str] = {
    "seed": SEED,
    "data.max_words": "[0, inf)",  # 0 = off
    "data.max_ratio": "0 or [1, inf)",  # 0 = off; a ratio below 1 would drop every pair
    "data.num_proc": "[0, inf)",  # 0 = every core
    # 4 special pieces, the word boundary and one character (more with byte_fallback: _tokenizer_rules)
    "tokenizer.vocab_size": "[6, inf)",
    "tokenizer.character_coverage": "(0, 1]",
    "tokenizer.input_sentence_size": "[0, inf)",  # 0 = all
    "tokenizer.seed": SEED,
    "model.emb_size": "[1, inf)", "model.enc_hidden": "[1, inf)", "model.enc_layers": "[1, inf)",
    "model.dec_hidden": "[1, inf)", "model.dec_layers": "[1, inf)", "model.attn_size": "[1, inf)",
    "model.dropout": "[0, 1)", "model.emb_dropout": "[0, 1)", "model.word_dropout": "[0, 1)",  # 1 would drop everything
    # no upper bound: a diverging lr is the training loop's business (it stops on non-finite losses)
    "train.lr": "(0, inf)", "train.betas": "[0, 1)", "train.weight_decay": "[0, inf)",
    "train.warmup_steps": "[0, inf)", "train.min_lr": "[0, inf)",
    "train.plateau_factor": "(0, 1]", "train.plateau_patience": "[0, inf)",
    "train.label_smoothing": "[0, 1)",  # 1 would leave no mass on the reference
    "train.clip_norm": "[0, inf)",  # 0 = off
    "train.batch_tokens": "[0, inf)", "train.batch_size": "[0, inf)",  # one of them > 0: _train_rules
    "train.bucket_batches": "[1, inf)", "train.accum_steps": "[1, inf)",
    "train.max_len": "[2, inf)",  # a side is its pieces + EOS: 2 holds a one-piece sentence
    "train.max_steps": "[0, inf)", "train.max_epochs": "[0, inf)", "train.max_time": "[0, inf)",  # 0 = no limit
    "train.valid_every": "[1, inf)", "train.valid_max_sentences": "[0, inf)", "train.patience": "[0, inf)",
    "train.average_last": "[0, inf)", "train.max_nonfinite": "[1, inf)", "train.keep_checkpoints": "[0, inf)",
    "train.teacher_forcing": "[0, 1]", "train.tf_min": "[0, 1]",  # probabilities
    "train.tf_decay_steps": "[1, inf)",
    "train.threads": "[0, inf)",  # 0 = torch's default
    "train.log_every": "[1, inf)",
    "decode.beam_size": "[1, inf)", "decode.n_best": "[1, inf)", "decode.alpha": "[0, inf)",
    "decode.max_len_a": "[0, inf)", "decode.max_len_b": "[0, inf)",  # room for a token: _decode_rules
    "decode.temperature": "(0, inf)",
    "decode.top_k": "[0, inf)",  # 0 = off
    "decode.top_p": "(0, 1]",  # 1 = off
    "decode.seed": SEED, "decode.batch_size": "[1, inf)", "decode.min_len": "[0, inf)",
    "decode.shortlist": "[0, inf)",  # 0 = off
}
# SentencePiece adds 256 byte pieces for byte_fallback (bpe and unigram models only).
BYTE_FALLBACK_MIN_VOCAB = 4 + 256 + 2


def _intervals(text: str) -> List[tuple]:
    """'[0, 1)' -> [(True, '0', '1', False)]; '0 or [1, inf)' -> a point and an interval."""
    out = []
    for part in text.split(" or "):
        if part[0] not in "[(":  # a single value
            part = f"[{part}, {part}]"
        lo, hi = (bound.strip() for bound in part[1:-1].split(","))
        out.append((part[0] == "[", lo, hi, part[-1] == "]"))
    return out


def _in_range(value: float, text: str) -> bool:
    """Whether value lies in the range `text` (RANGES notation); NaN lies in none."""
    for lo_closed, lo, hi, hi_closed in _intervals(text):
        low, high = float(lo), float(hi)
        if (low < value or lo_closed and value == low) and (value < high or hi_closed and value == high):
            return True
    return False


def _describe(text: str) -> str:
    """'[1, inf)' -> '>= 1', '(0, inf)' -> '> 0', '[0, 1)' -> 'in [0, 1)', for messages."""
    words = []
    for lo_closed, lo, hi, hi_closed in _intervals(text):
        if lo == hi:
            words.append(lo)
        elif hi == "inf":
            words.append((">= " if lo_closed else "> ") + lo)
        else:
            words.append(f"in {'[' if lo_closed else '('}{lo}, {hi}{']' if hi_closed else ')'}")
    return " or ".join(words)


def _check_range(key: str, value: Any) -> None:
    values = list(enumerate(value)) if isinstance(value, (list, ListConfig)) else [(None, value)]
    for i, v in values:
        # bool is an int subclass but no number here; a wrong type is OmegaConf's message already
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if not _in_range(v, RANGES[key]):
            name = key if i is None else f"{key}[{i}]"
            raise ConfigError(f"{name}={v} is out of range: must be {_describe(RANGES[key])}")


# --- Hydra registration -----------------------------------------------------------------------

def _omegaconf_mirror(cls: type, cache: dict) -> type:
    """The same dataclass with Literal[...] fields typed as str (OmegaConf 2.3 has no Literal)."""
    if cls in cache:
        return cache[cls]
    hints = typing.get_type_hints(cls)
    fields = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if typing.get_origin(tp) is Literal:
            tp = str
        elif dataclasses.is_dataclass(tp):
            tp = _omegaconf_mirror(tp, cache)
        default = f.default_factory if f.default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(hints[f.name]):
            default = _omegaconf_mirror(hints[f.name], cache)
        spec = field(default_factory=default) if default else field(default=f.default)
        fields.append((f.name, tp, spec))
    cache[cls] = dataclasses.make_dataclass(cls.__name__, fields)
    return cache[cls]


def structured(obj: Any) -> DictConfig:
    """A typed, struct-mode DictConfig from a config dataclass instance (for code and tests)."""
    cls = type(obj)
    node = OmegaConf.structured(_omegaconf_mirror(cls, {}))
    for key, value in dataclasses.asdict(obj).items():
        node[key] = value  # assignment, not merge: a dict value replaces the default dict
    _check_node(cls, node, _prefix(cls))
    return node


def _prefix(cls: type) -> str:
    """'decode.' for DecodeConfig (its place in Config): messages and RANGES use full keys."""
    hints = typing.get_type_hints(Config)
    return next((f.name + "." for f in dataclasses.fields(Config) if hints[f.name] is cls), "")


def register_configs() -> None:
    """Publish the schema as `base_config`; conf/config.yaml lists it first in its defaults."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="base_config", node=_omegaconf_mirror(Config, {}))


def _check_node(cls: type, node: Any, prefix: str) -> None:
    """Unknown keys, choices, ranges, then the component's own rules (_RULES), depth first."""
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(node.keys()) - set(hints) - {"hydra"})
    if unknown:  # struct mode stops typos, but `+key=value` deliberately bypasses it
        raise ConfigError(f"unknown key {prefix}{unknown[0]}; {prefix.rstrip('.') or 'the config'} has: "
                          f"{', '.join(hints)}")
    for f in dataclasses.fields(cls):
        tp, key, value = hints[f.name], prefix + f.name, node[f.name]
        if typing.get_origin(tp) is Literal and value not in typing.get_args(tp):
            choices = ", ".join(typing.get_args(tp))
            raise ConfigError(f"{key}={value!r} is not one of: {choices}")
        if key in RANGES:
            _check_range(key, value)
        if dataclasses.is_dataclass(tp):
            _check_node(tp, value, key + ".")
    if cls in _RULES:
        _RULES[cls](node, prefix)


# Rules within one component run wherever the component is checked: mt-translate builds a
# DecodeConfig with structured(), mt-train composes the whole Config.
def _tokenizer_rules(t: Any, prefix: str) -> None:
    if t.byte_fallback and t.model_type in ("bpe", "unigram") and t.vocab_size < BYTE_FALLBACK_MIN_VOCAB:
        raise ConfigError(f"{prefix}vocab_size={t.vocab_size} is out of range: must be >= "
                          f"{BYTE_FALLBACK_MIN_VOCAB} with {prefix}byte_fallback=true (256 byte pieces "
                          f"besides the 4 special ones, the word boundary and a character)")


def _train_rules(t: Any, prefix: str) -> None:
    if len(t.betas) != 2:
        raise ConfigError(f"{prefix}betas={list(t.betas)} needs 2 values (Adam's beta1 and beta2)")
    if t.batch_tokens < 1 and t.batch_size < 1:
        raise ConfigError(f"set {prefix}batch_tokens or {prefix}batch_size to a positive number")


def _decode_rules(d: Any, prefix: str) -> None:
    # mt.search.max_lengths caps an output at floor(a * source pieces + b) tokens, EOS included
    if d.max_len_a + d.max_len_b < 2:
        raise ConfigError(f"{prefix}max_len_a={d.max_len_a} with {prefix}max_len_b={d.max_len_b} leaves a "
                          "one-piece source no token (the cap floor(a * pieces + b) counts EOS): "
                          "need max_len_a + max_len_b >= 2")


_RULES = {TokenizerConfig: _tokenizer_rules, TrainConfig: _train_rules, DecodeConfig: _decode_rules}


def validate(cfg: DictConfig) -> DictConfig:
    """Check choices, ranges and cross-field rules; raise ConfigError naming the key. Returns cfg."""
    _check_node(Config, cfg, "")
    for stage in cfg.stages:
        if stage not in STAGES:
            raise ConfigError(f"stages: unknown stage {stage!r}; known: {', '.join(STAGES)}")
    m, t = cfg.model, cfg.tokenizer
    if m.tie_embeddings == "all" and not t.joint:
        raise ConfigError("model.tie_embeddings=all needs tokenizer.joint=true (one vocabulary)")
    if m.attention == "dot":
        enc_out = m.enc_hidden * (2 if m.bidirectional else 1)
        if enc_out != m.dec_hidden:
            raise ConfigError(
                f"model.attention=dot needs encoder outputs ({enc_out}) == model.dec_hidden "
                f"({m.dec_hidden}); use attention=general or change the sizes")
    # Here, not in _decode_rules: mt-translate --sample --n-best 5 draws 5 samples with beam_size 1.
    if cfg.decode.n_best > cfg.decode.beam_size:
        raise ConfigError(f"decode.n_best={cfg.decode.n_best} exceeds decode.beam_size={cfg.decode.beam_size}")
    return cfg


def compose_config(overrides: Optional[List[str]] = None, config_name: str = "config") -> DictConfig:
    """Compose conf/config.yaml with overrides, as `mt-train` would (used by tests and tools)."""
    from hydra import compose, initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=list(overrides or []))
    return validate(cfg)


def to_container(cfg: Any) -> Any:
    """Plain dicts/lists (for JSON, checkpoints and fingerprints)."""
    if isinstance(cfg, (DictConfig, ListConfig)):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg
