"""Index arrays are built once per job (shared cache) or once per node (node-local cache) and
memory-mapped by every other rank -- with or without working file locks -- and a failed build
fails every rank instead of leaving them waiting."""
import errno
import hashlib
import os
import time

import numpy as np
import pytest
import yaml

from megatron_phi4.config import DataConfig, LossConfig, StageConfig
from tests.distributed_utils import run_distributed

from .conftest import make_docs, write_docs

WORLD = 8
STEPS = 4
BUILD_SECONDS = 0.5  # widens the race window, so uncoordinated builders would overlap


def _stage(tmp_path, n_docs=3000):
    prefix = write_docs(tmp_path / "docs", make_docs(n_docs, seed=1))
    mix = tmp_path / "mix.yaml"
    mix.write_text(yaml.safe_dump({"sources": [{"name": "only", "weight": 1.0,
                                                "paths": [prefix]}]}))
    data = DataConfig(kind="pretrain", mixture=str(mix), validation=str(mix), seq_length=32,
                      micro_batch_size=2, global_batch_size=8, seed=5)
    return StageConfig(name="pretrain", data=data, loss=LossConfig(type="lm"), train_steps=STEPS,
                       eval_iters=1)


def _rank(rank, world, stage, cache_root, log, lock, ranks_per_node=None):
    import megatron_phi4.data.cache as cache
    import megatron_phi4.data.gpt_dataset as gpt
    from megatron_phi4.data.stage import build_stage_data, build_validation_data

    cache_dir = os.path.join(cache_root, "shared")
    if ranks_per_node:  # simulated nodes, each with its own (node-local) cache directory
        os.environ["LOCAL_RANK"] = str(rank % ranks_per_node)
        cache_dir = os.path.join(cache_root, f"node{rank // ranks_per_node}")
    real_build = gpt.build_gpt_indices

    def counting_build(*a, **k):
        fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        os.write(fd, f"{rank}\n".encode())
        os.close(fd)
        time.sleep(BUILD_SECONDS)
        return real_build(*a, **k)

    gpt.build_gpt_indices = counting_build
    if lock == "refused":  # a file system that refuses flock (Lustre without -o flock)
        import fcntl

        def refuse(fd, op):
            raise OSError(errno.ENOLCK, "No locks available")

        fcntl.flock = refuse
    elif lock == "ignored":  # a file system that accepts flock but does not honour it
        import contextlib
        cache.file_lock = lambda path: contextlib.nullcontext()

    data = build_stage_data(stage, rank % 2, 2, 0, STEPS, cache_dir=cache_dir)
    val = build_validation_data(stage, rank % 2, 2, cache_dir=cache_dir)
    ds = data.source.ds.datasets[0]
    arrays = [ds.document_index, ds.sample_index, ds.shuffle_index]
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    first = data.next_global_batch()[0]["input_ids"]
    return {"mapped": all(isinstance(a, np.memmap) for a in arrays), "arrays": h.hexdigest(),
            "batch": first.numpy().tobytes(), "val": val[0][0]["input_ids"].numpy().tobytes()}


def _builders(log):
    return sorted(int(x) for x in open(log).read().split()) if os.path.exists(log) else []


def _check_identical(res):
    assert all(r["mapped"] for r in res), "every rank memory-maps the cached arrays"
    assert len({r["arrays"] for r in res}) == 1
    assert len({r["batch"] for r in res[0::2]}) == 1 and len({r["batch"] for r in res[1::2]}) == 1
    assert len({r["val"] for r in res[0::2]}) == 1


def test_one_build_per_job_even_where_file_locks_are_refused(tmp_path):
    stage, log = _stage(tmp_path), str(tmp_path / "builds.log")
    res = run_distributed(_rank, WORLD, stage, str(tmp_path / "cache"), log, "refused")
    # exactly one build of the training index and one of the validation index, both by rank 0
    assert _builders(log) == [0, 0]
    _check_identical(res)
    # ... and the same arrays as an uncached, single-process build
    from megatron_phi4.data.stage import build_stage_data
    ref = build_stage_data(stage, 0, 2, 0, STEPS, cache_dir=None, collective=False)
    ds = ref.source.ds.datasets[0]
    h = hashlib.sha256()
    for a in (ds.document_index, ds.sample_index, ds.shuffle_index):
        h.update(np.ascontiguousarray(a).tobytes())
    assert res[0]["arrays"] == h.hexdigest()


def test_one_build_per_job_when_locks_are_silently_ignored(tmp_path):
    stage, log = _stage(tmp_path), str(tmp_path / "builds.log")
    res = run_distributed(_rank, WORLD, stage, str(tmp_path / "cache"), log, "ignored")
    assert _builders(log) == [0, 0]
    _check_identical(res)


def test_one_build_per_node_on_node_local_storage(tmp_path):
    stage, log = _stage(tmp_path), str(tmp_path / "builds.log")
    res = run_distributed(_rank, WORLD, stage, str(tmp_path / "cache"), log, "ignored",
                          ranks_per_node=4)
    # node 0 (ranks 0-3) is built by rank 0, node 1 (ranks 4-7) by its local rank 0 = rank 4
    assert _builders(log) == [0, 0, 4, 4]
    _check_identical(res)


def test_file_lock_serializes_builders_without_a_process_group(tmp_path):
    stage, log = _stage(tmp_path), str(tmp_path / "builds.log")
    res = run_distributed(_rank, WORLD, stage, str(tmp_path / "cache"), log, "flock",
                          init_process_group=False)
    assert len(_builders(log)) == 2  # whichever process got the lock first, once per index
    _check_identical(res)


def _failing_rank(rank, world, stage, cache_dir):
    from megatron_phi4.data.stage import build_stage_data
    try:
        build_stage_data(stage, rank % 2, 2, 0, STEPS, cache_dir=cache_dir)
    except Exception as e:  # noqa: BLE001 - what each rank saw is the result
        return f"{type(e).__name__}: {e}"
    return "no error"


def test_a_failed_build_fails_every_rank_with_a_clear_error(tmp_path):
    stage = _stage(tmp_path)
    os.remove(str(tmp_path / "docs.bin"))
    res = run_distributed(_failing_rank, WORLD, stage, str(tmp_path / "cache"), timeout=120)
    assert "docs.bin" in res[0], res[0]  # the builder raises the real error...
    for msg in res[1:]:  # ...and the waiting ranks learn it failed (no hang, no broken socket)
        assert "building cached data failed on another rank (phase 1: rank 0)" in msg, msg
