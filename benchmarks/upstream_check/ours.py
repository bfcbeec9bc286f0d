"""Our side of the one-off cross-check against upstream's own loop (README.md beside this file): run t2i and edit through the project's pipeline in fp32 on the tiny
checkpoint, record the inputs upstream needs, every denoise call's velocities (cond, uncond) and the final latent."""
import io, sys, torch, numpy as np
from PIL import Image
from runtime.pipeline import LancePipeline
from runtime.pipeline.core import Progress, VIT_TO_VAE_SIDE, randn
from runtime.pipeline.preprocess import vae_image_input, vit_image_input
from runtime.spec.request import GenerationRequest

CKPT, OUT = sys.argv[1], sys.argv[2]
pipe = LancePipeline.from_checkpoint(CKPT)
calls = []
mot = pipe.engines.mot
orig = mot.infer
def record(feed):
    out = orig(feed)
    if out["velocity"].shape[1] > 0:
        calls.append(out["velocity"].detach().clone())
    return out
mot.infer = record

def run(task, request, **extra):
    calls.clear()
    with torch.inference_mode():
        if task == "t2i":
            lat_h, lat_w = request.height // 16, request.width // 16
            plan = pipe.plan(request, lat_h, lat_w)
            latent = pipe.generate_latent(request, plan, Progress(None, None), {}, ref_latent=None)
            data = dict(plan=plan, ref_latent=None, patches=None, vit_grid=None)
        else:
            image = pipe.load_image(request)
            area = round((request.height * request.width) ** 0.5)
            pixels = vae_image_input(image, area).to(torch.float32)
            patches, vit_grid = vit_image_input(image, round(area * VIT_TO_VAE_SIDE))
            lat_h, lat_w = (s // 16 for s in pixels.shape[-2:])
            vit_rows = pipe.vit(patches, vit_grid)
            ref = pipe.encode_reference(pixels, request.seed)
            plan = pipe.plan(request, vit_grid, lat_h, lat_w)
            latent = pipe.generate_latent(request, plan, Progress(None, None), {}, ref_latent=ref, vit_rows=vit_rows)
            data = dict(plan=plan, ref_latent=ref, patches=patches, vit_grid=vit_grid)
    t, h, w = plan.splits[plan.noise_index].latent_thw
    noise = randn((1, t * h * w, 48), request.seed)[0]
    return dict(task=task, token_ids=plan.token_ids.copy(), modalities=plan.modalities.copy(),
                splits=[(s.kind, s.attn_mode, len(s.token_ids), s.grid_thw, s.latent_thw if s.kind in ("noise", "vae_ref") else None) for s in plan.splits],
                visual_grids=plan.visual_grids, noise=noise, velocities=[c.float() for c in calls],
                latent=latent[0].float(), ref_latent=None if data["ref_latent"] is None else data["ref_latent"][0],
                patches=data["patches"], vit_grid=data["vit_grid"], steps=request.steps, cfg=request.cfg_scale,
                vit_rows=None if data["ref_latent"] is None else vit_rows[0])

buf = io.BytesIO()
Image.fromarray((np.random.default_rng(0).random((240, 320, 3)) * 255).astype(np.uint8)).save(buf, "PNG")
t2i = run("t2i", GenerationRequest("t2i", "a red cube on a wooden table", height=256, width=256, steps=30, seed=7))
edit = run("edit", GenerationRequest("edit", "make the cube blue", image=buf.getvalue(), height=256, width=256,
                                     steps=30, seed=7))
torch.save({"t2i": t2i, "edit": edit}, OUT)
print("t2i calls", len(t2i["velocities"]), "edit calls", len(edit["velocities"]))
