"""How strongly the TSC moves the weight distribution, per weight: the scale behind its default.

    python -m experiments.tsc_scale --weights=0,1e-5,3e-5,1e-4 --epochs=1

Trains the small CNN densely with TRADES (eps 0.1, the dense stage's optimizer: SGD Nesterov 0.9,
lr 0.05, weight decay 5e-4, no schedule) on Fashion-MNIST for ``--epochs`` epochs at each TSC
weight (``tscnc_jax.transformed_sparsity_penalty``, ``a = 1``, ``reduce="sum"``: each weight gets
about ``2 * weight`` of pull towards 0), then prints one JSON line per weight: the fraction of
kernel weights with ``|w| < 1e-3`` (per kernel and overall), their median ``|w|``, and the clean
accuracy of the EMA weights on the first 2,000 test images. Each weight starts from the same
initialisation and batch order. About 4.5 minutes per weight and epoch on one core here.
"""

from __future__ import annotations

import json
import time

import jax
import numpy as np
from absl import app, flags

import tscnc_jax as tj
from experiments import data as data_lib
from experiments.configs import dense_trades
from tscnc_jax import training

FLAGS = flags.FLAGS


def measure(weight: float, epochs: int, data) -> dict:
    """Dense TRADES training at TSC ``weight``; the resulting weight statistics."""
    model = tj.create_model("small_cnn")
    tx = training.make_optimizer(0.05, tsc_weight=weight, tsc_kwargs={"a": 1.0, "reduce": "sum"})
    state = training.create_train_state(model, tx, jax.random.key(2), (28, 28, 1))
    attack = training.default_attack("trades", eps=0.1, steps=10)
    step = jax.jit(training.make_train_step(model, tx, loss="trades", attack=attack))
    t0 = time.time()
    for epoch in range(epochs):
        for batch in data_lib.iterate_batches(data.train_images, data.train_labels, 128, seed=0,
                                              epoch=epoch, shuffle=True):
            state, _ = step(state, batch)
    out = {"tsc_weight": weight, "epochs": epochs, "seconds": round(time.time() - t0, 1)}
    magnitudes = []
    for name, w, _ in tj.named_leaves(state.params):
        w = np.abs(np.asarray(w, np.float64)).ravel()
        magnitudes.append(w)
        out[f"below_1e-3/{name}"] = float(np.mean(w < 1e-3))
    every = np.concatenate(magnitudes)
    out["below_1e-3"] = float(np.mean(every < 1e-3))
    out["median_abs"] = float(np.median(every))
    x = data.test_images[:2000].astype(np.float32) / 255.0
    logits = model.apply({"params": state.ema_params}, x)
    out["clean_acc"] = float(np.mean(np.argmax(logits, -1) == data.test_labels[:2000]))
    return out


def main(argv):
    del argv
    data = data_lib.load_for_config(dense_trades.get_config(""))
    for weight in FLAGS.weights:
        print(json.dumps(measure(float(weight), FLAGS.epochs, data)), flush=True)


def define_flags() -> None:
    """Defines this program's flags; called when it runs as a program only, so that importing
    the module (tests, other programs) never registers flags."""
    flags.DEFINE_list("weights", ["0", "1e-5", "3e-5", "1e-4"], "TSC weights to measure.")
    flags.DEFINE_integer("epochs", 1, "Epochs of dense TRADES training per weight.")


if __name__ == "__main__":
    define_flags()
    app.run(main)
