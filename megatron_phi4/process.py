"""How a distributed command ends: :func:`run_and_exit` runs its ``main`` and leaves the process
without interpreter finalization.

Why: on the CI's two-node SLURM test a training worker whose run had ended cleanly (checkpoint
saved, process group destroyed) once died at exit with SIGABRT ("terminate called without an
active exception", C++'s verdict on a thread torn down mid-flight), and the job failed instead of
being requeued. It did not recur in 6 reruns of that test nor in 80 stress runs of exiting gloo
ranks, so its cause is inferred, not shown: ``destroy_process_group()`` does not stop gloo's
threads (each group's TCP loop and worker threads run until the group object is freed), and once
FSDP2 has sharded a module, DTensor's sharding-propagation cache keeps DTensorSpecs, hence the
device mesh and its groups, alive to the end (torch 2.13: after ``fully_shard`` of one ``Linear``
over a DP=2 mesh, the group's threads outlive ``del`` of module and mesh,
``destroy_process_group()`` and ``gc.collect()``, and go only when the private
``torch.distributed.tensor.debug._clear_sharding_prop_cache()`` runs; a trainer likewise).
Those threads are thus still running while the interpreter finalizes and C++ static objects are
destroyed -- the moment the other ranks exit and close their sockets. Leaving with ``os._exit``
removes that window whatever the exact race.

Everything a command must leave behind is written and closed when its ``main`` returns, so the
process does what finalization would that matters (waits for non-daemon threads, runs the
``atexit`` handlers: logging, multiprocessing, callbacks' own), flushes, and ends with ``main``'s
status. ``faulthandler`` is on from the start, so a fatal signal still prints every thread's Python
stack instead of dying silently.
"""
from __future__ import annotations

import atexit
import faulthandler
import os
import sys
import threading
from typing import Any, Callable, NoReturn


def run_and_exit(main: Callable[..., Any], *args, **kwargs) -> NoReturn:
    """``main(*args, **kwargs)``, then :func:`end_process` with its status. A ``SystemExit`` from
    ``main`` (argparse's usage errors, ``--help``) passes through: nothing distributed has started."""
    faulthandler.enable()
    end_process(main(*args, **kwargs))


def end_process(status: Any) -> NoReturn:
    """Wait for non-daemon threads, run the ``atexit`` handlers, flush, ``os._exit(status)``
    (``None`` is 0, as for ``sys.exit``)."""
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0 if status is None else int(status))
