"""Dataset adapters, one small module each: `load(root, limit=None, cache=None, **options)` reads the
dataset's own release layout under `root` and returns a `pairfree.eval.data` object. Layouts,
sources and protocols: docs/datasets.md."""
