"""MatMamba: Mamba2 with Matryoshka-nested widths, as a library.

    from matmamba import MatMamba2, MatMambaLM, MatMambaLMConfig, MatMambaVision, MatMambaVisionConfig
"""

from .backbone import InferenceCache
from .block import BlockState, MatMamba2
from .config import MatMamba2Config, MatMambaLMConfig, MatMambaVisionConfig
from .flops import count_flops, count_params
from .generation import SamplingParams
from .lm import MatMambaLM
from .nesting import parse_widths
from .pretrained import LoadReport, load_model
from .vision import MatMambaVision

__all__ = [
    "BlockState",
    "InferenceCache",
    "LoadReport",
    "MatMamba2",
    "MatMamba2Config",
    "MatMambaLM",
    "MatMambaLMConfig",
    "MatMambaVision",
    "MatMambaVisionConfig",
    "SamplingParams",
    "count_flops",
    "count_params",
    "load_model",
    "parse_widths",
]

__version__ = "0.1.0"
