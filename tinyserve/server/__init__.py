"""The OpenAI-compatible HTTP server: the aiohttp app, the async front of the scheduler, the protocol, metrics, the web page."""
