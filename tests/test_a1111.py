"""AUTOMATIC1111's /sdapi/v1 on fastsd serve: the real `webuiapi` client, the request
sequences Open WebUI and SillyTavern send (written out from their sources), the hires fix,
interrupt and progress, refused fields, and access control for both APIs."""

from __future__ import annotations

import base64
import hmac
import io
import json
import logging
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi")
webuiapi = pytest.importorskip("webuiapi")

from test_serve import Running, close, http  # noqa: E402

from fastsd.serve import Limits, ServeOptions, create_app  # noqa: E402
from fastsd.serve.a1111_images import plan_inpaint  # noqa: E402
from fastsd.serve.auth import Auth, read_auth  # noqa: E402

STEPS = 3
KEY = "sk-test-0123456789"


@pytest.fixture(scope="module")
def pipe(pipes):
    return pipes("eps")


@pytest.fixture(scope="module")
def server(ckpts, pipe, tmp_path_factory):
    out = tmp_path_factory.mktemp("a1111-out")
    options = ServeOptions(model=str(ckpts["eps"]), max_batch=4, batch_window_ms=50, max_queue=32,
                           limits=Limits(max_upload_bytes=512 * 1024), output_dir=str(out))
    running = Running(create_app(options, pipeline=pipe))
    running.out = out
    yield running
    running.stop()


def api(server, **kw) -> webuiapi.WebUIApi:
    host, port = server.url.removeprefix("http://").split(":")
    return webuiapi.WebUIApi(host=host, port=int(port), steps=STEPS, **kw)


def pixels(im: Image.Image) -> np.ndarray:
    return np.asarray(im.convert("RGB"))


def direct(pipe, prompt, seed, sampler, **kw) -> np.ndarray:
    out = pipe(prompt, generator=torch.Generator().manual_seed(seed), num_inference_steps=kw.pop("steps", STEPS),
               scheduler=sampler, prompt_syntax="a1111", **kw)
    return pixels(out.images[0])


def wait_for(get, ready, timeout: float = 60.0):
    """The first `get()` (a progress answer) that is `ready`, polled; None after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = get()
        if ready(value):
            return value
        time.sleep(0.02)
    return None


def sdapi(server, path: str, body=None, method: str | None = None, headers: dict | None = None):
    data = None if body is None else json.dumps(body).encode()
    return http(server.url + "/sdapi/v1/" + path, method or ("GET" if body is None else "POST"), data,
                {"content-type": "application/json", **(headers or {})})


# ---- webuiapi ------------------------------------------------------------------------------------


def test_webuiapi_txt2img_batches_seeds_and_samplers_match_the_python_api(server, pipe):
    a = api(server)
    r = a.txt2img(prompt="a red (barn:1.2)", negative_prompt="fog", seed=11, batch_size=2, n_iter=2, width=40,
                  height=32, cfg_scale=6.5, sampler_name="Euler a")
    assert len(r.images) == 4 and r.info["all_seeds"] == [11, 12, 13, 14] and r.info["seed"] == 11
    assert r.info["sampler_name"] == "Euler a" and r.parameters["n_iter"] == 2
    assert "Steps: 3, Sampler: Euler a, Schedule type: Automatic, CFG scale: 6.5, Seed: 12" in r.info["infotexts"][1]
    for k, im in enumerate(r.images):
        assert im.size == (40, 32) and im.text["parameters"] == r.info["infotexts"][k]
        assert close(pixels(im), direct(pipe, "a red (barn:1.2)", 11 + k, "euler_a", negative_prompt="fog",
                                        guidance_scale=6.5, width=40, height=32))
    for name, schedule, ours in (("DPM++ 2M", "Karras", "dpmpp_2m_karras"), ("DPM++ 2M SDE Karras", "automatic",
                                 "dpmpp_2m_sde_karras"), ("PLMS", None, "pndm"), ("UniPC", None, "unipc")):
        r = a.txt2img(prompt="a hill", seed=5, width=32, height=32, sampler_name=name, scheduler=schedule)
        assert close(pixels(r.image), direct(pipe, "a hill", 5, ours, guidance_scale=7.0, width=32, height=32)), name
    r = a.txt2img(prompt="a hill", width=32, height=32)  # seed -1: a drawn seed, reported
    seed = r.info["seed"]
    assert isinstance(seed, int) and seed >= 0 and f"Seed: {seed}," in r.info["infotexts"][0]
    assert close(pixels(r.image), direct(pipe, "a hill", seed, "euler_a", guidance_scale=7.0, width=32, height=32))


def test_webuiapi_img2img_and_inpaint(server, pipe, init_image, mask_image):
    a = api(server)
    r = a.img2img(images=[init_image], prompt="a bridge", seed=3, width=48, height=40, denoising_strength=0.6,
                  sampler_name="DDIM", eta=0.0)
    ref = pipe("a bridge", image=init_image, strength=0.6, generator=torch.Generator().manual_seed(3),
               num_inference_steps=STEPS, guidance_scale=7.0, scheduler="ddim", width=48, height=40,
               prompt_syntax="a1111")
    assert r.info["denoising_strength"] == 0.6 and close(pixels(r.image), pixels(ref.images[0]))

    # inpaint, "only masked" (the web UI's default): the answer is the original's size, every pixel far from
    # the (blurred) mask is the original's, and the repainted part is the pipeline's inpaint of the crop
    r = a.img2img(images=[init_image], mask_image=mask_image, prompt="a door", seed=4, width=32, height=32,
                  denoising_strength=0.9, mask_blur=2, inpainting_fill=1)
    assert r.image.size == init_image.size
    far = np.ones((40, 48), bool)
    far[2:36, 4:46] = False
    assert np.array_equal(pixels(r.image)[far], pixels(init_image)[far])
    plan = plan_inpaint(init_image, mask_image, 32, 32, invert=False, blur_x=2, blur_y=2, full_res=True,
                        padding=0, fill=1)
    out = pipe("a door", image=plan.image, mask_image=plan.mask, strength=0.9, num_inference_steps=STEPS,
               generator=torch.Generator().manual_seed(4), guidance_scale=7.0, scheduler="euler_a", width=32,
               height=32, prompt_syntax="a1111")
    assert close(pixels(r.image), pixels(plan.apply(out.images[0])))
    # the whole image at the asked size, with the web UI's fill of the masked area and an inverted mask
    r = a.img2img(images=[init_image], mask_image=mask_image, prompt="a door", seed=4, width=48, height=40,
                  inpaint_full_res=False, inpainting_mask_invert=1, mask_blur=0)
    assert r.image.size == (48, 40) and r.info["all_seeds"] == [4]


def test_webuiapi_options_listings_progress_and_interrupt(server, pipe):
    a = api(server)
    options = a.get_options()
    assert options["CLIP_stop_at_last_layers"] == 1 and options["sd_model_checkpoint"].endswith("]")
    a.set_options({"CLIP_stop_at_last_layers": 2})
    try:
        r = a.txt2img(prompt="a hill", seed=9, width=32, height=32)
        assert r.info["clip_skip"] == 2 and "Clip skip: 2" in r.info["infotexts"][0]
        assert close(pixels(r.image), direct(pipe, "a hill", 9, "euler_a", guidance_scale=7.0, width=32, height=32,
                                             clip_skip=1))
        r = a.txt2img(prompt="a hill", seed=9, width=32, height=32, override_settings={"CLIP_stop_at_last_layers": 1})
        assert r.info["clip_skip"] == 1 and a.get_options()["CLIP_stop_at_last_layers"] == 2  # restored afterwards
        a.txt2img(prompt="a hill", seed=9, width=32, height=32, override_settings={"CLIP_stop_at_last_layers": 1},
                  override_settings_restore_afterwards=False)
        assert a.get_options()["CLIP_stop_at_last_layers"] == 1  # kept, as the web UI keeps it
    finally:
        a.set_options({"CLIP_stop_at_last_layers": 1})
    assert {s["name"] for s in a.get_samplers()} >= {"Euler a", "DPM++ 2M", "DPM++ 2M SDE", "UniPC", "LCM", "Heun",
                                                      "DDIM", "PLMS"}
    assert [s["label"] for s in a.get_schedulers()] == ["Automatic", "Karras"]
    assert [u["name"] for u in a.get_upscalers()][:3] == ["None", "Lanczos", "Nearest"]
    assert "Latent (bicubic antialiased)" in [m["name"] for m in a.get_latent_upscale_modes()]
    assert a.get_sd_models()[0]["title"] == options["sd_model_checkpoint"]
    assert a.get_progress()["state"]["job_count"] == 0

    result, seen = {}, []
    worker = threading.Thread(target=lambda: result.setdefault("r", a.txt2img(
        prompt="a long job", seed=1, width=64, height=64, steps=200, batch_size=1)))
    worker.start()
    seen.append(wait_for(a.get_progress, lambda p: p["state"]["sampling_step"] >= 3))
    assert seen[0] and 0 < seen[0]["progress"] < 1 and seen[0]["state"]["job_count"] == 1
    assert seen[0]["state"]["sampling_steps"] == 200 and seen[0]["eta_relative"] > 0
    a.interrupt()
    worker.join(60)
    assert not worker.is_alive() and result["r"].images == []  # stopped within a step, nothing to show
    assert a.get_progress()["state"]["job_count"] == 0
    assert a.txt2img(prompt="after", seed=2, width=32, height=32).image.size == (32, 32)  # the next job runs


def test_hires_fix_over_the_api_is_pipeline_hires_fix(server, pipe):
    a = api(server)
    r = a.txt2img(prompt="a tower", seed=8, width=24, height=16, enable_hr=True, hr_scale=2,
                  hr_upscaler="Latent (nearest)", hr_second_pass_steps=2, denoising_strength=0.5,
                  hr_prompt="a tall tower")
    ref = pipe.hires_fix("a tower", hr_scale=2, hr_upscaler="Latent (nearest)", hr_second_pass_steps=2,
                         denoising_strength=0.5, hr_prompt="a tall tower", generator=[torch.Generator().manual_seed(8)],
                         num_inference_steps=STEPS, guidance_scale=7.0, scheduler="euler_a", width=24, height=16,
                         prompt_syntax="a1111")
    assert r.image.size == (48, 32) and close(pixels(r.image), pixels(ref.images[0]))
    assert "Hires upscale: 2" in r.info["infotexts"][0] and "Hires upscaler: Latent (nearest)" in r.info["infotexts"][0]


# ---- the clients' own request sequences ---------------------------------------------------------


def test_open_webui_sequence(server):
    """What Open WebUI's images router sends to an AUTOMATIC1111 engine: the model from
    options, the whole options object posted back to set it, the models list, then txt2img;
    it reads `images` (base64, no data URL header) and `info`."""
    auth = {"authorization": ""}  # Open WebUI sends an empty header when no auth is set
    status, options = sdapi(server, "options", headers=auth)
    assert status == 200
    model = options["sd_model_checkpoint"]
    status, models = sdapi(server, "sd-models", headers=auth)
    assert status == 200 and [{"id": m["title"], "name": m["model_name"]} for m in models][0]["id"] == model
    options["sd_model_checkpoint"] = models[0]["title"]
    status, _ = sdapi(server, "options", options, headers=auth)
    assert status == 200
    status, res = sdapi(server, "txt2img", {"prompt": "a cat", "batch_size": 2, "width": 32, "height": 32,
                                            "steps": STEPS, "negative_prompt": "blurry"}, headers=auth)
    assert status == 200 and len(res["images"]) == 2
    for b64 in res["images"]:
        assert Image.open(io.BytesIO(base64.b64decode(b64))).size == (32, 32)
    assert json.loads(res["info"])["negative_prompt"] == "blurry"


def test_sillytavern_sequence(server, pipe):
    """SillyTavern's server plugin: ping (options), upscalers + latent modes, VAEs, samplers,
    schedulers, models, the model (options), set the model then poll progress until idle,
    then txt2img with its whole body (its own url and auth included); reads images[0]."""
    for path in ("options", "upscalers", "latent-upscale-modes", "sd-vae", "samplers", "schedulers", "sd-models"):
        status, _ = sdapi(server, path)
        assert status == 200, path
    _, options = sdapi(server, "options")
    status, _ = sdapi(server, "options", {"sd_model_checkpoint": options["sd_model_checkpoint"]})
    assert status == 200
    _, progress = sdapi(server, "progress")
    assert progress["progress"] == 0.0 and progress["state"]["job_count"] == 0
    body = {"url": server.url, "auth": "", "prompt": "a fox", "negative_prompt": "text", "sampler_name": "DPM++ 2M",
            "scheduler": "Karras", "steps": STEPS, "cfg_scale": 7, "width": 32, "height": 32, "restore_faces": False,
            "enable_hr": False, "hr_upscaler": "Latent", "hr_scale": 2, "denoising_strength": 0.7,
            "hr_second_pass_steps": 0, "seed": 21,
            "override_settings": {"CLIP_stop_at_last_layers": 1}, "override_settings_restore_afterwards": True,
            "clip_skip": 1, "save_images": True, "send_images": True, "do_not_save_grid": False,
            "do_not_save_samples": False}
    saved = len(list(server.out.glob("*.png")))
    status, res = sdapi(server, "txt2img", body)
    assert status == 200
    im = Image.open(io.BytesIO(base64.b64decode(res["images"][0])))
    assert close(pixels(im), direct(pipe, "a fox", 21, "dpmpp_2m_karras", negative_prompt="text", guidance_scale=7.0,
                                    width=32, height=32))
    files = sorted(server.out.glob("*.png"))
    assert len(files) == saved + 1 and files[-1].name.endswith("-21.png")  # save_images: the server's output dir
    assert Image.open(files[-1]).text["parameters"] == json.loads(res["info"])["infotexts"][0]
    body.update(enable_hr=True, hr_scale=1.5, seed=22)
    status, res = sdapi(server, "txt2img", body)
    assert status == 200 and Image.open(io.BytesIO(base64.b64decode(res["images"][0]))).size == (48, 48)


# ---- refused input -----------------------------------------------------------------------------------


@pytest.mark.parametrize("body, field", [
    ({"sampler_name": "DPM++ 3M SDE"}, "sampler_name"),
    ({"sampler_name": "Euler a", "scheduler": "Karras"}, "scheduler"),
    ({"scheduler": "Exponential"}, "scheduler"),
    ({"restore_faces": True}, "restore_faces"),
    ({"styles": ["cinematic"]}, "styles"),
    ({"subseed_strength": 0.3}, "subseed_strength"),
    ({"tiling": True}, "tiling"),
    ({"script_name": "x/y/z plot"}, "script_name"),
    ({"alwayson_scripts": {"controlnet": {"args": [{"enabled": True}]}}}, "alwayson_scripts"),
    ({"eta": 0.5, "sampler_name": "Euler a"}, "eta"),
    ({"width": 33}, "width"),
    ({"steps": 0}, "steps"),
    ({"batch_size": 6, "n_iter": 2}, "batch_size"),
    ({"enable_hr": True, "hr_upscaler": "4x-UltraSharp"}, "hr_upscaler"),
    ({"enable_hr": True, "hr_scale": 100}, "hr_scale"),
    ({"override_settings": {"sd_model_checkpoint": "other.safetensors"}}, "override_settings"),
    ({"override_settings": {"CLIP_stop_at_last_layers": 40}}, "override_settings"),
])
def test_unsupported_fields_are_422s_naming_them(server, body, field):
    status, res = sdapi(server, "txt2img", {"prompt": "x", "steps": STEPS, "width": 32, "height": 32, **body})
    assert status == 422, res
    assert res["detail"][0]["loc"][:2] == ["body", field] and field in res["detail"][0]["msg"]


def test_bad_img2img_input_is_422_and_the_server_stays_healthy(server):
    big = Image.new("RGB", (2100, 16))
    buf = io.BytesIO()
    big.save(buf, "PNG")
    cases = [({"init_images": ["not base64!"]}, "init_images"), ({"init_images": []}, "init_images"),
             ({"init_images": [base64.b64encode(b"not an image").decode()]}, "init_images"),
             ({"init_images": [base64.b64encode(buf.getvalue()).decode()]}, "init_images"),
             ({"mask": "@@@"}, "mask"), ({"inpainting_fill": 2, "mask": None}, "inpainting_fill"),
             ({"resize_mode": 1}, "resize_mode"), ({"denoising_strength": 0}, "denoising_strength")]
    small = io.BytesIO()
    Image.new("RGB", (32, 32), "gray").save(small, "PNG")
    good = base64.b64encode(small.getvalue()).decode()
    for extra, field in cases:
        body = {"prompt": "x", "steps": STEPS, "width": 32, "height": 32, "init_images": [good], **extra}
        if field == "inpainting_fill":
            body["mask"] = good
        status, res = sdapi(server, "img2img", body)
        assert status == 422 and res["detail"][0]["loc"][1] == field, (extra, res)
    status, res = http(server.url + "/sdapi/v1/txt2img", "POST", b"{not json", {"content-type": "application/json"})
    assert status == 422 and res["detail"][0]["loc"] == ["body", "body"]
    assert http(server.url + "/healthz")[1]["status"] == "ok"
    status, res = sdapi(server, "img2img", {"prompt": "x", "steps": STEPS, "width": 32, "height": 32,
                                            "init_images": ["data:image/png;base64," + good]})
    assert status == 200 and len(res["images"]) == 1


# ---- access control ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def locked(ckpts, pipe):
    auth = Auth(keys=(KEY, "sk-other-key-999"), users=(("ana", "s3cret-pass"),))
    options = ServeOptions(model=str(ckpts["eps"]), max_batch=2, batch_window_ms=10, auth=auth)
    running = Running(create_app(options, pipeline=pipe))
    yield running
    running.stop()


ROUTES = [("GET", "/v1/models"), ("POST", "/v1/images/generations"), ("POST", "/v1/images/edits"),
          ("GET", "/metrics"), *[("GET", f"/sdapi/v1/{p}") for p in (
              "options", "sd-models", "samplers", "schedulers", "upscalers", "latent-upscale-modes", "sd-vae",
              "loras", "embeddings", "progress", "scripts")],
          ("POST", "/sdapi/v1/txt2img"), ("POST", "/sdapi/v1/img2img"), ("POST", "/sdapi/v1/options"),
          ("POST", "/sdapi/v1/interrupt"), ("POST", "/sdapi/v1/skip")]
BASIC = "Basic " + base64.b64encode(b"ana:s3cret-pass").decode()
WRONG = [None, "Bearer sk-test-0123456780", "Bearer " + KEY[:-1], "Basic " + base64.b64encode(b"ana:s3cret").decode(),
         "Basic " + base64.b64encode(b"bob:s3cret-pass").decode(), "Basic !!!", "Token " + KEY, KEY]


def test_every_protected_route_of_both_apis_is_401_without_valid_credentials(locked):
    for method, path in ROUTES:
        for value in WRONG:
            headers = {"content-type": "application/json"} | ({"authorization": value} if value else {})
            status, body = http(locked.url + path, method, b"{}" if method == "POST" else None, headers)
            assert status == 401, (path, value)
            if path.startswith("/sdapi"):
                assert body["detail"] == "Incorrect username or password"
            else:
                assert body["error"]["code"] == "invalid_api_key"
    assert http(locked.url + "/healthz")[0] == 200  # load balancers poll it without credentials


def test_keys_and_users_open_both_apis_with_their_own_clients(locked, caplog):
    with caplog.at_level(logging.DEBUG):
        openai = pytest.importorskip("openai")
        c = openai.OpenAI(base_url=locked.url + "/v1", api_key=KEY, max_retries=0, timeout=120)
        r = c.images.generate(prompt="a lake", size="32x32", extra_body={"num_inference_steps": STEPS, "seed": 1})
        assert len(r.data) == 1
        host, port = locked.url.removeprefix("http://").split(":")
        a = webuiapi.WebUIApi(host=host, port=int(port), steps=STEPS, username="ana", password="s3cret-pass")
        assert a.txt2img(prompt="a lake", seed=1, width=32, height=32).image.size == (32, 32)
        for value in (f"Bearer {KEY}", "Bearer sk-other-key-999", BASIC):
            assert http(locked.url + "/sdapi/v1/options", headers={"authorization": value})[0] == 200
            assert http(locked.url + "/metrics", headers={"authorization": value})[0] == 200
        http(locked.url + "/v1/models", headers={"authorization": "Bearer wrong-key-123"})
    logged = caplog.text + "".join(str(r.args) for r in caplog.records)
    assert KEY not in logged and "s3cret-pass" not in logged and "wrong-key-123" not in logged
    assert KEY not in repr(locked.app.state.fastsd.options)


def test_credentials_are_compared_in_constant_time_against_every_entry(monkeypatch):
    auth = Auth(keys=("key-number-one", "key-number-two", "key-number-six"), users=(("a", "bbbbbbbb"), ("c", "dd")))
    calls = []
    real = hmac.compare_digest

    def counting(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    for header, ok in ((b"Bearer key-number-one", True), (b"Bearer key-number-six", True), (b"Bearer nope", False)):
        calls.clear()
        assert auth.allows(header) is ok and len(calls) == 3  # no early exit: every key compared
    basic = b"Basic " + base64.b64encode(b"a:bbbbbbbb")
    calls.clear()
    assert auth.allows(basic) and len(calls) == 4  # both halves of every user


def test_auth_from_files_and_environment_and_metrics_public(tmp_path, ckpts, pipe):
    keys = tmp_path / "keys"
    keys.write_text("sk-file-key-1\nsk-file-key-2\n")
    users = tmp_path / "users"
    users.write_text("u1:p1p1p1,u2:p2p2p2\n")
    auth = read_auth([], [str(keys)], [], [str(users)], environ={"FASTSD_API_KEY": "sk-env-key-3"})
    assert auth.keys == ("sk-file-key-1", "sk-file-key-2", "sk-env-key-3")
    assert auth.users == (("u1", "p1p1p1"), ("u2", "p2p2p2")) and "sk-file" not in repr(auth)
    from fastsd.errors import FastSDError

    with pytest.raises(FastSDError, match="user:password"):
        read_auth([], [], ["nocolon"], [], environ={})
    with pytest.raises(FastSDError, match="at least 8"):
        read_auth(["short"], [], [], [], environ={})
    options = ServeOptions(model=str(ckpts["eps"]), auth=Auth(keys=(KEY,), metrics_public=True))
    running = Running(create_app(options, pipeline=pipe))
    try:
        assert http(running.url + "/metrics")[0] == 200
        assert http(running.url + "/sdapi/v1/options")[0] == 401
    finally:
        running.stop()


# ---- the server's folders: embeddings, LoRA tags, upscaler models, previews -------------------------


def test_folders_previews_and_send_images(ckpts, pipe, tmp_path):
    from safetensors.torch import save_file
    from test_hires import make_upscaler, spandrel_works
    from test_lora import kohya_lora

    emb, loras, ups, made = (tmp_path / d for d in ("emb", "loras", "ups", "made"))
    for d in (emb, loras, ups, made):
        d.mkdir()
    save_file({"emb_params": torch.randn(2, pipe.info.cross_attention_dim)}, str(emb / "mystyle.safetensors"))
    kohya_lora(ckpts["eps"], made, 3, text=False).rename(loras / "ink.safetensors")
    make_upscaler(ups / "tiny-x2.safetensors")
    options = ServeOptions(model=str(ckpts["eps"]), embeddings_dir=str(emb), lora_dir=str(loras),
                           upscaler_dir=str(ups), preview_vae="synthetic:taesd-tiny", preview_every=1)
    running = Running(create_app(options, load_in_background=False))
    try:
        server = running
        assert sdapi(server, "embeddings")[1]["loaded"]["mystyle"]["vectors"] == 2
        assert [x["name"] for x in sdapi(server, "loras")[1]] == ["ink"]
        assert "tiny-x2" in [u["name"] for u in sdapi(server, "upscalers")[1]]  # listed by its file
        base = {"prompt": "a fox mystyle", "seed": 3, "steps": STEPS, "width": 32, "height": 32}
        plain = sdapi(server, "txt2img", base)[1]["images"][0]
        tagged = sdapi(server, "txt2img", {**base, "prompt": "a fox mystyle <lora:ink:0.8>"})[1]
        assert tagged["images"][0] != plain and "<lora:ink:0.8>" in json.loads(tagged["info"])["infotexts"][0]
        status, res = sdapi(server, "txt2img", {**base, "enable_hr": True, "hr_upscaler": "tiny-x2",
                                                "denoising_strength": 0.4})
        if spandrel_works():
            assert status == 200 and Image.open(io.BytesIO(base64.b64decode(res["images"][0]))).size == (64, 64)
        else:  # the model cannot be loaded without spandrel: a 422 naming it, before any work
            assert status == 422 and res["detail"][0]["loc"][1] == "hr_upscaler", res
            assert "spandrel" in res["detail"][0]["msg"]
        assert http(server.url + "/healthz")[1]["status"] == "ok"
        status, res = sdapi(server, "txt2img", {**base, "send_images": False})
        assert status == 200 and res["images"] == [] and json.loads(res["info"])["seed"] == 3

        done, previews = {}, []
        worker = threading.Thread(target=lambda: done.setdefault("r", sdapi(server, "txt2img", {
            **base, "steps": 150, "width": 64, "height": 64})))
        worker.start()
        p = wait_for(lambda: sdapi(server, "progress")[1], lambda p: p["current_image"] or not worker.is_alive())
        if p and p["current_image"]:
            previews.append(Image.open(io.BytesIO(base64.b64decode(p["current_image"]))))
        sdapi(server, "interrupt", {})
        worker.join(120)
        assert previews and previews[0].size == (64, 64) and done["r"][0] == 200 and done["r"][1]["images"] == []
        assert sdapi(server, "progress?skip_current_image=true")[1]["current_image"] is None
    finally:
        running.stop()


def test_every_sampler_name_maps_to_the_python_api(server, pipe):
    from fastsd.serve.a1111 import SAMPLERS

    for name, _, ours, karras in SAMPLERS:
        for schedule, want in (("Automatic", ours), ("Karras", karras)):
            if want is None:
                continue
            status, res = sdapi(server, "txt2img", {"prompt": "a hill", "seed": 4, "steps": STEPS, "width": 32,
                                                    "height": 32, "sampler_name": name, "scheduler": schedule})
            assert status == 200, (name, res)
            im = Image.open(io.BytesIO(base64.b64decode(res["images"][0])))
            assert close(pixels(im), direct(pipe, "a hill", 4, want, guidance_scale=7.0, width=32, height=32)), name


def test_serve_flags_warn_when_open_beyond_loopback_and_refuse_bad_folders(ckpts, tmp_path, capsys):
    from fastsd.cli import main
    from fastsd.serve.auth import open_warning

    assert open_warning("127.0.0.1", Auth()) is None and open_warning("::1", Auth()) is None
    assert "without --api-key" in open_warning("0.0.0.0", Auth())
    assert open_warning("0.0.0.0", Auth(keys=(KEY,))) is None
    base = ["serve", "--model", str(ckpts["eps"]), "--port", "1"]
    assert main([*base, "--upscaler-dir", str(tmp_path / "missing")]) == 2
    assert main([*base, "--api-auth", "nocolon"]) == 2
    err = capsys.readouterr().err
    assert "--upscaler-dir" in err and "user:password" in err and "Traceback" not in err


def test_skip_drops_the_running_batch_only(ckpts, pipe):
    options = ServeOptions(model=str(ckpts["eps"]), max_batch=1, batch_window_ms=0)
    running = Running(create_app(options, pipeline=pipe))
    try:
        done = {}
        body = {"prompt": "a skipped one", "seed": 30, "steps": 60, "width": 32, "height": 32, "n_iter": 2}
        worker = threading.Thread(target=lambda: done.setdefault("r", sdapi(running, "txt2img", body)))
        worker.start()
        wait_for(lambda: sdapi(running, "progress")[1], lambda p: p["state"]["sampling_step"] >= 3)
        sdapi(running, "skip", {})
        worker.join(120)
        status, res = done["r"]
        info = json.loads(res["info"])
        assert status == 200 and len(res["images"]) == 1 and info["images_seeds"] == [31]  # the second image ran
        assert "Seed: 31," in info["infotexts"][0]
        # an OpenAI request in a skipped batch: a 400 its client does not resend by itself
        worker = threading.Thread(target=lambda: done.__setitem__("o", http(
            running.url + "/v1/images/generations", "POST", json.dumps({
                "prompt": "x", "size": "32x32", "num_inference_steps": 60, "seed": 1}).encode(),
            {"content-type": "application/json"})))
        worker.start()
        wait_for(lambda: sdapi(running, "progress")[1], lambda p: p["state"]["sampling_step"] >= 3)
        sdapi(running, "skip", {})
        worker.join(120)
        assert done["o"][0] == 400 and done["o"][1]["error"]["code"] == "interrupted"
    finally:
        running.stop()


def test_progress_never_passes_the_steps():
    """/progress's sampling_step counts the sampler's steps: PNDM's extra first UNet call does not
    make it "21 of 20"."""
    from fastsd.serve.progress import Run

    run = Run([], 20)
    for _ in range(21):
        run.step()
    assert (run.done, run.steps, run.fraction) == (20, 20, 1.0)
