import os
import sys
import warnings

# Triton kernels run on CPU tensors through Triton's interpreter (CI has no GPU); read when a kernel is defined
os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(__file__))
warnings.filterwarnings("ignore", category=FutureWarning)
