"""distnet: data-parallel training of MLP populations on Ray, with per-layer gradient norms in MLflow."""
