"""The reference library's tutorial "Visualizing & Evaluating OoD Detection algorithms", on ood-lens.

Only two kinds of lines differ from the original: the imports point at ``ood_core`` and the data
lines load the bundled Fashion-MNIST model and data (offline) instead of the CIFAR10 hub assets.
Run: ``.venv/bin/python examples/seed_tutorial.py`` (about 30 s on 2 CPU cores).
"""

# These should be defined by your use-case
import torch

from ood_core.data import load_bundled  # was: from datasets import load_dataset
from ood_core.hub import load_model

calib_set = load_bundled("fashion_mnist", "calibration").subset(1000, seed=0)
calib_data, calib_labels = calib_set.images, calib_set.labels  # already floats in [0, 1]
sample_shape = calib_data.shape[1:]
net = load_model(
    "bundled", "tiniest"
)  # was: torch.hub.load("ThalesGroup/scio:hub", "tiniest", ...)
net = net.to(calib_data)

# 1. Configure algorithms to compare
from ood_core.recorder import Recorder  # noqa: E402

print(Recorder(net, input_data=calib_data[[0]]))  # Visualize layers
BLOCK3 = (1, 5)
FEATURE_MAPS = (1, 11)
LOGITS = (1, 12)

from ood_core.scores import KNN, GradNorm, Gram, Softmax  # noqa: E402

scores_and_layers = (  # type: ignore[var-annotated]
    (Softmax(), []),
    (GradNorm(), [LOGITS]),
    (Gram(), [BLOCK3, FEATURE_MAPS, LOGITS]),
    (KNN(k=int(len(calib_data) ** 0.4)), [FEATURE_MAPS]),
)

# 2. Prepare score functions
from ood_core.eval import fit_scores  # noqa: E402

scores_fit = fit_scores(scores_and_layers, net, calib_data, calib_labels)

# 3. Define InD and OoD scenarios
ind = load_bundled("fashion_mnist", "test").subset(1000, seed=1).images
oods_title = ("Vertical flip", "Darker", "Uniformly random")
torch.manual_seed(0)
oods = (ind.flip(2), ind * 0.5, torch.rand_like(ind))

# 4. Compute confidence scores on scenarios
from ood_core.eval import compute_confidence  # noqa: E402

confs_ind, confs_oods = compute_confidence(
    scores_fit,
    ind=ind,
    oods=oods,
    oods_title=oods_title,
)

# 5. Visualize the results
from matplotlib import rcParams  # noqa: E402

from ood_core.eval import summary_plot  # noqa: E402

rcParams["figure.figsize"] = (15, 9)  # Adjust tutorial layout (summary_plot honours it)
fig = summary_plot(
    confs_ind,
    confs_oods,
    scores_and_layers=scores_and_layers,
    oods_title=oods_title,
)

# 6. Define metrics to get quantified results
from ood_core.eval import AUC, TPR, compute_metrics, summary_table  # noqa: E402

metrics = (AUC(max_fpr=0.2), TPR(max_fpr=0.05))
evals = compute_metrics(confs_ind, confs_oods, metrics)
summary_table(
    evals,
    scores_and_layers=scores_and_layers,
    oods_title=oods_title,
    metrics=metrics,
)

# [Bonus] Profiling
for score, _ in scores_and_layers:
    score.timer.report  # Report execution times  # noqa: B018
    print("----")
