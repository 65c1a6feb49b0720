"""Image encoders: microscopy images -> instance feature vectors (pluggable).

``get_encoder(spec, device)`` builds one from a config string, ``extract_site_features``
fills a site's feature cache, ``read_image`` reads any supported image file as uint8 RGB.
"""

from micromil_core.encoders.base import DEFAULT_ENCODER, Encoder
from micromil_core.encoders.extract import ExtractResult, extract_site_features
from micromil_core.encoders.images import read_image
from micromil_core.encoders.registry import get_encoder, list_encoders

__all__ = [
    "DEFAULT_ENCODER",
    "Encoder",
    "ExtractResult",
    "extract_site_features",
    "get_encoder",
    "list_encoders",
    "read_image",
]
