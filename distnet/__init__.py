"""distnet: data-parallel training of MLP populations on Ray, with per-layer gradient norms in MLflow.
`distnet.results` and `distnet.steps` read a sweep back as pandas DataFrames (distnet.frames)."""


def __getattr__(name: str):
    # Imported when first used: every Ray worker imports the package, and pandas stays out of them.
    if name in ("results", "steps"):
        from distnet import frames

        return getattr(frames, name)
    raise AttributeError(f"module 'distnet' has no attribute {name!r}")
