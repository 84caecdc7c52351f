"""respiscan: COVID-19 detection from chest X-rays and CT with multi-modal multi-task learning.

`respiscan.train(data, out)`, `respiscan.load(bundle, engine="auto").predict(xray=..., ct=...)`,
`respiscan.preprocess(...)`.
Imports are lazy so that `import respiscan` (and the ONNX prediction path) does not pull in torch.
"""

__version__ = "0.1.0"
__all__ = ["train", "load", "preprocess", "evaluate", "__version__"]


def __getattr__(name: str):
    if name == "train":
        from respiscan.training.trainer import train

        return train
    if name == "load":
        from respiscan.serving import load

        return load
    if name == "preprocess":
        from respiscan.data.preprocess import preprocess

        return preprocess
    if name == "evaluate":
        from respiscan.evaluation.evaluate import evaluate

        return evaluate
    raise AttributeError(f"module 'respiscan' has no attribute {name!r}")
