"""The SEA attention layer in pure PyTorch (kernels picked by kernels.dispatch)."""

from sea_convert.attention.layer import DensityMeter, SEAOutput, measure_density, sea_attention
from sea_convert.attention.predictor import Estimate, SEAPredictor
from sea_convert.attention.select import Selection, select

__all__ = [
    "DensityMeter",
    "Estimate",
    "SEAOutput",
    "SEAPredictor",
    "Selection",
    "measure_density",
    "sea_attention",
    "select",
]
