"""What the explorer page reads: a workspace turned into small data scripts.

The page loads its data as scripts named ``data/KEY.js``, each calling
``window.__ceLoad(KEY, {...})``. The server generates them on request; the
static export writes them all as files. One loading mechanism therefore works
over HTTP and from ``file://`` (where ``fetch`` is blocked), with no network.

Keys: ``meta`` (models, checkpoints, layers, ids, curves, what is missing),
``ck-M-T`` (2-D positions, distance moved, K-means group of checkpoint T of
model M, by position), ``vec-M-T`` (unified vectors, for nearest neurons),
``stim-M-T`` (stimulus image indices, strengths and boxes), ``imp-J``
(importance result J). Large arrays travel as base64 little-endian typed arrays.
"""
from __future__ import annotations

import base64
import json
import logging
import os
import re
import threading
from pathlib import Path
from urllib.parse import quote

import numpy as np

from ..contexts import is_text_workspace
from ..errors import ConceptEvoError
from ..patches import PatchStore
from ..report import analysis
from ..workspace import Workspace

log = logging.getLogger(__name__)

KEY_RE = re.compile(r"^(meta|ck-(\d{1,4})-(\d{1,5})|vec-(\d{1,4})-(\d{1,5})|stim-(\d{1,4})-(\d{1,5})|imp-(\d{1,5}))$")
FILE_ROOTS = ("patches", "figures")


def b64(a: np.ndarray, dtype) -> str:
    return base64.b64encode(np.ascontiguousarray(np.asarray(a), dtype=np.dtype(dtype).newbyteorder("<")).tobytes()).decode("ascii")


def manifest_signature(path) -> tuple | None:
    """What tells one version of ``manifest.json`` from another without reading it: inode, size, modification time."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def file_url(*parts: str) -> str:
    """A relative URL to a workspace file (``files/patches/MODEL/TAG/sheet``), each part percent-encoded.

    Model names and tags may hold spaces, ``#``, ``?``... (see :mod:`conceptevo.records`);
    encoded, the URL names the file over HTTP and from ``file://`` alike.
    """
    return "/".join(quote(p, safe="") for p in ("files", *parts))


def _hint(ws, public: bool, what: str) -> str:
    w = "WORKSPACE" if public else str(ws.path)
    return {
        "patches": f"conceptevo patches {w}",
        "layout": f"conceptevo run STUDY.toml   (the config the study was made with; the layout is stage 6)",
        "projection": f"conceptevo run STUDY.toml   (projection is stage 5)",
        "stimuli": f"conceptevo run STUDY.toml",
        "importance": f"compute the importance of an evolution for a class (conceptevo.importance.evolution_importance, or its "
                      f"command in `conceptevo --help`) and save it as {w}/importance/MODEL/FROM__TO/class-C.npz",
    }[what]


class ExplorerData:
    """Everything the page shows, computed once from a workspace and cached (thread-safe).

    Arrays are read from the workspace once (at construction, or at the first
    request that needs them) and then served from memory: no request reads or
    parses a ``.npy`` file again. ``signature`` identifies the manifest this
    was read from; :meth:`reloaded` reads the workspace again.
    """

    def __init__(self, ws, kmeans: int = 8, seed: int = 0, public: bool = False):
        if isinstance(kmeans, bool) or not isinstance(kmeans, int) or not 1 <= kmeans <= 64:
            raise ConceptEvoError(f"kmeans (the number of groups) must be an integer in 1..64, got {kmeans!r}")
        self.signature = manifest_signature(ws.manifest_path)  # before reading: a change meanwhile is seen later
        self.ws = ws
        self.public = public  # for a shared export: no local paths in the data
        self.kmeans = kmeans
        self.seed = seed
        self.store = PatchStore(ws)
        self.text = is_text_workspace(ws)
        self._lock = threading.RLock()
        self._scripts: dict[str, bytes] = {}
        self._arrays: dict[tuple, object] = {}
        self.models = list(ws.models)
        self.tags = {m: ws.tags(m) for m in self.models}
        self.times = {m: analysis.checkpoint_times(ws, m) for m in self.models}
        self.ids = {}
        for m in self.models:
            ids = None
            for t in self.tags[m]:
                ids = analysis.neuron_ids(ws, m, t)
                if ids is not None:
                    break
            self.ids[m] = ids or []
        self.row = {m: {nid: i for i, nid in enumerate(self.ids[m])} for m in self.models}
        self.vectors = analysis.unified_vectors(ws)
        self.layouts = analysis.layouts(ws)
        self.moved = analysis.distance_moved(ws, self.vectors)
        self.groups, self.centres = analysis.kmeans_groups(self.vectors, k=kmeans, seed=seed)
        self.importance = analysis.find_importance(ws)
        self._imp_cache: dict[int, object] = {}

    # -- lookups -----------------------------------------------------------------------------------
    def model_index(self, model: str) -> int:
        if model not in self.models:
            raise KeyError(f"no model {model!r}; models: {', '.join(self.models)}")
        return self.models.index(model)

    def tag_index(self, model: str, tag: str) -> int:
        tags = self.tags[model]
        if tag not in tags:
            raise KeyError(f"model {model!r} has no checkpoint {tag!r}; checkpoints: {', '.join(tags)}")
        return tags.index(tag)

    def neuron_row(self, model: str, nid: str) -> int:
        r = self.row[model].get(nid)
        if r is None:
            raise KeyError(f"model {model!r} has no neuron {nid!r}")
        return r

    def reloaded(self) -> "ExplorerData":
        """The same view (groups, seed, public) of the workspace as it is on disk now."""
        return ExplorerData(Workspace(self.ws.path), kmeans=self.kmeans, seed=self.seed, public=self.public)

    def _once(self, key: tuple, load):
        with self._lock:
            if key in self._arrays:
                return self._arrays[key]
        value = load()  # outside the lock: a slow read does not hold up other requests
        with self._lock:
            return self._arrays.setdefault(key, value)

    def stimuli(self, model: str, tag: str):
        """A checkpoint's stimuli, read into memory once (a memory map would hold a file descriptor per array)."""
        return self._once(("stimuli", model, tag), lambda: self.ws.stimuli(model, tag, mmap=False))

    def boxes(self, model: str, tag: str) -> np.ndarray:
        """The box of each stimulus shown on its full image ``[neurons, k, 4]``, read into memory once: the patch's
        box, or for a token-shaped unit (whose patch is the whole image) the argmax token's patch (its mark)."""
        def read():
            boxes = np.array(self.store.boxes(model, tag))
            marks = self.store.marks(model, tag)
            return boxes if marks is None else np.where(np.asarray(marks)[..., :1] >= 0, np.asarray(marks), boxes)
        return self._once(("boxes", model, tag), read)

    def importance_result(self, j: int):
        with self._lock:
            if j not in self._imp_cache:
                self._imp_cache[j] = self.importance[j].load()
            return self._imp_cache[j]

    # -- payloads ----------------------------------------------------------------------------------
    def missing(self) -> list[dict]:
        ws, out = self.ws, []
        no_stim = [f"{m} {t}" for m in self.models for t in self.tags[m] if ws.stage(f"stimuli/{m}/{t}") is None]
        if no_stim:
            out.append({"what": "stimuli", "detail": f"no stimuli for {len(no_stim)} checkpoint(s): {', '.join(no_stim[:6])}",
                        "how": _hint(ws, self.public, "stimuli")})
        no_proj = [f"{m} {t}" for (m, t), v in self.vectors.items() if v is None]
        if no_proj:
            out.append({"what": "projection", "detail": f"{len(no_proj)} checkpoint(s) are not projected onto the unified space "
                        f"(no K-means groups, distance moved or nearest neurons there): {', '.join(no_proj[:6])}",
                        "how": _hint(ws, self.public, "projection")})
        no_lay = [f"{m} {t}" for (m, t), v in self.layouts.items() if v is None]
        if no_lay:
            out.append({"what": "layout", "detail": f"no 2-D layout for {len(no_lay)} checkpoint(s): {', '.join(no_lay[:6])}",
                        "how": _hint(ws, self.public, "layout")})
        no_patch = [f"{m} {t}" for m in self.models for t in self.tags[m] if not self.store.has(m, t)]
        if (no_patch or not self.store.has_images) and not self.text:  # text studies show contexts, never patches
            out.append({"what": "patches", "detail": f"no example patches for {len(no_patch)} checkpoint(s)"
                        + (f": {', '.join(no_patch[:6])}" if no_patch else "") + "; hovering shows ids only",
                        "how": _hint(ws, self.public, "patches")})
        if not self.importance:
            out.append({"what": "importance", "detail": "no importance of concept evolutions computed: the class view "
                        "and the importance colouring are off", "how": _hint(ws, self.public, "importance")})
        return out

    def meta(self) -> dict:
        ws = self.ws
        curves = analysis.curves(ws, self.vectors, self.moved)
        models = []
        for mi, m in enumerate(self.models):
            ids = self.ids[m]
            layer_names, layer_of = analysis.layer_index(ids) if ids else ([], np.zeros(0, np.int32))
            cks = ws.checkpoints(m)
            times = self.times[m]
            xs = [v for t in self.tags[m] if (v := self.layouts.get((m, t))) is not None]
            allxy = np.concatenate(xs) if xs else np.zeros((0, 2), np.float32)
            allxy = allxy[np.isfinite(allxy).all(1)]
            bounds = [float(allxy[:, 0].min()), float(allxy[:, 1].min()), float(allxy[:, 0].max()), float(allxy[:, 1].max())] if len(allxy) else None
            ck_list = []
            for ti, c in enumerate(cks):
                t = c.tag
                rec = {"tag": t, "time": times[ti], "epoch": c.epoch, "step": c.step, "metrics": {k: v for k, v in c.metrics.items() if isinstance(v, (int, float))},
                       "layout": self.layouts.get((m, t)) is not None, "vectors": self.vectors.get((m, t)) is not None,
                       "patches": None}
                if self.store.has(m, t):
                    idx = self.store.index(m, t)
                    rec["patches"] = {"geometry": idx["geometry"],
                                      "sheets": [file_url("patches", m, t, s) for s in idx["sheets"]]}
                ck_list.append(rec)
            models.append({
                "name": m, "arch": ws.manifest.get("models", {}).get(m, {}).get("arch"), "n": len(ids), "ids": ids,
                "layers": layer_names, "layer_of": b64(layer_of, np.int32) if len(ids) else "", "checkpoints": ck_list,
                "bounds": bounds,
            })
        images = None
        if self.store.has_images:
            ii = self.store.images_index
            images = {"geometry": ii["geometry"], "sheets": [file_url("patches", "images", s) for s in ii["sheets"]],
                      "indices": b64(self.store.image_indices, np.int32), "labels": b64(self.store.image_labels, np.int32),
                      "classes": ii.get("classes", []), "shape": ii.get("image_shape")}
        classes = images["classes"] if images else []
        imps = []
        for j, r in enumerate(self.importance):
            imps.append({"j": j, "model": r.model, "from": r.tag_from, "to": r.tag_to, "class": r.class_index,
                         "class_name": classes[r.class_index] if 0 <= r.class_index < len(classes) else str(r.class_index)})
        base = ws.manifest.get("base") or {}
        moved_all = [v for v in self.moved.values() if v is not None and np.isfinite(v).any()]
        moved_max = float(np.nanpercentile(np.concatenate(moved_all), 99)) if moved_all else 1.0
        return {
            "workspace": ws.path.name, "path": ws.path.name if self.public else str(ws.path), "base": base, "models": models, "images": images,
            "time_axis": analysis.time_axis(ws), "kmeans": int(len(self.centres)) if self.centres is not None else 0, "moved_max": moved_max,
            "curves": curves, "importance": imps, "missing": self.missing(),
            "diversity_estimator": "mean over dimensions of the differential entropy (Vasicek estimator, scipy)",
            "text": self.text,
        }

    def checkpoint(self, mi: int, ti: int) -> dict:
        m = self.models[mi]
        t = self.tags[m][ti]
        xy = self.layouts.get((m, t))
        n = len(self.ids[m])
        moved = self.moved.get((m, t))
        groups = self.groups.get((m, t))
        out = {
            "model": m, "tag": t, "n": n,
            "xy": b64(xy, np.float32) if xy is not None else None,
            "moved": b64(moved, np.float32) if moved is not None else None,
            "group": b64(groups, np.int32) if groups is not None else None,
        }
        if self.text and self.ws.stage(f"contexts/{m}/{t}") is not None:   # each unit's strongest context
            out["top"] = [unit[0] for unit in self.contexts(m, t, top=True)]
        return out

    def vectors_payload(self, mi: int, ti: int) -> dict:
        m = self.models[mi]
        t = self.tags[m][ti]
        v = self.vectors.get((m, t))
        return {"model": m, "tag": t, "dim": int(v.shape[1]) if v is not None else 0,
                "v": b64(np.nan_to_num(v, nan=np.inf), np.float32) if v is not None else None}

    def stimuli_payload(self, mi: int, ti: int) -> dict:
        m = self.models[mi]
        t = self.tags[m][ti]
        if self.ws.stage(f"stimuli/{m}/{t}") is None:
            return {"model": m, "tag": t, "k": 0, "indices": None}
        s = self.stimuli(m, t)
        out = {"model": m, "tag": t, "k": int(s.k), "indices": b64(s.indices, np.int32), "values": b64(s.values, np.float32),
               "boxes": None}
        if self.store.has(m, t):
            out["boxes"] = b64(self.boxes(m, t), np.int32)
        if self.ws.stage(f"contexts/{m}/{t}") is not None:
            out["contexts"] = self.contexts(m, t)
        return out

    def contexts(self, m: str, t: str, top: bool = False) -> list[list[list[str]]]:
        """Text studies: every unit's top contexts as ``[before, token, after]`` plain text (newlines as marks);
        the page shows them as text nodes, and :meth:`script` keeps them from closing the script element.
        ``top``: only each unit's strongest context."""
        from ..contexts import context_strings, load_contexts, workspace_tokenizer

        tk = self._once(("tokenizer",), lambda: workspace_tokenizer(self.ws))
        ctx = load_contexts(self.ws, m, t)
        return [[list(context_strings(tk, c)) for c in (unit[:1] if top else unit)] for unit in ctx]

    def importance_payload(self, j: int) -> dict:
        r = self.importance[j]
        imp = self.importance_result(j)
        ids = self.ids[r.model]
        scores = np.full(len(ids), np.nan, dtype=np.float32)
        pos = self.row[r.model]
        for nid, s in zip(imp.neuron_ids, imp.scores):
            if nid in pos:
                scores[pos[nid]] = s
        top = [[pos[nid], float(s)] for nid, s in imp.top(min(30, len(imp))) if nid in pos]
        return {"j": j, "model": r.model, "from": r.tag_from, "to": r.tag_to, "class": r.class_index,
                "scores": b64(scores, np.float32), "top": top, "images": int(imp.num_images)}

    def payload(self, key: str) -> dict:
        """The object behind data key ``key``; KeyError for keys that do not exist."""
        mt = KEY_RE.match(key)
        if not mt:
            raise KeyError(f"unknown data key {key!r}")
        if key == "meta":
            return self.meta()
        kind = key.split("-", 1)[0]
        if kind == "imp":
            j = int(key[4:])
            if not 0 <= j < len(self.importance):
                raise KeyError(f"no importance result {j}")
            return self.importance_payload(j)
        mi, ti = (int(x) for x in key.split("-")[1:])
        if not 0 <= mi < len(self.models) or not 0 <= ti < len(self.tags[self.models[mi]]):
            raise KeyError(f"no checkpoint {mi}-{ti}")
        return {"ck": self.checkpoint, "vec": self.vectors_payload, "stim": self.stimuli_payload}[kind](mi, ti)

    def script(self, key: str) -> bytes:
        """``window.__ceLoad(key, {...});`` for data key ``key`` (cached)."""
        with self._lock:
            got = self._scripts.get(key)
        if got is not None:
            return got
        obj = self.payload(key)
        text = "window.__ceLoad(" + json.dumps(key) + "," + json.dumps(obj, separators=(",", ":"), allow_nan=False, default=_json_default) + ");\n"
        # a data script must never be able to close a <script> element or start a comment
        data = text.replace("</", "<\\/").replace("<!--", "<\\!--").encode("utf-8")
        with self._lock:
            self._scripts[key] = data
        return data

    def keys(self) -> list[str]:
        keys = ["meta"]
        for mi, m in enumerate(self.models):
            for ti in range(len(self.tags[m])):
                keys += [f"ck-{mi}-{ti}", f"vec-{mi}-{ti}", f"stim-{mi}-{ti}"]
        keys += [f"imp-{j}" for j in range(len(self.importance))]
        return keys

    def files(self) -> list[Path]:
        """Workspace files the page may load (sprite sheets), relative to the workspace."""
        out = []
        for m in self.models:
            for t in self.tags[m]:
                if self.store.has(m, t):
                    out += [Path("patches") / m / t / s for s in self.store.index(m, t)["sheets"]]
        if self.store.has_images:
            out += [Path("patches") / "images" / s for s in self.store.images_index["sheets"]]
        return out


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        f = float(o)
        return f if np.isfinite(f) else None
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"cannot encode {type(o).__name__}")
