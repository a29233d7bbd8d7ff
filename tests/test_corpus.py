"""The stdlib corpus split (dspark_vllm/corpus.py): deterministic, disjoint, and
the held-out files never reach training; prompt records have the datasets' format."""

import json

import pytest

from dspark_vllm import corpus


@pytest.fixture(scope="module")
def files():
    return corpus.corpus_files()


def test_corpus_excludes_tests_and_generated(files):
    assert len(files) > 200
    assert all(f.endswith(".py") for f in files)
    for f in files:
        parts = f.split("/")[:-1]
        assert not corpus.EXCLUDED_DIRS.intersection(parts), f
    assert "encodings/cp1252.py" not in files  # a gencodec.py table
    assert "os.py" in files and "asyncio/events.py" in files


def test_split_is_deterministic_disjoint_and_covering(files):
    splits = {s: corpus.split_files(s) for s in corpus.SPLITS}
    assert splits == {s: corpus.split_files(s) for s in corpus.SPLITS}
    sets = [set(v) for v in splits.values()]
    assert sum(map(len, sets)) == len(set().union(*sets)) == len(files)
    assert len(splits["train"]) > 0.8 * len(files)
    assert splits["heldout"] and splits["calibration"]


def test_split_of_is_a_pure_function_of_the_path():
    # Pinned so that the split never silently changes between versions/machines.
    assert corpus.split_of("bisect.py") == "heldout"
    assert corpus.split_of("os.py") == "train"
    assert {corpus.split_of(f"pkg{i}/mod.py") for i in range(200)} == set(corpus.SPLITS)


def test_heldout_text_never_in_train():
    train = dict(corpus.read_split("train"))
    for path, _ in corpus.read_split("heldout") + corpus.read_split("calibration"):
        assert path not in train


def test_unknown_split_rejected():
    with pytest.raises(ValueError):
        corpus.split_files("dev")


def test_prompt_records_format_and_determinism(tmp_path):
    recs = corpus.prompt_records("heldout", 16, seed=3)
    assert recs == corpus.prompt_records("heldout", 16, seed=3)
    assert recs != corpus.prompt_records("heldout", 16, seed=4)
    texts = [r["turns"][0] for r in recs]
    assert len(set(texts)) == 16
    for r in recs:
        assert list(r) == ["turns"] and len(r["turns"]) == 1
        t = r["turns"][0]
        assert 200 <= len(t.strip()) and len(t) <= 1001 and t.endswith("\n")
    heldout_text = "".join(t for _, t in corpus.read_split("heldout"))
    assert all(t.rstrip("\n") in heldout_text for t in texts)  # each prompt comes from its split
    path = corpus.write_jsonl(recs, tmp_path / "p.jsonl")
    assert [json.loads(line) for line in path.read_text().splitlines()] == recs
