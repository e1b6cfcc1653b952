"""aiohttp application: health endpoints now; UI, REST API and DICOMweb build on create_app."""
