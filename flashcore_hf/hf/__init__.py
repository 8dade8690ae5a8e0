"""The transformers integration: the attention function and its kwargs (attention.py, attention_kwargs.py),
registration and generate()'s default cache (integration.py), CUDA-graph decode (decode_graphs.py), its compiled
forward (compiled_decode.py) and compiled prefill (compiled_prefill.py), which share compiled_forward.py. The
patches to transformers themselves live in flashcore_hf.patches (the repository's patches/ folder)."""
from .attention import FlashCoreAttention, FlashCoreFallbackWarning
from .compiled_decode import set_compiled_decode
from .compiled_forward import FlashCoreCompileWarning
from .compiled_prefill import set_compiled_prefill
from .decode_graphs import decode_graph_stats, release_decode_graphs, set_cuda_graphs
from .integration import (ATTN_IMPLEMENTATION, flashcore_attention_forward, flashcore_mask, register,
                          set_default_cache_options, unpatch)

__all__ = ["ATTN_IMPLEMENTATION", "FlashCoreAttention", "FlashCoreCompileWarning", "FlashCoreFallbackWarning",
           "decode_graph_stats", "flashcore_attention_forward", "flashcore_mask", "register", "release_decode_graphs",
           "set_compiled_decode", "set_compiled_prefill", "set_cuda_graphs", "set_default_cache_options", "unpatch"]
