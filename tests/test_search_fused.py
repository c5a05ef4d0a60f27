"""The stack's update through torch's fused optimizer kernels (one call per trial's slice)
is the stack-wide formula it replaced (kept for a torch without those kernels), per trial
with its own lr, weight decay (weights only), momentum / Nesterov, and Adam."""
from __future__ import annotations

import copy

import numpy as np

import pytest
import torch

from deeptransfer.selection import vectorized as V
from deeptransfer.training import HeadConfig, OptimizerConfig


def _stack(head, opts):
    trials = [V.TrialSpec(i, head, o, 0.0, seed=i, epochs=3, start_epoch=0, stop_epoch=3)
              for i, o in enumerate(opts)]
    return V.Stack(trials, 12, 5)


OPTS = {
    "sgd-momentum-nesterov": [OptimizerConfig("nesterov", lr=0.05, weight_decay=1e-3),
                              OptimizerConfig("sgd", lr=0.1, momentum=0.5),
                              OptimizerConfig("sgd", lr=0.02, momentum=0.0, weight_decay=1e-2)],
    "sgd-plain": [OptimizerConfig("sgd", lr=0.1, momentum=0.0),
                  OptimizerConfig("sgd", lr=0.03, momentum=0.0, weight_decay=1e-3)],
    "adam": [OptimizerConfig("adam", lr=0.01), OptimizerConfig("adam", lr=0.003, weight_decay=1e-2)],
}


@pytest.mark.skipif(not V._FUSED, reason="this torch has no fused optimizer kernels")
@pytest.mark.parametrize("case", sorted(OPTS))
@pytest.mark.parametrize("head", [HeadConfig("softmax", batch_norm=True),
                                  HeadConfig("mlp", hidden=(6,), dropout=0.2)],
                         ids=["linear-bn", "mlp"])
def test_fused_updates_are_the_stacked_formulas(case, head):
    a = _stack(head, OPTS[case])
    b = copy.deepcopy(a)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 12, generator=g), torch.randint(0, 5, (8,), generator=g)
    lr = torch.tensor([o.lr for o in OPTS[case]])
    for _ in range(4):
        for s, fused in ((a, True), (b, False)):
            s.losses(s.forward(x, train=True), y).sum().backward()
            if fused:
                s.step(lr)
            else:
                s._step_stacked(lr)
    for k in a.tensors:
        torch.testing.assert_close(a.tensors[k], b.tensors[k], rtol=1e-5, atol=1e-6, msg=k)
        assert not torch.equal(a.tensors[k], _stack(head, OPTS[case]).tensors[k]) or \
            not a.tensors[k].requires_grad, f"{k} did not move"
    # the optimizer state too (an SGD trial without momentum keeps none)
    for k in a.state:
        mom = torch.tensor([o.momentum > 0 or o.name == "adam" for o in OPTS[case]])
        sel = mom if k.endswith("momentum_buffer") else torch.ones_like(mom)
        torch.testing.assert_close(a.state[k][sel], b.state[k][sel], rtol=1e-5, atol=1e-6, msg=k)


def test_only_the_active_trials_move():
    a = _stack(HeadConfig("softmax"), OPTS["adam"])
    before = {k: v.detach().clone() for k, v in a.tensors.items()}
    x, y = torch.randn(4, 12), torch.randint(0, 5, (4,))
    a.losses(a.forward(x, train=True), y).sum().backward()
    a.step(torch.tensor([0.01, 0.01]), active=[1])
    w = a.tensors["fc.weight"]
    assert torch.equal(w[0], before["fc.weight"][0]) and not torch.equal(w[1], before["fc.weight"][1])


def test_trials_with_equal_dropout_share_their_masks_and_keep_them():
    """Trials of one seed and equal dropout rates draw the same masks: drawn once, copied;
    the masks are still each trial's own SeededDropout draws."""
    head = HeadConfig("mlp", hidden=(6,), dropout=0.3, input_dropout=0.2)
    heads = [head, head, HeadConfig("mlp", hidden=(6,), dropout=0.3, input_dropout=0.0), head]
    trials = [V.TrialSpec(i, h, OptimizerConfig("adam", lr=0.01), 0.0, seed=7, epochs=2,
                          start_epoch=0, stop_epoch=2) for i, h in enumerate(heads)]
    stack = V.Stack(trials, 12, 5)
    gens = V.mask_generators(stack, trials, np.array([0, 0, 0, 1]))
    assert gens[1] == 0 and isinstance(gens[0], torch.Generator)
    assert isinstance(gens[2], torch.Generator) and isinstance(gens[3], torch.Generator)
    x = torch.ones(4, 12)
    got = stack._dropout(x, stack.in_p, gens)
    want = [torch.empty(4, 12).bernoulli_(0.8, generator=torch.Generator().manual_seed(
        V.round_seed(7, e, 0, 0))) / 0.8 for e in (0, 0, 0, 1)]
    for i in (0, 1, 3):
        torch.testing.assert_close(got[i], want[i], rtol=0, atol=0)
    assert torch.equal(got[2], x) and not torch.equal(got[0], got[3])
