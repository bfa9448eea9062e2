"""What a compression did and cost: :class:`CompressionReport`, its table and its chart."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from edgelm.optional import require

PERPLEXITY_METHOD = ("llama.cpp (edgelm.measure.evaluate) on a q8_0 GGUF of each model, 4 windows of 512 tokens, "
                     "second half of each window scored")


@dataclass
class CompressionReport:
    output: str
    source: str
    architecture: str  # config.json model_type
    layers_before: int
    layers_after: int
    dropped_layers: list[int]  # indices in the original model
    mlp_width_before: int
    mlp_width_after: int
    parameters_before: int
    parameters_after: int
    heal: str  # none | linear | distill
    choice: str  # how the layers were chosen
    scores: list[dict[str, Any]] = field(default_factory=list)  # per block: angular, kl, kl_healed, ce_increase
    estimated_speedup: float | None = None  # from the weights read per token
    budget: str | None = None
    distillation: dict[str, Any] | None = None  # steps, tokens, seconds, loss_first, loss_last, history
    # perplexity[text][model]: text "built-in" or the --eval-text file's name; model "original", "pruned"
    # (layers removed / MLPs narrowed, no healing) and "compressed" (the output)
    perplexity: dict[str, dict[str, float]] = field(default_factory=dict)
    perplexity_method: str = PERPLEXITY_METHOD
    tokens_per_second: dict[str, float] = field(default_factory=dict)  # decode, q8_0 GGUF, original / compressed
    gguf_q8_0_bytes: dict[str, int] = field(default_factory=dict)
    curve: list[dict[str, Any]] = field(default_factory=list)  # perplexity against layers removed (--plot)
    seconds: dict[str, float] = field(default_factory=dict)  # per stage, and "total"
    resumed: bool = False
    calibration: str = ""
    calibration_tokens: int = 0

    @property
    def speedup(self) -> float | None:
        t = self.tokens_per_second
        if t.get("original") and t.get("compressed"):
            return t["compressed"] / t["original"]
        return None

    def ppl_ratio(self, text: str = "built-in", model: str = "compressed") -> float | None:
        row = self.perplexity.get(text) or {}
        if row.get(model) and row.get("original"):
            return row[model] / row["original"]
        return None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["speedup"] = self.speedup
        data["ppl_ratio"] = {text: {m: self.ppl_ratio(text, m) for m in ("pruned", "compressed")}
                             for text in self.perplexity}
        return data

    def table(self) -> str:
        """The human-readable report (what `edgelm compress` prints)."""
        lines = [f"output        {self.output}  ({self.architecture})"]
        lines.append(f"layers        {self.layers_before} -> {self.layers_after}"
                     + (f"  (removed {', '.join(map(str, self.dropped_layers))}; {self.choice})"
                        if self.dropped_layers else ""))
        if self.mlp_width_after != self.mlp_width_before:
            lines.append(f"MLP width     {self.mlp_width_before} -> {self.mlp_width_after} "
                         f"({1 - self.mlp_width_after / self.mlp_width_before:.0%} of the neurons removed)")
        lines.append(f"parameters    {self.parameters_before / 1e6:.1f} M -> {self.parameters_after / 1e6:.1f} M "
                     f"({self.parameters_after / self.parameters_before:.2f}x)")
        heal = self.heal
        d = self.distillation
        if d:
            heal += (f": {d['tokens']:,} tokens in {d['seconds']:.0f} s, {d['steps']} steps, KL "
                     f"{d['loss_first']:.3f} -> {d['loss_last']:.3f}" if d.get("loss_first") is not None else "")
        lines.append(f"healing       {heal}" + (f" (budget {self.budget})" if self.budget else ""))
        lines.append(f"calibration   {self.calibration} ({self.calibration_tokens:,} tokens)")
        if self.perplexity:
            lines.append("perplexity    " + self.perplexity_method)
            lines.append(f"  {'text':24} {'original':>9} {'pruned':>16} {'compressed':>16}")
            for text, row in self.perplexity.items():
                cells = [f"{row.get('original', float('nan')):9.3f}"]
                for model in ("pruned", "compressed"):
                    r = self.ppl_ratio(text, model)
                    cells.append(f"{row[model]:8.3f} ({r:.2f}x)" if r else f"{'-':>16}")
                lines.append(f"  {text[:24]:24} " + " ".join(cells))
        if self.tokens_per_second:
            t = self.tokens_per_second
            size = self.gguf_q8_0_bytes
            lines.append(f"decode speed  {t.get('original', 0):.1f} -> {t.get('compressed', 0):.1f} tokens/s "
                         f"({self.speedup:.2f}x; q8_0 GGUF {size.get('original', 0) / 1e6:.1f} -> "
                         f"{size.get('compressed', 0) / 1e6:.1f} MB; each measured in its own process)")
        elif self.estimated_speedup:
            lines.append(f"decode speed  ~{self.estimated_speedup:.2f}x (estimated from the weights read per token)")
        if self.seconds:
            parts = ", ".join(f"{k} {v:.0f} s" for k, v in self.seconds.items() if k != "total")
            lines.append(f"time          {self.seconds.get('total', 0):.0f} s ({parts})"
                         + (" - resumed" if self.resumed else ""))
        if self.scores:
            chosen = set(self.dropped_layers)
            lines.append("layer scores  (angular distance in -> out; KL of the model without the block; the same after "
                         "least-squares healing; nats/token)")
            lines.append(f"  {'layer':>5} {'angular':>8} {'KL':>8} {'KL healed':>10}")
            for s in self.scores:
                mark = "  removed" if s["layer"] in chosen else ""
                lines.append(f"  {s['layer']:5d} {s['angular']:8.4f} {_f(s.get('kl')):>8} "
                             f"{_f(s.get('kl_healed')):>10}{mark}")
        return "\n".join(lines)


def _f(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def plot(report: CompressionReport, path: str) -> None:
    """Perplexity on the built-in text against layers removed (needs matplotlib: edgelm[bench])."""
    matplotlib = require("matplotlib", extra="bench", purpose="--plot (the curve of perplexity against layers removed)")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    curve = sorted(report.curve, key=lambda c: c["layers_removed"])
    if curve:
        ax.plot([c["layers_removed"] for c in curve], [c["perplexity"] for c in curve], "o-", color="#999999",
                label="removed, not healed (best-scored blocks first)")
    row = report.perplexity.get("built-in", {})
    n = len(report.dropped_layers)
    if row.get("compressed"):
        ax.plot([n], [row["compressed"]], "*", markersize=14, color="#c0392b",
                label=f"compressed, healed ({report.heal})")
    if row.get("original"):
        ax.axhline(row["original"], color="#4a7ebb", linestyle="--", linewidth=0.9, label="original")
        ax.axhline(row["original"] * 1.1, color="#4a7ebb", linestyle=":", linewidth=0.8, label="original x 1.10")
    width = ""
    if report.mlp_width_after != report.mlp_width_before:
        width = f", MLP width {report.mlp_width_after}/{report.mlp_width_before}"
    ax.set_xlabel(f"decoder blocks removed (of {report.layers_before}{width})")
    ax.set_ylabel("perplexity, built-in text (q8_0 GGUF)")
    ax.set_title("Compression: quality against depth removed")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
