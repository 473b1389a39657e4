import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from etcdutil import Etcd  # noqa: E402


@pytest.fixture
def etcd(tmp_path):
    e = Etcd(tmp_path).start()
    yield e
    e.stop()
