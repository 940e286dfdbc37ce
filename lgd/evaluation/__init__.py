"""Evaluators beyond detectron2's: MissRateEvaluator (log-average miss rate, mMR, for CrowdHuman)."""
from .mmr import MissRateEvaluator, log_average_miss_rate, match_image

__all__ = ["MissRateEvaluator", "log_average_miss_rate", "match_image"]
