"""Layer caches: what each attention kind keeps per token (`spec.py`, the one registry of kinds), in which
precision (`precision.py`), the kinds themselves (`latent.py`, `sparse.py`, `window.py`), the block pool with its
prefix cache and the per-forward batch view (`pool.py`), and the contiguous cache over a private pool
(`contiguous.py`). Imports nothing of the model: the model, the engine and the counting code import from here."""
