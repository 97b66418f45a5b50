import os
import sys
import warnings

import pytest

# Triton kernels run on CPU tensors through Triton's interpreter (CI has no GPU); read when a kernel is defined
os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(__file__))
warnings.filterwarnings("ignore", category=FutureWarning)


@pytest.fixture(scope="module")
def tiny():
    """(config, StableDiffusion, ControlNet) of tiny-sd1 with random weights, shared by a file's tests."""
    from helpers import tiny_models
    return tiny_models("tiny-sd1")
