"""Model-card templates, installed as `umbrella_llava.model_cards` (see `[tool.setuptools]` in pyproject.toml)."""
