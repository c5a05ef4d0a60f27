"""What the report shows, computed from a saved model and its feature store (no HTML here).

``collect(executor, model_dir, store_url)`` returns one ``ReportData``: plain lists and dicts
(JSON-able, so a test or another renderer can use them):

- headline metrics and the per-class table of ``evaluation.metrics`` on the report's split
  (test, else val), from the probabilities ``evaluation.predict_split`` gives;
- the most confused (true, predicted) class pairs with their examples, a top-loss gallery
  (wrong, ranked by the loss of the given label), a low-margin gallery (smallest gap between
  the two best classes: the "difficult" images);
- suspected label errors, confident-learning style (Northcutt et al., 2021): out-of-fold
  probabilities of the train split from k refits of a head on the cached train features (one
  engine task per fold), a per-class threshold t_j = the mean out-of-fold probability of class
  j over the rows labelled j, and a row is suspect when some other class clears its threshold
  with a higher probability than any class that does (the off-diagonal of the confident
  joint), ranked by the given label's probability;
- the score-vs-iteration curve from rounds.jsonl (raw and smoothed), and the learning curve
  and search results when their files are there.

Gallery rows carry store rows and paths only; ``thumbnails`` turns those into small JPEGs.
"""
from __future__ import annotations

import base64
import io
import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from ..errors import InvalidParameterError, StoreError, check_int
from ..executor import Executor

__all__ = ["ReportData", "ReportOptions", "collect", "out_of_fold", "confident_errors",
           "thumbnail", "read_optional_json"]

SEARCH_FILE = os.path.join("search", "results.json")
CURVE_FILE = os.path.join("curve", "curve.json")


@dataclass(frozen=True)
class ReportOptions:
    """How much the report shows (caps keep a 257-class page small)."""

    split: str | None = None  # None: test, else val
    pairs: int = 20  # confused class pairs
    pair_examples: int = 4  # thumbnails per pair
    gallery: int = 36  # images per gallery (top losses, low margin, label errors)
    folds: int = 5  # out-of-fold refits for the label errors (0: none)
    oof_epochs: int = 30  # epochs of each refit
    seed: int = 0
    thumb_px: int = 96  # longest side of a thumbnail
    search: str | None = None  # search results JSON (default: MODEL/search/results.json)
    curve: str | None = None  # learning curve JSON (default: MODEL/curve/curve.json)

    def check(self) -> None:
        w = "report"
        check_int("pairs", self.pairs, low=0, where=w)
        check_int("pair_examples", self.pair_examples, low=0, where=w)
        check_int("gallery", self.gallery, low=0, where=w)
        check_int("folds", self.folds, low=0, where=w)
        if self.folds == 1:
            raise InvalidParameterError(
                "The 'folds' parameter of report must be 0 (no label-error search) or at least "
                "2 (out-of-fold refits). Got 1.", param="folds")
        check_int("oof_epochs", self.oof_epochs, low=1, where=w)
        check_int("thumb_px", self.thumb_px, low=16, high=512, where=w)


@dataclass
class ReportData:
    """Everything the page shows; ``to_dict()`` is JSON-able."""

    title: str
    model_dir: str
    store_url: str
    split: str
    classes: list[str]
    headline: dict[str, Any]
    per_class: list[dict[str, Any]]
    pairs: list[dict[str, Any]]  # {true, pred, count, share, examples: [item]}
    top_losses: list[dict[str, Any]]  # item: {row, path, label, pred, p_label, p_pred, loss, margin}
    low_margin: list[dict[str, Any]]
    label_errors: list[dict[str, Any]] | None  # None: not computed (folds=0)
    label_error_count: int  # suspects in all (the gallery shows the first ``gallery``)
    label_error_rows: list[int]  # every suspect's store row, least likely label first
    oof_accuracy: float | None
    rounds: list[dict[str, Any]]  # {iteration, loss, smoothed, train_accuracy, epoch}
    epochs: list[dict[str, Any]]  # per-epoch validation (from the model's checkpoint history)
    curve: dict[str, Any] | None
    search: dict[str, Any] | None
    training: dict[str, Any] = field(default_factory=dict)  # the model's training options
    thumbs: dict[int, str] = field(default_factory=dict)  # store row -> data: URI

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def gallery_rows(self) -> list[int]:
        """Every store row some gallery shows (each gets one thumbnail)."""
        rows: list[int] = []
        for p in self.pairs:
            rows += [e["row"] for e in p["examples"]]
        for g in (self.top_losses, self.low_margin, self.label_errors or []):
            rows += [e["row"] for e in g]
        return list(dict.fromkeys(rows))


# -- probabilities ----------------------------------------------------------------------------

def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _items(rows: np.ndarray, labels: np.ndarray, prob: np.ndarray, paths: Sequence[str],
           idx: Sequence[int]) -> list[dict[str, Any]]:
    """Gallery items of positions ``idx`` of a split."""
    out = []
    for i in idx:
        p = prob[i]
        order = np.argsort(-p, kind="stable")
        y, top = int(labels[i]), int(order[0])
        second = float(p[order[1]]) if len(p) > 1 else 0.0
        out.append({"row": int(rows[i]), "path": str(paths[i]), "label": y, "pred": top,
                    "p_label": float(p[y]), "p_pred": float(p[top]),
                    "loss": float(-math.log(max(float(p[y]), 1e-300))),
                    "margin": float(p[top]) - second})
    return out


def confused_pairs(labels: np.ndarray, prob: np.ndarray, n_pairs: int, n_examples: int
                   ) -> list[tuple[int, int, int, list[int]]]:
    """The ``n_pairs`` most frequent (true, predicted) mistakes, as (true, pred, count,
    positions of its examples, most confident first); ties by class indices."""
    pred = prob.argmax(axis=1)
    wrong = np.flatnonzero(pred != labels)
    if not len(wrong) or n_pairs == 0:
        return []
    c = prob.shape[1]
    code = labels[wrong].astype(np.int64) * c + pred[wrong]
    uniq, counts = np.unique(code, return_counts=True)
    order = np.lexsort((uniq, -counts))[:n_pairs]  # count descending, then class order
    out = []
    for j in order:
        t, p = divmod(int(uniq[j]), c)
        members = wrong[code == uniq[j]]
        members = members[np.argsort(-prob[members, p], kind="stable")][:n_examples]
        out.append((t, p, int(counts[j]), [int(m) for m in members]))
    return out


# -- out-of-fold probabilities and confident learning ---------------------------------------

@dataclass(frozen=True)
class FoldTask:
    """Refit a head on every train row but fold ``fold``'s, predict fold ``fold``."""

    store_url: str
    fold: int
    folds: int
    seed: int
    storage_options: Mapping[str, Any] = field(default_factory=dict)


MIN_STEPS = 200  # fewest optimizer steps of an out-of-fold refit


@dataclass(frozen=True)
class FoldState:
    head: Any  # HeadConfig dict of the refit
    epochs: int
    lr: float
    batch_size: int = 64


def fold_of(n: int, labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """A stratified, seeded fold number per row (each class dealt round-robin)."""
    rng = np.random.default_rng(seed)
    out = np.zeros(n, np.int64)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        out[idx] = (np.arange(len(idx)) + int(rng.integers(folds))) % folds
    return out


def _pooled(x: np.ndarray) -> np.ndarray:
    """Vectors as they are; C x H x W maps averaged over H x W (a refit trains a head only)."""
    x = np.asarray(x, dtype=np.float32)
    return x.reshape(len(x), x.shape[1], -1).mean(axis=2) if x.ndim > 2 else x


def fit_fold(task: FoldTask, shared: FoldState) -> tuple[np.ndarray, np.ndarray]:
    """Engine task: (positions within the train split, their out-of-fold probabilities)."""
    import torch

    from ..store import cached_store
    from ..training.averaging import one_torch_thread
    from ..training.heads import HeadConfig, build_head, loss_fn

    store = cached_store(task.store_url, task.storage_options)
    rows = store.split_rows("train")
    x, y = store.read_rows(rows)
    x, y = _pooled(x), np.asarray(y, np.int64)
    fold = fold_of(len(y), y, task.folds, task.seed)
    fit, held = np.flatnonzero(fold != task.fold), np.flatnonzero(fold == task.fold)
    c = len(store.classes)
    with one_torch_thread():
        torch.manual_seed(task.seed + task.fold)
        head = build_head(HeadConfig.from_dict(shared.head), x.shape[1], c,
                          seed=task.seed + 1000 * task.fold)
        opt = torch.optim.Adam(head.parameters(), lr=shared.lr)
        xt, yt = torch.from_numpy(x[fit]), torch.from_numpy(y[fit])
        rng = np.random.default_rng([task.seed, task.fold])
        head.train()
        # a small train split has few minibatches an epoch: at least MIN_STEPS steps, so
        # that each refit converges (an under-fit head's thresholds flag nothing)
        per_epoch = max(1, -(-len(fit) // shared.batch_size))
        for _ in range(max(shared.epochs, -(-MIN_STEPS // per_epoch))):
            perm = torch.from_numpy(rng.permutation(len(fit)))
            for s in range(0, len(fit), shared.batch_size):
                b = perm[s:s + shared.batch_size]
                if len(b) < 2 and len(fit) >= 2:
                    continue  # BatchNorm needs two examples
                loss = loss_fn(head(xt[b]), yt[b])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        head.eval()
        with torch.no_grad():
            logits = head(torch.from_numpy(x[held])).numpy()
    return held, softmax(logits).astype(np.float32)


def out_of_fold(executor: Executor, store_url: str, head: Mapping[str, Any], *, folds: int = 5,
                epochs: int = 30, lr: float = 1e-3, seed: int = 0,
                storage_options: Mapping | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train rows, their labels, out-of-fold probabilities): ``folds`` refits of ``head``
    on the train split's cached features, one engine task each."""
    from ..store import cached_store

    store = cached_store(store_url, storage_options)
    rows = store.split_rows("train")
    labels = np.asarray(store["labels"][:])[rows].astype(np.int64)
    prob = np.zeros((len(rows), len(store.classes)), np.float32)
    tasks = [FoldTask(store_url, f, folds, seed, dict(storage_options or {}))
             for f in range(folds)]
    state = FoldState(head=dict(head), epochs=epochs, lr=lr)
    for _, (held, p) in executor.map_unordered(fit_fold, tasks, shared=state):
        prob[held] = p
    return rows, labels, prob


def confident_errors(labels: np.ndarray, prob: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(suspect positions ranked by the given label's probability, per-class thresholds).

    t_j = mean of p_j over rows labelled j (classes without rows: 1, never cleared); row i is
    a suspect when the most probable class among those with p_k >= t_k exists and is not its
    label (cleanlab's ``find_label_issues(filter_by='confident_learning')`` rule)."""
    y = np.asarray(labels, np.int64)
    p = np.asarray(prob, np.float64)
    c = p.shape[1]
    counts = np.bincount(y, minlength=c)
    sums = np.zeros(c)
    np.add.at(sums, y, p[np.arange(len(y)), y])
    t = np.divide(sums, counts, out=np.ones(c), where=counts > 0)
    above = p >= t[None, :] - 1e-12
    masked = np.where(above, p, -1.0)
    best = masked.argmax(axis=1)
    has = above.any(axis=1)
    suspect = np.flatnonzero(has & (best != y))
    suspect = suspect[np.argsort(p[suspect, y[suspect]], kind="stable")]
    return suspect, t


# -- the optional files of search and curve ---------------------------------------------------

def read_optional_json(path: str | None, what: str, *, required: bool) -> dict[str, Any] | None:
    """A JSON object from ``path``; None when the file is not there and not ``required``
    (a flag named it: then missing or bad is an error)."""
    if path is None or (not required and not os.path.isfile(path)):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise InvalidParameterError(f"The {what} file {path!r} does not exist.",
                                    param=what) from None
    except (OSError, ValueError) as exc:
        raise InvalidParameterError(f"The {what} file {path!r} cannot be read as JSON ({exc}).",
                                    param=what) from None
    if isinstance(data, list):
        data = {"results": data}
    if not isinstance(data, dict):
        raise InvalidParameterError(f"The {what} file {path!r} holds no JSON object.",
                                    param=what)
    return data


def table_rows(data: Mapping[str, Any], key: str) -> list[dict[str, Any]]:
    """Rows of a results table: a list of objects under ``key``, or scikit-learn's
    ``cv_results_`` columns (a dict of equal-length lists); nested ``params`` are flattened."""
    raw = data.get(key)
    if isinstance(raw, Mapping):  # columns
        cols = {k: v for k, v in raw.items() if isinstance(v, list)}
        n = max((len(v) for v in cols.values()), default=0)
        raw = [{k: v[i] for k, v in cols.items() if i < len(v)} for i in range(n)]
    if not isinstance(raw, list):
        return []
    rows = []
    for r in raw:
        if not isinstance(r, Mapping):
            continue
        flat: dict[str, Any] = {}
        for k, v in r.items():
            if isinstance(v, Mapping):
                flat.update({f"{k2}" if k == "params" else f"{k}.{k2}": v2
                             for k2, v2 in v.items()})
            else:
                flat[str(k)] = v
        rows.append(flat)
    return rows


# -- thumbnails ---------------------------------------------------------------------------------

def thumbnail(path: str, px: int = 96, storage_options: Mapping | None = None,
              quality: int = 70) -> str | None:
    """A ``data:image/jpeg;base64,...`` URI of the image at ``path`` (longest side ``px``);
    None when it cannot be read or decoded (the page then shows its path only)."""
    from PIL import Image

    from ..featurization import read_bytes

    try:
        data = read_bytes(path, storage_options)
        with Image.open(io.BytesIO(data)) as im:
            im.draft("RGB", (px, px))  # JPEG: decode at a reduced scale
            im = im.convert("RGB")
            im.thumbnail((px, px))
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=quality)
    except Exception:  # noqa: BLE001 - any unreadable or undecodable file: no thumbnail
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


# -- the whole report ---------------------------------------------------------------------------

def _choose_split(store: Any, split: str | None, store_url: str) -> str:
    from ..evaluation import check_split_has_rows

    if split is None:
        split = "test" if len(store.split_rows("test")) else "val"
    check_split_has_rows(store, split, store_url)
    return split


def _training_curves(model_dir: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """rounds.jsonl as (iteration, loss raw and smoothed), and the per-epoch history that
    the checkpoint holds (empty when neither is there)."""
    from ..training.plot import read_rounds, smooth

    rounds = read_rounds(os.path.join(model_dir, "rounds.jsonl"))
    sm = smooth([float(r["loss"]) for r in rounds]) if rounds else []
    out = [{"iteration": int(r["iteration"]), "epoch": int(r["epoch"]),
            "loss": float(r["loss"]), "smoothed": float(s),
            "train_accuracy": float(r.get("train_accuracy", float("nan")))}
           for r, s in zip(rounds, sm)]
    epochs: list[dict[str, Any]] = []
    ck = os.path.join(model_dir, "checkpoint.safetensors")
    if os.path.isfile(ck):
        try:
            from safetensors import safe_open

            with safe_open(ck, framework="numpy") as f:
                meta = json.loads((f.metadata() or {}).get("state", "{}"))
            epochs = [e for e in meta.get("history", []) if isinstance(e, dict)]
        except Exception:  # noqa: BLE001 - a report without the epochs is still a report
            epochs = []
    return out, epochs


def collect(executor: Executor, model_dir: str, store_url: str,
            options: ReportOptions | None = None, *, storage_options: Mapping | None = None,
            ) -> ReportData:
    """Compute the report of the model in ``model_dir`` on ``store_url`` (see module doc)."""
    from ..artifact import load
    from ..evaluation import cross_entropy, headline, metrics, predict_split
    from ..store import open_store

    opt = options or ReportOptions()
    opt.check()
    model = load(model_dir)
    store = open_store(store_url, storage_options=storage_options)
    store.require_complete("reporting")
    if store.classes != model.classes or store.feature_dim != model.feature_dim:
        raise InvalidParameterError(
            f"The model in {model_dir!r} was trained on other features (classes or width "
            f"differ from {store_url!r}): report on a store made with the same settings.")
    search = read_optional_json(opt.search or os.path.join(model_dir, SEARCH_FILE), "search",
                                required=opt.search is not None)
    curve = read_optional_json(opt.curve or os.path.join(model_dir, CURVE_FILE), "curve",
                               required=opt.curve is not None)
    split = _choose_split(store, opt.split, store_url)
    classes = list(store.classes)
    all_paths = np.asarray(store["paths"][:])

    pred = predict_split(executor, store_url, model.params, model.head_config, split,
                         storage_options=storage_options, suffix=model.suffix)
    prob = softmax(pred.logits)
    m = metrics(pred.labels, prob, classes)
    m["loss"] = cross_entropy(pred.labels, pred.logits)
    head = {**headline(m), "loss": m["loss"], "macro_f1": m["macro_f1"],
            "macro_precision": m["macro_precision"], "macro_recall": m["macro_recall"]}
    paths = all_paths[pred.rows]
    labels = pred.labels

    pairs = []
    support = np.bincount(labels, minlength=len(classes))
    for t, p, count, members in confused_pairs(labels, prob, opt.pairs, opt.pair_examples):
        pairs.append({"true": t, "pred": p, "count": count,
                      "share": count / max(int(support[t]), 1),
                      "examples": _items(pred.rows, labels, prob, paths, members)})
    wrong = np.flatnonzero(prob.argmax(1) != labels)
    p_label = prob[np.arange(len(labels)), labels]
    top_loss = wrong[np.argsort(p_label[wrong], kind="stable")][:opt.gallery]
    srt = np.sort(prob, axis=1)
    margin = srt[:, -1] - (srt[:, -2] if prob.shape[1] > 1 else 0.0)
    low = np.argsort(margin, kind="stable")[:opt.gallery]

    label_errors, n_err, oof_acc, err_rows = None, 0, None, []
    if opt.folds:
        training = model.config.get("training") or {}
        lr = float((training.get("optimizer") or {}).get("lr", 1e-3)) \
            if (training.get("optimizer") or {}).get("name") == "adam" else 1e-3
        refit_head = model.head_config.to_dict() if not model.maps else {"kind": "softmax"}
        rows, tl, oof = out_of_fold(executor, store_url, refit_head, folds=opt.folds,
                                    epochs=opt.oof_epochs, lr=lr, seed=opt.seed,
                                    storage_options=storage_options)
        suspects, _ = confident_errors(tl, oof)
        n_err = int(len(suspects))
        err_rows = [int(r) for r in rows[suspects]]
        oof_acc = float(np.mean(oof.argmax(1) == tl)) if len(tl) else None
        label_errors = _items(rows, tl, oof, all_paths[rows], suspects[:opt.gallery])

    rounds, epochs = _training_curves(model_dir)
    data = ReportData(
        title=f"{os.path.basename(os.path.normpath(model_dir))} on "
              f"{os.path.basename(os.path.normpath(store_url))} [{split}]",
        model_dir=str(model_dir), store_url=str(store_url), split=split, classes=classes,
        headline=head, per_class=m["per_class"], pairs=pairs,
        top_losses=_items(pred.rows, labels, prob, paths, top_loss),
        low_margin=_items(pred.rows, labels, prob, paths, low),
        label_errors=label_errors, label_error_count=n_err, label_error_rows=err_rows,
        oof_accuracy=oof_acc,
        rounds=rounds, epochs=epochs, curve=curve, search=search,
        training=dict(model.config.get("training") or {}))
    path_of = {int(r): str(all_paths[int(r)]) for r in data.gallery_rows()}
    for r, pth in path_of.items():
        uri = thumbnail(pth, opt.thumb_px, storage_options)
        if uri is not None:
            data.thumbs[r] = uri
    return data


def check_out(out: str) -> None:
    """The page's target: a new .html file (or one this command wrote), in a folder that
    exists."""
    if not out.lower().endswith((".html", ".htm")):
        raise InvalidParameterError(f"The report is one HTML page: --out must end in .html. "
                                    f"Got {out!r}.", param="out")
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise InvalidParameterError(f"The folder of --out {out!r} does not exist.", param="out")
    if os.path.isdir(out):
        raise InvalidParameterError(f"--out {out!r} is a folder; give a file name ending in "
                                    f".html.", param="out")
    if os.path.exists(out):
        with open(out, "rb") as f:
            head = f.read(4096)
        if b'name="generator" content="deeptransfer report' not in head:
            raise StoreError(f"{out!r} exists and is not a deeptransfer report: it is never "
                             f"overwritten. Choose another --out.")
