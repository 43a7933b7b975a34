"""The learned detector on a tiny dataset: training, the ONNX graph against PyTorch, FP16, resume, and predict."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from calibration import fit_pipeline as fp  # noqa: E402
from calibration.datasets import Dataset, load_dataset  # noqa: E402
from calibration.learned_fit import NETWORKS, LearnConfig, fit_learned, train  # noqa: E402
from calibration.learned_model import LearnedNet, add_defect, features, output_crop  # noqa: E402
from daemon.cli import main  # noqa: E402
from engines.bundle import Bundle  # noqa: E402
from engines.decode import read_image  # noqa: E402
from engines.graphs import FINE_GAIN_LEVEL  # noqa: E402
from engines.learned_graph import (  # noqa: E402
    ARCHITECTURES,
    DEFAULT_ARCHITECTURE,
    FEATURES,
    NETWORK_KEY,
    RADIUS,
    LearnedGraphSpec,
    build_learned_graph,
    weight_shapes,
)
from engines.tolerance import BLOCK  # noqa: E402
from engines.types import Geometry  # noqa: E402
from tests.helpers import fp16_vs_fp32, lighting_truth, make_dataset, tile_feeds  # noqa: E402

SIZE = 384
STEPS = 160
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    return load_dataset(make_dataset(tmp_path_factory.mktemp("data") / "part", size=SIZE, kinds=("dot",)))


@pytest.fixture(scope="module")
def bundle_dir(dataset: Dataset, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A learned bundle trained for a few steps, once for the module."""
    out = tmp_path_factory.mktemp("models") / "learned"
    learn = LearnConfig(steps=STEPS, checkpoint_every=STEPS // 4, seed=0)
    return fit_learned(dataset.train_good, out, learn=learn, progress=False)


def test_bundle_manifest_and_calibration(bundle_dir, dataset):
    """A learned bundle for the dataset's geometry; every good image was scored by the network not trained on it."""
    bundle = Bundle.load(bundle_dir)
    assert bundle.detector == "learned"
    assert bundle.geometry == Geometry(SIZE, SIZE, 1, "uint8")
    learned = bundle.manifest["learned"]
    assert [net["steps"] for net in learned["networks"]] == [STEPS] * NETWORKS
    assert learned["receptive_radius"] == RADIUS <= bundle.manifest["tiling"]["halo"]
    assert learned["network"] == DEFAULT_ARCHITECTURE
    assert learned["params"] < 20_000 and learned["flops_per_mpx"] > 0
    cal = bundle.calibration
    assert len(cal["good_scores"]) == len(dataset.train_good) and cal["networks"] == NETWORKS
    assert cal["threshold"] >= max(cal["good_scores"]) * 1.1 - 1e-4
    gains = bundle.reference()["fine_gain"]
    assert gains.shape == (SIZE // BLOCK, SIZE // BLOCK) and gains.min() > 0 and gains.max() <= 1


def test_loss_falls(bundle_dir):
    """For each network, the mean training loss of the last interval is well below that of the first."""
    for net in Bundle.load(bundle_dir).manifest["learned"]["networks"]:
        losses = net["losses"]
        assert len(losses) == 4
        assert losses[-1] < 0.7 * losses[0], losses


def _torch_reference(net: LearnedNet, feeds: dict[str, np.ndarray], core: int, halo: int = 64) -> np.ndarray:
    """The graph's arithmetic written independently in numpy + torch (photometric field, crop, features, net, gain)."""
    t = core + 2 * halo
    p = feeds["photo"][0].astype(np.float64)
    u, v = np.arange(t)[None, :], np.arange(t)[:, None]
    gain = p[0] + p[1] * u + p[2] * v + p[3] * u * u + p[4] * v * v + p[5] * u * v
    offset = p[6] + p[7] * u + p[8] * v
    xn = (feeds["image"].astype(np.float64) - offset) / gain
    span = slice(halo - RADIUS, halo + core + RADIUS)
    crop = [
        torch.from_numpy(np.ascontiguousarray(a[..., span, span]).astype(np.float32))
        for a in (xn, feeds["mean"], feeds["low"], feeds["high"], feeds["weight"])
    ]
    with torch.no_grad():
        logit = net(features(*crop))
        out = torch.nn.functional.softplus(logit) * torch.from_numpy(feeds["weight"][..., halo:-halo, halo:-halo])
    step = 2**FINE_GAIN_LEVEL
    gain = np.repeat(np.repeat(feeds["fine_gain"], step, axis=2), step, axis=3)[..., halo:-halo, halo:-halo]
    return out.numpy() * gain


@pytest.mark.parametrize("network", ARCHITECTURES)
def test_onnx_graph_equals_pytorch(tmp_path, network):
    """The hand-built ONNX graph reproduces the torch network on a tile within 1e-4 (relative to max(|y|, 1)),
    for every architecture."""
    torch.manual_seed(3)
    net = LearnedNet(1, network).eval()
    with torch.no_grad():
        for conv in net.convs:  # larger weights than the initialisation, so the output is far from constant
            conv.weight.mul_(3)
    core = 64
    feeds = tile_feeds(np.random.default_rng(0), core)
    spec = LearnedGraphSpec(1, core)
    path = tmp_path / "g.onnx"
    import onnx

    onnx.save(build_learned_graph(spec, net.numpy_weights(), network), path)
    expected = _torch_reference(net, feeds, core)
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(["anomaly"], feeds)[0]
    assert got.shape == (1, 1, core, core)
    assert expected.std() > 1e-3, "the test map is not trivial"
    error = float((np.abs(got - expected) / np.maximum(np.abs(expected), 1)).max())
    print(f"ONNX vs PyTorch ({network}): max relative error {error:.2e}")
    assert error <= 1e-4
    assert {p.key: p.value for p in onnx.load(str(path)).metadata_props}[NETWORK_KEY] == network


def test_graph_softplus_is_exact_where_the_logit_is_large(tmp_path):
    """The graph's softplus (relu + log1p(exp(-|x|))) neither overflows at large logits nor rounds to 0 at very
    negative ones (ONNX has no log1p: log(1 + exp(-30)) is 0 in float32)."""
    import onnx
    import onnxruntime as ort

    # the softplus is the same in every architecture; the dilated network's head is conv5
    weights = {k: np.zeros(s, np.float32) for k, s in weight_shapes(1, "dilated").items()}
    feeds = tile_feeds(np.random.default_rng(0), 64)
    feeds["fine_gain"][:] = 1
    path = tmp_path / "g.onnx"
    for logit in (-80.0, -30.0, -17.0, -3.0, 0.0, 3.0, 100.0):
        weights["conv5.bias"][:] = logit  # the head's bias: the logit everywhere
        onnx.save(build_learned_graph(LearnedGraphSpec(1, 64), weights, "dilated"), path)
        got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["anomaly"], feeds)[0]
        inside = got[feeds["weight"][..., 64:-64, 64:-64] > 0]
        np.testing.assert_allclose(inside, np.logaddexp(0, logit), rtol=1e-6)


def test_each_network_trains_and_counts_its_parameters(training):
    """Training any architecture gives the weights its graph expects; the report counts exactly those."""
    data, stats = training
    for network in ARCHITECTURES:
        learn = LearnConfig(steps=2, batch=1, patch=96, network=network)
        weights, report = train(data, stats, [1, 2], 2, learn, None, progress=False)
        shapes = weight_shapes(1, network)
        assert {k: v.shape for k, v in weights.items()} == shapes
        assert report.params == sum(int(np.prod(s)) for s in shapes.values())


def test_fp16_graph_agrees_with_fp32(bundle_dir, dataset):
    """On real frames, the bundle's FP16 graph gives the FP32 map within 2e-2 relative to max(|map|, 1)."""
    worst = fp16_vs_fp32(bundle_dir, [dataset.test[0].path, dataset.test[-1].path])
    print(f"learned FP16 vs FP32: max relative error {worst:.2e}")
    assert worst <= 2e-2


def test_predict_cli_finds_the_dots_and_passes_goods(bundle_dir, dataset, tmp_path):
    """`inspectd predict` on the learned bundle: goods pass, each dot image is rejected with a box on the dot."""
    out = tmp_path / "pred.jsonl"
    test_root = dataset.test[0].path.parents[1]
    assert main(["predict", str(bundle_dir), str(test_root), "--out", str(out), "--backend", "onnxruntime"]) == 0
    records = {Path(r["image"]): r for r in map(json.loads, out.read_text().splitlines())}
    assert len(records) == len(dataset.test)
    for sample in dataset.test:
        record = records[sample.path]
        if sample.is_good:
            assert record["verdict"] == "pass", (sample.path, record["score"], record["threshold"])
            continue
        assert record["verdict"] == "reject", (sample.path, record["score"], record["threshold"])
        mask = read_image(sample.mask) > 0
        x0, y0, x1, y1 = record["defects"][0]["bbox"]
        assert mask[y0:y1, x0:x1].any(), f"{sample.path}: strongest box misses the dot"


def test_inference_never_imports_torch(bundle_dir, dataset):
    """Loading and running a learned bundle needs only the ONNX graph."""
    code = (
        "import sys; from engines.inspector import Inspector; "
        f"i = Inspector.load({str(bundle_dir)!r}, 'onnxruntime'); i.activate(); "
        f"i.inspect_path(__import__('pathlib').Path({str(dataset.test[0].path)!r})); "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_defect_augmentation_labels_what_it_changes():
    """Every kind of synthetic defect changes the crop where its label is, and only a local area."""
    rng = np.random.default_rng(1)
    crop = np.full((1, 128, 128), 120, np.float32) + rng.normal(0, 2, (1, 128, 128)).astype(np.float32)
    crop[:, 40:80, 40:80] += 60  # some structure to remove or smear
    source = rng.uniform(0, 255, (1, 128, 128)).astype(np.float32)
    for _ in range(30):
        out, label = add_defect(crop, rng, source, RADIUS + 4)
        assert out.shape == crop.shape and label.shape == crop.shape[1:]
        assert label.mean() < 0.5
        if label.any():
            assert np.abs(out - crop)[0][label > 0].max() > 1.0


@pytest.fixture(scope="module")
def training(dataset: Dataset) -> tuple:
    """Registered goods and fold statistics, as the learned fit prepares them (no network)."""
    images = dataset.train_good
    geometry = Geometry(SIZE, SIZE, 1, "uint8")
    config = fp.resolve_config(fp.FitConfig(), geometry)
    weight = fp.inspection_region(geometry, None, config.margin_px or 0)
    tmp = Path(tempfile.mkdtemp())
    try:
        reference, _ = fp.bootstrap_reference(images, geometry, weight, config, False)
        data = fp.register_all(images, geometry, weight, reference, tmp, False, "registering")
        data.registered = np.array(data.registered)  # off the temporary memmap
        stats = [fp.statistics(data, [i for i in range(len(images)) if i % 2 != f], config) for f in range(2)]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return data, stats


def test_training_is_reproducible_and_resumes_exactly(training, tmp_path):
    """Same seed, same weights; stopping at a checkpoint and resuming gives the uninterrupted run's weights."""
    data, stats = training
    indices = list(range(1, len(data.coefs)))
    learn = LearnConfig(steps=12, batch=2, patch=96, seed=5, checkpoint_every=6)
    whole, report = train(data, stats, indices, 2, learn, None, progress=False)
    again, _ = train(data, stats, indices, 2, learn, None, progress=False)
    assert all(np.array_equal(whole[k], again[k]) for k in whole)
    ckpt = tmp_path / "run.ckpt"
    train(data, stats, indices, 2, LearnConfig(**{**learn.__dict__, "steps": 6}), ckpt, progress=False)
    resumed, resumed_report = train(data, stats, indices, 2, learn, ckpt, progress=False)
    assert resumed_report.resumed_from == 6 and resumed_report.steps == 12
    for k in whole:
        np.testing.assert_allclose(resumed[k], whole[k], rtol=1e-5, atol=1e-6, err_msg=k)
    assert report.params == sum(v.size for v in whole.values())
    other, _ = train(data, stats, indices, 2, LearnConfig(**{**learn.__dict__, "seed": 6}), None, progress=False)
    assert not np.array_equal(other["conv0.weight"], whole["conv0.weight"])


@pytest.mark.parametrize("network", ARCHITECTURES)
def test_output_crop_matches_the_valid_network(network):
    """Every network's output is its input minus the receptive-field radius on every side."""
    net = LearnedNet(3, network)
    x = torch.zeros(1, 3 * FEATURES, 2 * RADIUS + 10, 2 * RADIUS + 10)
    assert net(x).shape[-2:] == output_crop(np.zeros((2 * RADIUS + 10, 2 * RADIUS + 10))).shape


def test_two_scale_network_scores_each_pixel_and_sees_its_receptive_field():
    """The two-scale network works on 2x2 blocks, but its logit is per pixel (not one value per block), and what
    an output pixel depends on spans 2 * RADIUS px (30 px to one side, 31 to the other, by its place in the block),
    never more than RADIUS from it; an odd input side is refused."""
    torch.manual_seed(0)
    net = LearnedNet(1, "twoscale").eval()
    side = 2 * RADIUS + 8
    x = torch.rand(1, FEATURES, side, side, requires_grad=True)
    out = net(x)[0, 0]
    assert (out[0::2, 0::2] - out[0::2, 1::2]).abs().min() > 0 and (out[0::2] - out[1::2]).abs().min() > 0
    for y in (4, 5):  # the first and the second row of a block
        (grad,) = torch.autograd.grad(out[y].sum(), x, retain_graph=True)
        rows = np.flatnonzero(grad[0].abs().sum(dim=(0, 2)).numpy())
        centre = y + RADIUS
        assert rows.min() >= centre - RADIUS and rows.max() <= centre + RADIUS
        assert rows.max() - rows.min() == 2 * RADIUS - 1, (y, rows.min() - centre, rows.max() - centre)
    with pytest.raises(ValueError, match="even input side"):
        net(torch.zeros(1, FEATURES, side + 1, side + 1))


def test_fit_cli_resumes_from_finished_checkpoints(bundle_dir, dataset, tmp_path):
    """`inspectd fit --detector learned` with checkpoints at the requested steps skips training and writes a bundle."""
    ckpt = bundle_dir.with_name(bundle_dir.name + ".ckpt")
    assert all(ckpt.with_name(f"{ckpt.name}.net{n}").exists() for n in range(NETWORKS))
    out = tmp_path / "again"
    root = dataset.train_good[0].parents[2]
    argv = ["fit", str(root), "--out", str(out), "--detector", "learned", "--steps", str(STEPS)]
    assert main([*argv, "--checkpoint", str(ckpt)]) == 0
    bundle = Bundle.load(out)
    assert bundle.detector == "learned"
    assert [net["resumed_from"] for net in bundle.manifest["learned"]["networks"]] == [STEPS] * NETWORKS
    assert bundle.manifest["learned"]["seed"] == 0
    assert bundle.calibration["good_scores"] == Bundle.load(bundle_dir).calibration["good_scores"]


def test_training_crops_are_padded_like_the_tiles(training):
    """Crops reaching past the border hold what the tile plan's edge-replicated padding holds there."""
    from calibration.learned_fit import _normalise_window, _Sampler

    data, stats = training
    learn = LearnConfig(patch=96)
    sampler = _Sampler(data, stats, [1, 2], 2, learn)
    frame = np.asarray(data.registered[1])
    padded = np.pad(frame, RADIUS, mode="edge")
    for y, x in ((-RADIUS, -RADIUS), (SIZE - 96 + RADIUS, 5), (7, SIZE - 96 + RADIUS)):
        window = sampler._window(frame, y, x)
        np.testing.assert_array_equal(window, padded[y + RADIUS : y + RADIUS + 96, x + RADIUS : x + RADIUS + 96])
        mu = sampler._window(stats[0]["mu"], y, x)
        np.testing.assert_array_equal(
            mu[0],
            np.pad(stats[0]["mu"][0], RADIUS, mode="edge")[y + RADIUS : y + RADIUS + 96, x + RADIUS : x + RADIUS + 96],
        )
    # the lighting model is extrapolated on image coordinates, as the graph's per-tile fields are
    coef = np.array([1.1, 0.02, -0.01, 0.03, 0.01, -0.02, 2.0, 0.5, 0.4], np.float32)
    xn = _normalise_window(np.full((1, 4, 4), 100, np.float32), coef, -3, -2, (SIZE, SIZE))
    gain, offset = lighting_truth(coef, -2.0, -3.0, SIZE, SIZE)
    assert np.isclose(xn[0, 0, 0], (100 - offset) / gain)
    rng = np.random.default_rng(0)
    origins = np.array([sampler._origin(rng) for _ in range(500)])
    assert origins.min() >= -RADIUS and origins.max() <= SIZE - 96 + RADIUS
    assert (origins == -RADIUS).any(), "border pixels are trained"


def test_checkpoint_of_other_images_is_refused(training, tmp_path):
    """A checkpoint is resumed only for the same training images and settings."""
    from engines.errors import UserError

    data, stats = training
    learn = LearnConfig(steps=2, batch=1, patch=96, checkpoint_every=2)
    ckpt = tmp_path / "c.ckpt"
    train(data, stats, [1], 2, learn, ckpt, progress=False, data_id="a")
    with pytest.raises(UserError, match="other training images or settings"):
        train(data, stats, [1], 2, learn, ckpt, progress=False, data_id="b")
    with pytest.raises(UserError, match="other training images or settings"):
        train(data, stats, [1], 2, LearnConfig(**{**learn.__dict__, "lr": 1e-3}), ckpt, progress=False, data_id="a")


def test_checkpoint_from_before_the_network_option_is_of_the_dilated_network(training, tmp_path):
    """A checkpoint whose signature predates --network resumes as the dilated network and no other."""
    from engines.errors import UserError

    data, stats = training
    learn = LearnConfig(steps=2, batch=1, patch=96, checkpoint_every=2, network="dilated")
    ckpt = tmp_path / "old.ckpt"
    train(data, stats, [1], 2, learn, ckpt, progress=False, data_id="a")
    state = torch.load(ckpt, weights_only=False)
    del state["signature"]["network"]
    torch.save(state, ckpt)
    _, report = train(data, stats, [1], 2, learn, ckpt, progress=False, data_id="a")
    assert report.resumed_from == 2
    with pytest.raises(UserError, match="checkpoint of the dilated network, this fit trains the separable one"):
        train(data, stats, [1], 2, LearnConfig(**{**learn.__dict__, "network": "separable"}), ckpt, False, "a")


def test_initial_weights_come_from_a_bundle_or_a_state_dict(bundle_dir, tmp_path):
    """A learned bundle's network loads into a fresh one exactly; a colour net takes every layer but the first."""
    import onnx
    from onnx import numpy_helper

    from calibration.learned_model import load_initial_weights
    from engines.errors import UserError

    mono = LearnedNet(1)
    assert len(load_initial_weights(mono, bundle_dir)) == len(mono.state_dict())
    graph = onnx.load(str(bundle_dir / "graph_fp32.onnx"))
    head = next(i for i in graph.graph.initializer if i.name.startswith("head_w"))
    np.testing.assert_array_equal(mono.convs[-1].weight.detach().numpy(), numpy_helper.to_array(head))
    torch.save(mono.state_dict(), tmp_path / "w.pt")
    again = LearnedNet(1)
    load_initial_weights(again, tmp_path / "w.pt")
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), mono.state_dict().values(), strict=True))
    # what a colour net can take is every layer whose shape the channels do not set: in the dilated
    # network all but the first; in the two-scale one also its fine branch, which reads the features
    torch.save(LearnedNet(1, "dilated").state_dict(), tmp_path / "dilated.pt")
    colour = LearnedNet(3, "dilated")
    copied = load_initial_weights(colour, tmp_path / "dilated.pt")
    assert "convs.0.weight" not in copied and len(copied) == len(colour.state_dict()) - 1
    torch.save(LearnedNet(1, "twoscale").state_dict(), tmp_path / "twoscale.pt")
    colour = LearnedNet(3, "twoscale")
    copied = load_initial_weights(colour, tmp_path / "twoscale.pt")
    assert {"convs.0.weight", "convs.1.weight"}.isdisjoint(copied) and len(copied) == len(colour.state_dict()) - 2
    (tmp_path / "junk.pt").write_bytes(b"not weights")
    with pytest.raises(UserError, match=r"junk\.pt: not a readable PyTorch weights file"):
        load_initial_weights(LearnedNet(1), tmp_path / "junk.pt")
    with pytest.raises(UserError, match="no such weights file"):
        load_initial_weights(LearnedNet(1), tmp_path / "missing.onnx")


def test_initial_weights_from_a_graph_of_another_network_are_refused(bundle_dir, tmp_path):
    """A graph names its architecture; one from before that record is the dilated network's and loads as such."""
    import onnx

    from calibration.learned_model import load_initial_weights
    from engines.errors import UserError

    other = next(n for n in ARCHITECTURES if n != DEFAULT_ARCHITECTURE)
    with pytest.raises(UserError, match=f"a {DEFAULT_ARCHITECTURE} network; this fit trains a {other} one"):
        load_initial_weights(LearnedNet(1, other), bundle_dir)
    old = LearnedNet(1, "dilated")
    graph = build_learned_graph(LearnedGraphSpec(1, 64), old.numpy_weights(), "dilated")
    del graph.metadata_props[:]  # as written before the record
    onnx.save(graph, tmp_path / "before.onnx")
    assert len(load_initial_weights(LearnedNet(1, "dilated"), tmp_path / "before.onnx")) == len(old.state_dict())
    with pytest.raises(UserError, match="a dilated network; this fit trains a separable one"):
        load_initial_weights(LearnedNet(1, "separable"), tmp_path / "before.onnx")
