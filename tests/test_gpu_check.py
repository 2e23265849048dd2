"""bench/gpu_check.py: a clean exit without a GPU, and its tile measurements on a tiny network and
image on the CPU (the figures themselves need a GPU)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import gpu_check  # noqa: E402


def test_without_a_gpu_it_says_so_and_writes_nothing(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")   # no GPU, even on a GPU machine
    r = subprocess.run([sys.executable, "bench/gpu_check.py", "--out", str(out)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == gpu_check.NO_GPU
    assert not out.exists()


def test_known_gpus():
    assert gpu_check.bf16_peak("NVIDIA H100 80GB HBM3") == gpu_check.bf16_peak("NVIDIA H200") == 989e12
    assert gpu_check.bf16_peak("NVIDIA A100-SXM4-80GB") == 312e12
    assert gpu_check.bf16_peak("NVIDIA GeForce GTX 1080") is None


@pytest.fixture(scope="module")
def tiny_vit():
    from utils.histology.backbones import build_tile_model, resolve_weights
    return build_tile_model("timm:vit_tiny_patch16_224", resolve_weights("timm", random_init=True), device="cpu")


def test_tile_measurements_run_on_a_tiny_network(tiny_vit):
    img = np.random.default_rng(0).integers(0, 256, (224, 448, 3), dtype=np.uint8)
    vit = gpu_check.vit_throughput(tiny_vit, img, n_tiles=3, batch=2)   # a short last batch, tiles reused
    assert vit["tiles"] == 3 and vit["tiles_per_second"] > 0 and vit["read_tiles_per_second"] > 0
    loop = gpu_check.stage_loop(tiny_vit, img, (14, 28), batch=4, shifts=1)
    assert loop["tiles"] == 2 + 2 and loop["tiles_per_second"] > 0   # one pass + the macro windows
    res = {"gpu": "NVIDIA H100", "torch": "x", "cuda": "y", "vit": {**vit, "peak_gpu_gib": 1.0},
           "stage_loop": {**loop, "peak_gpu_gib": 1.0}, "vit_forward_limit_tiles_per_second": 16213.0,
           "ratio_to_limit": 2.5, "histex": {"spot_epochs_per_second": 1e4, "train_spots": 600, "epochs": 20,
                                              "genes": 300, "superpixels_per_second": 1e5, "superpixels": 90000,
                                              "n_states": 5, "peak_gpu_gib": 0.5}}
    text = gpu_check.table(res)
    assert "limit / measured = 2.50" in text and "spot-epochs/s" in text
    json.dumps(res)
