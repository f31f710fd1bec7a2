"""Similarity of classifiers by their mistakes (after p-diff, Fig. 4): IoU of their sets of misclassified images.

A generated model as accurate as the originals but with a low maximum IoU against them is not a copy of one.
"""

from __future__ import annotations

import torch


def misclassified_iou(pred_a: torch.Tensor, pred_b: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """IoU of the misclassified sets, for every pair of rows.

    Shapes: pred_a (A, N), pred_b (B, N), target (N,) or (A, N) broadcastable -> (A, B).
    """
    wrong_a = (pred_a != target).float()  # (A, N)
    wrong_b = (pred_b != target).float()  # (B, N)
    inter = wrong_a @ wrong_b.T  # (A, B)
    union = wrong_a.sum(1)[:, None] + wrong_b.sum(1)[None, :] - inter
    return inter / union.clamp_min(1.0)


def max_iou_to_reference(pred: torch.Tensor, reference: torch.Tensor, target: torch.Tensor,
                         exclude_self: bool = False) -> torch.Tensor:
    """Each model's maximum IoU against a set of reference models (its nearest neighbour).

    Shapes: pred (A, N), reference (B, N), target (N,) -> (A,). With exclude_self (pred is reference), the
    diagonal is ignored.
    """
    iou = misclassified_iou(pred, reference, target)
    if exclude_self:
        iou = iou - 2.0 * torch.eye(len(pred), len(reference))
    return iou.max(dim=1).values
