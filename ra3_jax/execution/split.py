"""A sandbox's batches shared out over the processes of a multi-process run."""

from __future__ import annotations

from ra3_jax.execution.jobs import ExecResult, Limits
from ra3_jax.execution.sandbox import Sandbox


class ProcessSplitSandbox:
    """A sandbox's ``run_many`` with the programs shared out over the processes of a multi-process run
    (``distributed.split_work``); every process gets every result. ``local`` counts this process's share."""

    def __init__(self, sandbox: Sandbox):
        self.sandbox, self.local = sandbox, 0

    def run_many(self, jobs, limits=None, progress=None) -> list[ExecResult]:
        from ra3_jax.distributed import split_work  # (imports JAX: not needed by plain sandbox users)

        per_job = [limits] * len(jobs) if limits is None or isinstance(limits, Limits) else list(limits)

        def mine(rows):
            self.local += len(rows)
            res = self.sandbox.run_many([jobs[i] for i in rows], [per_job[i] for i in rows], progress)
            return [r.to_json() for r in res]

        return [ExecResult(**r) for r in split_work(len(jobs), mine)]
