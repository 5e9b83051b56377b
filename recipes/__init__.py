"""Training recipes of the shipped models (installed as the ``cadyq_recipes`` package); see cadyq_cli/train/recipe.py."""
