"""RA3 (Reasoning as Action Abstractions) mid-training: EM over latent rationales (docs/RA3.md).

Modules, in the order one EM iteration runs them: ``em`` (orchestration: E-step -> bootstrap -> M-step -> bound),
``estep`` (one candidate round: propose / score / update / select, and its device steps), ``bound`` (the held-out
bound per byte). Documents live in ``ra3_jax/data/documents.py``.
"""

from ra3_jax.data.documents import Document, doc_sequence, make_documents, start_ids, take_documents

from .bound import evaluate_bound, path_log_likelihoods
from .em import midtrain_ra3, run_estep
from .estep import Candidate, LatentProposer, candidate_rounds

__all__ = [
    "Candidate",
    "Document",
    "LatentProposer",
    "candidate_rounds",
    "doc_sequence",
    "evaluate_bound",
    "make_documents",
    "midtrain_ra3",
    "path_log_likelihoods",
    "run_estep",
    "start_ids",
    "take_documents",
]
