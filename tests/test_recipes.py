"""Every shipped recipe prepares its data offline, from the command its first comment documents.

A recipe's first comment is the command that runs it; a Hub recipe also documents the offline
form (`data.local_dir=...`). The test runs that command's prepare stage, as typed, from a
project folder next to a `shared/corpora` folder of small fixtures laid out like the real
`../shared/corpora/*` (a user's fresh clone has no ../shared, so the layouts are written here
and checked against the real folders where they exist).
"""
import shlex
from pathlib import Path

import pytest

from mt.config import compose_config
from mt.pipeline import run

from conftest import builtin_lines

ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted(p.stem for p in (ROOT / "recipes").glob("*.yaml"))
# ../shared/corpora/<name>: split files and languages, as in the real folders
SHARED_LAYOUTS = {"tatoeba-en-de": (("train", "valid", "test"), ("en", "de")),
                  "bible-en-es": (("train", "valid", "test"), ("en", "es")),
                  "multi30k": (("train", "valid", "test2016"), ("en", "de", "fr", "cs"))}


def documented_commands(recipe: str):
    lines = (ROOT / "recipes" / f"{recipe}.yaml").read_text(encoding="utf-8").splitlines()
    comments = [line.lstrip("#").strip() for line in lines[:next(i for i, x in enumerate(lines) if not x.startswith("#"))]]
    return [c for c in comments if c.startswith("mt-train ")]


def offline_command(recipe: str) -> str:
    commands = documented_commands(recipe)
    assert commands and commands[0].split()[1] == f"recipe={recipe}", f"{recipe}: first comment is not its command"
    return next((c for c in commands if "data.local_dir=" in c), commands[0])


def write_fixture(folder: Path, splits, langs, n=30):
    folder.mkdir(parents=True, exist_ok=True)
    for split in splits:
        source = {"valid": "valid", "train": "train"}.get(split, "test2016")
        for lang in langs:
            lines = builtin_lines(source, "en" if lang == "en" else "de", n)
            (folder / f"{split}.{lang}").write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_the_fixture_layouts_are_those_of_the_shared_corpora():
    shared = ROOT.parent / "shared" / "corpora"
    if not shared.is_dir():
        pytest.skip("no ../shared/corpora beside this checkout")
    for name, (splits, langs) in SHARED_LAYOUTS.items():
        for split in splits:
            for lang in langs:
                assert (shared / name / f"{split}.{lang}").is_file(), f"{name}/{split}.{lang}"


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_prepares_offline_from_its_documented_command(recipe, tmp_path, monkeypatch):
    overrides = shlex.split(offline_command(recipe))[1:]
    project = tmp_path / "project"
    project.mkdir()
    for o in overrides:
        if o.startswith("data.local_dir="):
            local = o.split("=", 1)[1]
            if local.startswith("../shared/corpora/"):
                name = local.rsplit("/", 1)[1]
                assert name in SHARED_LAYOUTS, f"{recipe}: no fixture layout for {local}"
                write_fixture(project / local, *SHARED_LAYOUTS[name])
            else:  # a folder the recipe's comment describes: train/valid/test.{src,tgt}
                cfg = compose_config([f"recipe={recipe}"])
                write_fixture(project / local, ("train", "valid", "test"), (cfg.data.src_lang, cfg.data.tgt_lang))
    monkeypatch.chdir(project)  # relative paths resolve as they would for the user
    cfg = compose_config(overrides + ["stages=[prepare]"])
    assert cfg.data.source != "hub" or cfg.data.local_dir, f"{recipe}: the documented command needs a network"
    stats = run(cfg, project / "runs" / recipe)["prepare"]
    assert set(stats["splits"]) == {"train", "valid", "test"}
    assert all(s["kept"] > 0 for s in stats["splits"].values()), stats
