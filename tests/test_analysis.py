"""rpg.experiments.task_zoo.analysis: IoU of misclassified sets."""
import torch

from rpg.experiments.task_zoo.analysis import max_iou_to_reference, misclassified_iou


def test_iou_of_identical_and_disjoint_error_sets():
    target = torch.tensor([0, 1, 0, 1, 0, 1])
    a = torch.tensor([[1, 1, 1, 1, 0, 1]])  # wrong on {0, 2}
    b = torch.tensor([[1, 1, 1, 1, 0, 1],  # same errors -> 1
                      [0, 0, 0, 1, 1, 1],  # wrong on {1, 4} -> 0
                      [1, 1, 0, 1, 0, 1]])  # wrong on {0} -> 1/2
    assert torch.allclose(misclassified_iou(a, b, target), torch.tensor([[1.0, 0.0, 0.5]]))


def test_max_iou_excludes_self_when_asked():
    target = torch.zeros(4, dtype=torch.long)
    preds = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1]])
    assert torch.allclose(max_iou_to_reference(preds, preds, target), torch.ones(3))
    assert torch.allclose(max_iou_to_reference(preds, preds, target, exclude_self=True),
                          torch.tensor([0.5, 0.5, 0.0]))


def test_perfect_classifiers_have_zero_iou():
    target = torch.tensor([0, 1])
    assert misclassified_iou(target[None], target[None], target).item() == 0.0
