"""The ProGrad paper's reference numbers (PROTOCOL.md section 7: RN50, mean over 3 seeds), keyed by method name.

Data only: the report adds these as "(paper)" rows where a sweep covers the paper's datasets. The other tables of the
paper (domain generalisation, base-to-new, cross-dataset, Tables 5 to 7) are compared by re-running them: their
numbers are not transcribed here.
"""

from __future__ import annotations

PAPER_DATASETS = (
    "ImageNet",
    "Caltech101",
    "OxfordPets",
    "StanfordCars",
    "OxfordFlowers",
    "Food101",
    "FGVCAircraft",
    "SUN397",
    "DescribableTextures",
    "EuroSAT",
    "UCF101",
)
PAPER_ZERO_SHOT = dict(
    zip(PAPER_DATASETS, (58.18, 86.29, 85.77, 55.61, 66.14, 77.31, 17.28, 58.52, 42.32, 37.56, 61.46), strict=True)
)
PAPER_SHOTS = (1, 2, 4, 8, 16)
PAPER_AVERAGE = {
    "zeroshot": dict.fromkeys(PAPER_SHOTS, 58.77),
    "zeroshot_ensemble": dict.fromkeys(PAPER_SHOTS, 59.38),
    "linear_probe": dict(zip(PAPER_SHOTS, (37.32, 48.02, 57.27, 64.88, 70.57), strict=True)),
    "coop": dict(zip(PAPER_SHOTS, (59.46, 62.37, 66.79, 70.04, 73.49), strict=True)),
    "prograd": dict(zip(PAPER_SHOTS, (62.61, 64.90, 68.45, 71.41, 74.28), strict=True)),
    "prograd_ensemble": dict(zip(PAPER_SHOTS, (63.06, 65.28, 68.71, 71.80, 75.03), strict=True)),
}
# The targets of the paper's domain generalisation setting (Table 2), by their registered dataset names; any other
# target of a transferred context is cross-dataset transfer (Table 4).
DOMAIN_SHIFT_TARGETS = ("ImageNetV2", "ImageNetSketch", "ImageNetA", "ImageNetR")
