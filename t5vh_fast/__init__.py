"""t5vh_fast: run a T5 policy with a value head fast, with PyTorch parity.

The runtime (``load``, sampling, scoring) needs numpy, onnxruntime and
tokenizers only; the PyTorch model and reference sampler
(``t5vh_fast.modeling``, ``t5vh_fast.reference``, ``t5vh_fast.checkpoint``)
and the exporter (``t5vh_fast.export``) need the ``export`` extra.
"""

from . import errors
from .errors import ExportError, InputError, T5vhError
from .inputs import pad_batch
from .policy import OnnxPolicy, load
from .providers import CudaOptions
from .results import Rollout, Scores
from .scoring import kl, reward
from .tensorrt import TensorrtOptions

__version__ = "0.2.0"
__all__ = [
    "load",
    "OnnxPolicy",
    "CudaOptions",
    "TensorrtOptions",
    "Rollout",
    "Scores",
    "kl",
    "reward",
    "pad_batch",
    "errors",
    "T5vhError",
    "InputError",
    "ExportError",
    "__version__",
]
