"""jobsite: a self-hosted site for running research pipelines in Docker.

The repository root is this package; docs/architecture.md shows its layers.
"""
