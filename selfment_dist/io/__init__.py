"""Storage and formats (fsspec, PIL, pyarrow); knows nothing of Ray.

- :mod:`.storage`: ``parse_storage_options``, ``url_to_fs``, ``join``
- :mod:`.masks`: ``encode_mask`` / ``decode_mask`` (``numpy.packbits``, C order)
- :mod:`.schema`: ``PSEUDO_LABEL_SCHEMA`` / ``pseudo_label_schema`` and ``error_row``
- :mod:`.objects`: the optional ``objects`` column (``objects_cell`` / ``decode_objects``)
- :mod:`.coco`: COCO instance JSON of objects (RLE at the original size; pycocotools)
- :mod:`.images`: ``decode_image`` → RGB ``PIL.Image`` or ``ImageDecodeError``
- :mod:`.sources`: ``enumerate_units`` (driver) and ``iter_records`` (worker)
"""
from selfment_dist.io.images import DEFAULT_MAX_PIXELS, ImageDecodeError, decode_image
from selfment_dist.io.masks import decode_mask, encode_mask
from selfment_dist.io.schema import (PSEUDO_LABEL_SCHEMA, decode_features, encode_features, error_row,
                     pseudo_label_schema)
from selfment_dist.io.sources import enumerate_units, iter_records
from selfment_dist.io.storage import join, parse_storage_options, url_to_fs

__all__ = [
    "parse_storage_options", "url_to_fs", "join",
    "encode_mask", "decode_mask",
    "PSEUDO_LABEL_SCHEMA", "pseudo_label_schema", "error_row", "encode_features",
    "decode_features",
    "decode_image", "ImageDecodeError", "DEFAULT_MAX_PIXELS",
    "enumerate_units", "iter_records",
]
