"""A federation refuses, before round 1, sites whose features came from different encoders,
even when the feature dimensions agree (two checkpoints of one architecture)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from micromil_core.config import DataConfig, ExperimentConfig
from micromil_core.encoders import get_encoder
from micromil_core.encoders.base import identity_label
from micromil_core.errors import SiteDataError
from micromil_core.federated import wire
from micromil_core.federated.setup import SiteInfo, check_encoders, validate_sites
from micromil_core.federated.site_task import SiteSettings, describe_site
from server.discovery import site_info

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*deprecated:DeprecationWarning")


class _Net(nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, 8, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).mean(dim=(2, 3))


def _label(path: Path, seed: int) -> str:
    """The identity a site running this TorchScript encoder would declare."""
    torch.jit.script(_Net(seed)).save(str(path))
    return identity_label(get_encoder(f"torchscript:{path}", input_size=32).identity)


def _site(node: int, name: str, encoder: str | None, dim: int = 8) -> SiteInfo:
    return SiteInfo(node, name, "train", ["a", "b"], {"feature_dim": dim}, [], encoder=encoder)


@pytest.fixture
def labels(tmp_path: Path) -> tuple[str, str]:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    # Same file name, same architecture, same dimension: only the weights differ.
    return _label(tmp_path / "a" / "enc.pt", 0), _label(tmp_path / "b" / "enc.pt", 1)


def test_different_weights_same_dimension_are_refused_naming_sites(labels: tuple[str, str]
                                                                   ) -> None:
    first, second = labels
    assert first != second
    assert first.startswith("torchscript-v1-") and second.startswith("torchscript-v1-")
    assert "sha256:" in first
    sites = [_site(1, "hospital-a", first), _site(2, "hospital-b", first),
             _site(3, "hospital-c", second)]
    with pytest.raises(SiteDataError) as info:
        validate_sites(sites, ExperimentConfig())  # dims agree: the encoder check refuses
    message = str(info.value)
    assert "different encoders" in message and "before round 1" in message
    assert f"hospital-a, hospital-b: {first}" in message
    assert f"hospital-c: {second}" in message


def test_same_encoder_everywhere_passes(labels: tuple[str, str]) -> None:
    first, _ = labels
    sites = [_site(1, "hospital-a", first), _site(2, "hospital-b", first)]
    classes, dim = validate_sites(sites, ExperimentConfig())
    assert dim == 8 and classes == ["a", "b"]


def test_sites_without_a_declared_encoder_are_not_compared(labels: tuple[str, str],
                                                           caplog: pytest.LogCaptureFixture
                                                           ) -> None:
    first, _ = labels
    check_encoders([_site(1, "hospital-a", None), _site(2, "hospital-b", None)])
    check_encoders([_site(1, "hospital-a", first), _site(2, "hospital-b", None)])
    assert "hospital-b declare no feature encoder" in caplog.text


def test_same_weights_under_other_file_names_are_one_encoder(tmp_path: Path) -> None:
    """Hospitals name their copies as they like; only the bytes and settings count."""
    import shutil

    here = _label(tmp_path / "enc.pt", 0)
    shutil.copy(tmp_path / "enc.pt", tmp_path / "hospital-b-copy.pt")  # the file, copied
    there = identity_label(
        get_encoder(f"torchscript:{tmp_path / 'hospital-b-copy.pt'}", input_size=32).identity)
    assert here == there
    check_encoders([_site(1, "hospital-a", here), _site(2, "hospital-b", there)])


def _image_site(root: Path, n: int = 4) -> Path:
    """A site of real H&E crops (tests/data/he_tia.png), one or two images per patient."""
    from PIL import Image

    he = np.asarray(Image.open(Path(__file__).parents[3] / "data" / "he_tia.png").convert("RGB"))
    rows = ["patient_id,label"]
    for i in range(n):
        pid = f"p{i:02d}"
        folder = root / "images" / pid
        folder.mkdir(parents=True)
        for j in range(1 + i % 2):
            y, x = 30 * i, 60 * j
            Image.fromarray(he[y : y + 48, x : x + 48]).save(folder / f"{pid}-scan{j}.png")
        rows.append(f"{pid},{('benign', 'malignant')[i % 2]}")
    (root / "patients.csv").write_text("\n".join(rows) + "\n")
    return root


def test_sites_declare_their_encoder_and_a_mismatch_is_refused_on_the_wire(tmp_path: Path) -> None:
    # Every site runs the federation's spec `torchscript:<path>`, but each hospital has its own
    # file at that path: here hospital-b's holds other weights. describe_site (what a site
    # sends before round 1) declares the identity, and the coordinator refuses the pair.
    weights = tmp_path / "encoder.pt"
    data = DataConfig(encoder=f"torchscript:{weights}", encoder_input_size=32)
    described = {}
    for seed, name in ((0, "hospital-a"), (1, "hospital-b")):
        torch.jit.script(_Net(seed)).save(str(weights))
        site_dir = _image_site(tmp_path / name)
        description, counts = describe_site(SiteSettings(name, site_dir), data)
        assert wire.SITE_ENCODER in description and not description[wire.SITE_PROBLEMS]
        assert "encoder.pt" not in description[wire.SITE_ENCODER]  # the weights, not the path
        described[name] = site_info(len(described) + 1, description, counts)
    a, b = described["hospital-a"], described["hospital-b"]
    assert a.encoder != b.encoder
    with pytest.raises(SiteDataError) as err:
        validate_sites([a, b], ExperimentConfig())
    assert a.encoder in str(err.value) and b.encoder in str(err.value)
