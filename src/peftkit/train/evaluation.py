"""The evaluate and keep-best stages, shared by the trainer (peftkit.train.loop) and co-training.

``evaluate`` measures loss and accuracy over an evaluation set; ``close_history_window`` appends the
history record of an evaluation (or of an epoch end without one); ``keep_best`` decides whether an
evaluation is the best so far. What to save when it is (a checkpoint folder, an adapter) stays with
the caller.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import send_to_device

from peftkit.errors import PeftkitError
from peftkit.train.processes import process_slice

EVAL_METRICS = ("accuracy", "loss")


def collate_to_device(collate_fn, examples: list, device: torch.device) -> dict[str, torch.Tensor]:
    """``collate_fn(examples)``, checked to be a dict, on ``device``."""
    batch = collate_fn(examples)
    if not isinstance(batch, Mapping):
        raise PeftkitError(f"collate_fn must return a dict of tensors (model(**batch)), got {type(batch).__name__}")
    return send_to_device(dict(batch), device)


def loss_of(output: Any) -> torch.Tensor:
    """The ``loss`` of a model output (an object or a dict), with an error that says what is missing."""
    loss = getattr(output, "loss", None)
    if loss is None and isinstance(output, Mapping):
        loss = output.get("loss")
    if loss is None:
        raise PeftkitError(
            "the model returned no loss: it must return an object with .loss when the batch holds "
            "'labels' (check that collate_fn puts the labels under the key 'labels')"
        )
    return loss


def sum_dtype(device: torch.device) -> torch.dtype:
    """The dtype of sums reduced over processes: float64, except on MPS, which has none."""
    return torch.float32 if device.type == "mps" else torch.float64


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    eval_data: Sequence[Any],
    batch_size: int,
    collate_fn,
    device: torch.device,
    *,
    accelerator: Accelerator | None = None,
    forward: Callable[[dict[str, torch.Tensor]], Any] | None = None,
) -> dict[str, float]:
    """Loss and accuracy over ``eval_data``.

    loss: mean of the batch losses weighted by batch size. accuracy: argmax of the logits against
    ``labels``, ignoring positions labelled -100 (for a causal LM, the next token's label: token
    accuracy on the labelled tokens). ``forward(batch)`` returns an output with ``.loss`` and
    ``.logits`` (default: ``model(**batch)``). With ``accelerator``, every process takes a contiguous
    share and the sums are reduced; ``model`` is then the unwrapped model, so processes need not run
    the same number of batches. The RNG is forked, so evaluation draws no training randomness.
    """
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator is not None else (0, 1)
    shard = process_slice(range(len(eval_data)), rank, world)
    shifted = predicts_next_token(model)
    totals = [0.0, 0, 0, 0]  # loss sum, examples, correct, labelled
    devices = [device.index or 0] if device.type == "cuda" else []
    was_training = model.training
    model.eval()
    with torch.random.fork_rng(devices=devices):
        for start in range(0, len(shard), batch_size):
            indices = shard[start : start + batch_size]
            batch = collate_to_device(collate_fn, [eval_data[i] for i in indices], device)
            output = model(**batch) if forward is None else forward(batch)
            totals[0] += float(loss_of(output)) * len(indices)
            totals[1] += len(indices)
            correct, labelled = _count_correct(getattr(output, "logits", None), batch.get("labels"), shifted)
            totals[2] += correct
            totals[3] += labelled
    model.train(was_training)
    loss_sum, examples, correct, labelled = totals
    if world > 1:
        sums = torch.tensor(totals, dtype=sum_dtype(device), device=device)
        loss_sum, examples, correct, labelled = accelerator.reduce(sums, reduction="sum").tolist()
    metrics = {"loss": loss_sum / examples if examples else float("nan")}
    if labelled:
        metrics["accuracy"] = correct / labelled
    return metrics


def _count_correct(logits: torch.Tensor | None, labels: torch.Tensor | None, shifted: bool) -> tuple[int, int]:
    """(correct predictions, labelled positions) of one batch; (0, 0) without logits or labels."""
    if logits is None or labels is None:
        return 0, 0
    predictions = logits.argmax(dim=-1)
    if predictions.dim() == 2 and labels.dim() == 2 and predictions.shape[1] > labels.shape[1]:
        # Prompt tuning on a causal LM returns logits for its virtual tokens first; peft does the same.
        predictions = predictions[:, -labels.shape[1]:]
    if shifted:
        # A causal LM's logits at position t predict token t + 1 (its loss shifts the same way).
        predictions, labels = predictions[:, :-1], labels[:, 1:]
    if predictions.shape != labels.shape:
        raise PeftkitError(
            f"cannot compute accuracy: argmax of the logits has shape {tuple(predictions.shape)} "
            f"but labels have shape {tuple(labels.shape)}"
        )
    counted = labels != -100
    return int((predictions == labels)[counted].sum()), int(counted.sum())


def predicts_next_token(model: torch.nn.Module) -> bool:
    """Whether ``model`` (or the transformers model it wraps) is a causal LM, whose labels are shifted."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    causal_names = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    inner = getattr(model, "base_model", None)
    return any(type(m).__name__ in causal_names for m in (model, inner) if m is not None)


def close_history_window(state: Any, step: int, epoch: float, evaluation: dict[str, float] | None) -> dict[str, Any]:
    """Append the history record of ``step`` to ``state.history`` and start a new loss window.

    ``state`` has ``history``, ``window_loss_sum`` and ``window_steps`` (the losses since the last
    record). The record is {epoch, step, train_loss (the window's mean, None if empty), eval}; it is
    returned, so the caller may add to it.
    """
    entry = {
        "epoch": epoch,
        "step": step,
        "train_loss": state.window_loss_sum / state.window_steps if state.window_steps else None,
        "eval": evaluation,
    }
    state.history.append(entry)
    state.window_loss_sum, state.window_steps = 0.0, 0
    return entry


def keep_best(state: Any, step: int, evaluation: dict[str, float], metric: str, greater_is_better: bool = True) -> bool:
    """Whether ``evaluation`` beats ``state.best_metric`` on ``metric``; if so, it becomes the best.

    ``state`` has ``best_metric``, ``best_step`` and ``best_eval``. The first evaluation is always the
    best so far; a tie keeps the earlier one.
    """
    value = evaluation[metric]
    best = state.best_metric
    improved = best is None or (value > best if greater_is_better else value < best)
    if improved:
        state.best_metric, state.best_step, state.best_eval = value, step, evaluation
    return improved
