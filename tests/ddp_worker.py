"""A tiny classifier and data set for the training-loop tests, and a data-parallel worker.

Run by tests/test_train_loop.py as
``python -m accelerate.commands.launch --num_processes 2 --cpu ... tests/ddp_worker.py OUT ...``;
it trains with peftkit.train.loop.train and saves the final trainable weights to OUT/final.safetensors.
"""

from __future__ import annotations

import argparse
import sys
from types import SimpleNamespace

import torch
from torch import nn
from torch.nn import functional as F

VOCAB = 32
SEQUENCE_LENGTH = 6


class TinyClassifier(nn.Module):
    """Frozen embedding -> mean over tokens -> dropout -> trainable linear head (2 classes)."""

    def __init__(self, dim: int = 16, num_classes: int = 2, dropout: float = 0.1, seed: int = 0):
        super().__init__()
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(seed)  # same initial weights in every process and every test
        self.embedding = nn.Embedding(VOCAB, dim)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(dim, num_classes)
        torch.random.set_rng_state(generator_state)
        self.embedding.weight.requires_grad_(False)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None):
        hidden = self.dropout(self.embedding(input_ids).mean(dim=1))  # [batch, dim]
        logits = self.head(hidden)  # [batch, classes]
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return SimpleNamespace(loss=loss, logits=logits)


def make_examples(count: int, seed: int, split: str = "train") -> list[dict]:
    """Class 0 draws its tokens from the first half of the vocabulary, class 1 from the second."""
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for _ in range(count):
        label = int(torch.randint(0, 2, (1,), generator=generator))
        low = label * (VOCAB // 2)
        tokens = torch.randint(low, low + VOCAB // 2, (SEQUENCE_LENGTH,), generator=generator)
        examples.append({"input_ids": tokens.tolist(), "label": label, "split": split})
    return examples


def collate(examples: list[dict]) -> dict[str, torch.Tensor]:
    return {
        "input_ids": torch.tensor([e["input_ids"] for e in examples], dtype=torch.long),
        "labels": torch.tensor([e["label"] for e in examples], dtype=torch.long),
    }


def main(argv: list[str]) -> None:
    from accelerate import PartialState

    from peftkit.io import write_tensors
    from peftkit.train.checkpoint import trainable_parameters
    from peftkit.train.loop import TrainingArguments, train

    parser = argparse.ArgumentParser()
    parser.add_argument("output_dir")
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--accumulation", type=int, default=1)
    parser.add_argument("--max-steps", type=int, required=True)
    parser.add_argument("--train-examples", type=int, default=201)
    options = parser.parse_args(argv)

    model = TinyClassifier(dropout=0.0)
    args = TrainingArguments(
        output_dir=options.output_dir,
        max_steps=options.max_steps,
        batch_size=options.batch_size,
        eval_batch_size=16,
        gradient_accumulation_steps=options.accumulation,
        learning_rate=0.05,
        eval_steps=4,
        save_steps=4,
        progress=False,
    )
    train(model, make_examples(options.train_examples, seed=1), make_examples(37, seed=2, split="eval"), args, collate)
    if PartialState().is_main_process:
        write_tensors(f"{options.output_dir}/final.safetensors", trainable_parameters(model))


if __name__ == "__main__":
    main(sys.argv[1:])
