"""Many heads of one shape trained at once: stacked parameters, one batched matmul per layer.

A *stack* holds T heads with the same structure (kind, hidden widths, batch norm, update
rule); every parameter is one tensor with a leading trial axis (``fc.weight``: (T, C, D)).
On a minibatch shared by all trials (search: every trial sees the same rows in the same
order) the first layer is one matmul of the (B, D) batch with all T weight matrices side by
side; once the trials' activations differ (dropout, batch norm, hidden layers) the layers are
``torch.baddbmm`` over the trial axis. The loss is the sum of the trials' own minibatch
losses, so one backward pass gives each trial exactly its own gradient, and the update rules
(SGD with momentum / Nesterov, Adam; torch's single-tensor formulas, weight decay on weights
only as ``training.optim`` does) run on the stacks with per-trial learning rate, weight
decay and momentum. Dropout rates and label smoothing are per trial too.

A trial in a stack is the head ``train_head`` trains with one worker and one averaging round
per epoch (``averaging_frequency >= ceil(n_train / batch)``) and the same seed: the same
initialization (``build_head(cfg, seed)``), the same rows in the same order each epoch
(``shards.partition_positions``), the same dropout masks (a generator per trial seeded by
``round_seed(seed, epoch, 0, 0)``), the same learning rate per epoch (``lr_at``); only
float rounding of the batched matmuls differs (tests/test_search.py checks <= 1e-5).

Curves train repeats on different subsets: each trial then has its own minibatch rows (a
(T, B, D) gather), still one ``baddbmm`` per layer.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ..training.averaging import one_torch_thread, round_seed
from ..training.heads import HeadConfig, build_head, head_params
from ..training.optim import OptimizerConfig, lr_at

#: torch's fused CPU optimizer kernels (torch >= 2.4)
_FUSED = hasattr(torch, "_fused_adam_") and hasattr(torch, "_fused_sgd_")

__all__ = ["structure_key", "Stack", "TrialSpec", "GroupTask", "GroupResult", "train_group"]


def structure_key(head: HeadConfig, optimizer: OptimizerConfig) -> tuple:
    """Trials with equal keys can share a stack: same parameter shapes and update rule."""
    return (head.kind, tuple(head.hidden), bool(head.batch_norm),
            "adam" if optimizer.name == "adam" else "sgd")


@dataclass(frozen=True)
class TrialSpec:
    """One trial of a group task: its head, update rule, and how far to train it."""

    trial: int  # the trial's id (for the results)
    head: HeadConfig
    optimizer: OptimizerConfig
    label_smoothing: float
    seed: int  # initialization, data order and dropout of this trial
    epochs: int  # the trial's whole budget (the cosine schedule spreads over it)
    start_epoch: int  # epochs already trained (its state travels in GroupTask.states)
    stop_epoch: int  # train up to here in this task


@dataclass(frozen=True)
class GroupTask:
    """A group of trials of one structure, trained together in one engine task.

    The result is a function of (store, trials, states) only: a task an engine reruns gives
    the same result. ``subsets[i]``: positions into the train split that trial i trains on
    (curves); None: the whole split (search). ``eval_splits``: splits scored at the end.
    """

    store_url: str
    storage_options: Mapping[str, Any]
    store_key: str
    trials: tuple[TrialSpec, ...]
    batch_size: int
    states: tuple[Any, ...] | None = None  # per trial (params, opt_state) or None: fresh
    subsets: tuple[np.ndarray, ...] | None = None
    eval_splits: tuple[str, ...] = ("val",)
    eval_train: bool = False  # also score each trial on its own training rows
    return_state: bool = True
    cache_bytes: int = 1 << 30
    return_predictions: bool = False  # each trial's predicted classes on ``eval_splits``


@dataclass
class GroupResult:
    """Per trial (in the task's order): scores, training statistics, state to continue from."""

    trials: list[int]
    scores: list[dict[str, Any]]  # split -> {"top1", "mean_per_class", "loss"}; "train_loss"
    states: list[Any] | None
    seconds: float
    diverged: list[bool] = field(default_factory=list)
    # per trial: split -> predicted class of each of its rows (``return_predictions``)
    predictions: list[dict[str, np.ndarray]] | None = None


# -- the stack --------------------------------------------------------------------------------

class Stack:
    """T heads of one structure as stacked tensors, with their update rule."""

    def __init__(self, trials: Sequence[TrialSpec], in_dim: int, n_classes: int,
                 states: Sequence[Any] | None = None):
        self.trials = list(trials)
        self.T = len(trials)
        h0 = trials[0].head
        self.kind, self.hidden, self.bn = h0.kind, tuple(h0.hidden), h0.batch_norm
        self.adam = trials[0].optimizer.name == "adam"
        o0 = trials[0].optimizer
        self.betas, self.eps = o0.betas, o0.eps
        per: list[tuple[Mapping[str, np.ndarray], Mapping[str, np.ndarray] | None]] = []
        for i, t in enumerate(trials):
            st = None if states is None else states[i]
            if st is None:
                module = build_head(t.head, in_dim, n_classes, seed=t.seed)
                per.append((head_params(module), None))
            else:
                per.append(st)
        # what the optimizer updates: the head's parameters (not BatchNorm's statistics)
        trainable = {k for k, _ in build_head(h0, in_dim, n_classes).named_parameters()}
        self.tensors: OrderedDict[str, torch.Tensor] = OrderedDict()
        for k in per[0][0]:
            stacked = torch.from_numpy(np.stack([np.asarray(p[k]) for p, _ in per]))
            self.tensors[k] = stacked.requires_grad_(True) if k in trainable else stacked
        self.params = [(k, v) for k, v in self.tensors.items() if v.requires_grad]
        f32 = dict(dtype=torch.float32)
        self.in_p = torch.tensor([t.head.input_dropout for t in trials], **f32)
        self.hid_p = torch.tensor([t.head.dropout for t in trials], **f32)
        self.smooth = torch.tensor([t.label_smoothing for t in trials], **f32)
        self.wd = torch.tensor([t.optimizer.weight_decay for t in trials], **f32)
        self.momentum = torch.tensor([t.optimizer.momentum for t in trials], **f32)
        self.nesterov = torch.tensor([t.optimizer.name == "nesterov" for t in trials])
        self.has_momentum = bool((self.momentum > 0).any()) and not self.adam
        # optimizer state, keyed as training.optim names it ("<param>.<slot>")
        self.state: dict[str, torch.Tensor] = {}
        for k, v in self.params:
            slots = ("exp_avg", "exp_avg_sq") if self.adam else \
                (("momentum_buffer",) if self.has_momentum else ())
            for s in slots:
                self.state[f"{k}.{s}"] = torch.zeros_like(v, requires_grad=False)
            if self.adam:
                self.state[f"{k}.step"] = torch.zeros(self.T, dtype=torch.float32)
        for i, (_, opt_state) in enumerate(per):
            for key, arr in (opt_state or {}).items():
                if key in self.state:
                    self.state[key][i] = torch.from_numpy(np.asarray(arr, np.float32)).reshape(
                        self.state[key][i].shape)

    # -- forward ------------------------------------------------------------------------------
    def _linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        w, b = self.tensors[f"{name}.weight"], self.tensors[f"{name}.bias"]
        if x.dim() == 2:  # one batch for all trials: one matmul with the weights side by side
            T, O, D = w.shape
            y = (x @ w.reshape(T * O, D).t()).reshape(x.shape[0], T, O).transpose(0, 1)
            return y + b.unsqueeze(1)
        # (T, O, D) @ (T, D, B): the weight's gradient comes out in the weight's own layout
        return torch.baddbmm(b.unsqueeze(2), w, x.transpose(1, 2)).transpose(1, 2)

    def _dropout(self, x: torch.Tensor, p: torch.Tensor,
                 gens: Sequence["torch.Generator | int"] | None) -> torch.Tensor:
        """Per trial, SeededDropout's mask from its generator; ``gens[i]`` an int j < i: trial
        i's generator would draw what trial j's draws (``mask_generators``), so it is copied."""
        if gens is None or not bool((p > 0).any()):
            return x
        if x.dim() == 2:
            x = x.unsqueeze(0).expand(self.T, *x.shape)
        keep = torch.empty(x.shape, dtype=x.dtype)
        for i, pi in enumerate(p.tolist()):
            if pi > 0 and isinstance(gens[i], int):
                keep[i].copy_(keep[gens[i]])
            elif pi > 0:  # SeededDropout's draw, from the trial's own generator
                keep[i].bernoulli_(1.0 - pi, generator=gens[i])
            else:
                keep[i].fill_(1.0)
        return x * keep / (1.0 - p).view(-1, 1, 1)

    def _batch_norm(self, x: torch.Tensor, name: str, train: bool) -> torch.Tensor:
        if x.dim() == 2:
            x = x.unsqueeze(0).expand(self.T, *x.shape)
        w, b = self.tensors[f"{name}.weight"], self.tensors[f"{name}.bias"]
        rm, rv = self.tensors[f"{name}.running_mean"], self.tensors[f"{name}.running_var"]
        T, B, F = x.shape
        # the trials side by side as one BatchNorm over T x F features: torch's own kernel,
        # per feature exactly what each trial's BatchNorm1d computes (and its running stats)
        training = train and B > 1  # a batch of one: fit_shard uses the running statistics
        y = torch.nn.functional.batch_norm(
            x.transpose(0, 1).reshape(B, T * F), rm.view(-1), rv.view(-1), w.reshape(-1),
            b.reshape(-1), training=training, momentum=0.1, eps=1e-5)
        if training:
            self.tensors[f"{name}.num_batches_tracked"].add_(1)
        return y.reshape(B, T, F).transpose(0, 1)

    def forward(self, x: torch.Tensor, *, train: bool,
                gens: Sequence[torch.Generator] | None = None) -> torch.Tensor:
        """(B, D) shared or (T, B, D) per-trial features -> (T, B, C) logits."""
        g = gens if train else None
        x = self._dropout(x, self.in_p, g)
        if self.kind == "softmax":
            if self.bn:
                x = self._batch_norm(x, "bn", train)
            return self._linear(x, "fc")
        for i in range(len(self.hidden)):
            x = self._linear(x, f"fc{i}")
            if self.bn:
                x = self._batch_norm(x, f"bn{i}", train)
            x = torch.relu(x)
            x = self._dropout(x, self.hid_p, g)
        return self._linear(x, "out")

    def losses(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(T,) mean cross entropy of each trial, with its own label smoothing (torch's formula)."""
        logp = torch.log_softmax(logits, dim=-1)
        yy = y if y.dim() == 2 else y.unsqueeze(0).expand(self.T, -1)
        nll = -logp.gather(2, yy.unsqueeze(2)).squeeze(2).mean(1)
        smooth = -logp.mean(2).mean(1)
        return (1.0 - self.smooth) * nll + self.smooth * smooth

    # -- update -------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, lr: torch.Tensor, active: Sequence[int] | None = None) -> None:
        """One update of the ``active`` trials (default all; ``lr``: (T,)), torch's rules.

        The work per step is that of T separate updates (every trial has its own
        parameters), memory-bound: torch's fused optimizer kernels (``_fused_adam_``,
        ``_fused_sgd_``: one pass over a parameter, its gradient and its state) run on each
        trial's slice of the stack, with its own learning rate, weight decay (on weights
        only, as ``training.optim``) and momentum -- several times faster than the
        stack-wide formulas (``_step_stacked``, used where torch has no fused kernels), to
        float rounding of the same formulas."""
        if not _FUSED:
            return self._step_stacked(lr)
        trials = range(self.T) if active is None else [int(i) for i in active]
        lrs, wds = lr.tolist(), self.wd.tolist()
        moms, nest = self.momentum.tolist(), self.nesterov.tolist()
        for k, p in self.params:
            g = p.grad
            weight = p.dim() >= 3  # a weight of each trial (not a bias, not BatchNorm's)
            if self.adam:
                b1, b2 = self.betas
                ea, eas = self.state[f"{k}.exp_avg"], self.state[f"{k}.exp_avg_sq"]
                step = self.state[f"{k}.step"]
                step.add_(1)
                for i in trials:
                    torch._fused_adam_([p[i]], [g[i]], [ea[i]], [eas[i]], [], [step[i]],
                                       amsgrad=False, lr=lrs[i], beta1=b1, beta2=b2,
                                       weight_decay=wds[i] if weight else 0.0, eps=self.eps,
                                       maximize=False)
            else:
                buf = self.state.get(f"{k}.momentum_buffer")
                for i in trials:
                    m = moms[i] if buf is not None else 0.0
                    torch._fused_sgd_([p[i]], [g[i]], [buf[i]] if m > 0 else [],
                                      weight_decay=wds[i] if weight else 0.0, momentum=m,
                                      lr=lrs[i], dampening=0.0, nesterov=bool(nest[i]) and m > 0,
                                      maximize=False, is_first_step=False)
            p.grad = None

    @torch.no_grad()
    def _step_stacked(self, lr: torch.Tensor) -> None:
        """``step`` as stack-wide formulas (torch's single-tensor rules, ``addcmul_`` and
        ``addcdiv_`` fused), for a torch without the fused optimizer kernels."""
        any_wd = bool((self.wd > 0).any())
        for k, p in self.params:
            g = p.grad
            shape = (self.T,) + (1,) * (p.dim() - 1)
            if p.dim() >= 3 and any_wd:  # a weight of each trial: L2, as training.optim does
                g.addcmul_(self.wd.view(shape), p)  # in place: the gradient is not kept
            if self.adam:
                b1, b2 = self.betas
                ea, eas = self.state[f"{k}.exp_avg"], self.state[f"{k}.exp_avg_sq"]
                step = self.state[f"{k}.step"]
                step.add_(1)
                ea.lerp_(g, 1 - b1)
                eas.mul_(b2).addcmul_(g, g, value=1 - b2)
                s = step.double()
                bc2_sqrt = (1 - b2 ** s).sqrt().float().view(shape)
                step_size = (lr.double() / (1 - b1 ** s)).float().view(shape)
                denom = eas.sqrt().div_(bc2_sqrt).add_(self.eps)
                p.addcdiv_(ea.mul(step_size), denom, value=-1.0)
            else:
                if self.has_momentum:
                    buf = self.state[f"{k}.momentum_buffer"]
                    m = self.momentum.view(shape)
                    buf.mul_(m).add_(g)
                    if bool(self.nesterov.all()):
                        g = g.addcmul_(m, buf)
                    elif bool(self.nesterov.any()):
                        g = torch.where(self.nesterov.view(shape), g + m * buf, buf)
                    else:
                        g = buf
                p.addcmul_(g, lr.view(shape), value=-1.0)
            p.grad = None

    def trial_state(self, i: int) -> tuple["OrderedDict[str, np.ndarray]", "OrderedDict[str, np.ndarray]"]:
        """Trial i's parameters (head_params' form) and optimizer state (training.optim's)."""
        params = OrderedDict((k, v[i].detach().numpy().copy()) for k, v in self.tensors.items())
        state = OrderedDict((k, v[i].detach().numpy().copy()) for k, v in self.state.items())
        return params, state


# -- the task ---------------------------------------------------------------------------------

def _train_data(task: GroupTask) -> tuple[Any, np.ndarray, np.ndarray, np.ndarray]:
    """(store, train rows, features of every train row and its views, labels), from the
    worker cache training uses (``shards.read_cached``, the key ``load_round`` uses)."""
    from ..store import cached_store
    from ..training.shards import _with_views, feature_parts, read_cached, split_rows

    store = cached_store(task.store_url, task.storage_options)
    train = split_rows(task.store_url, "train", task.storage_options, task.store_key)
    parts = feature_parts("train", task, "train") + ("all",)
    x, y = read_cached(parts, task.store_url, task.storage_options, _with_views(store, train),
                       task.cache_bytes)
    return store, train, x, y


def _eval_data(task: GroupTask, split: str) -> tuple[np.ndarray, np.ndarray]:
    from ..training.shards import feature_parts, read_cached, split_rows

    rows = split_rows(task.store_url, split, task.storage_options, task.store_key)
    return read_cached(feature_parts("eval", task, split), task.store_url, task.storage_options,
                       np.asarray(rows), task.cache_bytes)


def _pooled(x: np.ndarray) -> torch.Tensor:
    """Stored features as the head's input: maps are averaged over H and W (``train_from
    head``: the global pooling in front of the head)."""
    import warnings

    with warnings.catch_warnings():  # the cached arrays are read-only, and only read here
        warnings.simplefilter("ignore", UserWarning)
        t = torch.from_numpy(np.ascontiguousarray(x))
    return t.mean((2, 3)) if t.dim() == 4 else t


def epoch_positions(task: GroupTask, store: Any, train: np.ndarray, t: TrialSpec, i: int,
                    epoch: int) -> np.ndarray:
    """Indices into the cached train features of trial i's rows in ``epoch``, in order."""
    from ..training.shards import partition_positions

    if task.subsets is None:  # the order train_head's single worker uses
        pos = partition_positions(len(train), seed=t.seed, epoch=epoch, n_parts=1, part=0,
                                  repartition="epoch")
    else:
        sub = np.asarray(task.subsets[i])
        pos = sub[np.random.default_rng([t.seed, 17, epoch]).permutation(len(sub))]
    per_image = store.train_views + 1
    if per_image > 1:
        return pos * per_image + store.view_choice(train[pos], seed=t.seed, epoch=epoch)
    return pos


def accuracy_scores(logits: torch.Tensor, y: np.ndarray, n_classes: int) -> list[dict[str, float]]:
    """Per trial: top1, mean per-class recall (``evaluation.metrics``' definitions) and the
    mean cross entropy (``loss``: a smoother score than accuracy on a small split)."""
    pred = logits.argmax(-1).numpy()
    out = []
    yy = np.asarray(y)
    yt_all = torch.from_numpy(np.ascontiguousarray(yy, np.int64))
    yt_all = yt_all if yy.ndim == 2 else yt_all.unsqueeze(0).expand(pred.shape[0], -1)
    with torch.no_grad():
        nll = -torch.log_softmax(logits.float(), -1).gather(2, yt_all.unsqueeze(2)).squeeze(2)
        loss = nll.mean(1).tolist() if nll.shape[1] else [None] * pred.shape[0]
    for t in range(pred.shape[0]):
        yt = yy if yy.ndim == 1 else yy[t]  # (n,) for all trials, or each trial's own rows
        right = pred[t] == yt
        support = np.bincount(yt, minlength=n_classes)
        hits = np.bincount(yt, weights=right, minlength=n_classes)
        present = support > 0
        finite = loss[t] is not None and math.isfinite(loss[t])
        out.append({"top1": float(right.mean()) if len(yt) else None,
                    "mean_per_class": float((hits[present] / support[present]).mean())
                    if present.any() else None,
                    "loss": float(loss[t]) if finite else None})
    return out


def _eval(stack: Stack, x: torch.Tensor, block: int = 4096) -> torch.Tensor:
    with torch.no_grad():
        parts = [stack.forward(x[..., s:s + block, :] if x.dim() == 3 else x[s:s + block],
                               train=False) for s in range(0, x.shape[-2], block)]
    return torch.cat(parts, dim=1)


def train_group(task: GroupTask, shared: Any = None) -> GroupResult:
    """Train a group's trials from ``start_epoch`` to ``stop_epoch`` together and score them."""
    import time

    t0 = time.perf_counter()
    with one_torch_thread():
        store, train, x_np, y_np = _train_data(task)
        n_classes = len(store.classes)
        x_all, y_all = _pooled(x_np), torch.from_numpy(np.asarray(y_np, np.int64))
        stack = Stack(task.trials, int(x_all.shape[1]), n_classes, task.states)
        trials = task.trials
        start = np.array([t.start_epoch for t in trials])
        stop = np.array([t.stop_epoch for t in trials])
        loss_sum = np.zeros(stack.T)
        seen = np.zeros(stack.T)
        correct = np.zeros(stack.T)
        diverged = np.zeros(stack.T, dtype=bool)
        for j in range(int((stop - start).max(initial=0))):
            active = np.flatnonzero(start + j < stop)
            epochs = start + j
            idx = [epoch_positions(task, store, train, t, i, int(epochs[i]))
                   for i, t in enumerate(trials)]
            # one batch for all when every training trial has the same rows in the same order
            shared_rows = all(np.array_equal(idx[i], idx[active[0]]) for i in active)
            gens = mask_generators(stack, trials, epochs)
            lr = torch.tensor([lr_at(t.optimizer, int(epochs[i]), 0, 1, t.epochs)
                               if i in set(active.tolist()) else 0.0
                               for i, t in enumerate(trials)], dtype=torch.float32)
            frozen = _freeze(stack, active)
            n = len(idx[active[0]])
            for s in range(0, n, task.batch_size):
                if shared_rows:
                    rows = torch.from_numpy(idx[active[0]][s:s + task.batch_size])
                    xb, yb = x_all[rows], y_all[rows]
                else:
                    rows = torch.from_numpy(np.stack([ix[s:s + task.batch_size] for ix in idx]))
                    xb, yb = x_all[rows], y_all[rows]
                logits = stack.forward(xb, train=True, gens=gens)
                loss = stack.losses(logits, yb)
                loss.sum().backward()
                stack.step(lr, active)
                with torch.no_grad():
                    b = yb.shape[-1]
                    loss_sum[active] += loss.detach().numpy()[active] * b
                    seen[active] += b
                    yy = yb if yb.dim() == 2 else yb.unsqueeze(0)
                    correct[active] += (logits.argmax(-1) == yy).sum(1).numpy()[active]
            _restore(stack, frozen)
            diverged |= ~np.isfinite(loss_sum)
        for i in range(stack.T):
            if not diverged[i]:
                diverged[i] = not all(bool(torch.isfinite(v[i]).all())
                                      for v in stack.tensors.values()
                                      if v.dtype.is_floating_point)
        scores: list[dict[str, Any]] = [{} for _ in trials]
        preds: list[dict[str, np.ndarray]] = [{} for _ in trials]
        for split in task.eval_splits:
            xv, yv = _eval_data(task, split)
            if len(yv) == 0:
                continue
            logits = _eval(stack, _pooled(xv))
            for i, sc in enumerate(accuracy_scores(logits, yv, n_classes)):
                scores[i][split] = sc
            if task.return_predictions:
                for i, p in enumerate(logits.argmax(-1).numpy().astype(np.int32)):
                    preds[i][split] = p
        if task.eval_train:
            rows = np.stack([np.asarray(s) if task.subsets is not None else np.arange(len(train))
                             for s in (task.subsets or [None] * stack.T)])
            rows_x = rows * (store.train_views + 1)  # each image's own row, not a view
            logits = _eval(stack, x_all[torch.from_numpy(rows_x)])
            for i, sc in enumerate(accuracy_scores(logits, y_np[rows_x], n_classes)):
                scores[i]["train"] = sc
        for i in range(stack.T):
            scores[i]["train_loss"] = float(loss_sum[i] / seen[i]) if seen[i] else None
            scores[i]["train_accuracy"] = float(correct[i] / seen[i]) if seen[i] else None
            if diverged[i]:
                for split in (*task.eval_splits, "train"):
                    scores[i].pop(split, None)
                    preds[i].pop(split, None)
                scores[i]["train_loss"] = None
        states = [stack.trial_state(i) for i in range(stack.T)] if task.return_state else None
    return GroupResult(trials=[t.trial for t in trials], scores=scores, states=states,
                       seconds=time.perf_counter() - t0, diverged=diverged.tolist(),
                       predictions=preds if task.return_predictions else None)


def mask_generators(stack: Stack, trials: Sequence[TrialSpec], epochs: np.ndarray
                    ) -> list["torch.Generator | int"]:
    """Each trial's dropout generator for this epoch (``round_seed(seed, epoch, 0, 0)``, as
    ``fit_shard`` seeds it), or the index of an earlier trial whose generator is seeded the
    same and draws the same masks (same dropout rates, so the same sequence of draws of the
    same shapes): trials of a search share their seed, so trials with equal dropout rates
    draw their masks once (drawing them is a large part of a stack's step)."""
    out: list[torch.Generator | int] = []
    first: dict[tuple, int] = {}
    in_p, hid_p = stack.in_p.tolist(), stack.hid_p.tolist()
    for i, t in enumerate(trials):
        seed = round_seed(t.seed, int(epochs[i]), 0, 0)
        key = (seed, in_p[i], hid_p[i])
        if key in first:
            out.append(first[key])
        else:
            first[key] = i
            out.append(torch.Generator().manual_seed(seed))
    return out


def _freeze(stack: Stack, active: np.ndarray) -> dict[str, torch.Tensor] | None:
    """Copies of the tensors of the trials not training this epoch (restored afterwards):
    their learning rate is 0, but momentum and BatchNorm statistics would still move."""
    if len(active) == stack.T:
        return None
    keep = torch.from_numpy(np.setdiff1d(np.arange(stack.T), active))
    out = {k: v.detach()[keep].clone() for k, v in stack.tensors.items()}
    out.update({f"state:{k}": v[keep].clone() for k, v in stack.state.items()})
    out["_idx"] = keep
    return out


@torch.no_grad()
def _restore(stack: Stack, frozen: dict[str, torch.Tensor] | None) -> None:
    if frozen is None:
        return
    keep = frozen["_idx"]
    for k, v in stack.tensors.items():
        v[keep] = frozen[k]
    for k, v in stack.state.items():
        v[keep] = frozen[f"state:{k}"]
