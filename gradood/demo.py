"""`gradood demo`: every detector on a real dataset and real OOD sets, in about a minute on 2 CPU cores.

In-distribution: scikit-learn's handwritten digits (8×8, classes 0–7; 1797 images
in all). A small CNN is trained on them deterministically. OOD sets, all brought
to the digits' 8×8 grey format:
    near-ood-digits  the held-out digit classes 8 and 9
    faces            scikit-image's lfw_subset (200 faces), downsampled
    textures         patches of scikit-image's brick, grass and gravel images
    photographs      patches of scikit-image's camera, astronaut, coffee, chelsea and rocket
Nothing is tuned to the OOD sets: detectors run with their papers' defaults and
statistics fitted on ID training data only.

Everything runs in float64 (data, training, scoring): float32 training goes through
kernels whose rounding depends on the CPU's instruction set (oneDNN's and MKL's per-ISA
convolutions and GEMMs), and thirty epochs amplify that rounding into a different model, so
the float32 table differed between AVX2 and AVX-512 machines. In float64 the trained weights
of an AVX2 and an AVX-512 run agree to ~1e-11 (relative), far below any score gap, so the
table is the same on any x86-64 CPU — except LowDimGrad's probe rows (MSP, energy, ODIN,
GradNorm, ReAct, BATS through the probe): the probe's BatchNorm and ReAct's clip act per
coordinate of G_low, and PCA fixes the basis of near-equal trailing eigenvalues only up to a
rotation that round-off decides, so those rows move in the third decimal between AVX2 and
AVX-512 (KNN and Mahalanobis are rotation-invariant and do not). The report names the CPU and
the levels used.

scikit-learn and scikit-image (and matplotlib for the plots) are the optional
extra `gradood[demo]`.
"""

from __future__ import annotations

import platform
import time
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gradood import detectors as D
from gradood._ops import cpu_capability
from gradood.evaluation import Evaluation, evaluate

try:  # progress bars where tqdm is installed (it is a dependency of gradood)
    from tqdm.auto import tqdm
except ImportError:  # pragma: no cover
    tqdm = None

#: The demo's dtype: float64 makes its table independent of the CPU's instruction set.
DTYPE = torch.float64

ID_CLASSES = 8
PATCH = 32  # side of the square patches cut from the scikit-image pictures before downsampling


class DigitsCNN(nn.Module):
    """conv-BN-ReLU ×2, global average pool, a hidden layer and a linear head."""

    def __init__(self, num_classes: int = ID_CLASSES):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.hidden = nn.Sequential(nn.Linear(64, 64), nn.ReLU())
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        return self.fc(self.hidden(self.features(x)))


def _import_extras():
    try:
        import skimage.data
        import skimage.transform
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise SystemExit(
            "gradood demo needs scikit-learn and scikit-image: pip install 'gradood[demo]' "
            f"(or pip install scikit-learn scikit-image matplotlib). ({error})"
        ) from error
    return load_digits, skimage.data, skimage.transform


def _patches(image: np.ndarray, count: int, rng: np.random.Generator, resize) -> np.ndarray:
    """`count` random PATCH×PATCH grey patches of an image, downsampled to 8×8, in [0, 1]."""
    if image.ndim == 3:
        image = image[..., :3].mean(axis=2)
    image = image.astype(np.float64) / (255.0 if image.max() > 1.0 else 1.0)
    rows = rng.integers(0, image.shape[0] - PATCH, count)
    cols = rng.integers(0, image.shape[1] - PATCH, count)
    return np.stack(
        [resize(image[r : r + PATCH, c : c + PATCH], (8, 8), anti_aliasing=True) for r, c in zip(rows, cols)]
    )


def load_data(seed: int = 0, dtype: torch.dtype = DTYPE) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """(splits, ood): ID train/val/test images [N, 1, 8, 8] with labels, and the OOD
    sets, all standardised with the ID training mean and std, in `dtype`."""
    load_digits, data, transform = _import_extras()
    rng = np.random.default_rng(seed)
    digits = load_digits()
    images, labels = digits.images / 16.0, digits.target
    in_distribution = np.flatnonzero(labels < ID_CLASSES)
    rng.shuffle(in_distribution)
    train, val, test = np.split(in_distribution, [int(0.6 * in_distribution.size), int(0.7 * in_distribution.size)])
    faces = np.stack([transform.resize(face, (8, 8), anti_aliasing=True) for face in data.lfw_subset()])
    textures = np.concatenate(
        [_patches(getattr(data, name)(), 100, rng, transform.resize) for name in ("brick", "grass", "gravel")]
    )
    photographs = np.concatenate(
        [
            _patches(getattr(data, name)(), 60, rng, transform.resize)
            for name in ("camera", "astronaut", "coffee", "chelsea", "rocket")
        ]
    )
    raw_ood = {
        "near-ood-digits": images[labels >= ID_CLASSES],
        "faces": faces,
        "textures": textures,
        "photographs": photographs,
    }
    mean, std = images[train].mean(), images[train].std()

    def tensor(array: np.ndarray) -> torch.Tensor:
        return torch.as_tensor((array - mean) / std, dtype=dtype).unsqueeze(1)

    splits = {
        "train": tensor(images[train]),
        "train_labels": torch.as_tensor(labels[train]),
        "val": tensor(images[val]),
        "val_labels": torch.as_tensor(labels[val]),
        "test": tensor(images[test]),
        "test_labels": torch.as_tensor(labels[test]),
    }
    return splits, {name: tensor(array) for name, array in raw_ood.items()}


def train(splits: Dict[str, torch.Tensor], seed: int = 0, epochs: int = 30, progress: bool = False) -> DigitsCNN:
    """Adam, batch 64, cross-entropy; deterministic for a seed; in the dtype of the data."""
    torch.manual_seed(seed)
    inputs, labels = splits["train"], splits["train_labels"]
    model = DigitsCNN().to(inputs.dtype)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    bar = tqdm(total=epochs, desc="training DigitsCNN", unit="epoch") if progress and tqdm is not None else None
    for _ in range(epochs):
        order = torch.randperm(inputs.shape[0], generator=generator)
        for batch in order.split(64):
            loss = F.cross_entropy(model(inputs[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if bar is not None:
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.4f}")
    if bar is not None:
        bar.close()
    return model.eval()


def machine() -> str:
    """The CPU and the instruction-set levels in use, for the report."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            name = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (
        f"{name}; torch {torch.__version__} at {torch.backends.cpu.get_cpu_capability()}, "
        f"gradood kernels at {cpu_capability()}, {torch.get_num_threads()} threads"
    )


def build_detectors(
    model: nn.Module, fit_data: torch.Tensor, fit_labels: Optional[torch.Tensor] = None, progress: bool = False
) -> Dict[str, D.Detector]:
    """Every detector with its paper's defaults; ID statistics fitted on `fit_data`
    (and its labels, which LowDimGrad's probe and Mahalanobis scores train on; the
    model's predictions without them). LowDimGrad's subspace is fitted once and
    every base score scores it (LowDimGrad.with_score). Temperature scaling is not among
    them: it fits T on held-out labelled ID data the model gets partly wrong, and the demo has
    no such split (the CNN fits its training set exactly, where no T minimises the NLL)."""
    detectors: Dict[str, D.Detector] = {
        "MSP": D.MSP(model),
        "MaxLogit": D.MaxLogit(model),
        "Energy": D.Energy(model),
        "ODIN (T=1000, ε=0.0014)": D.ODIN(model),
        "GradNorm": D.GradNorm(model),
        "ExGrad": D.ExGrad(model),
        "UV energy·L1": D.UV(model, u="energy", v="l1"),
        "RG (k = p90)": D.RG(model, percentile=90),
        "RGAdditive (k = p90, a=0.6)": D.RGAdditive(model, percentile=90, a=0.6),
        "ReAct (p90)": D.ReAct(model, percentile=90),
        "ASH-S (p90)": D.ASH(model, variant="s", percentile=90),
        "SCALE (p85)": D.SCALE(model, percentile=85),
        "DICE (p90)": D.DICE(model, percentile=90),
        "KLMatching": D.KLMatching(model),
        "GRODIN SG": D.GRODIN(model, part="SG"),
        "GRODIN G": D.GRODIN(model, part="G"),
        "FullGradNorm": D.FullGradNorm(model),
        "GradUncertainty": D.GradUncertainty(model),
        "GradUncertainty (head)": D.GradUncertainty(model, layers="head"),
        "GradOrth (ε_th = 0.97)": D.GradOrth(model),
        "Entropy": D.Entropy(model),
        "GEN (γ=0.1, M=100)": D.GEN(model),
        "KNN (k=50)": D.KNN(model),
        "NNGuide (k=100)": D.NNGuide(model),
        "ViM (dim=D/2)": D.ViM(model),
        "fDBD": D.FDBD(model),
    }
    labelled = fit_labels is not None
    batches = list(fit_data.split(256)) if fit_labels is None else list(zip(fit_data.split(256), fit_labels.split(256)))
    classes = "labels" if labelled else "predicted"
    # the demo CNN has ReLU units dead on all ID data: a singular covariance
    detectors["Mahalanobis (pseudo-inverse)"] = D.Mahalanobis(model, classes=classes, singular="pseudo-inverse")
    detectors["Relative Mahalanobis (pseudo-inverse)"] = D.Mahalanobis(
        model, classes=classes, relative=True, singular="pseudo-inverse"
    )
    detectors["SHE"] = D.SHE(model, classes=classes)
    detectors["GrOOD (k=1, prototype-mean OOD prototype)"] = D.GrOOD(model, classes=classes)
    items = detectors.items()
    if progress and tqdm is not None:
        items = tqdm(items, desc="fitting detectors", unit="detector")
    for _, detector in items:
        detector.fit(batches)
    lowdim = D.LowDimGrad(model, ensemble="react", classes=classes, progress=progress)
    lowdim.fit(batches)
    detectors.update(
        {
            "LowDimGrad (PCA K=200, KNN k=5)": lowdim.with_score("knn", ensemble=None),
            "LowDimGrad + ReAct (a=1)": lowdim,
            "LowDimGrad Mahalanobis": lowdim.with_score("mahalanobis", ensemble=None),
            "LowDimGrad probe MSP": lowdim.with_score("msp", ensemble=None),
            "LowDimGrad probe Energy": lowdim.with_score("energy", ensemble=None),
            "LowDimGrad probe ODIN (T=1000, ε=0.0014)": lowdim.with_score("odin", ensemble=None),
            "LowDimGrad probe GradNorm": lowdim.with_score("gradnorm", ensemble=None),
            "LowDimGrad probe ReAct (from 10, p90)": lowdim.with_score("react", ensemble=None),
            "LowDimGrad probe BATS (λ=1)": lowdim.with_score("bats", ensemble=None),
            "LowDimGrad probe Energy + Energy (a=1)": lowdim.with_score("energy", ensemble="energy"),
        }
    )
    return detectors


def run(
    out: str = "gradood-demo-report",
    seed: int = 0,
    epochs: int = 30,
    plots: bool = True,
    bootstrap: int = 100,
    progress: bool = True,
) -> Evaluation:
    started = time.perf_counter()
    splits, ood = load_data(seed)
    model = train(splits, seed, epochs, progress=progress)
    with torch.no_grad():
        accuracy = (model(splits["test"]).argmax(1) == splits["test_labels"]).double().mean().item()
    trained = time.perf_counter()
    detectors = build_detectors(model, splits["train"], splits["train_labels"], progress=progress)
    batches = lambda tensor: list(tensor.split(256))  # noqa: E731  (DataLoader-like)
    evaluation = evaluate(
        detectors,
        batches(splits["test"]),
        {name: batches(images) for name, images in ood.items()},
        bootstrap=bootstrap,
        seed=seed,
        progress=progress,
    )
    sizes = ", ".join(f"{name} {images.shape[0]}" for name, images in ood.items())
    header: List[str] = [
        "# gradood demo",
        "",
        f"ID: scikit-learn digits 0–{ID_CLASSES - 1}, 8×8 (train {splits['train'].shape[0]}, "
        f"test {splits['test'].shape[0]}); OOD: {sizes}.",
        f"Model: DigitsCNN trained {epochs} epochs (seed {seed}) in {trained - started:.1f} s; "
        f"ID test accuracy {accuracy:.4f}. Data, training and scoring in float64 "
        "(the table does not depend on the CPU's instruction set, except LowDimGrad's probe rows: "
        "see gradood.demo).",
        f"Machine: {machine()}.",
        "Scores are ID-high. FPR95 (ID+) is the papers' convention; (OOD+) OpenOOD's. ± = bootstrap std "
        f"over {bootstrap} resamples. samples/s = scoring throughput on this machine.",
        "",
    ]
    report = "\n".join(header) + "\n" + evaluation.to_markdown()
    written = evaluation.save(out, plots=plots)
    with open(written[0], "w") as handle:  # report.md with the header
        handle.write(report)
    print(report)
    print(f"Total {time.perf_counter() - started:.1f} s. Report: {', '.join(written)}")
    return evaluation
