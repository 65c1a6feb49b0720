"""The documentation a newcomer walks: README stays short, and every relative link in it
and in docs/ leads to a file that exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def test_readme_is_a_front_page_not_a_manual():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250


def test_every_relative_link_resolves():
    broken = []
    for page in PAGES:
        for target in LINK.findall(page.read_text()):
            if re.match(r"(https?:|mailto:|#)", target):
                continue
            path = (page.parent / target.split("#")[0]).resolve()
            if not path.exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert broken == []


def test_every_docs_page_is_linked_from_the_readme():
    readme = (ROOT / "README.md").read_text()
    missing = [p.name for p in PAGES[1:] if f"docs/{p.name}" not in readme]
    assert missing == []


def test_the_python_api_example_runs_as_written(tmp_path):
    """docs/python-api.md's example, run as a user would from a copy of the repository root."""
    import shutil
    import subprocess
    import sys

    page = (ROOT / "docs" / "python-api.md").read_text()
    (example,) = re.findall(r"```python\n(.*?)```", page, flags=re.S)
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    (tmp_path / "example.py").write_text(example)
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, capture_output=True,
                          text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "held-out AUC" in proc.stdout and "rounds [1, 2]" in proc.stdout
    assert (tmp_path / "runs" / "eval" / "explain").is_dir()  # explanations were written
