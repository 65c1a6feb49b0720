"""MicroMIL (Kim et al., arXiv 2407.21604, MICCAI 2025) on dense padded bags.

Pipeline per bag of N instance features (see ``shared/METHODS.md``):

1. projection ``H = LeakyReLU(Linear(D, P)(x))``;
2. deep cluster embedding: K learnable centroids, Student-t (alpha=1) soft assignment q;
3. representative extractor: per cluster, a hard Gumbel-Softmax over the N instances picks
   one instance (argmax at eval) -> R (K, P). ``selection`` chooses the score and the rule:
   ``"released"``: ``s_k = Linear(P, 1)(H * q[:, k])`` as the authors' code, duplicates
   allowed; ``"affinity"``: ``a_n + log q_nk / assign_tau`` (the instance's relevance plus its
   membership of cluster k); ``"distinct"``: the affinity score with a one-to-one draw, so no
   instance is picked twice and a bag of N < K instances gives N nodes
   (docs/micromil_collapse.md explains why the released score collapses);
4. graph from the cosine similarity of the representatives (no slide coordinates);
5. two GAT layers, mean readout over the graph's nodes, linear head.

Everything works on a batch of B bags of different sizes ``x (B, N, D)`` with ``mask (B, N)``;
padded rows never influence the output. Parameter-owning submodules take one tensor, so the
model (on its default ``gnn_backend="dense"``) runs under Opacus with one bag = one privacy unit.
Deviations from the released code (see METHODS.md): no Gumbel noise at eval, optional
DEC KL loss (``kl_weight``), the similarity graph is treated as undirected in both modes.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from micromil_core.models.base import Encoding, MILModel, Prediction
from micromil_core.models.clustering import kmeans
from micromil_core.models.micromil_kernels import (
    WORKSPACE,
    RowGradients,
    project_and_score,
    representative_rows,
)
from micromil_core.models.micromil_selection import (
    gumbel_noise,
    select_distinct,
    select_representatives,
    selection_scores,
)
from micromil_core.models.pooling import check_batch
from micromil_core.models.registry import (
    check_choice,
    check_float,
    check_int,
    register_model,
)
from micromil_core.nn import GAT, GAT_ATT_INITS, GNN_BACKENDS, convert_gat_state

EDGE_MODES = ("paper", "gumbel-neighbour")
SELECTIONS = ("released", "affinity", "distinct")
CENTROID_INITS = ("instances", "kmeans", "spread")


@dataclass(frozen=True)
class MicroMILParams:
    """Hyper-parameters of ``micromil``; defaults follow Kim et al. where they give one."""

    # Width P of the projection H; 0 = the input dim D, as in the paper (D->D). Its cost is
    # N*D*P: with 1024-d features a smaller P (e.g. 512) trains ~2.4x faster, but capping
    # UCSB's 708-d features at 512 cost 0.07 CV accuracy (benchmarks/README), so the
    # paper's width stays the default.
    proj_dim: int = 0
    n_clusters: int = 36  # K centroids = K graph nodes (paper)
    tau: float = 1.0  # Gumbel-Softmax temperature (paper)
    edge_mode: str = "paper"  # "paper": top-k cosine graph; "gumbel-neighbour": released code
    # top_k is not given in the paper: 4 nearest of 35 others, symmetrised, gives each node
    # 4-8 neighbours, so two GAT hops see a sizeable part of the graph without a dense one.
    top_k: int = 4
    gnn_hidden: int = 128  # paper
    gnn_layers: int = 2  # paper
    dropout: float = 0.5  # GAT feature and attention dropout (paper)
    # GAT layers: "dense" (our DenseGATConv; runs under Opacus) or "pyg" (PyG's GATConv).
    # Same maths and, under a seed, the same dropout draws (tests); "dense" is the default
    # because PyG's import costs ~2.3 s in every process that builds the model.
    gnn_backend: str = "dense"
    # GAT attention vectors at init: "glorot" as PyG's GATConv, or "zero" (every node starts
    # by averaging its neighbours, and learns whom to attend). Under DP-SGD, "zero" gave
    # higher validation AUC in 8 of 9 (init seed x noise seed) runs, +0.05 on average,
    # because the noisy gradient need not first undo a random attention pattern
    # (benchmarks/results/dp_init.md). Without DP it makes no measured difference.
    gnn_att_init: str = "glorot"
    kl_weight: float = 0.0  # weight of the optional DEC KL(P||Q) loss; 0 = off (released code)
    # How each cluster scores and draws its representative (module docstring, step 3).
    # "distinct" was chosen on validation splits only among 8 pre-registered candidates
    # (benchmarks/results/micromil_selection.md); "released" is the authors' draw.
    selection: str = "distinct"
    # Sharpening of q in the affinity score: log q / assign_tau, i.e. q^(1/tau). Unused by
    # "released". In P ~ 700 dimensions the Student-t q is nearly flat (entropy ~0.99 of
    # log K), so tau < 1 lets membership, not only relevance, decide the pick.
    assign_tau: float = 1.0
    # Centroid seeding before training: "instances" = K random projected instances;
    # "kmeans" = k-means++ then Lloyd iterations on the projected sample (DEC's choice);
    # "spread" = K projected instances drawn by k-means++'s D^2 rule, no Lloyd iterations
    # (instances, like the default, but spread over the data's groups).
    centroid_init: str = "instances"

    def __post_init__(self) -> None:
        check_int("micromil", "proj_dim", self.proj_dim, 0)
        check_int("micromil", "n_clusters", self.n_clusters, 1)
        check_float("micromil", "tau", self.tau, 1e-6, float("inf"))
        check_choice("micromil", "edge_mode", self.edge_mode, EDGE_MODES)
        check_int("micromil", "top_k", self.top_k, 1)
        check_int("micromil", "gnn_hidden", self.gnn_hidden, 1)
        check_int("micromil", "gnn_layers", self.gnn_layers, 1)
        check_float("micromil", "dropout", self.dropout, 0.0, 1.0, high_inclusive=False)
        check_choice("micromil", "gnn_backend", self.gnn_backend, GNN_BACKENDS)
        check_choice("micromil", "gnn_att_init", self.gnn_att_init, GAT_ATT_INITS)
        check_float("micromil", "kl_weight", self.kl_weight, 0.0, float("inf"))
        check_choice("micromil", "selection", self.selection, SELECTIONS)
        check_float("micromil", "assign_tau", self.assign_tau, 1e-6, float("inf"))
        check_choice("micromil", "centroid_init", self.centroid_init, CENTROID_INITS)


class StudentTKernel(nn.Module):
    """DCE centroids and the unnormalised Student-t kernel ``(1 + d / alpha)^-(alpha+1)/2``.

    Takes ONE tensor on purpose: Opacus's functorch path passes only the first input to a
    module with raw parameters. Squared distances use ``|h|^2 + |mu|^2 - 2 h mu^T`` so no
    (N, K, P) tensor is ever materialised.

    Shapes: h (B, N, P) -> kernel (B, N, K)
    """

    def __init__(self, n_clusters: int, dim: int, alpha: float = 1.0) -> None:
        super().__init__()
        self.alpha = alpha
        # Placeholder scale; call MicroMIL.init_centroids_ to seed them from data (DEC style).
        self.centroids = nn.Parameter(torch.randn(n_clusters, dim) / dim**0.5)

    def forward(self, h: Tensor) -> Tensor:
        return self.from_products((h * h).sum(-1, keepdim=True), h @ self.centroids.t())

    def from_products(self, hsq: Tensor, cross: Tensor) -> Tensor:
        """The kernel from |h|^2 (B, N, 1) and h mu^T (B, N, K), however they were computed.

        Shapes: hsq (B, N, 1), cross (B, N, K) -> kernel (B, N, K)
        """
        mu = self.centroids  # (K, P)
        d2 = hsq + (mu * mu).sum(-1) - 2.0 * cross  # (B, N, K)
        d2 = d2.clamp_min(0.0)  # cancellation can make tiny distances negative
        return (1.0 + d2 / self.alpha).pow(-(self.alpha + 1.0) / 2.0)  # (B, N, K)


def _normalise(kern: Tensor, mask: Tensor) -> Tensor:
    """Kernel rows to assignments q summing to 1, zero on padded rows.

    Shapes: kern (B, N, K), mask (B, N) -> (B, N, K)
    """
    return kern / kern.sum(-1, keepdim=True) * mask.unsqueeze(-1)


def similarity_graph(
    r: Tensor, mode: str, top_k: int, training: bool, nodes: Tensor | None = None
) -> Tensor:
    """Undirected 0/1 adjacency with self-loops from the cosine similarity of nodes.

    ``"paper"``: each node is linked to its ``top_k`` most similar other nodes.
    ``"gumbel-neighbour"``: each node links to one other node drawn by hard Gumbel-Softmax
    over its similarities (argmax at eval), as in the released code. Edges are symmetrised
    in both modes. The graph is a discrete structure: no parameters, no gradient.
    ``nodes`` (B, K) marks the real nodes; the others keep only their self-loop.

    Shapes: r (B, K, P) -> adj (B, K, K) float
    """
    with torch.no_grad():
        k = r.shape[1]
        rn = F.normalize(r.detach(), dim=-1)  # (B, K, P)
        sim = rn @ rn.transpose(1, 2)  # (B, K, K)
        eye = torch.eye(k, dtype=torch.bool, device=r.device)
        adj = torch.zeros_like(sim)  # (B, K, K)
        if k > 1:
            sim = sim.masked_fill(eye, float("-inf"))  # never pick yourself
            if nodes is not None:
                sim = sim.masked_fill(~nodes.unsqueeze(1), float("-inf"))  # nor a missing node
            if mode == "paper":
                nbr = sim.topk(min(top_k, k - 1), dim=-1).indices  # (B, K, k')
            else:
                # Hard Gumbel-max: a temperature would not change the argmax, and the
                # graph carries no gradient, so tau plays no role here.
                logits = sim + gumbel_noise(sim) if training else sim
                nbr = logits.argmax(dim=-1, keepdim=True)  # (B, K, 1)
            adj.scatter_(-1, nbr, 1.0)
            if nodes is not None:  # a short row's top-k may name missing nodes: drop them
                adj = adj * (nodes.unsqueeze(1) & nodes.unsqueeze(2)) * ~eye
            adj = torch.maximum(adj, adj.transpose(1, 2))
        return adj + eye  # diagonal was 0: result stays 0/1


def dec_kl(q: Tensor, mask: Tensor) -> Tensor:
    """DEC clustering loss KL(P || Q), P = sharpened q (Xie et al. 2016), P detached.

    Cluster frequencies are computed per bag, so a bag's loss depends on that bag only
    (keeps one bag = one privacy unit under DP). Mean over real instances, then over bags.

    Shapes: q (B, N, K) row-normalised, 0 at padding; mask (B, N) -> scalar
    """
    freq = q.sum(dim=1, keepdim=True)  # (B, 1, K)
    p = q.pow(2) / freq.clamp_min(1e-12)  # (B, N, K)
    p = (p / p.sum(-1, keepdim=True).clamp_min(1e-12)).detach()  # (B, N, K)
    kl = (torch.xlogy(p, p) - p * q.clamp_min(1e-12).log()).sum(-1)  # (B, N)
    kl = torch.where(mask, kl, torch.zeros_like(kl))  # (B, N)
    return (kl.sum(1) / mask.sum(1).clamp_min(1)).mean()


@dataclass
class MicroMILOutput:
    """Intermediate results of one MicroMIL pass.

    Shapes: logits (B, C), bag (B, G) the GAT readout the head reads, q (B, N, K),
        scores (B, N, K), selected (B, K) (-1: the cluster has no node, "distinct" with
        N < K), adjacency (B, K, K)
    """

    logits: Tensor
    bag: Tensor
    q: Tensor
    scores: Tensor
    selected: Tensor
    adjacency: Tensor


@register_model(
    "micromil",
    MicroMILParams,
    "MicroMIL (Kim et al. 2025): cluster representatives + similarity graph + GAT",
)
class MicroMIL(MILModel):
    """MicroMIL on dense padded bags; see the module docstring for the pipeline.

    Shapes:
        x (B, N, D), mask (B, N) -> logits (B, C)
        predict: selected (B, K), adjacency (B, K, K), instance_scores (B, N),
        extras["assignments"] q (B, N, K)
    """

    def __init__(self, in_dim: int, n_classes: int, params: MicroMILParams) -> None:
        super().__init__()
        self.in_dim, self.n_classes, self.params = in_dim, n_classes, params
        p = params.proj_dim or in_dim
        self.proj = nn.Linear(in_dim, p)
        self.dce = StudentTKernel(params.n_clusters, p)
        # Linear(P, 1)(H * q_k) = q_k * (w . H) + b, and b is the same for every instance,
        # so it cannot change a softmax over instances: score once with a bias-free w and
        # scale by q. Memory stays O(N * (P + K)) instead of O(N * K * P): a 100,000 x 1024
        # bag needs a few GB, not hundreds.
        self.score = nn.Linear(p, 1, bias=False)
        self.gnn = GAT(p, params.gnn_hidden, params.gnn_layers, params.dropout, params.gnn_backend)
        if params.gnn_att_init == "zero":
            self.gnn.zero_attention()
        self.head = nn.Linear(params.gnn_hidden, n_classes)

    def project(self, x: Tensor) -> Tensor:
        """Shapes: (B, N, D) -> (B, N, P)"""
        return F.leaky_relu(self.proj(x))

    def assignments(self, h: Tensor, mask: Tensor) -> Tensor:
        """Row-normalised soft cluster assignment q, zero on padded rows.

        Shapes: h (B, N, P), mask (B, N) -> (B, N, K)
        """
        return _normalise(self.dce(h), mask)

    def _fused(self, x: Tensor) -> bool:
        """Whether a training pass may use ``micromil_kernels`` (same maths, less memory
        traffic): not when anything hooks the modules (Opacus's per-sample gradients need
        their inputs), nor under autocast, nor without gradients (eval uses the gather), nor
        when the input itself asks for a gradient."""
        if not (self.training and torch.is_grad_enabled()) or x.requires_grad:
            return False  # the fused backward gives the input no gradient
        if torch.is_autocast_enabled(x.device.type):
            return False
        mods = (self.proj, self.dce, self.score)
        return not any(
            m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
            for m in mods
        )

    def run(self, x: Tensor, mask: Tensor) -> MicroMILOutput:
        """Full pass returning logits and the intermediate structure.

        Shapes: x (B, N, D), mask (B, N) -> MicroMILOutput (see its docstring)
        """
        check_batch(x, mask, self.in_dim)
        prm = self.params
        picked = RowGradients() if self._fused(x) else None
        if picked is None:
            h = self.project(x)  # (B, N, P)
            q = self.assignments(h, mask)  # (B, N, K)
            a = self.score(h)  # (B, N, 1)
        else:
            h, cross, a, hsq = project_and_score(
                x, self.proj.weight, self.proj.bias, self.dce.centroids, self.score.weight, picked
            )
            q = _normalise(self.dce.from_products(hsq, cross), mask)
        s = self.selection_logits_from(a, q)  # (B, N, K)
        draw = select_distinct if prm.selection == "distinct" else select_representatives
        index, weights = draw(s, mask, prm.tau, self.training)  # (B, K), -1 = no node
        real = index >= 0  # (B, K)
        if weights is None:  # eval: plain gather, exact and cheap
            gather = index.clamp_min(0).unsqueeze(-1).expand(-1, -1, h.shape[-1])
            r = h.gather(1, gather) * real.unsqueeze(-1)  # (B, K, P)
        elif picked is not None:  # the same rows and straight-through gradient, sparsely
            r = representative_rows(weights, h, index, picked)  # (B, K, P)
        else:  # training: one-hot^T H carries the straight-through gradient to s
            r = weights.transpose(1, 2) @ h  # (B, K, P)
        adj = similarity_graph(r, prm.edge_mode, prm.top_k, self.training, real)  # (B, K, K)
        nodes = self.gnn(r, adj)  # (B, K, G)
        # Mean over the real nodes; with "released" / "affinity" every node is real.
        w = real.unsqueeze(-1).to(nodes.dtype)  # (B, K, 1)
        bag = (nodes * w).sum(1) / w.sum(1).clamp_min(1.0)  # (B, G)
        return MicroMILOutput(self.head(bag), bag, q, s, index, adj)

    def finish_training(self) -> None:
        """The fused step's spare H buffer goes back to the allocator once training ends."""
        WORKSPACE.clear()

    def selection_logits(self, h: Tensor, q: Tensor) -> Tensor:
        """Per (instance, cluster) score of the representative draw (``params.selection``).

        Shapes: h (B, N, P), q (B, N, K) -> (B, N, K)
        """
        return self.selection_logits_from(self.score(h), q)

    def selection_logits_from(self, a: Tensor, q: Tensor) -> Tensor:
        """``selection_logits`` from the relevance a = score(h).

        Shapes: a (B, N, 1), q (B, N, K) -> (B, N, K)
        """
        if self.params.selection == "released":
            return q * a
        # log q is -inf at padding; the draw masks padding anyway, so keep it finite.
        return a + q.clamp_min(1e-30).log() / self.params.assign_tau

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """Shapes: x (B, N, D), mask (B, N) -> (B, C)"""
        return self.run(x, mask).logits

    def encode(self, x: Tensor, mask: Tensor) -> Encoding:
        """Logits, the GAT readout and per-instance importance (see ``selection_scores``).

        Shapes: x (B, N, D), mask (B, N) -> logits (B, C), bag (B, G), scores (B, N)
        """
        return self._encoding(self.run(x, mask), mask)

    @staticmethod
    def _encoding(out: MicroMILOutput, mask: Tensor) -> Encoding:
        return Encoding(out.logits, out.bag, selection_scores(out.scores, mask))


    def encode_loss(
        self,
        x: Tensor,
        mask: Tensor,
        target: Tensor,
        class_weight: Tensor | None = None,
    ) -> tuple[Encoding, Tensor, dict[str, float]]:
        """Cross-entropy plus ``kl_weight * KL(P||Q)`` (``parts`` always reports both), with
        the encoding behind it, from one forward pass."""
        out = self.run(x, mask)
        ce = F.cross_entropy(out.logits, target, weight=class_weight)
        if self.params.kl_weight > 0:
            kl = dec_kl(out.q, mask)
            total = ce + self.params.kl_weight * kl
        else:
            with torch.no_grad():  # monitoring only
                kl = dec_kl(out.q, mask)
            total = ce
        return self._encoding(out, mask), total, {"ce": float(ce.detach()), "kl": float(kl.detach())}

    @torch.no_grad()
    def predict(self, x: Tensor, mask: Tensor) -> Prediction:
        """Deterministic when called under ``eval()`` (argmax selection, no noise).

        ``instance_scores``: see ``selection_scores``.
        """
        out = self.run(x, mask)
        return Prediction(
            probs=torch.softmax(out.logits, dim=-1),
            instance_scores=selection_scores(out.scores, mask),
            selected=out.selected,
            adjacency=out.adjacency,
            extras={"assignments": out.q},
        )

    @torch.no_grad()
    def init_centroids_(
        self, x: Tensor, mask: Tensor, generator: torch.Generator | None = None
    ) -> MicroMIL:
        """Seed the centroids with K distinct projected instances drawn at random.

        Optional, DEC style (Xie et al. initialise with k-means); without it the centroids
        start near the origin. Uses the real rows of ``x`` only.

        Shapes: x (B, N, D), mask (B, N)
        """
        check_batch(x, mask, self.in_dim)
        h = self.project(x)[mask]  # (M, P)
        k = self.params.n_clusters
        order = torch.randperm(h.shape[0], generator=generator, device="cpu")
        pick = order[torch.arange(k) % h.shape[0]]  # repeats only if M < K
        self.dce.centroids.copy_(h[pick.to(h.device)])
        return self

    @torch.no_grad()
    def init_centroids_kmeans_(
        self, x: Tensor, mask: Tensor, generator: torch.Generator | None = None, iters: int = 25
    ) -> MicroMIL:
        """Seed the centroids by k-means on the projected real instances (DEC's init);
        ``iters=0`` keeps k-means++'s seeds, which are instances themselves.

        Shapes: x (B, N, D), mask (B, N)
        """
        check_batch(x, mask, self.in_dim)
        h = self.project(x)[mask]  # (M, P)
        self.dce.centroids.copy_(kmeans(h, self.params.n_clusters, generator, iters=iters))
        return self


    @torch.no_grad()
    def init_from_data(
        self, x: Tensor, mask: Tensor, generator: torch.Generator | None = None
    ) -> None:
        # Random centroids give near-uniform q, so every cluster would pick the same image.
        if self.params.centroid_init in ("kmeans", "spread"):
            iters = 25 if self.params.centroid_init == "kmeans" else 0
            self.init_centroids_kmeans_(x, mask, generator, iters=iters)
        else:
            self.init_centroids_(x, mask, generator)


def switch_gnn_backend(model: MicroMIL, backend: str) -> MicroMIL:
    """Copy of ``model`` whose GAT runs on ``backend``, with identical weights.

    E.g. load a "pyg" checkpoint for DP training with "dense", or the reverse.
    """
    new = MicroMIL(model.in_dim, model.n_classes, replace(model.params, gnn_backend=backend))
    new.load_state_dict(convert_gat_state(model.state_dict(), backend))
    # Frozen parameters stay frozen (DP-SGD must not train what the caller froze); the
    # flags go through the same key conversion as the weights.
    trainable = {n: torch.full_like(p, float(p.requires_grad)) for n, p in model.named_parameters()}
    trainable = convert_gat_state(trainable, backend)
    for name, param in new.named_parameters():
        param.requires_grad_(bool(trainable[name].any()))
    return new.to(next(model.parameters()).device)


__all__ = [
    "MicroMIL",
    "MicroMILParams",
    "StudentTKernel",
    "dec_kl",
    "select_distinct",
    "select_representatives",
    "selection_scores",
    "similarity_graph",
    "switch_gnn_backend",
]
