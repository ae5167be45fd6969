"""Demo material that is not part of the training library: the offline sample corpus the
``tiny_cpu`` recipe and the tests train on. It sits at the top of the import order (beside the
tools): it may import anything in ``megatron_phi4`` and nothing in the library imports it, except
the entry point's lazy sample-data step."""
