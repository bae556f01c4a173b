"""dynbert: learn which tokens BERT can drop (Jeong & Kwak, arXiv 2102.09727)."""

from .version import __version__  # noqa: F401 - the package's version, as `dynbert.__version__`


def load(run_dir, device: str | None = None):
    """A finished run folder's pruned model, ready to ``predict(texts)``: a ``dynbert.predictor.Predictor``.

    ``device`` defaults to CUDA if visible, else CPU. torch is imported here, on first use, so that
    ``import dynbert`` (the CLI, `dynbert report`) stays quick.
    """
    from .predictor import load as load_predictor

    return load_predictor(run_dir, device)
