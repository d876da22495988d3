"""Typed configuration: one small dataclass per component, registered with Hydra.

The dataclasses below are the single source of truth for every key and default. Choice fields are
annotated with ``Literal[...]``. OmegaConf 2.3 (the version Hydra 1.3 requires) cannot validate
``Literal``, so the schema handed to Hydra is a mirror of these classes with ``Literal`` replaced by
``str``, and :func:`validate` checks the choices after composition. Struct mode comes with the
structured schema, so a misspelled key fails at composition with Hydra's message naming it.

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
    # Scheduled sampling: probability of feeding the reference token, decaying over steps.
    teacher_forcing: float = 1.0
    tf_schedule: Literal["constant", "linear", "exponential", "inverse_sigmoid"] = "constant"
    tf_min: float = 0.0
    tf_decay_steps: int = 10000
    # auto: bf16 autocast where it is faster (CUDA with bf16; CPUs whose bf16 matrix products
    # measure at least 1.5x float32, e.g. with AMX), else fp32
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "fp32"
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
    _check_choices(cls, node, "")
    return node


def register_configs() -> None:
    """Publish the schema as `base_config`; conf/config.yaml lists it first in its defaults."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="base_config", node=_omegaconf_mirror(Config, {}))


def _check_choices(cls: type, node: Any, prefix: str) -> None:
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
        if dataclasses.is_dataclass(tp):
            _check_choices(tp, value, key + ".")


def validate(cfg: DictConfig) -> DictConfig:
    """Check choices and cross-field rules; raise ConfigError naming the key. Returns cfg."""
    _check_choices(Config, cfg, "")
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
    for key in ("emb_size", "enc_hidden", "dec_hidden", "enc_layers", "dec_layers", "attn_size"):
        if m[key] < 1:
            raise ConfigError(f"model.{key} must be >= 1, got {m[key]}")
    if not 0.0 <= cfg.train.teacher_forcing <= 1.0:
        raise ConfigError("train.teacher_forcing must be within [0, 1]")
    if cfg.train.batch_tokens < 1 and cfg.train.batch_size < 1:
        raise ConfigError("set train.batch_tokens or train.batch_size to a positive number")
    if cfg.decode.beam_size < 1 or cfg.decode.n_best < 1 or cfg.decode.n_best > cfg.decode.beam_size:
        raise ConfigError("decode: need 1 <= n_best <= beam_size")
    if cfg.data.num_proc < 0:
        raise ConfigError(f"data.num_proc must be >= 0 (0 = every core), got {cfg.data.num_proc}")
    if cfg.decode.shortlist < 0:
        raise ConfigError(f"decode.shortlist must be >= 0 (0 = off), got {cfg.decode.shortlist}")
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
