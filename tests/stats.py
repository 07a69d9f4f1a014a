"""Statistics shared by the tests and `scripts/gpu_check.py` (no pytest needed)."""

from __future__ import annotations

from collections import Counter


def homogeneity_p_value(a: Counter, b: Counter) -> float:
    """Chi-square test that two samples come from one distribution; rare cells are pooled."""
    from scipy.stats import chi2_contingency  # here: the GPU check imports this module too

    keys = sorted(set(a) | set(b))
    common = [k for k in keys if a[k] + b[k] >= 10]
    rare = [k for k in keys if a[k] + b[k] < 10]
    table = [[a[k] for k in common], [b[k] for k in common]]
    if rare:
        table[0].append(sum(a[k] for k in rare))
        table[1].append(sum(b[k] for k in rare))
    return float(chi2_contingency(table).pvalue)
