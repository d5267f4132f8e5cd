"""The HTTP server: OpenAI-compatible image and video routes in front of a spawned worker process.

This process never imports torch: the runtime lives only in the worker (see engine.py and worker.py).
Entry points: `diffserve serve` (cli.py) and `create_app(ServerConfig(...))` (app.py).
"""
