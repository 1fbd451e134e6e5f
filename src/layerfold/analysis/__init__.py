"""Where a model is redundant: block scores, layer and weight similarities, gradients (``measures``) and FoldGPT's
block gates (``gates``), measured on calibration data; the methods and the planner plan from them."""

from .measures import Analysis, analysis_of, analyze, write_analysis

__all__ = ["Analysis", "analysis_of", "analyze", "write_analysis"]
