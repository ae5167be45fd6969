"""Demonstrations that run the whole system on a laptop-sized CPU. Not part of the training
library: the package sits at the top of the import order (beside the tools): it may import
anything in ``megatron_phi4`` and nothing in the library imports it, except the entry point's lazy
sample-data step.

* :mod:`~megatron_phi4.demo.sample_data`: the offline sample corpus the ``tiny_cpu`` recipe and
  the tests train on.
* The arithmetic demo (:mod:`~megatron_phi4.demo.arithmetic`, :mod:`~megatron_phi4.demo.arithmetic_run`):
  a verifiable task small enough to pre-train and SFT a tiny Phi-4 in minutes, on a trimmed
  vocabulary (:mod:`~megatron_phi4.demo.trimmed_vocab`), and to measure held-out accuracy with
  confidence intervals (:mod:`~megatron_phi4.demo.evaluate`): the shared base for Pivotal Token
  Search, the DPO rounds and the end-to-end demo. See docs/demo.md.
* :mod:`~megatron_phi4.demo.posttrain_rounds`: PTS -> token-level DPO -> rule-judge DPO on that
  model, against a full-response DPO baseline on the same budget, each model evaluated on held-out
  problems (``run_posttraining``; docs/posttraining.md, "Evidence that it teaches").
"""
