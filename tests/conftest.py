import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (real third-party test data); tests skip where a user's clone lacks it."""
    if not SHARED.is_dir():
        pytest.skip("../shared/data is absent (a user's clone): real-data test skipped")
    return SHARED


@pytest.fixture(scope="session")
def flickr_shards(shared_data) -> str:
    return str(shared_data / "flickr8k-dev" / "img2dataset-256" / "*.tar")


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    """The project's own demo shards, built once per test session."""
    from pipeline.demo_data import make_demo_data

    out = tmp_path_factory.mktemp("demo-data")
    make_demo_data(str(out))
    return out


@pytest.fixture(scope="session")
def demo_run(demo_data, tmp_path_factory) -> Path:
    """The demo job run once over the demo shards (report and filtered shards on)."""
    from pipeline.config import load_job
    from pipeline.job import run_job

    out = tmp_path_factory.mktemp("demo-run") / "out"
    cfg = load_job(
        ROOT / "jobs" / "demo.yaml",
        ["output.filtered_shards=true", "output.report=true"],
        input_path=str(demo_data / "shards" / "*.tar"),
        output_dir=str(out),
    )
    run_job(cfg)
    return out
