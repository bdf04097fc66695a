"""hf-pipeline: YAML recipes that chain training stages into Hub-format artifacts with lineage.

Entry point: `python -m pipeline run recipes/quickstart.yaml` (or `accelerate launch -m pipeline run ...`).
"""
__version__ = "0.1.0"
