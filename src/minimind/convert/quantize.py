"""`minimind quantize`: the int8 weight-only folder of `quantize_int8` (the same as `convert --dtype int8`)."""
from .cli import main_quantize as main  # noqa: F401 - `minimind quantize` runs this module's main
from .hf_export import quantize_int8  # noqa: F401
