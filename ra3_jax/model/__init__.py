from ra3_jax.model.llama import KVCache, LlamaConfig, forward  # noqa: F401
from ra3_jax.model.params import abstract_params, init_params, param_shardings, param_specs  # noqa: F401
