"""L2-SP where people train: a PyTorch Lightning callback and a 🤗 Trainer callback.

    from l2sp.integrations.lightning import L2SP              # lightning.pytorch.Callback
    from l2sp.integrations.transformers import L2SPCallback   # transformers.TrainerCallback

Each submodule imports its framework on import; install it with ``pip install 'l2sp[lightning]'`` or
``pip install 'l2sp[transformers]'``. This package itself imports neither.
"""
