"""The README's main job: `deeptransfer demo` on scikit-learn's digits, end to end."""
import json

from PIL import Image

from deeptransfer.cli import main
from deeptransfer.demo import make_digits_dataset


def test_digits_dataset_is_real_images_one_folder_per_class(tmp_path):
    root = make_digits_dataset(tmp_path / "d")
    files = sorted(root.glob("*/*.png"))
    assert len(files) == 1797
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == [str(i) for i in range(10)]
    im = Image.open(files[0])
    assert im.mode == "L" and im.size == (32, 32)
    assert make_digits_dataset(tmp_path / "d") == root  # idempotent


def test_demo_trains_an_accurate_model(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "demo"), "--epochs", "15"]) == 0
    out = capsys.readouterr().out
    assert "test accuracy" in out and "parameter averaging on 2 workers" in out
    cfg = json.loads((tmp_path / "demo" / "model" / "config.json").read_text())
    test = json.loads((tmp_path / "demo" / "report" / "metrics.json").read_text())
    assert test["split"] == "test" and test["top1"] > 0.85, test["top1"]
    assert cfg["training"]["workers"] == 2
    assert (tmp_path / "demo" / "report" / "confusion.png").exists()
