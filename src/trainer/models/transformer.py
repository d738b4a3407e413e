from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def auto_patch_size(height: int, width: int, max_tokens: int = 16) -> int:
    """The smallest patch that divides the image into at most `max_tokens` patches."""
    for patch in range(1, min(height, width) + 1):
        if height % patch == 0 and width % patch == 0 and (height // patch) * (width // patch) <= \
                max_tokens:
            return patch
    return min(height, width)


class Transformer(nn.Module):
    """A pre-norm transformer encoder in one of two roles, chosen by the data it is sized for.

    - images (`in_shape`, `num_classes`): non-overlapping patches are the tokens (as in ViT);
      the mean of the final tokens is classified.
    - text (`vocab_size`, `block_size`): a causal character model (as in nanoGPT) that predicts
      the next character at every position.
    """

    def __init__(self, in_shape: tuple[int, int, int] | None = None, num_classes: int = 0,
                 vocab_size: int = 0, block_size: int = 0, width: int = 64, depth: int = 2,
                 heads: int = 4, dropout: float = 0.0, patch_size: int | None = None) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"model.width={width} must be a multiple of model.heads={heads}")
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
        self.position = nn.Parameter(torch.zeros(1, tokens, width))
        nn.init.normal_(self.position, std=0.02)
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, depth, norm=nn.LayerNorm(width),
                                            enable_nested_tensor=False)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(width, outputs)
        self.width, self.depth, self.context = width, depth, tokens

    def forward(self, inputs: Tensor) -> Tensor:
        x = self.embed(inputs)  # text: (B, T, width); images: (B, width, tokens)
        x = x if self.causal else x.transpose(1, 2)
        length = x.shape[1]
        x = self.drop(x + self.position[:, :length])
        mask = nn.Transformer.generate_square_subsequent_mask(length, device=x.device) \
            if self.causal else None
        x = self.blocks(x, mask=mask, is_causal=self.causal)
        return self.head(x) if self.causal else self.head(x.mean(dim=1))

    @torch.no_grad()
    def decode(self, tokens: Tensor, cache: list[tuple[Tensor, Tensor]] | None = None
               ) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
        """Text, in eval mode: the logits after the last of `tokens` (B, T), reusing the keys
        and values of the positions before them (`cache`, as returned by the previous call), so
        each new token costs one position. Without a cache `tokens` start at position 0; with one
        they are the single next token. The same numbers as `forward`, from the same weights."""
        start = cache[0][0].shape[2] if cache else 0
        batch, length = tokens.shape
        x = self.embed(tokens) + self.position[:, start:start + length]
        new_cache = []
        for i, layer in enumerate(self.blocks.layers):
            attention = layer.self_attn
            q, k, v = F.linear(layer.norm1(x), attention.in_proj_weight,
                               attention.in_proj_bias).chunk(3, dim=-1)
            q, k, v = (t.view(batch, length, attention.num_heads, -1).transpose(1, 2)
                       for t in (q, k, v))
            if cache:
                k, v = torch.cat([cache[i][0], k], dim=2), torch.cat([cache[i][1], v], dim=2)
            attended = F.scaled_dot_product_attention(q, k, v, is_causal=not cache)
            x = x + attention.out_proj(attended.transpose(1, 2).reshape(batch, length, -1))
            x = x + layer.linear2(layer.activation(layer.linear1(layer.norm2(x))))
            new_cache.append((k, v))
        return self.head(self.blocks.norm(x[:, -1])), new_cache

    def flops_per_item(self) -> float:
        """Training FLOPs (forward and backward, as in the PaLM appendix) per unit of throughput:
        per token for text, per image (all its patch tokens) for images."""
        params = sum(p.numel() for p in self.parameters()) - self.position.numel()
        per_token = 6 * params + 12 * self.depth * self.width * self.context
        return float(per_token if self.causal else per_token * self.context)
