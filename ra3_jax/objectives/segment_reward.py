"""RLPT rewards: the prefix-match judge (default) and parsing of the wrapped prediction."""

from __future__ import annotations

START, END = "<|startofprediction|>", "<|endofprediction|>"


def normalize(s: str) -> str:
    """Whitespace-insensitive comparison form: runs of whitespace become one space; ends stripped."""
    return " ".join(s.split())


def extract_prediction(response: str) -> str | None:
    """The text before ``<|endofprediction|>`` (the prompt ends with ``<|startofprediction|>``); None when the
    end tag is missing (the sample ran out of tokens) -- such a sample earns no reward."""
    if END not in response:
        return None
    pred = response.split(END, 1)[0]
    if START in pred:  # the model re-opened the tag: judge what follows the last opening
        pred = pred.rsplit(START, 1)[1]
    return pred


def prefix_reward(prediction: str | None, after: tuple | list, target: str) -> float:
    """1 if the normalized prediction is a prefix of the normalized concatenation of the following segments
    (``after`` = s_i, s_{i+1}, ...) and covers at least the target segment s_i; else 0."""
    if prediction is None:
        return 0.0
    p = normalize(prediction)
    if not p:
        return 0.0
    ref = normalize(" ".join(after))
    return 1.0 if ref.startswith(p) and len(p) >= len(normalize(target)) else 0.0
