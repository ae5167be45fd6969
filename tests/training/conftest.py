"""Shared fixtures for trainer tests: the sample data (built once per session, ~4 s)."""
import pytest


@pytest.fixture(scope="session")
def sample_data(tmp_path_factory):
    """Paths dict of :func:`megatron_phi4.demo.sample_data.prepare_sample_data` (mixture
    YAMLs, SFT prefixes, preference JSONL files, manifest) under a session temp dir."""
    from megatron_phi4.demo.sample_data import prepare_sample_data
    return prepare_sample_data(str(tmp_path_factory.mktemp("sample_data") / "data"))
