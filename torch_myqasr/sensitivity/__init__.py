"""Label-free layer sensitivity: statistic scores of |output| and output-distance scores.

No labels or transcripts are read: everything comes from the full-precision model's own outputs
on the user's unlabelled calibration clips.
"""

from torch_myqasr.sensitivity.distortion import (
    layer_distortions,
    logits_fisher_scale,
    output_kl_scale,
    output_layer_distortions,
)
from torch_myqasr.sensitivity.metrics import METRICS, cosine_distance, kl_distance, output_distance
from torch_myqasr.sensitivity.scores import DISTANCE_SCORES, SCORES, STAT_SCORES, check_score, stat_score

__all__ = [
    "DISTANCE_SCORES",
    "METRICS",
    "SCORES",
    "STAT_SCORES",
    "check_score",
    "cosine_distance",
    "kl_distance",
    "layer_distortions",
    "logits_fisher_scale",
    "output_kl_scale",
    "output_layer_distortions",
    "output_distance",
    "stat_score",
]
