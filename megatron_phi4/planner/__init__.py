"""Layout planner: which (TP, PP, DP, micro-batch, recompute, precision) fit a cluster, and how fast.

``plan_layouts`` enumerates layouts, rejects the impossible ones with the reason (the trainer's own
config validation plus the cluster and batch rules), predicts memory per GPU (``memory``: exact
state bytes, modelled buffers and activations) and step time (``timing``: a documented model of
compute and communication whose rates are parameters) and ranks them. ``tools/plan_layout.py`` is
its command line. This package sits at the top of the import order: it reads config, distributed,
models; nothing imports it.
"""
