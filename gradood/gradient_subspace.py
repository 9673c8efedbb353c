"""Gradient subspaces fitted on ID data ("Low-Dimensional Gradient Helps Out-of-Distribution Detection", Wu et al.,
TPAMI 2024), streamed over the data with bounded memory.

For the per-sample gradients g_i ∈ R^|θ| of a loss (log Σ_j exp f_j for the
method), the normalised gradient is G_i = (g_i − z) / σ with z the mean and σ
the per-parameter standard deviation over the N ID samples (population std,
ddof = 0, as the official code). A parameter whose gradient does not vary over
the ID data beyond round-off, σ ≤ 64·eps·(|z| + s) with s the RMS gradient
entry of its tensor, gets 1/σ := 0: every ID direction is zero there, so it
could not contribute to a projection anyway, and the official recipe would
instead blow its round-off up to unit variance (an attention key bias, whose
gradient is zero in exact arithmetic, is such a parameter). The
low-dimensional representation is G_low = G V for K directions V [|θ|, K]:

- "pca": the top-K principal directions of the N×|θ| matrix X of normalised
  gradients, by randomized subspace iteration on XᵀX with K + oversample
  Gaussian start vectors (a fixed seed). Each iteration is one pass over the
  data computing XᵀX Z = Σ_batches X_bᵀ (X_b Z) inside each batch (so the data
  order does not matter, and neither X nor any N×|θ| matrix is formed); Z is
  then re-orthonormalised. A Rayleigh–Ritz step on the last basis gives V, the
  covariance eigenvalues and, from the last pass's X_b Z, G_low of every fit
  sample.
- "class": the per-class means of G (classes from the labels, or the model's
  predictions), each column scaled to unit L2 norm (K = C).

What is stored is M = V / σ (the "scaled directions", [K, numel] per
parameter, in the model's precision — float32 for half models — or a half
type), the mean z, 1/σ and the offset c = Σ M z, so that G_low = g M − c: one
projection of the raw per-sample gradients. Memory: |θ|·K elements for M, and
during a PCA fit 2·|θ|·(K + oversample) (Z and XᵀX Z); restrict `params` (e.g.
the last stage and the head) to bound it.
"""

from __future__ import annotations

from typing import Callable, Dict, Iterable, Iterator, NamedTuple, Optional, Tuple

import torch
from tqdm.auto import tqdm

from gradood import model_io
from gradood._sums import sum_tensors
from gradood.model_io import Inputs
from gradood.persample.engine import PerSampleGradients, compute_dtype

#: A function computing the per-sample gradients of one input batch.
GradientsOf = Callable[[Inputs], PerSampleGradients]

Blocks = Dict[str, torch.Tensor]


def progress_bar(enabled: bool, label: str) -> tqdm:
    """A tqdm bar counting samples on stderr (as gradood.evaluation's), or a disabled one."""
    return tqdm(desc=label, unit=" samples", disable=not enabled)


def iterate_batches(data: Iterable, limit: Optional[int]) -> Iterator[Tuple[Inputs, Optional[torch.Tensor]]]:
    """(inputs, labels or None) from a tensor or a mapping of tensors, a (inputs,
    labels) pair of tensors, or an iterable of batches (gradood.model_io: inputs,
    (inputs, labels, ...) tuples or mappings with a labels entry, e.g. a
    DataLoader); at most `limit` samples (the last batch cut)."""
    if isinstance(data, torch.Tensor) or model_io.is_mapping(data):
        batches: Iterable = [data]
    elif (
        isinstance(data, tuple)
        and len(data) == 2
        and all(isinstance(t, torch.Tensor) for t in data)
        and data[0].shape[:1] == data[1].shape[:1]
        and data[1].dim() == 1
    ):
        batches = [data]
    else:
        batches = data
    seen = 0
    for batch in batches:
        inputs, labels = model_io.split_batch(batch)
        size = model_io.check_inputs("the fit data", inputs)
        if limit is not None and seen + size > limit:
            keep = torch.arange(limit - seen)
            inputs = model_io.select(inputs, keep)
            labels = None if labels is None else labels[: limit - seen]
            size = limit - seen
        seen += size
        yield inputs, labels
        if limit is not None and seen >= limit:
            break


class Moments(NamedTuple):
    samples: int
    mean: Blocks  # [numel] float64 per parameter
    inv_std: Blocks  # [numel] float32 (float64 for float64 models), 0 where the gradient does not vary

    @property
    def dtype(self) -> torch.dtype:
        """The computation's dtype: float64 for float64 models, float32 otherwise."""
        return next(iter(self.inv_std.values())).dtype


def _merge(state: Optional[dict], batch: Dict[str, Tuple[torch.Tensor, torch.Tensor]], count: int) -> dict:
    """Chan et al.'s pairwise merge of (count, mean, Σ squared deviations), float64."""
    if state is None:
        return {"count": count, **{name: (m.double(), s.double()) for name, (m, s) in batch.items()}}
    total = state["count"] + count
    merged = {"count": total}
    for name, (mean_b, squares_b) in batch.items():
        mean, squares = state[name]
        delta = mean_b.double() - mean
        merged[name] = (
            mean + delta * (count / total),
            squares + squares_b.double() + delta.square() * (state["count"] * count / total),
        )
    return merged


def inverse_std(mean: torch.Tensor, squares: torch.Tensor, count: int, dtype: torch.dtype) -> torch.Tensor:
    """1/σ per element of one parameter tensor, 0 where σ is at round-off level:
    σ ≤ 64·eps·(|z| + s), s = the RMS of the tensor's per-sample gradient entries
    (a gradient that is zero in exact arithmetic, such as an attention key bias's,
    would otherwise become unit-variance noise after normalisation)."""
    std = (squares / count).sqrt()
    scale = (mean.square() + std.square()).mean().sqrt()
    varies = std > 64 * torch.finfo(dtype).eps * (mean.abs() + scale)
    varies &= std > 0
    inverse = torch.where(varies, 1.0 / torch.where(varies, std, torch.ones_like(std)), torch.zeros_like(std))
    return inverse if dtype == torch.float64 else inverse.float()


def moments_pass(
    gradients_of: GradientsOf,
    batches: Iterable[Tuple[Inputs, Optional[torch.Tensor]]],
    classes: Optional[str] = None,
    progress: Optional[tqdm] = None,
) -> Tuple[Moments, Optional[Blocks], Optional[torch.Tensor]]:
    """One pass: the per-parameter mean and 1/σ of the per-sample gradients and,
    with classes ("labels" or "predicted"), the per-class sums of the gradients
    ([C, numel] per parameter, C from the logits, accumulated in place in the
    computation's dtype) and the class counts."""
    state, class_sums, class_counts, dtype = None, None, None, None
    for inputs, labels in batches:
        grads = gradients_of(inputs)
        dtype = compute_dtype(grads.logits.dtype)
        state = _merge(state, grads.moments(), grads.count)
        if classes is not None:
            num_classes = grads.logits.shape[1]
            if classes == "labels":
                if labels is None:
                    raise ValueError(
                        "the data give no labels: pass batches of (inputs, labels), or classes='predicted'"
                    )
                indices = labels.to(grads.logits.device).long()
            else:
                indices = grads.logits.argmax(1)
            if bool(((indices < 0) | (indices >= num_classes)).any()):  # one host sync per batch
                raise ValueError(
                    f"labels must lie in [0, {num_classes}), got {int(indices.min())}..{int(indices.max())}"
                )
            onehot = torch.nn.functional.one_hot(indices, num_classes).to(dtype)
            if class_sums is None:
                class_sums = {
                    name: torch.zeros(num_classes, torch.Size(shape).numel(), dtype=dtype, device=onehot.device)
                    for name, shape in grads.shapes.items()
                }
            grads.weighted_sum(onehot, into=class_sums)
            counts = onehot.sum(0).double()
            class_counts = counts if class_counts is None else class_counts + counts
        if progress is not None:
            progress.update(grads.count)
    if state is None or dtype is None:
        raise ValueError("the data hold no batch")
    count = state.pop("count")
    bad = [
        name
        for name, (m, sq) in state.items()
        if not (bool(torch.isfinite(m).all()) and bool(torch.isfinite(sq).all()))
    ]
    if bad:
        raise ValueError(
            f"the per-sample gradients of the ID data are not finite (NaN/Inf inputs or overflow) in {bad[:5]}"
        )
    mean = {name: m for name, (m, _) in state.items()}
    inv = {name: inverse_std(m, s, count, dtype) for name, (m, s) in state.items()}
    return Moments(count, mean, inv), class_sums, class_counts


# -- linear algebra on dictionaries of blocks [L, numel] ------------------------------


def gram(blocks: Blocks) -> torch.Tensor:
    """Σ_params B Bᵀ in float64: [L, L]."""
    return sum_tensors(block.double() @ block.double().T for block in blocks.values())


def orthonormalise(blocks: Blocks) -> Blocks:
    """Rows orthonormal over the concatenated parameters, by the eigenvectors of
    the float64 Gram matrix, twice (as CholeskyQR2; also when nearly dependent).
    In place: one parameter's block at a time is replaced."""
    for _ in range(2):
        values, vectors = torch.linalg.eigh(gram(blocks))
        floor = values.max().clamp_min(1e-300) * 1e-14
        transform = (vectors / values.clamp_min(floor).sqrt()).T  # [L, L]
        for name, block in blocks.items():
            blocks[name] = (transform.to(block.device) @ block.double()).to(block.dtype)
    return blocks


def combine(blocks: Blocks, coefficients: torch.Tensor) -> Blocks:
    """coefficients [K, L] @ blocks: new rows as combinations of the old ones."""
    return {
        name: (coefficients.to(block.device, torch.float64) @ block.double()).to(block.dtype)
        for name, block in blocks.items()
    }


def random_blocks(shapes: Dict[str, int], rows: int, seed: int, device: torch.device, dtype: torch.dtype) -> Blocks:
    """Gaussian [rows, numel] per parameter from one CPU generator (device-independent)."""
    generator = torch.Generator().manual_seed(seed)
    return {
        name: torch.randn(rows, numel, generator=generator, dtype=torch.float64).to(device, dtype)
        for name, numel in shapes.items()
    }


class NormalisedGradients:
    """X_b = (G_b − z) D (D = diag(1/σ)) as products with blocks, from the raw per-sample gradients."""

    def __init__(self, moments: Moments):
        self.mean = moments.mean  # float64
        self.inv_std = moments.inv_std

    def offset(self, blocks: Blocks) -> torch.Tensor:
        """zᵀ D Z [L], float64."""
        return sum_tensors(
            block.double() @ (self.mean[name] * self.inv_std[name]).to(block.device).double()
            for name, block in blocks.items()
        )

    def project(self, grads: PerSampleGradients, blocks: Blocks, offset: torch.Tensor) -> torch.Tensor:
        """X_b Z = G_b (D Z) − zᵀ D Z, D applied one layer at a time."""
        out = grads.project(blocks, scale=self.inv_std)
        return out - offset.to(out.device, out.dtype)

    def finish_transpose_times(self, sums: Blocks, column_sums: torch.Tensor) -> Blocks:
        """X ᵀ W from the raw Σ_b G_bᵀ W_b and Σ_b 1ᵀ W_b: D (Σ Gᵀ W − z 1ᵀ W), in place."""
        for name, value in sums.items():
            value -= column_sums[:, None].to(value.device, value.dtype) * self.mean[name].to(value.device, value.dtype)
            value *= self.inv_std[name].to(value.device, value.dtype)
        return sums


class SubspaceFit(NamedTuple):
    directions: Blocks  # V, [K, numel] per parameter, float32 (float64 for float64 models)
    eigenvalues: Optional[torch.Tensor]  # covariance eigenvalues of the K directions (PCA), float64
    change: Optional[float]  # PCA: sin of the largest principal angle between the last two iterates' top-K
    eigenvalue_change: Optional[float]  # PCA: largest relative change of the top-K eigenvalues, last iteration
    projections: Optional[torch.Tensor] = None  # PCA: G_low [N, K] of the fit samples, from the last pass
    labels: Optional[torch.Tensor] = None  # PCA: their labels (None if a batch had none), in the same order
    predicted: Optional[torch.Tensor] = None  # PCA: the model's predicted classes, in the same order


def pca_directions(
    gradients_of: GradientsOf,
    data_passes: Callable[[], Iterable[Tuple[torch.Tensor, Optional[torch.Tensor]]]],
    moments: Moments,
    k: int,
    oversample: int,
    iterations: int,
    seed: int,
    device: torch.device,
    progress: bool = False,
) -> SubspaceFit:
    """Top-K principal directions of the normalised per-sample gradients by
    randomized subspace iteration on XᵀX (see the module docstring). The last
    pass's X_b Z [n, L] are kept (N × L), so G_low = X V = (X Z) U of every fit
    sample comes without another pass."""
    numels = {name: m.numel() for name, m in moments.mean.items()}
    rows = min(k + oversample, sum(numels.values()))
    normalised = NormalisedGradients(moments)
    basis = orthonormalise(random_blocks(numels, rows, seed, device, moments.dtype))
    # Only the basis Z and the product XᵀX Z (|θ| × L each) are kept; the subspace change
    # between iterations is measured through L × L matrices.
    previous: Optional[Tuple[torch.Tensor, torch.Tensor]] = None  # (previous top-K Ritz vectors, Z_prevᵀ Z)
    change = value_change = None
    previous_values: Optional[torch.Tensor] = None
    for iteration in range(iterations):
        offset = normalised.offset(basis)
        product = {name: torch.zeros_like(block) for name, block in basis.items()}
        column_sums = torch.zeros(rows, dtype=torch.float64, device=device)  # on the device: no sync per batch
        report = progress_bar(progress, f"gradient PCA, iteration {iteration + 1}/{iterations}")
        last = iteration + 1 == iterations
        kept, kept_labels, kept_predicted = [], [], []
        for inputs, labels in data_passes():
            grads = gradients_of(inputs)
            projected = normalised.project(grads, basis, offset)  # X_b Z  [n, L]
            if last:
                kept.append(projected)
                kept_labels.append(labels)
                kept_predicted.append(grads.logits.argmax(1))
            grads.weighted_sum(projected, into=product)  # Σ_b G_bᵀ (X_b Z), layer by layer
            column_sums += projected.sum(0).to(device, torch.float64)
            report.update(grads.count)
        report.close()
        normalised.finish_transpose_times(product, column_sums)  # XᵀX Z
        # Rayleigh–Ritz on the current basis: H = Zᵀ XᵀX Z.
        cross = sum_tensors(basis[name].double() @ product[name].double().T for name in basis)
        eigenvalues, vectors = torch.linalg.eigh((cross + cross.T) / 2)
        order = torch.argsort(eigenvalues, descending=True)[:k]
        ritz = vectors[:, order]  # [L, K]: top-K directions = ritzᵀ Z
        if previous is not None:
            overlap = previous[0].T @ previous[1] @ ritz  # (U_prevᵀ Z_prev)(Zᵀ U)
            cosines = torch.linalg.svdvals(overlap).clamp(max=1.0)
            change = float((1 - cosines.min() ** 2).clamp_min(0).sqrt())
            value_change = float(
                ((eigenvalues[order] - previous_values).abs() / eigenvalues[order].abs().clamp_min(1e-300)).max()
            )
        previous_values = eigenvalues[order]
        if last:
            del product
            directions = combine(basis, ritz.T)
            projections = torch.cat(kept) @ ritz.to(kept[0].device, kept[0].dtype)
            break
        new_basis = orthonormalise(product)
        crossing = sum_tensors(basis[name].double() @ new_basis[name].double().T for name in basis)  # Z_prevᵀ Z_new
        previous = (ritz, crossing)
        basis = new_basis
    present = [t for t in kept_labels if t is not None]
    labels = torch.cat([t.reshape(-1) for t in present]) if len(present) == len(kept_labels) else None
    return SubspaceFit(
        directions,
        eigenvalues[order].cpu() / moments.samples,
        change,
        value_change,
        projections,
        labels,
        torch.cat(kept_predicted),
    )


def class_mean_directions(moments: Moments, class_sums: Blocks, class_counts: torch.Tensor) -> SubspaceFit:
    """Per class c: mean_c(G) = (mean_c(g) − z) / σ, scaled to unit L2 norm over all
    parameters. Consumes class_sums: each block becomes its directions in place
    (float64 arithmetic one block at a time)."""
    empty = (class_counts == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(
            f"no ID sample of class(es) {empty[:20]}{'...' if len(empty) > 20 else ''}: the per-class "
            "subspace needs every class; fit on more data or restrict to the classes present"
        )
    counts = class_counts.double()
    norms = torch.zeros_like(counts)
    for name, sums in class_sums.items():
        device = sums.device
        mean = (sums.double() / counts[:, None].to(device) - moments.mean[name].to(device)[None, :]) * moments.inv_std[
            name
        ].to(device).double()
        norms += mean.square().sum(1).to(norms.device)
        sums.copy_(mean)
    norms = norms.sqrt()
    if bool((norms == 0).any()):
        raise ValueError("a class's mean normalised gradient is zero: the per-class subspace is undefined")
    for sums in class_sums.values():
        sums.div_(norms[:, None].to(sums.device, sums.dtype))
    return SubspaceFit(class_sums, None, None, None)


class GradientSubspace:
    """A fitted subspace: G_low = ((g − z)/σ) V = g M − c, with M = V/σ stored
    per parameter as [K, numel] in `dtype`, and c = Σ M z (from the stored M)."""

    def __init__(
        self,
        mean: Blocks,
        inv_std: Blocks,
        scaled_directions: Blocks,
        shapes: Dict[str, Tuple[int, ...]],
        eigenvalues: Optional[torch.Tensor] = None,
    ):
        self.mean, self.inv_std, self.scaled_directions = mean, inv_std, scaled_directions
        self.shapes = {name: tuple(shape) for name, shape in shapes.items()}
        self.eigenvalues = eigenvalues
        self.offset = sum_tensors(
            block.double() @ mean[name].double().to(block.device) for name, block in scaled_directions.items()
        )

    @classmethod
    def from_directions(cls, moments: Moments, fit: SubspaceFit, shapes, dtype: torch.dtype) -> GradientSubspace:
        """Consumes fit.directions (each V block is replaced by M = V/σ in `dtype`)."""
        scaled = {}
        for name in list(fit.directions):
            block = fit.directions.pop(name)
            scaled[name] = (block * moments.inv_std[name].to(block.device)).to(dtype)
        return cls(moments.mean, moments.inv_std, scaled, shapes, fit.eigenvalues)

    @property
    def dim(self) -> int:
        return next(iter(self.scaled_directions.values())).shape[0]

    def project(self, grads: PerSampleGradients) -> torch.Tensor:
        """G_low [B, K] of a batch's per-sample gradients."""
        out = grads.project(self.scaled_directions)
        return out - self.offset.to(out.device, out.dtype)

    def directions(self) -> Blocks:
        """V [K, numel] per parameter (M·σ; zero where 1/σ = 0)."""
        result = {}
        for name, block in self.scaled_directions.items():
            inv = self.inv_std[name].to(block.device)
            value = block.to(inv.dtype)
            result[name] = torch.where(
                inv > 0, value / torch.where(inv > 0, inv, torch.ones_like(inv)), torch.zeros_like(value)
            )
        return result

    def state_dict(self) -> dict:
        return {
            "mean": self.mean,
            "inv_std": self.inv_std,
            "scaled_directions": self.scaled_directions,
            "shapes": self.shapes,
            "eigenvalues": self.eigenvalues,
        }

    @classmethod
    def from_state_dict(cls, state: dict) -> GradientSubspace:
        return cls(
            state["mean"], state["inv_std"], state["scaled_directions"], state["shapes"], state.get("eigenvalues")
        )

    def to(self, device) -> GradientSubspace:
        move = lambda blocks: {name: value.to(device) for name, value in blocks.items()}  # noqa: E731
        return GradientSubspace(
            move(self.mean), move(self.inv_std), move(self.scaled_directions), self.shapes, self.eigenvalues
        )
