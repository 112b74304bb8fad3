"""On a CUDA GPU: training in mixed precision and feature extraction. Run with ``-m gpu``."""

import math

import numpy as np
import pytest
import torch

from napari_mil.training.data import Bag
from napari_mil.training.mhim import preset
from napari_mil.training.trainer import TrainConfig, autocast_settings, train

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def random_bags(n_bags=12, dim=32, seed=0):
    """Bags of 40-120 instances; the positives hold a few instances shifted along one direction."""
    rng = np.random.default_rng(seed)
    bags = []
    for i in range(n_bags):
        features = rng.normal(size=(int(rng.integers(40, 120)), dim)).astype(np.float32)
        label = i % 2
        if label:
            features[:5, 0] += 3.0
        bags.append(Bag(f"s{i}", label, f"p{i}", features, np.zeros((len(features), 2))))
    return bags


@pytest.mark.parametrize("model, model_cfg, mhim", [
    ("abmil", {}, None),
    ("abmil", {}, "camelyon16_abmil"),
    ("transmil", {"dim": 64, "heads": 4, "landmarks": 16}, None),
    ("transmil", {"dim": 64, "heads": 4, "landmarks": 16}, "camelyon16_transmil"),
])
def test_training_on_cuda_in_mixed_precision(model, model_cfg, mhim):
    bags = random_bags()
    dtype, needs_scaler = autocast_settings(torch.device("cuda"))
    assert dtype in (torch.bfloat16, torch.float16) and needs_scaler == (dtype == torch.float16)
    cfg = TrainConfig(model=model, model_cfg=model_cfg, epochs=3, min_epochs=1, device="cuda",
                      mhim=preset(mhim) if mhim else None, teacher="fresh")
    result = train(bags[:8], bags[8:], cfg)
    assert len(result.history) == 3
    assert all(math.isfinite(r.train_loss) and math.isfinite(r.val_loss) for r in result.history)
    assert all(p.device.type == "cpu" and torch.isfinite(p).all() for p in result.model.parameters())
    if mhim:
        assert len(result.mhim.history) == 3 * 8
        assert result.mhim.last_masks.high.device.type == "cpu"


def test_hne_stats_features_on_cuda_match_the_cpu(tmp_path):
    from napari_mil.encoders import create_encoder
    from napari_mil.features.extract import extract_features
    from napari_mil.slide import open_slide
    from napari_mil.synthetic import make_synthetic_slide
    from napari_mil.tiling import make_patch_grid
    from napari_mil.tissue import detect_tissue

    slide = make_synthetic_slide(tmp_path / "slide.tif", width=4096, height=3072, mpp=0.5, seed=3, tumour_burden=0.2)
    with open_slide(slide.path) as opened:
        grid = make_patch_grid(opened, detect_tissue(opened), magnification=20, min_tissue=0.3)
    assert len(grid) >= 8
    results = {device: extract_features(slide.path, grid, create_encoder("hne_stats", device=device),
                                        tmp_path / device, num_workers=0, batch_size=8, dtype="float32")
               for device in ("cuda", "cpu")}
    gpu, cpu = results["cuda"].bag.features, results["cpu"].bag.features
    assert gpu.shape == (len(grid), 38) and np.isfinite(gpu).all()
    np.testing.assert_allclose(gpu, cpu, rtol=1e-3, atol=1e-3)
