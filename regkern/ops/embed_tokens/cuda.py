"""The CUDA implementation of the token embedding: the extension's ``regkern::cuda_embed_tokens`` (csrc/).

    regkern::cuda_embed_tokens(x, pos_embed?, cls_token?, reg_token?, no_embed_class) -> (B, P + M, C)

One more implementation (``impl="cuda"``) of ``regkern::embed_tokens``, whose autograd is the only one; the C++ op
gets a fake implementation here and no autograd of its own.
"""

from __future__ import annotations

import math

import torch

from .. import cuda_ext

__all__ = ["embed_tokens"]


def _embed_fake(x, pos_embed, cls_token, reg_token, no_embed_class):
    B, C = x.shape[0], x.shape[-1]
    M = math.prod(x.shape[1:-1])
    P = (cls_token is not None) + (0 if reg_token is None else reg_token.shape[1])
    return x.new_empty((B, P + M, C))


def _register_fake() -> None:
    torch.library.register_fake("regkern::cuda_embed_tokens")(_embed_fake)


cuda_ext.on_load(_register_fake)


def embed_tokens(x, pos_embed, cls_token, reg_token, no_embed_class: bool):
    """(B, P + M, C) from the C++ op; ValueError with the reasons when the extension cannot serve x's device."""
    cuda_ext.require(x.device.type)
    return torch.ops.regkern.cuda_embed_tokens(x, pos_embed, cls_token, reg_token, bool(no_embed_class))
