"""Dataset records, readers, image decoding, transforms and sampling."""
from mmfl.data.records import Catalog, Record

__all__ = ["Catalog", "Record"]
