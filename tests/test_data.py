import numpy as np
import pytest

from ra3_jax.config import DataSection
from ra3_jax.data.corpus import CorpusError, build_corpus, list_source_files, split_of
from ra3_jax.data.pipeline import make_dataset


def test_stdlib_listing_excludes_tests_and_site_packages():
    files = list_source_files(["stdlib"])
    rels = [f.relpath for f in files]
    assert "os.py" in rels and len(rels) > 300
    assert not any("site-packages" in r or r.startswith("test/") or "/tests/" in r or "idle_test" in r for r in rels)


def test_split_is_deterministic_by_path(small_corpus_cfg):
    src = build_corpus(small_corpus_cfg)
    paths = {s: {src[s][i]["path"].decode() for i in range(len(src[s]))} for s in ("train", "validation")}
    assert paths["train"] and paths["validation"] and not paths["train"] & paths["validation"]
    for p in paths["validation"]:
        assert split_of(p, small_corpus_cfg.validation_fraction) == "validation"


def test_packing_segments_positions_and_targets(tmp_path, spm_tokenizer):
    root = tmp_path / "short"
    root.mkdir()
    for i in range(40):  # short documents of varied length, so several share a row
        (root / f"m{i}.py").write_text("".join(f"def f{i}_{j}(x):\n    return x + {j}\n" for j in range(1 + i % 5)))
    src = build_corpus(DataSection(source_dirs=[str(root)], tfds_dir=str(tmp_path / "tfds"), validation_fraction=0.0))["train"]
    ds = make_dataset(src, spm_tokenizer, seq_len=64, batch_size=4, seed=1)
    it = iter(ds)
    seen_multi = False
    for _ in range(30):
        b = next(it)
        assert b["inputs"].shape == (4, 64) and b["inputs"].dtype == np.int32
        seg, pos, inp, tgt = b["segment_ids"], b["positions"], b["inputs"], b["targets"]
        # within a segment, targets are the inputs shifted by one, and positions count up by one
        same = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] != 0)
        assert (inp[:, 1:][same] == tgt[:, :-1][same]).all()
        assert (pos[:, 1:][same] == pos[:, :-1][same] + 1).all()
        np.testing.assert_array_equal(b["loss_mask"], (seg != 0).astype(np.float32))
        seen_multi |= bool((seg.max(1) > 1).any())
        # where a new document starts (position 0) the previous token's target is the end-of-document id
        starts = (pos[:, 1:] == 0) & (seg[:, 1:] != 0)
        assert (tgt[:, :-1][starts] == spm_tokenizer.eos_id).all()
    assert seen_multi  # documents really get packed together


def test_iterator_state_restores_exactly(small_corpus_cfg, spm_tokenizer):
    import json

    from ra3_jax.train.checkpoint import _jsonable
    from ra3_jax.train.data_state import grain_state

    src = build_corpus(small_corpus_cfg)["train"]
    ds = make_dataset(src, spm_tokenizer, seq_len=64, batch_size=4, seed=3)
    it = iter(ds)
    for _ in range(7):
        next(it)
    state = grain_state(json.loads(json.dumps(_jsonable(it.get_state()))))  # as it travels through a checkpoint
    expect = [next(it)["inputs"] for _ in range(5)]
    it2 = iter(ds)
    it2.set_state(state)
    for e in expect:
        np.testing.assert_array_equal(next(it2)["inputs"], e)


def test_per_process_shards_are_disjoint(small_corpus_cfg, spm_tokenizer):
    src = build_corpus(small_corpus_cfg)["train"]
    firsts = []
    for i in range(2):
        ds = make_dataset(src, spm_tokenizer, seq_len=64, batch_size=2, seed=0, shard_index=i, shard_count=2, shuffle=False)
        firsts.append(next(iter(ds))["inputs"])
    assert not np.array_equal(firsts[0], firsts[1])


def test_empty_corpus_and_non_utf8_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CorpusError, match="empty corpus"):
        build_corpus(DataSection(source_dirs=[str(empty)], tfds_dir=str(tmp_path / "tfds")))
    blank = tmp_path / "blank"
    blank.mkdir()
    (blank / "a.py").write_text("   \n")
    with pytest.raises(CorpusError, match="empty corpus"):
        build_corpus(DataSection(source_dirs=[str(blank)], tfds_dir=str(tmp_path / "tfds"), validation_fraction=0.0))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "good.py").write_text("x = 1\n")
    (bad / "latin.py").write_bytes("s = 'caf\xe9'\n".encode("latin-1"))
    with pytest.raises(CorpusError, match=r"not valid UTF-8: .*latin.py.*skip_non_utf8"):
        build_corpus(DataSection(source_dirs=[str(bad)], tfds_dir=str(tmp_path / "tfds"), validation_fraction=0.0))
    src = build_corpus(
        DataSection(source_dirs=[str(bad)], tfds_dir=str(tmp_path / "tfds"), validation_fraction=0.0, skip_non_utf8=True)
    )
    assert len(src["train"]) == 1 and src["train"][0]["path"] == b"good.py"
    with pytest.raises(CorpusError, match="not found"):
        build_corpus(DataSection(source_dirs=[str(tmp_path / "nope")], tfds_dir=str(tmp_path / "tfds")))
