"""Tokenizing and batching: examples to token ids, ids to padded batches, and the order of batches.

`tokenize_examples` turns examples into unpadded token id lists, `PaddingCollator` pads a batch of
them to its longest member, and `length_grouped_order` orders examples so that a batch holds texts of
similar length, which keeps padding (wasted compute) low. Co-training cuts each task's examples into
the batches of its single-task run (`task_epoch_batches`) and lets batches of the same padded length
share a forward pass (`plan_epoch`).
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch

from peftkit.errors import PeftkitError

if TYPE_CHECKING:
    from peftkit.train.data import Example



def tokenize_examples(examples: Sequence[Example], tokenizer, max_length: int = 128) -> list[dict]:
    """Tokenizes examples without padding, cutting texts to `max_length` tokens.

    Returns one dict per example: "input_ids" and "attention_mask" (lists of ints, same length,
    at most `max_length`), "token_type_ids" too where the tokenizer makes them, and "labels" (an int).
    """
    if not examples:
        return []
    # One call for all texts lets a fast (Rust) tokenizer work through them in bulk.
    encoded = tokenizer([example.text for example in examples], truncation=True, max_length=max_length)
    keys = [key for key in ("input_ids", "attention_mask", "token_type_ids") if key in encoded]
    columns = [encoded[key] for key in keys]
    return [
        {**{key: column[i] for key, column in zip(keys, columns)}, "labels": example.label}
        for i, example in enumerate(examples)
    ]


class PaddingCollator:
    """Pads a batch of `tokenize_examples` dicts to its longest member and makes tensors of it.

    Holds only the tokenizer's padding settings (not the tokenizer), so it pickles cheaply into
    DataLoader worker processes.
    """

    def __init__(self, tokenizer):
        if tokenizer.pad_token_id is None:
            raise PeftkitError(
                f"the tokenizer {type(tokenizer).__name__} has no padding token; "
                f"set one first, e.g. tokenizer.pad_token = tokenizer.eos_token"
            )
        self.pad_token_id = int(tokenizer.pad_token_id)
        self.pad_token_type_id = int(getattr(tokenizer, "pad_token_type_id", 0) or 0)
        self.pad_on_left = getattr(tokenizer, "padding_side", "right") == "left"

    def __call__(self, features: Sequence[Mapping]) -> dict[str, torch.Tensor]:
        """Returns "input_ids" and "attention_mask" (long, [batch, longest]), "token_type_ids"
        (same shape) where the features have them, and "labels" (long, [batch]) where they have them."""
        if not features:
            raise ValueError("cannot collate an empty batch")
        longest = max(len(feature["input_ids"]) for feature in features)
        pad_values = {
            "input_ids": self.pad_token_id,
            "attention_mask": 0,
            "token_type_ids": self.pad_token_type_id,
        }
        batch: dict[str, torch.Tensor] = {}
        for key, pad_value in pad_values.items():
            if key not in features[0]:
                continue
            rows = []
            for feature in features:
                values = list(feature[key])
                padding = [pad_value] * (longest - len(values))
                rows.append(padding + values if self.pad_on_left else values + padding)
            batch[key] = torch.tensor(rows, dtype=torch.long)
        if "labels" in features[0]:
            batch["labels"] = torch.tensor([int(feature["labels"]) for feature in features], dtype=torch.long)
        return batch


def length_grouped_order(
    lengths: Sequence[int],
    batch_size: int,
    seed: int,
    epoch: int,
    batches_per_chunk: int = 50,
) -> list[int]:
    """A shuffled order of range(len(lengths)) in which each run of `batch_size` holds similar lengths.

    Shuffles all indices, sorts each chunk of `batches_per_chunk * batch_size` of them by length
    (longest first), cuts the chunks into batches and shuffles the batches. The one short batch,
    where len(lengths) is not a multiple of batch_size, goes last, so that cutting the returned order
    into consecutive runs of `batch_size` gives exactly these batches. The same (seed, epoch) always
    gives the same order; no global random state is read or changed.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if batches_per_chunk < 1:
        raise ValueError(f"batches_per_chunk must be at least 1, got {batches_per_chunk}")
    # A string seed is hashed with SHA-512 by random.Random, so it is stable across runs and platforms.
    rng = random.Random(f"length_grouped_order seed={seed} epoch={epoch}")
    order = list(range(len(lengths)))
    rng.shuffle(order)
    chunk_size = batches_per_chunk * batch_size
    batches: list[list[int]] = []
    for start in range(0, len(order), chunk_size):
        chunk = sorted(order[start : start + chunk_size], key=lambda index: lengths[index], reverse=True)
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    short_batch = batches.pop() if batches and len(batches[-1]) < batch_size else None
    rng.shuffle(batches)
    if short_batch is not None:
        batches.append(short_batch)
    return [index for batch in batches for index in batch]


def plan_epoch(task_batches: Mapping[str, Sequence[Sequence[int]]], padded_lengths: Mapping[str, Sequence[int]],
               seed: int, epoch: int) -> list[dict[str, list[int]]]:
    """The forward passes of one epoch: a list of {task: batch (example indices)}, at most one batch per task.

    task_batches: each task's batches for this epoch; padded_lengths: each batch's longest example.
    Batches of the same padded length from different tasks share a pass, so a pass pads no row beyond
    what its own task's batch would: the passes cost the tokens of the separate runs, in fewer, larger
    matmuls. The passes are then shuffled with (seed, epoch), which puts each task's batches in a random
    order, as its single-task run has them.
    """
    by_length: dict[int, dict[str, list[list[int]]]] = {}
    for task, batches in task_batches.items():
        for batch, length in zip(batches, padded_lengths[task]):
            by_length.setdefault(int(length), {}).setdefault(task, []).append(list(batch))
    plan: list[dict[str, list[int]]] = []
    for length in sorted(by_length):
        same = by_length[length]
        for k in range(max(len(batches) for batches in same.values())):
            plan.append({task: batches[k] for task, batches in same.items() if k < len(batches)})
    random.Random(f"cotrain plan seed={seed} epoch={epoch}").shuffle(plan)
    return plan


def task_epoch_batches(lengths: Sequence[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """A task's batches for `epoch`: exactly those of its single-task run (`length_grouped_order`)."""
    order = length_grouped_order(lengths, batch_size, seed, epoch)
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
