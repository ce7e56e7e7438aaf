"""The HTTP service and web page for visual search (``mmfl serve``)."""
