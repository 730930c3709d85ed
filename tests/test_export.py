"""Export to the PyTorch models of the Adversarial Pruning Benchmark, HYDRA and RobustBench.

The reference facts (written down here independently of ``tscnc_jax.export``): the CIFAR
ResNet-18 of kuangliu's pytorch-cifar as the Piras benchmark's ``models/base_resnet18.py`` and
RobustBench's ``architectures/resnet.py`` define it, and HYDRA's ``vgg16_bn`` (the benchmark's
``models/base_vgg16.py`` / ``models/hydra.py``). Every convolution is bias-free with
``padding = kernel // 2``; BatchNorm2d uses eps 1e-5.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tscnc_jax import export, torch_models
from tscnc_jax.tree_utils import apply_masks

BN_EPS = 1e-5  # nn.BatchNorm2d's default
#: Exported logits against ours: float32 rounding of the two frameworks' kernels, relative to the
#: largest logit (measured at most 1.9e-6 dense and 1.4e-6 99 % masked on these random networks).
LOGITS_RTOL = 1e-5


# --- The reference state_dict layouts, written from the PyTorch definitions ---------------------


def _bn(prefix, channels):
    return [(f"{prefix}.weight", (channels,)), (f"{prefix}.bias", (channels,)),
            (f"{prefix}.running_mean", (channels,)), (f"{prefix}.running_var", (channels,)),
            (f"{prefix}.num_batches_tracked", ())]


def resnet18_reference_keys(num_classes=10, width=64):
    """``ResNet(BasicBlock, [2, 2, 2, 2]).state_dict()`` keys and shapes, in order."""
    keys = [("conv1.weight", (width, 3, 3, 3)), *_bn("bn1", width)]
    in_planes = width
    for layer, planes in enumerate((width, 2 * width, 4 * width, 8 * width), start=1):
        for block in range(2):
            stride = 2 if layer > 1 and block == 0 else 1
            p = f"layer{layer}.{block}"
            keys += [(f"{p}.conv1.weight", (planes, in_planes, 3, 3)), *_bn(f"{p}.bn1", planes),
                     (f"{p}.conv2.weight", (planes, planes, 3, 3)), *_bn(f"{p}.bn2", planes)]
            if stride != 1 or in_planes != planes:
                keys += [(f"{p}.shortcut.0.weight", (planes, in_planes, 1, 1)),
                         *_bn(f"{p}.shortcut.1", planes)]
            in_planes = planes
    keys += [("linear.weight", (num_classes, 8 * width)), ("linear.bias", (num_classes,))]
    return keys


# Index in HYDRA's `features` Sequential of each conv (BN at +1, ReLU at +2; MaxPools at 6, 13,
# 23, 33) and its output channels at width 64.
VGG16_CONVS = [(0, 64), (3, 64), (7, 128), (10, 128), (14, 256), (17, 256), (20, 256), (24, 512),
               (27, 512), (30, 512), (34, 512), (37, 512), (40, 512)]


def vgg16_bn_reference_keys(num_classes=10, width=64):
    """HYDRA's ``vgg16_bn(...).state_dict()`` keys and shapes, in order."""
    keys, in_channels = [], 3
    for index, channels in VGG16_CONVS:
        channels = channels * width // 64
        keys += [(f"features.{index}.weight", (channels, in_channels, 3, 3)),
                 *_bn(f"features.{index + 1}", channels)]
        in_channels = channels
    keys += [("classifier.0.weight", (256, in_channels * 2 * 2)), ("classifier.0.bias", (256,)),
             ("classifier.2.weight", (256, 256)), ("classifier.2.bias", (256,)),
             ("classifier.4.weight", (num_classes, 256)), ("classifier.4.bias", (num_classes,))]
    return keys


REFERENCE_KEYS = {"resnet18": resnet18_reference_keys, "vgg16_bn": vgg16_bn_reference_keys}


# --- A NumPy float64 forward pass with PyTorch semantics (NCHW, OIHW) --------------------------


def np_conv2d(x, w, stride, padding):
    n, _, h, wd = x.shape
    out_c, _, kh, kw = w.shape
    x = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    oh, ow = (h + 2 * padding - kh) // stride + 1, (wd + 2 * padding - kw) // stride + 1
    out = np.zeros((n, oh, ow, out_c))
    for i in range(kh):
        for j in range(kw):
            patch = x[:, :, i:i + stride * (oh - 1) + 1:stride, j:j + stride * (ow - 1) + 1:stride]
            out += np.tensordot(patch, w[:, :, i, j], axes=([1], [1]))
    return out.transpose(0, 3, 1, 2)


def np_bn_eval(x, sd, prefix):
    shape = (1, -1, 1, 1)
    mean, var = sd[f"{prefix}.running_mean"].reshape(shape), sd[f"{prefix}.running_var"]
    scale = sd[f"{prefix}.weight"].reshape(shape) / np.sqrt(var.reshape(shape) + BN_EPS)
    return (x - mean) * scale + sd[f"{prefix}.bias"].reshape(shape)


def np_relu(x):
    return np.maximum(x, 0.0)


def np_pool(x, k, reduce):  # F.max_pool2d / F.avg_pool2d with kernel = stride = k, floor mode
    n, c, h, w = x.shape
    oh, ow = h // k, w // k
    return reduce(x[:, :, :oh * k, :ow * k].reshape(n, c, oh, k, ow, k), axis=(3, 5))


def np_adaptive_avg_pool2d(x, size):
    h, w = x.shape[2:]
    out = np.empty(x.shape[:2] + (size, size))
    for i in range(size):
        for j in range(size):
            rows = slice(int(np.floor(i * h / size)), int(np.ceil((i + 1) * h / size)))
            cols = slice(int(np.floor(j * w / size)), int(np.ceil((j + 1) * w / size)))
            out[:, :, i, j] = x[:, :, rows, cols].mean(axis=(2, 3))
    return out


def np_linear(x, sd, prefix):
    return x @ sd[f"{prefix}.weight"].T + sd[f"{prefix}.bias"]


def np_resnet18(sd, x):
    sd = {k: v.astype(np.float64) for k, v in sd.items()}
    out = np_relu(np_bn_eval(np_conv2d(x, sd["conv1.weight"], 1, 1), sd, "bn1"))
    for layer in range(1, 5):
        for block in range(2):
            p = f"layer{layer}.{block}"
            stride = 2 if layer > 1 and block == 0 else 1
            y = np_relu(np_bn_eval(np_conv2d(out, sd[f"{p}.conv1.weight"], stride, 1), sd,
                                   f"{p}.bn1"))
            y = np_bn_eval(np_conv2d(y, sd[f"{p}.conv2.weight"], 1, 1), sd, f"{p}.bn2")
            if f"{p}.shortcut.0.weight" in sd:
                out = np_bn_eval(np_conv2d(out, sd[f"{p}.shortcut.0.weight"], stride, 0), sd,
                                 f"{p}.shortcut.1")
            out = np_relu(y + out)
    out = np_pool(out, 4, np.mean)
    return np_linear(out.reshape(out.shape[0], -1), sd, "linear")


def np_vgg16_bn(sd, x):
    sd = {k: v.astype(np.float64) for k, v in sd.items()}
    for index, _ in VGG16_CONVS:
        if index in (7, 14, 24, 34):  # a MaxPool2d(2, 2) precedes these convs
            x = np_pool(x, 2, np.max)
        x = np_relu(np_bn_eval(np_conv2d(x, sd[f"features.{index}.weight"], 1, 1), sd,
                               f"features.{index + 1}"))
    x = np_adaptive_avg_pool2d(x, 2).reshape(x.shape[0], -1)  # torch.flatten(x, 1): NCHW order
    x = np_relu(np_linear(x, sd, "classifier.0"))
    x = np_relu(np_linear(x, sd, "classifier.2"))
    return np_linear(x, sd, "classifier.4")


NP_FORWARD = {"resnet18": np_resnet18, "vgg16_bn": np_vgg16_bn}


# --- Helpers ------------------------------------------------------------------------------------


def random_variables(model, rng, image_size=32):
    """Variables of ``model`` with random weights and non-trivial BatchNorm statistics, in
    float32 NumPy (no ``init`` compile: shapes from ``jax.eval_shape``)."""
    shapes = jax.eval_shape(model.init, jax.random.key(0),
                            jnp.zeros((1, image_size, image_size, 3)))

    def fill(path, leaf):
        name, shape = path[-1].key, leaf.shape
        if name == "kernel":
            value = rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[:-1]))
        elif name in ("scale", "var"):
            value = rng.uniform(0.5, 1.5, shape)
        else:  # bias, mean
            value = 0.1 * rng.standard_normal(shape)
        return value.astype(np.float32)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def flax_logits(model, variables, x_nchw):
    x = jnp.asarray(x_nchw.transpose(0, 2, 3, 1), jnp.float32)
    return np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x))


# --- (a) names and shapes -----------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["resnet18", "vgg16_bn"])
def test_state_dict_keys_and_shapes_are_the_reference_ones(arch):
    model = torch_models.ARCHS[arch]()
    sd = export.to_torch_state_dict(random_variables(model, np.random.default_rng(0)), arch)
    reference = REFERENCE_KEYS[arch]()
    assert [k for k, _ in reference] == list(sd)  # the same names, in state_dict order
    for key, shape in reference:
        assert sd[key].shape == shape, key
        expected_dtype = np.int64 if key.endswith("num_batches_tracked") else np.float32
        assert sd[key].dtype == expected_dtype, key
    n_params = sum(v.size for k, v in sd.items()
                   if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
    # 11,173,962: kuangliu's ResNet18 on CIFAR-10; 15,311,818: HYDRA's vgg16_bn.
    assert n_params == {"resnet18": 11_173_962, "vgg16_bn": 15_311_818}[arch]


@pytest.mark.parametrize("arch", ["resnet18", "vgg16_bn"])
def test_reduced_models_export_with_their_own_shapes(arch):
    model = torch_models.ARCHS[arch](num_classes=7, width=8)
    sd = export.to_torch_state_dict(random_variables(model, np.random.default_rng(0)), arch)
    assert {k: v.shape for k, v in sd.items()} == dict(
        REFERENCE_KEYS[arch](num_classes=7, width=8))


# --- (b) the same function as PyTorch computes --------------------------------------------------


@pytest.mark.parametrize("arch,image_size", [("resnet18", 32), ("vgg16_bn", 32),
                                             ("vgg16_bn", 28)])
def test_exported_weights_compute_the_flax_logits_in_pytorch_semantics(arch, image_size):
    # 28x28 leaves the VGG a 1x1 map, which AdaptiveAvgPool2d((2, 2)) replicates.
    rng = np.random.default_rng(1)
    model = torch_models.ARCHS[arch](width=16)
    variables = random_variables(model, rng, image_size)
    x = rng.uniform(0.0, 1.0, (2, 3, image_size, image_size))
    sd = export.to_torch_state_dict(variables, arch)
    expected = NP_FORWARD[arch](sd, x)
    logits = flax_logits(model, variables, x)
    scale = np.abs(expected).max()
    assert scale > 1e-2 and np.abs(expected[0] - expected[1]).max() > 1e-3 * scale  # non-trivial
    np.testing.assert_allclose(logits, expected, rtol=0, atol=LOGITS_RTOL * scale)


def test_vgg_classifier_input_is_permuted_to_channel_major():
    # Without the permutation the NCHW-flattening PyTorch model would compute something else.
    rng = np.random.default_rng(2)
    model = torch_models.VGG16BN(width=16)
    variables = random_variables(model, rng)
    x = rng.uniform(0.0, 1.0, (2, 3, 32, 32))
    sd = export.to_torch_state_dict(variables, "vgg16_bn")
    kernel = np.asarray(variables["params"]["classifier_0"]["kernel"])  # rows in (h, w, c) order
    channels = kernel.shape[0] // 4
    np.testing.assert_array_equal(  # column c * 4 + h * 2 + w is row (h * 2 + w) * C + c
        sd["classifier.0.weight"],
        kernel.reshape(2, 2, channels, 256).transpose(3, 2, 0, 1).reshape(256, -1))
    unpermuted = dict(sd, **{"classifier.0.weight": kernel.T})
    expected = np_vgg16_bn(sd, x)
    assert np.abs(np_vgg16_bn(unpermuted, x) - expected).max() > 1e-2 * np.abs(expected).max()


def test_stride_two_convs_pad_like_pytorch():
    # PyTorch's padding=1 at stride 2 is not Flax's "SAME" (which pads (0, 1) on even inputs).
    rng = np.random.default_rng(3)
    model = torch_models.BasicBlock(8, stride=2)
    x = rng.uniform(0.0, 1.0, (2, 4, 8, 8))
    variables = jax.tree.map(np.asarray, model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 4)),
                                                    train=False))
    y = np.asarray(model.apply(variables, jnp.asarray(x.transpose(0, 2, 3, 1), jnp.float32),
                               train=False))
    p, s = variables["params"], variables["batch_stats"]

    def sd_of(name):
        return {f"{name}.weight": np.asarray(p[name]["scale"], np.float64),
                f"{name}.bias": np.asarray(p[name]["bias"], np.float64),
                f"{name}.running_mean": np.asarray(s[name]["mean"], np.float64),
                f"{name}.running_var": np.asarray(s[name]["var"], np.float64)}

    def oihw(name):
        return np.asarray(p[name]["kernel"], np.float64).transpose(3, 2, 0, 1)

    out = np_relu(np_bn_eval(np_conv2d(x, oihw("conv1"), 2, 1), sd_of("bn1"), "bn1"))
    out = np_bn_eval(np_conv2d(out, oihw("conv2"), 1, 1), sd_of("bn2"), "bn2")
    short = np_bn_eval(np_conv2d(x, oihw("shortcut_0"), 2, 0), sd_of("shortcut_1"), "shortcut_1")
    np.testing.assert_allclose(y, np_relu(out + short).transpose(0, 2, 3, 1), atol=1e-5)


def test_train_mode_updates_batch_stats_with_pytorch_momentum():
    model = torch_models.ResNet18(width=4, num_classes=3)
    variables = random_variables(model, np.random.default_rng(4))
    x = jnp.asarray(np.random.default_rng(5).uniform(0, 1, (4, 32, 32, 3)), jnp.float32)
    logits, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
    assert logits.shape == (4, 3)
    # running_mean <- 0.9 running_mean + 0.1 batch_mean (PyTorch momentum 0.1) for bn1's input.
    conv1 = jax.lax.conv_general_dilated(
        x, jnp.asarray(variables["params"]["conv1"]["kernel"]), (1, 1), "SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    expected = 0.9 * variables["batch_stats"]["bn1"]["mean"] + 0.1 * conv1.mean(axis=(0, 1, 2))
    np.testing.assert_allclose(updates["batch_stats"]["bn1"]["mean"], expected, atol=1e-5)


def test_masks_are_multiplied_in():
    rng = np.random.default_rng(6)
    model = torch_models.VGG16BN(width=8)
    variables = random_variables(model, rng)
    masks = jax.tree.map(lambda p: (rng.uniform(size=p.shape) < 0.1).astype(np.float32)
                         if p.ndim >= 2 else None, variables["params"])
    sd = export.to_torch_state_dict(variables, "vgg16_bn", masks=masks)
    masked = dict(variables, params=apply_masks(variables["params"], masks))
    for key, value in export.to_torch_state_dict(masked, "vgg16_bn").items():
        np.testing.assert_array_equal(sd[key], value)
    density = np.mean(sd["features.3.weight"] != 0)
    assert 0.05 < density < 0.15


# --- (c) safetensors round trip -----------------------------------------------------------------


@pytest.mark.parametrize("arch", ["resnet18", "vgg16_bn"])
def test_safetensors_round_trip_is_bitwise(arch, tmp_path):
    model = torch_models.ARCHS[arch]()
    variables = random_variables(model, np.random.default_rng(7))
    sd = export.to_torch_state_dict(variables, arch, num_batches_tracked=1234)
    path = tmp_path / f"{arch}.safetensors"
    export.save_safetensors(path, sd)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left
    loaded = export.load_safetensors(path)
    assert loaded.keys() == sd.keys()
    for key in sd:
        assert loaded[key].dtype == sd[key].dtype and loaded[key].shape == sd[key].shape, key
        np.testing.assert_array_equal(loaded[key], sd[key])
    assert loaded["bn1.num_batches_tracked" if arch == "resnet18"
                  else "features.1.num_batches_tracked"] == 1234
    back = export.from_torch_state_dict(loaded, arch, variables)
    assert jax.tree.structure(back) == jax.tree.structure(variables)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(variables), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a).view(np.uint32), b.view(np.uint32))


def test_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "model.safetensors"
    export.save_safetensors(path, {"a": np.ones(3, np.float32)})
    before = path.read_bytes()

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(export.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        export.save_safetensors(path, {"a": np.zeros(3, np.float32)})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_import_accepts_dataparallel_prefix_and_old_checkpoints():
    model = torch_models.ResNet18(width=4)
    variables = random_variables(model, np.random.default_rng(8))
    sd = export.to_torch_state_dict(variables, "resnet18")
    old = {f"module.{k}": v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    back = export.from_torch_state_dict(old, "resnet18", variables)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(variables), strict=True):
        np.testing.assert_array_equal(a, b)


# --- (d) errors name what is wrong --------------------------------------------------------------


@pytest.fixture(scope="module")
def small_resnet():
    model = torch_models.ResNet18(width=4)
    return random_variables(model, np.random.default_rng(9))


def test_unknown_arch(small_resnet):
    with pytest.raises(ValueError, match=r"Unknown arch 'resnet50'.*resnet18.*vgg16_bn"):
        export.to_torch_state_dict(small_resnet, "resnet50")
    with pytest.raises(ValueError, match="Unknown arch 'vgg16'"):
        export.from_torch_state_dict({}, "vgg16", small_resnet)


def test_variables_of_another_arch(small_resnet):
    with pytest.raises(ValueError) as info:
        export.to_torch_state_dict(small_resnet, "vgg16_bn")
    message = str(info.value)
    assert "arch 'vgg16_bn'" in message
    assert "missing (" in message and "params/features_0/kernel (3, 3, 3, 64)" in message
    assert "unexpected (" in message and "params/conv1/kernel (3, 3, 3, 4)" in message


def test_missing_extra_and_misshapen_variables(small_resnet):
    params = {k: dict(v) for k, v in small_resnet["params"].items()}
    del params["linear"]["bias"]
    params["layer1_0"] = dict(params["layer1_0"], conv9={"kernel": np.zeros((3, 3, 4, 4))})
    params["layer2_0"] = dict(params["layer2_0"],
                              conv1={"kernel": np.zeros((3, 3, 4, 5), np.float32)})
    with pytest.raises(ValueError) as info:
        export.to_torch_state_dict(dict(small_resnet, params=params), "resnet18")
    message = str(info.value)
    assert "missing (1): params/linear/bias (10,)" in message
    assert "unexpected (1): params/layer1_0/conv9/kernel (3, 3, 4, 4)" in message
    assert "params/layer2_0/conv1/kernel: got (3, 3, 4, 5), expected (3, 3, 4, 8)" in message
    with pytest.raises(ValueError, match=r"missing \(\d+\): batch_stats/bn1/mean"):
        export.to_torch_state_dict({"params": small_resnet["params"]}, "resnet18")


def test_state_dict_that_does_not_fit(small_resnet):
    sd = export.to_torch_state_dict(small_resnet, "resnet18")
    bad = dict(sd)
    del bad["linear.bias"]
    bad["layer1.0.conv1.popup_scores"] = np.zeros((4, 4, 3, 3), np.float32)  # HYDRA's scores
    bad["conv1.weight"] = np.zeros((4, 3, 5, 5), np.float32)
    with pytest.raises(ValueError) as info:
        export.from_torch_state_dict(bad, "resnet18", small_resnet)
    message = str(info.value)
    assert "missing (1): linear.bias (10,)" in message
    assert "unexpected (1): layer1.0.conv1.popup_scores (4, 4, 3, 3)" in message
    assert "conv1.weight: got (4, 3, 5, 5), expected (4, 3, 3, 3)" in message


def test_long_lists_are_shortened(small_resnet):
    with pytest.raises(ValueError, match=r"missing \(\d+\): .*\.\.\. and \d+ more"):
        export.from_torch_state_dict({"linear.weight": np.zeros((10, 32))}, "resnet18",
                                     small_resnet)


# --- The real PyTorch modules (skipped without torch) -------------------------------------------


def _torch_reference_modules(torch, width=64):
    """The reference modules, written from the same facts (see the module docstring), with every
    conv width scaled by ``width / 64`` (the benchmarks' models at 64)."""
    nn, F = torch.nn, torch.nn.functional

    class BasicBlock(nn.Module):
        def __init__(self, in_planes, planes, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(planes)
            self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(planes)
            self.shortcut = nn.Sequential()
            if stride != 1 or in_planes != planes:
                self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False),
                                              nn.BatchNorm2d(planes))

        def forward(self, x):
            out = F.relu(self.bn1(self.conv1(x)))
            return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))

    class ResNet18(nn.Module):
        def __init__(self, num_classes=10):
            super().__init__()
            self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(width)
            in_planes = width
            for i, mult in enumerate((1, 2, 4, 8), start=1):
                blocks = []
                for stride in (1 if i == 1 else 2, 1):
                    blocks.append(BasicBlock(in_planes, width * mult, stride))
                    in_planes = width * mult
                setattr(self, f"layer{i}", nn.Sequential(*blocks))
            self.linear = nn.Linear(8 * width, num_classes)

        def forward(self, x):
            out = F.relu(self.bn1(self.conv1(x)))
            out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
            out = F.avg_pool2d(out, 4)
            return self.linear(out.view(out.size(0), -1))

    class VGG16BN(nn.Module):
        def __init__(self, num_classes=10):
            super().__init__()
            cfg = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
                   512, 512, 512]
            layers, in_channels = [], 3
            for v in cfg:
                if v == "M":
                    layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                else:
                    v = v * width // 64
                    layers += [nn.Conv2d(in_channels, v, 3, padding=1, bias=False),
                               nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                    in_channels = v
            self.features = nn.Sequential(*layers)
            self.avgpool = nn.AdaptiveAvgPool2d((2, 2))
            self.classifier = nn.Sequential(nn.Linear(in_channels * 2 * 2, 256), nn.ReLU(True),
                                            nn.Linear(256, 256), nn.ReLU(True),
                                            nn.Linear(256, num_classes))

        def forward(self, x):
            x = torch.flatten(self.avgpool(self.features(x)), 1)
            return self.classifier(x)

    return {"resnet18": ResNet18, "vgg16_bn": VGG16BN}


@pytest.mark.parametrize("width", [64, 8])
@pytest.mark.parametrize("arch", ["resnet18", "vgg16_bn"])
def test_reference_modules_have_the_reference_layout(arch, width):
    torch = pytest.importorskip("torch")
    module = _torch_reference_modules(torch, width)[arch](num_classes=7)
    assert [(k, tuple(v.shape)) for k, v in module.state_dict().items()] == REFERENCE_KEYS[arch](
        num_classes=7, width=width)


@pytest.mark.parametrize("sparsity", [0.0, 0.99], ids=["dense", "masked99"])
@pytest.mark.parametrize("arch", ["resnet18", "vgg16_bn"])
def test_pytorch_strict_load_and_logits(arch, sparsity, tmp_path):
    torch = pytest.importorskip("torch")
    safetensors_torch = pytest.importorskip("safetensors.torch")
    rng = np.random.default_rng(10)
    model = torch_models.ARCHS[arch]()
    variables = random_variables(model, rng)
    # A pruned network: random masks keeping 1 % of every kernel, folded in by the export; the
    # kernels scaled by 1 / sqrt(density), as initialised at their live fan-in, so that the
    # signal reaches the logits instead of drowning in the BatchNorm shifts.
    is_kernel = lambda path: path[-1].key == "kernel"
    masks = jax.tree_util.tree_map_with_path(
        lambda path, p: (rng.uniform(size=p.shape) >= sparsity).astype(np.float32)
        if is_kernel(path) else None, variables["params"])
    variables["params"] = jax.tree_util.tree_map_with_path(
        lambda path, p: p / np.float32(np.sqrt(1.0 - sparsity)) if is_kernel(path) else p,
        variables["params"])
    path = tmp_path / "model.safetensors"
    export.save_safetensors(path, export.to_torch_state_dict(variables, arch, masks=masks))
    variables = dict(variables, params=apply_masks(variables["params"], masks))

    reference = _torch_reference_modules(torch)[arch]()
    result = reference.load_state_dict(safetensors_torch.load_file(str(path)), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    reference.eval()
    x = rng.uniform(0.0, 1.0, (2, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        expected = reference(torch.from_numpy(x)).numpy()
    logits = flax_logits(model, variables, x)
    scale = np.abs(expected).max()
    assert scale > 1e-3 and np.abs(expected[0] - expected[1]).max() > 1e-3 * scale  # non-trivial
    np.testing.assert_allclose(logits, expected, rtol=0, atol=LOGITS_RTOL * scale)

    # And back: the PyTorch module's own state_dict (tensors) imports bitwise.
    back = export.from_torch_state_dict(reference.state_dict(), arch, variables)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(variables), strict=True):
        np.testing.assert_array_equal(a, b)


def test_create_model_builds_the_torch_compatible_models():
    import tscnc_jax as tj
    from tscnc_jax import torch_models

    assert isinstance(tj.create_model("resnet18", width=8), torch_models.ResNet18)
    model = tj.create_model("vgg16_bn", width=8, num_classes=7, conv_impl="xla")
    assert isinstance(model, torch_models.VGG16BN) and model.conv_impl == "xla"
    with pytest.raises(ValueError, match="conv_impl must be one of"):
        tj.create_model("resnet18", conv_impl="cuda")
