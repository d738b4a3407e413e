from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from trainer.errors import UserError
from trainer.models.lora import LoRALinear, train_adapters_only


def auto_patch_size(height: int, width: int, max_tokens: int = 16) -> int:
    """The smallest patch that divides the image into at most `max_tokens` patches."""
    for patch in range(1, min(height, width) + 1):
        if height % patch == 0 and width % patch == 0 and (height // patch) * (width // patch) <= \
                max_tokens:
            return patch
    return min(height, width)


class Transformer(nn.Module):
    """A pre-norm transformer (GPT-2's block) in one of two roles, chosen by the data it is sized
    for.

    - images (`in_shape`, `num_classes`): non-overlapping patches are the tokens (as in ViT);
      the mean of the final tokens is classified, or with `pool=cls` a learned class token
      prepended to them (as in ViT's paper).
    - text (`vocab_size`, `block_size`): a causal model (as nanoGPT's) that predicts the next
      token at every position; `tie_embeddings` shares the input embedding with the output layer.

    Attention is PyTorch's scaled_dot_product_attention (its fused kernels where the device has
    them). Positions are a learned table, or with `rotary` rotations of the queries and keys
    (RoPE). Weights start as `init` says: `torch`, PyTorch's own (nn.MultiheadAttention's for
    the attention), or `gpt2`: normal(0, 0.02), the projections into the residual stream scaled
    by 1/sqrt(2 * depth), biases zero. At baby_gpt's size the first learns faster (docs/models.md).

    With `activation_checkpointing`, training keeps only each block's input for the backward
    pass and runs the block again there (torch.utils.checkpoint): activation memory that grows
    with one block rather than `depth` of them, for one more forward pass of the blocks. The
    gradients are the same (dropout masks included); evaluation and export are unchanged.

    With `lora_rank` > 0, each block's four linear layers get low-rank adapters (models/lora.py)
    and only those and the output layer train, everything else frozen: fine-tuning a trained
    run's weights (init_from=) at a fraction of the trainable parameters.
    """

    def __init__(self, in_shape: tuple[int, int, int] | None = None, num_classes: int = 0,
                 vocab_size: int = 0, block_size: int = 0, width: int = 64, depth: int = 2,
                 heads: int = 4, dropout: float = 0.0, patch_size: int | None = None,
                 pool: str = "mean", tie_embeddings: bool = False, rotary: bool = False,
                 init: str = "torch", activation_checkpointing: bool = False,
                 lora_rank: int = 0, lora_alpha: float = 16.0) -> None:
        super().__init__()
        if width % heads or (rotary and (width // heads) % 2):
            even = " (and give each head an even width, for rotary)" if rotary else ""
            raise UserError(f"model.width={width} must be a multiple of model.heads={heads}{even}")
        self.causal = bool(vocab_size)
        if self.causal:
            self.embed: nn.Module = nn.Embedding(vocab_size, width)
            tokens, outputs = block_size, vocab_size
        elif in_shape is not None:
            channels, height, width_px = in_shape
            patch = patch_size or auto_patch_size(height, width_px)
            if height % patch or width_px % patch:
                raise ValueError(f"model.patch_size={patch} does not divide {height}x{width_px}")
            self.embed = nn.Sequential(nn.Conv2d(channels, width, patch, stride=patch),
                                       nn.Flatten(2))
            tokens, outputs = (height // patch) * (width_px // patch), num_classes
        else:
            raise ValueError("Transformer needs in_shape and num_classes (images) or vocab_size "
                             "and block_size (text)")
        if self.causal and pool == "cls":
            raise UserError("model.pool=cls is for images: a language model predicts at every "
                            "position; leave model.pool=mean")
        self.class_token = nn.Parameter(torch.zeros(1, 1, width)) if pool == "cls" else None
        tokens += self.class_token is not None
        self.position = None if rotary else nn.Parameter(torch.zeros(1, tokens, width))
        self.rotary = Rotary(width // heads, tokens) if rotary else None
        linear = functools.partial(LoRALinear, rank=lora_rank, alpha=lora_alpha) if lora_rank \
            else nn.Linear
        self.blocks = nn.ModuleList(Block(width, heads, dropout, linear) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.drop = nn.Dropout(dropout)
        tied = tie_embeddings and self.causal
        self.head = nn.Linear(width, outputs, bias=not tied)
        self.width, self.depth, self.context = width, depth, tokens
        self.activation_checkpointing = activation_checkpointing
        self.apply(lambda module: _gpt2_init(module, depth) if init == "gpt2" else
                   _torch_init(module))
        if tied:  # normal(0, 0.02) under either init: PyTorch's N(0, 1) embedding, as the
            # output layer too, would start the loss near 15 nats instead of ln(vocabulary)
            nn.init.normal_(self.embed.weight, std=0.02)
            self.head.weight = self.embed.weight
        if lora_rank:
            train_adapters_only(self, also=(self.head,))
        self.register_load_state_dict_pre_hook(_renamed_from_encoder_layers)

    def forward(self, inputs: Tensor) -> Tensor:
        x = self._embedded(inputs, start=0)
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            if recompute:
                x, _ = checkpoint(block, x, self.causal, self.rotary, use_reentrant=False)
            else:
                x, _ = block(x, self.causal, self.rotary)
        x = self.norm(x)
        if self.causal:
            return self.head(x)
        return self.head(x[:, 0] if self.class_token is not None else x.mean(dim=1))

    def _embedded(self, inputs: Tensor, start: int) -> Tensor:
        x = self.embed(inputs)  # text: (B, T, width); images: (B, width, tokens)
        x = x if self.causal else x.transpose(1, 2)
        if self.class_token is not None:
            x = torch.cat([self.class_token.expand(len(x), -1, -1), x], dim=1)
        if self.position is not None:
            x = x + self.position[:, start:start + x.shape[1]]
        return self.drop(x)

    @torch.no_grad()
    def decode(self, tokens: Tensor, cache: list[tuple[Tensor, Tensor]] | None = None
               ) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
        """Text, in eval mode: the logits after the last of `tokens` (B, T), reusing the keys
        and values of the positions before them (`cache`, as returned by the previous call), so
        each new token costs one position. Without a cache `tokens` start at position 0; with one
        they are the single next token. The same numbers as `forward`, from the same weights."""
        start = cache[0][0].shape[2] if cache else 0
        x = self._embedded(tokens, start)
        new_cache = []
        for i, block in enumerate(self.blocks):
            x, kv = block(x, self.causal, self.rotary, cache[i] if cache else None, start)
            new_cache.append(kv)
        return self.head(self.norm(x[:, -1])), new_cache

    def flops_per_item(self) -> float:
        """Training FLOPs (forward and backward, as in the PaLM appendix) per unit of throughput:
        per token for text, per image (all its patch tokens) for images."""
        table = self.position.numel() if self.position is not None else 0
        params = sum(p.numel() for p in self.parameters()) - table
        per_token = 6 * params + 12 * self.depth * self.width * self.context
        return float(per_token if self.causal else per_token * self.context)


class Block(nn.Module):
    """x + attention(norm(x)), then x + MLP(norm(x)): GPT-2's pre-norm block."""

    def __init__(self, width: int, heads: int, dropout: float,
                 linear: Callable[[int, int], nn.Linear] = nn.Linear) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv = linear(width, 3 * width)
        self.proj = linear(width, width)  # into the residual stream
        self.fc = linear(width, 4 * width)
        self.out = linear(4 * width, width)  # into the residual stream
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, causal: bool, rotary: Rotary | None = None,
                cache: tuple[Tensor, Tensor] | None = None, start: int = 0
                ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """The block's output and this call's keys and values (after `cache`'s)."""
        batch, length, width = x.shape
        q, k, v = (t.view(batch, length, self.heads, -1).transpose(1, 2)
                   for t in self.qkv(self.norm1(x)).split(width, dim=-1))
        if rotary is not None:
            q, k = rotary(q, start), rotary(k, start)
        if cache is not None:
            k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)
        attended = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0,
            is_causal=causal and cache is None)  # one new token may see every cached one
        x = x + self.drop(self.proj(attended.transpose(1, 2).reshape(batch, length, width)))
        x = x + self.drop(self.out(F.gelu(self.fc(self.norm2(x)))))
        return x, (k, v)


class Rotary(nn.Module):
    """Rotary position embedding (Su et al., 2021): each pair of a head's dimensions rotated by
    an angle proportional to the position, so attention scores depend on relative positions."""

    def __init__(self, head_width: int, positions: int, base: float = 10000.0) -> None:
        super().__init__()
        frequencies = base ** (-torch.arange(0, head_width, 2).float() / head_width)
        angles = torch.outer(torch.arange(positions).float(), frequencies)  # (T, head_width/2)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, x: Tensor, start: int = 0) -> Tensor:
        length = x.shape[2]
        cos, sin = self.cos[start:start + length], self.sin[start:start + length]
        even, odd = x[..., 0::2], x[..., 1::2]
        rotated = torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1)
        return rotated.flatten(-2).type_as(x)


def _torch_init(module: nn.Module) -> None:
    """PyTorch's defaults, the attention initialised as nn.MultiheadAttention does."""
    if isinstance(module, Block):
        nn.init.xavier_uniform_(module.qkv.weight)
        nn.init.zeros_(module.qkv.bias)
        nn.init.zeros_(module.proj.bias)
    _init_tables(module)


def _init_tables(module: nn.Module) -> None:
    """Position table and class token: normal(0, 0.02) under either init."""
    if isinstance(module, Transformer):
        for table in (module.position, module.class_token):
            if table is not None:
                nn.init.normal_(table, std=0.02)


def _gpt2_init(module: nn.Module, depth: int) -> None:
    if isinstance(module, nn.Linear | nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
    if isinstance(module, Block):  # residual projections: the sum of 2 * depth of them
        for layer in (module.proj, module.out):
            nn.init.normal_(layer.weight, std=0.02 / (2 * depth) ** 0.5)
    _init_tables(module)


# Checkpoints written before the block was our own held nn.TransformerEncoder's names.
_OLD_NAMES = {"self_attn.in_proj_weight": "qkv.weight", "self_attn.in_proj_bias": "qkv.bias",
              "self_attn.out_proj.weight": "proj.weight", "self_attn.out_proj.bias": "proj.bias",
              "linear1.weight": "fc.weight", "linear1.bias": "fc.bias",
              "linear2.weight": "out.weight", "linear2.bias": "out.bias"}


def _renamed_from_encoder_layers(module: nn.Module, state: dict, prefix: str, *args: object
                                 ) -> None:
    for key in [k for k in state if k.startswith(prefix + "blocks.")]:
        rest = key[len(prefix + "blocks."):]
        if rest.startswith("norm."):
            state[prefix + rest] = state.pop(key)
        elif rest.startswith("layers."):
            index, name = rest[len("layers."):].split(".", 1)
            state[f"{prefix}blocks.{index}.{_OLD_NAMES.get(name, name)}"] = state.pop(key)
