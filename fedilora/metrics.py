"""Task types and their loss, predictions and metrics, inferred from the label tensor alone.

The label tensor already says what the task is, so nothing else needs configuring:

* ``(N,)`` integers with more than two classes: **multiclass** (softmax, cross-entropy;
  accuracy, macro-F1);
* ``(N,)`` integers with two classes: **binary** (the same, plus AUROC from the softmax
  probability of class 1, the standard Hateful Memes metric);
* ``(N, C)`` multi-hot floats: **multilabel** (C independent sigmoids, BCE-with-logits; a label
  is predicted when its logit is > 0; accuracy is the exact-match subset accuracy, plus micro- and
  macro-F1, the standard MM-IMDb metrics).

``accuracy`` is always present, so per-round tables, reports and comparisons work for every task.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

Task = Literal["multiclass", "binary", "multilabel"]

# The metric a comparison of methods is decided on, per task (the benchmarks' standard ones).
HEADLINE: dict[str, str] = {"multiclass": "accuracy", "binary": "auroc", "multilabel": "micro_f1"}

METRICS: dict[str, tuple[str, ...]] = {
    "multiclass": ("accuracy", "macro_f1"),
    "binary": ("accuracy", "macro_f1", "auroc"),
    "multilabel": ("accuracy", "micro_f1", "macro_f1"),
}


def task_of(labels: torch.Tensor) -> Task:
    """The task a label tensor implies (see the module docstring)."""
    if labels.ndim == 2:
        return "multilabel"
    if labels.ndim != 1:
        raise ValueError(f"labels must be (N,) class ids or (N, C) multi-hot, got shape {tuple(labels.shape)}")
    return "binary" if num_classes(labels) == 2 else "multiclass"


def num_classes(labels: torch.Tensor) -> int:
    """Output width of the classifier head: the multi-hot width, or the largest class id + 1."""
    if labels.ndim == 2:
        return int(labels.shape[1])
    return int(labels.max()) + 1


def loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy for class ids, BCE-with-logits for multi-hot rows (labels are independent)."""
    if labels.ndim == 2:
        return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
    return F.cross_entropy(logits, labels)


def predictions(logits: torch.Tensor, task: Task) -> torch.Tensor:
    """Class ids (argmax), or a 0/1 matrix of the labels whose logit is positive."""
    if task == "multilabel":
        return (logits > 0).long()
    return logits.argmax(-1)


def empty(task: Task) -> dict[str, float]:
    """The metric keys of ``task``, all NaN: an empty split has no score, but the same keys."""
    return {name: float("nan") for name in METRICS[task]}


def compute(task: Task, truth: np.ndarray, logits: np.ndarray) -> dict[str, float]:
    """The task's metrics from the true labels and the model's logits (N, C)."""
    from sklearn.metrics import f1_score  # imported here: sklearn takes ~1.5 s, and most commands never score

    pred = predictions(torch.as_tensor(logits), task).numpy()
    if task == "multilabel":
        truth = np.asarray(truth).astype(np.int64)
        return {
            "accuracy": float((pred == truth).all(1).mean()),
            "micro_f1": float(f1_score(truth, pred, average="micro", zero_division=0)),
            "macro_f1": float(f1_score(truth, pred, average="macro", zero_division=0)),
        }
    out = {
        "accuracy": float((pred == truth).mean()),
        "macro_f1": float(f1_score(truth, pred, average="macro", zero_division=0)),
    }
    if task == "binary":
        out["auroc"] = auroc(truth, logits)
    return out


def auroc(truth: np.ndarray, logits: np.ndarray) -> float:
    """ROC AUC of the softmax probability of class 1; NaN when the truth holds one class only
    (AUROC is undefined there, and a tiny client test split can be like that)."""
    if len(np.unique(truth)) < 2:
        return float("nan")
    from sklearn.metrics import roc_auc_score

    prob = torch.softmax(torch.as_tensor(logits, dtype=torch.float64), -1)[:, 1].numpy()
    return float(roc_auc_score(truth, prob))
