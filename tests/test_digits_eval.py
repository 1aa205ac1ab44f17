"""eqm.digits_eval: the real-digits classifier used to score digit samples."""
import numpy as np
import pytest
import torch

from eqm import digits_eval
from eqm.datasets import load_digits_tensor
from eqm.utils import to_uint8


def test_classifier_separates_real_digits_from_noise():
    clf, held_out = digits_eval.classifier()
    assert held_out > 0.97
    x, y = load_digits_tensor()
    assert digits_eval.class_accuracy(x, y) > 0.97
    noise = torch.rand(500, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert digits_eval.class_accuracy(noise, torch.arange(500) % 10) < 0.3
    assert digits_eval.class_accuracy(x, (y + 1) % 10) < 0.03  # wrong labels score as wrong


def test_npz_layout_gives_the_same_labels_and_cli(tmp_path, capsys):
    x, y = load_digits_tensor()
    x, y = x[:200], y[:200]
    images = to_uint8(x)  # what eqm-sample writes: (N, 8, 8, 3) uint8
    assert (digits_eval.predict(images) == digits_eval.predict(x)).mean() > 0.99
    np.savez(tmp_path / "s.npz", arr_0=images, labels=y.numpy())
    assert digits_eval.main([str(tmp_path / "s.npz")]) == pytest.approx(digits_eval.class_accuracy(x, y), abs=0.01)
    assert "class accuracy" in capsys.readouterr().out
    np.savez(tmp_path / "nolabels.npz", arr_0=images)
    with pytest.raises(SystemExit, match="no 'labels'"):
        digits_eval.main([str(tmp_path / "nolabels.npz")])
    with pytest.raises(ValueError, match="8x8"):
        digits_eval.predict(torch.zeros(2, 1, 16, 16))
