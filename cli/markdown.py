"""``--md``: a command's JSON document as Markdown tables, e.g. for a CI job summary.

Rendered from the same document ``--json`` prints, so the two can never disagree.
"""

from __future__ import annotations


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def gates(document: dict) -> str:
    """The gates table, or nothing when the command set no gate."""
    if "gates" not in document:
        return ""
    rows = [
        [g["metric"], f"{g['measured']:.4f}", f"{g['relation']} {g['threshold']:g} (`{g['option']}`)",
         f"{g['margin']:+.4f}", "pass" if g["passed"] else "**FAIL**"]
        for g in document["gates"]
    ]  # fmt: skip
    return "\n\n" + table(["gate", "measured", "required", "margin", "verdict"], rows)


def _ppl(result: dict) -> str:
    return f"{result['ppl']:.3f} ± {result['ppl_stderr']:.3f}"


def perplexity(document: dict) -> str:
    protocol = document["protocol"]
    where = (
        f"{document['text']['source']}, {document['result']['tokens_scored']} tokens scored, windows of "
        f"{protocol['seq_len']} (stride {protocol['stride']}), {document['dtype']} on {document['device']}"
    )
    rows = [[f"`{document['model']['label']}`", "model", _ppl(document["result"])]]
    ratio = ""
    if "baseline" in document:
        base = document["baseline"]
        role = "baseline (cached)" if base["cached"] else "baseline"
        rows.append([f"`{base['model']['label']}`", role, _ppl(base["result"])])
        ratio = f"\n\nperplexity ratio, model / baseline: **{document['ppl_ratio']:.4f}**"
    body = table(["model", "role", "perplexity"], rows)
    return f"**llmq eval ppl**: {where}\n\n{body}{ratio}{gates(document)}"


def kl_divergence(document: dict) -> str:
    r = document["result"]
    where = f"{document['text']['source']}, {r['tokens_scored']} tokens, windows of {document['protocol']['seq_len']}"
    row = [
        f"`{document['model']['label']}`", f"`{document['base']['label']}`", f"{r['kl_mean']:.4f}",
        f"{r['kl_median']:.4f}", f"{r['kl_p99']:.4f}", f"{100 * r['top1_agreement']:.2f}%",
        f"{r['ppl_model']:.3f} / {r['ppl_base']:.3f}",
    ]  # fmt: skip
    header = ["model", "base", "KL mean", "median", "p99", "top-1 agreement", "ppl model / base"]
    return f"**llmq eval kld**: {where}\n\n{table(header, [row])}{gates(document)}"
