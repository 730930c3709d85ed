"""``python -m benchmarks.run --quick`` runs end to end and writes every table (no timing is
asserted: timings belong to the benchmark's own output, not to the tests)."""

import json
import math
import os
import pathlib
import sys

import numpy as np
import pytest
import stall

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_benchmark_writes_every_section(tmp_path):
    out = tmp_path / "run.md"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OPENBLAS_NUM_THREADS="1")
    proc = stall.run([sys.executable, "-m", "benchmarks.run", "--quick", f"--out={out}"],
                     cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    for title in ("1. Practical peak", "2. Training steps", "3. JAX vs PyTorch",
                  "4. Penalty overhead", "5. Attack throughput", "6. Scaling"):
        assert f"## {title}" in text, title
    results = json.loads(out.with_suffix(".json").read_text())
    steps = results["train_steps"]
    assert [(s["loss"], s["tscnc"]) for s in steps] == [
        ("clean", False), ("pgd_at", False), ("trades", False), ("trades", True)]
    for s in steps:
        assert s["forward_flops"] > 0 and s["median_s"] > 0 and math.isfinite(s["gflops"])
    # The FLOP count is the model's: a small-CNN forward is ~8.5 MFLOP per 28x28 image.
    per_image = steps[0]["forward_flops"] / results["batch"]
    assert 5e6 < per_image < 12e6, per_image
    assert set(results["attacks"]["workloads"]) == {"pgd20", "fast"}
    penalty = results["penalties"][0]
    assert penalty["model"] == "small_cnn" and penalty["cnc_exact"] > 0 and penalty["tsc"] > 0
    # The faithful-gradient setting: each kernel's own k, from minimal_k (cosine 0.99).
    assert penalty["cnc_tracked_cos99"] > 0
    assert set(penalty["k_cos99"]) == {"Conv_0/kernel", "Conv_1/kernel", "Dense_0/kernel",
                                       "Dense_1/kernel"}
    assert "cos >= 0.99" in text and "Dense_0 " in text
    assert [b["batch"] for b in results["batches"]] == [8, 16]


def _small_cnn_nchw_float64(sd: dict, x_nchw: np.ndarray) -> np.ndarray:
    """The PyTorch twin's forward written out in NumPy float64 (NCHW, OIHW, Linear (out, in))."""

    def conv3x3_same(x, w, b):
        n, c, h, wd = x.shape
        xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
        out = np.zeros((n, w.shape[0], h, wd))
        for i in range(3):
            for j in range(3):
                out += np.einsum("nchw,oc->nohw", xp[:, :, i:i + h, j:j + wd], w[:, :, i, j])
        return out + b[None, :, None, None]

    def relu_pool(x):
        n, c, h, w = x.shape
        return np.maximum(x, 0).reshape(n, c, h // 2, 2, w // 2, 2).max(axis=(3, 5))

    sd = {k: np.asarray(v, np.float64) for k, v in sd.items()}
    x = relu_pool(conv3x3_same(x_nchw, sd["Conv_0.weight"], sd["Conv_0.bias"]))
    x = relu_pool(conv3x3_same(x, sd["Conv_1.weight"], sd["Conv_1.bias"]))
    x = np.maximum(x.reshape(x.shape[0], -1) @ sd["Dense_0.weight"].T + sd["Dense_0.bias"], 0)
    return x @ sd["Dense_1.weight"].T + sd["Dense_1.bias"]


def test_state_dict_converter_matches_an_nchw_float64_forward():
    # The converter (HWIO -> OIHW, (in, out) -> (out, in), NHWC -> NCHW flatten order of the
    # first Dense) checked without torch: our logits equal a float64 NCHW forward on its output.
    import jax
    import jax.numpy as jnp

    import tscnc_jax as tj
    from benchmarks import torch_twin

    model = tj.create_model("small_cnn")
    variables = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
    variables = jax.tree.map(  # non-zero biases, so their placement is checked too
        lambda a: a + 0.05 * jax.random.normal(jax.random.key(1), a.shape), variables)
    x = np.random.default_rng(0).uniform(0, 1, (3, 28, 28, 1)).astype(np.float32)
    sd = torch_twin.state_dict_from_flax("small_cnn", variables)
    assert {k: v.shape for k, v in sd.items()} == {
        "Conv_0.weight": (32, 1, 3, 3), "Conv_0.bias": (32,), "Conv_1.weight": (64, 32, 3, 3),
        "Conv_1.bias": (64,), "Dense_0.weight": (128, 3136), "Dense_0.bias": (128,),
        "Dense_1.weight": (10, 128), "Dense_1.bias": (10,)}
    ref = _small_cnn_nchw_float64(sd, x.transpose(0, 3, 1, 2).astype(np.float64))
    np.testing.assert_allclose(model.apply(variables, x), ref, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="no PyTorch twin"):
        torch_twin.state_dict_from_flax("wide_resnet", variables)


@pytest.mark.parametrize("name", ["small_cnn", "vgg16", "resnet18"])
def test_torch_twins_give_our_logits(name):
    torch = pytest.importorskip("torch")  # a benchmark-only dependency (make bench installs it)
    import jax
    import jax.numpy as jnp

    from benchmarks import torch_twin, train_step

    make_model, shape = train_step.MODELS[name]
    model = make_model()
    variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, *shape)))
    if "batch_stats" in variables:  # running statistics away from (0, 1)
        variables = {**variables, "batch_stats": jax.tree.map(
            lambda a: a + 0.3 * jax.random.uniform(jax.random.key(2), a.shape),
            variables["batch_stats"])}
    x = np.random.default_rng(0).uniform(0, 1, (2, *shape)).astype(np.float32)
    twin = torch_twin.build_twin(name, variables).eval()
    with torch.no_grad():
        theirs = twin(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
    np.testing.assert_allclose(model.apply(variables, x), theirs, rtol=1e-4, atol=1e-5)


def test_torchattacks_comparison_runs_and_reports_members():
    pytest.importorskip("torch")
    pytest.importorskip("torchattacks")  # benchmark-only dependencies (make bench installs them)
    from benchmarks import torchattacks_twin

    rows = torchattacks_twin.compare(batch=4, repeats=1, eps=0.1, train_steps=2)
    for label in ("at_eps", "worst"):
        assert rows[label]["torchattacks_max_linf"] <= rows[label]["eps"] + 1e-5
    assert rows["worst"]["ours_robust_accuracy"] == rows["worst"]["torchattacks_robust_accuracy"]
    members = rows["members"]["members"]
    assert list(members) == ["apgd-ce", "apgd-t", "square"]
    for e in members.values():
        assert e["ours"] > 0 and e["torchattacks"] > 0 and e["ours_floor"] > 0
    text = "\n".join(torchattacks_twin.to_markdown(rows))
    assert "| sum |" in text and "| square | 0, 251 |" in text


@pytest.mark.parametrize("stride,k", [(1, 3), (2, 3), (2, 1)])
def test_conv_passes_compute_the_same_three_passes_in_both_frameworks(stride, k):
    pytest.importorskip("torch")
    from benchmarks import conv_passes

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 6, 6, 3)).astype(np.float32)
    w = rng.standard_normal((k, k, 3, 4)).astype(np.float32)
    g = rng.standard_normal((2, 6 // stride, 6 // stride, 4)).astype(np.float32)
    ours, theirs = conv_passes._ours(x, w, g, stride), conv_passes._theirs(x, w, g, stride)
    to_ours = {"forward": (0, 2, 3, 1), "input_grad": (0, 2, 3, 1), "weight_grad": (2, 3, 1, 0)}
    for p in conv_passes.PASSES:
        np.testing.assert_allclose(np.asarray(ours[p]()),
                                   theirs[p]().numpy().transpose(to_ours[p]),
                                   rtol=1e-4, atol=1e-4, err_msg=p)
