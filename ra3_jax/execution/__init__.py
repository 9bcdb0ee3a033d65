from ra3_jax.execution.sandbox import ExecResult, Job, Limits, ResultCache, Sandbox, SandboxError

__all__ = ["ExecResult", "Job", "Limits", "ResultCache", "Sandbox", "SandboxError"]
