"""The docs' evaluation numbers are the shipped reports' numbers (and the J-lens benchmark's), each with its
interval."""

from __future__ import annotations

import json
import re
from pathlib import Path

from docs_text import DOCS, joined, page, pages

from pyvene_patchscopes.evaluate import ON_BOTH_MODELS, SECOND_MODEL, TASKS, folder_name
from pyvene_patchscopes.evaluate.stats import RESAMPLES, Interval

ROOT = Path(__file__).resolve().parents[1]
REPORTS = ROOT / "reports"
INTERVAL = re.compile(r"(-?\d+\.\d+) \[(-?\d+\.\d+), (-?\d+\.\d+)\]")


def _sections() -> str:
    """The docs' evaluation pages: `patchscopes eval`, the Jacobian lens, the Jacobian Scopes faithfulness
    benchmark, and whether verify works."""
    scopes = page("guides/jacobian-scopes")
    return (
        page("guides/paper")
        + page("guides/jacobian-lens")
        + scopes[scopes.index("**Faithfulness**") :]
        + _verify_section()
    )


def _verify_section() -> str:
    text = page("guides/verify")
    start = text.index("## Does the test work?")
    end = text.find("\n## ", start + 1)
    return text[start : end if end >= 0 else None]


def _folders() -> list[Path]:
    names = [*TASKS, *[folder_name(task, SECOND_MODEL) for task in ON_BOTH_MODELS]]
    return [REPORTS / name for name in names]


def _walk(value):
    """Every dict and string inside a report.json value."""
    if isinstance(value, dict):
        yield value
        for item in value.values():
            yield from _walk(item)
    elif isinstance(value, list):
        for item in value:
            yield from _walk(item)
    elif isinstance(value, str):
        yield value


def _reported() -> tuple[set[tuple[float, float, float]], list[tuple[float, float, float]]]:
    """Every (estimate, low, high) the reports hold: as numbers (intervals, paired differences, held-out
    choices), and as the text of their tables and summaries (printed to 3 digits)."""
    numbers, printed = set(), []
    # the reports, and the J-lens benchmark's next-token table (docs/guides/jacobian-lens.md)
    for path in [*(folder / "report.json" for folder in _folders()), ROOT / "benchmarks" / "results" / "jlens.json"]:
        for item in _walk(json.loads(path.read_text())):
            if isinstance(item, dict) and {"estimate", "low", "high"} <= set(item):
                numbers.add((item["estimate"], item["low"], item["high"]))
            elif isinstance(item, str):
                printed += [tuple(float(v) for v in m.groups()) for m in INTERVAL.finditer(item)]
    return numbers, printed


def test_reports_hold_every_task_on_its_models_with_intervals():
    for folder in _folders():
        report = json.loads((folder / "report.json").read_text())
        intervals = report["data"]["intervals"]
        assert intervals, folder.name
        for name, value in intervals.items():
            interval = value.get("difference", value)
            if interval["n"]:
                assert interval["low"] <= interval["estimate"] <= interval["high"], (folder.name, name)
                assert interval["resamples"] == RESAMPLES >= 1000
    for task in ON_BOTH_MODELS:
        report = json.loads((REPORTS / folder_name(task, SECOND_MODEL) / "report.json").read_text())
        assert report["model"] == SECOND_MODEL and "split" in report["data"]


def test_every_interval_in_the_readme_comes_from_a_report():
    numbers, printed = _reported()
    shown = [
        (m.group(0), tuple(float(v) for v in m.groups()), len(m.group(1).split(".")[1]))
        for m in INTERVAL.finditer(_sections())
    ]
    assert len(shown) >= 40

    def found(triple: tuple[float, ...], digits: int) -> bool:
        if triple in {tuple(round(v, digits) for v in t) for t in numbers}:
            return True  # a 2-digit value on a page may round a table's 3-digit text: within half a unit
        return any(all(abs(a - b) <= 0.5 * 10**-digits + 1e-9 for a, b in zip(triple, t)) for t in printed)

    missing = [text for text, triple, digits in shown if not found(triple, digits)]
    assert not missing, f"docs intervals not found in reports/: {missing}"


def test_no_number_in_a_readme_evaluation_table_lacks_its_interval():
    bare = []
    for line in _sections().splitlines():
        if not line.startswith("|") or set(line) <= set("|-: "):
            continue
        for cell in line.strip("|").split("|"):
            text = INTERVAL.sub("", cell.replace("*", "")).strip()
            if re.fullmatch(r"[−-]?\d+\.\d+", text):
                bare.append(line)
    assert not bare, bare


def test_the_attribute_reports_hold_the_logit_lens_beside_the_probe_with_the_same_protocol():
    for folder in ("attributes", folder_name("attributes", SECOND_MODEL)):
        report = json.loads((REPORTS / folder / "report.json").read_text())
        data, layers, n = report["data"], report["settings"]["layers"], len(report["data"]["swept"])
        assert report["tables"][0]["columns"][-2:] == [
            "probe (3-fold CV), all known",
            "logit lens (top-1 token), all swept",
        ]
        assert sorted(map(int, data["logit_lens"])) == layers and {len(v) for v in data["logit_lens"].values()} == {n}
        mean = data["intervals"]["logit lens accuracy, mean over source layers (top-1 token), all swept"]
        assert mean["n"] == n
        assert abs(mean["estimate"] - sum(map(sum, data["logit_lens"].values())) / n / len(layers)) < 1e-12
        held, test = data["held_out"]["logit_lens"], data["split"]["test"]
        assert held["test"]["n"] == len(test) >= 10  # the same test split as the Patchscope's, big enough for a claim
        assert held["test"]["estimate"] == sum(data["logit_lens"][str(held["choice"])][k] for k in test) / len(test)
        l, _ = data["held_out"]["pair"]["choice"]
        versus = data["intervals"][f"Patchscope (chosen on dev) - logit lens at layer {l}, test split"]
        assert versus["test"] == "exact McNemar" and versus["difference"]["n"] == len(test)
        assert "warnings" not in report


def test_every_shipped_report_whose_intervals_rest_on_too_few_samples_says_so():
    """Every interval a report prints rests on stats.MIN_TEST samples or more, or the report carries the warning
    `Report.check_samples` gives (the stages report and the Jacobian report's Fisher agreement have fewer)."""
    import warnings

    from pyvene_patchscopes.evaluate.report import Report

    index = (REPORTS / "README.md").read_text()
    flagged = []
    for folder in _folders():
        shipped = Report.load(folder)
        checked = Report.load(folder)
        checked.warnings = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            checked.check_samples()
        assert shipped.warnings == checked.warnings, folder.name
        for warning in shipped.warnings:
            assert f"**Warning:** {warning}." in (folder / "report.md").read_text()
            assert f"- **Warning:** {warning}\n" in index
            flagged.append(folder.name)
    assert flagged == ["stages", "jacobian"]


def test_every_figure_of_the_benchmark_pages_is_its_results_file():
    """docs/reference/benchmarks.md, the explorer's and the scale search's timings: each figure is the number in
    benchmarks/results/ that its make target wrote, rounded as printed."""
    results = {path.stem: json.loads(path.read_text()) for path in (ROOT / "benchmarks" / "results").glob("*.json")}
    text = page("reference/benchmarks")
    gib = 2**30
    for work, row in zip(
        ("l\\* = l, 32 prompts (960 cells; a, b on all 960)", "30 x 30 grid, 2 prompts (1,800 cells; a, b on 150)"),
        results["cpu"]["results"],
    ):
        rate, agree = row["patchscopes_per_s"], row["top1_agreement"]["official_vs_engine"]
        assert (
            f"| {work} | {rate['official']:.1f} | {rate['pyvene']:.1f} | {rate['engine']:.0f} | "
            f"{row['c_over_a']:.0f} | {row['c_over_b']:.0f} | {row['peak_memory_bytes']['engine'] / gib:.2f} GiB | "
            f"{round(agree * row['baseline_pairs'])}/{row['baseline_pairs']} |"
        ) in text
    for name, runner in results["runners"]["runners"].items():
        assert (
            f"| {name} | {runner['cells_per_s']:.0f} | {runner['over_plain']:.1f} | "
            f"{runner['top1_agreement_with_shared_prefix']:.3f} |"
        ) in text
    host = results["host"]["ms_per_cell"]
    assert (
        f"host work fell from {host['before']['host']:.3f} ms to {host['after']['host']:.3f} ms per cell "
        f"(**{results['host']['host_speedup']}x**"
    ) in " ".join(text.split())
    names = {"smollm2-135m": "SmolLM2-135M", "gemma3-270m": "Gemma 3 270M"}
    in_memory = {(r["model"], r["prompts"]): r for r in results["memory"]["runs"] if r["mode"] == "memory+logits"}
    for run in (r for r in results["memory"]["runs"] if r["mode"] == "folder"):
        row = (
            f"| {names[run['model']]} | {run['prompts']:,} | {run['cells']:,} | {run['peak_rss_gib']:.2f} GiB | "
            f"{run['cells_per_s']:.0f} |"
        )
        memory = in_memory.get((run["model"], run["prompts"]))
        assert row + (f" {memory['peak_rss_gib']:.2f} GiB |" if memory else "") in text, row
    explore = results["explore"]
    assert f"takes **{explore['median_click_to_drawn']:.1f} s from click to drawn**" in joined(
        "guides/explorer"
    ) and f"of which the sweep itself is {explore['median_service']:.1f} s" in joined("guides/explorer")
    scales = results["scales"]
    assert (
        f"**{scales['batched_cells_per_s']} against {scales['hooks_cells_per_s']} cells/s, "
        f"{scales['per_latent_hooks_s'] / scales['batched_s']:.1f}x**"
    ) in joined("guides/vectors")
    check = results["verify"]
    for grid, cells, sweep_s, verify_s, share, rate in (
        ("l\\* = l", "cells", "sweep_s", "verify_s", "verify_over_sweep", "verify_cells_per_s"),
        ("l x l\\*", "full_grid_cells", "full_sweep_s", "full_verify_s", "full_verify_over_sweep", None),
    ):
        shown = f"{check[share]:.1f}" if rate else f"{check[share]:.2f}"
        last = f"{check[rate]:.1f}" if rate else f"{check['full_verify_cells_per_s']:.0f}"
        row = f"| {grid} | {check[cells]} | {check[sweep_s]:.2f} s | {check[verify_s]:.2f} s | {shown} | {last} |"
        assert row in text, row
    loop = f"**{check['speedup_over_loop']:.1f}x a loop of one hooked forward per text**"
    assert loop in text and loop in joined("guides/verify")
    assert check["max_d_difference_loop"] < 1e-4 and check["max_d_difference_plain"] < 1e-4
    flat = " ".join(text.split())
    assert f"({check['loop_cells_per_s']:.2f} cells/s) and {check['speedup_over_plain']:.1f}x its own" in flat
    assert f"agree on every D to {max(check['max_d_difference_loop'], check['max_d_difference_plain']):.0e}" in flat
    assert f"It still costs {check['verify_over_sweep']:.0f} times the sweep there" in flat
    assert f"verifying costs {check['full_verify_over_sweep']:.2f} times the sweep" in flat


def test_every_figure_the_docs_show_is_a_file_of_the_repository():
    """Each image and each link into reports/ or benchmarks/results/ names a file that is there."""
    for name in pages():
        for target in re.findall(r"\]\(([^)\s#]+)", page(name)):
            if target.startswith(("http", "mailto")) or target.endswith(".md") and "reports" not in target:
                continue
            base = ROOT if name == "README" else (DOCS / name).parent
            assert (base / target).exists(), (name, target)


VERIFY_REPORTS = {"verify": "SmolLM2-135M", folder_name("verify", SECOND_MODEL): "Gemma 3 270M"}


def _verify_reports() -> list[dict]:
    return [json.loads((REPORTS / folder / "report.json").read_text()) for folder in VERIFY_REPORTS]


def verify_tables() -> list[str]:
    """The rows of the two tables in docs/guides/verify.md's "Does the test work?", built from the two reports: each
    figure there is its report's, rounded to 2 digits."""

    def interval(report: dict, name: str) -> str:
        return Interval(**report["data"]["intervals"][name]).format(2)

    def both(report: dict, what: str) -> str:
        return " / ".join(interval(report, f"{kind} of {what}, test split") for kind in ("precision", "recall"))

    cells = {
        "readings: words × layers": lambda r: r["summary"]["words (one per prose text) x layers = readings"].replace(
            " x ", " × "
        ),
        "right readings (top-1 token = the word)": lambda r: str(
            r["summary"]["readings right (top-1 token = the source word)"]
        ),
        "verdicts: supported / not supported / cannot tell": lambda r: r["summary"][
            "verdicts supported / not supported / cannot tell"
        ],
        "**AUROC of the score for a right reading**": lambda r: (
            "**" + interval(r, "AUROC of the score for a right reading, all layers") + "**"
        ),
        "AUROC where the verdict is not *cannot tell*": lambda r: interval(
            r, "AUROC where the verdict is not 'cannot tell'"
        ),
        "dev / test words": lambda r: r["summary"]["dev / test words (seeded split)"],
        "precision / recall of *supported*, test split": lambda r: both(r, "'supported'"),
        "threshold chosen on dev (best F1)": lambda r: f"score ≥ {r['data']['threshold']:.2f}",
        "precision / recall of that threshold, test split": lambda r: both(r, "score >= threshold"),
        "**AUROC for a description that names the entity**": lambda r: (
            "**" + interval(r, "AUROC of the score for a description that names the entity") + "**"
        ),
        "descriptions naming the entity / scored": lambda r: " / ".join(
            r["summary"]["descriptions naming the entity / scored / all"].split(" / ")[:2]
        ),
    }
    reports = _verify_reports()
    rows = [f"| {label} | " + " | ".join(cell(r) for r in reports) + " |" for label, cell in cells.items()]
    layers = max(len(r["settings"]["layers"]) for r in reports)
    for layer in range(layers):
        row = [str(layer)]
        for r in reports:
            if layer in r["settings"]["layers"]:
                at = [m for m in r["data"]["readings"] if m["layer"] == layer]
                auroc = Interval(**r["data"]["per_layer"][str(layer)]).format(2)
                row += [f"{sum(m['right'] for m in at)} / {len(at)}", auroc]
            else:
                row += ["", ""]
        rows.append("| " + " | ".join(row) + " |")
    return rows


def test_the_verify_guide_states_both_reports_figures_and_the_evaluations_page_its_auroc():
    text = _verify_section()
    missing = [row for row in verify_tables() if row not in text]
    assert not missing, missing
    paper = joined("guides/paper")
    for report, name in zip(_verify_reports(), VERIFY_REPORTS.values()):
        figure = Interval(**report["data"]["intervals"]["AUROC of the score for a right reading, all layers"])
        assert f"{name}: AUROC {figure.format(2)}" in paper
        assert report["settings"]["words"] == 20 and report["settings"]["entities"] == 20  # the sizes the guide states
    smol, gemma = (round(report["seconds"]) for report in _verify_reports())
    assert f"take {smol} s on SmolLM2-135M and {gemma} s on Gemma 3 270M" in " ".join(text.split())
    minutes = re.search(r"in (\d+\.\d) min\.", (REPORTS / "README.md").read_text()).group(1)
    assert f"{minutes} minutes on this 2-core CPU" in paper  # eval all's time, verify on both models included


def test_the_verify_guides_counts_of_failures_are_the_reports():
    """The prose of "Does the test work?": the near misses called supported, the right readings it abstains on or
    rejects, the layers where every reading is wrong, and the entities behind the descriptions that name theirs."""
    text = " ".join(_verify_section().split())
    reports = _verify_reports()
    readings = [m for r in reports for m in r["data"]["readings"]]
    wrong_supported = sum(m["verdict"] == "supported" and not m["right"] for m in readings)
    assert f"Over all {len(readings)} readings, {wrong_supported} wrong ones were called *supported*" in text
    right = [m for m in readings if m["right"]]
    cannot, rejected = (sum(m["verdict"] == v for m in right) for v in ("cannot tell", "not supported"))
    assert f"{cannot} right readings get *cannot tell*, and {rejected} get *not supported*" in text
    onsets = []
    for r in reports:
        layers = r["settings"]["layers"]
        wrong_from = min(l for l in layers if not any(m["right"] for m in r["data"]["readings"] if m["layer"] >= l))
        onsets.append(f"from layer {wrong_from} of {len(layers)}")
    assert f"{onsets[0]} on SmolLM2 and {onsets[1]} on Gemma 3" in text
    smol = reports[0]["data"]
    lone = [m for m in smol["readings"] if m["right"] and m["layer"] in (16, 17)]
    word = smol["words"][lone[0]["word"]]["word"]
    assert {m["word"] for m in lone} == {lone[0]["word"]} and len(lone) == 2
    assert f"(`' {word}'`) scores {lone[0]['score']:.2f} and {lone[1]['score']:.2f}".replace("-", "−") in text
    naming = [
        {r["data"]["entities"]["names"][m["entity"]] for m in r["data"]["entities"]["descriptions"] if m["right"]}
        for r in reports
    ]
    assert f"from {len(naming[0])} and {len(naming[1])} entities" in text
    amazon = [
        m
        for m in smol["entities"]["descriptions"]
        if m["right"] and smol["entities"]["names"][m["entity"]] == "Amazon River"
    ]
    assert f"on SmolLM2 {len(amazon)} of the 36 are the Amazon River's" in text
