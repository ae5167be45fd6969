"""The tiny arithmetic Phi-4 that the demo, Pivotal Token Search and DPO-evidence tests share.

``arithmetic_model`` (the session fixture in tests/conftest.py) calls :func:`get_arithmetic_model`:
pre-training and SFT run once per test session (CI_TRAINING: about ten minutes on two busy
cores), in a forked process so the test process keeps no process group, and every test gets the
same :class:`~megatron_phi4.demo.arithmetic_run.ArithmeticModel` (checkpoints, ``vocab``, data
paths: ``model.data.test_problems`` holds the held-out problems, ``train_pool_problems`` the
questions for PTS / DPO).

Set ``MEGATRON_PHI4_ARITHMETIC_DIR`` to a directory to keep the model between sessions: a finished
model there is reused at once (its data and checkpoints are checked against CI_TRAINING by
``train_arithmetic_model``), an interrupted one resumes.

Tests load the weights with :func:`load` (a fresh ``Phi4Model`` per call: a test may modify it).
"""
from __future__ import annotations

import os


__all__ = ["CI_TRAINING", "get_arithmetic_model", "load", "ENV_DIR"]

ENV_DIR = "MEGATRON_PHI4_ARITHMETIC_DIR"
HANG_GUARD_S = 3600  # only against hangs; training takes minutes
# The demo's defaults (docs/demo.md): a model trained by benchmarks/posttrain_gain.py or
# train_arithmetic_model(dir) with no arguments is reusable here through MEGATRON_PHI4_ARITHMETIC_DIR.
CI_TRAINING = dict(seed=1234)


def _train(rank, world, work_dir):
    from megatron_phi4.demo.arithmetic_run import train_arithmetic_model
    return train_arithmetic_model(work_dir, **CI_TRAINING)


def get_arithmetic_model(tmp_path_factory=None, work_dir: str | None = None):
    """Train (or reuse) the CI arithmetic model; see the module docstring."""
    from tests.distributed_utils import run_distributed

    work_dir = work_dir or os.environ.get(ENV_DIR) or str(tmp_path_factory.mktemp("arithmetic_model"))
    return run_distributed(_train, 1, work_dir, timeout=HANG_GUARD_S)[0]


def load(checkpoint):
    """A plain ``Phi4Model`` (eval mode, fp32) from a checkpoint of the arithmetic model."""
    from megatron_phi4.api import load_model
    return load_model(checkpoint)
