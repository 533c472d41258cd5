"""Export a T5 value-head model to ONNX through Optimum (needs the ``export`` extra)."""

from .check import check_export
from .convert import ExportParityError, default_output_dir, export

__all__ = ["export", "check_export", "default_output_dir", "ExportParityError"]
