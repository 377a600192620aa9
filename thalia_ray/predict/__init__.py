"""Whole-frame inference with a trained run: tiling, the Ray Data job, the aligned output, evaluation."""
