"""Suite-wide settings: one intra-op thread per process (ranks are forked side by side on small CI
machines), and markers that skip GPU / Transformer Engine tests with a reason where they cannot run."""
import importlib.util
import os

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    no_gpu = pytest.mark.skip(reason="needs a CUDA device; CI machines have none")
    no_te = pytest.mark.skip(reason="needs Transformer Engine, which ships in NGC containers only")
    has_te = importlib.util.find_spec("transformer_engine") is not None
    for item in items:
        # markers, not ``item.keywords``: keywords also hold directory names (a checkout named "te").
        if item.get_closest_marker("gpu") is not None and not torch.cuda.is_available():
            item.add_marker(no_gpu)
        if item.get_closest_marker("te") is not None and not has_te:
            item.add_marker(no_te)


@pytest.fixture(scope="session")
def arithmetic_model(tmp_path_factory):
    """The tiny arithmetic Phi-4 (pre-trained and SFT'd on the demo task, trimmed vocabulary), trained
    once per session and shared by the demo, PTS and DPO-evidence tests: an
    :class:`~megatron_phi4.demo.arithmetic_run.ArithmeticModel` (see tests/arithmetic_model.py)."""
    from tests.arithmetic_model import get_arithmetic_model
    return get_arithmetic_model(tmp_path_factory)
