"""The reference stack's two measured steps, run by benchmark.py inside the peers' own virtual environment
(benchmarks/requirements-peers.txt): a Keras application's embedding of the same preprocessed images, and the
task-specific MLP trained with Keras fit() on the same embeddings. Random weights (nothing can be downloaded),
224 px, as the reference's README describes. Writes one JSON object; imports nothing from respiscan.

    .venv-peers/bin/python benchmarks/peers.py --images IMAGES.npy --mlp MLP.npz --backbones efficientnet_b0 \
        --out RESULT.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

# respiscan's timm names -> the reference's keras.applications classes
APPLICATIONS = {"efficientnet_b0": "EfficientNetB0", "efficientnet_b1": "EfficientNetB1", "resnet50": "ResNet50",
                "resnetv2_50": "ResNet50V2"}


def embedder(keras, name: str):
    """The reference's embedding model: the application without its top, average-pooled, then Dense(1280)."""
    base = getattr(keras.applications, APPLICATIONS[name])(weights=None, include_top=False, pooling="avg",
                                                          input_shape=(224, 224, 3))
    return keras.Sequential([base, keras.layers.Dense(1280), keras.layers.LeakyReLU()])


def embed_img_s(keras, name: str, images: np.ndarray, repeats: int) -> float:
    """Images per second of model.predict at batch 32 on the grey images as 3-channel floats (the reference reads
    its images with cv2 in colour); median of `repeats` passes after a warm-up pass."""
    model = embedder(keras, name)
    x = np.repeat(images[..., None].astype(np.float32), 3, axis=-1)
    model.predict(x[:32], batch_size=32, verbose=0)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model.predict(x, batch_size=32, verbose=0)
        times.append(time.perf_counter() - t0)
    return len(x) / statistics.median(times)


def auc(y: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC as the Mann-Whitney statistic (ties count half)."""
    pos, neg = score[y == 1], score[y == 0]
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def mlp_fit(keras, draws: np.lib.npyio.NpzFile, epochs: int) -> dict:
    """The reference's task-specific MLP (BN, 1120, 960, 800, 640 LeakyReLU, BN, Dense(1) sigmoid), Adam lr 1e-3,
    batch 32, `epochs` epochs, keeping the best validation epoch's AUC, as its fit() with validation_data does."""
    seconds, val_auc, held_out_auc = [], [], []
    for d in range(int(draws["n_draws"])):
        x, y, xv, yv, xt, yt = (draws[f"{k}{d}"] for k in ("x", "y", "xv", "yv", "xt", "yt"))
        keras.utils.set_random_seed(d)
        layers = [keras.Input((x.shape[1],)), keras.layers.BatchNormalization()]
        for width in (1120, 960, 800, 640):
            layers += [keras.layers.Dense(width), keras.layers.LeakyReLU()]
        model = keras.Sequential([*layers, keras.layers.BatchNormalization(), keras.layers.Dense(1, "sigmoid")])
        model.compile(keras.optimizers.Adam(1e-3), "binary_crossentropy", metrics=[keras.metrics.AUC(name="auc")])
        t0 = time.perf_counter()
        history = model.fit(x, y, batch_size=32, epochs=epochs, validation_data=(xv, yv), verbose=0)
        seconds.append(time.perf_counter() - t0)
        val_auc.append(max(history.history["val_auc"]))
        held_out_auc.append(auc(yt, model.predict(xt, batch_size=256, verbose=0)[:, 0]))
    mean = statistics.fmean
    return {"seconds": mean(seconds), "epochs": epochs, "val_auc": mean(val_auc), "held_out_auc": mean(held_out_auc),
            "draws": len(seconds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", help="preprocessed uint8 images (N, 224, 224), .npy, for --backbones")
    parser.add_argument("--mlp", help="embedding draws for the MLP fit, .npz (omitted: no fit)")
    parser.add_argument("--backbones", default="", help="comma-separated timm names to embed with")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    import keras
    import tensorflow as tf

    result = {"versions": {"tensorflow": tf.__version__, "keras": keras.__version__}, "embed_img_s": {}}
    for name in filter(None, args.backbones.split(",")):
        result["embed_img_s"][name] = embed_img_s(keras, name, np.load(args.images), args.repeats)
    if args.mlp:
        with np.load(args.mlp) as draws:
            result["mlp_fit"] = mlp_fit(keras, draws, args.epochs)
    with open(args.out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
