"""Bootstrapped corpora: documents with their accepted latents inserted, as ArrayRecord shards + lineage.

A record (msgpack) holds the token sequence ``tokens`` ([start] + steps with latents + [eos], int32), a
``latent_mask`` (1 where the token belongs to an inserted rationale), the rendered ``text`` (for inspection,
``ra3 show-latents``) and lineage: EM iteration, source document id, the model checkpoint step that produced
the latents, the number of latents. Documents are stored pre-tokenized because RA3 tokenizes step by step (so
inserting a latent never changes the tokens of the code around it); the M-step reads exactly the sequences the
E-step scored.

A shard directory is written atomically: records go to ``<dir>.tmp/`` and the directory is renamed into place
with a ``_COMPLETE`` marker, so a killed writer never leaves a half corpus that a resume would trust.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import grain
import numpy as np
from flax import serialization

from ra3_jax.data.pipeline import packed_batches
from ra3_jax.errors import InputError

SHARD = "data.array_record"
COMPLETE = "_COMPLETE"


@dataclasses.dataclass
class BootstrapRecord:
    tokens: np.ndarray  # [n] int32
    latent_mask: np.ndarray  # [n] int8
    text: str
    doc_id: str
    iteration: int
    source_step: int
    n_latents: int

    def encode(self) -> bytes:
        return serialization.msgpack_serialize(
            {
                "tokens": np.asarray(self.tokens, np.int32),
                "latent_mask": np.asarray(self.latent_mask, np.int8),
                "text": self.text,
                "doc_id": self.doc_id,
                "iteration": int(self.iteration),
                "source_step": int(self.source_step),
                "n_latents": int(self.n_latents),
            }
        )

    @classmethod
    def decode(cls, raw: bytes) -> BootstrapRecord:
        d = serialization.msgpack_restore(raw)
        return cls(**d)


def is_complete(directory: str) -> bool:
    return os.path.exists(os.path.join(directory, COMPLETE))


def write_bootstrap(directory: str, records: list[BootstrapRecord], meta: dict | None = None) -> str:
    """Write ``records`` as one ArrayRecord shard in ``directory`` (atomic). Returns the shard path."""
    from array_record.python.array_record_module import ArrayRecordWriter

    if not records:
        raise InputError("bootstrap corpus is empty: no documents to write")
    directory = os.path.abspath(directory)
    tmp = directory + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    w = ArrayRecordWriter(os.path.join(tmp, SHARD), "group_size:1")
    for r in records:
        w.write(r.encode())
    w.close()
    n_tok = int(sum(len(r.tokens) for r in records))
    n_lat = int(sum(int(np.sum(r.latent_mask)) for r in records))
    info = {
        "documents": len(records),
        "tokens": n_tok,
        "latent_tokens": n_lat,
        "latents": int(sum(r.n_latents for r in records)),
        **(meta or {}),
    }
    with open(os.path.join(tmp, "info.json"), "w", encoding="utf-8") as f:
        json.dump(info, f, indent=1)
    with open(os.path.join(tmp, COMPLETE), "w") as f:
        f.write("ok\n")
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)
    return os.path.join(directory, SHARD)


def open_bootstrap(directory: str):
    """Random-access source of encoded records (for Grain and for inspection)."""
    if not is_complete(directory):
        raise FileNotFoundError(f"no complete bootstrap corpus in {directory} (missing {COMPLETE}; was the E-step interrupted?)")
    return grain.sources.ArrayRecordDataSource([os.path.join(directory, SHARD)])


def read_records(directory: str) -> list[BootstrapRecord]:
    src = open_bootstrap(directory)
    return [BootstrapRecord.decode(src[i]) for i in range(len(src))]


@dataclasses.dataclass
class DecodeForTraining(grain.transforms.Map):
    """record bytes -> {inputs, targets, weights}; weights zero on latent targets when masking latents."""

    mask_latents: bool = False

    def map(self, raw):
        d = serialization.msgpack_restore(raw)
        t = np.asarray(d["tokens"], np.int32)
        lat = np.asarray(d["latent_mask"], np.float32)
        w = (1.0 - lat[1:]) if self.mask_latents else np.ones(len(t) - 1, np.float32)
        return {"inputs": t[:-1], "targets": t[1:], "weights": w.astype(np.float32)}


def _finalize(batch):
    seg = batch["inputs_segment_ids"].astype(np.int32)
    return {
        "inputs": batch["inputs"],
        "targets": batch["targets"],
        "segment_ids": seg,
        "positions": batch["inputs_positions"].astype(np.int32),
        "loss_mask": ((seg != 0) * batch["weights"]).astype(np.float32),
    }


def make_bootstrap_dataset(directory: str, *, mask_latents: bool = False, **stream) -> grain.IterDataset:
    """Grain pipeline over a bootstrap corpus: decode -> concat-then-split pack -> batch (same keys as NTP);
    ``stream``: ``pipeline.packed_batches``' options (seq_len, batch_size, seed, shuffle, num_epochs, shards, rows)."""
    src = open_bootstrap(directory)
    if len(src) == 0:
        raise InputError(f"empty bootstrap corpus in {directory}")
    return packed_batches(src, DecodeForTraining(mask_latents), ("inputs", "targets", "weights"), _finalize, **stream)
