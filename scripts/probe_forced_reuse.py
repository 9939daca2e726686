"""Probe for the region cache: every tile reused on fixed refinement steps (no predictor) under the
every-step shifted grid, from the last canvas prediction; PSNR of decoded frames against the uncached
default. Patterns are a JSON object name -> list of refinement step indices.

    python scripts/probe_forced_reuse.py 96 4 '{"odd": [3, 5, 7, 9, 11, 13, 15]}'
"""
import sys, time, json
import numpy as np, torch
ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT)); sys.path.insert(0, str(ROOT / "scripts"))
from supergen import SuperGenPipeline, TilingConfig
from supergen.metrics import psnr
from supergen.samplers import tiled as T
from bench_cache import bench_prompts, mean_psnr

class Forced:
    reuse_mode = "output"
    def __init__(self, steps): self.steps = set(steps); self.last = None; self.n = 0
    def describe(self): return "forced"
    def predict_skips(self, step, plan, latents):
        return [step in self.steps and self.last is not None] * len(plan)
    def reused_prediction(self, latents, timestep): return self.last
    def update(self, plan, skips, latents, prediction, block_residuals=None, timestep=0.0):
        self.last = prediction.detach().clone()

def _patterns(text):
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise __import__("argparse").ArgumentTypeError(f"not JSON ({exc})") from None
    if not isinstance(value, dict) or not all(isinstance(v, list) and all(isinstance(i, int) and 0 <= i < 20 for i in v)
                                              for v in value.values()):
        raise __import__("argparse").ArgumentTypeError("must be an object of name -> list of step indices 0..19")
    return value


parser = __import__("argparse").ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("size", type=int, help="square canvas in pixels (tiled: above the toy's native 32)")
parser.add_argument("prompts", type=int, help="how many of bench_cache's prompts")
parser.add_argument("patterns", type=_patterns, help='JSON, e.g. \'{"odd": [3, 5, 7]}\'')
args = parser.parse_args()
if args.size <= 32 or args.size % 16 or args.prompts < 1:
    parser.error(f"size {args.size} must be a multiple of 16 above 32 and prompts {args.prompts} >= 1")
size, n, patterns = args.size, args.prompts, args.patterns
torch.set_num_threads(1)
sg = SuperGenPipeline.from_pretrained("toy")
prompts, _ = bench_prompts(n)
holder = {}
orig_init = T.TiledSampler.__init__
def init(self, *a, **k):
    orig_init(self, *a, **k)
    if self.desc == "refine" and holder.get("cache") is not None:
        self.cache = holder["cache"]
T.TiledSampler.__init__ = init
def run(p, steps):
    holder["cache"] = Forced(steps) if steps is not None else None
    return sg(p, height=size, width=size, num_inference_steps=20, seed=0, tiling=TilingConfig(), progress=False).frames
t0 = time.time()
refs = {p: run(p, None) for p in prompts}
print("ref s/prompt", (time.time() - t0) / n, flush=True)
for name, steps in patterns.items():
    ps = [psnr(run(p, steps), refs[p]) for p in prompts]
    print(f"{name}: reused {len(steps)/18:.1%} PSNR {mean_psnr(ps):.2f} min {min(ps):.2f}", flush=True)
