"""Data: indexed datasets, preprocessing, mixtures, packed/blended datasets, samplers, SFT and
preference data. Attributes are imported lazily so ``import megatron_phi4.data`` stays light
(no torch); see docs/data.md."""
import importlib

_EXPORTS = {
    "MixtureSpec": "mixture", "MixtureSource": "mixture", "MixtureError": "mixture",
    "GPTDataset": "gpt_dataset", "build_pretrain_dataset": "gpt_dataset",
    "build_gpt_indices": "gpt_dataset", "packed_position_ids": "gpt_dataset",
    "BlendedDataset": "blending", "build_blending_indices": "blending",
    "blend_range": "blending", "blend_counts": "blending",
    "PretrainSampler": "sampler", "step_indices": "sampler", "make_collate": "sampler",
    "collate_lm": "sampler", "build_dataloader": "sampler",
    "global_batch_size_at": "batch_schedule", "num_samples_for": "batch_schedule",
    "StageData": "stage", "build_stage_data": "stage", "build_validation_data": "stage",
    "check_stage_data": "preflight", "check_recipe_data": "preflight",
    "DataInputError": "preflight",
    "SFTDataset": "sft_dataset", "pack_first_fit": "sft_dataset",
    "PreferenceDataset": "preference", "PreferenceDataError": "preference",
    "collate_preference": "preference", "write_preference_binary": "preference",
    "mixture_budget": "mixture_report",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{mod}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
