"""Token embedding: [CLS, registers, patches] + position embeddings, as timm's ``_pos_embed``.

function.py   ``embed_tokens``
backends.py   reference / cuda backends, the dispatcher
op.py         ``regkern::embed_tokens`` (fake, the one autograd; impls reference, cuda)
cuda.py       the CUDA implementation: the extension's ``regkern::cuda_embed_tokens``
"""

from .backends import (
    BACKEND_NAMES,
    DISPATCHER,
    choose_embed_tokens_backend,
    embed_tokens_not_supported_reasons,
    resolve_embed_tokens_backend,
)
from .function import embed_tokens
from .op import embed_tokens_op

__all__ = [
    "embed_tokens",
    "embed_tokens_op",
    "choose_embed_tokens_backend",
    "resolve_embed_tokens_backend",
    "embed_tokens_not_supported_reasons",
    "BACKEND_NAMES",
    "DISPATCHER",
]
