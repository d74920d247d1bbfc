"""Which checkpoint should define the space? Measure each candidate base, recommend one (``conceptevo choose-base``).

The paper leaves the choice of the base model open. Every candidate base
checkpoint of a finished study gets the space the pipeline would build on it
(base neuron embedding, image embedding with the indirect step, every
checkpoint of every model projected), and three numbers:

**concept purity**
    For neurons dominated by a concept (at least 60% of their stimuli share it,
    and rarely so by chance: :func:`conceptevo.alignment.coherence.dominant_concepts`),
    the share of their 5 nearest neighbours *among other checkpoints' neurons*
    that are dominated by the same concept: does the space put like with like
    across checkpoints and models? On data with known concepts (ConceptShapes)
    the concepts are its attributes; otherwise the class labels (class purity,
    a weaker property; the report says which). The mean over two seeds of the
    candidate's embedding, with a standard error that counts both the sampled
    query neurons and the difference between the seeds.
**units covered**
    The share of all checkpoints' neurons with at least half of their stimulus
    images inside the base's stimuli: those images have least-squares vectors;
    the others only get the indirect step's estimate.
**agreement**
    How much the candidate's space agrees with the other candidates': the mean
    Jaccard index of every sampled neuron's 10 nearest neighbours in the two
    spaces, averaged over the other candidates; beside it the same index
    between two seeds of the candidate's own embedding (the noise floor: what
    "the same space" looks like).

The recommendation takes the candidates whose purity is within two standard
errors of the best (indistinguishable), and among them the one that covers
the most units, then the one that agrees most with the rest; the reasons
quote the numbers.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from .errors import ConceptEvoError, suggest

log = logging.getLogger(__name__)

#: Neurons used as queries (a seeded sample of all checkpoints' neurons).
QUERIES = 4000
PURITY_K = 5
AGREEMENT_K = 10
COVERED_SHARE = 0.5


@dataclass
class Candidate:
    """The measures of one candidate base checkpoint."""

    model: str
    tag: str
    neurons: int = 0
    units_covered: float = float("nan")
    purity: float = float("nan")
    purity_se: float = float("nan")
    purity_seeds: list = field(default_factory=list)
    agreement: float = float("nan")
    seed_agreement: float = float("nan")
    epochs_run: int = 0
    seconds: float = 0.0

    @property
    def name(self) -> str:
        return f"{self.model} {self.tag}"


@dataclass
class BaseChoice:
    candidates: list[Candidate]
    recommended: str
    reasons: list[str]
    concepts: str                     # "known concepts" or "class labels"
    queries: int
    agreement_matrix: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        rows = [["candidate base", "neurons", "units covered", f"{self._purity_name()} (± SE)",
                 "agreement with other bases", "seed-to-seed agreement"]]
        for c in self.candidates:
            rows.append([c.name + (" *" if c.name == self.recommended else ""), str(c.neurons), f"{c.units_covered:.1%}",
                         f"{c.purity:.3f} ± {c.purity_se:.3f}", _num(c.agreement), _num(c.seed_agreement)])
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)

    def markdown(self) -> str:
        head = ["candidate base", "neurons", "units covered", f"{self._purity_name()} (± SE)",
                "agreement with other bases", "seed-to-seed agreement"]
        out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for c in self.candidates:
            name = f"**{c.name}**" if c.name == self.recommended else c.name
            out.append(f"| {name} | {c.neurons} | {c.units_covered:.1%} | {c.purity:.3f} ± {c.purity_se:.3f} | "
                       f"{_num(c.agreement)} | {_num(c.seed_agreement)} |")
        return "\n".join(out)

    def _purity_name(self) -> str:
        return "concept purity" if self.concepts == "known concepts" else "class purity"

    def report(self) -> str:
        return (f"{self.table()}\n\nrecommended base: {self.recommended}\n" + "\n".join(f"  - {r}" for r in self.reasons))


def _num(x) -> str:
    return "n/a" if x is None or not np.isfinite(x) else f"{x:.3f}"


def _parse_candidates(ws, candidates) -> list[tuple[str, str]]:
    if not candidates:
        out = [(m, ws.tags(m)[-1]) for m in ws.models]
        if ws.manifest.get("base") and ws.base not in out:
            out.append(ws.base)
        return out
    out = []
    for text in candidates:
        model, sep, tag = str(text).partition(":")
        if not sep or not model or not tag:
            raise ConceptEvoError(f"candidate {text!r} must be MODEL:TAG, e.g. {ws.models[0]}:{ws.tags(ws.models[0])[-1]}")
        if model not in ws.models:
            raise ConceptEvoError(f"candidate {text!r}: no model {model!r} in the study.{suggest(model, ws.models)}")
        if tag not in ws.tags(model):
            raise ConceptEvoError(f"candidate {text!r}: {model} has no checkpoint {tag!r}.{suggest(tag, ws.tags(model))}")
        out.append((model, tag))
    if len(set(out)) < 2:
        raise ConceptEvoError("give at least two different candidates to choose between")
    return list(dict.fromkeys(out))


def choose_base(workspace, candidates=None, seed: int = 0, queries: int = QUERIES, device: str = "cpu",
                trust: bool = False, progress: bool = False) -> BaseChoice:
    """Build the space on every candidate base checkpoint of a finished study, measure it, recommend one.

    ``candidates``: ``["model:tag", ...]`` (default: every model's last
    checkpoint, plus the study's base). The embedding parameters are the
    study's ``[embedding]`` config. Needs the stimuli of every checkpoint and
    the candidates' checkpoint files (for the image responses of the indirect step).
    """
    from .alignment.coherence import dataset_concepts, dominant_concepts
    from .config import DataConfig, EmbeddingConfig
    from .embedding.neurons import nearest_neighbors, neighbor_jaccard
    from .pipeline import load_model, study_pool
    from .projection import UnifiedSpace
    from .stimuli import top_responses
    from .workspace import Workspace

    ws = workspace if isinstance(workspace, Workspace) else Workspace(workspace)
    cands = _parse_candidates(ws, candidates)
    every = [(m, t) for m in ws.models for t in ws.tags(m)]
    missing = [f"{m} {t}" for m, t in every if ws.stage(f"stimuli/{m}/{t}") is None]
    if missing:
        raise ConceptEvoError(f"the stimuli of {len(missing)} checkpoint(s) are missing (e.g. {missing[0]}); "
                              "run `conceptevo run` on the study's config first")
    stimuli = {mt: ws.stimuli(*mt, mmap=False) for mt in every}
    sizes = [len(stimuli[mt].neuron_ids) for mt in every]
    block = np.repeat(np.arange(len(every)), sizes)               # checkpoint of each row
    all_idx = np.concatenate([np.asarray(stimuli[mt].indices) for mt in every])

    config = ws.config or {}
    full = ws.dataset("train")
    pool = study_pool(DataConfig(**config["data"])) if "data" in config else full
    concepts, names, known = dataset_concepts(full)
    priors = np.asarray(pool.indices) if hasattr(pool, "indices") else None   # concept base rates in the pool
    dom = dominant_concepts(all_idx, concepts, names, pool=priors).ids
    rng = np.random.default_rng(seed)
    q = np.sort(rng.choice(len(all_idx), size=min(int(queries), len(all_idx)), replace=False))
    labelled = q[dom[q] >= 0]
    if labelled.size < 10:
        raise ConceptEvoError(f"only {labelled.size} sampled neurons are dominated by a concept; purity cannot be "
                              "measured on these stimuli (more checkpoints or a larger k would help)")

    ep = EmbeddingConfig(**config.get("embedding", {}))
    num_images = int(ws.manifest.get("data", {}).get("num_images") or len(full))
    models = ws.manifest.get("models", {})

    results, spaces = [], []
    for model, tag in cands:
        t0 = time.perf_counter()
        base = stimuli[(model, tag)]
        ck = next(c for c in ws.checkpoints(model) if c.tag == tag)
        info = models[model]
        net = load_model(info["arch"], info.get("options", {}), ck.path, full, trust=trust).to(device)
        resp = top_responses(net, pool, base, top=config.get("images", {}).get("top_responses", 10),
                             device=device, progress=progress, num_images=num_images)
        runs = []
        for s in (ep.seed, ep.seed + 1):
            space = UnifiedSpace.from_config(replace(ep, seed=s), progress=progress).fit(base, resp, num_images=num_images)
            runs.append((space.neuron_embedding_, np.concatenate([space.transform(stimuli[mt]).vectors for mt in every])))
        emb, vectors = runs[0]
        if not np.isfinite(vectors).all():
            raise ConceptEvoError(f"some neurons have no stimulus image and no place in the space of {model} {tag}")
        covered = np.zeros(num_images, bool)
        idx = np.asarray(base.indices)
        covered[idx[idx >= 0]] = True
        valid = all_idx >= 0
        share = (covered[np.where(valid, all_idx, 0)] & valid).sum(1) / np.maximum(valid.sum(1), 1)
        hits = [(dom[nn] == dom[labelled, None]).mean(axis=1) for nn in (nearest_neighbors(v, labelled, PURITY_K, block)
                                                                          for _, v in runs)]
        per_seed = [float(h.mean()) for h in hits]
        both = (hits[0] + hits[1]) / 2
        # standard error of the mean purity: the sampled query neurons, and the two seeds' difference
        se = float(np.hypot(both.std(ddof=1) / np.sqrt(both.size), abs(per_seed[0] - per_seed[1]) / 2))
        near = nearest_neighbors(vectors, q, AGREEMENT_K)
        near_other_seed = nearest_neighbors(runs[1][1], q, AGREEMENT_K)
        results.append(Candidate(model, tag, neurons=len(base.neuron_ids), units_covered=float(np.mean(share >= COVERED_SHARE)),
                                 purity=float(np.mean(per_seed)), purity_se=se, purity_seeds=per_seed,
                                 seed_agreement=neighbor_jaccard(near, near_other_seed), epochs_run=emb.epochs_run,
                                 seconds=time.perf_counter() - t0))
        spaces.append(near)
        log.info("candidate base %s %s: purity %.3f, units covered %.1f%%, %.1f s", model, tag, results[-1].purity,
                 100 * results[-1].units_covered, results[-1].seconds)
    agree = np.full((len(cands), len(cands)), np.nan)
    for i in range(len(cands)):
        for j in range(len(cands)):
            agree[i, j] = 1.0 if i == j else neighbor_jaccard(spaces[i], spaces[j])
    for i, c in enumerate(results):
        c.agreement = float(np.mean([agree[i, j] for j in range(len(cands)) if j != i]))
    best, reasons = recommend(results, "concept purity" if known else "class purity")
    return BaseChoice(results, best.name, reasons, "known concepts" if known else "class labels", int(q.size),
                      agree.tolist())


def recommend(cands: list[Candidate], purity_name: str = "concept purity") -> tuple[Candidate, list[str]]:
    """The recommended candidate and the reasons, from the numbers (see the module docstring)."""
    top = max(cands, key=lambda c: c.purity)
    tied = [c for c in cands if top.purity - c.purity <= 2 * np.hypot(top.purity_se, c.purity_se)]
    best = max(tied, key=lambda c: (round(c.units_covered, 2), c.agreement))
    others = [c for c in cands if c is not best]
    reasons = []
    if len(tied) == 1:
        runner = max(others, key=lambda c: c.purity)
        reasons.append(f"highest {purity_name} of other checkpoints' neurons in its space: {best.purity:.3f} ± "
                       f"{best.purity_se:.3f}, against {runner.purity:.3f} ± {runner.purity_se:.3f} for {runner.name} "
                       f"(more than two standard errors apart)")
    else:
        names = ", ".join(f"{c.name} ({c.purity:.3f} ± {c.purity_se:.3f})" for c in tied if c is not best)
        reasons.append(f"its {purity_name} ({best.purity:.3f} ± {best.purity_se:.3f}) cannot be told apart from that of "
                       f"{names}: within two standard errors" + ("" if best is top else f" of the highest, {top.name}'s"))
    most = max(cands, key=lambda c: c.units_covered)
    if most is best:
        reasons.append(f"its stimuli cover the most units: {best.units_covered:.1%} of all checkpoints' neurons have at "
                       f"least half their stimuli among its images"
                       + (f" (next: {max(others, key=lambda c: c.units_covered).units_covered:.1%})" if others else ""))
    else:
        reasons.append(f"it covers {best.units_covered:.1%} of the units ({most.name}: {most.units_covered:.1%}"
                       f"{', but lower purity' if most not in tied else ''})")
    if np.isfinite(best.agreement):
        floor = best.seed_agreement
        reasons.append(f"its neighbourhoods agree with the other bases' at a Jaccard index of {best.agreement:.3f}"
                       + (f"; two seeds of its own space agree at {floor:.3f}, so "
                          + ("the choice of base changes the neighbourhoods more than the seed does"
                             if best.agreement < floor else "the bases differ no more than two seeds do")
                          if np.isfinite(floor) else ""))
    return best, reasons


__all__ = ["Candidate", "BaseChoice", "choose_base", "recommend"]
