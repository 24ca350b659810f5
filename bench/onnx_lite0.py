"""EfficientNet-Lite0 as an ONNX graph, built from flukeid's own weight file,
and timed with onnxruntime: the peer that `scripts/bench-peers.sh` compares
flukeid's forward pass with.

The graph mirrors src/backbone.rs: BatchNorm (eps 1e-3) folded into each
convolution, TensorFlow "SAME" padding written out for the given input size,
ReLU6 as Clip(0, 6). It is checked against the golden logits of
tests/fixtures/golden before anything is timed.

    python bench/onnx_lite0.py --rounds 20 [--height 224 --width 448] [--threads 2]

Prints one line per measurement: `onnxruntime HxW batch=B ms_per_image=X`.
"""

import argparse
import json
import pathlib
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from safetensors.numpy import load_file

ROOT = pathlib.Path(__file__).resolve().parent.parent
BN_EPS = 1e-3
# expand ratio, kernel, stride of the first block, output channels, repeats
STAGES = [(1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3),
          (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1)]


def same_padding(size, kernel, stride):
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return out, total // 2, total - total // 2


class Graph:
    def __init__(self, weights):
        self.w = weights
        self.nodes, self.inits = [], []
        self.count = 0

    def name(self, stem):
        self.count += 1
        return f"{stem}_{self.count}"

    def const(self, stem, array):
        name = self.name(stem)
        self.inits.append(numpy_helper.from_array(array.astype(np.float32), name))
        return name

    def conv_bn(self, x, conv, bn, size, stride=1, groups=1, relu6=True):
        """Folded conv + BN (+ ReLU6); returns (output name, new (h, w))."""
        weight = self.w[f"{conv}.weight"]
        scale = self.w[f"{bn}.weight"] / np.sqrt(self.w[f"{bn}.running_var"] + BN_EPS)
        bias = self.w[f"{bn}.bias"] - self.w[f"{bn}.running_mean"] * scale
        weight = weight * scale[:, None, None, None]
        k = weight.shape[-1]
        (h, w) = size
        out_h, top, bottom = same_padding(h, k, stride)
        out_w, left, right = same_padding(w, k, stride)
        y = self.name("conv")
        self.nodes.append(helper.make_node(
            "Conv", [x, self.const("w", weight), self.const("b", bias)], [y],
            kernel_shape=[k, k], strides=[stride, stride], group=groups,
            pads=[top, left, bottom, right]))
        if relu6:
            z = self.name("relu6")
            lo, hi = self.const("lo", np.array(0.0)), self.const("hi", np.array(6.0))
            self.nodes.append(helper.make_node("Clip", [y, lo, hi], [z]))
            y = z
        return y, (out_h, out_w)


def build(weights, height, width, batch="N"):
    g = Graph(weights)
    x, size = g.conv_bn("input", "_conv_stem", "_bn0", (height, width), stride=2)
    inp, index = 32, 0
    for expand, kernel, stride, out, repeats in STAGES:
        for r in range(repeats):
            p = f"_blocks.{index}"
            s = stride if r == 0 else 1
            h = x
            if expand != 1:
                h, _ = g.conv_bn(h, f"{p}._expand_conv", f"{p}._bn0", size)
            hidden = inp * expand
            h, new_size = g.conv_bn(h, f"{p}._depthwise_conv", f"{p}._bn1", size, stride=s, groups=hidden)
            h, _ = g.conv_bn(h, f"{p}._project_conv", f"{p}._bn2", new_size, relu6=False)
            if s == 1 and inp == out:
                y = g.name("add")
                g.nodes.append(helper.make_node("Add", [h, x], [y]))
                h = y
            x, size, inp, index = h, new_size, out, index + 1
    features, _ = g.conv_bn(x, "_conv_head", "_bn1", size)
    g.nodes.append(helper.make_node("Identity", [features], ["features"]))
    pooled = g.name("pool")
    g.nodes.append(helper.make_node("GlobalAveragePool", [features], [pooled]))
    flat = g.name("flat")
    g.nodes.append(helper.make_node("Flatten", [pooled], [flat]))
    g.nodes.append(helper.make_node(
        "Gemm", [flat, g.const("fc_w", weights["_fc.weight"]), g.const("fc_b", weights["_fc.bias"])],
        ["logits"], transB=1))
    graph = helper.make_graph(
        g.nodes, "efficientnet_lite0",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 3, height, width])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, [batch, 1280, size[0], size[1]]),
         helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 1000])],
        g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def session(model, threads):
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def check_golden(weights, threads):
    """The graph must reproduce the reference logits before it is timed."""
    from PIL import Image
    worst = 0.0
    for name in ["chelsea_224x224", "pattern_224x224", "wide_224x448"]:
        folder = ROOT / "tests" / "fixtures" / "golden"
        image = np.asarray(Image.open(folder / f"{name}.png").convert("RGB"), dtype=np.float32)
        x = ((image - 127.0) / 128.0).transpose(2, 0, 1)[None]
        expected = np.array(json.loads((folder / f"{name}.json").read_text())["logits"], dtype=np.float32)
        logits = session(build(weights, x.shape[2], x.shape[3]), threads).run(["logits"], {"input": x})[0][0]
        worst = max(worst, float(np.abs(logits - expected).max()))
    if worst > 1e-4:
        raise SystemExit(f"ONNX graph differs from the golden logits by {worst}")
    return worst


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--height", type=int, default=224)
    parser.add_argument("--width", type=int, default=448)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    weights = load_file(str(ROOT / "models" / "efficientnet-lite0.safetensors"))
    worst = check_golden(weights, args.threads)
    print(f"onnxruntime {ort.__version__}: golden logits match to {worst:.1e}")
    model = build(weights, args.height, args.width)
    sess = session(model, args.threads)
    rng = np.random.default_rng(0)
    for batch in (1, 8):
        x = rng.uniform(-1, 1, (batch, 3, args.height, args.width)).astype(np.float32)
        for _ in range(3):
            sess.run(["features"], {"input": x})
        times = []
        for _ in range(args.rounds):
            start = time.perf_counter()
            sess.run(["features"], {"input": x})
            times.append((time.perf_counter() - start) * 1e3 / batch)
        print(f"onnxruntime {args.height}x{args.width} batch={batch} ms_per_image={np.median(times):.2f}")


if __name__ == "__main__":
    main()
