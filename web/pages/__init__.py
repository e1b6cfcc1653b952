"""Server-rendered pages (aiohttp-jinja2 templates, HTMX for partial updates)."""
