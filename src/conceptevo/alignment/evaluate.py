"""``conceptevo evaluate-alignment``: how well the unified space aligns concepts, measured without people.

Three settings, as in the paper's study (Sec 4.2): neurons of the base
checkpoint (*within base*), neurons of the base model's checkpoints at
different epochs (*across epochs*), and neurons of different models (*across
models*). One K-means clustering of the whole unified space (every checkpoint
of every model, projected vectors) gives the groups. For each setting:

* concept coherence of the groups against random groups
  (:mod:`conceptevo.alignment.coherence`), on the study's dataset when its
  concepts are known (the built-in ConceptShapes), else on class labels;
* an intruder test judged from pictures alone (:mod:`conceptevo.alignment.intruder`),
  ROC AUC beside the paper's 0.90 / 0.86 and the random-group chance level.

Text studies (``[data] kind = "text"``) have no pictures: the judge reads each
unit's top contexts (:func:`~conceptevo.alignment.intruder.context_features`),
and a unit's concept for coherence is the argmax token of its contexts (a unit
is dominated by ``token=:`` when at least ``dominance`` of its contexts centre
on ``:``, well above that token's share among all the checkpoint's contexts).

Then a layer-level reference view: linear CKA between checkpoints and models
beside the unified space's own layer similarity (:mod:`conceptevo.alignment.cka`).

Results go to ``WORKSPACE/alignment/``: ``results.json``, ``report.md`` and
``roc.png`` / ``layers.png``.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np

from ..config import DataConfig
from ..contexts import context_tokens, is_text_workspace, load_contexts, visible_marks, workspace_tokenizer
from ..data.base import Subset, display_image
from ..errors import ConceptEvoError, WorkspaceError
from ..io import new_figure, save_figure, write_bytes, write_json
from ..patches import PatchStore, to_uint8_image
from ..study import study_pool
from ..workspace import Workspace, WorkspaceLock
from .cka import compare_checkpoints, layer_responses
from .coherence import ConceptCoding, coherence_test, dataset_concepts, dominant_concepts
from .intruder import context_features, description_matrix, intruder_test, neuron_description, picture_features
from .space import kmeans_groups, neuron_table

log = logging.getLogger(__name__)

PAPER_AUC = {"within base": 0.90, "across epochs": 0.86, "across models": 0.86}


class _Pictures:
    """What the judge sees of a neuron: its example patches when the workspace has them, else its stimulus images."""

    def __init__(self, ws, table, views: str = "auto"):
        if views not in ("auto", "patches", "images"):
            raise ConceptEvoError(f"views must be 'auto', 'patches' or 'images' for an image study, got {views!r}"
                                  + ("; 'contexts' is for text studies" if views == "contexts" else ""))
        self.ws, self.table = ws, table
        self.store = None
        if views in ("auto", "patches"):
            store = PatchStore(ws)
            have = all(store.has(m, t) for m, t in table.checkpoints())
            if have:
                self.store = store
            elif views == "patches":
                raise WorkspaceError(f"the workspace {ws.path} lacks example patches for some checkpoints; "
                                     f"compute them with `conceptevo patches {ws.path}` or use views='images'")
        self.views = "patches" if self.store is not None else "images"
        self._stim: dict = {}
        self._image_feats: dict[int, dict] = {}
        self._dataset = None

    def _indices(self, m, t, r):
        key = (m, t)
        if key not in self._stim:
            self._stim[key] = np.asarray(self.ws.stimuli(m, t).indices)
        idx = self._stim[key][r]
        return idx[idx >= 0]

    def _image_features(self, indices):
        missing = [int(i) for i in indices if int(i) not in self._image_feats]
        if missing:
            if self._dataset is None:
                self._dataset = self.ws.images()
            ds = self._dataset
            for i in missing:  # the pictures as people see them (no mean/std normalisation)
                img = display_image(ds, i)
                self._image_feats[i] = picture_features(to_uint8_image(img))
        feats = [self._image_feats[int(i)] for i in indices]
        return {key: np.mean([f[key] for f in feats], axis=0) for key in feats[0]}

    def describe(self, rows) -> np.ndarray:
        descs = []
        for row in rows:
            m, t, r = self.table.models[row], self.table.tags[row], int(self.table.rows[row])
            if self.store is not None:
                descs.append(neuron_description(list(self.store.patches(m, t, r))))
            else:
                descs.append(self._image_features(self._indices(m, t, r)))
        return description_matrix(descs)


class _Contexts:
    """What the judge reads of a text study's unit: its top contexts, as token strings around the argmax token."""

    views = "contexts"

    def __init__(self, ws, table):
        self.ws, self.table = ws, table
        self.tokenizer = workspace_tokenizer(ws)
        self._ctx: dict = {}
        self._valid: dict = {}

    def contexts(self, m, t, r) -> list[list[str]]:
        """The unit's contexts (one list of token strings each, the argmax token in the middle), strongest first."""
        if (m, t) not in self._ctx:
            self._ctx[(m, t)] = load_contexts(self.ws, m, t)
            self._valid[(m, t)] = np.asarray(self.ws.stimuli(m, t).indices) >= 0
        rows = self._ctx[(m, t)][r][self._valid[(m, t)][r]]
        return [context_tokens(self.tokenizer, c) for c in rows]

    def describe(self, rows):
        descs = []
        for row in rows:
            m, t, r = self.table.models[row], self.table.tags[row], int(self.table.rows[row])
            descs.append(neuron_description(self.contexts(m, t, r), context_features))
        return description_matrix(descs)


def _views(ws, table, views: str):
    """The judge's view of the neurons: contexts for text studies, else pictures (patches or images)."""
    if not is_text_workspace(ws):
        return _Pictures(ws, table, views)
    if views not in ("auto", "contexts"):
        raise ConceptEvoError(f"views={views!r} does not exist for a text study: its units are read as contexts; "
                              "use views='contexts' (or 'auto')")
    return _Contexts(ws, table)


def argmax_token_concepts(ws, model: str, tag: str, dominance: float = 0.6, tokenizer=None):
    """Each unit's dominant argmax token (a :class:`~conceptevo.alignment.coherence.ConceptCoding` whose ids are
    token ids and whose names are ``token=...`` for every token id) from one checkpoint's contexts.

    The priors are the tokens' shares among all the checkpoint's contexts; only tokens that occur there are
    tested (the significance threshold is 0.05 over their number), so a large vocabulary costs nothing.
    """
    tk = tokenizer if tokenizer is not None else workspace_tokenizer(ws)
    ctx = load_contexts(ws, model, tag)
    valid = np.asarray(ws.stimuli(model, tag).indices) >= 0
    centre = ctx[:, :, ctx.shape[2] // 2].astype(np.int64)
    present = np.unique(centre[valid])
    local = np.where(valid, np.searchsorted(present, centre), -1)
    idx = np.where(valid, np.arange(centre.size).reshape(centre.shape), -1)
    coded = dominant_concepts(idx, {"token": np.maximum(local, 0).ravel()}, None, dominance,
                              pool=np.flatnonzero(valid.ravel()))
    ids = np.where(coded.ids >= 0, present[np.maximum(coded.ids, 0)], -1)
    names = [f"token={visible_marks(tk.token_str(i))}" for i in range(tk.vocab_size)]
    return ConceptCoding(ids, names, coded.shares)


def _settings(ws, table) -> list[dict]:
    base_m, base_t = ws.base
    models = table.models
    out = [{"name": "within base", "eligible": np.flatnonzero((models == base_m) & (table.tags == base_t)),
            "mixing": None, "pool": None}]
    in_model = np.flatnonzero(models == base_m)
    if len(np.unique(table.tags[in_model])) >= 2:
        out.append({"name": "across epochs", "eligible": in_model, "mixing": table.tags, "pool": None})
    if len(np.unique(models)) >= 2:
        out.append({"name": "across models", "eligible": np.arange(len(table)), "mixing": models, "pool": None})
    return out


def evaluate_alignment(workspace, n_groups: int | None = None, tasks: int = 200, seed: int = 0, views: str = "auto",
                       dominance: float = 0.6, random_groups: int = 200, cka: bool = True, cka_images: int = 500,
                       device: str = "cpu", out=None, trust: bool = False) -> dict:
    """Run the alignment evaluation on a workspace; write and return the results (module docstring).

    ``n_groups`` defaults to about one group per 15 base neurons (at least 4).
    """
    ws = workspace if isinstance(workspace, Workspace) else Workspace(workspace)
    table = neuron_table(ws)
    base_m, base_t = ws.base
    n_base = int(np.sum((table.models == base_m) & (table.tags == base_t)))
    if n_groups is None:
        n_groups = max(4, n_base // 15)
    if n_base < 5 * 2:
        raise ConceptEvoError(f"the base checkpoint has {n_base} neurons; the intruder test needs at least 10")
    groups = kmeans_groups(table.vectors, n_groups, seed=seed)
    text = is_text_workspace(ws)
    codes = {}
    if text:
        known, tk = False, workspace_tokenizer(ws)
        for m, t in table.checkpoints():
            codes[(m, t)] = argmax_token_concepts(ws, m, t, dominance, tk)
    else:
        dataset = ws.images()  # by image index, as the stimuli record them
        concepts, names, known = dataset_concepts(dataset)
        for m, t in table.checkpoints():
            codes[(m, t)] = dominant_concepts(np.asarray(ws.stimuli(m, t).indices), concepts, names, dominance)
    cid = np.empty(len(table), dtype=np.int64)
    label_names = None
    for (m, t), c in codes.items():
        sel = (table.models == m) & (table.tags == t)
        cid[sel] = c.ids[table.rows[sel]]
        label_names = c.names
    pictures = _views(ws, table, views)
    results = {"workspace": str(ws.path), "base": [base_m, base_t], "n_groups": int(n_groups), "tasks": int(tasks),
               "seed": seed, "views": pictures.views, "known_concepts": known, "dominance": dominance,
               "concepts": "argmax token" if text else "dataset concepts" if known else "class",
               "neurons": int(len(table)), "checkpoints": [list(c) for c in table.checkpoints()],
               "coherence": [], "intruder": [], "layers": [], "notes": []}
    for st in _settings(ws, table):
        el = st["eligible"]
        try:
            coh = coherence_test(cid[el], groups[el], label_names, random_groups=random_groups, seed=seed,
                                 setting=st["name"], known_concepts=known)
            d = coh.to_dict()
            if st["mixing"] is not None:
                mix = st["mixing"][el]
                g = groups[el]
                mixed = [len(np.unique(mix[g == k])) >= 2 for k in np.unique(g) if np.sum(g == k) >= 2]
                d["mixed_groups"] = float(np.mean(mixed)) if mixed else 0.0
            results["coherence"].append(d)
        except ConceptEvoError as e:
            results["notes"].append(f"coherence {st['name']}: {e}")
        try:
            res = intruder_test(groups, el, pictures.describe, tasks=tasks, seed=seed, setting=st["name"],
                                mixing=st["mixing"], intruder_pool=st["pool"], paper_auc=PAPER_AUC[st["name"]])
            results["intruder"].append(res.to_dict())
        except ConceptEvoError as e:
            results["notes"].append(f"intruder test {st['name']}: {e}")
    if cka:
        try:
            results["layers"] = _layer_views(ws, cka_images, seed, device, trust)
        except ConceptEvoError as e:
            results["notes"].append(f"layer-level comparison skipped: {e}")
    folder = Path(out) if out is not None else ws.path / "alignment"
    with WorkspaceLock(ws.path) if out is None else _nolock():
        write_json(folder / "results.json", _clean(results))
        figs = _figures(results, folder)
        write_bytes(folder / "report.md", alignment_markdown(results, figs).encode())
    results["files"] = [str(folder / "results.json"), str(folder / "report.md"), *map(str, figs)]
    return results


class _nolock:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _layer_views(ws: Workspace, n_images: int, seed: int, device: str, trust: bool) -> list[dict]:
    base_m, base_t = ws.base
    pairs = []
    tags = ws.tags(base_m)
    if len(tags) >= 2:
        pairs.append(((base_m, tags[0]), (base_m, base_t)))
        mid = tags[len(tags) // 2]
        if mid not in (tags[0], base_t):
            pairs.append(((base_m, mid), (base_m, base_t)))
    for m in ws.models:
        if m != base_m:
            pairs.append(((m, ws.tags(m)[-1]), (base_m, base_t)))
    if not pairs:
        raise ConceptEvoError("one checkpoint only: the layer-level comparison needs two checkpoints")
    full = ws.images()
    data = ws.config.get("data", {})
    try:
        pool = study_pool(DataConfig(**data))
        candidates = np.asarray(pool.indices) if hasattr(pool, "indices") else np.arange(len(full))
    except TypeError:
        candidates = np.arange(len(full))
    rng = np.random.default_rng(seed)
    probe = Subset(full, np.sort(rng.choice(candidates, size=min(n_images, candidates.size), replace=False)))
    resp_cache, out = {}, []

    def responses(m, t):
        if (m, t) not in resp_cache:
            ck = ws.checkpoint(m, t)
            if not Path(ck.path).exists():
                raise ConceptEvoError(f"checkpoint file {ck.path} is missing; CKA needs the checkpoints")
            model = ws.load_model(m, t, full, trust=trust).to(device)
            layers = [i.name for i in ws.stimuli(m, t).layers]
            resp_cache[(m, t)] = layer_responses(model, probe, layers=layers, device=device)
        return resp_cache[(m, t)]

    for a, b in pairs:
        comp = compare_checkpoints(a, b, responses(*a), responses(*b), ws.projection(*a), ws.projection(*b))
        out.append(comp.to_dict())
    return out


def _clean(obj):
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def _figures(results: dict, folder: Path) -> list[Path]:

    paths = []
    if results["intruder"]:
        n = len(results["intruder"])
        fig = new_figure(figsize=(3.6 * n, 3.4))
        axes = fig.subplots(1, n, squeeze=False)
        for ax, r in zip(axes[0], results["intruder"]):
            ax.plot(r["roc"]["fpr"], r["roc"]["tpr"], label=f"K-means groups, AUC {r['auc']:.2f}")
            ax.plot(r["chance_roc"]["fpr"], r["chance_roc"]["tpr"], "--", label=f"random groups, AUC {r['chance_auc']:.2f}")
            ax.plot([0, 1], [0, 1], ":", color="gray", lw=0.8)
            ax.set_title(f"{r['setting']} (paper {r['paper_auc']:.2f})", fontsize=9)
            ax.set_xlabel("false positive rate")
            ax.set_ylabel("true positive rate")
            ax.legend(fontsize=7, loc="lower right")
        fig.tight_layout()
        paths += save_figure(fig, folder / "roc.png", dpi=120)
    if results["layers"]:
        rows = results["layers"][:3]
        fig = new_figure(figsize=(3.4 * len(rows), 6.2))
        axes = fig.subplots(2, len(rows), squeeze=False)
        for j, comp in enumerate(rows):
            for i, key in enumerate(("cka", "space")):
                ax = axes[i][j]
                M = np.array(comp[key], dtype=float)
                im = ax.imshow(M, cmap="viridis", aspect="auto")
                ax.set_title(f"{'linear CKA' if key == 'cka' else 'unified space'}\n{'/'.join(comp['a'])} vs {'/'.join(comp['b'])}", fontsize=8)
                ax.set_xlabel(f"layer of {comp['b'][0]}", fontsize=7)
                ax.set_ylabel(f"layer of {comp['a'][0]}", fontsize=7)
                ax.tick_params(labelsize=6)
                fig.colorbar(im, ax=ax, fraction=0.046)
        fig.tight_layout()
        paths += save_figure(fig, folder / "layers.png", dpi=120)
    return paths


def _f(x, fmt=".3f"):
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, fmt)


def alignment_markdown(results: dict, figures=()) -> str:
    """The alignment report as Markdown."""
    L = ["# Alignment of the unified space, measured without people", "",
         f"Workspace `{results['workspace']}`, base `{'/'.join(results['base'])}`, {results['neurons']} neurons in "
         f"{len(results['checkpoints'])} checkpoints, {results['n_groups']} K-means groups (seed {results['seed']}).", ""]
    L += ["## Concept coherence of the groups", ""]
    if results.get("concepts") == "argmax token":
        L += ["A text unit's concept is the argmax token of its contexts (token purity: the unit is dominated by a "
              "token when its contexts centre on it often enough).", ""]
    elif not results["known_concepts"]:
        L += ["The study's dataset has no known concepts, so a neuron's concept is its stimuli's dominant **class** "
              "(class purity: a weaker property than concept coherence).", ""]
    L += [f"A neuron is dominated by a concept when at least {results['dominance']:.0%} of its stimuli share it; a group's "
          "coherence is the share of its neurons dominated by the group's most common concept. Random groups: the same "
          "sizes, drawn from the same neurons.", "",
          "| setting | groups | neurons | dominated | coherence | random groups | p |", "|---|---|---|---|---|---|---|"]
    for c in results["coherence"]:
        L.append(f"| {c['setting']} | {c['groups']} | {c['neurons']} | {_f(c['dominated'], '.0%')} | {_f(c['coherence'])} | "
                 f"{_f(c['random_mean'])} ± {_f(c['random_std'])} | {_f(c['p_value'], '.3g')} |")
    if results["views"] == "contexts":
        shown = ("top contexts; the judge compares the argmax tokens, the tokens just before and after them, their "
                 "character classes and the letter trigrams around them")
    else:
        shown = (f"{'example patches' if results['views'] == 'patches' else 'stimulus images'}; the judge compares "
                 "colour histograms, gradient-orientation histograms and thumbnails")
    L += ["", f"## Intruder test (judge sees only the {'contexts' if results['views'] == 'contexts' else 'pictures'})", "",
          f"Each task: {5} neurons of one group plus 1 random intruder from another group, shown as "
          f"{shown}, and never uses the embedding. "
          "Chance: AUC 0.5 in theory; *random groups* is the same judge on groups of random neurons.", "",
          "| setting | tasks | ROC AUC | paper (people) | random groups | intruder found | (chance 1/6) |",
          "|---|---|---|---|---|---|---|"]
    for r in results["intruder"]:
        L.append(f"| {r['setting']} | {r['tasks']} | **{_f(r['auc'])}** | {_f(r['paper_auc'], '.2f')} | {_f(r['chance_auc'])} | "
                 f"{_f(r['intruder_found'], '.0%')} | {_f(r['chance_found'], '.0%')} |")
    if results["layers"]:
        L += ["", "## Layer level: linear CKA beside the unified space", "",
              "CKA compares two layers' responses to the same images; the unified space compares where their neurons' "
              "vectors lie (1 - Chamfer distance / typical distance). Spearman: rank agreement of the two "
              "layer-by-layer matrices; same best match: share of layers whose most similar layer is the same in both views.", "",
              "| checkpoints | mean CKA, same layer | mean space similarity, same layer | Spearman | same best match |",
              "|---|---|---|---|---|"]
        for c in results["layers"]:
            L.append(f"| {'/'.join(c['a'])} vs {'/'.join(c['b'])} | {_f(c['diagonal_cka'])} | {_f(c['diagonal_space'])} | "
                     f"{_f(c['spearman'], '.2f')} | {_f(c['same_best'], '.0%')} |")
        agree = [c for c in results["layers"] if c["spearman"] is not None and c["spearman"] >= 0.5]
        L += ["", f"The two views rank layer pairs alike (Spearman >= 0.5) for {len(agree)} of {len(results['layers'])} "
              "checkpoint pairs. CKA sees whole-layer response geometry; the unified space sees which images each neuron "
              "prefers, so it can tell apart layers whose responses correlate but whose neurons prefer different images, "
              "and it needs no shared images between models beyond the stimulus pool."]
    for p in figures:
        L += ["", f"![{Path(p).stem}]({Path(p).name})"]
    if results["notes"]:
        L += ["", "## Notes", ""] + [f"- {n}" for n in results["notes"]]
    return "\n".join(L) + "\n"


__all__ = ["evaluate_alignment", "alignment_markdown", "PAPER_AUC"]
