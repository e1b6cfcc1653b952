"""Read-side queries the pages and the API share (views only, never the event tables)."""
