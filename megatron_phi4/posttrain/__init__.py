"""Post-training data: the pieces that turn model samples and judgements into SFT examples and
preference pairs for the trainer's DPO stages (judge-guided pairs, refusal data, Pivotal Token
Search, precomputed reference log-probs), and the oracles that decide whether a rollout is right
(``megatron_phi4.posttrain.oracles``: exact numbers, multiple-choice letters, program tests in a
sandbox).

Kept import-light: nothing is imported here; import the submodule you need.
"""
