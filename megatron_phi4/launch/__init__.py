"""Launch-time glue between schedulers and the trainer, importable without torch.

* :mod:`megatron_phi4.launch.env` -- the torch.distributed environment (RANK, WORLD_SIZE,
  LOCAL_RANK, MASTER_ADDR, ...) from SLURM's when no launcher (torchrun) provided one.
* :mod:`megatron_phi4.launch.stop` -- stop signals caught from the first instant of the process,
  and the ``stopped_by_signal`` marker that tells a batch script to requeue the job.
"""
