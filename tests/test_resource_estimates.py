"""Pre-flight resource estimates (issue #16, item 4): GradNorm's per-sample gradients, the
Mahalanobis covariances, Gram matrices and neighbour banks are estimated before any forward
pass, refused with the number and a shape-appropriate remedy, and readable without computing
(``BaseScore.resource_estimates`` / ``estimate_bytes``: the very numbers the checks use).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from torch import nn

from ood_core import budget
from ood_core.diagnostics import OodLensWarning
from ood_core.evaluation import Evaluation
from ood_core.scores import (
    KNN,
    DeepMahalanobis,
    GradNorm,
    Gram,
    MultiMahalanobis,
    RelativeMahalanobis,
    gradients,
    gram,
)
from ood_core.scores.mahalanobis import MAX_COVARIANCE_DIMS, SLOW_COVARIANCE_DIMS


class Big(nn.Module):
    """flatten -> small(64 -> 64) -> big(64 -> 4,096) -> relu -> fc(4,096 -> 3): ``big`` holds
    266,240 parameters, ~4.3 MB of per-sample gradients and copies per input."""

    def __init__(self) -> None:
        super().__init__()
        self.flat = nn.Flatten()
        self.small = nn.Linear(64, 64)
        self.big = nn.Linear(64, 4096)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(4096, 3)

    def forward(self, x):
        return self.fc(self.relu(self.big(self.small(self.flat(x)))))


class Tokens(nn.Module):
    """(N, 64) -> (N, 17, width) tokens."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.proj = nn.Linear(64, 17 * width)
        self.width = width

    def forward(self, x):
        return self.proj(x).view(len(x), 17, self.width)


class WideTokens(nn.Module):
    """flatten -> tokens (N, 17, width) -> mean over tokens -> fc (width -> 3)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.flat = nn.Flatten()
        self.tokens = Tokens(width)
        self.fc = nn.Linear(width, 3)

    def forward(self, x):
        return self.fc(self.tokens(self.flat(x)).mean(1))


class Conv(nn.Module):
    """conv(1 -> ch) -> relu -> avg-pool -> flatten -> fc(ch -> 3) on 8x8 images."""

    def __init__(self, ch: int = 8) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, ch, 3, padding=1)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flat = nn.Flatten()
        self.fc = nn.Linear(ch, 3)

    def forward(self, x):
        return self.fc(self.flat(self.pool(self.relu(self.conv(x)))))


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def layer(ev: Evaluation, name: str):
    return next(lid for lid in ev.recorder.layer_ids if ev.recorder.layer_name(lid) == name)


def fit_counting(net: nn.Module, score, names, n: int = 20, batch_size=None) -> list:
    """Fit ``score`` on ``n`` images on the layers named ``names``; the forward passes after
    tracing (a refusal before any pass leaves the list empty)."""
    x = images(n)
    ev = Evaluation.for_net(net, x)
    score.layers = tuple(layer(ev, name) for name in names)
    calls: list = []
    handle = net.register_forward_hook(lambda *a: calls.append(1))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", OodLensWarning)
            ev.fit([score], x, torch.arange(n) % 3, batch_size=batch_size)
    finally:
        handle.remove()
    return calls


@pytest.fixture(autouse=True)
def pinned_limit(monkeypatch):
    monkeypatch.setenv(budget.ENV_VAR, "4GB")


# ---------------------------------------------------------------------------- GradNorm
MEASURE = textwrap.dedent(
    """
    import json, torch
    from torch import nn
    from ood_core.recorder import Recorder
    from ood_core.scores import GradNorm
    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 128, 3, padding=1), nn.ReLU(),
        nn.Conv2d(128, 128, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(128, 10),
    ).eval()
    x = torch.rand(32, 3, 16, 16)
    rec = Recorder(net, input_data=x[:1])
    score = GradNorm()
    score.bind(rec, [(1, 5)])  # the last conv: 147,584 parameters, torch.func path
    estimate = score.estimate_bytes(rec, 32)
    def status(key):  # this process' own /proc figures (ru_maxrss would carry the parent's)
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    score.extract_own(rec, x[:1])  # warm-up: lazy initialisations, allocator pools
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM (peak RSS) := the current RSS
    base = status("VmRSS:")
    score.extract_own(rec, x)
    peak = status("VmHWM:")
    print(json.dumps({"estimate": estimate, "measured": peak - base}))
    """
)


def test_gradnorm_estimate_is_within_2x_above_the_measured_peak():
    """Peak RSS growth (``/proc/self/status`` VmHWM after resetting it) of a fresh process (CPU, float32, 32 inputs of 3 x 16 x 16, 147,584
    parameters): the estimate is within 0.8-2 x of it (measured: 1.12-1.24 x; 1.5-1.65 x on
    32 x 32 and 64 x 64 inputs; 1.08 x and 1.26 x for ResNet-18's layer4 at 32 and 224 px)."""
    out = subprocess.run(
        [sys.executable, "-c", MEASURE], capture_output=True, text=True, check=True, timeout=300
    )
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["measured"] > 32 * 147_584 * 4  # at least the gradients themselves
    ratio = got["estimate"] / got["measured"]
    assert 0.8 <= ratio <= 2.0, got


def test_gradnorm_on_a_big_layer_is_refused_before_any_forward_pass(monkeypatch):
    monkeypatch.setenv(budget.ENV_VAR, "3MB")
    net = Big().eval()
    ev = Evaluation.for_net(net, images(1))
    score = GradNorm()
    score.layers = (layer(ev, "big"),)
    per_input = gradients.per_sample_grad_bytes(
        266_240, 4, budget.forward_bytes_per_sample(ev.recorder)
    )
    assert score.estimate_bytes(ev.recorder, 500) == per_input  # one input at a time
    assert score.recorder_ is None  # the estimate leaves the score unbound
    calls: list = []
    with pytest.raises(budget.BudgetError) as info:
        calls = fit_counting(net, score, ["big"], n=500)
    assert calls == []
    assert str(info.value) == (
        "GradNorm(): the per-sample gradients w.r.t. the 266,240 parameters of 1-3 (big), 1 "
        f"input(s) at a time ({per_input / 1e6:.1f} MB per input) needs "
        f"~{budget.fmt_gb(per_input)} of memory but 0.003 GB are available "
        "(OOD_LENS_MEMORY_LIMIT); choose a layer with fewer parameters (e.g. the head 1-5, "
        "whose gradient has a closed form)."
    )
    head = GradNorm()  # the head's closed form needs nothing of its own
    assert head.estimate_bytes(ev.recorder, 500, [layer(ev, "fc")]) is None
    assert fit_counting(net, head, ["fc"], n=20) == [1]


def test_gradnorm_chunks_are_bounded_and_give_the_same_numbers(monkeypatch):
    net = Big().eval()
    x = images(20, 3)
    ev = Evaluation.for_net(net, x)
    score = GradNorm(grad_norm=2.0)
    score.layers = (layer(ev, "big"),)
    ((_, whole),) = ev.confidences([score], x, batch_size=20)
    chunk, per_input, n_params = score.grad_chunk(ev.recorder, 20)
    assert (chunk, n_params) == (20, 266_240)
    monkeypatch.setattr(gradients, "GRAD_BATCH_BYTES", 3 * per_input)  # 3 inputs per vmap
    assert score.grad_chunk(ev.recorder, 20)[0] == 3
    assert score.estimate_bytes(ev.recorder, 1000) == 3 * per_input  # not 1,000 x
    ((_, chunked),) = ev.confidences([score], x, batch_size=20)
    # the same per-sample gradients, up to the float32 rounding of batched products
    torch.testing.assert_close(chunked, whole, rtol=2e-5, atol=0)


# ---------------------------------------------------------------------------- covariances
def test_covariance_estimates_are_the_numbers_checked():
    net = Conv(16).eval()
    ev = Evaluation.for_net(net, images(1))
    conv = layer(ev, "conv")  # (N, 16, 8, 8): 1,024 flattened dims, 16 pooled
    n, d = 300, 1024
    assert DeepMahalanobis().estimate_bytes(ev.recorder, n, [conv]) == n * d * 8 + 4 * 8 * d * d
    assert RelativeMahalanobis().estimate_bytes(ev.recorder, n, [conv]) == (
        n * d * 8 + 5 * 8 * d * d
    )
    assert DeepMahalanobis(pooling="mean").estimate_bytes(ev.recorder, n, [conv]) == (
        n * 16 * 8 + 4 * 8 * 16 * 16
    )
    assert MultiMahalanobis().estimate_bytes(ev.recorder, n, [conv]) == n * 16 * 8 + 4 * 8 * 256
    need = DeepMahalanobis().resource_estimates(ev.recorder, n, [conv]).peak
    assert need.what == (
        "DeepMahalanobis() @ 1-1: 300 x 1,024 calibration features and their 1,024 x 1,024 "
        "covariance"
    )
    assert need.remedy == (
        "use pooling='mean' (fewer dims), a smaller layer or fewer calibration samples"
    )
    limit = need.n_bytes - 1
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(budget.ENV_VAR, str(int(limit)))
        assert budget.Estimates(needs=[need]).over_limit() == [need]
        with pytest.raises(budget.BudgetError, match=r"1,024 x 1,024 covariance needs ~0\.0"):
            fit_counting(net, DeepMahalanobis(), ["conv"], n=n)


def test_a_token_covariance_beyond_the_dims_cap_is_refused_whatever_the_memory(monkeypatch):
    monkeypatch.setenv(budget.ENV_VAR, "off")
    width = 1200  # 17 x 1,200 = 20,400 flattened dims > MAX_COVARIANCE_DIMS
    assert 17 * width > MAX_COVARIANCE_DIMS
    net = WideTokens(width).eval()
    calls: list = []
    with pytest.raises(ValueError) as info:
        calls = fit_counting(net, DeepMahalanobis(), ["tokens"], n=10)
    assert calls == []
    assert str(info.value) == (
        "DeepMahalanobis() @ 1-2: the output (N, 17, 1200) gives 20,400 feature dims "
        "(pooling='flatten'); a covariance of more than MAX_COVARIANCE_DIMS = 20,000 dims is "
        "refused whatever the memory: it is singular below 20,400 calibration samples and its "
        "O(D^3) inverse / eigendecomposition takes hours on a CPU (about 1 min at 4,000 dims); "
        "use pooling='cls' or pooling='mean' (over tokens, fewer dims) or a smaller layer."
    )
    ev = Evaluation.for_net(net, images(1))
    tokens = layer(ev, "tokens")
    with pytest.raises(ValueError, match="MAX_COVARIANCE_DIMS"):  # what the dashboard shows
        MultiMahalanobis(pooling="flatten").resource_estimates(ev.recorder, 10, [tokens])
    # mean over the tokens: 1,200 dims, nothing to say
    est = MultiMahalanobis().resource_estimates(ev.recorder, 10, [tokens])
    assert est.peak.n_bytes == 10 * 1200 * 8 + 4 * 8 * 1200**2 and est.notes == []


def test_a_slow_covariance_is_warned_about_before_any_pass():
    width = 600  # 10,200 dims: above SLOW_COVARIANCE_DIMS, below the cap
    assert SLOW_COVARIANCE_DIMS < 17 * width < MAX_COVARIANCE_DIMS
    net = WideTokens(width).eval()
    ev = Evaluation.for_net(net, images(1))
    est = DeepMahalanobis().resource_estimates(ev.recorder, 10, [layer(ev, "tokens")])
    assert est.notes == [
        "DeepMahalanobis @ 1-2: the output (N, 17, 600) gives 10,200 feature dims "
        "(pooling='flatten'): the 10,200 x 10,200 covariance's O(D^3) inverse / "
        "eigendecomposition takes minutes to hours on a CPU (about 1 min at 4,000 dims, x8 per "
        "doubling): use pooling='cls' or pooling='mean' (over tokens, fewer dims) or a smaller "
        "layer"
    ]
    assert est.peak.n_bytes == 10 * 10_200 * 8 + 4 * 8 * 10_200**2  # ~3.3 GB


# ---------------------------------------------------------------------------- Gram, banks
def test_gram_matrices_are_chunked_and_checked_before_any_pass(monkeypatch):
    net = Conv(32).eval()
    x = images(24, 4)
    ev = Evaluation.for_net(net, x)
    score = Gram(max_gram_order=3, calib_labels="true")
    score.layers = (layer(ev, "conv"),)
    ev.fit([score], x, torch.arange(24) % 3)
    ((_, whole),) = ev.confidences([score], images(10, 5))
    monkeypatch.setattr(gram, "GRAM_BATCH_BYTES", 3 * 32 * 32 * 4 * 4)  # 4 samples at a time
    ((_, chunked),) = ev.confidences([score], images(10, 5))
    torch.testing.assert_close(chunked, whole, rtol=1e-12, atol=0)
    needs = score.resource_estimates(ev.recorder, 24).needs
    assert needs[0].what == "Gram @ 1-1: the (4, 32, 32) Gram matrices of 4 sample(s) at a time"
    assert needs[0].n_bytes == 4 * 3 * 32 * 32 * 4
    monkeypatch.setenv(budget.ENV_VAR, "10kB")  # one sample's 3 x 32 x 32 float32: 12 kB
    with pytest.raises(budget.BudgetError, match=r"\(1, 32, 32\) Gram matrices of 1 sample"):
        assert fit_counting(net, Gram(max_gram_order=3), ["conv"]) == []


def test_knn_bank_estimate_uses_the_pooled_dims():
    net = Conv(16).eval()
    ev = Evaluation.for_net(net, images(1))
    conv = layer(ev, "conv")
    assert KNN(k=5).estimate_bytes(ev.recorder, 1000, [conv]) == 4 * 1000 * 1024 * 2
    assert KNN(k=5, pooling="mean").estimate_bytes(ev.recorder, 1000, [conv]) == 4 * 1000 * 16 * 2
    with pytest.raises(ValueError, match=r"k=5 neighbours but only 3 calibration samples"):
        KNN(k=5).resource_estimates(ev.recorder, 3, [conv])


def test_estimating_records_instead_of_refusing():
    with budget.estimating() as est:
        budget.check_budget("a test", 1e30, "do less")
    assert est.needs == [budget.Need("a test", 1e30, "do less", None)]
    assert est.peak is est.needs[0] and est.over_limit() == est.needs
    with pytest.raises(budget.BudgetError):
        budget.check_budget("a test", 1e30, "do less")  # outside: checked again


# ---------------------------------------------------------------------------- the dashboard
def test_dashboard_messages_show_large_and_refused_estimates(monkeypatch):
    from ood_lens_app.estimates import estimate_messages, estimate_score

    rec = Evaluation.for_net(Conv(16).eval(), images(1)).recorder
    small = estimate_score("KNN", {"k": 5}, [["1-1"]], rec, 1000)  # 8.2 MB: nothing said
    assert small.n_bytes == 4 * 1000 * 1024 * 2 and estimate_messages(small) == []
    big = estimate_score("DeepMahalanobis", {}, [["1-1"]], rec, 1000)
    assert big.n_bytes == 1000 * 1024 * 8 + 4 * 8 * 1024**2  # 42 MB: still quiet
    assert estimate_messages(big) == []
    wide = Evaluation.for_net(WideTokens(300).eval(), images(1)).recorder  # 5,100 dims
    est = estimate_score("DeepMahalanobis", {}, [["1-2"]], wide, 1000)
    assert estimate_messages(est) == [
        (
            "caption",
            "≈ 0.87 GB for 1,000 calibration samples (DeepMahalanobis() @ 1-2: 1,000 x 5,100 "
            "calibration features and their 5,100 x 5,100 covariance)",
        )
    ]
    monkeypatch.setenv(budget.ENV_VAR, "500MB")
    ((kind, text),) = estimate_messages(
        estimate_score("DeepMahalanobis", {}, [["1-2"]], wide, 1000)
    )
    assert kind == "warning" and text.endswith(
        "more than the 0.5 GB available (OOD_LENS_MEMORY_LIMIT), so Run will refuse it; use "
        "pooling='cls' or pooling='mean' (over tokens, fewer dims), a smaller layer or fewer "
        "calibration samples."
    )
    ((kind, text),) = estimate_messages(
        estimate_score("KNN", {"k": 5, "pooling": "cls"}, [["1-1"]], rec, 9)
    )
    assert kind == "error" and text.startswith(
        "Run will refuse this choice: KNN(k=5, pooling='cls'): pooling='cls' takes token 0"
    )
    sweep = estimate_score("KNN", {"k": 5}, [["1-1"], ["1-5"]], rec, 1000)  # the larger layer
    assert sweep.n_bytes == 4 * 1000 * 1024 * 2


def test_scores_page_shows_the_estimate_before_run():
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file("../app.py", default_timeout=180)
    at.session_state["w.scores"] = ["DeepMahalanobis"]
    at.session_state["w.n_cal"] = 1000
    at.session_state["w.L.DeepMahalanobis"] = ["1-5"]  # tiniest's block (48, 14, 14): 9,408 dims
    at.run()  # once before switching (AppTest's rule)
    at.switch_page("views/scores.py").run()
    assert not at.exception
    assert [c.value for c in at.caption if c.value.startswith("≈")] == [
        "≈ 2.91 GB for 1,000 calibration samples (DeepMahalanobis() @ 1-5: 1,000 x 9,408 "
        "calibration features and their 9,408 x 9,408 covariance)"
    ]
    assert any("9,408 feature dims" in w.value and "pooling='mean'" in w.value for w in at.warning)


def test_a_choice_the_fit_would_refuse_keeps_run_disabled():
    """The refusal is a problem of the score (shown beside it, Run disabled) before any pass."""
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file("../app.py", default_timeout=180)
    at.session_state["w.scores"] = ["KNN"]
    at.session_state["w.p.KNN.k"] = 5
    at.session_state["w.p.KNN.pooling"] = "cls"  # tiniest has no (N, L, D) token layer
    at.session_state["w.L.KNN"] = ["1-11"]
    at.run()  # once before switching (AppTest's rule)
    at.switch_page("views/scores.py").run()
    assert not at.exception
    errors = [e.value for e in at.error]
    assert any("Run will refuse this choice" in e and "pooling='cls'" in e for e in errors), errors
    assert at.button(key="run").disabled
    at.session_state["w.p.KNN.pooling"] = "flatten"
    at.run()
    assert not at.exception and not at.button(key="run").disabled
