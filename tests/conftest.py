"""Test setup: 8 fake CPU devices (sharding tests), persistent compilation cache, shared small fixtures."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import pytest  # noqa: E402

from ra3_jax import enable_compilation_cache  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(REPO), "shared", "data")
CACHE = os.environ.get("RA3_TEST_CACHE", os.path.join(REPO, ".pytest_cache", "ra3"))
enable_compilation_cache(os.path.join(CACHE, "jax_cache"))
jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session")
def tfds_dir():
    d = os.path.join(CACHE, "tfds")
    os.makedirs(d, exist_ok=True)
    return d


@pytest.fixture(scope="session")
def small_corpus_cfg(tfds_dir):
    from ra3_jax.config import DataSection

    return DataSection(source_dirs=["stdlib"], max_files=60, validation_fraction=0.1, tfds_dir=tfds_dir, seq_len=64, batch_size=8)


@pytest.fixture(scope="session")
def spm_tokenizer(small_corpus_cfg):
    """A 512-piece sentencepiece model trained on the small stdlib corpus (cached across sessions)."""
    from ra3_jax.data.corpus import build_corpus, tfds_lock
    from ra3_jax.tokenizer import SentencePieceTokenizer, train_sentencepiece

    out = os.path.join(CACHE, "spm512")
    with tfds_lock(CACHE, "spm512"):  # parallel test workers (pytest -n) train it once
        if os.path.exists(os.path.join(out, SentencePieceTokenizer.FILE)):
            return SentencePieceTokenizer(out)
        src = build_corpus(small_corpus_cfg)["train"]
        return train_sentencepiece((src[i]["text"].decode() for i in range(len(src))), 512, out)


@pytest.fixture(scope="session")
def smollm2_path():
    from ra3_jax.model.convert import CheckpointError, smollm2_gguf_path

    try:
        return smollm2_gguf_path()
    except CheckpointError as e:
        pytest.fail(str(e))


@pytest.fixture(scope="session")
def shared_data():
    """The benchmark releases in ../shared/data (MBPP, HumanEval(+), MBPP+), read in place, never copied."""
    if not os.path.isdir(SHARED_DATA):
        pytest.fail(f"benchmark data not found at {SHARED_DATA} (see ../shared/data/README.md)")
    return SHARED_DATA
