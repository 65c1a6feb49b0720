"""Shared fixtures: tiny synthetic site folders for plumbing tests (never accuracy claims)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch


def write_site(
    root: Path,
    n_patients: int = 12,
    dim: int = 6,
    labels: tuple[str, ...] = ("benign", "malignant"),
    splits: bool = False,
    seed: int = 0,
    instances: tuple[int, int] = (3, 9),
) -> Path:
    """A site whose positive bags hold a shifted 'key instance' (learnable, tiny)."""
    gen = torch.Generator().manual_seed(seed)
    (root / "features").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n_patients):
        label = labels[i % len(labels)]
        n = int(torch.randint(instances[0], instances[1] + 1, (1,), generator=gen))
        feats = torch.randn(n, dim, generator=gen)
        if label == labels[-1]:
            feats[0] += 3.0
        pid = f"p{i:03d}"
        torch.save(feats, root / "features" / f"{pid}.pt")
        row = {"patient_id": pid, "label": label}
        if splits:
            row["split"] = ("train", "train", "val", "test")[i % 4] if i >= 4 else ("train" if i < 2 else "val")
        rows.append(row)
    with open(root / "patients.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root


def patient_ids(root: Path) -> set[str]:
    """Every patient id of the site folders under ``root`` (for leak checks)."""
    ids = set()
    for csv_path in root.glob("site-*/patients.csv"):
        with open(csv_path) as fh:
            ids |= {row["patient_id"] for row in csv.DictReader(fh)}
    return ids


@pytest.fixture
def tiny_site(tmp_path: Path) -> Path:
    return write_site(tmp_path / "site-a")


def ragged_batch(lengths: list[int], seed: int = 0, pad_to: int | None = None, dim: int = 6):
    """Padded batch of bags with ``lengths`` real instances whose padded rows hold large
    garbage (masking must hide it).

    Shapes: -> x (B, N, dim), mask (B, N) with N = pad_to or max(lengths)
    """
    g = torch.Generator().manual_seed(seed)
    n = pad_to or max(lengths)
    x = torch.randn(len(lengths), n, dim, generator=g)  # (B, N, D)
    mask = torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]  # (B, N)
    return torch.where(mask[..., None], x, 100.0 * torch.randn(x.shape, generator=g)), mask


def assert_per_bag_gradients(build, lengths: list[int], y: torch.Tensor, seed: int = 0) -> None:
    """Opacus's per-bag gradients of a model's FULL loss equal each bag's gradient alone,
    on a padded batch of random bags with ``lengths`` instances (see ``ragged_batch``).

    ``build()`` returns a fresh model of the same layout (wrapped for DP if needed).
    """
    x, mask = ragged_batch(lengths, seed=seed)
    _assert_grad_samples(
        build, len(lengths),
        lambda model: model.loss(x, mask, y)[0],
        lambda model, i: model.loss(x[i : i + 1, : lengths[i]], mask[i : i + 1, : lengths[i]], y[i : i + 1])[0],
    )


def assert_per_bag_gradients_of_bags(build, bags: list) -> None:
    """The same check through ``loss_batch`` on ``Bag`` objects, for models that need more
    than features and mask (e.g. MRAN's scale index per instance)."""
    from micromil_core.data.bag import collate_bags

    _assert_grad_samples(
        build, len(bags),
        lambda model: model.loss_batch(collate_bags(bags))[0],
        lambda model, i: model.loss_batch(collate_bags([bags[i]]))[0],
    )


def _assert_grad_samples(build, n_bags: int, batch_loss, bag_loss) -> None:
    """With ``loss_reduction="mean"`` (as dp_sgd uses it) grad_sample[i] is bag i's own
    gradient, so any padding or batch coupling that leaks between bags makes this fail."""
    import warnings

    import opacus
    model = build().train()
    gsm = opacus.GradSampleModule(model, loss_reduction="mean")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook")
        batch_loss(gsm._module).backward()  # GradSampleModule does not forward .loss
    for i in range(n_bags):
        alone = build().train()
        alone.load_state_dict(model.state_dict())
        bag_loss(alone, i).backward()
        for name, p in alone.named_parameters():
            sample = model.get_parameter(name).grad_sample
            assert sample.shape[0] == n_bags, name
            torch.testing.assert_close(sample[i], p.grad, atol=1e-5, rtol=1e-4)


@pytest.fixture(scope="session")
def demo_ucsb(tmp_path_factory) -> Path:
    """README's demo split of the real UCSB breast TMA data (read-only; copy to change it).

    3 training sites (6, 7 and 28 patients) whose validation sets each hold both classes
    (two of them below the small-count guard) and a held-out site of 17 patients, large
    enough for every metric.
    """
    from micromil_core.cli import main

    root = tmp_path_factory.mktemp("data") / "ucsb"
    assert main(["datasets", "prepare", "ucsb-breast", "--out", str(root), "--sites", "3",
                 "--holdout-sites", "1", "--partition", "dirichlet:0.5", "--seed", "2"]) == 0
    return root


@pytest.fixture
def in_a_task():
    """Flower builds Messages only inside a run; pretend to be one."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity.run_id = TaskIdentity.task_id = TaskIdentity.node_id = None


def superlink_pids(home: Path, program: bytes = b"flower-superlink") -> list[int]:
    """Pids of the live ``program`` processes started with FLWR_HOME=``home`` (``b""``: any
    process of that environment: SuperExec, flwr-simulation, the Ray they started)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
            env = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if program in cmdline and f"FLWR_HOME={home}".encode() in env:
            found.append(int(proc.name))
    return found
