"""Decode speed of optimum-onnx exports run by edgelm's session loop, against optimum's own ORTModelForCausalLM on the
same files and against onnxruntime-genai's builder export of the same model, all measured in this run.

From one Hugging Face checkpoint (default: SmolLM2-135M-Instruct, derived by tests/hf_fixtures.py):
  * optimum fp32: ``convert_to_onnx(..., "fp32", exporter="optimum")``; optimum int4: that folder quantized with
    MatMulNBits (round to nearest; GPTQ changes the values, not the speed);
  * builder int4: ``convert_to_onnx(..., "int4", exporter="genai", algo="default")``;
  * optimum-cli fp32: optimum-onnx's export as it writes it (``optimum_onnx.export``: what ``optimum-cli export onnx``
    gives a user), without edgelm's graph rewrites (GroupQueryAttention, folded shapes).
Engines, each given the same threads and the same greedy prompt, N tokens generated whatever they are:
  * edgelm: ``edgelm.load(folder)`` -> the backend's own generator (optimum folders: runtimes/onnx_session.py; builder
    folders: onnxruntime-genai's Generator);
  * optimum: ``ORTModelForCausalLM.from_pretrained(folder).generate(...)`` in a child process with optimum-onnx's own
    environment (``edgelm install-converter --optimum``), on the very same files (edgelm's rewritten graphs: they
    make ORTModelForCausalLM faster too), and on optimum-cli's own fp32 export;
  * numpy loop: a plain ``InferenceSession.run`` loop feeding the cache back as numpy arrays (no I/O binding).
Decode tok/s = (N - 1) / (time for N tokens - time for 1 token), both from a fresh cache; runs alternate and medians
are reported.  Goals: edgelm / optimum >= 2.0 (fp32 and int4); edgelm optimum int4 / builder int4 >= 0.9.
An fp32 decode step reads every weight once (540 MB for SmolLM2), so on a CPU it is bound by memory bandwidth, which
both runtimes share on the same files: the benchmark times one MatMul reading as many fp32 bytes (the floor of a
step on this machine), and prints how far edgelm's fp32 step is above it and the largest edgelm / optimum fp32
ratio that floor allows; the fp32 ratio is also printed against optimum-cli's own export.

Usage: python benchmarks/bench_optimum.py [HF_CHECKPOINT_DIR] [--runs 5] [--tokens 64] [--threads N] [--keep DIR]
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import edgelm
from edgelm.converters.onnx import optimum as optimum_onnx
from edgelm.converters.onnx import convert_to_onnx
from edgelm.converters.onnx.options import OnnxOptions
from edgelm.platforms import default_threads
from checkpoints import default_checkpoint  # benchmarks/checkpoints.py

PROMPT = "<|im_start|>user\nWrite a long story about a robot who learns to paint.<|im_end|>\n<|im_start|>assistant\n"

# runs in optimum-onnx's own environment (transformers 4.57): for each line "run" on stdin, time generate() for 1 and
# for N new tokens and print the result, so the parent can alternate it with the in-process engines
OPTIMUM_CHILD = """
import json, sys, time
import onnxruntime as ort, torch
from optimum.onnxruntime import ORTModelForCausalLM
folder, threads, n, ids = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4])
so = ort.SessionOptions(); so.intra_op_num_threads = threads; so.inter_op_num_threads = 1
model = ORTModelForCausalLM.from_pretrained(folder, file_name="model.onnx", session_options=so, use_cache=True,
                                            provider="CPUExecutionProvider")
x = torch.tensor([ids])
def gen(k):
    t = time.perf_counter()
    out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=k, min_new_tokens=k, do_sample=False,
                         pad_token_id=0)
    return time.perf_counter() - t, out[0, len(ids):].tolist()
gen(2)
print("READY", flush=True)
for line in sys.stdin:
    one, _ = gen(1)
    full, toks = gen(n)
    print("RUN", json.dumps({"one": one, "full": full, "tokens": toks}), flush=True)
"""


class Edgelm:
    def __init__(self, folder: Path, threads: int, ids: list[int], n: int) -> None:
        self.m = edgelm.load(folder, threads=threads, n_ctx=len(ids) + n + 8)
        self.ids, self.n = ids, n
        self.gen(2)

    def gen(self, k: int) -> tuple[float, list[int]]:
        b = self.m.backend
        b.reset_cache()
        t = time.perf_counter()
        source = b.generate(b.sequences[0], self.ids, self.m.params(temperature=0))
        toks = list(itertools.islice(source, k))
        source.close()
        return time.perf_counter() - t, toks

    def run(self) -> dict:
        one, _ = self.gen(1)
        full, toks = self.gen(self.n)
        return {"one": one, "full": full, "tokens": toks}


class NumpyLoop:
    """A plain greedy loop over InferenceSession.run, the cache fed back as numpy arrays (what most scripts do)."""

    def __init__(self, folder: Path, threads: int, ids: list[int], n: int) -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
        self.s = ort.InferenceSession(str(folder / "model.onnx"), so, providers=["CPUExecutionProvider"])
        self.past = [i for i in self.s.get_inputs() if i.name.startswith("past_key_values")]
        self.names = {i.name for i in self.s.get_inputs()}
        self.ids, self.n = ids, n
        self.gen(2)

    def gen(self, k: int) -> tuple[float, list[int]]:
        t = time.perf_counter()
        cache = {i.name: np.zeros([1] + [0 if isinstance(d, str) else d for d in i.shape[1:]], np.float32)
                 for i in self.past}
        toks, feed_ids, n = [], self.ids, 0
        out_names = ["logits"] + ["present" + i.name[len("past_key_values"):] for i in self.past]
        while len(toks) < k:
            s = len(feed_ids)
            feed = {"input_ids": np.array([feed_ids], np.int64), **cache}
            if "attention_mask" in self.names:
                feed["attention_mask"] = np.ones((1, n + s), np.int64)
            if "position_ids" in self.names:
                feed["position_ids"] = np.arange(n, n + s, dtype=np.int64)[None]
            logits, *present = self.s.run(out_names, feed)
            cache = {i.name: p for i, p in zip(self.past, present)}
            n += s
            toks.append(int(logits[0, -1].argmax()))
            feed_ids = toks[-1:]
        return time.perf_counter() - t, toks

    def run(self) -> dict:
        one, _ = self.gen(1)
        full, toks = self.gen(self.n)
        return {"one": one, "full": full, "tokens": toks}


class Optimum:
    """ORTModelForCausalLM in a child process with optimum-onnx's environment, one run per request."""

    def __init__(self, folder: Path, threads: int, ids: list[int], n: int) -> None:
        home = optimum_onnx.find_optimum()
        if home is None:
            sys.exit(f"optimum-onnx is not installed: run `{optimum_onnx.INSTALL_COMMAND}`.")
        self.folder = folder
        self.proc = subprocess.Popen([sys.executable, "-c", OPTIMUM_CHILD, str(folder), str(threads), str(n),
                                      json.dumps(ids)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True, env=optimum_onnx.optimum_env(home))
        self._expect("READY")

    def _expect(self, word: str) -> str:
        for line in self.proc.stdout:
            if line.startswith(word):
                return line
        sys.exit(f"ORTModelForCausalLM failed on {self.folder} (exit code {self.proc.wait()}).")

    def run(self) -> dict:
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        return json.loads(self._expect("RUN ")[4:])

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


class WeightRead:
    """The floor of an fp32 decode step on this machine: onnxruntime reading as many fp32 weight bytes as one step
    does (every MatMul weight once), as one [1, 576] x [576, N] MatMul; alternated with the engines like them."""

    def __init__(self, model_file: Path, threads: int) -> None:
        import onnx
        import onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper

        proto = onnx.load(str(model_file), load_external_data=False)
        sizes = {t.name: int(np.prod(t.dims)) for t in proto.graph.initializer}
        self.nbytes = 4 * sum(sizes.get(n.input[1], 0) for n in proto.graph.node if n.op_type in ("MatMul", "Gemm"))
        k = 576
        w = np.random.default_rng(0).random((k, max(1, self.nbytes // (4 * k))), dtype=np.float32)
        graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "read",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, w.shape[1]])],
                                  [numpy_helper.from_array(w, "w")])
        del w
        with tempfile.TemporaryDirectory() as tmp:
            onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), f"{tmp}/m.onnx",
                            save_as_external_data=True, location="m.data")
            so = ort.SessionOptions()
            so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
            self.session = ort.InferenceSession(f"{tmp}/m.onnx", so, providers=["CPUExecutionProvider"])
        self.x = np.ones((1, k), np.float32)
        self.run()

    def run(self, steps: int = 8) -> dict:
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            self.session.run(None, {"x": self.x})
            times.append(time.perf_counter() - t)
        return {"ms": 1000 * statistics.median(times)}


def decode_rate(r: dict, n: int) -> float:
    return (n - 1) / max(r["full"] - r["one"], 1e-9)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", nargs="?", type=Path)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=default_threads())
    ap.add_argument("--keep", type=Path, help="keep (and reuse) the exported folders here")
    ap.add_argument("--skip-optimum", action="store_true", help="do not run ORTModelForCausalLM")
    args = ap.parse_args()
    src = args.checkpoint or default_checkpoint()
    work = args.keep or Path(tempfile.mkdtemp(prefix="bench-optimum-"))
    work.mkdir(parents=True, exist_ok=True)
    folders = {"optimum fp32": work / "optimum-fp32", "optimum int4": work / "optimum-int4",
               "builder int4": work / "builder-int4"}
    t0 = time.perf_counter()
    if not folders["optimum fp32"].exists():
        convert_to_onnx(src, folders["optimum fp32"], "fp32", exporter="optimum")
    if not folders["optimum int4"].exists():
        optimum_onnx.quantize_folder(folders["optimum fp32"], folders["optimum int4"], "int4",
                                     OnnxOptions(exporter="optimum", algo="default"))
    if not folders["builder int4"].exists():
        convert_to_onnx(src, folders["builder int4"], "int4", exporter="genai", algo="default")
    cli = work / "optimum-cli-fp32"
    if not args.skip_optimum and not (cli / "model.onnx").is_file():
        shutil.rmtree(cli, ignore_errors=True)
        optimum_onnx.export(src, cli, json.loads((src / "config.json").read_text(encoding="utf-8")))
    print(f"# exports ready in {time.perf_counter() - t0:.0f} s ({work})", file=sys.stderr)

    with edgelm.load(folders["optimum int4"], threads=1) as m:
        ids = m.tokenize(PROMPT, add_special=False, parse_special=True)
    n, threads = args.tokens, args.threads
    results: dict[str, list[dict]] = {}
    engines: dict[str, object] = {}
    if not args.skip_optimum:
        for name in ("optimum fp32", "optimum int4"):
            engines[f"ORTModelForCausalLM {name}"] = Optimum(folders[name], threads, ids, n)
        engines["ORTModelForCausalLM optimum-cli fp32"] = Optimum(cli, threads, ids, n)
    engines.update({f"edgelm {name}": Edgelm(folder, threads, ids, n) for name, folder in folders.items()})
    engines["numpy loop optimum int4"] = NumpyLoop(folders["optimum int4"], threads, ids, n)
    floor = engines["fp32 weights read once"] = WeightRead(folders["optimum fp32"] / "model.onnx", threads)
    for _ in range(args.runs):  # alternate the engines (the children wait between their runs)
        for name, engine in engines.items():
            results.setdefault(name, []).append(engine.run())
    for engine in engines.values():
        if isinstance(engine, Optimum):
            engine.close()
    read_ms = statistics.median(r["ms"] for r in results.pop("fp32 weights read once"))
    rates = {name: statistics.median(decode_rate(r, n) for r in runs) for name, runs in results.items()}
    prompt_ms = {name: 1000 * statistics.median(r["one"] for r in runs) for name, runs in results.items()}
    report = {"checkpoint": str(src), "threads": threads, "tokens": n, "prompt_tokens": len(ids), "runs": args.runs,
              "decode_tokens_per_second": {k: round(v, 1) for k, v in rates.items()},
              "first_token_ms": {k: round(v, 1) for k, v in prompt_ms.items()}, "ratios": {}}
    for q in ("fp32", "int4"):
        ref = rates.get(f"ORTModelForCausalLM optimum {q}")
        if ref:
            report["ratios"][f"edgelm / ORTModelForCausalLM, optimum {q} (goal >= 2.0)"] = \
                round(rates[f"edgelm optimum {q}"] / ref, 2)
    if "ORTModelForCausalLM optimum-cli fp32" in rates:
        report["ratios"]["edgelm optimum fp32 / ORTModelForCausalLM on optimum-cli's own fp32 export"] = \
            round(rates["edgelm optimum fp32"] / rates["ORTModelForCausalLM optimum-cli fp32"], 2)
    report["ratios"]["edgelm optimum int4 / edgelm builder int4 (goal >= 0.9)"] = \
        round(rates["edgelm optimum int4"] / rates["edgelm builder int4"], 2)
    report["ratios"]["edgelm optimum int4 / numpy loop"] = round(rates["edgelm optimum int4"] /
                                                                 rates["numpy loop optimum int4"], 2)
    report[f"fp32 MatMul weights ({floor.nbytes / 1e6:.0f} MB) read once, ms (the floor of an fp32 step)"] = \
        round(read_ms, 1)
    report["ratios"]["edgelm optimum fp32 step / that floor"] = round(1000 / rates["edgelm optimum fp32"] / read_ms, 2)
    if "ORTModelForCausalLM optimum fp32" in rates:
        report["ratios"]["largest edgelm / ORTModelForCausalLM fp32 the floor allows"] = \
            round(1000 / rates["ORTModelForCausalLM optimum fp32"] / read_ms, 2)
    same = {name: runs[-1]["tokens"] == results["edgelm optimum fp32"][-1]["tokens"]
            for name, runs in results.items() if "fp32" in name}
    report["fp32 tokens equal edgelm's"] = same
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
