"""Shipped cadyq weights (installed as the ``cadyq_weights`` package); see manifest.json."""
