"""RA3 (Reasoning as Action Abstractions) mid-training: EM over latent rationales (docs/RA3.md).

Modules, in the order one EM iteration runs them: ``em`` (orchestration: E-step -> bootstrap -> M-step -> bound),
``estep`` (candidate rounds per batch of documents), ``proposer`` (propose / score / update / select one round),
``steps`` (the jitted device steps), ``bound`` (the held-out ELBO). Documents live in ``ra3_jax/data/documents.py``.
"""

from ra3_jax.data.documents import Document, doc_sequence, make_documents, start_id, take_documents

from .bound import evaluate_elbo, path_terms
from .em import midtrain_ra3
from .estep import Candidate, LatentProposer, candidate_rounds, run_estep

__all__ = [
    "Candidate",
    "Document",
    "LatentProposer",
    "candidate_rounds",
    "doc_sequence",
    "evaluate_elbo",
    "make_documents",
    "midtrain_ra3",
    "path_terms",
    "run_estep",
    "start_id",
    "take_documents",
]
