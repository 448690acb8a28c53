"""Training adapter: the program every backend runs on every node under torchrun.

``python -m adapter.train <resolved recipe.yaml>``. Importable without the launcher's
dependencies (no hydra, sagemaker or kubernetes).
"""
