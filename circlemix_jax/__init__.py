"""circlemix_jax: CircleMix, EfficientNet-B0 and hierarchical learning for glomeruli, in JAX/Flax.

Python API:

    import circlemix_jax
    predict = circlemix_jax.load_run("runs/binary/circlemix/fold0")
    probs = predict(images)  # uint8 (N, S, S, 3) RGB at predict.image_size -> (N, K) probabilities
    predict.class_names      # the K classes, in output order

`circlemix_jax.export.load(DIR)` returns the same kind of callable from an
artefact written by `python -m circlemix_jax.export`, with JAX alone.
"""

__version__ = "0.1.0"


def load_run(workdir: str):
    """A finished run's best checkpoint as a function on images.

    Args:
      workdir: the run folder (holding config.json and checkpoints/best).

    Returns:
      An `export.Predictor`: called on uint8 RGB images (N, S, S, 3) at the
      run's image size (`.image_size`), it returns float32 softmax
      probabilities (N, K) over `.class_names`, the same as predict's and as the
      exported artefact's. `.meta['provenance']` says where the model came from.

    Raises:
      circlemix_jax.errors.InputError: no run or no best checkpoint in `workdir`.
    """
    from circlemix_jax import export  # importing the package stays free of JAX

    return export.from_workdir(workdir)
