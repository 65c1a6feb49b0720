import json

import pytest
import torch

from micromil_core.data.bag import Bag, collate_bags
from micromil_core.data.scaler import FeatureScaler
from micromil_core.io import atomic_path, write_json_atomic


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    target = tmp_path / "metrics.json"
    write_json_atomic(target, {"auc": 0.9})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash mid-write")
    assert json.loads(target.read_text()) == {"auc": 0.9}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]  # no temp left behind


def _bag(pid, feats, label=0):
    return Bag(pid, torch.tensor(feats, dtype=torch.float32), label)


def test_scaler_standardises_training_instances():
    bags = [_bag("a", [[1.0, 5.0], [3.0, 5.0]]), _bag("b", [[5.0, 5.0]])]
    scaler = FeatureScaler.fit(bags)
    z = torch.cat([b.features for b in scaler.transform_all(bags)])
    assert torch.allclose(z[:, 0].mean(), torch.tensor(0.0), atol=1e-6)
    assert torch.allclose(z[:, 0].std(unbiased=False), torch.tensor(1.0), atol=1e-6)
    assert torch.all(z[:, 1] == 0)  # a constant dimension maps to 0, not NaN
    again = FeatureScaler.from_state_dict(scaler.state_dict())
    assert torch.equal(again.transform(bags[0]).features, scaler.transform(bags[0]).features)


def test_collate_pads_and_masks():
    batch = collate_bags([_bag("a", [[1.0], [2.0], [3.0]], 1), _bag("b", [[4.0]], 0)])
    assert batch.x.shape == (2, 3, 1)
    assert batch.mask.tolist() == [[True, True, True], [True, False, False]]
    assert batch.y.tolist() == [1, 0]
    assert batch.x[1, 1:].abs().sum() == 0
    assert batch.y_fine.tolist() == [-1, -1]


def test_atomic_write_honours_umask(tmp_path):
    import os

    old = os.umask(0o022)
    try:
        path = write_json_atomic(tmp_path / "m.json", {})
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644
