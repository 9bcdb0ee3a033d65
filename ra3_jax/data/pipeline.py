"""Grain pipeline: read -> tokenize -> concat-then-split pack (segment ids, positions) -> batch -> per-process.

Each document becomes ``[bos?] + tokens + [eos]``; the model sees ``inputs = doc[:-1]``, ``targets = doc[1:]``.
Packing keeps ``segment_ids`` (0 = padding) so attention never crosses documents, and ``positions`` restart
per document. The iterator is a grain DatasetIterator whose ``get_state()`` is checkpointed with the model.
"""

from __future__ import annotations

import dataclasses

import grain
import numpy as np

from ra3_jax.errors import InputError


@dataclasses.dataclass
class Tokenize(grain.transforms.Map):
    tokenizer: object

    def map(self, element):
        text = element["text"]
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        ids = self.tokenizer.encode(text) + [self.tokenizer.eos_id]
        ids = np.asarray(ids, np.int32)
        return {"inputs": ids[:-1], "targets": ids[1:]}


def _has_tokens(el) -> bool:
    return el["inputs"].shape[0] > 0


def _finalize(batch):
    return {
        "inputs": batch["inputs"],
        "targets": batch["targets"],
        "segment_ids": batch["inputs_segment_ids"].astype(np.int32),
        "positions": batch["inputs_positions"].astype(np.int32),
        "loss_mask": (batch["inputs_segment_ids"] != 0).astype(np.float32),
    }


def make_dataset(source, tokenizer, **stream) -> grain.IterDataset:
    """Token batches of a text corpus; ``stream``: ``packed_batches``' options (seq_len, batch_size, seed,
    shuffle, num_epochs, shard_index / shard_count of the records, num_threads, rows=(lo, hi) of each batch;
    ``num_epochs=None`` repeats forever)."""
    return packed_batches(source, Tokenize(tokenizer), ("inputs", "targets"), _finalize, keep=_has_tokens, **stream)


def packed_batches(
    source,
    transform,
    features,
    finalize,
    *,
    seq_len: int,
    batch_size: int,
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = None,
    shard_index: int = 0,
    shard_count: int = 1,
    num_threads: int = 4,
    keep=None,
    rows: tuple[int, int] | None = None,
) -> grain.IterDataset:
    """The shared tail of every corpus pipeline: shard per process -> shuffle -> repeat -> ``transform`` each
    record into 1-D ``features`` -> concat-then-split pack to ``seq_len`` -> batch -> ``finalize``.

    ``rows=(lo, hi)``: every process reads the same global batches and keeps rows [lo, hi) (a last partial
    batch is first padded to ``batch_size`` with empty rows, so every process gets hi - lo rows)."""
    if len(source) == 0:
        raise InputError("empty data source")
    ds = grain.MapDataset.source(source)
    if shard_count > 1:
        ds = ds[shard_index::shard_count]
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat(num_epochs).map(transform)
    if keep is not None:
        ds = ds.filter(keep)
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=64))
    it = grain.experimental.ConcatThenSplitIterDataset(it, length_struct={f: seq_len for f in features})
    it = it.batch(batch_size, drop_remainder=num_epochs is None)
    it = it.map(finalize)
    if rows is not None:
        it = it.map(_RowSlice(batch_size, *rows))
    return it


@dataclasses.dataclass
class _RowSlice(grain.transforms.Map):
    batch_size: int
    lo: int
    hi: int

    def map(self, batch):
        return {k: v[self.lo : self.hi] for k, v in pad_batch(batch, self.batch_size).items()}


def pad_batch(batch: dict, batch_size: int) -> dict:
    """A (last, partial) batch of arrays padded to ``batch_size`` rows with empty (all-zero) rows."""
    n = next(iter(batch.values())).shape[0]
    if n == batch_size:
        return batch
    return {k: np.concatenate([v, np.zeros((batch_size - n,) + v.shape[1:], v.dtype)]) for k, v in batch.items()}


def pad_rows(seqs: list[list[int]], length: int, pad: int, masks: dict[str, list[list[int]]]):
    """Token rows (each a whole sequence) -> right-padded ``inputs``/``targets``/``positions``/``segment_ids``
    [n, length] (sequences cut to length + 1 tokens), and per-token ``masks`` (each aligned with its sequence)
    moved to target positions: mask[j] says whether target j (token j + 1) counts."""
    n = len(seqs)
    arr = np.full((n, length + 1), pad, np.int32)
    seg = np.zeros((n, length), np.int32)
    out_masks = {k: np.zeros((n, length), np.float32) for k in masks}
    for i, s in enumerate(seqs):
        s = s[: length + 1]
        arr[i, : len(s)] = s
        seg[i, : max(len(s) - 1, 0)] = 1
        for k, m in masks.items():
            mm = m[i][1 : length + 1]  # mask of target positions (token j+1)
            out_masks[k][i, : len(mm)] = mm
    pos = np.broadcast_to(np.arange(length, dtype=np.int32), (n, length)).copy()
    return {"inputs": arr[:, :-1], "targets": arr[:, 1:], "positions": pos, "segment_ids": seg}, out_masks
