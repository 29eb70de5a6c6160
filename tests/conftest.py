import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def fixture_dir():
    return ROOT / "tests" / "fixtures" / "ldm_tiny"


@pytest.fixture(scope="session")
def manifest_dir():
    return ROOT / "tests" / "fixtures" / "manifests"
