"""The runtime: model loading, native DiTs, pipelines as stages. Imports torch; the server never imports this
package in its own process, only inside the worker process."""
