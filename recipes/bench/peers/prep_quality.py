#!/usr/bin/env python3
"""Prepare Multi30k en-de for the quality side by side, with *our* SentencePiece model.

Usage: prep_quality.py CORPUS_DIR SPM_MODEL OUT_DIR

Every toolkit sees the same text and the same subwords: SPM_MODEL is the joint unigram 8k model
that `mt-train recipe=multi30k_en_de stages=[prepare,tokenizer]` trains on the training set.

Writes to OUT_DIR:
  raw/{train,valid,test}.{en,de}     the corpus as is (test = test2016); the references
  pieces/{train,valid,test}.{en,de}  SentencePiece pieces, space separated (OpenNMT-py, fairseq)
  spm.model, vocab.txt               the model, and one piece per line (Joey NMT voc_file)
"""
import os
import shutil
import sys

import sentencepiece as spm

SPLITS = {"train": "train", "valid": "valid", "test": "test2016"}


def read(path):
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f]


def write(path, lines):
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(line + "\n" for line in lines)


def main():
    corpus, model, out = sys.argv[1:4]
    for sub in ("raw", "pieces"):
        os.makedirs(os.path.join(out, sub), exist_ok=True)
    shutil.copyfile(model, os.path.join(out, "spm.model"))
    sp = spm.SentencePieceProcessor(model_file=model)
    write(os.path.join(out, "vocab.txt"), [sp.id_to_piece(i) for i in range(sp.get_piece_size())])
    for split, stem in SPLITS.items():
        en, de = (read(os.path.join(corpus, f"{stem}.{lang}")) for lang in ("en", "de"))
        if len(en) != len(de):
            sys.exit(f"prep_quality: {corpus}/{stem}: {len(en)} English lines, {len(de)} German")
        for lang, lines in (("en", en), ("de", de)):
            write(os.path.join(out, "raw", f"{split}.{lang}"), lines)
            write(os.path.join(out, "pieces", f"{split}.{lang}"),
                  [" ".join(p) for p in sp.encode(lines, out_type=str)])
        print(f"prep_quality: {split}: {len(en)} pairs", file=sys.stderr)


if __name__ == "__main__":
    main()
