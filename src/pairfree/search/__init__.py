"""Search a unified space: a faiss index per modality (`build_index`, `IndexSet`), any-to-any queries
(`Searcher`), an HTTP service and a web page (`pairfree.search.service`). Needs `pairfree[search]`."""

from pairfree.search.index import KINDS, IndexSet, build_index
from pairfree.search.query import QueryError, Searcher, format_table
from pairfree.search.stores import open_store

__all__ = ["KINDS", "IndexSet", "QueryError", "Searcher", "build_index", "format_table", "open_store"]
