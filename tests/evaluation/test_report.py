"""Report tables and plots: Table-12 columns, answer statistics, readable α labels."""

from __future__ import annotations

import itertools

import pytest

from tvtool.evaluation.report import markdown_table, place_labels, plot, series

# reports/toy: α = 0 and 0.1, and 0.8 and 1, lie almost on top of each other
TOY = [(0.0, 96.0, 19.58), (0.1, 96.0, 19.68), (0.2, 96.5, 19.815), (0.3, 97.0, 22.065), (0.4, 96.5, 32.13),
       (0.5, 95.5, 62.46), (0.6, 95.5, 76.055), (0.8, 96.5, 88.56), (1.0, 96.5, 90.6)]


def _overlap(a, b) -> bool:
    return min(a.x1, b.x1) > max(a.x0, b.x0) and min(a.y1, b.y1) > max(a.y0, b.y0)


@pytest.mark.parametrize("pts", [
    [(t, a) for _, a, t in TOY],
    [(10.0, 50.0), (10.2, 50.0), (10.4, 50.1), (10.1, 49.9), (30.0, 60.0)],  # a tight cluster
])
def test_labels_do_not_overlap(pts):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    ax.plot(*zip(*pts), "o-")
    texts = place_labels(ax, pts=pts, labels=[f"α={i / 10:g}" for i in range(len(pts))])
    rend = fig.canvas.get_renderer()
    from matplotlib.text import Text

    boxes = [Text.get_window_extent(t, rend) for t in texts]  # the text itself, not its leader line
    assert not [(i, j) for i, j in itertools.combinations(range(len(boxes)), 2) if _overlap(boxes[i], boxes[j])]
    px = ax.transData.transform(pts)
    assert not [(i, k) for i, b in enumerate(boxes) for k, (u, v) in enumerate(px) if b.contains(u, v)]
    plt.close(fig)


def test_table_12_columns_and_answer_statistics(tmp_path):
    rows = [{"label": "alpha-1", "alpha": 1.0, "accuracy": 90.0, "mean_tokens": 300.0, "n_samples": 4,
             "no_box_share": 25.0, "length_share": 0.0, "boxed_accuracy": 100.0, "reflections_mean": 1.5},
            {"label": "budget-20", "alpha": 1.0, "prompt_budget": 20, "accuracy": 80.0, "mean_tokens": 355.0,
             "n_samples": 4, "no_box_share": 50.0, "length_share": 25.0, "boxed_accuracy": 50.0,
             "reflections_mean": 0.25}]
    md = markdown_table(rows=rows).splitlines()
    assert md[0] == ("| run | α | tokens in prompt | accuracy % | mean #tokens | ACU | #truncated | #samples | no box % | "
                     "hit max % | acc. boxed % | reflections/resp. |")
    assert md[3] == "| budget-20 | 1 | 20 | 80.0 | 355.0 | – | – | 4 | 50.0 | 25.0 | 50.0 | 0.25 |"
    plain = markdown_table(rows=[{"label": "a", "alpha": 0.5, "accuracy": 1.0, "mean_tokens": 2.0}]).splitlines()
    assert plain[0] == "| run | α | accuracy % | mean #tokens | ACU | #truncated | #samples |"  # unfilled: left out
    assert plot(rows=rows, path=tmp_path / "p.png").stat().st_size > 1000


def test_operator_rows_get_method_columns_and_one_series_per_setting(tmp_path):
    """A sweep over several merge operators: method/params columns, one plot series per (method, params)."""
    from tvtool.merge.config import MergeConfig
    from tvtool.merge.options import config_name
    from tvtool.sweep.words import operator_rows

    configs = [MergeConfig(0.5), MergeConfig(1.0), MergeConfig(0.7, method="ties", density=0.2),
               MergeConfig(1.0, method="ties", density=0.2), MergeConfig(0.7, method="ties", density=0.5),
               MergeConfig(0.7, method="dare_linear", p=0.9),
               MergeConfig(0.7, method="breadcrumbs", beta=0.01, gamma=0.5)]
    rows = [{"label": config_name(c), "alpha": c.alpha, "accuracy": 90.0 + i, "mean_tokens": 20.0 + 10 * i}
            for i, c in enumerate(configs)]
    rows.append({"label": "budget-20", "alpha": 1.0, "prompt_budget": 20, "accuracy": 80.0, "mean_tokens": 50.0})
    (rows,) = operator_rows(tables={"toy": rows}, configs=configs).values()
    md = markdown_table(rows=rows).splitlines()
    assert md[0] == ("| run | method | params | α | tokens in prompt | accuracy % | mean #tokens | ACU | #truncated "
                     "| #samples |")
    assert md[2] == "| alpha-0.5 | task_arithmetic | – | 0.5 | – | 90.0 | 20.0 | – | – | – |"
    assert md[4] == "| ties-d0.2-alpha-0.7 | ties | density=0.2 | 0.7 | – | 92.0 | 40.0 | – | – | – |"
    assert md[7] == ("| dare_linear-p0.9-s0-alpha-0.7 | dare_linear | p=0.9 seed=0 | 0.7 | – | 95.0 | 70.0 | – | – "
                     "| – |")
    assert md[8].startswith("| breadcrumbs-b0.01-g0.5-alpha-0.7 | breadcrumbs | beta=0.01 gamma=0.5 | 0.7 |")
    assert md[9] == "| budget-20 | – | – | 1 | 20 | 80.0 | 50.0 | – | – | – |"  # not an operator run
    s = series(rows=rows)
    assert {k: [r["label"] for r in v] for k, v in s.items()} == {
        "task arithmetic": ["alpha-0.5", "alpha-1"], "ties density=0.2": ["ties-d0.2-alpha-0.7", "ties-d0.2-alpha-1"],
        "ties density=0.5": ["ties-d0.5-alpha-0.7"], "dare linear p=0.9 seed=0": ["dare_linear-p0.9-s0-alpha-0.7"],
        "breadcrumbs beta=0.01 gamma=0.5": ["breadcrumbs-b0.01-g0.5-alpha-0.7"]}
    assert list(series(rows=[{"label": "alpha-0", "alpha": 0.0}])) == ["α (task vector)"]  # a plain α sweep
    assert plot(rows=rows, path=tmp_path / "p.png").stat().st_size > 1000
