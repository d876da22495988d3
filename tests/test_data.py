"""The prepare stage: every source type, normalisation, filters, errors, skipping."""
import gzip
import json
import os

import pytest

from mt.config import DataConfig, structured
from mt.data import DataError, load_split, normalize, prepare


def cfg(path=None, **kw):
    base = dict(path=str(path), splits={"train": "train", "valid": "valid"})
    base.update(kw)
    return structured(DataConfig(**base))


def write(path, lines, gz=False):
    data = ("\n".join(lines) + "\n").encode("utf-8") if isinstance(lines, list) else lines
    if gz:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


PAIRS = [("A dog runs.", "Ein Hund rennt."), ("Two cats\u00a0sleep .", "Zwei  Katzen schlafen."),
         ("", "leer"), ("one two three four five six seven", "eins"), ("x", "y")]


def text_corpus(d, gz=False):
    for split in ("train", "valid"):
        write(d / f"{split}.en", [p[0] for p in PAIRS], gz)
        write(d / f"{split}.de", [p[1] for p in PAIRS], gz)
    return d


@pytest.mark.parametrize("gz", [False, True])
def test_text_source_normalises_filters_and_counts(tmp_path, gz):
    (tmp_path / "c").mkdir()
    corpus = text_corpus(tmp_path / "c", gz)
    stats = prepare(cfg(corpus, max_ratio=3.0), tmp_path / "out")
    train = stats["splits"]["train"]
    assert train == {"read": 5, "kept": 3, "empty": 1, "too_long": 0, "ratio": 1, "duplicate": 0}
    ds = load_split(tmp_path / "out", "train")
    assert ds["src"] == ["A dog runs.", "Two cats sleep .", "x"]
    assert ds["tgt"] == ["Ein Hund rennt.", "Zwei Katzen schlafen.", "y"]
    # evaluation splits are normalised but never filtered, and keep the raw reference
    valid = load_split(tmp_path / "out", "valid")
    assert len(valid) == 5 and valid["tgt_raw"][1] == "Zwei  Katzen schlafen."
    assert stats["splits"]["valid"]["kept"] == 5


def test_max_words_and_dedup(tmp_path):
    d = tmp_path / "c"
    d.mkdir()
    write(d / "train.en", ["a b c", "a b c", "a b c d e f", "q"])
    write(d / "train.de", ["x y z", "x y z", "u v w x y z", "r"])
    stats = prepare(cfg(d, splits={"train": "train"}, max_words=5, dedup=True), tmp_path / "out")
    assert stats["splits"]["train"] == {"read": 4, "kept": 2, "empty": 0, "too_long": 1, "ratio": 0, "duplicate": 1}


def test_tsv_and_jsonl_sources(tmp_path):
    d = tmp_path / "c"
    d.mkdir()
    write(d / "train.tsv", ['Say "hi"\tSag "hallo"', "NA\tnull", "1\t2"])
    stats = prepare(cfg(d, source="tsv", splits={"train": "train"}), tmp_path / "o1")
    assert stats["splits"]["train"]["kept"] == 3
    ds = load_split(tmp_path / "o1", "train")
    assert ds["src"] == ['Say "hi"', "NA", "1"] and ds["tgt"] == ['Sag "hallo"', "null", "2"]
    rows = [{"translation": {"en": "Hello .", "de": "Hallo ."}}, {"translation": {"en": "Bye", "de": "Tschüss"}}]
    write(d / "train.jsonl", [json.dumps(r, ensure_ascii=False) for r in rows], gz=True)
    c = cfg(d, source="jsonl", splits={"train": "train"}, src_field="translation.en", tgt_field="translation.de")
    prepare(c, tmp_path / "o2")
    assert load_split(tmp_path / "o2", "train")["tgt"] == ["Hallo .", "Tschüss"]


def test_hub_code_path_on_a_local_dataset_dir(tmp_path):
    """source=hub calls datasets.load_dataset(path, ...): the same code path users take with a
    Hub name, exercised on a local directory of data files."""
    d = tmp_path / "hubdir"
    d.mkdir()
    for split in ("train", "validation"):
        rows = [{"translation": {"en": f"{split} {i}", "de": f"{split} {i} de"}} for i in range(7)]
        write(d / f"{split}.jsonl", [json.dumps(r) for r in rows])
    c = cfg(d, source="hub", splits={"train": "train", "valid": "validation[:3]"},
            src_field="translation.en", tgt_field="translation.de")
    stats = prepare(c, tmp_path / "out")
    assert stats["splits"]["valid"]["kept"] == 3
    assert load_split(tmp_path / "out", "train")["tgt"][0] == "train 0 de"
    with pytest.raises(DataError, match=r"no field .translation.fr.; available: translation, translation.en, translation.de"):
        prepare(cfg(d, source="hub", splits={"train": "train"}, src_field="translation.fr",
                    tgt_field="translation.de"), tmp_path / "o2")
    with pytest.raises(DataError, match=r"split 'dev'.*(train|validation)"):
        prepare(cfg(d, source="hub", splits={"train": "dev"}, src_field="translation.en",
                    tgt_field="translation.de"), tmp_path / "o3")


def test_unknown_hub_dataset_is_named(tmp_path):
    with pytest.raises(DataError, match="no-such-user-mt/no-such-dataset"):
        prepare(cfg("no-such-user-mt/no-such-dataset", source="hub", splits={"train": "train"}), tmp_path / "o")


def test_mismatched_line_counts_name_both_files(tmp_path):
    d = tmp_path / "c"
    d.mkdir()
    write(d / "train.en", ["a", "b", "c"])
    write(d / "train.de", ["a", "b"])
    with pytest.raises(DataError) as e:
        prepare(cfg(d, splits={"train": "train"}), tmp_path / "o")
    msg = str(e.value)
    assert f"{d}/train.en has 3 lines" in msg and f"{d}/train.de has 2" in msg and "\n" not in msg


def test_missing_file_and_bad_utf8_are_named(tmp_path):
    d = tmp_path / "c"
    d.mkdir()
    write(d / "train.en", ["ok"])
    with pytest.raises(DataError, match=f"missing file: {d}/train.de"):
        prepare(cfg(d, splits={"train": "train"}), tmp_path / "o")
    write(d / "train.de", b"gut\nschlecht \xff\xfe\n")
    write(d / "train.en", ["ok", "bad"])
    with pytest.raises(DataError, match=f"{d}/train.de:2: invalid UTF-8"):
        prepare(cfg(d, splits={"train": "train"}), tmp_path / "o")
    write(d / "train.tsv", b"a\tb\nc\t\xc3\n")
    with pytest.raises(DataError, match=f"{d}/train.tsv:2: invalid UTF-8"):
        prepare(cfg(d, source="tsv", splits={"train": "train"}), tmp_path / "o")


def test_lines_split_on_newline_only(tmp_path):
    """A U+2028 or form feed inside a sentence must not shift the parallel lines."""
    d = tmp_path / "c"
    d.mkdir()
    write(d / "train.en", ["one\u2028still one", "two\x0cstill two", "three"])
    write(d / "train.de", ["eins", "zwei", "drei"])
    prepare(cfg(d, splits={"train": "train"}), tmp_path / "o")
    ds = load_split(tmp_path / "o", "train")
    assert ds["src"] == ["one still one", "two still two", "three"] and ds["tgt"] == ["eins", "zwei", "drei"]


def test_normalize():
    assert normalize("  a\u00a0b\u202fc\td  ") == "a b c d"
    assert normalize("zero\u200bwidth\ufeff") == "zerowidth"
    assert normalize("e\u0301") == "\u00e9"  # NFC
    assert normalize("\u0645\u200c\u0627") == "\u0645\u200c\u0627"  # ZWNJ is spelling: kept
    assert normalize("soft\u00adhyphen") == "softhyphen"


def test_prepare_skips_when_done_and_redoes_when_config_changes(tmp_path):
    corpus = tmp_path / "c"
    corpus.mkdir()
    text_corpus(corpus)
    prepare(cfg(corpus), tmp_path / "out")
    stamp = tmp_path / "out" / "stats.json"
    before = os.stat(stamp).st_mtime_ns
    prepare(cfg(corpus), tmp_path / "out")
    assert os.stat(stamp).st_mtime_ns == before
    stats = prepare(cfg(corpus, max_ratio=0.0), tmp_path / "out")
    assert os.stat(stamp).st_mtime_ns != before and stats["splits"]["train"]["ratio"] == 0


def test_hub_downloads_go_to_a_persistent_cache_that_a_second_prepare_reuses(tmp_path):
    d = tmp_path / "hubdir"
    d.mkdir()
    write(d / "train.jsonl", [json.dumps({"translation": {"en": f"a {i}", "de": f"b {i}"}}) for i in range(5)])
    hub_cache = tmp_path / "hub-cache"
    c = cfg(d, source="hub", splits={"train": "train"}, src_field="translation.en",
            tgt_field="translation.de", hub_cache_dir=str(hub_cache))
    prepare(c, tmp_path / "out")
    cached = sorted(p for p in hub_cache.rglob("*") if p.is_file())
    assert any(p.suffix == ".arrow" for p in cached)  # the download survives the prepare stage
    assert not list((tmp_path / "out").glob(".cache-*"))
    stats = prepare(c, tmp_path / "out", force=True)
    assert stats["splits"]["train"]["kept"] == 5
    assert sorted(p for p in hub_cache.rglob("*") if p.is_file() and p.suffix == ".arrow") == \
        [p for p in cached if p.suffix == ".arrow"]  # read back from the cache, nothing rebuilt


def test_a_hub_recipe_reads_a_local_copy_with_the_copys_own_split_names(tmp_path):
    for split, n in (("train", 6), ("valid", 2), ("test", 3)):
        write(tmp_path / f"{split}.en", [f"{split} {i}" for i in range(n)])
        write(tmp_path / f"{split}.de", [f"{split} {i} de" for i in range(n)])
    hub = dict(source="hub", path="Helsinki-NLP/tatoeba", hub_config="de-en",
               splits={"train": "train[5000:]", "valid": "train[:2500]", "test": "train[2500:5000]"})
    stats = prepare(cfg(local_dir=str(tmp_path), local_splits={"train": "train", "valid": "valid", "test": "test"},
                        **hub), tmp_path / "out")
    assert {k: v["kept"] for k, v in stats["splits"].items()} == {"train": 6, "valid": 2, "test": 3}
    with pytest.raises(DataError, match=r"data.local_splits.train='train\[5000:\]' is not a file name"):
        prepare(cfg(local_dir=str(tmp_path), **hub), tmp_path / "o2")
    with pytest.raises(DataError, match=r"data.local_dir: no such directory"):
        prepare(cfg(local_dir=str(tmp_path / "nope"), local_splits={"train": "train", "valid": "valid",
                                                                     "test": "test"}, **hub), tmp_path / "o3")


def test_several_processes_clean_exactly_as_one(tmp_path, monkeypatch):
    """Large splits are cleaned by data.num_proc processes in chunks; duplicates are found across
    chunks and the first of each is kept, as one process does."""
    import mt.data

    d = tmp_path / "c"
    d.mkdir()
    en = [f"s{i % 7}" if i % 3 else f"w{i}" for i in range(40)] + ["", "a b c d e f g h"]
    de = [f"t{i % 7}" if i % 3 else f"v{i}" for i in range(40)] + ["x", "y"]
    write(d / "train.en", en)
    write(d / "train.de", de)
    c = cfg(d, splits={"train": "train"}, dedup=True, max_ratio=3.0)
    one = prepare(c, tmp_path / "one")
    monkeypatch.setattr(mt.data, "_CHUNK", 4)
    monkeypatch.setattr(mt.data, "_PARALLEL_ROWS", 0)
    c.num_proc = 2
    two = prepare(c, tmp_path / "two")
    assert one["splits"] == two["splits"] and one["splits"]["train"]["duplicate"] > 0
    assert one["splits"]["train"]["empty"] == 1 and one["splits"]["train"]["ratio"] == 1
    assert list(load_split(tmp_path / "one", "train")["src"]) == list(load_split(tmp_path / "two", "train")["src"])
    assert one["fingerprint"] == two["fingerprint"]  # num_proc changes how fast, not what
