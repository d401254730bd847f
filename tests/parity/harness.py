"""Run the reference-parity cases through ``ood_core`` and compare with the reference's numbers.

Usage: ``python tests/parity/harness.py [KEY_PREFIX ...]`` prints one row per case
(min Spearman over the four sets, max |dAUROC| over the three OoD sets, seconds).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

HERE = Path(__file__).parent
SETS = ("ind", "vflip", "darker", "mnist")
MIN_SPEARMAN = 0.999
MAX_DAUROC = 0.002


def load_cases() -> list[dict]:
    return json.loads((HERE / "cases.json").read_text())["cases"]


def load_inputs() -> dict[str, torch.Tensor]:
    z = np.load(HERE / "inputs.npz")
    ind = torch.from_numpy(z["ind"])
    return {
        "calib": torch.from_numpy(z["calib"]),
        "calib_labels": torch.from_numpy(z["calib_labels"]).long(),
        "ind": ind,
        "vflip": ind.flip(2),
        "darker": ind * 0.5,
        "mnist": torch.from_numpy(z["mnist"]),
    }


def reference() -> dict[str, np.ndarray]:
    z = np.load(HERE / "reference_conformity.npz")
    return {k: z[k] for k in z.files}


def auroc(c_ind: np.ndarray, c_ood: np.ndarray) -> float:
    """OoD positive, higher conformity = more InD, ties counted half."""
    gt = (c_ind[:, None] > c_ood[None, :]).mean()
    eq = (c_ind[:, None] == c_ood[None, :]).mean()
    return float(gt + 0.5 * eq)


def run_case(
    net: torch.nn.Module, case: dict, inputs: dict[str, torch.Tensor], sets: tuple[str, ...] = SETS
) -> dict[str, np.ndarray]:
    """Our per-sample predicted-class conformity on each set (in the reference's order; a prefix
    of ``SETS``), built exactly as the reference."""
    from ood_core import scores
    from ood_core.engine import predicted_confidence
    from ood_core.recorder import Recorder

    rnet = Recorder(net, input_data=inputs["calib"][[0]])
    layers = [tuple(layer) for layer in case["layers"]]
    if layers:
        rnet.record(*layers)
    score = getattr(scores, case["score"])(**case["params"])
    score.fit(rnet, inputs["calib"], inputs["calib_labels"])
    out = {}
    for name in sets:
        logits, conf = score(inputs[name])
        out[name] = predicted_confidence(logits, conf).double().numpy()
    return out


def compare(case: dict, ours: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> dict:
    """Spearman per set and AUROC difference per OoD set, over the sets in ``ours``."""
    key = case["key"]
    sets = [s for s in SETS if s in ours]
    rho = {s: float(spearmanr(ours[s], ref[f"{key}_{s}"]).statistic) for s in sets}
    dauc = {
        s: auroc(ours["ind"], ours[s]) - auroc(ref[f"{key}_ind"], ref[f"{key}_{s}"])
        for s in sets[1:]
    }
    return {
        "key": key,
        "min_spearman": min(rho.values()),
        "max_abs_dauroc": max(abs(v) for v in dauc.values()),
        "spearman": rho,
        "dauroc": dauc,
    }


def main(prefixes: list[str]) -> int:
    from ood_core.hub import load_model

    torch.manual_seed(0)
    net = load_model("bundled", "tiniest")
    inputs, ref = load_inputs(), reference()
    bad = 0
    print(f"{'case':28s} {'min Spearman':>12s} {'max |dAUROC|':>12s} {'s':>6s}")
    for case in load_cases():
        if prefixes and not any(case["key"].startswith(p) for p in prefixes):
            continue
        t0 = time.perf_counter()
        try:
            row = compare(case, run_case(net, case, inputs), ref)
        except Exception as exc:  # noqa: BLE001 (a table row, not a crash)
            print(f"{case['key']:28s} ERROR {type(exc).__name__}: {exc}")
            bad += 1
            continue
        ok = row["min_spearman"] >= MIN_SPEARMAN and row["max_abs_dauroc"] <= MAX_DAUROC
        bad += not ok
        print(
            f"{row['key']:28s} {row['min_spearman']:12.5f} {row['max_abs_dauroc']:12.5f} "
            f"{time.perf_counter() - t0:6.1f} {'' if ok else 'FAIL'}",
            flush=True,
        )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
