"""The runs under ``results/`` as flat rows, and the runs table: what every report reads.

One row per run; its perplexities are the full-split figures of one evaluation cache (the one its
score counts, else the largest it was evaluated with), so every number in a row is measured under
one stated condition. The training log's last validation (often the first N tokens, sometimes with
the training cache) is kept apart in ``log_val_*``. :mod:`micronet.report` re-exports all of this.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from micronet.runs.config import MicronetError
from micronet.runs.paths import results_root
from micronet.report.data_setup import format_table

CONVENTIONS = ("paper", "strict")
DATASET_NAMES = {"wikitext-2": "WikiText-2", "wikitext-103": "WikiText-103"}
MISSING = "missing"
"""Table cell of a figure that should exist but does not (e.g. a score whose eval file is absent)."""
WEIGHT_STAGES = ("prune", "quantize")  # derived runs that continue their parent's weights (and tokens)

# ----------------------------------------------------------------------------- reading files


def _read(path: Path, notes: list[str], loader) -> Any:
    """Parsed file, or None when missing (silently) or unreadable (with a note)."""
    if not path.is_file():
        return None
    try:
        return loader(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError) as e:
        notes.append(f"{path.name} unreadable ({type(e).__name__})")
        return None


def _float(v: Any) -> float | None:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def read_training_curve(path: str | os.PathLike) -> list[dict]:
    """Rows of a ``train_results.csv``: numeric fields as floats, ``step`` as int; [] when missing.

    Rows without a parsable step are skipped, as are fields that are empty or not numbers.
    """
    rows = []
    try:
        with open(path, newline="") as f:
            for r in csv.DictReader(f):
                vals = {k: x for k, v in r.items() if k and (x := _float(v)) is not None}
                if "step" in vals:
                    rows.append({**vals, "step": int(vals["step"])})
    except (OSError, csv.Error, UnicodeDecodeError):
        return rows
    return rows


def _steps(run: Path, pattern: str) -> list[int]:
    return sorted(int(m.group(1)) for p in run.glob("*") if (m := re.fullmatch(pattern, p.name)))


def _looks_like_run(path: Path) -> bool:
    if not path.is_dir() or path.name.startswith("."):
        return False
    markers = ("config.yaml", "models", "train_results.csv")
    return any((path / f).exists() for f in markers) or bool(_steps(path, r"(?:eval|score)_step(\d+)\.json"))


def run_names(root: str | os.PathLike | None = None) -> list[str]:
    """Names of the runs under ``root`` (default: ``results_root()``), sorted."""
    root = Path(root) if root is not None else results_root()
    return sorted(p.name for p in root.iterdir() if _looks_like_run(p)) if root.is_dir() else []


def _evals(run: Path, step: int, notes: list[str]) -> list[dict]:
    """Every ``eval_step<S>[_n<N>].json`` of ``step``: cache, per-split ppl and tokens, file name."""
    out = []
    for p in sorted(run.glob(f"eval_step{step}*.json")):
        m = re.fullmatch(rf"eval_step{step}(?:_n(\d+))?\.json", p.name)
        ev = _read(p, notes, json.loads) if m else None
        if not isinstance(ev, dict):
            continue
        e = {"file": p.name, "n_cache": int(m.group(1) or 0)}
        for split, key in (("valid", "val"), ("test", "test")):
            s = ev.get(split) if isinstance(ev.get(split), dict) else {}
            e[f"{key}_ppl"], e[f"{key}_tokens"] = s.get("ppl"), s.get("tokens")
        out.append(e)
    return sorted(out, key=lambda e: e["n_cache"])


def _searched_val(run: Path, step: int, n_cache: int, evals: Sequence[Mapping]) -> float | None:
    """The cache search's full-split validation ppl at ``n_cache`` (``cache_step<S>_n<N>.yaml``), when it
    ran over as many tokens as an evaluation of the full validation split (else None)."""
    full = {e["val_tokens"] for e in evals if e.get("val_tokens")}
    try:
        found = yaml.safe_load((run / f"cache_step{step}_n{n_cache}.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return None
    ok = isinstance(found, dict) and found.get("val_tokens") in full
    return _float(found.get("val_ppl")) if ok else None


# ----------------------------------------------------------------------------- collecting runs


def collect_runs(names: Sequence[str] | str | None = None, root: str | os.PathLike | None = None) -> list[dict]:
    """One flat dict per run (``names``, default every run under ``root``), tolerant of missing files.

    Keys: ``name``, ``path``, ``dataset`` (``config.yaml``'s ``data.name``, else the lineage parent's),
    lineage ``parent``/``parent_step``/``stage``, ``step`` (newest checkpoint, else newest
    eval/score/csv step), ``planned`` (nothing run yet), ``n_cache`` (the evaluation cache of the
    row: the score's, else the largest evaluated), ``val_ppl``/``test_ppl`` (full split at that
    cache; ``val_source`` says which file), ``evals`` (every evaluation of the step), ``log_val_ppl``
    and ``log_val_condition`` (the training log's last validation and what it measured), ``bits``,
    ``<conv>_params``/``<conv>_ops``/``<conv>_score`` for both conventions, ``score_file`` and
    ``notes`` (what is missing or odd). A named run that does not exist raises :class:`MicronetError`.
    """
    root = Path(root) if root is not None else results_root()
    if names is None:
        names = run_names(root)
    elif isinstance(names, str):
        names = [names]
    rows = []
    for name in names:
        if not (root / name).is_dir():
            raise MicronetError(f"no results directory {root / name} (is the name right?)")
        rows.append(_collect_one(root / name))
    return rows


def _collect_one(run: Path) -> dict:
    notes: list[str] = []
    cfg = _read(run / "config.yaml", notes, yaml.safe_load)
    cfg = cfg if isinstance(cfg, dict) else {}
    lineage = cfg.get("lineage") if isinstance(cfg.get("lineage"), dict) else {}
    curve = read_training_curve(run / "train_results.csv")
    ckpts = _steps(run / "models", r"model-(\d+)\.pt") if (run / "models").is_dir() else []
    files = _steps(run, r"(?:eval|score)_step(\d+)\.json")
    step = (ckpts or files or [r["step"] for r in curve] or [None])[-1]
    row: dict[str, Any] = {
        "name": run.name, "path": str(run), "dataset": _dataset(run), "parent": lineage.get("parent"),
        "parent_step": lineage.get("parent_step"), "stage": lineage.get("stage"), "step": step,
        "planned": step is None, "n_cache": None, "val_ppl": None, "test_ppl": None, "val_source": None,
        "evals": [], "log_val_ppl": None, "log_val_condition": None, "bits": None, "score_file": None,
        **{f"{c}_{k}": None for c in CONVENTIONS for k in ("params", "ops", "score")},
    }
    if not (run / "config.yaml").exists():
        notes.append("no config.yaml")
    if step is None:
        notes.append("no checkpoint, train_results.csv, eval or score file yet")
    if curve and "val_ppl" in curve[-1]:
        row["log_val_ppl"], row["log_val_condition"] = curve[-1]["val_ppl"], validation_condition(run)
    if step is None:
        row["notes"] = notes
        return row
    row["evals"] = evals = _evals(run, step, notes)
    sc = _read(run / f"score_step{step}.json", notes, json.loads)
    if isinstance(sc, dict):
        row["score_file"] = str(run / f"score_step{step}.json")
        settings = sc.get("settings") or {}
        row["bits"], row["n_cache"] = settings.get("bits"), int(settings.get("n_cache") or 0)
        convs = sc.get("conventions") or {sc.get("convention", "paper"): sc}
        for c in CONVENTIONS:
            for k in ("params", "ops", "score"):
                row[f"{c}_{k}"] = (convs.get(c) or {}).get(k)
    elif not (run / f"score_step{step}.json").exists():
        notes.append(f"no score_step{step}.json")
    if row["n_cache"] is None and evals:
        row["n_cache"] = evals[-1]["n_cache"]
    ev = next((e for e in evals if e["n_cache"] == row["n_cache"]), None)
    if ev is not None:
        row["val_ppl"], row["test_ppl"], row["val_source"] = ev["val_ppl"], ev["test_ppl"], ev["file"]
    elif row["score_file"]:
        suffix = f"_n{row['n_cache']}" if row["n_cache"] else ""
        notes.append(f"no eval_step{step}{suffix}.json (the cache the score counts)")
    elif not evals and not list(run.glob(f"eval_step{step}*.json")):
        notes.append(f"no eval_step{step}.json")
    if row["val_ppl"] is None and row["n_cache"]:
        row["val_ppl"] = _searched_val(run, step, row["n_cache"], evals)
        if row["val_ppl"] is not None:
            row["val_source"] = f"cache_step{step}_n{row['n_cache']}.yaml"
    row["notes"] = notes
    return row


def read_config(run: str | os.PathLike) -> dict:
    """A run folder's ``config.yaml`` as a dict ({} when missing or unreadable)."""
    run = Path(run)
    try:
        cfg = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        return {}
    return cfg if isinstance(cfg, dict) else {}


def _ancestors(run: Path) -> list[tuple[Path, dict]]:
    """``run`` and its lineage parents (next to it), each with its config; stops at a loop or a gap."""
    chain, seen = [], set()
    while run.name not in seen:
        seen.add(run.name)
        cfg = read_config(run)
        chain.append((run, cfg))
        parent = (cfg.get("lineage") or {}).get("parent") if isinstance(cfg.get("lineage"), dict) else None
        if not parent or not (run.parent / parent).is_dir():
            break
        run = run.parent / parent
    return chain


def _dataset(run: Path) -> str | None:
    """The corpus a run was trained on: its own ``data.name``, else its nearest ancestor's."""
    for _, cfg in _ancestors(run):
        if isinstance(cfg.get("data"), dict) and cfg["data"].get("name"):
            return str(cfg["data"]["name"])
    return None


def dataset_label(name: str | None) -> str:
    """``wikitext-2`` -> ``WikiText-2``; None -> ``unknown dataset``."""
    return DATASET_NAMES.get(name, name) if name else "unknown dataset"


def validation_condition(run: str | os.PathLike) -> str:
    """What the training log's validation measured: ``full split`` or ``first N tokens``, and the cache
    (the training cache, which a derived run inherits from the run that trained it)."""
    chain = _ancestors(Path(run))
    n_tok = ((chain[0][1].get("train") or {}).get("val_tokens")) or 0
    n_cache = 0
    for _, cfg in chain:
        if isinstance(cfg.get("cache"), dict):
            n_cache = int(cfg["cache"].get("n_cache") or 0)
            break
    tokens = f"first {int(n_tok):,} tokens" if n_tok else "full split"
    return f"{tokens}, {f'training cache {n_cache}' if n_cache else 'no cache'}"


def token_offset(run: str | os.PathLike) -> float:
    """Training tokens a run's weights had seen before its own log starts: the parent's tokens at
    ``parent_step`` (recursively) for prune/quantize runs, 0 otherwise (a distilled student starts fresh)."""
    total = 0.0
    chain = _ancestors(Path(run))
    for (path, cfg), (parent, _) in zip(chain, chain[1:]):
        lin = cfg.get("lineage") or {}
        if lin.get("stage") not in WEIGHT_STAGES:
            break
        at = [r for r in read_training_curve(parent / "train_results.csv") if r["step"] == lin.get("parent_step")]
        total += at[0].get("tokens", 0.0) if at else 0.0
    return total


def pick_run(rows: Sequence[Mapping], name: str | None = None, convention: str = "paper") -> Mapping | None:
    """Row ``name``, else the scored run with the lowest ``convention`` score (None when nothing is scored)."""
    check_convention(convention)
    if name is not None:
        for r in rows:
            if r["name"] == name:
                return r
        raise MicronetError(f"run {name!r} is not among {[r['name'] for r in rows]}")
    key = f"{convention}_score"
    scored = [r for r in rows if r.get("score_file") and r.get(key) is not None]
    return min(scored, key=lambda r: r[key]) if scored else None


def check_convention(convention: str) -> None:
    """ValueError unless ``convention`` is one of :data:`CONVENTIONS`."""
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")


# ----------------------------------------------------------------------------- the table


def _ppl(x: float) -> str:
    return f"{x:,.2f}"


def _count(x: float) -> str:
    return f"{x:,.0f}"


def _figure(key: str, mark: str = ""):
    """Cell of a measured figure: the value, else ``missing`` on a scored row (the score counts a cache
    whose evaluation is absent), else None (``-``)."""
    def cell(r: Mapping) -> str | None:
        if r.get(key) is not None:
            return _ppl(r[key]) + (mark if key == "val_ppl" and str(r.get("val_source", "")).startswith("cache_")
                                   else "")
        return MISSING if r.get("score_file") else None
    return cell


def runs_table(rows: Sequence[Mapping], fmt: str = "markdown", convention: str = "paper",
               planned: bool = False) -> str:
    """One line per run: dataset, the evaluation cache, full-split val/test ppl at that cache, bits,
    params/ops/score of ``convention`` and the other convention's score, the training log's last
    validation with what it measured. Rows not run yet are left out unless ``planned``.
    """
    check_convention(convention)
    other = next(c for c in CONVENTIONS if c != convention)
    shown = [r for r in rows if planned or not r.get("planned")]
    cols = [
        ("name", "run", str), ("parent", "parent", str), ("step", "step", str),
        (lambda r: dataset_label(r.get("dataset")), "dataset", str),
        (lambda r: None if r.get("n_cache") is None else (r["n_cache"] or "none"), "eval cache", str),
        (_figure("val_ppl", "*"), "val ppl", str), (_figure("test_ppl"), "test ppl", str), ("bits", "bits", str),
        (f"{convention}_params", f"{convention} params", _count), (f"{convention}_ops", f"{convention} ops", _count),
        (f"{convention}_score", f"{convention} score", lambda x: f"{x:.6f}"),
        (f"{other}_score", f"{other} score", lambda x: f"{x:.6f}"),
        (lambda r: None if r.get("log_val_ppl") is None else f"{r['log_val_ppl']:,.2f} ({r['log_val_condition']})",
         "last training validation", str),
    ]
    table = format_table(shown, cols, fmt)
    notes = ["val ppl, test ppl: the full split, batch-1 online, with the eval cache of the row (none: no cache); "
             "the score counts the same cache."]
    if any(str(r.get("val_source", "")).startswith("cache_") for r in shown):
        notes.append("val ppl marked *: measured by the cache search (cache_step<S>_n<N>.yaml: full split, the "
                     "same cache and lambda/theta), the evaluation having skipped the valid split.")
    if any(MISSING in (_figure("val_ppl")(r), _figure("test_ppl")(r)) for r in shown):
        notes.append(f"{MISSING}: the run is scored but not evaluated with its cache "
                     "(python -m micronet.evaluate name=<run> n_cache=<N>).")
    if len(shown) < len(rows):
        notes.append(f"{len(rows) - len(shown)} planned run(s) not started are not shown (planned=True lists them).")
    return table + "\n\n" + "\n".join(notes if fmt == "text" else [f"- {n}" for n in notes])


def runs_notes(rows: Sequence[Mapping], planned: bool = False) -> str:
    """What is missing per run (one line each); runs not started are summed up in one line unless ``planned``."""
    lines = [f"{r['name']}: {'; '.join(r['notes'])}" for r in rows if r.get("notes") and (planned or not r["planned"])]
    waiting = [r["name"] for r in rows if r.get("planned")]
    if waiting and not planned:
        lines.append(f"not started ({len(waiting)}): {', '.join(waiting)}")
    return "\n".join(lines) or "nothing missing"
