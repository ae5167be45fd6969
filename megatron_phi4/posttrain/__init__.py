"""Post-training data: the pieces that turn model samples and judgements into SFT examples and
preference pairs for the trainer's DPO stages (judge-guided pairs, refusal data, Pivotal Token
Search).

Kept import-light: nothing is imported here; import the submodule you need.
"""
