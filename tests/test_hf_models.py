"""Hugging Face families behind ``model.name_or_path`` (CLIP, ViLT, LLaVA), on tiny random
checkpoints saved by the test and loaded through the real code path (offline, from a directory)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from fedilora.config import ConfigError, Params, load_params, parse_params
from fedilora.inputs import feature_batch
from fedilora.models.families import family_of
from fedilora.models.shared import ModelSpec, build
from fedilora.models import adapters, hf
from fedilora.models.encoders import load_tokenizer
from fedilora.training import Subset, evaluate, train_local
from tiny_project import call_cli, seed_mlflow_store, write_project

REPO = Path(__file__).resolve().parents[1]
FAMILIES = ["clip", "vilt", "llava"]
CLASSES = ["red", "green", "blue"]
TINY = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2)


def save_tiny_checkpoints(root: Path) -> dict[str, Path]:
    """Random tiny CLIP, ViLT and LLaVA checkpoints with processors (the MiniLM WordPiece
    tokenizer; LLaVA's gets an ``<image>`` token and [SEP] as eos), as ``save_pretrained`` writes them."""
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        ViltConfig,
        ViltImageProcessor,
        ViltModel,
        ViltProcessor,
    )

    torch.manual_seed(0)
    tok = load_tokenizer()
    clip_images = dict(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    text = dict(vocab_size=tok.vocab_size, max_position_embeddings=32, eos_token_id=tok.sep_token_id,
                bos_token_id=tok.cls_token_id, pad_token_id=tok.pad_token_id, **TINY)
    CLIPModel(CLIPConfig(text_config=text, vision_config=dict(image_size=32, patch_size=16, **TINY), projection_dim=16)).save_pretrained(root / "clip")
    CLIPProcessor(image_processor=CLIPImageProcessor(**clip_images), tokenizer=tok).save_pretrained(root / "clip")

    ViltModel(ViltConfig(vocab_size=tok.vocab_size, image_size=32, patch_size=16, max_position_embeddings=40, **TINY)).save_pretrained(root / "vilt")
    ViltProcessor(image_processor=ViltImageProcessor(size={"shortest_edge": 32}), tokenizer=tok).save_pretrained(root / "vilt")

    ltok = load_tokenizer()
    ltok.add_tokens(["<image>"], special_tokens=True)
    ltok.eos_token = "[SEP]"
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(image_size=32, patch_size=16, **TINY),
        text_config=LlamaConfig(vocab_size=len(ltok), num_key_value_heads=2, max_position_embeddings=128, **TINY),
        image_token_id=ltok.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    LlavaForConditionalGeneration(config).save_pretrained(root / "llava")
    LlavaProcessor(image_processor=CLIPImageProcessor(**clip_images), tokenizer=ltok, patch_size=16,
                   vision_feature_select_strategy="default").save_pretrained(root / "llava")
    return {f: root / f for f in FAMILIES}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    return save_tiny_checkpoints(tmp_path_factory.mktemp("hf"))


def _params(path: Path, ranks=(4, 2)) -> Params:
    return parse_params({"model": {"name_or_path": str(path)}, "clients": {"num_clients": len(ranks), "ranks": list(ranks)}})


def _table(params: Params, n: int = 12):
    labels = [i % 3 for i in range(n)]
    colours = [(220, 30, 30), (30, 200, 30), (30, 30, 220)]
    words = ["apple cherry", "leaf frog", "sea sky"]
    images = [Image.new("RGB", (8, 8), colours[y]) for y in labels]
    return hf.encode([words[y] for y in labels], images, labels, CLASSES, params.model, 8)


def _build(params: Params):
    """The PEFT-wrapped model of ``params`` (3 classes; image_dim unused by these families)."""
    return build(ModelSpec.of(params, image_dim=3, num_classes=3)).peft


MIXED = Subset(torch.arange(6), torch.tensor([True, False, True] * 2), torch.tensor([True, True, False] * 2))


@pytest.mark.parametrize("family", FAMILIES)
def test_rank_slots_on_one_base_model(checkpoints, family) -> None:
    params = _params(checkpoints[family])
    model = _build(params)  # first slot at r_max = 4
    small = adapters.ensure_slot(model, 2, params.lora.alpha_for(2))
    big = adapters.slot_name(4, params.lora.alpha_for(4))
    s4, s2 = adapters.get_state(model, big), adapters.get_state(model, small)
    assert set(s4) == set(s2)
    lora = [k for k in s4 if "lora_A." in k]
    layers = {"clip": ("q_proj", "v_proj"), "vilt": ("query", "value"), "llava": ("q_proj", "v_proj")}[family]
    assert lora and all(k.split(".lora_A.")[0].split(".")[-1] in layers for k in lora)
    if family == "clip":  # both towers
        assert any("text_model" in k for k in lora) and any("vision_model" in k for k in lora)
    if family == "llava":  # the language model only
        assert all("language_model" in k for k in lora)
    for key in lora:
        assert s4[key].shape == (4, 32) and s2[key].shape == (2, 32)
        b = key.replace("lora_A.", "lora_B.")
        assert s4[b].shape == (32, 4) and s2[b].shape == (32, 2)
    trained = {k for k in s4 if "lora_" not in k}
    expected = "multi_modal_projector" if family == "llava" else "classifier"
    assert trained and all(expected in k for k in trained)


@pytest.mark.parametrize("family", FAMILIES)
def test_training_step_moves_lora_not_base(checkpoints, family) -> None:
    params = _params(checkpoints[family])
    table = _table(params)
    assert table.image_features.shape == (12, 3, 32, 32)  # pixel values, not features
    model = _build(params)
    slot = adapters.ensure_slot(model, 2, params.lora.alpha_for(2))
    adapters.activate(model, slot)
    before = adapters.get_state(model, slot)
    base_before = {k: w.detach().clone() for k, w in adapters.target_base_weights(model).items()}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad and "lora_" not in n}
    make_batch = family_of(params.model).make_batch
    loss = train_local(model, table, MIXED, epochs=1, batch_size=6, lr=1e-2, generator=torch.Generator().manual_seed(0),
                       make_batch=make_batch)
    assert loss == loss and loss > 0  # finite, not NaN
    after = adapters.get_state(model, slot)
    assert any(not torch.equal(before[k], after[k]) for k in before if "lora_B." in k)
    for key, weight in adapters.target_base_weights(model).items():
        assert torch.equal(weight, base_before[key]), key
    named = dict(model.named_parameters())
    assert all(torch.equal(named[n], p) for n, p in frozen.items())
    for data in (MIXED, MIXED.drop("image"), MIXED.drop("text")):  # a whole modality absent
        metrics = evaluate(model, table, data, make_batch=make_batch)
        assert 0.0 <= metrics["accuracy"] <= 1.0
    assert 0.0 <= evaluate(model, table, MIXED, fill="placeholder", make_batch=make_batch)["accuracy"] <= 1.0


@pytest.mark.parametrize("family", ["clip", "vilt"])
def test_absent_modality_never_influences_logits(checkpoints, family) -> None:
    params = _params(checkpoints[family])
    table = _table(params)
    model = _build(params).eval()
    assert family_of(params.model).make_batch is feature_batch
    for data in (MIXED, MIXED.drop("image"), MIXED.drop("text")):
        batch = feature_batch(table, data.rows, data.has_image, data.has_text)
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        with torch.no_grad():
            logits = model(**inputs)
            assert torch.isfinite(logits).all()
            noisy = dict(inputs, image_features=torch.where(
                data.has_image.view(-1, 1, 1, 1), inputs["image_features"], torch.randn_like(inputs["image_features"]) * 5))
            other_ids = torch.where(data.has_text[:, None], inputs["input_ids"], torch.full_like(inputs["input_ids"], 2000))
            assert torch.allclose(logits, model(**noisy), atol=1e-5)
            assert torch.allclose(logits, model(**dict(inputs, input_ids=other_ids)), atol=1e-5)


def test_llava_prompts_answers_and_matching(checkpoints) -> None:
    params = _params(checkpoints["llava"])
    table = _table(params, 6)
    config = hf.load_config(str(checkpoints["llava"]))
    image_id, n_image = config.image_token_id, hf.num_image_tokens(config)
    assert n_image == 4
    assert family_of(params.model).make_batch is hf.prompt_batch
    batch = hf.prompt_batch(table, MIXED.rows, MIXED.has_image, MIXED.has_text)
    # pixels only for the samples that show an image, and exactly their image tokens
    shows = MIXED.has_image
    assert batch["pixel_values"].shape[0] == int(shows.sum())
    assert ((batch["prompt_ids"] == image_id).sum(1) == shows.long() * n_image).all()
    assert ((batch["input_ids"] == image_id).sum(1) == shows.long() * n_image).all()
    tok = hf.Processor(str(checkpoints["llava"])).tokenizer
    for i in range(len(MIXED)):
        prompt = tok.decode(batch["prompt_ids"][i][batch["prompt_mask"][i]], skip_special_tokens=True)
        assert prompt.endswith("which category? answer :")  # the WordPiece tokenizer lowercases
        assert ("sea sky" in prompt or "apple cherry" in prompt or "leaf frog" in prompt) == bool(MIXED.has_text[i])
        # LM loss on the answer only: the class name and eos
        answer = batch["lm_labels"][i][batch["lm_labels"][i] != -100]
        assert tok.decode(answer, skip_special_tokens=True) == CLASSES[int(batch["labels"][i])]
        assert answer[-1] == tok.eos_token_id
    assert (batch["prompt_mask"][:, -1]).all()  # left-padded for generation

    assert hf.match_answer(" Red \n more", CLASSES) == 0
    assert hf.match_answer("blue", CLASSES) == 2
    assert hf.match_answer("reddish", CLASSES) == -1
    assert hf.match_answer("", CLASSES) == -1

    model = _build(params).eval()
    base = model.get_base_model()
    assert base.class_names(batch["answer_ids"], batch["answer_mask"]) == CLASSES
    width = batch["prompt_ids"].shape[1]
    green = tok("green", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    junk = tok("frog sky", add_special_tokens=False)["input_ids"]

    def fake_generate(input_ids, **kwargs):  # row 0 answers "green", the others something else
        pad = lambda ids: ids + [0] * (8 - len(ids))  # noqa: E731
        new = torch.tensor([pad(green)] + [pad(junk)] * (len(input_ids) - 1))
        return torch.cat([input_ids, new], dim=1)

    base.llava.generate = fake_generate
    scores = base.answer_scores(batch["prompt_ids"], batch["prompt_mask"], batch["answer_ids"], batch["answer_mask"])
    assert scores.shape == (6, 4) and width == batch["prompt_ids"].shape[1]
    assert scores.argmax(1).tolist() == [1, 3, 3, 3, 3, 3]  # 3 = no class name matched: always wrong


def _project(root: Path, checkpoint: Path) -> Path:
    """The tiny project (tests/tiny_project.py) on ``checkpoint``; returns its folder."""
    return write_project(
        root,
        model={"name": "embedded", "name_or_path": str(checkpoint)},
        clients={"num_clients": 3, "ranks": [4, 2, 2], "test_fraction": 0.25},
        federation={"rounds": 2, "sample_fraction": 0.67, "batch_size": 8, "lr": 0.01},
        runner={"task_runner": "sequential"},
    ).parent


@pytest.mark.slow  # a Prefect flow
def test_llava_federated_run_through_the_cli(checkpoints, tmp_path, mlflow_template) -> None:
    """prepare (the checkpoint's processor), split, federate (2 rounds) as the CLI runs them
    (its ``main``, in this process: tiny_project.call_cli)."""
    project = _project(tmp_path / "llava", checkpoints["llava"])
    seed_mlflow_store(project, mlflow_template)
    for command in ("prepare", "split", "federate"):
        call_cli(project, command)
    metrics = json.loads((project / "outputs/federate/metrics.json").read_text())
    assert metrics["rounds"] == 2
    assert 0.0 <= metrics["global_accuracy"] <= 1.0  # exact match of the generated answer
    assert any(project.glob("outputs/federate/**/adapter_model.safetensors"))


@pytest.mark.parametrize("family", ["clip", "vilt"])
def test_federated_run_in_process(checkpoints, tmp_path, family, monkeypatch) -> None:
    """The same stages and rounds through the library (the CLI run above covers the flow)."""
    from fedilora import stages
    from fedilora.federation import Federation, run

    project = _project(tmp_path / family, checkpoints[family])
    monkeypatch.chdir(project)
    params = load_params("params.yaml")
    table = stages.prepare(params)
    assert table.image_features.shape[1:] == (3, 32, 32)
    splits = stages.split(params)
    state, results = run(Federation(params, table, splits))
    assert len(results) == 2 and any("lora_A." in k for k in state)
    for key in ("accuracy", "missing_image/accuracy", "missing_text/accuracy"):
        assert 0.0 <= results[-1].global_metrics[key] <= 1.0


def test_name_or_path_validation(tmp_path) -> None:
    with pytest.raises(ConfigError, match="leave name at its default"):
        parse_params({"model": {"name": "tiny", "name_or_path": "openai/clip-vit-base-patch32"}})
    with pytest.raises(ConfigError, match="empty"):
        parse_params({"model": {"name_or_path": " "}})
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert/config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="model_type 'bert' is not supported"):
        hf.family_of(hf.load_config(str(tmp_path / "bert")))
    with pytest.raises(ValueError, match="cannot load the config"):
        hf.load_config(str(tmp_path / "nowhere"))


@pytest.mark.parametrize("family", FAMILIES)
def test_example_params_validate(family) -> None:
    params = load_params(REPO / "examples" / f"{family}.yaml")
    assert params.model.name_or_path and params.model.name == "embedded"
