"""Probe for the region cache: how much the blended canvas prediction changes per step under the
every-step shifted grid, split into the grid move (same latents on the previous step's grid) and the
denoising change (previous step's prediction against this step's latents on the previous grid), for all
cells, tile cores (>= 3 cells from a tile edge at both steps) and an 8x8-cell low band, plus the errors
of candidate reuse values (first-order extrapolation, half of it, mean of the last two).

    python scripts/probe_canvas_change.py 64 "a red circle moving left over a blue sky"
"""
import sys, time, json
import torch
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent.parent))
from supergen import SuperGenPipeline, TilingConfig
from supergen.samplers import tiled as T

parser = __import__("argparse").ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("size", type=int, help="square canvas in pixels (tiled: above the toy's native 32)")
parser.add_argument("prompt", help="a toy-world prompt")
args = parser.parse_args()
if args.size <= 32 or args.size % 16:
    parser.error(f"size {args.size} must be a multiple of 16 above 32 (a tiled canvas)")
size, prompt = args.size, args.prompt
torch.set_num_threads(1)
sg = SuperGenPipeline.from_pretrained("toy")
rec = []
orig = T.TiledSampler.predict
def predict(self, step, timestep, latents):
    pred = orig(self, step, timestep, latents)
    if self.desc != "refine":
        return pred
    plan = self.planner.plan(step)
    prev_plan = self.planner.plan(step - 1) if step > 0 else None
    alt = None
    if prev_plan is not None and prev_plan.shift != plan.shift:
        outs, _ = self.run_tiles(latents, timestep, prev_plan.tiles)
        alt = prev_plan.blend(outs)
    # distance of each cell to its tile edge (H, W) on this plan
    F, H, W = plan.canvas
    dist = torch.full((H, W), 99)
    for tile in plan.tiles:
        hi, wi = tile.cells[1], tile.cells[2]
        dh = torch.minimum(torch.arange(tile.size[1]), torch.arange(tile.size[1]).flip(0))
        dw = torch.minimum(torch.arange(tile.size[2]), torch.arange(tile.size[2]).flip(0))
        d = torch.minimum(dh[:, None], dw[None, :])
        dist[hi[:, None], wi[None, :]] = torch.minimum(dist[hi[:, None], wi[None, :]], d)
    rec.append(dict(step=step, t=float(timestep), shift=plan.shift, x=latents.clone(), p=pred.clone(),
                    alt=alt, dist=dist))
    return pred
T.TiledSampler.predict = predict
t0 = time.time()
out = sg(prompt, height=size, width=size, num_inference_steps=20, seed=0, tiling=TilingConfig(), progress=False)
print("run s", time.time() - t0)
import torch.nn.functional as Fn
def low(a, k):
    B, C, F, H, W = a.shape
    z = a.reshape(B, C * F, H, W)
    z = Fn.avg_pool2d(z, k)
    return z.reshape(B, C, F, H // k, W // k)
def rel(a, b, mask=None):
    d = (a - b).abs().mean(dim=(0, 1)); s = b.abs().mean(dim=(0, 1))
    if mask is not None:
        d, s = d[:, mask], s[:, mask]
    return float(d.mean() / s.mean())
rows = []
for i in range(1, len(rec)):
    r, q = rec[i], rec[i - 1]
    pmask_core = (r["dist"] >= 3) & (q["dist"] >= 3)
    pmask_edge = ~pmask_core
    row = dict(step=r["step"], total=rel(q["p"], r["p"]), total_core=rel(q["p"], r["p"], pmask_core),
               total_edge=rel(q["p"], r["p"], pmask_edge))
    if r["alt"] is not None:
        row["grid"] = rel(r["alt"], r["p"]); row["grid_core"] = rel(r["alt"], r["p"], pmask_core)
        row["denoise"] = rel(q["p"], r["alt"]); row["denoise_core"] = rel(q["p"], r["alt"], pmask_core)
    if i >= 2:
        z = rec[i - 2]
        sl = (r["t"] - q["t"]) / (q["t"] - z["t"])
        row["taylor"] = rel(q["p"] + (q["p"] - z["p"]) * sl, r["p"])
        row["taylor_half"] = rel(q["p"] + 0.5 * (q["p"] - z["p"]) * sl, r["p"])
        row["mean2"] = rel(0.5 * (q["p"] + z["p"]), r["p"])
    for k in (4, 8):
        row[f"tot_lo{k}"] = rel(low(q["p"], k), low(r["p"], k))
        if r["alt"] is not None:
            row[f"grid_lo{k}"] = rel(low(r["alt"], k), low(r["p"], k))
            row[f"den_lo{k}"] = rel(low(q["p"], k), low(r["alt"], k))
        row[f"dx_lo{k}"] = rel(low(q["x"], k), low(r["x"], k))
    row["core_frac"] = float(pmask_core.float().mean())
    rows.append(row)
for row in rows:
    print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
