"""t5vh_fast: run a T5 policy with a value head fast, with PyTorch parity.

The runtime (``load``, sampling, scoring) needs numpy, onnxruntime and
tokenizers only; the PyTorch reference and the exporter live in
``t5vh_fast.modeling`` and ``t5vh_fast.export`` (the ``export`` extra).
"""

from .inputs import pad_batch
from .manifest import ExportError
from .policy import OnnxPolicy, load
from .results import Rollout, Scores
from .scoring import kl, reward

__version__ = "0.1.0"
__all__ = ["load", "OnnxPolicy", "Rollout", "Scores", "kl", "reward", "pad_batch", "ExportError", "__version__"]
