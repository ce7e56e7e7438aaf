"""Gallery indexes for visual search: FAISS files (embedded default) or a Milvus collection.

``build_index`` embeds shop images into an index folder, ``open_store`` opens one, and
``Searcher`` pairs an index with the checkpoint it was built from to answer photo queries.
"""
from mmfl.index.backends import open_store
from mmfl.index.build import BuildReport, build_index
from mmfl.index.search import Searcher, parse_bbox, search_items
from mmfl.index.store import Entry, Filter, Hit, parse_filters, read_manifest

__all__ = [
    "BuildReport", "Entry", "Filter", "Hit", "Searcher", "build_index", "open_store", "parse_bbox",
    "parse_filters", "read_manifest", "search_items",
]
