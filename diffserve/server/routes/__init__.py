"""HTTP routes: images (OpenAI images API), videos (OpenAI videos API, as jobs), system (health, models,
metrics, image files)."""
