"""Language models: a built-in small decoder-only transformer, and GPT-NeoX (Pythia's architecture) from a config.

* :class:`TinyLM` (``lm_tiny``): token + learned position embeddings, pre-norm
  blocks of causal self-attention and an MLP, a final LayerNorm and an output
  head. The MLP's hidden units are the module ``blocks.{i}.mlp.act`` (a GELU),
  whose output is ``[B, T, C]`` (``C = d_mlp``), so ``blocks.*.mlp.act``
  chooses them by glob. Attention is written with plain tensor operations
  (no fused ``nn.TransformerEncoderLayer`` fast path that would skip hooks).
* :func:`gpt_neox_tiny`: ``transformers``' GPTNeoXForCausalLM from a config,
  randomly initialised, with the Hugging Face offline flags set (nothing is
  ever downloaded). Its MLP units are ``gpt_neox.layers.{i}.mlp.act``.

Both take token ids ``[B, T]``; :func:`lm_logits` returns ``[B, T, V]`` logits
for either (a Hugging Face model returns an output object).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConceptEvoError
from ..offline import import_transformers


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0):
        super().__init__()
        if d_model % n_heads:
            raise ConceptEvoError(f"d_model={d_model} must be a multiple of n_heads={n_heads}")
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(D // self.n_heads))
        mask = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
        att = self.drop(att.masked_fill(mask, float("-inf")).softmax(-1))
        return self.proj((att @ v).transpose(1, 2).reshape(B, T, D))


class MLP(nn.Module):
    def __init__(self, d_model: int, d_mlp: int, dropout: float = 0.0):
        super().__init__()
        self.fc = nn.Linear(d_model, d_mlp)
        self.act = nn.GELU()  # its output [B, T, d_mlp]: the units
        self.proj = nn.Linear(d_mlp, d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        return self.drop(self.proj(self.act(self.fc(x))))


class Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int, d_mlp: int, dropout: float = 0.0):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads, dropout)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = MLP(d_model, d_mlp, dropout)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyLM(nn.Module):
    """A small decoder-only transformer; ``forward(ids [B, T]) -> logits [B, T, vocab_size]``."""

    arch = "lm_tiny"

    def __init__(self, vocab_size: int, d_model: int = 96, n_layers: int = 3, n_heads: int = 4,
                 d_mlp: int | None = None, context: int = 128, dropout: float = 0.0):
        super().__init__()
        for name, v in dict(vocab_size=vocab_size, d_model=d_model, n_layers=n_layers, n_heads=n_heads,
                            context=context).items():
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConceptEvoError(f"lm_tiny: {name}={v!r} must be a positive integer")
        d_mlp = 4 * d_model if d_mlp is None else d_mlp
        self.hparams = dict(vocab_size=vocab_size, d_model=d_model, n_layers=n_layers, n_heads=n_heads,
                            d_mlp=d_mlp, context=context, dropout=dropout)
        self.embed = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(context, d_model)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList([Block(d_model, n_heads, d_mlp, dropout) for _ in range(n_layers)])
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        self.apply(self._init)

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, ids):
        if ids.dim() != 2:
            raise ConceptEvoError(f"lm_tiny takes token ids [batch, tokens], got shape {tuple(ids.shape)}")
        T = ids.shape[1]
        if T > self.hparams["context"]:
            raise ConceptEvoError(f"lm_tiny: {T} tokens is longer than the model's context {self.hparams['context']}; "
                                  "use windows no longer than the context")
        x = self.drop(self.embed(ids) + self.pos(torch.arange(T, device=ids.device)))
        for b in self.blocks:
            x = b(x)
        return self.head(self.ln_f(x))

    def config(self) -> dict:
        """What ``config.json`` holds for this model: ``conceptevo_arch`` and the hyperparameters."""
        return {"conceptevo_arch": self.arch, **self.hparams}


def lm_tiny(vocab_size: int | None = None, d_model: int = 96, n_layers: int = 3, n_heads: int = 4,
            d_mlp: int | None = None, context: int = 128, dropout: float = 0.0, **_) -> TinyLM:
    """:class:`TinyLM`; ``vocab_size`` is required (the tokenizer's ``vocab_size``)."""
    if vocab_size is None:
        raise ConceptEvoError("lm_tiny needs vocab_size (the tokenizer's vocab_size): give it in the model's options")
    return TinyLM(vocab_size, d_model, n_layers, n_heads, d_mlp, context, dropout)


def _transformers():
    return import_transformers("GPT-NeoX (or use the built-in lm_tiny)")


def gpt_neox_tiny(vocab_size: int | None = None, hidden_size: int = 64, num_hidden_layers: int = 2,
                  num_attention_heads: int = 4, intermediate_size: int | None = None, context: int = 128,
                  **config) -> nn.Module:
    """A randomly initialised GPT-NeoX (Pythia architecture) causal LM built from a config; never downloads anything.

    Extra keyword arguments go to ``GPTNeoXConfig``. Units: ``gpt_neox.layers.{i}.mlp.act``.
    """
    if vocab_size is None:
        raise ConceptEvoError("gpt_neox_tiny needs vocab_size (the tokenizer's vocab_size)")
    config.pop("in_channels", None), config.pop("num_classes", None)
    tf = _transformers()
    cfg = tf.GPTNeoXConfig(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
                           num_attention_heads=num_attention_heads,
                           intermediate_size=4 * hidden_size if intermediate_size is None else intermediate_size,
                           max_position_embeddings=context, **config)
    return tf.GPTNeoXForCausalLM(cfg)


def lm_logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Logits ``[B, T, V]`` of a language model on ids ``[B, T]``: TinyLM or a Hugging Face causal LM."""
    out = model(ids)
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if logits is None and isinstance(out, (tuple, list)):
        logits = out[0]
    if not isinstance(logits, torch.Tensor):
        raise ConceptEvoError(f"the model returned a {type(out).__name__} with no logits; a language model must return "
                              "logits [batch, tokens, vocab] or an object with .logits")
    return logits


def lm_loss(model: nn.Module, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of ``model`` on ``ids`` against ``targets`` (both ``[B, T]``)."""
    logits = lm_logits(model, ids)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))
