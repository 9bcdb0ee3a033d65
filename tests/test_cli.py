"""CLI error handling: a user error prints one line and exits 2; any other exception keeps its traceback."""

import pytest

from ra3_jax.cli import _read_prompts, main
from ra3_jax.errors import RA3Error

from .conftest import REPO

TINY = f"{REPO}/configs/tiny_cpu.yaml"


def test_a_bad_config_key_is_one_line_and_exit_2(capsys):
    assert main(["pretrain", "-c", TINY, "model.nope=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ra3 pretrain: error: unknown config key 'model.nope'")


def test_show_latents_of_a_missing_or_unfinished_run(capsys, tmp_path):
    assert main(["show-latents", str(tmp_path / "nope")]) == 2
    assert "run directory not found" in capsys.readouterr().err
    (tmp_path / "iter_0" / "bootstrap").mkdir(parents=True)  # an interrupted E-step: no complete corpus
    assert main(["show-latents", str(tmp_path)]) == 2
    assert "no complete bootstrap corpus" in capsys.readouterr().err


def test_read_prompts_reports_bad_files(tmp_path):
    with pytest.raises(RA3Error, match="cannot read prompts from .*missing.jsonl"):
        _read_prompts(str(tmp_path / "missing.jsonl"))
    (tmp_path / "blank.txt").write_text("\n  \n")
    with pytest.raises(RA3Error, match="no prompts in"):
        _read_prompts(str(tmp_path / "blank.txt"))
    (tmp_path / "p.jsonl").write_text('{"prompt": "def f():"}\nplain\\nline\n')
    assert _read_prompts(str(tmp_path / "p.jsonl")) == ["def f():", "plain\nline"]


def test_bad_input_is_a_user_error_and_bugs_keep_their_traceback(capsys, monkeypatch):
    from ra3_jax.config import MeshSection
    from ra3_jax.meshes import make_run_mesh
    from ra3_jax.sharding import make_mesh

    with pytest.raises(RA3Error, match="3 devices, but 8 are available"):
        make_mesh(3, 1, 1)  # the mesh does not fit the devices
    with pytest.raises(RA3Error, match="unknown mesh 'nosuch'"):
        make_run_mesh(MeshSection(name="nosuch"))
    # a bug inside a command (any exception that is not an RA3Error) propagates with its traceback, no exit 2
    import ra3_jax.train.ntp as ntp

    def buggy(cfg, mode):
        return int("x")

    monkeypatch.setattr(ntp, "train", buggy)
    with pytest.raises(ValueError, match="invalid literal") as e:
        main(["pretrain", "-c", TINY])
    assert not isinstance(e.value, RA3Error)


def test_a_failed_run_leaves_no_empty_out_dir_and_a_finished_one_is_summarized(tmp_path, capsys):
    from ra3_jax.cli import run_summary

    out = tmp_path / "never"
    assert main(["pretrain", "-c", TINY, "tokenizer.path=/nonexistent/tok", f"train.out_dir={out}"]) == 2
    assert not out.exists()
    kept = tmp_path / "kept"
    (kept / "notes.txt").parent.mkdir()
    (kept / "notes.txt").write_text("mine")
    assert main(["pretrain", "-c", TINY, "tokenizer.path=/nonexistent/tok", f"train.out_dir={kept}"]) == 2
    assert (kept / "notes.txt").read_text() == "mine"  # a directory that existed before is never touched
    text = run_summary("pretrain", "/r", {"step": 30, "eval/loss@start": 2.0251, "eval/loss": 1.9179, "loss": 1.5})
    assert text.splitlines() == ["ra3 pretrain: finished at step 30; run directory /r", "  eval/loss: 2.0251 -> 1.9179"]


def test_corpus_build_is_quiet_and_leaves_no_temp_dirs(tmp_path, capfd):
    import glob
    import tempfile

    from ra3_jax.config import load_config
    from ra3_jax.data.corpus import build_corpus

    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        (src / f"m{i}.py").write_text(f"x = {i}\n")
    before = set(glob.glob(f"{tempfile.gettempdir()}/tmp*tfds"))
    cfg = load_config(None, [f"data.source_dirs=[{src}]", f"data.tfds_dir={tmp_path / 'tfds'}", "data.validation_fraction=0"])
    assert len(build_corpus(cfg.data)["train"]) == 3
    assert set(glob.glob(f"{tempfile.gettempdir()}/tmp*tfds")) == before
    assert "Downloading and preparing" not in capfd.readouterr().out
