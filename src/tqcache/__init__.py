"""tqcache: TurboQuant-compressed KV caches for Hugging Face transformers."""

from .codec import AffineQuantizer, Packed, TurboQuantizer
from .config import SCHEMES, CacheConfig, CodecConfig, parse_scheme

__version__ = "0.1.0"

__all__ = [
    "AffineQuantizer",
    "CacheConfig",
    "CodecConfig",
    "Packed",
    "SCHEMES",
    "TurboQuantizer",
    "parse_scheme",
    "__version__",
]
