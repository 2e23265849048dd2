"""The scores against a truth (utils.evaluation.metrics): SSIM equals scikit-image's."""
import numpy as np
import pytest
from skimage.metrics import structural_similarity

from utils.evaluation.metrics import ssim


@pytest.mark.parametrize("shape", [(7, 7), (40, 23), (64, 90)])
def test_ssim_equals_scikit_images_structural_similarity(shape):
    rng = np.random.default_rng(sum(shape))
    a = rng.random(shape)
    b = np.clip(a + rng.normal(0, 0.3, shape), 0, 1)
    a[: shape[0] // 3] = 0  # outside the tissue: zeros, as score_maps fills them
    for x, y in ((a, b), (a, a), (a, np.zeros(shape)), (np.zeros(shape), np.zeros(shape))):
        assert ssim(x, y) == pytest.approx(structural_similarity(x, y, data_range=1.0), abs=1e-12)


def test_ssim_refuses_a_map_smaller_than_its_window():
    with pytest.raises(ValueError, match="smaller than the 7 x 7 SSIM window"):
        ssim(np.zeros((6, 30)), np.zeros((6, 30)))
