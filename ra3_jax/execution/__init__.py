from ra3_jax.execution.jobs import ExecResult, Job, Limits, ResultCache, SandboxError
from ra3_jax.execution.sandbox import Sandbox
from ra3_jax.execution.split import ProcessSplitSandbox

__all__ = ["ExecResult", "Job", "Limits", "ProcessSplitSandbox", "ResultCache", "Sandbox", "SandboxError"]
