"""probes/whole_model_cost.py: the FLOPs it counts per image are a conv's multiply-adds x 2 (forward) and about
three times that for a training step (backward: gradients of the input and of the weights)."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from conftest import REPO_ROOT


def _load_probe():
    spec = importlib.util.spec_from_file_location("whole_model_cost", REPO_ROOT / "probes" / "whole_model_cost.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_flops_per_image_counts_a_conv_forward_and_its_training_step():
    probe = _load_probe()
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1, bias=False), torch.nn.Flatten(),
                              torch.nn.Linear(4 * 8 * 8, 2, bias=False))
    conv, linear = 8 * 8 * 4 * 3 * 9, 4 * 8 * 8 * 2  # multiply-adds per image
    assert probe.flops_per_image(net, 8, train=False) == 2 * (conv + linear)
    # backward: the weight gradients of both layers and the linear layer's input gradient (the conv's input needs none)
    assert probe.flops_per_image(net, 8, train=True) == pytest.approx(2 * (2 * conv + 3 * linear))
