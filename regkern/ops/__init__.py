"""The ops layer: one folder per op family, the dispatch core and the extension loader beside them.

    attention/      register_attention and its backends, op, Triton and CUDA implementations
    layer_norm/     layer_norm_with_norms (LayerNorm with norm capture)
    embed_tokens/   embed_tokens ([CLS, registers, patches] + position embeddings)
    dispatch.py     Backend, Dispatcher: what each backend supports, the one "auto"
    dispatch_table.py  the measured triton-vs-cuda table "auto" reads
    cuda_ext.py     loads the CUDA extension regkern._C (prebuilt or just in time)
    cuda_build.py   the extension's sources and build flags (shared with setup.py)

Imports go one way: reference <- ops <- nn <- timm <- monitor <- apps.
"""

from . import attention, cuda_build, cuda_ext, dispatch, dispatch_table, embed_tokens, layer_norm

__all__ = ["attention", "layer_norm", "embed_tokens", "dispatch", "dispatch_table", "cuda_ext", "cuda_build"]
