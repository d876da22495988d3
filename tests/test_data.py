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


# --- unusable data: one line naming the file and what to do (issue 12) ---------------------------

def test_blank_lines_or_filtered_away_train_data_names_the_files_and_the_filter_counts(tmp_path):
    d = tmp_path / "c"
    d.mkdir()
    write(d / "train.en", ["", " ", "", ""])
    write(d / "train.de", ["", "", "\u00a0", ""])
    with pytest.raises(DataError) as e:
        prepare(cfg(d, splits={"train": "train"}), tmp_path / "o")
    msg = str(e.value)
    assert msg.startswith(f"{d}/train.en and {d}/train.de: no train pairs left after the filters, 0 of 4 kept")
    assert "empty side: 4, data.max_words=200: 0, data.max_ratio=4.0: 0" in msg and "\n" not in msg
    write(d / "train.en", ["a b c d", "a"])
    write(d / "train.de", ["w x y z", "x y z"])
    with pytest.raises(DataError, match=r"0 of 2 kept .*data.max_words=3: 1, data.max_ratio=2.0: 1.*"
                                         r"relax data.max_words or data.max_ratio \(0 = off\)$"):
        prepare(cfg(d, splits={"train": "train"}, max_words=3, max_ratio=2.0), tmp_path / "o")


def test_empty_files_of_every_source_and_split_are_named(tmp_path):
    d = tmp_path / "c"
    d.mkdir()
    for name in ("train.en", "train.de", "train.tsv", "train.jsonl"):
        write(d / name, b"")
    for source, files in (("text", f"{d}/train.en and {d}/train.de"), ("tsv", f"{d}/train.tsv"),
                          ("jsonl", f"{d}/train.jsonl")):
        with pytest.raises(DataError) as e:
            prepare(cfg(d, source=source, splits={"train": "train"}), tmp_path / "o")
        assert str(e.value) == (f"{files}: empty, no sentence pairs for the train split: "
                                "fill it or point data.splits.train at other data")
    write(d / "train.en", ["a"])
    write(d / "train.de", ["b"])
    write(d / "valid.en", b"\n")  # evaluation splits are not filtered, but an empty one is useless
    write(d / "valid.de", b"\n")
    with pytest.raises(DataError, match=f"^{d}/valid.en and {d}/valid.de: no valid pairs left"):
        prepare(cfg(d, filter_splits=["train", "valid"]), tmp_path / "o")
    write(d / "valid.en", b"")
    write(d / "valid.de", b"")
    with pytest.raises(DataError, match=f"^{d}/valid.en and {d}/valid.de: empty, no sentence pairs for the valid split"):
        prepare(cfg(d), tmp_path / "o")


def test_a_truncated_or_corrupt_gzip_is_one_line_naming_it(tmp_path):
    d = tmp_path / "c"
    d.mkdir()
    data = gzip.compress(("\n".join(f"sentence {i}" for i in range(500)) + "\n").encode())
    (d / "train.en.gz").write_bytes(data[: len(data) // 2])
    write(d / "train.de", [f"Satz {i}" for i in range(500)], gz=True)
    with pytest.raises(DataError) as e:
        prepare(cfg(d, splits={"train": "train"}), tmp_path / "o")
    assert str(e.value) == (f"{d}/train.en.gz: truncated or corrupt gzip "
                            "(Compressed file ended before the end-of-stream marker was reached)")
    (d / "train.en.gz").write_bytes(b"plain text, no gzip\n")
    with pytest.raises(DataError, match=rf"^{d}/train.en.gz: truncated or corrupt gzip \(Not a gzipped file"):
        prepare(cfg(d, splits={"train": "train"}), tmp_path / "o")


def test_an_error_inside_datasets_is_unwrapped_to_the_file_and_the_cause(tmp_path):
    """datasets raises DatasetGenerationError ("An error occurred while generating the dataset")
    from the reader's error: the message names the file being read and that root cause."""
    d = tmp_path / "hubdir"
    d.mkdir()
    rows = gzip.compress("".join(json.dumps({"translation": {"en": f"a {i}", "de": f"b {i}"}}) + "\n"
                                 for i in range(100)).encode())
    (d / "train-00000-of-00002.jsonl.gz").write_bytes(rows)  # features are inferred from this one
    (d / "train-00001-of-00002.jsonl.gz").write_bytes(rows[: len(rows) // 2])
    c = cfg(d, source="hub", splits={"train": "train"}, src_field="translation.en", tgt_field="translation.de")
    with pytest.raises(DataError) as e:
        prepare(c, tmp_path / "o")
    assert str(e.value) == (f"Hub dataset {d}, split 'train': {d}/train-00001-of-00002.jsonl.gz: truncated or "
                            "corrupt gzip (Compressed file ended before the end-of-stream marker was reached)")
    write(d / "train.tsv", ["a\tb", "c\td\te"])  # pandas' ParserError inside datasets' csv reader
    with pytest.raises(DataError) as e:
        prepare(cfg(d, source="tsv", splits={"train": "train"}), tmp_path / "o")
    assert str(e.value) == f"{d}/train.tsv: Error tokenizing data. C error: Expected 2 fields in line 2, saw 3"


@pytest.mark.parametrize("case", ["blank", "zero_bytes", "truncated_gz"])
def test_mt_train_reports_unusable_train_data_in_one_line(tmp_path, case):
    """The issue's three reports, through the command: exit 1, one error line, no traceback."""
    import subprocess
    import sys

    d = tmp_path / "c"
    d.mkdir()
    for split in ("valid", "test2016"):
        write(d / f"{split}.en", ["a b"])
        write(d / f"{split}.de", ["c d"])
    lines = {"blank": ["", "", "", ""], "zero_bytes": b""}.get(case, [f"word {i}" for i in range(300)])
    write(d / "train.en", lines, gz=case == "truncated_gz")
    write(d / "train.de", lines, gz=case == "truncated_gz")
    if case == "truncated_gz":
        data = (d / "train.en.gz").read_bytes()
        (d / "train.en.gz").write_bytes(data[: len(data) // 2])
    r = subprocess.run([sys.executable, "-m", "mt.pipeline", "stages=[prepare,tokenizer]", f"data.path={d}",
                        "tokenizer.vocab_size=300", "name=bad"], cwd=tmp_path, capture_output=True, text=True)
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert last.startswith(f"mt-train: error: {d}/train.en"), last
    assert {"blank": "0 of 4 kept", "zero_bytes": "empty, no sentence pairs",
            "truncated_gz": "truncated or corrupt gzip"}[case] in last
