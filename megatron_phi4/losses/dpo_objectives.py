"""DPO objectives as pure functions of sequence log-probabilities, with TRL's names and formulas.

Users coming from TRL pick a preference loss by name (``DPOConfig.loss_type``); a recipe here picks
it with ``loss.dpo_loss_type`` and gets the same number. :func:`dpo_losses` takes the summed
completion log-probs of the policy and the reference for B pairs and returns B per-pair losses
whose mean is TRL 1.16's batch loss (``DPOTrainer._compute_loss`` with one loss type, reverse-KL,
no WPO weighting, ``ld_alpha=None``) for the same inputs -- the tests call TRL's own code path.

Notation (TRL's): ``c = policy_chosen - ref_chosen`` and ``r = policy_rejected - ref_rejected``
(log-ratios), ``d = c - r``, ``b = beta``, ``e = label_smoothing``, ``ls = log sigmoid``.

* ``ipo`` and ``sigmoid_norm`` divide each log-ratio by its completion length in tokens
  (``chosen_lengths`` / ``rejected_lengths``, clamped to >= 1, as TRL divides by the completion
  mask's sum); no other type uses lengths.
* ``label_smoothing`` acts only where TRL 1.16 uses it: ``robust``, ``exo_pair`` (which requires it
  > 0), ``aot``, ``aot_unpaired``. TRL 1.16's ``sigmoid`` ignores it; rather than ignore a value the
  caller set, a non-zero ``label_smoothing`` with any other type is an error. The conservative-DPO
  smoothing of ``sigmoid`` (Mitchell 2023; older TRL's sigmoid) is kept as ``cdpo``, a name of
  this project, not TRL's.
* ``aot`` and ``aot_unpaired`` sort log-ratios across the batch (a quantile match, Melnyk et al.
  2024), so their i-th "per-pair" loss belongs to the i-th sorted position, not to pair i: only
  the mean (or sum) is meaningful, per-pair weights are refused, and the batch is whatever the
  caller passes. :class:`~megatron_phi4.losses.dpo.DPOLoss` passes one micro-batch, as TRL passes
  one per-device batch (see docs/posttraining.md for what this means under parallelism).
* ``discopop`` blends the logistic loss with ``exp(-b*d)`` by ``sigmoid(b*d / tau)``; the product
  ``exp(-b*d) * sigmoid(b*d/tau)`` is computed as ``exp(-b*d + ls(b*d/tau))`` -- equal where TRL's
  form is finite, and finite (instead of ``inf * 0 = nan``) for very negative margins.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["DPO_LOSS_TYPES", "TRL_LOSS_TYPES", "LABEL_SMOOTHING_TYPES", "LENGTH_NORMALIZED_TYPES",
           "BATCH_SORTED_TYPES", "DEFAULT_DISCOPOP_TAU", "check_dpo_options", "dpo_losses"]

TRL_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "sppo_hard", "aot",
                  "aot_unpaired", "apo_zero", "apo_down", "discopop", "sigmoid_norm")
DPO_LOSS_TYPES = TRL_LOSS_TYPES + ("cdpo",)  # cdpo: this project's name for smoothed sigmoid
LABEL_SMOOTHING_TYPES = ("robust", "exo_pair", "aot", "aot_unpaired", "cdpo")
LENGTH_NORMALIZED_TYPES = ("ipo", "sigmoid_norm")
BATCH_SORTED_TYPES = ("aot", "aot_unpaired")
DEFAULT_DISCOPOP_TAU = 0.05  # TRL's DPOConfig default, the DiscoPOP paper's recommendation


def check_dpo_options(loss_type: str, beta: float, label_smoothing: float = 0.0,
                      discopop_tau: float = DEFAULT_DISCOPOP_TAU, sft_weight: float = 0.0) -> None:
    """Raise ``ValueError`` (naming the argument and the allowed values) for options no DPO
    objective accepts; the config layer applies the same rules to ``loss.dpo_*``."""
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"loss_type: got {loss_type!r}, allowed: {', '.join(map(repr, DPO_LOSS_TYPES))}")
    if not (isinstance(beta, (int, float)) and beta > 0 and math.isfinite(beta)):
        raise ValueError(f"beta: must be a positive finite number, got {beta!r}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing: must be in [0, 0.5), got {label_smoothing!r}")
    if label_smoothing and loss_type not in LABEL_SMOOTHING_TYPES:
        raise ValueError(f"label_smoothing: {loss_type!r} does not use it (TRL 1.16 applies it only to "
                         f"{', '.join(LABEL_SMOOTHING_TYPES[:-1])}; 'cdpo' is sigmoid with conservative "
                         f"smoothing); got {label_smoothing}")
    if loss_type == "exo_pair" and label_smoothing == 0.0:
        raise ValueError("label_smoothing: 'exo_pair' needs label_smoothing > 0 (log(0) otherwise; the EXO "
                         "paper recommends 1e-3)")
    if not (discopop_tau > 0 and math.isfinite(discopop_tau)):
        raise ValueError(f"discopop_tau: must be a positive finite number, got {discopop_tau!r}")
    if not (isinstance(sft_weight, (int, float)) and sft_weight >= 0 and math.isfinite(sft_weight)):
        raise ValueError(f"sft_weight: must be a finite number >= 0, got {sft_weight!r}")


def _smoothed_logistic(z: torch.Tensor, eps: float) -> torch.Tensor:
    """-(1-e) ls(z) - e ls(-z): the logistic loss against a label that is flipped with probability e."""
    return -(1.0 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


def _per_token(logratio: torch.Tensor, lengths, name: str) -> torch.Tensor:
    if lengths is None:
        raise ValueError(f"{name}: required by the length-normalized loss types "
                         f"({', '.join(LENGTH_NORMALIZED_TYPES)}): completion lengths in tokens")
    lengths = torch.as_tensor(lengths, device=logratio.device)
    if lengths.shape != logratio.shape:
        raise ValueError(f"{name}: shape {tuple(lengths.shape)} != log-prob shape {tuple(logratio.shape)}")
    return logratio / lengths.to(logratio.dtype).clamp(min=1.0)


def dpo_losses(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *,
               loss_type, beta, label_smoothing=0.0, chosen_lengths=None, rejected_lengths=None,
               discopop_tau: float = DEFAULT_DISCOPOP_TAU) -> torch.Tensor:
    """Per-pair losses, shape (B,), of DPO objective ``loss_type`` (see the module docstring).

    Inputs are (B,) tensors of completion log-prob sums; ``*_lengths`` are completion lengths in
    tokens (used by ``ipo`` and ``sigmoid_norm`` only). ``.mean()`` of the result is TRL 1.16's
    batch loss for the same inputs.
    """
    check_dpo_options(loss_type, beta, label_smoothing, discopop_tau)
    pc, pr, rc, rr = policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    if not (pc.shape == pr.shape == rc.shape == rr.shape) or pc.dim() != 1:
        raise ValueError(f"dpo_losses: the four log-prob tensors must have the same shape (B,), got "
                         f"{[tuple(t.shape) for t in (pc, pr, rc, rr)]}")
    b, e = float(beta), float(label_smoothing)
    c = pc - rc  # chosen log-ratio
    r = pr - rr  # rejected log-ratio
    d = c - r

    if loss_type == "sigmoid":  # Rafailov et al. 2023, eq. 7
        return -F.logsigmoid(b * d)
    if loss_type == "cdpo":  # conservative DPO (Mitchell 2023); this project's name
        return _smoothed_logistic(b * d, e)
    if loss_type == "hinge":  # SLiC (Zhao et al. 2023)
        return torch.relu(1.0 - b * d)
    if loss_type == "ipo":  # Azar et al. 2023, eq. 17, per-token log-ratios (TRL, confirmed by the authors)
        dn = _per_token(c, chosen_lengths, "chosen_lengths") - _per_token(r, rejected_lengths, "rejected_lengths")
        return (dn - 1.0 / (2.0 * b)) ** 2
    if loss_type == "exo_pair":  # Ji et al. 2024, eq. 16: KL(softmax(b*logratios) || [1-e, e])
        z = b * d
        return (torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-e))
                + torch.sigmoid(-z) * (F.logsigmoid(-z) - math.log(e)))
    if loss_type == "nca_pair":  # Chen et al. 2024
        return -F.logsigmoid(b * c) - 0.5 * F.logsigmoid(-b * c) - 0.5 * F.logsigmoid(-b * r)
    if loss_type == "robust":  # rDPO (Chowdhury et al. 2024): unbiased under label noise e
        return (-(1.0 - e) * F.logsigmoid(b * d) + e * F.logsigmoid(-b * d)) / (1.0 - 2.0 * e)
    if loss_type == "sppo_hard":  # Wu et al. 2024, hard-label form of eq. 4.7
        return (c - 0.5 / b) ** 2 + (r + 0.5 / b) ** 2
    if loss_type == "aot":  # Melnyk et al. 2024: sorted policy vs sorted reference margins
        policy_sorted, _ = torch.sort(pc - pr, dim=0)
        ref_sorted, _ = torch.sort(rc - rr, dim=0)
        return _smoothed_logistic(b * (policy_sorted - ref_sorted), e)
    if loss_type == "aot_unpaired":  # Melnyk et al. 2024: sorted chosen vs sorted rejected log-ratios
        c_sorted, _ = torch.sort(c, dim=0)
        r_sorted, _ = torch.sort(r, dim=0)
        return _smoothed_logistic(b * (c_sorted - r_sorted), e)
    if loss_type == "apo_zero":  # D'Oosterlinck et al. 2024, eq. 7
        return 1.0 - torch.sigmoid(b * c) + torch.sigmoid(b * r)
    if loss_type == "apo_down":  # D'Oosterlinck et al. 2024, eq. 8
        return torch.sigmoid(b * c) + 1.0 - torch.sigmoid(b * (c - r))
    if loss_type == "discopop":  # Chris Lu et al. 2024, eq. 5 (log-ratio modulated loss)
        z = b * d
        mix = torch.sigmoid(z / discopop_tau)
        return -F.logsigmoid(z) * (1.0 - mix) + torch.exp(-z + F.logsigmoid(z / discopop_tau))
    if loss_type == "sigmoid_norm":  # sigmoid on per-token log-ratios
        dn = _per_token(c, chosen_lengths, "chosen_lengths") - _per_token(r, rejected_lengths, "rejected_lengths")
        return -F.logsigmoid(b * dn)
    raise AssertionError(loss_type)  # unreachable: check_dpo_options rejects unknown names
